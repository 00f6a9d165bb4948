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
``max_abs <= max(atol + rtol * (max(r) - min(r)), ULPS * ulp(max |r|))`` (NaN in the same
places); integer and boolean outputs must be equal. ``ulp(m)`` is the spacing of the output's
floating-point dtype at magnitude ``m``, ``eps * 2^floor(log2 m)`` with ``eps`` = 2^-10 for
float16, 2^-7 for bfloat16, 2^-23 for float32 and 2^-52 for float64, and ``ULPS`` is 4. Why: a
lossless rewrite may legitimately change the rounding of a result -- onnxruntime computes a
float16 BatchNormalization differently once a dead Squeeze before it is gone, and one float16
step at magnitude 4 is 2^-8, far above the default ``atol`` 1e-5 + ``rtol`` 1e-4 of the range --
and a few ulps at the output's largest magnitude leave room for two or three roundings of
intermediate values, while a real bug (a wrong weight, a wrong axis) changes values by far
more. For float32 ``4 ulp(m)`` is about ``5e-7 m``, below ``rtol * range`` whenever the range is
not tiny against the magnitude, so float32 tolerances are unchanged in practice. A lossy result (pruned or
quantized model) passes when shapes and dtypes match and every criterion of ``max_drift`` holds
(``cosine >= 0.99`` by default; ``cosine=0.999,max-abs=0.05`` and others, see
``onnxopt.metrics``); a criterion on a metric without a column here is listed under ``extra``.
Several feeds are all run; each metric keeps its worst value over the feeds, but for the
agreement metrics, pooled over every position of every feed.

Sessions. The candidate runs in an onnxruntime session with graph optimizations off, so the
model runs as written. A lossy result also runs in one with them on (``ORT_ENABLE_ALL``,
onnxruntime's default: how users run it), and each output is judged by the worse of the two
sessions: the one failing a criterion, else the one with the worse value of the first criterion
on which they differ (``worse_session``; ``by_session`` keeps both sessions' values, and a
failure the optimized session alone causes says so). Why: onnxruntime's fusions change what a
quantized or float16 model computes by as much as the criteria allow. QDQ pairs around a Conv
become QLinearConv, whose x86 u8s8 kernels without VNNI saturate int16 pair sums (8-bit weights
with ``reduce_range=false``: cosine 0.99994 unfused, 0.99671 fused on a 32-channel Conv with a
Sigmoid), and float16 chains fuse into kernels that round elsewhere (romanizer_decoder in
``float16``: max abs 0.00879 unfused, 0.00942 fused, over a 0.0092 bound). The reference stays
the original run once with optimizations off (:func:`reference_outputs`): what the model
computes as written is the truth the drift is measured against. A lossless result is judged in
the unoptimized session only: its tolerance is a few units in the last place, and onnxruntime's
fusions move the original's own rounding by as much (LayerNorm, Gelu, MatMul+Add fusions
evaluate in another order), so comparing the fused candidate with the unfused original would
blame the rewrite for onnxruntime's rounding, while comparing like with like would run the
original a second time (the large-model path runs it once, before the passes, so that it is
never in memory beside its optimized copy) for a difference that is onnxruntime's rounding,
not the rewrite's error. Cost: one more load and run over the feeds
of the candidate per lossy validation, the two sessions one after the other (one candidate in
memory at a time; the optimized one pre-packs weights, a second copy of the MatMul weights while
it runs).

A second look, only when some output fails on its values (never when the result passes, so a
passing validation costs nothing more; nor when an output's dtype, shape or layout differ, which
fails whatever else is found):

* Nondeterministic outputs. The original is loaded once more and run twice on the first feed an
  output failed on (the first feed in lossy mode); an output whose values differ between those
  runs and the first one (beyond the tolerance above) is random -- RandomNormal, RandomUniform,
  their ``Like`` forms, Multinomial, Bernoulli, Dropout in training mode, in any subgraph or
  custom op alike. Running twice in one session is needed: onnxruntime seeds a session's random
  ops the same way each time it loads a model, and draws new values on every run. Such an
  output's dtype and shape were compared; its values cannot be, so it is listed in
  ``not_compared`` (and a warning) instead of failing. Cost: one load and two runs of the
  original per failed validation (a rollback, which validates each attempt, pays it per
  attempt that fails). Detecting by op types instead would need the model parsed (the reference
  may be the serialization or the file of a multi-GiB model) and would miss custom ops.
