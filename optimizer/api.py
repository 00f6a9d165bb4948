"""The Python API: ``optimize`` (load, run passes, validate) and ``validate`` (compare two models).

    load (onnxopt.io) -> Graph -> PassManager(pipeline, analyses) -> validate -> save
                                       +-> drift budget (lossy proposals, against the original)

Both return a :class:`onnxopt.report.Report`; neither touches the disk unless given paths.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import re
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import onnx
import onnx.external_data_helper

from onnxopt import checks, external, io
from onnxopt.errors import (OnnxoptWarning, UnsupportedModel, UsageError, ValidationFailed,
                             first_line)
from onnxopt.graph import export_graph, import_graph, model_stats
from onnxopt.inputs import (FeedStream, check_feeds, feed_files, input_warnings, load_feed,
                            synthesize_feed)
from onnxopt.layerwise import compare_layerwise, first_divergence
from onnxopt.budget import DriftBudget
from onnxopt.metrics import Criterion, as_setting, parse_criteria
from onnxopt.ops import name_omitted_outputs, omitted_outputs
from onnxopt.opset import OpsetUpgradeError, default_opset, upgrade
from onnxopt.pass_manager import Pass, PassContext, PassManager, PassRecord, is_auto
from onnxopt.pipeline import (SETTINGS, STRENGTH_OPTIONS, Pipeline, PassSpec, build_pipeline,
                              check_targets, load_config)
from onnxopt.report import Report
from onnxopt.strength import use_executor
from onnxopt.validate import (DEFAULT_ATOL, DEFAULT_MAX_DRIFT, DEFAULT_RTOL, ValidationResult,
                              compare_models, latency_ratio_apart, reference_outputs)

Feeds = Union[str, os.PathLike, dict, Sequence[dict], None]
#: Lossy criteria: a threshold of ``metric``, ``"cosine=0.999,max-abs=0.05"``, a mapping
#: ``{metric: threshold}`` (names, ``DriftMetric`` objects or callables) or criteria
#: (``onnxopt.metrics.parse_criteria``).
MaxDrift = Union[float, str, dict, Sequence[Criterion]]


#: Margin of a second budget decision when the first one's result fails validation (see
#: ``onnxopt.budget``; the first uses 0.1).
BUDGET_RETRY_MARGIN = 0.5

#: A result holding at least this many bytes of tensors in memory, to be written to ``output``,
#: is validated from its file (``onnxopt.io.stage_model``): written first beside the target,
#: its ModelProto and serialization released, onnxruntime loading the file, put in place (at the
#: write, after the report) when it passes, removed otherwise. onnxruntime's session of a
#: quantized model takes several times its size while it fuses and prepacks (1 B decoder,
#: int8-weight: 3.4 GiB for 1.03 GiB of weights), on top of what the process holds.
STAGE_BYTES = 256 * 2**20

#: zlib level of the compressed sizes in the report of a pruning or clustering run (gzip's
#: default).
COMPRESSION_LEVEL = 6


def _compressed_size(path: str | os.PathLike | None, data: bytes | None) -> int | None:
    """zlib-compressed bytes (:data:`COMPRESSION_LEVEL`) of the model file at ``path`` (with its
    external data file ``<path>.data``, if any), else of ``data``; None when neither is at
    hand."""
    compressor = zlib.compressobj(COMPRESSION_LEVEL)
    size = 0
    if path is not None:
        for name in (str(path), f"{path}.data"):
            if os.path.exists(name):
                with open(name, "rb") as f:
                    while chunk := f.read(1 << 24):
                        size += len(compressor.compress(chunk))
    elif data is not None:
        size += len(compressor.compress(data))
    else:
        return None
    return size + len(compressor.flush())


def _version() -> str:
    from onnxopt import __version__
    return __version__


def _describe_source(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<memory>"


def _runnable(model: onnx.ModelProto, serialized: bytes | None) -> onnx.ModelProto | bytes:
    """What the checker and onnxruntime get: the serialization when there is one (serializing
    again costs as much as the first time), else the model (over the 2 GiB protobuf limit)."""
    return model if serialized is None else serialized


def _omissions_named(model: onnx.ModelProto, serialized: bytes | None, owned: bool,
                     which: str = "") -> tuple[onnx.ModelProto, bytes | None, list[str]]:
    """``model`` with its omitted Loop/Scan outputs named, which onnxruntime cannot run
    (:func:`onnxopt.ops.name_omitted_outputs`; a copy when it is not ``owned``, the caller's),
    its serialization (made again when a name was given and there was one) and the warning
    saying so (or none; ``which`` names the model in it)."""
    if not omitted_outputs(model):
        return model, serialized, []
    if not owned:
        copied = onnx.ModelProto()
        copied.CopyFrom(model)
        model = copied
    named = name_omitted_outputs(model)
    return model, (io.serialize(model) if serialized is not None else None), [
        f"{which}named {len(named)} omitted Loop/Scan output(s) ({_first_names(named)}): "
        "onnxruntime 1.32 crashes or refuses to load a Loop or Scan with an omitted output; "
        "the model's outputs are unchanged"]


#: Passes whose goal is speed as well as size (integer kernels): their result is timed.
SPEED_PASSES = ("quantize_static", "quantize_dynamic")
#: A result more than this many times as slow as the original gets a warning (the timing is
#: noisy: +-10 % between runs on a loaded machine).
SLOWER = 1.2
#: Models of more parameter bytes are not timed (two more sessions would hold their weights).
TIMED_MAX_BYTES = 1 << 30


def _speed_check(report: Report, models: tuple[onnx.ModelProto, onnx.ModelProto],
                 original: bytes | None, result: bytes | None,
                 feeds: list[dict] | None, timed: bool = False) -> list[str]:
    """Time the validated result of a pass whose goal is speed (:data:`SPEED_PASSES`) against
    the original (``report.latency``: :func:`onnxopt.validate.latency_ratio_apart` on the
    first feed, in a child process); return the warning when it is more than :data:`SLOWER`
    times as slow, or that it could not be timed. Models with external data or of more than
    :data:`TIMED_MAX_BYTES` of weights are not timed. Small models lose this way:
    dtln_model_2 (0.2 ms per run, five 128-wide LSTM MatMuls) ran 2.8-3.1x as slow with
    int8-static, its QuantizeLinear/DequantizeLinear costing more than the integer kernels
    save. ``timed``: time the result even when no speed pass changed it (a speed pass's
    latency-guided decision that left everything float: :func:`_latency_retry`)."""
    changed = [r.name for r in report.passes if r.modified and r.name in SPEED_PASSES]
    if not (changed or timed) or not feeds or not isinstance(original, bytes) \
            or not isinstance(result, bytes) \
            or report.validation is None or not report.validation.passed \
            or max(report.before.parameter_bytes, report.after.parameter_bytes) > TIMED_MAX_BYTES \
            or any(external.has_external_data(m) for m in models):
        return []
    measured = latency_ratio_apart(original, result, feeds[0],
                                   what=("original model", "optimized model"))
    if isinstance(measured, str):
        return [f"the result was not timed against the original: {measured}"]
    report.latency = measured
    return _slower(report)


def _slower(report: Report, guided: bool = False) -> list[str]:
    """The warning that ``report.latency`` is more than :data:`SLOWER` times the original's,
    naming the speed passes that changed the model and the user's levers (``guided``:
    ``latency_guided`` was tried already, or the user chose it); else none."""
    changed = [r.name for r in report.passes if r.modified and r.name in SPEED_PASSES]
    ratio, ms = report.latency["latency_ratio"], report.latency["latency_ms"]
    if ratio is None or ratio <= SLOWER or not changed:
        return []
    passes = ", ".join(dict.fromkeys(changed))
    hint = ("--quantize-exclude can leave the small MatMuls float, and "
            if "quantize_static" not in changed else "" if guided else
            "quantize_static's latency_guided = true leaves float what runs slower in integer "
            "form, and ")
    return [f"{passes} made the model {ratio:.2f}x as slow on this machine ({ms['before']:.3g} "
            f"-> {ms['after']:.3g} ms per run; {report.latency['latency_note']}): its "
            "QuantizeLinear/DequantizeLinear and integer kernels cost more than they save at "
            f"these sizes; {hint}the int8-weight mode shrinks the file without changing kernels"]


#: A ``quantize_static`` result more than this many times as slow as the same pipeline
#: without its lossy passes (beyond the timing's noise) is decided once more with
#: ``latency_guided`` (:func:`_latency_retry`); infinity turns the retry off. Beyond the
#: timing's noise: at 1.1 PP-OCRv4 rec (1.10-1.11x its float result) was decided again in two
#: of three runs, for 0.90-0.95x and twice the time; the angle classifier runs 1.8-2.0x.
RETRY_SLOWER = 1.25
#: The latency-guided result replaces the first only when it runs at most this many times the
#: first's time, timed side by side: the first is the smaller model, so a tie keeps it.
KEEP_FASTER = 0.95


def _user_placed(run: dict) -> bool:
    """Whether the user chose quantize_static's ``latency_guided`` (an option, the config, or
    a configured quantize_static pass): then :func:`optimize` does not decide again."""
    return "latency_guided" in (run["options"] or {}).get("quantize_static", {}) \
        or any(isinstance(p, Pass) and p.name == "quantize_static" for p in run["passes"] or [])


def _latency_retry(report: Report, pipeline: Pipeline, run: dict) -> Pipeline | None:
    """The pipeline that decides ``quantize_static`` once more with its ``latency_guided``
    placement (every quantized site timed alone in integer and in float form on onnxruntime,
    float where integer is slower: ``onnxopt.passes.quantize_static``), when the pass changed
    a result that was timed (``report.latency``) and the user set no ``latency_guided`` of
    their own (in ``run``'s options or config, or by giving a configured quantize_static
    pass); else None. :func:`optimize` retries with it when the result runs more than
    :data:`RETRY_SLOWER` times as slow as the lossless passes' float result. The option is
    off by default because its choice depends on the machine's timings; a quantized model
    slower than the float one is worse than that. Measured (2026-12-08, int8-static against
    the lossless passes' result): the PP-OCRv4 angle classifier 1.7-2.2x (its float result
    0.6x the original), all 54 sites faster in float; dtln_model_2 up to 3.9x the original."""
    if report.latency is None or math.isinf(RETRY_SLOWER) or _user_placed(run):
        return None
    static = [p for p in pipeline.passes if p.name == "quantize_static"]
    changed = any(r.modified and r.name == "quantize_static" for r in report.passes)
    if not static or not changed or static[0].options.latency_guided:
        return None
    return pipeline.with_options("quantize_static", latency_guided=True)


def _float_sites(records: list[PassRecord]) -> int:
    """The sites ``quantize_static``'s latency-guided placement left float, in ``records``."""
    return sum(r.stats.get("refused", {}).get("kept float: faster than integer", 0)
               for r in records if r.name == "quantize_static")


