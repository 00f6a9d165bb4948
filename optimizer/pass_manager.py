"""The pass contract, the registry of passes and the pass manager.

A pass is a named unit (``name``, one-line ``description``, an ``Options`` dataclass) whose
``run(graph, ctx)`` edits a ``gs.Graph`` in place and returns :class:`PassResult` -- whether it
changed anything, plus statistics such as ``{"rewritten": 12}`` -- or, for a lossy pass,
proposals for the drift budget (``onnxopt.budget``). Passes never call each other; the manager
owns the order, the repetition of the lossless passes until nothing changes, the budget's
decisions, invalidating analyses a pass does not preserve (``onnxopt.analyses``), timing, and
verification after each pass (``verify_each``: ``onnx.checker`` -- with the full check when the
input model passes it -- and an onnxruntime session load), and the search of a lossy pass's
strength when its strength option is ``"auto"`` (``onnxopt.strength``). Most passes rewrite one
node at a time and are written as rules (``onnxopt.rewrite.RewritePass``).
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import onnx
import onnx_graphsurgeon as gs

from onnxopt import external, progress
from onnxopt.analyses import AnalysisManager
from onnxopt.budget import DriftBudget, Proposal, accept_all, lossy_warnings
from onnxopt.errors import PassError, UsageError, first_line
from onnxopt.graph import edits_undone, export_graph, graph_protos, opset_version
from onnxopt.strength import search_strength
from onnxopt.ops import QUANTIZED_OPS


@dataclass
class PassResult:
    """What a pass did: ``modified`` is False only when the graph is exactly as before;
    ``warnings`` are for the user (a lossy pass that did less than asked, say). A lossy pass
    leaves the graph alone and returns ``proposals`` instead (see ``onnxopt.budget``)."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)


@dataclass
class PassContext:
    """The data of one run, shared by every pass (options belong to the passes themselves).

    Attributes:
        template: the original model, for IR version, opsets and metadata when a pass exports.
        feeds: the validation feeds (``{input name: array}`` each), None when not validating.
        calibration: feeds for activation statistics, iterated once per computation (from
            ``onnxopt.optimize``, an ``onnxopt.inputs.FeedStream`` that reads a folder one file
            at a time on every iteration); None: ``feeds``.
        budget: the run's drift budget, None without feeds (lossy proposals are then all
            accepted).
        mask: the run's drift mask (``--drift-mask``), also without a budget (``drift_mask``).
        synthesized: ``feeds`` were synthesized from the declared inputs (random values: never
            used for calibration).
        analyses: the analysis manager of the graph being optimized (created by the pass manager
            when None).
        upgrade_failure: why the model could not be converted to a pass's ``upgrade_opset``
            (added to that pass's refusal), None when no conversion failed.
        lossy_pending: a lossy pass on the fused weights is still to run (set by
            :meth:`PassManager.run` during the first lossless rounds): a rewrite that would hide
            a weight from it (a weight read through a shared Transpose) waits.
        storage: names of tensors computed by a compressed storage form -- the decompression
            subgraph of a weight (clustered indices unpacked and looked up in a codebook, a
            weight shared as the Transpose of another) -- which, like DequantizeLinear, the
            lossless passes must not fold back into a larger initializer. The pass that builds
            such a subgraph adds the output name of every node it creates; the lossless passes
            keep tensor names, so the mark lasts the run.
    """

    template: onnx.ModelProto | None = None
    feeds: list[dict] | None = None
    calibration: Iterable[dict] | None = None
    budget: DriftBudget | None = None
    mask: str | None = None
    synthesized: bool = False
    analyses: AnalysisManager | None = None
    upgrade_failure: str | None = None
    lossy_pending: bool = False
    storage: set[str] = field(default_factory=set)

    def has_calibration(self) -> bool:
        """Whether activation statistics can be computed: calibration data, or real (not
        synthesized) validation inputs."""
        return self.calibration is not None or bool(self.feeds) and not self.synthesized

    def drift_mask(self) -> str | None:
        """The input whose non-zero positions the run's lossy criteria judge (``--drift-mask``,
        ``onnxopt.metrics.kept_positions``; ``mask``, else the budget's), None when the run has
        none: calibration positions the result is not judged on (padding) need not be fitted
        either -- with or without validation."""
        if self.mask is not None:
            return self.mask
        return None if self.budget is None else self.budget.mask


