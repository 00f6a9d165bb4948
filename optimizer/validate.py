"""Validation: run the original and the optimized model on onnxruntime CPU and compare outputs.

Metrics per output (reference ``r``, candidate ``c``, both flattened to float64):

* ``max_abs`` = max |c - r|; ``mean_abs`` = mean |c - r|;
* ``max_rel`` = max |c - r| / |r| over the elements where |r| exceeds 1e-6 of max |r| (elsewhere
  a relative error only measures how close to zero the reference is);
* ``cosine`` = <c, r> / (|c| |r|) (1.0 when both are all zeros);
* ``snr_db`` = 10 log10(sum r^2 / sum (c - r)^2) (infinite when equal);
* ``rel_l2`` = |c - r| / |r| (L2 norms);
* lossy only: ``argmax`` and ``top_k`` agreement over the last axis (``onnxopt.metrics``; None
  when not measured).

A lossless result passes when names, order, dtypes and shapes match and, for every output,
``max_abs <= atol + rtol * (max(r) - min(r))`` (NaN in the same places); integer and boolean
outputs must be equal. A lossy result (pruned or
quantized model) passes when shapes and dtypes match and every criterion of ``max_drift`` holds
(``cosine >= 0.99`` by default; ``cosine=0.999,max-abs=0.05`` and others, see
``onnxopt.metrics``); a criterion on a metric without a column here is listed under ``extra``.
Several feeds are all run; each metric keeps its worst value over the feeds, but for the
agreement metrics, pooled over every position of every feed.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import external, io, progress
from onnxopt.errors import InputError
from onnxopt.metrics import (METRICS, Criterion, Tally, as_setting, flatten_sequence, layout,
                             output_metrics, parse_criteria, pooled_cosine)

__all__ = ["compare_models", "make_session", "run_model", "session_options", "OutputMetrics",
           "ValidationResult", "output_metrics", "flatten_sequence", "layout"]

# onnxruntime's own messages (unused initializers, kernel errors we report in one line) are not
# shown; sessions inherit this level, which the CLI's --verbose lowers.
ort.set_default_logger_severity(4)

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
DEFAULT_MAX_DRIFT = 0.99


def session_options(threads: int = 0, optimized: bool = False) -> ort.SessionOptions:
    """Options for onnxopt's own onnxruntime sessions: graph optimizations off, so a model runs as
    written, and worker threads that sleep instead of spinning when idle (spinning costs a
    session tens of milliseconds of CPU, and slows the process it shares the machine with).

    Args:
        threads: intra-op threads; 0 lets onnxruntime choose (one per physical core), 1 creates
            no thread pool (cheapest for the tiny one-node models of constant folding).
        optimized: turn onnxruntime's graph optimizations on (for estimates that run a model
            many times, such as the drift budget's).
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else
                                     ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimized:
        # pre-packing copies every MatMul weight into the kernel's layout: for a model run once
        # or twice, time and a second copy of the weights in memory for nothing
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike, what: str,
                 optimized: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session with graph optimizations off, so the model runs as written
    (on with ``optimized``, see :func:`session_options`).

    Args:
        model: the model, its serialization (saves serializing it again) or its file. External
            data the model refers to is read from the run's external-data folder
            (``onnxopt.external.current_folder``), memory-mapped by onnxruntime. A model over the
            2 GiB protobuf limit is written to a temporary folder with its tensors as external
            data, and loaded from there.

    Raises:
        InputError: onnxruntime rejects the model (``what`` names it in the message).
    """
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), session_options(optimized=optimized),
                                        providers=["CPUExecutionProvider"])
        data = model if isinstance(model, bytes) else io.serialize(model)
        if data is not None:
            opts = session_options(optimized=optimized)
            folder = external.current_folder()
            if folder is not None:
                opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(folder))
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="onnxopt-", ignore_cleanup_errors=True) as folder:
            path = os.path.join(folder, "model.onnx")
            io.save_model(model, path, external_data=True)
            return ort.InferenceSession(path, session_options(optimized=optimized),
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
    rel_l2: float = 0.0
    argmax: float | None = None
    top_k: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
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
    #: The lossy criteria: a cosine threshold, or ``{metric: threshold}`` (``metrics.as_setting``).
    max_drift: float | dict[str, float]
    feeds: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    reason: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for o in d["outputs"]:
            for values in (o, o["extra"]):
                for k, v in values.items():
                    if isinstance(v, float) and not math.isfinite(v):
                        values[k] = json_float(v)
        return d


def json_float(v: float) -> float | str | None:
    """A float for JSON: infinities as "inf"/"-inf", NaN as None."""
    if math.isfinite(v):
        return v
    return None if math.isnan(v) else ("inf" if v > 0 else "-inf")


def compare_models(reference: onnx.ModelProto | bytes, candidate: onnx.ModelProto | bytes,
                   feeds: list[dict[str, np.ndarray]], *, atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL, max_drift=DEFAULT_MAX_DRIFT,
                   metric="cosine", lossy: bool = False, synthesized: bool = False,
                   warnings: list[str] = ()) -> ValidationResult:
    """Run both models on every feed and compare their outputs.

    Args:
        reference, candidate: the original and the optimized model, each a ModelProto or its
            serialization.
        feeds: input feeds, ``{input name: array}``; inputs a model does not declare are ignored.
        atol, rtol: lossless tolerance, ``max_abs <= atol + rtol * range(reference output)``.
        max_drift, metric: lossy criteria (``onnxopt.metrics.parse_criteria``): a threshold of
            ``metric`` (default cosine similarity), ``"cosine=0.999,max-abs=0.05"``, a mapping or
            criteria; every one must hold on every output.
        lossy: judge by ``max_drift`` instead of ``atol``/``rtol``.
        synthesized: the feeds were synthesized (an error then suggests real inputs, adding
            ``warnings`` about inputs that look like settings).

    A candidate that onnxruntime cannot load or run fails the validation (``reason`` says why).

    Raises:
        InputError: the reference cannot be loaded or run on the feeds.
        UsageError: invalid criteria.
    """
    criteria = parse_criteria(max_drift, metric)
    # one model in memory at a time: the reference's outputs on every feed, then the candidate
    progress.report("validation: loading the reference model")
    ref_sess = make_session(reference, "reference model")
    ref_names = [o.name for o in ref_sess.get_outputs()]
    hint = (" (the inputs were synthesized: give real ones with --inputs, or fix dynamic dims "
            "with --input-shape" + "".join(f"; {w}" for w in warnings) + ")"
            if synthesized else "")
    ref_outs = []
    for i, feed in enumerate(feeds):
        progress.report(f"validation: running the reference model (feed {i + 1} of "
                        f"{len(feeds)})")
        ref_outs.append(run_model(ref_sess, feed, "reference model", hint=hint))
    del ref_sess
    progress.report("validation: loading the candidate model")
    result = ValidationResult(True, "lossy" if lossy else "lossless", atol, rtol,
                              as_setting(criteria), len(feeds))
    try:
        cand_sess = make_session(candidate, "candidate model")
    except InputError as err:  # a broken candidate is a failed validation, not bad input
        result.passed, result.reason = False, str(err)
        return result
    cand_names = [o.name for o in cand_sess.get_outputs()]
    if ref_names != cand_names:
        result.passed = False
        result.reason = f"outputs differ: reference {ref_names}, candidate {cand_names}"
        return result
    metrics: list[OutputMetrics] = []
    tallies: dict[int, dict[str, Tally]] = {}  # per output: the metrics pooled over feeds
    constant = set(ref_names)  # outputs whose reference values are all equal, in every feed
    # The cosine of a one-value output is 1 whenever the signs agree: such an output's cosine
    # is taken over the vector of its values on all feeds (onnxopt.metrics.pooled_cosine).
    single: dict[int, np.ndarray] = {}
    several: set[int] = set()
    for feed, ref_out in zip(feeds, ref_outs):
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
            if r.size == 1:  # see below: pooled over the feeds
                a, b = float(r.flat[0]), float(c.flat[0])
                single[i] = single.get(i, np.zeros(3)) + (a * b, a * a, b * b)
            else:
                several.add(i)
            m.max_abs = max(m.max_abs, s["max_abs"])
            m.max_rel = max(m.max_rel, s["max_rel"])
            m.mean_abs = max(m.mean_abs, s["mean_abs"])
            m.cosine = min(m.cosine, s["cosine"])
            m.snr_db = min(m.snr_db, s["snr_db"])
            m.rel_l2 = max(m.rel_l2, s["rel_l2"])
            values = {"cosine": s["cosine"], "snr": s["snr_db"], "max-abs": s["max_abs"],
                      "rel-l2": s["rel_l2"]}
            if lossy:
                _agreement(m, r, c, values, criteria, tallies.setdefault(i, {}))
            # integers and booleans are exact: a lossless rewrite never changes one
            tol = 0.0 if r.dtype.kind in "biu" else atol + rtol * s["range"]
            m.tolerance = tol if not m.tolerance else min(m.tolerance, tol)
            if s["nan_mismatch"]:
                m.passed, m.reason = False, "NaN or infinities in different places"
            elif not lossy and s["max_abs"] > tol:
                m.passed = False
                m.reason = f"max abs error {s['max_abs']:.3g} > tolerance {tol:.3g}"
    for i, dots in single.items():
        if i not in several and len(feeds) > 1:
            metrics[i].cosine = pooled_cosine(dots)
    for i, m in enumerate(metrics):
        if not (lossy and m.passed and i in tallies):
            continue
        # judged on the aggregates over all feeds: the reason shows the value in the table
        values = {k.name: getattr(m, k.metric.field) if k.metric.field else m.extra[k.name]
                  for k in criteria}
        broken = next((k for k in criteria if not k.meets(values[k.name])), None)
        if broken is not None:
            m.passed, m.reason = False, _failure(broken, values[broken.name])
    result.outputs = metrics
    result.warnings = [f"output '{m.name}' is constant on these inputs: agreeing on it shows "
                       "little; give inputs the model responds to with --inputs"
                       for m in metrics if m.name in constant]
    result.passed = all(m.passed for m in metrics)
    if not result.passed:
        bad = next(m for m in metrics if not m.passed)
        result.reason = f"output '{bad.name}': {bad.reason}"
    return result


def _agreement(m: OutputMetrics, r: np.ndarray, c: np.ndarray, values: dict[str, float],
               criteria: list[Criterion], tallies: dict[str, Tally]) -> None:
    """Measure on one feed the argmax and top-5 agreement of a lossy result, and the criteria
    whose metric has no column (into ``m.extra``); keep each one's aggregate over the feeds so
    far in ``m`` (``onnxopt.metrics.Tally``) and this feed's value in ``values``."""
    with np.errstate(all="ignore"):
        wanted = [(METRICS["argmax"], "argmax"), (METRICS["top-5"], "top_k")] + [
            (k.metric, None) for k in criteria if k.name not in values
            and k.name not in ("argmax", "top-5")]
        for metric, attr in wanted:
            values[metric.name] = float(metric.value(r, c))
            total = tallies.setdefault(metric.name, Tally(metric)).add(values[metric.name], r)
            if attr is not None:
                setattr(m, attr, total)
            else:
                m.extra[metric.name] = total


def _failure(criterion: Criterion, value: float) -> str:
    """Why an output fails ``criterion`` with ``value``, for the report."""
    metric = criterion.metric
    shown = f"{value:.6f}" if metric.name == "cosine" else f"{value:.4g}"
    return (f"{metric.description} {shown} {'<' if metric.higher_is_better else '>'} "
            f"max drift {criterion.threshold:g}")