def _tensors_read_in(model: onnx.ModelProto, serialized: bytes | None, source,
                     renamed: bool) -> tuple[onnx.ModelProto, bytes | None]:
    """``model`` with its external data read into it when it was ``renamed`` (a copy of what
    ``source``'s file holds, so that file cannot be run), with its serialization."""
    if not renamed or not external.has_external_data(model) \
            or not isinstance(source, (str, os.PathLike)):
        return model, serialized
    onnx.external_data_helper.load_external_data_for_model(
        model, str(Path(source).resolve().parent))
    return model, io.serialize(model)


def _first_names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def checker_error(model: onnx.ModelProto | bytes | Path | None) -> str:
    """``onnx.checker``'s complaint about ``model`` (a ModelProto, its serialization or its file)
    in one line, or "" when it passes; models over the 2 GiB protobuf limit (or None, what
    :func:`onnxopt.io.serialize` gives for them) are not checked."""
    if model is None or (isinstance(model, onnx.ModelProto) and io.needs_external_data(model)):
        return ""
    try:
        if external.current_folder() is None or isinstance(model, Path):
            onnx.checker.check_model(model)
        else:
            external.check_with_references(model)
    except onnx.checker.ValidationError as err:
        first = first_line(err, "invalid model")
        return f"candidate model: onnx checker: {first}"
    return ""


def check_criteria(atol: float, rtol: float, max_drift: MaxDrift, seed: int = 0,
                   input_shapes: dict | None = None, metric="cosine") -> list[Criterion]:
    """The lossy criteria of ``max_drift`` and ``metric``; raise UsageError for settings that
    cannot mean anything (a NaN tolerance would pass every comparison)."""
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{name} must be a number, got {value!r}")
    if not (0 <= atol < math.inf and 0 <= rtol < math.inf):
        raise UsageError(f"tolerances must be finite and not negative (atol {atol}, rtol {rtol})")
    criteria = parse_criteria(max_drift, metric, where="max drift (--max-drift)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed!r}")
    for name, dims in (input_shapes or {}).items():
        if not isinstance(dims, (list, tuple)) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise UsageError(f"input shape of '{name}' must be a list of non-negative integers, "
                             f"got {dims!r}")
    return criteria


