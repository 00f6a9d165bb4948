"""Drift metrics: how far a candidate output is from the reference, and the criteria a lossy
result must meet. The drift budget (``onnxopt.budget``) and lossy validation
(``onnxopt.validate``) both judge with these.

Metrics of one output, reference ``r`` and candidate ``c`` (the elements where neither is NaN;
sums over the elements where both are finite):

============  =========================================================  =========  =========
name          value                                                      better     identical
============  =========================================================  =========  =========
``cosine``    ``<c, r> / (|c| |r|)`` (1 when both are all zeros)          higher     1
``snr``       ``10 log10(sum r^2 / sum (c - r)^2)``, in dB               higher     inf
``max-abs``   ``max |c - r|``                                            lower      0
``rel-l2``    ``|c - r| / |r|`` (the L2 norms; 0 when equal, inf when    lower      0
              ``r`` is all zeros and ``c`` is not)
``argmax``    fraction of positions (every index but the last axis)      higher     1
              whose argmax over the last axis is the same
``top-k``     mean over positions of ``|T_k(r) ∩ T_k(c)| / k``, with     higher     1
              ``T_k`` the indices of the ``k`` largest values over the
              last axis (``k`` = 5, or ``top-3`` ...; at most the axis
              length); ties broken by the lower index
============  =========================================================  =========  =========

Over several feeds, the agreement metrics (``argmax``, ``top-k``) are *pooled*: the fraction of
all positions of all feeds (so that ``argmax=0.99`` over 100 one-image feeds allows one flip);
every other metric keeps its worst feed (:class:`Tally`). A 0-d output has one position of one
element. A sequence output (a list of tensors) is judged as
the concatenation of its raveled elements, after its layout (every element's dtype and shape) was
compared. Whatever the metric, an output whose dtype, shape or sequence layout changed, whose
strings differ, or whose NaNs or infinities moved scores the metric's ``failure`` value
(``-1`` for cosine, ``-inf`` for the other higher-is-better metrics, ``inf`` for the others), which
fails any criterion.

A **criterion** is a metric and a threshold (``cosine >= 0.999``, ``max-abs <= 0.05``); a lossy
result passes when every criterion holds on every output and feed. :func:`parse_criteria` reads
them from a number (a threshold of the ``metric`` named apart, cosine by default), a string
(``"cosine=0.999,max-abs=0.05"``), a mapping ``{name or metric or callable: threshold}``, or
:class:`Criterion` objects. A user callable ``fn(reference, candidate) -> float`` gets two numpy
arrays of the same dtype and shape (NaN in the same places) and is higher-is-better; subclass
:class:`DriftMetric` for anything else.

The budget keeps a *margin* in reserve (:meth:`DriftMetric.target`): a fraction of the error the
criterion allows, where the error is ``1 - cosine``, ``1 - agreement``, the max-abs or relative L2
value itself, and the noise power for SNR (``-10 log10(1 - margin)`` dB more). ``1 - cosine`` is
about half the noise-to-signal power ratio for small noise, so cosine and SNR criteria keep the same
reserve. A callable metric has no known best value and gets no margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

from onnxopt.errors import UsageError


def output_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """The error statistics of one output (``onnxopt.validate``'s module docstring):
    ``max_abs``, ``max_rel``, ``mean_abs``, ``cosine``, ``snr_db``, ``rel_l2``, plus ``range``
    (max - min of the finite reference values), ``magnitude`` (max |r| over the finite reference
    values) and ``nan_mismatch`` (NaN, or infinities, in different places). Arrays of any shape
    and numeric dtype; compared as float64."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    c = np.asarray(cand, dtype=np.float64).ravel()
    if r.size == 0:
        return dict(max_abs=0.0, max_rel=0.0, mean_abs=0.0, cosine=1.0, snr_db=math.inf,
                    rel_l2=0.0, range=0.0, magnitude=0.0, nan_mismatch=False)
    nan_mismatch = _nan_mismatch(r, c)
    ok = ~(np.isnan(r) | np.isnan(c))
    r, c = r[ok], c[ok]
    with np.errstate(all="ignore"):
        inf_same = (r == c)
        diff = np.where(inf_same, 0.0, np.abs(c - r))
        diff = np.nan_to_num(diff, nan=np.inf)
        # relative error where the reference is not (nearly) zero: elsewhere it is meaningless
        magnitude = np.abs(r)
        largest = (float(magnitude[np.isfinite(magnitude)].max())
                   if np.isfinite(magnitude).any() else 0.0)
        floor = max(np.finfo(np.float64).tiny, 1e-6 * largest)
        significant = magnitude > floor
        rel = diff[significant] / magnitude[significant]
        finite = np.isfinite(r) & np.isfinite(c)
        rf, cf = r[finite], c[finite]
        cosine = _cosine(rf, cf)
        noise = float(np.sum((cf - rf) ** 2))
        signal = float(np.sum(rf ** 2))
        snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        rel_l2 = 0.0 if noise == 0 else (math.sqrt(noise / signal) if signal > 0 else math.inf)
        rng = float(rf.max() - rf.min()) if rf.size else 0.0
    return dict(max_abs=float(diff.max()) if diff.size else 0.0,
                max_rel=float(rel.max()) if rel.size else 0.0,
                mean_abs=float(diff.mean()) if diff.size else 0.0,
                cosine=cosine, snr_db=snr, rel_l2=rel_l2, range=rng, magnitude=largest,
                nan_mismatch=nan_mismatch)


def _nan_mismatch(r: np.ndarray, c: np.ndarray) -> bool:
    """NaN in different places, or an infinity the other side does not have (same sign), in two
    raveled float64 arrays."""
    nan_r, nan_c = np.isnan(r), np.isnan(c)
    with np.errstate(all="ignore"):
        return bool((nan_r != nan_c).any()) or bool(
            ((np.isinf(r) | np.isinf(c)) & ~(nan_r | nan_c) & (r != c)).any())


def _cosine(rf: np.ndarray, cf: np.ndarray) -> float:
    """Cosine similarity of two finite float64 vectors (1 when both are zero, 0 when one is)."""
    nr, nc = np.linalg.norm(rf), np.linalg.norm(cf)
    if nr == 0 and nc == 0:
        return 1.0
    if nr == 0 or nc == 0:
        return 0.0
    return float(np.dot(rf, cf) / (nr * nc))


def cosine_similarity(ref: np.ndarray, cand: np.ndarray) -> float:
    """:func:`output_metrics`' ``cosine`` alone (the same value, computed without the other
    statistics: the drift budget scores every feed of every evaluation by it)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    c = np.asarray(cand, dtype=np.float64).ravel()
    if r.size == 0:
        return 1.0
    ok = ~(np.isnan(r) | np.isnan(c))
    r, c = r[ok], c[ok]
    with np.errstate(all="ignore"):
        finite = np.isfinite(r) & np.isfinite(c)
        return _cosine(r[finite], c[finite])


def flatten_sequence(value) -> np.ndarray:
    """A sequence output (a list of tensors) as the concatenation of its raveled elements, so the
    drift metrics apply to it; a tensor output is returned as is. Layouts are compared apart,
    by :func:`layout`."""
    if not isinstance(value, list):
        return np.asarray(value)
    return np.concatenate([np.asarray(v).ravel() for v in value]) if value else np.zeros(0)


def kept_positions(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The positions of two outputs a drift mask keeps (``--drift-mask``): where ``mask`` (an
    input of the feed, e.g. a tokenizer's ``attention_mask`` ``[batch, sequence]``) is non-zero,
    for an output whose leading dimensions are the mask's shape (``last_hidden_state``
    ``[batch, sequence, hidden]`` -> ``[kept tokens, hidden]``); other outputs (a pooled
    ``[batch, hidden]``), no mask, or a mask keeping nothing: the outputs whole. Padding
    positions compute values no reader uses, yet their activations set quantization ranges
    and dilute or dominate a metric."""
    if mask is None or reference.ndim < mask.ndim or reference.shape[:mask.ndim] != mask.shape \
            or candidate.shape != reference.shape:
        return reference, candidate
    keep = mask.astype(bool)
    if not keep.any():
        return reference, candidate
    return reference[keep], candidate[keep]


def layout(value) -> tuple:
    """Dtype and shape of a tensor output, or of every element of a sequence output."""
    if isinstance(value, list):
        return ("sequence",) + tuple((str(np.asarray(v).dtype), np.shape(v)) for v in value)
    return (str(np.asarray(value).dtype), np.shape(value))


def mismatch(reference, candidate) -> str | None:
    """Why ``candidate`` cannot be compared with ``reference`` by any metric (layout, dtype,
    shape, strings, NaN or infinities in other places), or None."""
    if (isinstance(reference, list) or isinstance(candidate, list)) \
            and layout(reference) != layout(candidate):
        return "sequence layouts differ"
    r, c = flatten_sequence(reference), flatten_sequence(candidate)
    if r.dtype != c.dtype or r.shape != c.shape:
        return f"reference {r.dtype}{list(r.shape)}, candidate {c.dtype}{list(c.shape)}"
    if r.dtype.kind in "OSU":
        return None if np.array_equal(r, c) else "string values differ"
    if r.dtype.kind in "fc" and r.size and _nan_mismatch(
            np.asarray(r, dtype=np.float64).ravel(), np.asarray(c, dtype=np.float64).ravel()):
        return "NaN or infinities in different places"
    return None


class DriftMetric:
    """A measure of one output's drift (see the module docstring).

    Subclasses set ``name``, ``description``, ``higher_is_better``, ``best`` (the value of
    identical outputs, None when unknown) and implement :meth:`value`; ``field`` names the
    attribute of ``onnxopt.validate.OutputMetrics`` that shows it (None: shown under ``extra``).
    """

    name = ""
    #: What the user's threshold means, for messages ("cosine similarity").
    description = ""
    higher_is_better = True
    best: float | None = 1.0
    field: str | None = None
    #: Pooled over feeds (a fraction of positions) rather than the worst feed (see Tally).
    pooled = False
    #: The range a threshold must lie in (inclusive).
    bounds: tuple[float, float] = (-math.inf, math.inf)

    @property
    def failure(self) -> float:
        """The score of outputs that cannot be compared (fails every threshold)."""
        return -math.inf if self.higher_is_better else math.inf

    def value(self, reference: np.ndarray, candidate: np.ndarray) -> float:  # pragma: no cover
        """The metric of two numeric arrays of one dtype and shape, NaN in the same places."""
        raise NotImplementedError

    def score(self, reference, candidate) -> float:
        """The metric of one output on one feed (arrays, or lists of arrays for sequences);
        :attr:`failure` when the two cannot be compared (:func:`mismatch`)."""
        if mismatch(reference, candidate) is not None:
            return self.failure
        r, c = flatten_sequence(reference), flatten_sequence(candidate)
        if r.dtype.kind in "OSU":
            return self.best if self.best is not None else math.inf
        with np.errstate(all="ignore"):
            return float(self.value(r, c))

    def meets(self, value: float, threshold: float) -> bool:
        """Whether ``value`` satisfies ``threshold`` (NaN never does)."""
        return value >= threshold if self.higher_is_better else value <= threshold

    def worst(self, a: float, b: float) -> float:
        """The worse of two values (NaN is worst)."""
        if math.isnan(a) or math.isnan(b):
            return math.nan
        return min(a, b) if self.higher_is_better else max(a, b)

    def target(self, threshold: float, margin: float) -> float:
        """The threshold tightened by ``margin``, a fraction of the allowed error kept in reserve
        (see the module docstring): ``threshold + margin (best - threshold)``."""
        if self.best is None or not math.isfinite(self.best):
            return threshold
        return threshold + margin * (self.best - threshold)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class CosineMetric(DriftMetric):
    """Cosine similarity of the flattened outputs; -1 for outputs that cannot be compared."""

    name, description, field, bounds = "cosine", "cosine similarity", "cosine", (-1.0, 1.0)

    @property
    def failure(self) -> float:
        return -1.0

    def value(self, reference, candidate):
        return cosine_similarity(reference, candidate)


class SNRMetric(DriftMetric):
    """Signal-to-noise ratio in dB; the margin keeps that fraction of the noise power."""

    name, description, field, best = "snr", "SNR (dB)", "snr_db", math.inf

    def value(self, reference, candidate):
        return output_metrics(reference, candidate)["snr_db"]

    def target(self, threshold, margin):
        return threshold - 10 * math.log10(1 - margin) if margin < 1 else math.inf


class MaxAbsMetric(DriftMetric):
    """The largest absolute error."""

    name, description, field = "max-abs", "max abs error", "max_abs"
    higher_is_better, best, bounds = False, 0.0, (0.0, math.inf)

    def value(self, reference, candidate):
        return output_metrics(reference, candidate)["max_abs"]


class RelL2Metric(DriftMetric):
    """The L2 norm of the error relative to that of the reference."""

    name, description, field = "rel-l2", "relative L2 error", "rel_l2"
    higher_is_better, best, bounds = False, 0.0, (0.0, math.inf)

    def value(self, reference, candidate):
        return output_metrics(reference, candidate)["rel_l2"]


def _rows(a: np.ndarray) -> np.ndarray:
    """``a`` as a 2-D array of positions x last axis (a 0-d array is one position, an empty
    array none)."""
    if a.size == 0:
        return np.zeros((0, 1), a.dtype)
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(-1, a.shape[-1])


class ArgmaxMetric(DriftMetric):
    """Fraction of positions whose argmax over the last axis agrees (classifier labels)."""

    name, description, field, bounds = "argmax", "argmax agreement", "argmax", (0.0, 1.0)
    pooled = True

    def value(self, reference, candidate):
        r, c = _rows(reference), _rows(candidate)
        if r.size == 0:
            return 1.0
        return float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))


