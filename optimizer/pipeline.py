"""Pipelines: which passes run, with which options -- from names, pass objects or a TOML file.

A pipeline is a list of configured passes (``Pass`` instances, each holding its ``Options``).
The Python API accepts pass names, configured passes, or both; ``"default"`` stands for the
lossless pipeline (``onnxopt.passes.LOSSLESS_PIPELINE``). The CLI's flags (``--prune-threshold``,
``--prune-sparsity``, ``--cluster-weights`` and the others of :data:`OPTION_SUGAR`,
``--quantize``, ``--fold-size-limit``) are sugar for pass options, and ``--config FILE.toml`` gives
the whole run in a file (stdlib ``tomllib``)::

    [pipeline]
    passes = ["default", "prune"]       # optional; default ["default"]
    skip = ["cse"]                      # optional
    max_iterations = 10                 # optional

    [pipeline.options.prune]            # one table per configured pass: its Options fields
    threshold = 1e-3

    [pipeline.options.fold_constants]
    size_limit = 1048576

    quantize = "int8-static"            # optional: a QUANTIZE_MODES mode
    quantize_exclude = ["Softmax", "/attn/MatMul_1"]   # op types or node names left float
    quantize_ops = ["MatMul", "Conv"]   # the only op types quantized

    [validation]                        # optional; the keywords of ``onnxopt.optimize``
    inputs = "feeds.npz"                # relative to this file's folder
    calibration = "calibration/"        # feeds for activation statistics (.npz or folder)
    max_drift = 0.99                    # or "cosine=0.999,max-abs=0.05", or a table:
    metric = "cosine"                   # what a bare max_drift number means

    [validation.max_drift]              # instead of the number: every criterion must hold
    cosine = 0.999
    max-abs = 0.05

    [validation.input_shapes]           # dims of synthesized inputs
    x = [1, 3, 224, 224]

Options of a pass the pipeline does not run are an error, so a typo cannot be silently ignored;
so are unknown keys and values of the wrong type. Keywords (and command-line flags) given
explicitly win over the file, except ``skip``, whose names are added to the file's.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import onnx

from onnxopt.errors import UsageError
from onnxopt.graph import graph_protos
from onnxopt.metrics import parse_criteria
from onnxopt.pass_manager import REGISTRY, Pass, fits_type, get_pass
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_MAX_DRIFT, DEFAULT_RTOL

PassSpec = Union[str, Pass]

#: ``--quantize`` modes: the passes each one runs, in order, with the options the mode sets
#: (options the user gives for the same pass win). Embedding tables (Gather data) are quantized
#: in every integer mode, decided by the drift budget together with the mode's main pass
#: (``Pass.joins_next``), so an embedding table and a MatMul weight compete for the same
#: allowed drift. ``int8-dynamic`` and ``int8-static`` smooth activation outliers into the
#: weights first (SmoothQuant, alpha 0.75, an inserted Mul where the producer cannot absorb the
#: factors or would lose onnxruntime's Gelu fusion; int8-dynamic smooths only when it has
#: calibration data, or real inputs, and runs without). On
#: MiniLM with every MatMul quantized (cosine over non-padding tokens of the evaluation set):
#: int8-dynamic 0.9884 -> 0.9956 (7-bit weights; uint8 ones: 0.9941 at alpha 0.5, 0.9968),
#: and with GPTQ rounding of its weights from the calibration data 0.9961 (2026-12-07; PP-OCRv4
#: rec validated with it; without calibration data the weights are rounded to nearest);
#: int8-static 0.9944 -> 0.9972 with the full 8-bit grid as uint8 MatMul weights (exact u8u8
#: kernels; 0.9960 with ``mse`` calibration, 0.9970 ``minmax``, 0.9972 ``percentile``), at a
#: latency cost on CPUs without VNNI (0.83x fp32 instead of 0.72x; ``uint8_weights = false``
#: gives the faster 7-bit int8 weights, cosine 0.9954). The mode's ``uint8_weights = false``
#: with ``uint8_fraction = 0.34`` and ``rounding = "gptq"`` (mixed weight grids: uint8 only for
#: the MatMuls whose 7-bit grid costs most drift, measured) is faster at the same accuracy on
#: MiniLM (0.9973 at 0.52-0.57x fp32 against 0.64-0.76x with every MatMul weight uint8;
#: without GPTQ 0.9966). Since then the mode's MatMul weights take the full int8 grid
#: (``matmul_reduce_range = false``: u8s8 kernels, their saturation measured by the budget's
#: check on the real model; Conv weights stay 7-bit): MiniLM 0.9977 at 0.50x against the mixed
#: grids' 0.9973 at 0.55x in one run (``passes/quantize_static.py``, "Full int8 grid for
#: MatMuls"). A result that fails validation with them is decided again with uint8
#: weights rounded to nearest (:data:`SECOND_DECISION`). ``quantize_static``'s
#: ``latency_guided`` leaves float the sites onnxruntime runs faster in float, timed on the
#: machine that quantizes; it is off here, as its choice depends on the machine's timings (two
#: runs can write different models; ``[pipeline.options.quantize_static] latency_guided =
#: true`` turns it on) -- except that a result timed more than 1.1x as slow as the lossless
#: passes' float result is decided once more with it (``onnxopt.api.RETRY_SLOWER``).
#: Measured with it at load 4-10 on 2 cores (latency ratios to fp32, the before and after
#: models timed side by side three times): PP-OCRv4 angle classifier
#: 1.39-1.80x -> 0.86-0.94x (no placement with integer sites ran faster than float: the model
#: stays float, argmax agreement 1.0); PP-OCRv4 rec 0.80-0.94x -> 0.78-0.89x (22 of 47 sites
#: faster alone in integer form, 11 quantized after the drift budget; CER 0.0013 -> 0.0027,
#: size 66 % -> 60 %; one of seven rec runs failed validation, cosine 0.9757).
QUANTIZE_MODES: dict[str, dict[str, dict[str, Any]]] = {
    "int8-weight": {"quantize_embeddings": {}, "quantize_weights": {}},
    "int8-dynamic": {"smooth_quant": {"alpha": 0.75, "explicit_mul": True,
                                      "needs_data": False, "drift_mask": False},
                     "quantize_embeddings": {},
                     "quantize_dynamic": {"rounding": "gptq", "reduce_range": False}},
    "int8-static": {"smooth_quant": {"alpha": 0.75, "explicit_mul": True},
                    "quantize_embeddings": {},
                    "quantize_static": {"uint8_weights": False, "matmul_reduce_range": False,
                                        "rounding": "gptq", "calibration": "percentile"}},
    # GPTQ (act-order, asymmetric blocks, clip search), 35 % of the elements in 8 bits (the
    # weights whose measured 4-bit drift per element is largest), tables of at most 4096 rows
    # (position, token type) in 8 bits (it needs calibration data; method = "mse" is the
    # data-free choice). MiniLM, masked cosine on the evaluation sentences: 0.9884 at 18.5 % of
    # fp32 (a quarter in 8 bits chosen by local output error, tables all 4-bit) -> 0.9923 at
    # 19.1 %; the measured choice alone at a quarter: 0.9911.
    "int4-weight": {"quantize_embeddings": {"bits": 4, "symmetric": False,
                                            "eight_bit_rows": 4096},
                    "quantize_int4": {"method": "gptq", "symmetric": False,
                                      "clip_search": True, "act_order": True, "ratio": 0.65,
                                      "ranking": "measured"}},
    "float16": {"convert_float16": {}},
}

#: Options of a mode's pass that only mean something together: when the user gives any of a
#: set, the mode's defaults for the others of that set are not applied (``uint8_weights = true``
#: alone asks for every MatMul weight uint8, not for that beside the mode's ``uint8_fraction``,
#: which needs ``uint8_weights = false``).
LINKED_OPTIONS: dict[str, list[tuple[str, ...]]] = {
    "quantize_static": [("uint8_weights", "uint8_fraction", "matmul_reduce_range")]}

#: The options a mode's passes take for the drift budget's second decision (``onnxopt.optimize``:
#: a lossy result that fails validation is decided once more, with half the allowed drift in
#: reserve): mode defaults whose effect the budget's estimate can miss are replaced by the
#: choices it estimates best. An option is replaced only when the user gave neither it nor an
#: option linked to it (:data:`LINKED_OPTIONS`). The budget simulates quantization in float (``onnxopt.budget``); onnxruntime's
#: integer kernels round differently at ties, and in a deep CNN those single-code differences
#: grow: PP-OCRv4 rec with mixed weight grids and GPTQ rounding validated at cosine 0.995 with
#: graph optimizations off and failed at 0.9876 with them on (its final Softmax amplifies
#: them), where uint8 MatMul weights rounded to nearest validate. Since the budget checks its
#: decision on the real model (``DriftBudget.decide``'s ``trial``) such a result is caught
#: before validation (the budget measures on the validation feeds); the second decision remains
#: for the decisions not checked (weight-only ones, the strength search's).
SECOND_DECISION: dict[str, dict[str, dict[str, Any]]] = {
    "int8-dynamic": {"quantize_dynamic": {"rounding": "nearest", "reduce_range": True}},
    "int8-static": {"quantize_static": {"rounding": "nearest", "uint8_weights": True,
                                        "uint8_fraction": None, "matmul_reduce_range": None}},
}


def _linked(name: str, key: str) -> set[str]:
    """``key`` and the options of pass ``name`` linked to it (:data:`LINKED_OPTIONS`)."""
    return next((set(s) for s in LINKED_OPTIONS.get(name, ()) if key in s), {key})

#: Keywords of ``build_pipeline`` / ``onnxopt.optimize`` (and the CLI's flags of the same names,
#: ``--prune-sparsity``...) that are sugar for one option of a pruning or clustering pass:
#: keyword -> (pass, option). Any of them adds the pass; a strength option takes ``"auto"`` to
#: have it searched against the drift budget (``onnxopt.strength``).
OPTION_SUGAR: dict[str, tuple[str, str]] = {
    "prune_threshold": ("prune", "threshold"), "prune_relative": ("prune", "relative"),
    "prune_sparsity": ("prune", "sparsity"), "prune_scope": ("prune", "scope"),
    "prune_pattern": ("prune", "pattern"), "prune_importance": ("prune", "importance"),
    "prune_reconstruct": ("prune", "reconstruct"), "prune_allocation": ("prune", "allocation"),
    "sparse_storage": ("prune", "sparse_storage"),
    "prune_channels": ("prune_channels", "flops"),
    "cluster_weights": ("cluster_weights", "clusters"),
    "cluster_per_channel": ("cluster_weights", "per_channel"),
    "cluster_method": ("cluster_weights", "method"),
    "cluster_codebook_dtype": ("cluster_weights", "codebook_dtype"),
    "cluster_wide": ("cluster_weights", "wide_clusters"),
    "cluster_size_budget": ("cluster_weights", "size_budget"),
}
#: The options giving each of these passes its strength: with none of them set it would change
#: nothing, which is refused rather than run silently.
STRENGTH_OPTIONS: dict[str, tuple[str, ...]] = {
    "prune": ("threshold", "relative", "sparsity", "pattern"),
    "prune_channels": ("flops", "threshold"), "cluster_weights": ("clusters",)}
#: Sugar of :data:`OPTION_SUGAR` that also sets the option of the same name of these other
#: passes: ``--prune-importance`` and ``--prune-reconstruct`` apply to every pruning pass the run
#: gives a strength (``--prune-sparsity`` and/or ``--prune-channels``), to ``prune`` when none.
SHARED_SUGAR: dict[str, tuple[str, ...]] = {
    "prune_importance": ("prune_channels",), "prune_reconstruct": ("prune_channels",)}


def sugar_targets(sugar: dict[str, Any],
                  options: dict[str, dict[str, Any]] | None = None) -> dict[str, list[str]]:
    """The passes each given keyword of :data:`OPTION_SUGAR` sets its option of.

    A keyword of :data:`SHARED_SUGAR` goes to those of its passes (its own and the shared ones)
    that have a strength from ``sugar`` or ``options``; to its own pass when none has one (whose
    missing strength is then refused by the caller). Keywords whose value is None are left out.
    """
    options = options or {}
    strong = {name for key, value in sugar.items() if value is not None
              for name, option in [OPTION_SUGAR[key]]
              if option in STRENGTH_OPTIONS.get(name, ())}
    strong |= {name for name, given in options.items()
               if any(given.get(o) is not None for o in STRENGTH_OPTIONS.get(name, ()))}
    targets: dict[str, list[str]] = {}
    for key, value in sugar.items():
        if value is None:
            continue
        own = OPTION_SUGAR[key][0]
        candidates = (own, *SHARED_SUGAR.get(key, ()))
        targets[key] = [n for n in candidates if n in strong] or [own]
    return targets


@dataclass
class Pipeline:
    """Configured passes in order, and the bound on lossless rounds.

    ``lossless`` are repeated to a fixed point; ``lossy`` run once each (see
    ``onnxopt.pass_manager.PassManager``).
    """

    passes: list[Pass] = field(default_factory=list)
    max_iterations: int = 10
    #: passes replacing those of the same name for the drift budget's second decision
    #: (:data:`SECOND_DECISION`)
    second: list[Pass] = field(default_factory=list)

    @property
    def lossless(self) -> list[Pass]:
        return [p for p in self.passes if p.lossless]

    @property
    def lossy(self) -> list[Pass]:
        return [p for p in self.passes if not p.lossless]

    def without(self, name: str) -> "Pipeline":
        """The same pipeline without the pass ``name`` (for rolling back)."""
        return Pipeline([p for p in self.passes if p.name != name], self.max_iterations,
                        [p for p in self.second if p.name != name])

    def second_decision(self) -> "Pipeline":
        """The pipeline of the drift budget's second decision: :attr:`second` in place of the
        passes of the same name."""
        swap = {p.name: p for p in self.second}
        return Pipeline([swap.get(p.name, p) for p in self.passes], self.max_iterations)

    def with_options(self, name: str, **changes: Any) -> "Pipeline":
        """The same pipeline with the pass ``name`` configured with ``changes`` on top of its
        options (and its second-decision stand-in, when it has one).

        Raises:
            UsageError: an option the pass does not have, or a value its check refuses.
        """
        def changed(p: Pass) -> Pass:
            return type(p)(dataclasses.replace(p.options, **changes)) if p.name == name else p

        return Pipeline([changed(p) for p in self.passes], self.max_iterations,
                        [changed(p) for p in self.second])

    def second_changes(self) -> list[str]:
        """``pass: option=value, ...`` for each pass :meth:`second_decision` replaces, the
        options that differ."""
        current = {p.name: p for p in self.passes}
        changes = []
        for p in self.second:
            before = vars(current[p.name].options)
            diff = [f"{k}={v!r}" for k, v in vars(p.options).items() if before.get(k) != v]
            if diff:
                changes.append(f"{p.name}: {', '.join(diff)}")
        return changes


def _default() -> list[str]:
    from onnxopt.passes import LOSSLESS_PIPELINE

    return list(LOSSLESS_PIPELINE)


def build_pipeline(passes: Sequence[PassSpec] | None = None, skip: Sequence[str] = (), *,
                   options: dict[str, dict[str, Any]] | None = None,
                   quantize: str | None = None,
                   quantize_exclude: Sequence[str] | None = None,
                   quantize_ops: Sequence[str] | None = None,
                   max_iterations: int = 10, **sugar: Any) -> Pipeline:
    """The pipeline for the given passes and options.

    Args:
        passes: pass names (``"default"``: the lossless pipeline) or configured passes; None is
            ``["default"]``.
        skip: names of passes to leave out.
        options: ``{pass name: {option: value}}``; a named pass not yet in ``passes`` is added
            only by the sugar below, otherwise its options are an error.
        sugar: keywords of :data:`OPTION_SUGAR` (``prune_threshold=1e-3``,
            ``prune_sparsity="auto"``, ``cluster_weights=16``...), each setting one option of
            its pass (added to the pipeline); None: not given. They win over ``options``.
        quantize: sugar for the passes of a ``QUANTIZE_MODES`` mode (added to the pipeline with
            the mode's options, under the user's).
        quantize_exclude, quantize_ops: sugar for the ``exclude`` / ``ops`` options of every
            pass of the ``quantize`` mode (op types or node names left float / op types
            quantized).
        max_iterations: bound on the rounds of the lossless passes (at least 1).

    Raises:
        UsageError: an unknown pass, mode, option or keyword, options for a pass not run, or a
            pass of :data:`STRENGTH_OPTIONS` without a strength (it would change nothing).
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) \
            or max_iterations < 1:
        raise UsageError(f"max_iterations must be an integer of at least 1, got "
                         f"{max_iterations!r}")
    if not isinstance(options or {}, dict) or not all(
            isinstance(v, dict) for v in (options or {}).values()):
        raise UsageError("options must map pass names to {option: value} tables")
    options = {k: dict(v) for k, v in (options or {}).items()}
    specs: list[PassSpec] = []
    for spec in (["default"] if passes is None else list(passes)):
        specs.extend(_default() if spec == "default" else [spec])
    unknown = sorted(set(sugar) - set(OPTION_SUGAR))
    if unknown:
        raise UsageError(f"unknown keyword(s) {', '.join(unknown)}; option sugar: "
                         f"{', '.join(OPTION_SUGAR)}")
    sugared: list[str] = []
    for key, names in sugar_targets(sugar, options).items():
        for name in names:
            options.setdefault(name, {})[OPTION_SUGAR[key][1]] = sugar[key]
            if name not in sugared:
                sugared.append(name)
    specs.extend(sugared)
    user_given = {name: set(given) for name, given in options.items()}
    named = {s.name if isinstance(s, Pass) else s for s in specs}
    if quantize is not None:
        if quantize not in QUANTIZE_MODES:
            raise UsageError(f"unknown quantization mode '{quantize}'; known: "
                             f"{', '.join(QUANTIZE_MODES)}")
        for name, defaults in QUANTIZE_MODES[quantize].items():
            given = options.get(name, {})
            mode_options = {**{k: v for k, v in defaults.items()
                               if not _linked(name, k) & set(given)}, **given}
            if quantize_exclude is not None:
                mode_options["exclude"] = list(quantize_exclude)
            if quantize_ops is not None:
                mode_options["ops"] = list(quantize_ops)
            if mode_options:
                options[name] = mode_options
            specs.append(name)
    elif quantize_exclude is not None or quantize_ops is not None:
        raise UsageError("quantize_exclude and quantize_ops (--quantize-exclude, "
                         "--quantize-ops) need a quantization mode (quantize, --quantize)")
    for name in skip:
        get_pass(name)  # unknown names are an error
    # A pass asked for with options, as a configured object or by a flag, and also skipped or
    # configured a second time, is a contradiction: refused rather than settled silently.
    configured = [s.name for s in specs if isinstance(s, Pass)]
    twice = sorted({n for n in configured if configured.count(n) > 1}
                   | (set(configured) & set(options)))
    if twice:
        raise UsageError(f"pass(es) configured twice: {', '.join(twice)} (give one configured "
                         "pass, or options, per pass)")
    asked = (set(options) | set(configured) | set(sugared)
             | (set(QUANTIZE_MODES[quantize]) if quantize is not None else set()))
    contradicted = sorted(asked & set(skip))
    if contradicted:
        raise UsageError(f"pass(es) both asked for and skipped: {', '.join(contradicted)}")
    _check_sugar_strengths(sugar, options, skip)
    built: dict[str, Pass] = {}
    for spec in specs:
        if isinstance(spec, Pass):
            built[spec.name] = spec
        elif spec not in built:
            built[spec] = get_pass(spec, **options.get(spec, {}))
    unused = sorted(set(options) - set(built))
    if unused:
        for name in unused:
            if name not in REGISTRY:
                get_pass(name)  # raises: unknown pass
        raise UsageError(f"options given for pass(es) the pipeline does not run: "
                         f"{', '.join(unused)}")
    for name, p in built.items():
        if name in skip:
            continue
        strengths = [o for o in STRENGTH_OPTIONS.get(name, ()) if hasattr(p.options, o)]
        if strengths and all(getattr(p.options, o) is None for o in strengths):
            flags = [f"--{k.replace('_', '-')}" for k, (n, o) in OPTION_SUGAR.items()
                     if n == name and o in strengths]
            raise UsageError(f"pass '{name}' would change nothing: give its strength "
                             f"({' or '.join(strengths)}; {', '.join(flags)})")
    kept = [p for name, p in built.items() if name not in set(skip)]
    # a mode's helper passes (all but its quantizer, the last) that change nothing say so in
    # their statistics, not as a warning the user did not ask for (quantize_embeddings on a
    # model without tables); named in the pipeline too, they warn
    for name in list(QUANTIZE_MODES.get(quantize, {}))[:-1]:
        if name in built and name not in named:
            built[name].auxiliary = True
    _check_quantizers(kept, quantize)
    second = []
    # (a mode's pass is neither skipped nor given as a configured object: both refused above)
    for name, fallback in SECOND_DECISION.get(quantize, {}).items():
        replaced = {k: v for k, v in fallback.items()
                    if not _linked(name, k) & user_given.get(name, set())}
        if replaced:
            second.append(get_pass(name, **{**options.get(name, {}), **replaced}))
    return Pipeline(kept, max_iterations, second)