def resolve_feeds(model: onnx.ModelProto, inputs: Feeds, input_shapes: dict | None,
                  seed: int) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The validation feeds and their description for the report.

    ``inputs`` may be a path (``.npz`` file or folder of them), one feed, a list of feeds, or None
    to synthesize one feed from the model's declared inputs (see ``onnxopt.inputs``). Given
    feeds are checked against the model's inputs (``check_feeds``). Warnings (synthesized values
    that are likely meaningless, ignored keys) are listed under ``"warnings"`` when there are any.

    Raises:
        InputError: unreadable feed files; a feed lacks an input or has a wrong dtype or rank;
            an input cannot be synthesized.
    """
    labels = None
    if inputs is None:
        feeds, source = [synthesize_feed(model, input_shapes, seed)], "synthesized"
    elif isinstance(inputs, (str, os.PathLike)):
        files = feed_files(inputs)
        feeds, source, labels = [load_feed(f) for f in files], str(inputs), [str(f) for f in files]
    elif isinstance(inputs, dict):
        feeds, source = [inputs], "<memory>"
    else:
        feeds, source = list(inputs), "<memory>"
    warnings = (input_warnings(model, input_shapes) if source == "synthesized"
                else check_feeds(model, feeds, labels))
    described = [{k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                  for k, v in f.items()} for f in feeds]
    description = {"source": source, "seed": seed if source == "synthesized" else None,
                   "feeds": described}
    if warnings:
        description["warnings"] = warnings
    return feeds, description


def _settings(config, given: dict) -> dict:
    """The run's settings: keywords given explicitly win over ``config``, which wins over the
    defaults; ``skip`` names from both are left out; pass ``options`` from both are merged,
    option by option (the keyword's win); ``explicit``: the keys not defaulted."""
    from_config = load_config(config) if config is not None else {}
    run = {k: given[k] if given.get(k) is not None else from_config.get(k, default)
           for k, (_, _, default) in SETTINGS.items()}
    run["skip"] = list(dict.fromkeys([*from_config.get("skip", ()), *(given["skip"] or ())]))
    if given.get("options") is not None and from_config.get("options"):
        # per option: a keyword's option wins over the config's, the config's others stay
        run["options"] = {name: {**from_config["options"].get(name, {}),
                                 **given["options"].get(name, {})}
                          for name in dict.fromkeys([*from_config["options"],
                                                     *given["options"]])}
    run["explicit"] = {k for k in SETTINGS if given.get(k) is not None or k in from_config}
    return run


def _upgrade_for(model: onnx.ModelProto, pipeline: Pipeline
                 ) -> tuple[onnx.ModelProto, dict | None, str | None]:
    """The model the pipeline runs on: ``model`` converted to the highest ``upgrade_opset`` of
    the passes that do not apply to its opset but would to that one (``onnxopt.opset``).

    Returns:
        The model (``model`` itself when no conversion is needed or possible), the record
        ``{"from": 11, "to": 13}`` of a conversion (None without one), and why the conversion
        failed (None when it did not).
    """
    source = default_opset(model)
    wanted = [p.upgrade_opset for p in pipeline.passes
              if p.upgrade_opset is not None and p.upgrade_opset > source
              and p.applies_to(source) is not None and p.applies_to(p.upgrade_opset) is None
              and p.wants_upgrade(model)]
    if not wanted:
        return model, None, None
    target = max(wanted)
    try:
        return upgrade(model, target), {"from": source, "to": target}, None
    except OpsetUpgradeError as err:
        return model, None, str(err)


def _run_pipeline(original: onnx.ModelProto, pipeline: Pipeline, ctx: PassContext, *,
                  verify_each: bool, on_pass) -> tuple[onnx.ModelProto, list[PassRecord]]:
    """Import, run the passes, export: the optimization itself."""
    manager = PassManager(pipeline.lossless, pipeline.lossy,
                          max_iterations=pipeline.max_iterations, verify_each=verify_each,
                          on_pass=on_pass)
    graph = import_graph(original)
    records = manager.run(graph, ctx)
    return export_graph(graph, original), records


#: CLI wording in warnings -> the keyword of the Python API (see :func:`api_terms`).
_API_TERMS = ((re.compile(r"--input-shape (\S+?):((?:\d+x)*\d+|DxD\.\.\.)"),
               lambda m: f"input_shapes={{'{m[1]}': "
                         f"{[int(d) for d in m[2].split('x')] if m[2][0].isdigit() else '[...]'}}}"),
              (re.compile(r"--input-shape\b"), lambda m: "input_shapes="),
              (re.compile(r"--inputs\b"), lambda m: "inputs="),
              (re.compile(r"--calibration-data\b"), lambda m: "calibration="),
              (re.compile(r"--no-validate\b"), lambda m: "validate=False"),
              (re.compile(r"--max-drift\b"), lambda m: "max_drift="),
              (re.compile(r"--quantize-exclude\b"), lambda m: "quantize_exclude="),
              (re.compile(r"--quantize(?![-\w])"), lambda m: "quantize="),
              (re.compile(r"--layerwise\b"), lambda m: "layerwise=True"))


def api_terms(text: str) -> str:
    """``text`` (a warning worded for the CLI) with each CLI option replaced by the API keyword
    that does the same (``--input-shape x:2x3`` -> ``input_shapes={'x': [2, 3]}``)."""
    for pattern, replacement in _API_TERMS:
        text = pattern.sub(replacement, text)
    return text


def _warn(report: Report) -> None:
    """Emit the warnings of ``report`` (about its inputs, then the others) as Python warnings
    (:class:`OnnxoptWarning`), in API terms, to the caller of the API function."""
    for text in [*(report.inputs or {}).get("warnings", []), *report.warnings]:
        # optimize/validate -> their context wrapper -> the caller
        warnings.warn(api_terms(text), OnnxoptWarning, stacklevel=4)


def _own_context(fn):
    """Run ``fn`` in a copy of the current context: the external-data folder it sets for its
    model (``onnxopt.external``) ends with the call."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return contextvars.copy_context().run(fn, *args, **kwargs)
    return run


def _check_folder_known(source, model: onnx.ModelProto) -> None:
    """Raise UsageError when ``source`` is a ModelProto referring to external data (loaded with
    ``load_external_data=False``): nothing tells the folder its data is in."""
    if isinstance(source, onnx.ModelProto) and external.has_external_data(model):
        raise UsageError("the model refers to external data, whose folder a ModelProto does not "
                         "tell: pass the model's path, or load it with its data")


def _use_model_folder(source, model: onnx.ModelProto) -> None:
    """Make the folder of ``source`` the run's external-data folder when ``model`` (loaded
    from it lazily) refers to external data."""
    if isinstance(source, (str, os.PathLike)) and external.has_external_data(model):
        external.use_folder(Path(source).parent)


def _drift_mask(name: str | None, model: onnx.ModelProto) -> str | None:
    """``name``, checked to be an input of ``model`` (the drift mask, see
    ``onnxopt.metrics.kept_positions``).

    Raises:
        UsageError: the model has no such input.
    """
    inputs = [i.name for i in model.graph.input]
    if name is not None and name not in inputs:
        raise UsageError(f"drift mask '{name}' is not an input of the model (inputs: "
                         f"{', '.join(inputs)})")
    return name


def _self_contained(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the external data it refers to read into it, when the whole fits in one
    protobuf (what ``onnx.load`` returns): a caller gets a ModelProto it can save, run or
    serialize anywhere. A larger model keeps its references, relative to the run's folder
    (``onnxopt.save_model(model, path, base_dir=<the input's folder>)`` writes it)."""
    folder = external.current_folder()
    if folder is None or not external.has_external_data(model):
        return model
    if external.external_bytes(model) > io.PROTOBUF_LIMIT // 2:
        return model
    onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    return model