* Lossless mode only, "onnxruntime computes the original wrongly". When the original is small
  enough (at most ``REFERENCE_MAX_NODES`` nodes in all its graphs and ``REFERENCE_MAX_BYTES``
  serialized, without external data), it is run by onnx's reference implementation
  (``onnx.reference.ReferenceEvaluator``, pure numpy, slow and not complete: bounded so, and
  skipped when it raises) on every feed an output failed on. An output on which the candidate
  agrees with the reference implementation within the tolerance above while the original on
  onnxruntime does not, on every such feed, is onnxruntime's error on the original, not the
  rewrite's: it passes, is listed in ``original_miscomputed`` with its reason, and a warning
  says that on onnxruntime the result will differ from the original where onnxruntime computed
  the original wrongly. Passing is what a user wants: two implementations agree that the result
  computes what the ONNX specification says. When the cross-check cannot run, a warning says why.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxopt import external, io, progress
from onnxopt.errors import InputError, first_line
from onnxopt.graph import graph_protos
from onnxopt.metrics import (METRICS, CosineMetric, Criterion, Tally, as_setting,
                             flatten_sequence, format_comparison, kept_positions, layout,
                             output_metrics, parse_criteria, pooled_cosine)

__all__ = ["compare_models", "reference_outputs", "ReferenceOutputs", "make_session", "run_model",
           "session_options", "OutputMetrics", "ValidationResult", "output_metrics",
           "flatten_sequence", "layout"]

# onnxruntime's own messages (unused initializers, kernel errors we report in one line) are not
# shown; sessions inherit this level, which the CLI's --verbose lowers.
ort.set_default_logger_severity(4)

DEFAULT_ATOL = 1e-5
DEFAULT_RTOL = 1e-4
DEFAULT_MAX_DRIFT = 0.99

#: Units in the last place of an output's dtype a lossless result may differ by (module
#: docstring).
ULPS = 4
#: Machine epsilon (the spacing of values in [1, 2)) of the floating-point dtypes, by name.
_EPSILON = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23,
            "float64": 2.0 ** -52}
#: The onnxruntime sessions a candidate runs in: graph optimizations off (the model as written,
#: every lossless and lossy result) and on (``ORT_ENABLE_ALL``, onnxruntime's default; lossy
#: results only). See the module docstring.
SESSIONS = ("unoptimized", "optimized")
#: Bounds on the original for the cross-check with onnx's reference implementation: node count
#: over every graph, and serialized bytes.
REFERENCE_MAX_NODES = 500
REFERENCE_MAX_BYTES = 16 << 20


def session_options(threads: int = 0, optimized: bool = False,
                    timed: bool = False) -> ort.SessionOptions:
    """Options for onnxopt's own onnxruntime sessions: graph optimizations off, so a model runs as
    written, and worker threads that sleep instead of spinning when idle (spinning costs a
    session tens of milliseconds of CPU, and slows the process it shares the machine with).

    Args:
        threads: intra-op threads; 0 lets onnxruntime choose (one per physical core), 1 creates
            no thread pool (cheapest for the tiny one-node models of constant folding).
        optimized: turn onnxruntime's graph optimizations on (for estimates that run a model
            many times, such as the drift budget's).
        timed: a session whose latency is measured: pre-packing stays on, as users run it.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else
                                     ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # pre-packing copies every constant MatMul weight into the kernel's layout: for a model run
    # a few times, time and a second copy of the weights in memory for nothing (the kernels
    # pack on the fly otherwise; validating a 1 B decoder quantized int8-weight peaked at
    # 5.02 GiB with it in the optimized session, 4.72 GiB without)
    if not timed:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


def make_session(model: onnx.ModelProto | bytes | str | os.PathLike, what: str,
                 optimized: bool = False, timed: bool = False,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with graph optimizations off, so the model runs as written
    (on with ``optimized``; ``timed`` for latency measurements: see :func:`session_options`;
    ``options``: these session options instead, e.g. with profiling on).

    Args:
        model: the model, its serialization (saves serializing it again) or its file. External
            data the model refers to is read from the run's external-data folder
            (``onnxopt.external.current_folder``), memory-mapped by onnxruntime. A model over the
            2 GiB protobuf limit is written to a temporary folder with its tensors as external
            data, and loaded from there.

    Raises:
        InputError: onnxruntime rejects the model (``what`` names it in the message).
    """
    opts = options or session_options(optimized=optimized, timed=timed)
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        data = model if isinstance(model, bytes) else io.serialize(model)
        if data is not None:
            folder = external.current_folder()
            if folder is not None:
                opts.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(folder))
            return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="onnxopt-", ignore_cleanup_errors=True) as folder:
            path = os.path.join(folder, "model.onnx")
            io.save_model(model, path, external_data=True)
            return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 -- onnxruntime raises several types
        first = first_line(err)
        raise InputError(f"{what}: onnxruntime cannot load the model: {first}") from None


#: Timings of each model (interleaved) for :func:`latency_ratio`.
LATENCY_RUNS = 5
#: Seconds one timing lasts at least (it averages as many runs as that takes).
MIN_TIMING = 0.02