def _option_flag(p: Pass, option: str) -> str:
    """`` (--quantize-exclude)`` / `` (--quantize-ops)`` for option ``exclude`` / ``ops`` of a
    pass of a ``--quantize`` mode (which those flags set), else ""."""
    moded = any(p.name in passes for passes in QUANTIZE_MODES.values())
    return f" (--quantize-{option})" if moded else ""


def _check_quantizers(passes: Sequence[Pass], quantize: str | None) -> None:
    """Refuse two quantization passes in one pipeline (``--passes quantize_static --quantize
    int8-weight``): each would quantize the weights the other does, the second the first's
    output. Passes decided jointly with the next one (``Pass.joins_next``: the embedding tables
    every integer mode quantizes beside its main pass) do not count. Also refuse ``exclude`` /
    ``ops`` options that contradict each other (an op type both excluded and the only one
    quantized), and an empty ``ops`` (nothing would be quantized).

    Raises:
        UsageError: naming the passes (and the mode that brought one) or the op types.
    """
    mode = set(QUANTIZE_MODES.get(quantize, ()))
    main = [p for p in passes if p.quantizes and not p.joins_next]
    if len(main) > 1:
        shown = [p.name + (f" (--quantize {quantize})" if p.name in mode else "") for p in main]
        raise UsageError(f"two quantization passes: {', '.join(shown)}; each quantizes the "
                         "weights the other does: give one (--quantize MODE, or one of them in "
                         "--passes)")
    for p in passes:
        ops = getattr(p.options, "ops", None)
        if ops is None:
            continue
        if not ops:
            raise UsageError(f"pass '{p.name}': option ops{_option_flag(p, 'ops')} is empty: "
                             "it would quantize nothing")
        both = sorted(set(ops) & set(getattr(p.options, "exclude", ())))
        if both:
            raise UsageError(f"pass '{p.name}': {', '.join(both)} both quantized (option ops"
                             f"{_option_flag(p, 'ops')}) and excluded (option exclude"
                             f"{_option_flag(p, 'exclude')})")