@_own_context
def optimize(model, *, passes: Sequence[PassSpec] | None = None, skip: Sequence[str] | None = None,
             options: dict[str, dict] | None = None, config=None,
             quantize: str | None = None,
             quantize_exclude: Sequence[str] | None = None,
             quantize_ops: Sequence[str] | None = None,
             validate: bool | None = None, inputs: Feeds = None,
             calibration: Feeds | Iterable[dict] | Callable[[], Iterable[dict]] = None,
             input_shapes: dict | None = None,
             seed: int | None = None, atol: float | None = None, rtol: float | None = None,
             max_drift: MaxDrift | None = None, metric: str | Callable | None = None,
             drift_mask: str | None = None,
             verify_each: bool | None = None, fold_size_limit: int | None = None,
             max_iterations: int | None = None, raise_on_failure: bool = True,
             strict: bool | None = None, layerwise: bool | None = None,
             on_pass: Callable[[PassRecord], None] | None = None,
             output: str | os.PathLike | None = None, external_data: bool | None = None,
             keep_invalid: bool = False, executor: str = "local", ray_address: str | None = None,
             **sugar) -> tuple[onnx.ModelProto, Report]:
    """Optimize a model and check it still computes the same outputs.

    Args:
        model: a path, serialized bytes or a ``onnx.ModelProto`` (not modified).
        passes: pass names (``"default"``: the lossless pipeline ``LOSSLESS_PIPELINE``) or
            configured passes (``get_pass("prune", threshold=1e-3)``); default ``["default"]``.
        skip: pass names to leave out.
        options: per-pass options, ``{pass name: {option: value}}`` (see each pass's
            ``Options``; ``onnxopt passes`` lists them).
        config: a TOML file (or the dict it parses to) giving the pipeline and validation
            settings (see ``onnxopt.pipeline``); keywords given here win over it (pass
            ``options`` option by option: the config's other options stay).
        sugar: option sugar for the pruning and clustering passes
            (``onnxopt.pipeline.OPTION_SUGAR``): ``prune_threshold``, ``prune_relative``,
            ``prune_sparsity`` (a fraction or ``"auto"``), ``prune_scope``, ``prune_pattern``
            (``"2:4"``), ``prune_importance``, ``prune_reconstruct``, ``prune_allocation``,
            ``sparse_storage``, ``prune_channels`` (FLOP fraction or ``"auto"``),
            ``cluster_weights`` (K or ``"auto"``), ``cluster_per_channel``, ``cluster_method``; each adds its pass.
            A strength ``"auto"`` is searched against ``max_drift``, which must then be given
            (see ``onnxopt.strength``).
        quantize: a mode of ``onnxopt.pipeline.QUANTIZE_MODES`` (``"int8-weight"``,
            ``"int8-static"``, ...): sugar for its passes (lossy). A pass of the mode whose opset
            the model is below, and that declares ``upgrade_opset``, gets the model converted
            first (``report.opset_upgrade``; validation compares with the original).
        quantize_exclude, quantize_ops: op types or node names the mode's passes leave in float
            / the only op types they quantize.
        validate: compare with the original on onnxruntime CPU (default True; a lossy result
            also with onnxruntime's graph optimizations on, see ``onnxopt.validate``). A result
            that fails is optimized again without lossless passes until it validates (one at a
            time, then sets of them: at most k + 2L reruns of the pipeline, k the lossless
            passes that changed the model, L those of the pipeline); ``report.rolled_back``
            names those left out. A lossy result that fails ends failed, naming its lossy
            passes (below).
        inputs: validation feeds (see :func:`resolve_feeds`); ``input_shapes`` and ``seed`` shape
            synthesized ones. They also measure the drift budget of lossy passes.
        calibration: feeds for activation statistics (default: ``inputs``), streamed: an
            ``.npz`` file, a folder of them (read one file at a time, each time a pass iterates),
            a feed, an iterable of feeds, or a function returning a fresh iterable (see
            ``onnxopt.inputs.FeedStream``); keep them apart from the evaluation inputs when
            measuring accuracy.
        atol, rtol: lossless tolerance; ``max_drift``: the criteria every output must meet
            after lossy passes: a threshold of ``metric`` (default cosine similarity; a name, a
            ``DriftMetric`` or a callable ``fn(reference, candidate) -> float``, higher better),
            ``"cosine=0.999,max-abs=0.05"``, ``{"cosine": 0.999, "max-abs": 0.05}`` or
            criteria (see ``onnxopt.metrics``).
        drift_mask: an input of the model (a tokenizer's ``attention_mask``, ``[batch,
            sequence]``): the lossy criteria, in the drift budget and in validation, judge only
            the positions where it is non-zero, in outputs whose leading dimensions are its
            shape (``onnxopt.metrics.kept_positions``); padding positions compute values no
            reader uses. A lossless validation still compares every position.
        verify_each: run the ONNX checker and an onnxruntime load after every pass that changed
            the graph.
        fold_size_limit: sugar for ``fold_constants``' ``size_limit`` (bytes).
        max_iterations: bound on the rounds of the lossless passes (default 10).
        raise_on_failure: raise :class:`ValidationFailed` when validation fails.
        strict: with ``raise_on_failure``, also raise when a pass had to be rolled back.
        layerwise: also compare the intermediate tensors of the original and the result
            (``report.layerwise``, see ``onnxopt.layerwise``; needs ``validate``).
        output: also write the result to this path (atomically, see
            :func:`onnxopt.io.save_model`; never over ``model``'s file or its external data)
            when it passes: validation passed or was off, and with ``strict`` nothing was rolled
            back; with ``keep_invalid`` also when it does not. ``report.output`` names the file
            written. Cheaper than saving afterwards: the serialization made for validation is
            written. A result of :data:`STAGE_BYTES` or more is written first to a hidden folder
            beside ``output`` and validated from there (memory: onnxruntime's session is not
            beside the ModelProto and its serialization); the returned model is then read back
            from the file written.
        external_data: for ``output``: True to store tensors in ``<output>.data``, None to do so
            only over the 2 GiB protobuf limit.
        executor: where a strength search (``"auto"``) scores its candidates: ``"local"``, or
            ``"ray"``, as Ray tasks on the cluster at ``ray_address`` (default ``$RAY_ADDRESS``,
            else the one this process is connected to, else a local one); the result and the
            report are the same (see ``onnxopt.strength``).

    When the result fails validation, the lossless passes are left out one at a time (last in the
    pipeline first); the first run that validates is returned, and the pass it left out is listed
    in ``report.rolled_back`` with the failure it caused.

    A lossy result (a lossy pass changed the model) that fails is decided once more by the drift
    budget with half the allowed drift in reserve (:data:`BUDGET_RETRY_MARGIN`), and with the
    mode's options for it (``onnxopt.pipeline.SECOND_DECISION``: ``int8-static`` then rounds
    to nearest on uint8 MatMul weights, unless the user chose those options). When that
    fails too, the failure is the lossy passes' unless the lossless passes alone fail: when a
    lossless pass changed the model, one run of the pipeline without its lossy passes (no
    calibration, no budget) is validated. When it passes, the run ends there, failed: ``report.validation.reason`` names the lossy passes
    that changed the model and the drift of the second decision, and nothing is written
    (``keep_invalid`` writes the failing model). When it fails, the lossless culprits are
    searched as above on runs without the lossy passes, then the whole pipeline runs once more
    without them: with the first decision's budget and options, or, when that fails, the
    second's. Why no fallback to a float model, or a rollback of lossless passes by trial:
    the passes that keep the drift within the criteria are the budget's (per-layer float
    fallback, the mixed precision of accuracy-controlled quantization in NNCF), and it has
    already decided twice; rerunning calibration and the budget for each lossless pass costs
    up to k + 2L full runs (a PP-OCRv4 det int8-static run took 1274 s so) and named a
    lossless pass for a lossy failure; and writing the unquantized model under the name the
    user gave for a quantized one hides the failure that the exit code (1) reports. A warning
    names the user's levers: a looser ``max_drift``, ``quantize_exclude`` for the nodes the
    layer-wise comparison (``layerwise``) ranks first, or another mode.

    A validated result of a speed mode is timed against the original on the first feed
    (``report.latency``). A ``quantize_static`` result more than :data:`RETRY_SLOWER` times as
    slow as the lossless passes' float result (timed side by side) is decided once more with
    the pass's ``latency_guided`` placement (each quantized site timed in integer and in float
    form, float where integer is slower; the float model when every site is), unless the user
    set that option; that result replaces the first when it validates and runs at most
    :data:`KEEP_FASTER` times the first's time. A warning says which. The decision depends on
    this machine's timings, like the option itself.

    A model file with external data is never loaded whole (``onnxopt.external``): weights stay
    in their files, memory-mapped when a pass reads them, and ``output`` gets them streamed
    from the input's data files. Without ``output``, the returned model holds its tensors'
    data when it fits in one protobuf (up to 1 GiB of external data); otherwise it refers to
    the input's external data (locations relative to the input's folder) for the tensors no
    pass changed: save it with ``onnxopt.save_model(model, path, base_dir=<the input's
    folder>)``, or load ``output``.

    Returns:
        The optimized model and the :class:`Report`.

    Raises:
        ModelLoadError, UsageError, InputError: bad model, option, config or inputs; a
            ModelProto that refers to external data (its folder is unknown: pass its path).
        ValidationFailed: outputs differ beyond tolerance (with ``raise_on_failure``); the error
            carries ``model`` and ``report``.
        PassError: with ``verify_each``, a pass produced an invalid model.
    """
    start = time.perf_counter()
    use_executor(executor, ray_address)
    run = _settings(config, dict(
        validate=validate, inputs=inputs, calibration=calibration, input_shapes=input_shapes,
        seed=seed, atol=atol,
        rtol=rtol, max_drift=max_drift, metric=metric, drift_mask=drift_mask,
        layerwise=layerwise, strict=strict,
        verify_each=verify_each, passes=passes, skip=skip, options=options,
        max_iterations=max_iterations, quantize=quantize, quantize_exclude=quantize_exclude,
        quantize_ops=quantize_ops))
    validate, atol, rtol = run["validate"], run["atol"], run["rtol"]
    max_drift = check_criteria(atol, rtol, run["max_drift"], run["seed"], run["input_shapes"],
                               run["metric"])
    pass_options = {k: dict(v) for k, v in (run["options"] or {}).items()}
    if fold_size_limit is not None:
        pass_options.setdefault("fold_constants", {})["size_limit"] = fold_size_limit
    pipeline = build_pipeline(run["passes"], run["skip"], options=pass_options,
                              quantize=run["quantize"],
                              quantize_exclude=run["quantize_exclude"],
                              quantize_ops=run["quantize_ops"],
                              max_iterations=run["max_iterations"], **sugar)
    searched = [p.name for p in pipeline.lossy if is_auto(p)]
    if searched and not validate:
        raise UsageError(f"{', '.join(searched)}: a strength of 'auto' is searched by measuring "
                         "the drift on validation inputs: drop --no-validate (validate=False)")
    if searched and "max_drift" not in run["explicit"]:
        raise UsageError(f"{', '.join(searched)}: a strength of 'auto' is searched against the "
                         "drift you accept: give --max-drift (max_drift)")
    protect = []
    if isinstance(model, (str, os.PathLike)) and output is not None:
        protect = io.protected_files(model, [output, f"{output}.data"])
    original, original_bytes = io.load_model_and_bytes(model, lazy=True)
    checks.check_model_structure(original, _describe_source(model), validating=validate)
    check_targets(pipeline, original, _describe_source(model))
    _check_folder_known(model, original)
    _use_model_folder(model, original)
    if original is model:  # the caller's object: exporting may touch the protos it shares
        original = onnx.ModelProto()
        original.CopyFrom(model)
    original, original_bytes, named = _omissions_named(original, original_bytes, owned=True)
    if original_bytes is None and validate:
        original_bytes = io.serialize(original)
    report = Report(_version(), "optimize", _describe_source(model), model_stats(
        original, original_bytes))
    if isinstance(model, (str, os.PathLike)):  # as stored, with its external data files
        report.before.file_bytes = io.stored_bytes(model)
    feeds = calibration_feeds = None
    if validate:
        feeds, report.inputs = resolve_feeds(original, run["inputs"], run["input_shapes"],
                                             run["seed"])
    if run["calibration"] is not None:
        calibration_feeds = FeedStream(run["calibration"], original)
    # The original runs once, before the passes, so that a large model is never in memory
    # beside its optimized copy; every validation and the drift budget compare with these.
    references = reference_outputs(
        _runnable(original, original_bytes), feeds,
        synthesized=report.inputs["source"] == "synthesized",
        warnings=report.inputs.get("warnings", [])) if validate else None
    mask = _drift_mask(run["drift_mask"], original)
    budget = DriftBudget(_runnable(original, original_bytes), feeds, max_drift,
                         references=references.outputs, mask=mask) if feeds else None
    working, report.opset_upgrade, upgrade_failure = _upgrade_for(original, pipeline)
    ctx = PassContext(template=working, feeds=feeds, calibration=calibration_feeds,
                      budget=budget, mask=mask, upgrade_failure=upgrade_failure,
                      synthesized=bool(feeds) and report.inputs.get("source") == "synthesized")
    lossy_names = {p.name for p in pipeline.lossy}
    if searched and ctx.synthesized:
        raise UsageError(f"{', '.join(searched)}: a strength of 'auto' is chosen by the drift it "
                         "causes on real data: give --inputs (and --calibration-data); "
                         "synthesized random inputs cannot judge it")

    # The checker judges results only when the input passes it (real exports often do not).
    original_valid = validate and not checker_error(_runnable(original, original_bytes))

    def check(candidate, data, records):
        """Validate ``candidate``, serialized as ``data`` (None over the protobuf limit), or the
        model file ``candidate`` (with ``data`` None)."""
        lossy = any(r.modified for r in records if r.name in lossy_names)
        # a model referring to external data is checked from its proto (never serialized whole)
        broken = checker_error(candidate if external.current_folder() is not None
                               else _runnable(candidate, data)) if original_valid else ""
        if broken:  # invalid ONNX: fails like a model onnxruntime cannot load
            return ValidationResult(False, "lossy" if lossy else "lossless", atol, rtol,
                                    as_setting(max_drift), len(feeds), reason=broken)
        return compare_models(_runnable(original, original_bytes), _runnable(candidate, data),
                              feeds, atol=atol, rtol=rtol,
                              max_drift=max_drift, lossy=lossy,
                              synthesized=report.inputs["source"] == "synthesized",
                              warnings=report.inputs.get("warnings", []), computed=references,
                              mask=mask)

    def attempt(p: Pipeline):
        return _run_pipeline(working, p, ctx, verify_each=run["verify_each"], on_pass=on_pass)

    def by_latency(guided: Pipeline, first_bytes: bytes):
        """Time the quantized result ``first_bytes`` against the lossless passes' float result;
        when it is more than RETRY_SLOWER times as slow, decide again with ``guided`` (the
        pipeline with latency-guided placement; without smooth_quant and quantize_static when
        that leaves every site float) and validate. Returns ``(found, note, retry)``: the
        candidate's ``(model, records, validation, bytes)`` when it validated and ran at most
        KEEP_FASTER times the first result's time, else None; the warning; the retry's
        figures for ``report.latency["retry"]`` (None when it did not run)."""
        floated, _ = attempt(Pipeline(guided.lossless, guided.max_iterations))
        floated_bytes = io.serialize(floated)
        timed = latency_ratio_apart(floated_bytes, first_bytes, feeds[0], what=(
            "the lossless passes' result", "the quantized result"))
        first = timed.get("latency_ratio") if isinstance(timed, dict) else None
        if first is None:
            return None, ("quantize_static's result was not timed against the lossless passes' "
                          f"float result: {timed if isinstance(timed, str) else 'no time'}"), None
        if first <= RETRY_SLOWER:
            return None, None, None
        candidate, records = attempt(guided)
        left = _float_sites(records)
        unquantized = not any(r.modified and r.name == "quantize_static" for r in records)
        if unquantized:
            # every site float: smooth_quant's factors would only cost a Mul and some drift
            candidate, records = attempt(guided.without("smooth_quant").without(
                "quantize_static"))
        candidate_bytes = io.serialize(candidate)
        result = check(candidate, candidate_bytes, records)
        versus = ("the same decision" if candidate_bytes == first_bytes else
                  f"it failed validation ({result.reason})" if not result.passed else
                  # the float model itself: timed against the first result above already
                  {"latency_ratio": 1.0 / first} if candidate_bytes == floated_bytes else
                  latency_ratio_apart(first_bytes, candidate_bytes, feeds[0], what=(
                      "the first result", "the latency-guided result")))
        ratio = versus.get("latency_ratio") if isinstance(versus, dict) else None
        tables = unquantized and any(r.modified and r.name == "quantize_embeddings"
                                     for r in records)
        how = (f"it took {ratio:.2f}x the first result's time" if ratio is not None else
               versus if isinstance(versus, str) else "it was not timed")
        faster = ratio is not None and ratio <= KEEP_FASTER
        note = (f"quantize_static's result took {first:.2f}x the time of the float model (the "
                "lossless passes alone) on this machine: decided again with latency_guided "
                f"(each site timed in integer and in float form; {left} left float"
                + ("; none quantized, so smooth_quant left out too" if unquantized else "")
                + f"): {how}, " + ("written instead" if faster else "the first result kept")
                + ("" if not (faster and unquantized) else
                   ". The written model computes in FLOAT"
                   + (" (its embedding tables stay int8)" if tables else "")
                   + ": no quantized site ran faster than float on this machine. For an int8 "
                   "file anyway set quantize_static's option latency_guided = false; the "
                   "int8-weight mode shrinks the file without changing kernels"))
        retry = {"versus_float": first, "sites_float": left, "quantized": not unquantized,
                 "versus_first": ratio, "kept": faster}
        return ((candidate, records, result, candidate_bytes) if faster else None), note, retry

    budget_warnings: list[str] = []
    first_decision: Pipeline | None = None  # the pipeline before the budget's second decision
    retried, second_how = -1, ""  # the second decision's warning (its index) and options
    try:
        optimized, report.passes = attempt(pipeline)
    except UnsupportedModel as err:  # valid, but not ours to rewrite: passed through
        optimized, report.passes = original, []
        budget_warnings.append(f"{err}: the model is written unchanged")
    serialized = io.serialize(optimized) if validate or output is not None else None
    staged = None  # the result written beside output to be validated from there, not yet in place
    try:
        if validate:
            if (output is not None and serialized is not None and len(serialized) >= STAGE_BYTES
                    and not external.has_external_data(optimized)):
                staged = io.stage_model(optimized, output, external_data=external_data,
                                        protect=tuple(protect), serialized=serialized)
                optimized = serialized = None  # released: onnxruntime loads the staged file
                report.validation = check(staged.path, None, report.passes)
                optimized, serialized = io.load_model_and_bytes(staged.path)
                if not report.validation.passed:  # the search below works on the ModelProto
                    staged.discard()
                    staged = None
                    serialized = serialized or io.serialize(optimized)
            else:
                report.validation = check(optimized, serialized, report.passes)
            if (not report.validation.passed and budget is not None
                    and any(r.modified for r in report.passes if r.name in lossy_names)):
                # The budget estimates (optimized session, simulated quantization); when the exact
                # result misses, decide once more with half the allowed error in reserve.
                # The mode's options whose effect the estimate can miss are replaced too
                # (onnxopt.pipeline.SECOND_DECISION); the rest of the run goes on with them.
                ctx.budget = budget.tightened(BUDGET_RETRY_MARGIN)
                changes = pipeline.second_changes()
                first_decision = pipeline
                pipeline = pipeline.second_decision()
                candidate, records = attempt(pipeline)
                candidate_bytes = io.serialize(candidate)
                result = check(candidate, candidate_bytes, records)
                retried = len(budget_warnings)
                second_how = (f"{BUDGET_RETRY_MARGIN:.0%} of the allowed drift in reserve"
                              + (f" and the mode's second-decision options ({'; '.join(changes)})"
                                 if changes else ""))
                budget_warnings.append(
                    f"the drift budget's estimate missed ({report.validation.reason}); decided "
                    f"again with {second_how}: " + ("passed" if result.passed else "still failed"))
                # passed or not, the second decision's result: a failure names its drift
                optimized, report.passes, report.validation = candidate, records, result
                serialized = candidate_bytes
            if not report.validation.passed:
                # Roll back lossless passes. First each one that changed the model, alone, from
                # the end of the pipeline. When no single one is the culprit (two passes making the
                # same breaking rewrite: leaving out either, the other makes it), a set grows from
                # the end, doubling, by the passes that changed the model in its last failing
                # attempt, until the result validates; then each pass of the set is put back when
                # the result still validates without it. Reruns: at most k + 2L (k passes changed
                # the model, L lossless passes in the pipeline); every pass left out is named.
                # A lossy result is searched so only when the lossless passes alone fail too, on
                # attempts without the lossy passes (no calibration, no budget); see the docstring.
                def changed(records: list[PassRecord]) -> list[str]:
                    return [p.name for p in reversed(pipeline.lossless)
                            if any(r.name == p.name and r.modified for r in records)]

                lossy_failure = report.validation.mode == "lossy"
                base, failing, records = pipeline, optimized, report.passes
                alone = None  # in a lossy run, the lossless passes' own failure
                lossless = "no lossless pass changed the model"
                if lossy_failure and changed(records):
                    base = Pipeline(pipeline.lossless, pipeline.max_iterations)
                    failing, records = attempt(base)
                    result = check(failing, io.serialize(failing), records)
                    alone = None if result.passed else result
                    lossless = ("the lossless passes alone validate" if result.passed else
                                f"the lossless passes alone fail too: {result.reason}")

                failures: dict[frozenset, list[PassRecord]] = {}  # left out -> records, failed

                def leave_out(names: list[str]):
                    """The attempt of ``base`` without ``names`` when it validates, else None."""
                    if frozenset(names) in failures:
                        return None
                    candidate, records = attempt(functools.reduce(Pipeline.without, names, base))
                    candidate_bytes = io.serialize(candidate)
                    result = check(candidate, candidate_bytes, records)
                    if result.passed:
                        return names, candidate, records, candidate_bytes, result
                    failures[frozenset(names)] = records
                    return None

                found = None
                if not lossy_failure or alone is not None:
                    found = next(filter(None, (leave_out([n]) for n in changed(records))), None)
                    left = []
                    while found is None:
                        more = [n for n in changed(records) if n not in left][:max(1, len(left))]
                        if not more:
                            break
                        left = left + more
                        found = leave_out(left)
                        records = failures.get(frozenset(left))
                    for name in list(found[0]) if found is not None else []:
                        if len(found[0]) > 1:
                            found = leave_out([n for n in found[0] if n != name]) or found
                if found is not None:
                    names, candidate, records, candidate_bytes, result = found
                    failed = alone or report.validation
                    # Name the first tensor that went wrong in the failing candidate.
                    diverged = first_divergence(
                        original, failing, feeds, atol=atol, rtol=rtol, max_drift=max_drift,
                        lossy=failed.mode == "lossy")
                    report.rolled_back.extend({"pass": n, "reason": failed.reason,
                                               "first_divergence": diverged} for n in names)
                    if lossy_failure:  # the lossy passes once more, on the repaired pipeline
                        def repaired(p: Pipeline):
                            candidate, records = attempt(functools.reduce(Pipeline.without,
                                                                          names, p))
                            candidate_bytes = io.serialize(candidate)
                            return (candidate, records, candidate_bytes,
                                    check(candidate, candidate_bytes, records))

                        if first_decision is None:
                            candidate, records, candidate_bytes, result = repaired(pipeline)
                        else:
                            # The failure was a lossless pass's, not (only) the budget's
                            # estimate: the first decision (full budget, the mode's options)
                            # on the repaired pipeline; the second once more if that fails.
                            tightened, ctx.budget = ctx.budget, budget
                            candidate, records, candidate_bytes, result = repaired(first_decision)
                            how = "the full budget and the mode's options"
                            if result.passed:
                                pipeline = first_decision
                            else:
                                ctx.budget = tightened
                                candidate, records, candidate_bytes, result = repaired(pipeline)
                                how = f"the full budget, failed, then with {second_how}"
                            budget_warnings[retried] = (
                                "the result failed validation, and so did the drift budget's "
                                "second decision; the lossless passes alone fail too "
                                f"({failed.reason}): {', '.join(names)} rolled back, the lossy "
                                f"passes decided again with {how}: "
                                + ("passed" if result.passed else "failed"))
                    optimized, report.passes, report.validation = candidate, records, result
                    serialized = candidate_bytes
                if lossy_failure and not report.validation.passed:
                    lossy = list(dict.fromkeys(r.name for r in report.passes if r.modified
                                               and r.name in lossy_names)) or sorted(lossy_names)
                    report.validation.reason = (
                        f"lossy pass{'es' if len(lossy) > 1 else ''} {', '.join(lossy)}: drift "
                        "beyond the criteria even after the drift budget's second decision "
                        f"({lossless}): {report.validation.reason}")
                    budget_warnings.append(
                        f"{', '.join(lossy)} cannot be kept within the criteria: loosen "
                        "--max-drift, leave the nodes --layerwise ranks first in float "
                        "(--quantize-exclude), or choose another --quantize mode")
        report.after = model_stats(optimized, serialized)
        slower = _speed_check(report, (original, optimized), original_bytes, serialized, feeds)
        guided = _latency_retry(report, pipeline, run) if staged is None else None
        if guided is not None:  # the quantized result, against the same pipeline unquantized
            guided = functools.reduce(Pipeline.without,  # what was rolled back stays out
                                      [r["pass"] for r in report.rolled_back], guided)
            try:
                found, note, retry = by_latency(guided, serialized)
            except Exception as err:  # the first result validated: it stands
                found, retry = None, None
                note = (f"quantize_static's latency-guided decision failed ({type(err).__name__}: "
                        f"{first_line(err, '')}): "
                        "the first result kept")
            budget_warnings.extend([note] if note else [])
            if found is not None:
                optimized, report.passes, report.validation, serialized = found
                report.after, report.latency = model_stats(optimized, serialized), None
                slower = _speed_check(report, (original, optimized), original_bytes,
                                      serialized, feeds, timed=True)
            elif retry is not None:
                slower = _slower(report, guided=True)
            if retry is not None and report.latency is not None:
                report.latency["retry"] = retry
        elif _user_placed(run) and report.latency is not None:
            slower = _slower(report, guided=True)  # no advice to set what the user set
        if validate and run["layerwise"]:
            report.layerwise = compare_layerwise(
                original, optimized, feeds, atol=atol, rtol=rtol, max_drift=max_drift,
                lossy=report.validation.mode == "lossy",
                synthesized=report.inputs["source"] == "synthesized")
        report.warnings = named + budget_warnings + slower + [
            w for r in report.passes for w in r.warnings] + (
            calibration_feeds.warnings if calibration_feeds is not None else []) + (
            report.validation.warnings if report.validation is not None else [])
        failed = report.validation is not None and not report.validation.passed
        strict = report.strict = run["strict"]
        if output is not None and (keep_invalid or not (failed or (strict and report.rolled_back))):
            # staged: it passed, with nothing rolled back; committed last, so an interruption
            # before here leaves no output
            written = staged.commit() if staged is not None else io.save_model(
                optimized, output, external_data=external_data, protect=tuple(protect),
                serialized=serialized)
            report.output = str(output)
            report.after.file_bytes = sum(os.path.getsize(f) for f in written)
    finally:  # an exception or interruption before the commit: nothing is left
        if staged is not None:
            staged.discard()
    if any(r.modified and r.name in STRENGTH_OPTIONS for r in report.passes):
        # zeros and shared values pay off only under compression: measured once, at the end
        report.compressed = {
            "level": COMPRESSION_LEVEL,
            "before": _compressed_size(model if isinstance(model, (str, os.PathLike))
                                       else None, original_bytes),
            "after": _compressed_size(report.output, serialized)}
    if output is None:  # the caller wants the ModelProto itself
        optimized = _self_contained(optimized)
    report.seconds = time.perf_counter() - start
    _warn(report)
    if raise_on_failure and (failed or (strict and report.rolled_back)):
        reason = (report.validation.reason if failed else
                  f"pass '{report.rolled_back[0]['pass']}' was rolled back (--strict): "
                  f"{report.rolled_back[0]['reason']}")
        err = ValidationFailed(f"validation failed: {reason}")
        err.model, err.report = optimized, report
        raise err
    return optimized, report