def latency_ratio(before, after, feed: dict[str, np.ndarray], runs: int = LATENCY_RUNS,
                  what: tuple[str, str] = ("model before", "model after")) -> dict:
    """``after``'s latency against ``before``'s (models, serializations or files, as
    :func:`make_session` takes them) on onnxruntime CPU as users run it (graph optimizations
    on, pre-packing on): the median of ``runs`` timings of each on ``feed``, interleaved (a
    burst of load hits both), after one warm-up run each; a timing is the mean wall time of
    as many runs as last :data:`MIN_TIMING` seconds (one for a model slower than that).

    Returns ``{"latency_ratio": after / before, "latency_ms": {"before", "after"},
    "latency_note"}`` (milliseconds). Noisy: on a loaded machine, +-10 % between runs.

    Raises:
        InputError: onnxruntime cannot load or run a model.
    """
    sessions = [make_session(before, what[0], optimized=True, timed=True),
                make_session(after, what[1], optimized=True, timed=True)]
    inputs = [{x.name: feed[x.name] for x in s.get_inputs()} for s in sessions]

    def timed(k: int, repeat: int) -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            run_model(sessions[k], inputs[k], what[k])
        return (time.perf_counter() - start) / repeat

    # one warm-up run each; a timing averages enough runs to last MIN_TIMING seconds, so that
    # a model of a tenth of a millisecond is not timed by the clock's and Python's overhead
    repeat = max(1, math.ceil(MIN_TIMING / max(min(timed(0, 1), timed(1, 1)), 1e-6)))
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for k in (0, 1):
            times[k].append(timed(k, repeat))
    first, second = (statistics.median(t) for t in times)
    return {"latency_ratio": second / first if first > 0 else None,
            "latency_ms": {"before": first * 1000, "after": second * 1000},
            "latency_note": f"median of {runs} timings of each, interleaved, on one feed, a "
                            f"timing at least {MIN_TIMING * 1000:.0f} ms of runs: noisy"}