@dataclass(frozen=True)
class NoOptions:
    """The options of a pass that has none."""


class Pass:
    """Base class of every pass.

    Subclasses set ``name`` and ``description``, and may declare:

    * ``Options``: a frozen dataclass of the pass's options with documented defaults and units,
      and optionally a ``check()`` method returning why the values are invalid (or None);
      ``Pass(options)`` or ``Pass(**fields)`` configures an instance;
    * ``lossless`` (False for pruning and quantization, which return proposals) and, for a lossy
      pass, ``weights``: ``"original"`` to run on the model's own weights, before the lossless
      passes, or ``"fused"`` to run after them;
    * ``requires``: run data the pass cannot work without: ``"feeds"`` (validation inputs) or
      ``"calibration"`` (feeds for activation statistics, ``onnxopt.analyses.ActivationStats``);
    * ``preserves``: the analyses still valid after the pass changed the graph;
    * ``min_opset`` / ``max_opset``: the default-domain opsets the pass applies to; the pass
      manager does not run it on other models;
    * ``upgrade_opset``: the opset a model the pass does not apply to (``applies_to``) may be
      converted to so that it does (``onnxopt.opset.upgrade``, by ``onnxopt.optimize`` before
      the pipeline runs; validation still compares with the original); None: never convert. When
      conversion fails, the pass is refused with the converter's reason;
    * ``joins_next``: True for a lossy pass whose proposals the drift budget decides together
      with those of the next lossy pass of the pipeline (which then runs before they are
      applied): for passes that touch tensors no other pass touches (embedding tables), so that
      both compete for the same allowed drift instead of the first taking it all;
    * ``quantizes``: True for a quantization pass, which the pass manager does not run on a model
      that was already quantized when the run started (``onnxopt.ops.QUANTIZED_OPS``), so that
      nothing is quantized twice (a later pass of the same run still runs after an earlier one);
    * ``strength`` and ``ladder``, for a lossy pass with a strength: the name of the option that
      is its strength (``"sparsity"``, ``"clusters"``) and its candidate values, weakest first.
      That option also accepts ``"auto"``: the pass manager then searches the ladder for the
      strongest value whose drift meets the run's budget, and offers the next stronger value
      per tensor (:func:`search_strength`); ``run`` never sees ``"auto"`` and must be callable
      several times on the same unchanged graph.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    #: Lossless passes keep every output value (up to float rounding) and are repeated to a
    #: fixed point; lossy ones (pruning, quantization) run once, when asked.
    lossless: ClassVar[bool] = True
    #: Which weights a lossy pass must see: "original" (before the lossless passes) or "fused".
    weights: ClassVar[str] = "fused"
    requires: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[type]] = frozenset()
    min_opset: ClassVar[int] = 1
    max_opset: ClassVar[int | None] = None
    upgrade_opset: ClassVar[int | None] = None
    quantizes: ClassVar[bool] = False
    joins_next: ClassVar[bool] = False
    #: The option that is the pass's strength (None: it has none), and its values, weakest first.
    strength: ClassVar[str | None] = None
    ladder: ClassVar[tuple] = ()

    def __init__(self, options: Any = None, **fields: Any) -> None:
        if options is None:
            known = [f.name for f in dataclasses.fields(self.Options)]
            unknown = sorted(set(fields) - set(known))
            if unknown:
                raise UsageError(f"pass '{self.name}' has no option {', '.join(unknown)}; its "
                                 f"options: {', '.join(known) or 'none'}")
            options = self.Options(**fields)
        elif fields or not isinstance(options, self.Options):
            raise UsageError(f"pass '{self.name}' takes a {self.Options.__name__} or keywords")
        _check_types(self.name, options, auto=self.strength)
        check = getattr(options, "check", None)
        reason = check() if check is not None else None
        if reason:
            raise UsageError(f"pass '{self.name}': {reason}")
        self.options = options

    def applies_to(self, opset: int) -> str | None:
        """Why the pass does not apply to a model of default-domain ``opset``, or None."""
        if opset < self.min_opset:
            return f"opset {opset} < {self.min_opset}"
        if self.max_opset is not None and opset > self.max_opset:
            return f"opset {opset} > {self.max_opset}"
        return None

    def wants_upgrade(self, model: onnx.ModelProto) -> bool:
        """Whether converting ``model`` to ``upgrade_opset`` could let the pass change anything
        (a cheap look at the graph, no data); True unless the pass knows better."""
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    #: A quantization mode's helper pass (``onnxopt.pipeline.build_pipeline``): when it changes
    #: nothing it does not warn (its statistics say why).
    auxiliary: bool = False

    def finish(self, graph: gs.Graph) -> None:
        """Complete a lossy pass's rewrite once the budget's accepted proposals are applied (a
        pass whose proposals leave work that depends on which were accepted: float16's Cast
        merging). Called before :meth:`summarize`, and by the drift budget's check of the real
        model after applying the set it checks, so that the model checked is the one written."""

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict[str, Any]:
        """A lossy pass's statistics once the budget has decided (``accepted`` were applied)."""
        return {**result.stats, "proposed": len(result.proposals), "accepted": len(accepted)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


def fits_type(value: Any, kinds: tuple) -> bool:
    """Whether ``value`` is of one of ``kinds``: an int is a valid float, a bool is only a bool,
    ``type(None)`` admits None."""
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def _check_types(name: str, options: Any, auto: str | None = None) -> None:
    """Raise UsageError when an option's value does not have its declared type (``X | None``
    admits None); the strength option ``auto`` (``Pass.strength``) also admits ``"auto"``."""
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value, hint = getattr(options, f.name), hints.get(f.name, Any)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if Any in allowed or (f.name == auto and isinstance(value, str) and value == AUTO):
            continue
        if not fits_type(value, tuple(a for a in allowed if isinstance(a, type))):
            wanted = " or ".join("None" if a is type(None) else getattr(a, "__name__", str(a))
                                 for a in allowed)
            raise UsageError(f"pass '{name}': option {f.name} must be {wanted}, got "
                             f"{value!r}")


#: The value of a strength option that asks the pass manager to search it.
AUTO = "auto"


def is_auto(p: Pass) -> bool:
    """Whether ``p``'s strength option is ``"auto"`` (to be searched)."""
    return p.strength is not None and getattr(p.options, p.strength, None) == AUTO


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to :data:`REGISTRY` under its ``name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"pass '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str, options: Any = None, **fields: Any) -> Pass:
    """An instance of the registered pass ``name``, configured with ``options`` or ``fields``.

    Raises:
        UsageError: no pass has that name, or the options do not fit it.
    """
    import onnxopt.passes  # noqa: F401  (registers every pass)

    if name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}'; known passes: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](options, **fields)