@_own_context
def validate(reference, candidate, *, inputs: Feeds = None, input_shapes: dict | None = None,
             seed: int = 0, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
             max_drift: MaxDrift = DEFAULT_MAX_DRIFT, metric: str | Callable = "cosine",
             drift_mask: str | None = None, lossy: bool = False,
             layerwise: bool = False) -> Report:
    """Compare ``candidate`` with ``reference`` on onnxruntime CPU (see ``onnxopt.validate``).

    Inputs are synthesized from the reference's declared inputs unless given; ``max_drift``,
    ``metric`` and ``drift_mask`` are the lossy criteria, as in :func:`optimize`. With
    ``layerwise``,
    also compare their intermediate tensors and name the first that diverges (``report.layerwise``,
    see ``onnxopt.layerwise``).

    Raises:
        ModelLoadError, InputError, UsageError: bad model, inputs or option.
    """
    start = time.perf_counter()
    max_drift = check_criteria(atol, rtol, max_drift, seed, input_shapes, metric)
    ref, ref_bytes = io.load_model_and_bytes(reference, lazy=True)
    cand, cand_bytes = io.load_model_and_bytes(candidate, lazy=True)
    for loaded, source in ((ref, reference), (cand, candidate)):
        _check_folder_known(source, loaded)
        checks.check_model_structure(loaded, _describe_source(source), validating=True)
    ref, ref_bytes, named = _omissions_named(ref, ref_bytes, owned=ref is not reference,
                                             which="reference: ")
    cand, cand_bytes, named_cand = _omissions_named(cand, cand_bytes,
                                                    owned=cand is not candidate,
                                                    which="candidate: ")
    # models with external data run from their files (each from its own folder) -- but one
    # whose omitted outputs were named runs as named, its tensors read in; the layer-wise
    # comparison reads the reference's folder
    ref, ref_bytes = _tensors_read_in(ref, ref_bytes, reference, bool(named))
    cand, cand_bytes = _tensors_read_in(cand, cand_bytes, candidate, bool(named_cand))
    ref_bytes = io.serialize(ref) if ref_bytes is None else ref_bytes
    cand_bytes = io.serialize(cand) if cand_bytes is None else cand_bytes
    ref_run = str(reference) if external.has_external_data(ref) else _runnable(ref, ref_bytes)
    cand_run = str(candidate) if external.has_external_data(cand) else _runnable(cand, cand_bytes)
    _use_model_folder(reference, ref)
    report = Report(_version(), "validate", _describe_source(reference),
                    model_stats(ref, ref_bytes), after=model_stats(cand, cand_bytes),
                    output=_describe_source(candidate))
    feeds, report.inputs = resolve_feeds(ref, inputs, input_shapes, seed)
    report.validation = compare_models(
        ref_run, cand_run,
        feeds, atol=atol, rtol=rtol, max_drift=max_drift, lossy=lossy,
        synthesized=report.inputs["source"] == "synthesized",
        warnings=report.inputs.get("warnings", []), mask=_drift_mask(drift_mask, ref))
    report.warnings = named + named_cand + list(report.validation.warnings)
    if layerwise:
        report.layerwise = compare_layerwise(
            ref, cand, feeds, atol=atol, rtol=rtol, max_drift=max_drift, lossy=lossy,
            synthesized=report.inputs["source"] == "synthesized")
    report.seconds = time.perf_counter() - start
    _warn(report)
    return report