class TopKMetric(DriftMetric):
    """Mean overlap of the top-``k`` index sets over the last axis (see the module docstring)."""

    description, field, bounds, pooled = "top-k agreement", None, (0.0, 1.0), True

    def __init__(self, k: int = 5) -> None:
        self.k = k
        self.name = f"top-{k}"
        self.description = f"top-{k} agreement"
        self.field = "top_k" if k == 5 else None

    def value(self, reference, candidate):
        r, c = _rows(reference), _rows(candidate)
        if r.size == 0:
            return 1.0
        k = min(self.k, r.shape[-1])
        # stable sort of the negated order: ties go to the lower index
        top_r = np.argsort(-r.astype(np.float64), axis=-1, kind="stable")[:, :k]
        top_c = np.argsort(-c.astype(np.float64), axis=-1, kind="stable")[:, :k]
        shared = (top_r[:, :, None] == top_c[:, None, :]).any(-1).sum(-1)
        return float(np.mean(shared / k))


def pooled_cosine(dots: np.ndarray) -> float:
    """Cosine similarity from the sums ``(r.c, r.r, c.c)`` (1.0 when both are all zeros, 0.0
    when only one is)."""
    rc, rr, cc = (float(x) for x in dots)
    if rr == 0.0 and cc == 0.0:
        return 1.0
    if rr == 0.0 or cc == 0.0:
        return 0.0
    return max(-1.0, min(1.0, rc / math.sqrt(rr * cc)))