def check_targets(pipeline: Pipeline, model: onnx.ModelProto, source: str) -> None:
    """Refuse ``exclude`` / ``ops`` options (``--quantize-exclude`` / ``--quantize-ops``) naming
    nothing in ``model`` (node names and op types of every graph; ``source`` names the model in
    messages): an ``exclude`` entry that is neither a node's name nor the op type of a node of
    the model nor an ONNX op type (``onnx.defs``; one the model lacks is harmless, so a list
    serves several models), an ``ops`` entry that is neither an op type of the model nor of
    ONNX, and ``ops`` of which no entry occurs in the model: a typo would otherwise quantize (or
    keep float) what the user meant otherwise, silently.

    Raises:
        UsageError: naming the model, the pass, the option (and its flag), the entry and the
            closest names of the model.
    """
    nodes = [n for g in graph_protos(model.graph) for n in g.node]
    op_types, names = {n.op_type for n in nodes}, {n.name for n in nodes if n.name}

    def known(op: str) -> bool:
        return op in op_types or onnx.defs.has(op)

    def unknown(entry: str, option: str, p: Pass, what: str) -> UsageError:
        near = difflib.get_close_matches(entry, sorted(op_types | names), n=3)
        hint = f"; closest in the model: {', '.join(near)}" if near else ""
        return UsageError(f"{source}: pass '{p.name}' option {option}{_option_flag(p, option)}: "
                          f"'{entry}' is {what}{hint}")

    for p in pipeline.passes:
        for entry in getattr(p.options, "exclude", ()):
            if entry not in names and not known(entry):
                raise unknown(entry, "exclude", p, "neither an op type nor a node name of "
                              "the model")
        ops = getattr(p.options, "ops", None)
        for entry in ops or ():
            if not known(entry):
                raise unknown(entry, "ops", p, "not an op type (of ONNX or of the model)")
        if ops and not op_types & set(ops):
            raise UsageError(f"{source}: pass '{p.name}' option ops{_option_flag(p, 'ops')}: "
                             f"the model has no node of type {', '.join(ops)}: nothing would "
                             "be quantized")