@dataclass
class PassRecord:
    """One execution of a pass: iteration, whether it changed the graph, statistics, seconds."""

    name: str
    iteration: int
    modified: bool
    stats: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The record for the JSON report (its warnings are in the report's ``warnings``)."""
        return {k: v for k, v in self.__dict__.items() if k != "warnings"}


def passes_full_check(model: onnx.ModelProto) -> bool:
    """Whether ``model`` passes ``onnx.checker`` with ``full_check`` (strict shape inference).

    Real exports often fail it for reasons of their own (graph outputs declared without a shape,
    say); verification then uses the plain check, so that no pass is blamed for the input.
    """
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:  # the checker raises several types
        return False


def verify_model(model: onnx.ModelProto, after: str, full_check: bool = True) -> None:
    """Check ``model`` with ``onnx.checker`` and by loading it in onnxruntime.

    Args:
        full_check: also run strict shape inference (where the input model passes it).

    Raises:
        PassError: either check fails; the message names the pass ``after`` which it ran.
    """
    import onnxruntime as ort

    data = model.SerializeToString()
    try:
        onnx.checker.check_model(data, full_check=full_check)
    except Exception as err:  # the checker raises several types
        first = first_line(err)
        raise PassError(f"after pass '{after}': onnx checker failed: {first}") from None
    try:
        opts = ort.SessionOptions()
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        first = first_line(err)
        raise PassError(f"after pass '{after}': onnxruntime cannot load the model: {first}") from None


class PassManager:
    """Runs a pipeline of passes over a graph.

    Args:
        fixed_point: passes repeated, in order, until an iteration changes nothing or
            ``max_iterations`` is reached (the lossless part).
        once: passes run once, in order (the lossy part): those on the ``"original"`` weights
            ahead of the fixed point, the others after it. Each lossy pass's proposals go to the
            run's drift budget (``ctx.budget``) before the next pass runs, so ``prune ->
            reconstruct -> quantize`` each see what the previous one kept; after a lossy pass
            changed the graph, more rounds of ``fixed_point`` clean up what it left.
        verify_each: export and verify the model after every pass that changed it.
        on_pass: optional callback invoked with each :class:`PassRecord` (progress display).
    """

    def __init__(self, fixed_point: list[Pass], once: list[Pass] = (), *,
                 max_iterations: int = 10, verify_each: bool = False,
                 on_pass: Callable[[PassRecord], None] | None = None) -> None:
        self.fixed_point = list(fixed_point)
        self.once = list(once)
        self.max_iterations = max_iterations
        self.verify_each = verify_each
        self._full_check: bool | None = None
        self.on_pass = on_pass
        self.records: list[PassRecord] = []

    def run_pass(self, p: Pass, graph: gs.Graph, ctx: PassContext,
                 iteration: int = 0) -> PassRecord:
        """Run one pass on ``graph`` (with the budget's decision on a lossy pass's proposals,
        invalidation of analyses, verification) and return its record."""
        if ctx.analyses is None or ctx.analyses.graph is not graph:
            ctx.analyses = AnalysisManager(graph, ctx)
        self._run_one(p, graph, ctx, iteration)
        return self.records[-1]

    def _run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext, iteration: int) -> bool:
        progress.report(f"pass {p.name} (round {iteration + 1})")
        return self._run_joint([p], graph, ctx, iteration)

    def _refusal(self, p: Pass, graph: gs.Graph, ctx: PassContext) -> str | None:
        """Why ``p`` does not run on this model (opset, already quantized), or None."""
        refusal = p.applies_to(opset_version(graph))
        if refusal is not None and p.upgrade_opset is not None and ctx.upgrade_failure:
            refusal = f"{refusal}; {ctx.upgrade_failure}"
        if refusal is None and p.quantizes and ctx.template is not None:
            found = sorted({n.op_type for g in graph_protos(ctx.template.graph) for n in g.node
                            if n.op_type in QUANTIZED_OPS})
            if found:
                refusal = f"model already quantized ({', '.join(found)})"
        return refusal

    @staticmethod
    def _execute(p: Pass, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if "feeds" in p.requires and not ctx.feeds:
            raise UsageError(f"pass '{p.name}' needs validation inputs (--inputs)")
        if "calibration" in p.requires and not ctx.has_calibration():
            raise UsageError(f"pass '{p.name}' needs calibration data (--calibration-data, "
                             "or real --inputs): synthesized random inputs are not "
                             "calibration data")
        result = p.run(graph, ctx)
        if external.current_folder() is not None:
            # weights the pass mapped and left unchanged: unmapped, so their pages leave this
            # process's resident memory (a pass reading every weight once stays bounded)
            external.restore_references(graph)
        return result

    def _run_joint(self, batch: list[Pass], graph: gs.Graph, ctx: PassContext,
                   iteration: int) -> bool:
        """Run ``batch`` -- one pass, or lossy passes joined by ``joins_next``, each run on the
        same graph -- and hand all their proposals to the drift budget in one decision, so that
        the budget spends the allowed drift where it buys the most (an embedding table of one
        pass against a MatMul weight of another), not first come, first served."""
        runs = []
        searched: dict[str, tuple[dict[str, Any], bool]] = {}
        for p in batch:
            start = time.perf_counter()
            if len(batch) > 1:
                progress.report(f"pass {p.name} (round {iteration + 1})")
            refusal = self._refusal(p, graph, ctx)
            if refusal is None and is_auto(p):
                # the search decides and applies on its own (see onnxopt.strength)
                outcome = search_strength(p, graph, ctx, self._execute)
                searched[p.name] = (outcome.stats, outcome.modified)
                result = PassResult(False, outcome.stats, outcome.warnings)
            else:
                result = (PassResult(False, {"refused": {refusal: 1}}) if refusal is not None
                          else self._execute(p, graph, ctx))
            for proposal in result.proposals:
                proposal.source = p.name
            runs.append((p, result, refusal, time.perf_counter() - start))
        start = time.perf_counter()
        deciding = [(p, result) for p, result, refusal, _ in runs
                    if not p.lossless and refusal is None and p.name not in searched]
        if any(result.proposals for _, result in deciding):
            progress.report(f"drift budget: deciding {sum(len(r.proposals) for _, r in deciding)}"
                            f" proposals of {', '.join(p.name for p, _ in deciding)}")
        decided = self._decide(deciding, graph, ctx) if deciding else {}
        decided.update(searched)
        proposing = [p.name for p, result in deciding if result.proposals]
        shared = (time.perf_counter() - start) / max(len(proposing), 1)
        changed = False
        for p, result, refusal, seconds in runs:
            stats, warnings, modified = dict(result.stats), list(result.warnings), result.modified
            if p.name in decided:
                stats, modified = decided[p.name]
                seconds += shared if p.name in proposing else 0.0
            kept_float = (stats.get("drift_budget") or {}).get("kept")
            if not p.lossless and (modified or not p.auxiliary or kept_float):
                warnings += lossy_warnings(
                    p.name, modified, stats.get("drift_budget"),
                    ctx.budget.describe() if ctx.budget else "", stats.get("refused"),
                    stats.get("branches_not_taken", ()))
            if modified:
                ctx.analyses.invalidate(p.preserves)
            record = PassRecord(p.name, iteration, modified, stats, seconds, warnings)
            self.records.append(record)
            if self.on_pass:
                self.on_pass(record)
            changed |= modified
        if self.verify_each and changed:
            if self._full_check is None:
                self._full_check = passes_full_check(ctx.template)
            verify_model(export_graph(graph, ctx.template), "+".join(p.name for p in batch),
                         self._full_check)
        return changed

    @staticmethod
    def _decide(runs: list[tuple[Pass, PassResult]], graph: gs.Graph, ctx: PassContext
                ) -> dict[str, tuple[dict[str, Any], bool]]:
        """Hand the lossy passes' proposals to the drift budget in one decision (all are
        accepted without one) and return each pass's final statistics and whether the graph
        changed, by pass name."""
        proposals = [proposal for _, result in runs for proposal in result.proposals]
        decision = None
        if proposals and ctx.budget is not None:
            def trial(accepted: list[Proposal]) -> onnx.ModelProto:
                with edits_undone(graph, [p for p, _ in runs]):
                    for a in accepted:
                        a.apply()
                    for p, _ in runs:
                        p.finish(graph)
                    return export_graph(graph, ctx.template)

            decision = ctx.budget.decide(graph, ctx.template, proposals, trial=trial)
            accepted = decision.accepted
        else:
            accepted = accept_all(proposals)
        for p, _ in runs:
            p.finish(graph)
        out = {}
        for p, result in runs:
            mine = [a for a in accepted if a.source == p.name]
            stats = p.summarize(result, mine)
            if decision is not None and result.proposals:
                stats["drift_budget"] = decision.report(p.name)
            out[p.name] = (stats, result.modified or bool(mine))
        return out

    def _to_fixed_point(self, graph: gs.Graph, ctx: PassContext, first_iteration: int) -> int:
        iteration = first_iteration
        for _ in range(self.max_iterations):
            changed = False
            for p in self.fixed_point:
                changed |= self._run_one(p, graph, ctx, iteration)
            iteration += 1
            if not changed:
                break
        return iteration

    def run(self, graph: gs.Graph, ctx: PassContext) -> list[PassRecord]:
        """Run the pipeline on ``graph`` in place and return the records of every pass run."""
        if ctx.analyses is None or ctx.analyses.graph is not graph:
            ctx.analyses = AnalysisManager(graph, ctx)
        iteration = 0
        for p in self.once:
            if p.weights == "original":
                self._run_one(p, graph, ctx, iteration)
        batches: list[list[Pass]] = []
        for p in self.once:
            if p.weights == "original":
                continue
            if batches and batches[-1][-1].joins_next:
                batches[-1].append(p)
            else:
                batches.append([p])
        ctx.lossy_pending = bool(batches)
        iteration = self._to_fixed_point(graph, ctx, iteration)
        for i, batch in enumerate(batches):
            changed = self._run_joint(batch, graph, ctx, iteration)
            ctx.lossy_pending = i + 1 < len(batches)
            # after the last lossy pass, the rewrites that waited for it run (one more round
            # even when it changed nothing)
            if changed or not ctx.lossy_pending:
                iteration = self._to_fixed_point(graph, ctx, iteration + int(changed))
        return self.records