class Tally:
    """One metric of one output over several feeds: the worst feed, or for a ``pooled`` metric
    the fraction over every position of every feed; an output that could not be compared on
    some feed keeps the metric's ``failure`` value."""

    def __init__(self, metric: DriftMetric) -> None:
        self.metric = metric
        self.value: float | None = None
        self._agreed = self._positions = 0.0
        self._dots = np.zeros(3)  # sum r*c, r*r, c*c over the one-value feeds (cosine)
        self._rest: float | None = None  # the worst cosine of the other feeds

    def add(self, value: float, reference=None, candidate=None) -> float:
        """Count one feed's ``value`` (of the output whose reference is ``reference``, which
        pooled metrics need for the number of positions); returns the aggregate so far.

        The cosine of a one-value output is 1 whenever the signs agree, whatever the values:
        given ``candidate``, such an output's cosine is taken over the vector of its values on
        every feed so far (:func:`pooled_cosine`)."""
        m = self.metric
        if isinstance(m, CosineMetric) and candidate is not None and m.failure not in (
                value, self.value):
            r, c = flatten_sequence(reference), flatten_sequence(candidate)
            if r.size == 1 and c.size == 1:
                a, b = float(r.flat[0]), float(c.flat[0])
                self._dots += (a * b, a * a, b * b)
                self.value = pooled_cosine(self._dots) if self._rest is None else min(
                    self._rest, pooled_cosine(self._dots))
                return self.value
            self._rest = value if self._rest is None else min(self._rest, value)
        if self.value == m.failure or value == m.failure or not m.pooled:
            self.value = value if self.value is None else m.worst(self.value, value)
            return self.value
        r = flatten_sequence(reference) if reference is not None else np.zeros(1)
        positions = 0 if r.size == 0 else _rows(r).shape[0]
        self._agreed += value * positions
        self._positions += positions
        self.value = self._agreed / self._positions if self._positions else 1.0
        return self.value