def _flags(name: str, options: Sequence[str]) -> list[str]:
    """The flags of :data:`OPTION_SUGAR` setting ``options`` of pass ``name``."""
    return [f"--{k.replace('_', '-')}" for k, (n, o) in OPTION_SUGAR.items()
            if n == name and o in options]


def _check_sugar_strengths(sugar: dict[str, Any], options: dict[str, dict[str, Any]],
                           skip: Sequence[str]) -> None:
    """Refuse a pass added by sugar flags none of which gives it a strength (its options from
    ``options`` or its defaults): it would change nothing, and its own option check would
    blame options the user meant for another pass (``--prune-reconstruct`` beside
    ``--prune-channels``, which only ``prune`` takes).

    Raises:
        UsageError: naming the flags given, the strength flags of their pass and, when another
            pass has a strength by sugar, that those flags do not apply to it.
    """
    import dataclasses

    import onnxopt.passes  # noqa: F401  (registers every pass)

    given_by: dict[str, list[str]] = {}
    for key, names in sugar_targets(sugar, options).items():
        for name in names:
            given_by.setdefault(name, []).append(f"--{key.replace('_', '-')}")
    sugared = list(given_by)

    def strengthless(name: str) -> bool:
        if name not in STRENGTH_OPTIONS or name in skip or name not in REGISTRY:
            return False
        defaults = {f.name: f.default for f in dataclasses.fields(REGISTRY[name].Options)}
        given = options.get(name, {})
        mine = [o for o in STRENGTH_OPTIONS[name] if o in defaults]
        return bool(mine) and all(given.get(o, defaults[o]) is None for o in mine)

    for name in sugared:
        if not strengthless(name):
            continue
        strengths = [o for o in STRENGTH_OPTIONS[name]
                     if any(f.name == o for f in dataclasses.fields(REGISTRY[name].Options))]
        given = ", ".join(given_by[name])
        strength = f"{' or '.join(strengths)}; {', '.join(_flags(name, strengths))}"
        others = [o for o in sugared if o != name and not strengthless(o)]
        if others:
            verb = "applies" if len(given_by[name]) == 1 else "apply"
            message = (f"{given} {verb} to pass '{name}' (strength: {strength}), not to "
                       f"{', '.join(f for o in others for f in given_by[o])}: set the options "
                       f"of pass {', '.join(repr(o) for o in others)} with --config (or the "
                       f"options keyword); without a strength pass '{name}' would change "
                       "nothing")
        else:
            message = (f"pass '{name}' would change nothing: {given} set its options but not "
                       f"its strength ({strength})")
        raise UsageError(message)


