"""Validation: run the original and the optimized model on onnxruntime CPU and compare outputs.

Metrics per output (reference ``r``, candidate ``c``, both flattened to float64):

* ``max_abs`` = max |c - r|; ``mean_abs`` = mean |c - r|;
* ``max_rel`` = max |c - r| / |r| over the elements where |r| exceeds 1e-6 of max |r| (elsewhere
  a relative error only measures how close to zero the reference is);
* ``cosine`` = <c, r> / (|c| |r|) (1.0 when both are all zeros);
* ``snr_db`` = 10 log10(sum r^2 / sum (c - r)^2) (infinite when equal).

A lossless result passes when names, order, dtypes and shapes match and, for every output,
``max_abs <= atol + rtol * (max(r) - min(r))`` (NaN in the same places); integer and boolean
outputs must be equal. A lossy result (pruned or
quantized model) passes when shapes and dtypes match and ``cosine >= max_drift``. Several feeds are
all run; each metric keeps its worst value over the feeds.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import io
from onnxopt.errors import InputError

# onnxruntime's own messages (unused initializers, kernel errors we report in one line) are not
# shown; sessions inherit this level, which the CLI's --verbose lowers.
ort.set_default_logger_severity(4)

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
DEFAULT_MAX_DRIFT = 0.99


def session_options(threads: int = 0) -> ort.SessionOptions:
    """Options for onnxopt's own onnxruntime sessions: graph optimizations off, so a model runs as
    written, and worker threads that sleep instead of spinning when idle (spinning costs a
    session tens of milliseconds of CPU, and slows the process it shares the machine with).

    Args:
        threads: intra-op threads; 0 lets onnxruntime choose (one per physical core), 1 creates
            no thread pool (cheapest for the tiny one-node models of constant folding).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def make_session(model: onnx.ModelProto | bytes, what: str) -> ort.InferenceSession:
    """An onnxruntime CPU session with graph optimizations off, so the model runs as written.

    Args:
        model: the model, or its serialization (saves serializing it again). A model over the
            2 GiB protobuf limit is written to a temporary folder with its tensors as external
            data, and loaded from there.

    Raises:
        InputError: onnxruntime rejects the model (``what`` names it in the message).
    """
    try:
        data = model if isinstance(model, bytes) else io.serialize(model)
        if data is not None:
            return ort.InferenceSession(data, session_options(),
                                        providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="onnxopt-", ignore_cleanup_errors=True) as folder:
            path = os.path.join(folder, "model.onnx")
            io.save_model(model, path, external_data=True)
            return ort.InferenceSession(path, session_options(),
                                        providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 -- onnxruntime raises several types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what}: onnxruntime cannot load the model: {first}") from None


def run_model(session: ort.InferenceSession, feed: dict[str, np.ndarray], what: str,
              hint: str = "") -> list:
    """Run ``session`` on ``feed`` (only the inputs the session declares are passed).

    Raises:
        InputError: an input is missing from the feed, or onnxruntime fails while running.
    """
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in feed]
    if missing:
        raise InputError(f"{what}: the inputs lack {', '.join(missing)}")
    try:
        return session.run(None, {n: feed[n] for n in names})
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what}: onnxruntime failed to run the model: {first}{hint}") from None


@dataclass
class OutputMetrics:
    """Comparison of one output over all feeds (worst case)."""

    name: str
    dtype: str
    shape: list
    candidate_dtype: str
    candidate_shape: list
    max_abs: float = 0.0
    max_rel: float = 0.0
    mean_abs: float = 0.0
    cosine: float = 1.0
    snr_db: float = math.inf
    tolerance: float = 0.0
    passed: bool = True
    reason: str = ""


@dataclass
class ValidationResult:
    """Verdict and per-output metrics of comparing a candidate model with its reference."""

    passed: bool
    mode: str
    atol: float
    rtol: float
    max_drift: float
    feeds: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    reason: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for o in d["outputs"]:
            for k in ("snr_db", "max_rel", "max_abs", "mean_abs", "cosine"):
                if isinstance(o[k], float) and not math.isfinite(o[k]):
                    o[k] = None if math.isnan(o[k]) else ("inf" if o[k] > 0 else "-inf")
        return d