class CallableMetric(DriftMetric):
    """A user function ``fn(reference, candidate) -> float``, higher is better, no margin."""

    best = None

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")
        self.description = self.name

    def value(self, reference, candidate):
        return float(self.fn(reference, candidate))


#: The built-in metrics by name (``top-k`` is ``top-5``; ``top-3`` and so on are made on demand).
METRICS: dict[str, DriftMetric] = {m.name: m for m in (
    CosineMetric(), SNRMetric(), MaxAbsMetric(), RelL2Metric(), ArgmaxMetric(), TopKMetric(5))}
_ALIASES = {"top-k": "top-5", "snr-db": "snr", "max-abs-error": "max-abs", "relative-l2": "rel-l2"}


def get_metric(metric: str | DriftMetric | Callable) -> DriftMetric:
    """The metric ``metric`` names (``"max_abs"`` and ``"max-abs"`` alike; ``"top-3"``), or
    ``metric`` itself, or a user callable wrapped as a :class:`CallableMetric`.

    Raises:
        UsageError: no metric has that name.
    """
    if isinstance(metric, DriftMetric):
        return metric
    if callable(metric):
        return CallableMetric(metric)
    key = str(metric).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in METRICS:
        return METRICS[key]
    if key.startswith("top-") and key[4:].isdigit() and int(key[4:]) > 0:
        return TopKMetric(int(key[4:]))
    raise UsageError(f"unknown drift metric '{metric}'; known: {', '.join(METRICS)}, top-K")