#: Every setting of a run a config file may give: key -> (its table, its TOML type or types (an
#: integer is a valid float), the default of ``onnxopt.optimize``).
SETTINGS: dict[str, tuple[str, type | tuple[type, ...], Any]] = {
    "passes": ("pipeline", list, None), "skip": ("pipeline", list, ()),
    "options": ("pipeline", dict, None), "max_iterations": ("pipeline", int, 10),
    "quantize": ("pipeline", str, None), "quantize_exclude": ("pipeline", list, None),
    "quantize_ops": ("pipeline", list, None),
    "validate": ("validation", bool, True), "inputs": ("validation", str, None),
    "calibration": ("validation", str, None), "input_shapes": ("validation", dict, None),
    "seed": ("validation", int, 0), "atol": ("validation", float, DEFAULT_ATOL),
    "rtol": ("validation", float, DEFAULT_RTOL),
    "max_drift": ("validation", (float, str, dict), DEFAULT_MAX_DRIFT),
    "metric": ("validation", str, "cosine"), "drift_mask": ("validation", str, None),
    "layerwise": ("validation", bool, False),
    "strict": ("validation", bool, False), "verify_each": ("validation", bool, False),
}
_TABLES = ("pipeline", "validation")
_TOML_TYPES = {list: "an array", dict: "a table", int: "an integer", float: "a number",
               bool: "true or false", str: "a string"}