def latency_ratio_apart(before: bytes, after: bytes, feed: dict[str, np.ndarray],
                        what: tuple[str, str] = ("model before", "model after"),
                        timeout: float = 900.0) -> dict | str:
    """:func:`latency_ratio` in a child process (``python -c``, the models and the feed in a
    temporary folder): timing opens both models in onnxruntime's default session, which
    validation never does for an original, and a model can crash it (onnxruntime 1.32's
    default session segfaults on a float16 Transpose of the leading axis read by a MatMul with
    a constant: ``onnxopt.ops.onnxruntime_crashes_on_transpose``) -- that must end the child,
    not the run. A child process, not ``multiprocessing``: its spawn would import the
    caller's main module again.

    Returns:
        :func:`latency_ratio`'s dict, or why there is none (a string: the child crashed,
        failed or took more than ``timeout`` seconds).
    """
    import pickle
    import signal
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="onnxopt-timing-") as folder:
        for name, data in (("before.onnx", before), ("after.onnx", after)):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        with open(os.path.join(folder, "job.pickle"), "wb") as f:
            pickle.dump({"feed": feed, "what": what}, f)
        try:
            child = subprocess.run(
                [sys.executable, "-c", "import sys; from onnxopt.validate import _timing_job; "
                 "sys.exit(_timing_job(sys.argv[1]))", folder],
                capture_output=True, text=True, timeout=timeout,
                # the child imports onnxopt from where this process does
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
        except subprocess.TimeoutExpired:
            return f"timing took more than {timeout:.0f} s"
        if child.returncode < 0:
            return (f"onnxruntime crashed timing it in its default session "
                    f"({signal.Signals(-child.returncode).name})")
        result = os.path.join(folder, "result.pickle")
        if child.returncode or not os.path.exists(result):
            lines = child.stderr.strip().splitlines()
            return f"timing failed: {lines[-1] if lines else f'exit code {child.returncode}'}"
        with open(result, "rb") as f:
            return pickle.load(f)


def _timing_job(folder: str) -> int:
    """The child of :func:`latency_ratio_apart`: time ``folder``'s models, write the result."""
    import pickle

    with open(os.path.join(folder, "job.pickle"), "rb") as f:
        job = pickle.load(f)
    result = latency_ratio(os.path.join(folder, "before.onnx"),
                           os.path.join(folder, "after.onnx"), job["feed"], what=job["what"])
    with open(os.path.join(folder, "result.pickle"), "wb") as f:
        pickle.dump(result, f)
    return 0


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
        first = first_line(err)
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
    #: Lossy only (judged in both :data:`SESSIONS`): the session whose values are shown --
    #: "optimized" or "unoptimized" when that one was worse, "neither" when they agree.
    worse_session: str | None = None
    #: Lossy only: each session's value of every criterion, ``{session: {metric: value}}``.
    by_session: dict[str, dict[str, float | None]] = field(default_factory=dict)


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
    #: Outputs whose values could not be compared: the original computes different values on
    #: the same inputs (random ops); only their dtypes and shapes were.
    not_compared: list[str] = field(default_factory=list)
    #: Outputs onnxruntime computes wrongly on the original: the candidate agrees with onnx's
    #: reference implementation there, the original on onnxruntime does not.
    original_miscomputed: list[str] = field(default_factory=list)
    #: The onnxruntime sessions the candidate was judged in (:data:`SESSIONS`).
    sessions: list[str] = field(default_factory=lambda: ["unoptimized"])
    #: Lossy only: the input whose non-zero positions the criteria were judged on
    #: (``onnxopt.metrics.kept_positions``); None: every position.
    mask: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for o in d["outputs"]:
            for values in (o, o["extra"], *o["by_session"].values()):
                for k, v in values.items():
                    if isinstance(v, float) and not math.isfinite(v):
                        values[k] = json_float(v)
        return d


def json_float(v: float) -> float | str | None:
    """A float for JSON: infinities as "inf"/"-inf", NaN as None."""
    if math.isfinite(v):
        return v
    return None if math.isnan(v) else ("inf" if v > 0 else "-inf")


@dataclass
class ReferenceOutputs:
    """The reference model's output names and its outputs on each feed (a list per feed), as
    :func:`reference_outputs` computes them once for every validation of one run."""

    names: list[str]
    outputs: list[list]


def reference_outputs(reference, feeds: list[dict[str, np.ndarray]], synthesized: bool = False,
                      warnings: list[str] = ()) -> ReferenceOutputs:
    """Run ``reference`` (a ModelProto, its serialization or its file) on every feed, with one
    session that is released before returning: a large model is in memory only while it runs.

    Raises:
        InputError: the reference cannot be loaded or run on the feeds (with a hint about
            synthesized inputs when ``synthesized``).
    """
    progress.report("validation: loading the reference model")
    session = make_session(reference, "reference model")
    hint = (" (the inputs were synthesized: give real ones with --inputs, or fix dynamic dims "
            "with --input-shape" + "".join(f"; {w}" for w in warnings) + ")"
            if synthesized else "")
    outputs = []
    for i, feed in enumerate(feeds):
        progress.report(f"validation: running the reference model (feed {i + 1} of "
                        f"{len(feeds)})")
        outputs.append(run_model(session, feed, "reference model", hint=hint))
    return ReferenceOutputs([o.name for o in session.get_outputs()], outputs)


def compare_models(reference: onnx.ModelProto | bytes, candidate: onnx.ModelProto | bytes,
                   feeds: list[dict[str, np.ndarray]], *, atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL, max_drift=DEFAULT_MAX_DRIFT,
                   metric="cosine", lossy: bool = False, synthesized: bool = False,
                   warnings: list[str] = (),
                   computed: ReferenceOutputs | None = None,
                   mask: str | None = None) -> ValidationResult:
    """Run both models on every feed and compare their outputs.

    Args:
        reference, candidate: the original and the optimized model, each a ModelProto or its
            serialization.
        feeds: input feeds, ``{input name: array}``; inputs a model does not declare are ignored.
        atol, rtol: lossless tolerance, ``max_abs <= atol + rtol * range(reference output)``,
            at least :data:`ULPS` units in the last place of the output's dtype (module
            docstring).
        max_drift, metric: lossy criteria (``onnxopt.metrics.parse_criteria``): a threshold of
            ``metric`` (default cosine similarity), ``"cosine=0.999,max-abs=0.05"``, a mapping or
            criteria; every one must hold on every output.
        lossy: judge by ``max_drift`` instead of ``atol``/``rtol``, in both :data:`SESSIONS`
            (each output by the worse; module docstring).
        synthesized: the feeds were synthesized (an error then suggests real inputs, adding
            ``warnings`` about inputs that look like settings).
        computed: the reference's outputs on ``feeds`` (:func:`reference_outputs`), when a run
            validates several candidates: the reference then runs only for a second look.
        mask: with ``lossy``, an input whose non-zero positions are the ones judged (padding
            left out: ``onnxopt.metrics.kept_positions``); a lossless comparison keeps every
            position.

    A candidate that onnxruntime cannot load or run fails the validation (``reason`` says why).
    When outputs fail on their values, a second look (module docstring) tells random outputs
    (``not_compared``) and onnxruntime's errors on the original (``original_miscomputed``) from
    a broken candidate.

    Raises:
        InputError: the reference cannot be loaded or run on the feeds.
        UsageError: invalid criteria.
    """
    criteria = parse_criteria(max_drift, metric)
    # one model in memory at a time: the reference's outputs on every feed, then the candidate
    computed = computed or reference_outputs(reference, feeds, synthesized, warnings)
    ref_names, ref_outs = computed.names, computed.outputs
    result = ValidationResult(True, "lossy" if lossy else "lossless", atol, rtol,
                              as_setting(criteria), len(feeds), mask=mask if lossy else None)
    runs = []
    for session in SESSIONS[:2 if lossy else 1]:
        run = _measure(candidate, computed, feeds, criteria, lossy, atol, rtol, session,
                       result.mask)
        runs.append(run)
        result.sessions = list(SESSIONS[:len(runs)])
        if run.reason:
            result.passed, result.reason = False, run.reason
            return result
    run = runs[0] if len(runs) == 1 else _worse(*runs, criteria)
    metrics = result.outputs = run.metrics
    constant = [name for i, name in enumerate(ref_names) if all(
        _is_constant(flatten_sequence(out[i])) for out in ref_outs)]
    result.warnings = [f"output '{name}' is constant on these inputs: agreeing on it shows "
                       "little; give inputs the model responds to with --inputs"
                       for name in constant]
    if lossy and len(feeds) == 1 and any(isinstance(c.metric, CosineMetric) for c in criteria):
        # one value compared with one value: a cosine of 1 whenever the signs agree
        result.warnings += [
            f"output '{name}' has one value and there is one feed: its cosine is 1 whenever "
            "the signs agree and cannot fail; give more feeds with --inputs or a criterion "
            "such as --max-drift cosine=0.99,max-abs=0.01"
            for i, name in enumerate(ref_names) if flatten_sequence(ref_outs[0][i]).size == 1]
    failed = [i for i, m in enumerate(metrics) if not m.passed]
    if failed and not run.structural.intersection(failed):
        _second_look(result, reference, feeds, ref_outs, run.cand_failing,
                     {i: run.failed_on.get(i, [0]) for i in failed})
    result.passed = all(m.passed for m in metrics)
    if not result.passed:
        bad = next(m for m in metrics if not m.passed)
        result.reason = f"output '{bad.name}': {bad.reason}"
    return result


def _is_constant(r: np.ndarray) -> bool:
    """Whether the output value ``r`` holds one number repeated (at least two elements)."""
    return r.size >= 2 and r.dtype.kind in "biuf" and bool((r == r.flat[0]).all())


@dataclass
class _Run:
    """The candidate run in one onnxruntime session and compared on every feed
    (:func:`_measure`)."""

    #: Per output, its metrics and verdict in this session.
    metrics: list[OutputMetrics] = field(default_factory=list)
    #: Outputs whose layout, dtype or shape differ.
    structural: set[int] = field(default_factory=set)
    #: Output -> the feeds its values failed on.
    failed_on: dict[int, list[int]] = field(default_factory=dict)
    #: Feed -> the candidate's outputs, on the feeds some output failed on.
    cand_failing: dict[int, list] = field(default_factory=dict)
    #: Why the candidate could not be compared at all (cannot load or run, other outputs).
    reason: str = ""


def _measure(candidate, computed: ReferenceOutputs, feeds: list[dict[str, np.ndarray]],
             criteria: list[Criterion], lossy: bool, atol: float, rtol: float,
             session: str, mask: str | None = None) -> _Run:
    """Run ``candidate`` in the onnxruntime ``session`` (one of :data:`SESSIONS`) on every feed
    and compare its outputs with ``computed``; every output is judged (lossless tolerance, or
    the ``criteria`` on the aggregates over the feeds when ``lossy``, at the positions the
    ``mask`` input keeps)."""
    optimized = session == "optimized"
    what = "candidate model" + (" (onnxruntime graph optimizations on)" if optimized else "")
    progress.report(f"validation: loading the {what}")
    run = _Run()
    try:
        cand_sess = make_session(candidate, what, optimized=optimized)
    except InputError as err:  # a broken candidate is a failed validation, not bad input
        run.reason = str(err)
        return run
    ref_names, cand_names = computed.names, [o.name for o in cand_sess.get_outputs()]
    if ref_names != cand_names:
        run.reason = f"outputs differ: reference {ref_names}, candidate {cand_names}"
        return run
    metrics, structural, failed_on, cand_failing = (run.metrics, run.structural, run.failed_on,
                                                    run.cand_failing)
    tallies: dict[int, dict[str, Tally]] = {}  # per output: the metrics pooled over feeds
    # The cosine of a one-value output is 1 whenever the signs agree: such an output's cosine
    # is taken over the vector of its values on all feeds (onnxopt.metrics.pooled_cosine).
    single: dict[int, np.ndarray] = {}
    several: set[int] = set()
    worst: dict[int, float] = {}  # per output: the largest error a failure message quoted
    for k, (feed, ref_out) in enumerate(zip(feeds, computed.outputs)):
        try:
            cand_out = run_model(cand_sess, feed, what)
        except InputError as err:
            run.reason = str(err)
            return run
        for i, (name, r, c) in enumerate(zip(ref_names, ref_out, cand_out)):
            if (isinstance(r, list) or isinstance(c, list)) and layout(r) != layout(c):
                if len(metrics) <= i:
                    metrics.append(OutputMetrics(name, "sequence", [], "sequence", []))
                metrics[i].passed, metrics[i].reason = False, "sequence layouts differ"
                structural.add(i)
                continue
            r, c = flatten_sequence(r), flatten_sequence(c)
            if len(metrics) <= i:
                metrics.append(OutputMetrics(name, str(r.dtype), list(r.shape), str(c.dtype),
                                             list(c.shape)))
            m = metrics[i]
            if r.size and not np.prod(m.shape or [1]) and r.shape == c.shape:
                # the first feeds gave nothing (an If branch not taken): show a real shape
                m.shape, m.candidate_shape = list(r.shape), list(c.shape)
            if r.dtype != c.dtype or r.shape != c.shape:
                m.passed = False
                m.reason = f"reference {r.dtype}{list(r.shape)}, candidate {c.dtype}{list(c.shape)}"
                m.candidate_dtype, m.candidate_shape = str(c.dtype), list(c.shape)
                structural.add(i)
                continue
            if r.dtype.kind in "OSU":
                if not np.array_equal(r, c):
                    m.passed, m.reason = False, "string values differ"
                    failed_on.setdefault(i, []).append(k)
                    cand_failing[k] = cand_out
                continue
            r, c = kept_positions(r, c, feed.get(mask))
            s = output_metrics(r, c)
            if r.size == 1:  # see below: pooled over the feeds
                a, b = float(r.flat[0]), float(c.flat[0])
                single[i] = single.get(i, np.zeros(3)) + (a * b, a * a, b * b)
            elif r.size:  # an empty value (an If branch not taken) is neither
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
            tol = lossless_tolerance(r.dtype, s, atol, rtol)
            m.tolerance = tol if not m.tolerance else min(m.tolerance, tol)
            if s["nan_mismatch"]:
                m.passed, m.reason = False, "NaN or infinities in different places"
            elif not lossy and s["max_abs"] > tol:
                m.passed = False
                if s["max_abs"] >= worst.get(i, -1.0):  # the worst feed's, as the table shows
                    worst[i] = s["max_abs"]
                    m.reason = "max abs error {} > tolerance {}".format(
                        *format_comparison(s["max_abs"], tol, ".3g", ".3g"))
            else:
                continue
            failed_on.setdefault(i, []).append(k)
            cand_failing[k] = cand_out
    del cand_sess
    for i, dots in single.items():
        if i not in several and len(feeds) > 1:
            metrics[i].cosine = pooled_cosine(dots)
    for i, m in enumerate(metrics):
        if not (lossy and m.passed and i in tallies):
            continue
        # judged on the aggregates over all feeds: the reason shows the value in the table
        values = _criteria_values(m, criteria)
        broken = next((k for k in criteria if not k.meets(values[k.name])), None)
        if broken is not None:
            m.passed, m.reason = False, _failure(broken, values[broken.name])
    return run


def _criteria_values(m: OutputMetrics, criteria: list[Criterion]) -> dict[str, float | None]:
    """The value of each criterion's metric on output ``m`` (None when not measured: an output
    that could not be compared)."""
    return {k.name: getattr(m, k.metric.field) if k.metric.field else m.extra.get(k.name)
            for k in criteria}


def _worse(plain: _Run, fused: _Run, criteria: list[Criterion]) -> _Run:
    """Per output, the measurement of the worse of the two sessions (module docstring): the
    one failing when only one fails, else the one with the worse value of the first criterion
    (in the order given) on which they differ; the unoptimized one when they agree. The chosen
    metrics say which it was (``worse_session``) and keep both sessions' criterion values
    (``by_session``)."""
    chosen = _Run(structural=plain.structural | fused.structural,
                  cand_failing={**plain.cand_failing, **fused.cand_failing})
    for i, (p, f) in enumerate(zip(plain.metrics, fused.metrics)):
        vp, vf = _criteria_values(p, criteria), _criteria_values(f, criteria)
        order = (p.passed - f.passed) or next(
            (o for k in criteria if (o := _compare(k, vp[k.name], vf[k.name]))), 0)
        m, run = (f, fused) if order > 0 else (p, plain)
        m.worse_session = "optimized" if order > 0 else "unoptimized" if order < 0 else "neither"
        m.by_session = {"unoptimized": vp, "optimized": vf}
        if order > 0 and not m.passed and i not in chosen.structural:
            shown = ", ".join(f"{k} {format(v, '.6f' if k == 'cosine' else '.4g')}"
                              for k, v in vp.items() if v is not None)
            m.reason += (" with onnxruntime's graph optimizations on (its default, as users "
                         f"run the model; off: {shown})")
        chosen.metrics.append(m)
        if i in run.failed_on:
            chosen.failed_on[i] = run.failed_on[i]
    return chosen


def _compare(criterion: Criterion, a: float | None, b: float | None) -> int:
    """1 when the value ``b`` is worse than ``a`` for ``criterion``, -1 when ``a`` is, 0 when
    they are equal or not both measured (NaN is worst)."""
    if a is None or b is None or a == b or (math.isnan(a) and math.isnan(b)):
        return 0
    if math.isnan(a) or math.isnan(b):
        return -1 if math.isnan(a) else 1
    return 1 if criterion.metric.worst(a, b) == b else -1


def lossless_tolerance(dtype: np.dtype, stats: dict[str, float], atol: float,
                       rtol: float) -> float:
    """The largest max-abs error a lossless result may have on an output of ``dtype``:
    ``max(atol + rtol * range, ULPS * ulp(magnitude))`` (module docstring), 0 for integers and
    booleans (a lossless rewrite never changes one).

    Args:
        dtype: the reference output's dtype.
        stats: ``onnxopt.metrics.output_metrics`` of the output (its ``range`` and
            ``magnitude``).
    """
    if dtype.kind in "biu":
        return 0.0
    tol = atol + rtol * stats["range"]
    eps, magnitude = _EPSILON.get(str(dtype)), stats["magnitude"]
    if eps is not None and 0 < magnitude < math.inf:
        tol = max(tol, ULPS * eps * 2.0 ** math.floor(math.log2(magnitude)))
    return tol


def _agrees(reference, candidate, atol: float, rtol: float) -> bool:
    """Whether ``candidate`` (an output: a tensor or a sequence) equals ``reference`` within the
    lossless tolerance of ``reference``'s dtype and values."""
    if layout(reference) != layout(candidate):
        return False
    r, c = flatten_sequence(reference), flatten_sequence(candidate)
    if r.dtype.kind in "OSU":
        return bool(np.array_equal(r, c))
    s = output_metrics(r, c)
    return not s["nan_mismatch"] and s["max_abs"] <= lossless_tolerance(r.dtype, s, atol, rtol)


#: Why a failed output passes after the second look: the ValidationResult list naming it, its
#: reason and its warning.
_EXCUSES = {
    "original_miscomputed": (
        "onnxruntime computes the original wrongly: the candidate agrees with onnx's reference "
        "implementation, the original on onnxruntime does not",
        "output '{name}': onnxruntime computes the original wrongly (onnx's reference "
        "implementation agrees with the optimized model): on onnxruntime the optimized model "
        "gives other values than the original there, the ones the ONNX specification defines"),
    "not_compared": (
        "values not compared: the original computes different values on the same inputs",
        "output '{name}' is random (the original gives other values on each run: random ops, "
        "or Dropout in training mode): its dtype and shape were compared, its values could "
        "not be"),
}


def _second_look(result: ValidationResult, reference, feeds: list[dict[str, np.ndarray]],
                 ref_outs: list[list], cand_failing: dict[int, list],
                 failed_on: dict[int, list[int]]) -> None:
    """Tell random outputs and onnxruntime's errors on the original from a broken candidate
    (module docstring), updating ``result``'s outputs, lists and warnings.

    An output that onnxruntime computes differently on each run is random only when onnx's
    reference implementation, where it can run, does too: onnxruntime reading memory it never
    wrote also gives other values on each run, and the candidate is then judged by the
    reference implementation.

    Args:
        reference: the original, as given to :func:`compare_models`.
        ref_outs: the original's outputs on every feed; ``cand_failing``: the candidate's on
            every feed some output's values failed on.
        failed_on: the failed outputs (by index) and the feeds their values failed on (feed 0
            for a lossy criterion, judged over all feeds).
    """
    atol, rtol = result.atol, result.rtol
    k = min(f for feeds_of in failed_on.values() for f in feeds_of)
    progress.report("validation: running the original twice more (random outputs?)")
    session = make_session(reference, "reference model")
    runs = [run_model(session, feeds[k], "reference model") for _ in range(2)]
    del session
    varies = {i for i in failed_on
              if not all(_agrees(ref_outs[k][i], run[i], atol, rtol) for run in runs)}
    spec = None if result.mode == "lossy" else _ReferenceImplementation(reference, feeds)
    for i, feeds_of in failed_on.items():
        m, random = result.outputs[i], i in varies
        if random and spec is not None and spec.usable:  # by the specification too?
            random = spec.varies(k, i, atol, rtol) or not spec.usable
        if not random and spec is not None and spec.miscomputed(
                i, {f: (ref_outs[f], cand_failing[f]) for f in feeds_of}, atol, rtol):
            excuse = "original_miscomputed"
        elif random:
            excuse = "not_compared"
        else:
            continue
        reason, warning = _EXCUSES[excuse]
        m.passed, m.reason = True, reason
        getattr(result, excuse).append(m.name)
        result.warnings.append(warning.format(name=m.name))
    if spec is not None and not spec.usable:
        result.warnings.append("not cross-checked with onnx's reference implementation "
                               f"(onnx.reference): {spec.why}")


class _ReferenceImplementation:
    """The original run by ``onnx.reference.ReferenceEvaluator`` (numpy kernels), on demand and
    once per feed. Not ``usable`` (``why`` says why) when the model is over
    :data:`REFERENCE_MAX_NODES` or :data:`REFERENCE_MAX_BYTES`, refers to external data, or
    the evaluator raises (an op it does not implement, say)."""

    def __init__(self, reference, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds, self._outputs, self._evaluator, self.why = feeds, {}, None, ""
        self.why = self._load(reference)

    @property
    def usable(self) -> bool:
        return self._evaluator is not None

    def _load(self, reference) -> str:
        if isinstance(reference, (str, os.PathLike)):
            size = os.path.getsize(reference)
        else:
            size = len(reference) if isinstance(reference, bytes) else None
        if size is not None and size > REFERENCE_MAX_BYTES:
            return f"the model has {size} bytes (at most {REFERENCE_MAX_BYTES} are checked)"
        if isinstance(reference, bytes):
            model = onnx.load_from_string(reference)
        elif isinstance(reference, (str, os.PathLike)):
            model = onnx.load(os.fspath(reference), load_external_data=False)
        else:
            model = reference
        if external.has_external_data(model):
            return "the model refers to external data"
        nodes = sum(len(g.node) for g in graph_protos(model.graph))
        if nodes > REFERENCE_MAX_NODES:
            return f"the model has {nodes} nodes (at most {REFERENCE_MAX_NODES} are checked)"
        from onnx.reference import ReferenceEvaluator  # loaded only when needed

        return self._guard(lambda: setattr(self, "_evaluator", ReferenceEvaluator(model)))

    def _guard(self, action) -> str:
        """Run ``action``; when it raises, the evaluator is unusable and why is returned."""
        try:
            action()
        except Exception as err:  # noqa: BLE001 -- the evaluator raises what any kernel raises
            first = first_line(err)
            self._evaluator = None
            self.why = f"it cannot run the model: {first}"
        return self.why if self._evaluator is None else ""

    def _run(self, f: int) -> list | None:
        """The outputs on feed ``f``, None when the evaluator raised (it is then unusable)."""
        feed, found = self._feeds[f], []
        progress.report("validation: running the original on onnx's reference implementation")
        if self.usable:
            self._guard(lambda: found.append(list(self._evaluator.run(
                None, {n: feed[n] for n in self._evaluator.input_names if n in feed}))))
        return found[0] if found else None

    def outputs(self, f: int) -> list | None:
        """The outputs on feed ``f`` (run once), None when the evaluator cannot tell."""
        if f not in self._outputs:
            self._outputs[f] = self._run(f)
        return self._outputs[f]

    def varies(self, f: int, i: int, atol: float, rtol: float) -> bool:
        """Whether output ``i`` differs between two runs on feed ``f`` (random by the
        specification); False when the evaluator cannot tell."""
        first, second = self.outputs(f), self._run(f)
        return first is not None and second is not None and not _agrees(first[i], second[i],
                                                                         atol, rtol)

    def miscomputed(self, i: int, outputs: dict[int, tuple[list, list]], atol: float,
                    rtol: float) -> bool:
        """Whether, on every feed ``f`` of ``outputs`` (``{f: (onnxruntime's outputs of the
        original, the candidate's)}``), output ``i`` of the candidate agrees with the evaluator
        and the original's does not; False when the evaluator cannot tell."""
        for f, (original, candidate) in outputs.items():
            spec = self.outputs(f)
            if spec is None or not _agrees(spec[i], candidate[i], atol, rtol) \
                    or _agrees(spec[i], original[i], atol, rtol):
                return False
        return True


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
    shown, limit = format_comparison(value, criterion.threshold,
                                     ".6f" if metric.name == "cosine" else ".4g")
    return (f"{metric.description} {shown} {'<' if metric.higher_is_better else '>'} "
            f"max drift {limit}")