@dataclass(frozen=True)
class Criterion:
    """A metric and the threshold every output must meet (``cosine >= 0.999``)."""

    metric: DriftMetric
    threshold: float

    @property
    def name(self) -> str:
        return self.metric.name

    def meets(self, value: float) -> bool:
        return self.metric.meets(value, self.threshold)

    def __str__(self) -> str:
        return f"{self.name} {'>=' if self.metric.higher_is_better else '<='} " \
               f"{format_threshold(self.threshold)}"


def _threshold(metric: DriftMetric, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{where}: the threshold of {metric.name} must be a number, got "
                         f"{value!r}")
    low, high = metric.bounds
    if math.isnan(value) or not low <= value <= high or math.isinf(value):
        shown = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}" \
            if math.isfinite(low) else "finite"
        raise UsageError(f"{where}: {metric.name} ({metric.description}) threshold must be "
                         f"{'in ' if math.isfinite(high) else ''}{shown}; got {value}")
    return float(value)


def parse_criteria(spec, metric: str | DriftMetric | Callable = "cosine",
                   where: str = "max drift") -> list[Criterion]:
    """The criteria ``spec`` gives (see the module docstring).

    Args:
        spec: a number (a threshold of ``metric``), a string (``"0.99"`` or
            ``"cosine=0.999,max-abs=0.05"``), a mapping ``{metric: threshold}`` whose keys are
            names, :class:`DriftMetric` objects or callables, a :class:`Criterion` or a list of
            them.
        metric: the metric a bare number means.
        where: how to name the setting in messages (``--max-drift``).

    Raises:
        UsageError: an unknown metric, a metric given twice, a threshold out of its range or
            not a number, an empty or malformed string, an empty criterion (a trailing or
            doubled comma).
    """
    if isinstance(spec, Criterion):
        return [spec]
    if isinstance(spec, (list, tuple)) and all(isinstance(c, Criterion) for c in spec) and spec:
        pairs: Iterable = [(c.metric, c.threshold) for c in spec]
    elif isinstance(spec, bool) or spec is None:
        raise UsageError(f"{where} must be a number, a string or a table, got {spec!r}")
    elif isinstance(spec, (int, float)):
        pairs = [(metric, spec)]
    elif isinstance(spec, str):
        text = spec.strip()
        try:
            pairs = [(metric, float(text))]
        except ValueError:
            pairs = []
            items = [s.strip() for s in text.split(",")] if text else []
            if "" in items:  # "cosine=0.999," may have lost a criterion: not guessed
                raise UsageError(f"{where} '{spec}': an empty criterion (a stray comma); "
                                 "expected METRIC=VALUE,... such as cosine=0.999,max-abs=0.05")
            for item in items:
                name, sep, value = item.partition("=")
                try:
                    pairs.append((name.strip(), float(value)))
                except ValueError:
                    sep = ""
                if not sep or not name.strip():
                    raise UsageError(f"{where} '{spec}': expected a number or METRIC=VALUE,... "
                                     "such as cosine=0.999,max-abs=0.05") from None
            if not pairs:
                raise UsageError(f"{where} is empty")
    elif isinstance(spec, dict) and spec:
        pairs = list(spec.items())
    else:
        raise UsageError(f"{where} must be a number, a string or a table, got {spec!r}")
    criteria: list[Criterion] = []
    for m, value in pairs:
        found = get_metric(m)
        if any(c.name == found.name for c in criteria):
            raise UsageError(f"{where}: metric {found.name} given twice")
        criteria.append(Criterion(found, _threshold(found, value, where)))
    return criteria