def load_config(source: str | os.PathLike | dict) -> dict[str, Any]:
    """Read a TOML run configuration (see the module docstring) into ``onnxopt.optimize``
    keywords: ``passes``, ``skip``, ``options``, ``max_iterations`` and the ``[validation]``
    keys. Relative ``inputs`` and ``calibration`` paths are relative to the file's folder.

    Raises:
        UsageError: unreadable or invalid TOML, unknown tables or keys, values of the wrong
            type, options a pass does not have (the message names the file).
    """
    folder = None
    if isinstance(source, dict):
        data, where = source, "config"
    else:
        where, folder = str(source), os.path.dirname(os.path.abspath(source))
        try:
            with open(source, "rb") as f:
                data = tomllib.load(f)
        except OSError as err:
            raise UsageError(f"{where}: cannot read the config: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{where}: invalid TOML: {err}") from None
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise UsageError(f"{where}: unknown table(s) {', '.join(unknown)}; known: "
                         f"{', '.join(_TABLES)}")
    settings: dict[str, Any] = {}
    for table in _TABLES:
        values = data.get(table, {})
        if not isinstance(values, dict):
            raise UsageError(f"{where}: {table} must be a table ([{table}])")
        keys = [k for k, (t, _, _) in SETTINGS.items() if t == table]
        bad = sorted(set(values) - set(keys))
        if bad:
            raise UsageError(f"{where}: unknown key(s) in [{table}]: {', '.join(bad)}; known: "
                             f"{', '.join(keys)}")
        for key, value in values.items():
            kinds = SETTINGS[key][1] if isinstance(SETTINGS[key][1], tuple) else (SETTINGS[key][1],)
            if not fits_type(value, kinds):
                wanted = " or ".join(_TOML_TYPES[k] for k in kinds)
                raise UsageError(f"{where}: [{table}] {key} must be {wanted}, got {value!r}")
            settings[key] = float(value) if float in kinds and isinstance(value, int) else value
    for key in ("passes", "skip"):
        if not all(isinstance(v, str) for v in settings.get(key, [])):
            raise UsageError(f"{where}: [pipeline] {key} must be an array of pass names")
    for key in ("quantize_exclude", "quantize_ops"):
        if not all(isinstance(v, str) for v in settings.get(key, [])):
            raise UsageError(f"{where}: [pipeline] {key} must be an array of op types or node "
                             "names")
    if "max_drift" in settings:
        parse_criteria(settings["max_drift"], settings.get("metric", "cosine"),
                       where=f"{where}: [validation] max_drift")
    for name, opts in settings.get("options", {}).items():
        if not isinstance(opts, dict):
            raise UsageError(f"{where}: [pipeline.options.{name}] must be a table of options")
        try:
            get_pass(name, **opts)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
    shapes = settings.get("input_shapes", {})
    if not all(isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                           and d >= 0 for d in v) for v in shapes.values()):
        raise UsageError(f"{where}: [validation.input_shapes] maps input names to arrays of "
                         "dims (non-negative integers)")
    for key in ("inputs", "calibration"):
        if key in settings and folder is not None:
            settings[key] = os.path.join(folder, settings[key])
    return settings
