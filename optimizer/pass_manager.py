"""The pass contract, the registry of passes and the pass manager.

A pass is a named unit (``name``, one-line ``description``) whose ``run(graph, ctx)`` edits a
``gs.Graph`` in place and returns :class:`PassResult` -- whether it changed anything, plus
statistics such as ``{"nodes_removed": 12}``. Passes never call each other; the manager owns the
order, the repetition of the lossless passes until nothing changes, timing, and verification after
each pass (``verify_each``: ``onnx.checker`` -- with the full check when the input model passes
it -- and an onnxruntime session load).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import PassError, UsageError
from onnxopt.graph import export_graph


@dataclass
class PassResult:
    """What a pass did: ``modified`` is False only when the graph is exactly as before;
    ``warnings`` are for the user (a lossy pass that did less than asked, say)."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """Options every pass may read; a pass ignores those that do not concern it.

    Attributes:
        fold_size_limit: largest tensor, in bytes, constant folding may materialize unless it
            replaces at least as many bytes of initializers (default 1 MiB).
        prune_threshold: magnitude under which weight values are set to 0 (None: no pruning).
        quantize: quantization mode (``"int8-weight"``) or None.
        template: the original model, for IR version, opsets and metadata when a pass exports.
        feeds: the validation feeds (``{input name: array}`` each), None when not validating;
            lossy passes use them to keep within ``max_drift``.
        max_drift: the minimum cosine similarity per output lossy passes must keep.
    """

    fold_size_limit: int = 1 << 20
    prune_threshold: float | None = None
    quantize: str | None = None
    template: onnx.ModelProto | None = None
    feeds: list[dict] | None = None
    max_drift: float = 0.99
    #: Bumped by the pass manager whenever a pass changes the graph, so that analyses computed
    #: for an unchanged graph (``passes._util.TensorTypes.of``) can be shared between passes.
    graph_version: int = 0


class Pass:
    """Base class of every pass. Subclasses set ``name``, ``description`` and ``lossless``."""

    name: ClassVar[str]
    description: ClassVar[str]
    #: Lossless passes keep every output value (up to float rounding) and are repeated to a
    #: fixed point; lossy ones (pruning, quantization) run once, when asked.
    lossless: ClassVar[bool] = True
    #: When a lossy pass runs: "before" the lossless passes (it must see the model's own
    #: parameters) or "after" them (it should see fused weights).
    stage: ClassVar[str] = "after"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError


REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to :data:`REGISTRY` under its ``name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"pass '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> Pass:
    """Instantiate the registered pass ``name``.

    Raises:
        UsageError: no pass has that name.
    """
    import onnxopt.passes  # noqa: F401  (registers every pass)

    if name not in REGISTRY:
        raise UsageError(f"unknown pass '{name}'; known passes: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()


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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PassError(f"after pass '{after}': onnx checker failed: {first}") from None
    try:
        opts = ort.SessionOptions()
        ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise PassError(f"after pass '{after}': onnxruntime cannot load the model: {first}") from None


class PassManager:
    """Runs a pipeline of passes over a graph.

    Args:
        fixed_point: passes repeated, in order, until an iteration changes nothing or
            ``max_iterations`` is reached (the lossless part).
        once: passes run once, in order (the lossy part): those of ``stage`` "before" ahead of
            the fixed point, the others after it, each followed by more rounds of
            ``fixed_point`` passes to clean up what it left.
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

    def _run_one(self, p: Pass, graph: gs.Graph, ctx: PassContext, iteration: int) -> bool:
        start = time.perf_counter()
        result = p.run(graph, ctx)
        if result.modified:
            ctx.graph_version += 1
        record = PassRecord(p.name, iteration, result.modified, dict(result.stats),
                            time.perf_counter() - start, list(result.warnings))
        self.records.append(record)
        if self.on_pass:
            self.on_pass(record)
        if self.verify_each and result.modified:
            if self._full_check is None:
                self._full_check = passes_full_check(ctx.template)
            verify_model(export_graph(graph, ctx.template), p.name, self._full_check)
        return result.modified

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
        iteration = 0
        for p in self.once:
            if p.stage == "before":
                self._run_one(p, graph, ctx, iteration)
        iteration = self._to_fixed_point(graph, ctx, iteration)
        for p in self.once:
            if p.stage != "before" and self._run_one(p, graph, ctx, iteration):
                iteration = self._to_fixed_point(graph, ctx, iteration + 1)
        return self.records