def describe(criteria: list[Criterion]) -> str:
    """The criteria for messages: ``cosine >= 0.999, max-abs <= 0.05``."""
    return ", ".join(map(str, criteria))


def as_setting(criteria: list[Criterion]) -> float | dict[str, float]:
    """The criteria for reports: the bare threshold when there is one cosine criterion (as the
    settings have always read), else ``{metric: threshold}``."""
    if len(criteria) == 1 and criteria[0].name == "cosine":
        return criteria[0].threshold
    return {c.name: c.threshold for c in criteria}


def describe_setting(setting: float | dict[str, float]) -> str:
    """:func:`describe` for criteria as reports keep them (:func:`as_setting`)."""
    return describe(setting_criteria(setting))


def setting_criteria(setting: float | dict[str, float]) -> list[Criterion]:
    """The criteria of a setting as reports keep it (:func:`as_setting`), in its order; a metric
    that is not built in (a user callable, of which a report keeps the name) is higher-is-better
    and cannot be measured again."""
    pairs = setting.items() if isinstance(setting, dict) else [("cosine", setting)]
    criteria = []
    for name, threshold in pairs:
        try:
            metric = get_metric(name)
        except UsageError:
            metric = CallableMetric(_known_by_name_only, name)
        criteria.append(Criterion(metric, threshold))
    return criteria


def _known_by_name_only(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The function of a user metric of which only the name is known (:func:`setting_criteria`)."""
    raise UsageError("a user metric read back from a report cannot be measured again")


def format_threshold(threshold: float) -> str:
    """``threshold`` as ``:g`` prints it (``0.999``, ``1e-05``), or every digit when that would
    round it (a cosine threshold ``0.9999999`` is not ``1``)."""
    short = f"{threshold:g}"
    return short if float(short) == threshold or math.isnan(threshold) else repr(float(threshold))


def format_comparison(value: float, threshold: float, spec: str = ".4g",
                      threshold_spec: str | None = None) -> tuple[str, str]:
    """``value`` (as ``spec`` formats it) and ``threshold`` (as ``threshold_spec`` does, or
    :func:`format_threshold`) for a message comparing them, with as many more significant digits
    as it takes for the printed numbers to compare as the numbers do: ``("0.9999997", "1")``,
    not ``("1.000000", "1")``."""
    shown = format(value, spec)
    limit = format_threshold(threshold) if threshold_spec is None else format(threshold,
                                                                              threshold_spec)
    digits = 7
    while _side(float(shown), float(limit)) != _side(value, threshold) and digits <= 17:
        shown, limit = format(value, f".{digits}g"), format(threshold, f".{digits}g")
        digits += 1
    return shown, limit


def _side(a: float, b: float) -> int:
    """-1, 0 or 1 as ``a`` is below, equal to (or NaN against) or above ``b``."""
    return (a > b) - (a < b)