def output_metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """Drift metrics of one output (see the module docstring), plus ``range`` (max - min of the
    finite reference values) and ``nan_mismatch`` (NaN, or infinities, in different places)."""
    r = np.asarray(ref, dtype=np.float64).ravel()
    c = np.asarray(cand, dtype=np.float64).ravel()
    if r.size == 0:
        return dict(max_abs=0.0, max_rel=0.0, mean_abs=0.0, cosine=1.0, snr_db=math.inf,
                    range=0.0, nan_mismatch=False)
    nan_r, nan_c = np.isnan(r), np.isnan(c)
    # NaN in different places, or an infinity the other side does not have (same sign)
    nan_mismatch = bool((nan_r != nan_c).any()) or bool(
        ((np.isinf(r) | np.isinf(c)) & ~(nan_r | nan_c) & (r != c)).any())
    ok = ~(nan_r | nan_c)
    r, c = r[ok], c[ok]
    with np.errstate(all="ignore"):
        inf_same = (r == c)
        diff = np.where(inf_same, 0.0, np.abs(c - r))
        diff = np.nan_to_num(diff, nan=np.inf)
        # relative error where the reference is not (nearly) zero: elsewhere it is meaningless
        magnitude = np.abs(r)
        floor = max(np.finfo(np.float64).tiny, 1e-6 * float(magnitude[np.isfinite(magnitude)].max()
                                                          if np.isfinite(magnitude).any() else 0))
        significant = magnitude > floor
        rel = diff[significant] / magnitude[significant]
        finite = np.isfinite(r) & np.isfinite(c)
        rf, cf = r[finite], c[finite]
        nr, nc = np.linalg.norm(rf), np.linalg.norm(cf)
        if nr == 0 and nc == 0:
            cosine = 1.0
        elif nr == 0 or nc == 0:
            cosine = 0.0
        else:
            cosine = float(np.dot(rf, cf) / (nr * nc))
        noise = float(np.sum((cf - rf) ** 2))
        signal = float(np.sum(rf ** 2))
        snr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        rng = float(rf.max() - rf.min()) if rf.size else 0.0
    return dict(max_abs=float(diff.max()) if diff.size else 0.0,
                max_rel=float(rel.max()) if rel.size else 0.0,
                mean_abs=float(diff.mean()) if diff.size else 0.0,
                cosine=cosine, snr_db=snr, range=rng, nan_mismatch=nan_mismatch)


def flatten_sequence(value) -> np.ndarray:
    """A sequence output (a list of tensors) as the concatenation of its raveled elements, so the
    drift metrics apply to it; a tensor output is returned as is. Layouts are compared apart,
    by :func:`layout`."""
    if not isinstance(value, list):
        return np.asarray(value)
    return np.concatenate([np.asarray(v).ravel() for v in value]) if value else np.zeros(0)


def layout(value) -> tuple:
    """Dtype and shape of a tensor output, or of every element of a sequence output."""
    if isinstance(value, list):
        return ("sequence",) + tuple((str(np.asarray(v).dtype), np.shape(v)) for v in value)
    return (str(np.asarray(value).dtype), np.shape(value))


def compare_models(reference: onnx.ModelProto | bytes, candidate: onnx.ModelProto | bytes,
                   feeds: list[dict[str, np.ndarray]], *, atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL, max_drift: float = DEFAULT_MAX_DRIFT,
                   lossy: bool = False, synthesized: bool = False,
                   warnings: list[str] = ()) -> ValidationResult:
    """Run both models on every feed and compare their outputs.

    Args:
        reference, candidate: the original and the optimized model, each a ModelProto or its
            serialization.
        feeds: input feeds, ``{input name: array}``; inputs a model does not declare are ignored.
        atol, rtol: lossless tolerance, ``max_abs <= atol + rtol * range(reference output)``.
        max_drift: lossy criterion, minimum cosine similarity per output.
        lossy: judge by ``max_drift`` instead of ``atol``/``rtol``.
        synthesized: the feeds were synthesized (an error then suggests real inputs, adding
            ``warnings`` about inputs that look like settings).

    A candidate that onnxruntime cannot load or run fails the validation (``reason`` says why).

    Raises:
        InputError: the reference cannot be loaded or run on the feeds.
    """
    ref_sess = make_session(reference, "reference model")
    result = ValidationResult(True, "lossy" if lossy else "lossless", atol, rtol, max_drift,
                              len(feeds))
    try:
        cand_sess = make_session(candidate, "candidate model")
    except InputError as err:  # a broken candidate is a failed validation, not bad input
        result.passed, result.reason = False, str(err)
        return result
    ref_names = [o.name for o in ref_sess.get_outputs()]
    cand_names = [o.name for o in cand_sess.get_outputs()]
    if ref_names != cand_names:
        result.passed = False
        result.reason = f"outputs differ: reference {ref_names}, candidate {cand_names}"
        return result
    metrics: list[OutputMetrics] = []
    constant = set(ref_names)  # outputs whose reference values are all equal, in every feed
    for feed in feeds:
        ref_out = run_model(ref_sess, feed, "reference model", hint=(
            " (the inputs were synthesized: give real ones with --inputs, or fix dynamic dims "
            "with --input-shape" + "".join(f"; {w}" for w in warnings) + ")"
            if synthesized else ""))
        try:
            cand_out = run_model(cand_sess, feed, "candidate model")
        except InputError as err:
            result.passed, result.reason = False, str(err)
            return result
        for i, (name, r, c) in enumerate(zip(ref_names, ref_out, cand_out)):
            if (isinstance(r, list) or isinstance(c, list)) and layout(r) != layout(c):
                if len(metrics) <= i:
                    metrics.append(OutputMetrics(name, "sequence", [], "sequence", []))
                metrics[i].passed, metrics[i].reason = False, "sequence layouts differ"
                continue
            r, c = flatten_sequence(r), flatten_sequence(c)
            if r.size < 2 or not (r.dtype.kind in "biuf" and (r == r.flat[0]).all()):
                constant.discard(name)
            if len(metrics) <= i:
                metrics.append(OutputMetrics(name, str(r.dtype), list(r.shape), str(c.dtype),
                                             list(c.shape)))
            m = metrics[i]
            if r.dtype != c.dtype or r.shape != c.shape:
                m.passed = False
                m.reason = f"reference {r.dtype}{list(r.shape)}, candidate {c.dtype}{list(c.shape)}"
                m.candidate_dtype, m.candidate_shape = str(c.dtype), list(c.shape)
                continue
            if r.dtype.kind in "OSU":
                if not np.array_equal(r, c):
                    m.passed, m.reason = False, "string values differ"
                continue
            s = output_metrics(r, c)
            m.max_abs = max(m.max_abs, s["max_abs"])
            m.max_rel = max(m.max_rel, s["max_rel"])
            m.mean_abs = max(m.mean_abs, s["mean_abs"])
            m.cosine = min(m.cosine, s["cosine"])
            m.snr_db = min(m.snr_db, s["snr_db"])
            # integers and booleans are exact: a lossless rewrite never changes one
            tol = 0.0 if r.dtype.kind in "biu" else atol + rtol * s["range"]
            m.tolerance = tol if not m.tolerance else min(m.tolerance, tol)
            if s["nan_mismatch"]:
                m.passed, m.reason = False, "NaN or infinities in different places"
            elif lossy and s["cosine"] < max_drift:
                m.passed = False
                m.reason = f"cosine similarity {s['cosine']:.6f} < max drift {max_drift}"
            elif not lossy and s["max_abs"] > tol:
                m.passed = False
                m.reason = f"max abs error {s['max_abs']:.3g} > tolerance {tol:.3g}"
    result.outputs = metrics
    result.warnings = [f"output '{m.name}' is constant on these inputs: agreeing on it shows "
                       "little; give inputs the model responds to with --inputs"
                       for m in metrics if m.name in constant]
    result.passed = all(m.passed for m in metrics)
    if not result.passed:
        bad = next(m for m in metrics if not m.passed)
        result.reason = f"output '{bad.name}': {bad.reason}"
    return result
