"""The analysis manager: facts about a graph, computed on demand, cached until a pass changes it.

An analysis is a class with ``compute(graph, ctx)``; ``ctx.analyses.get(TensorTypes)`` returns the
cached instance or computes it. After a pass reports a change, the pass manager calls
:meth:`AnalysisManager.invalidate` with the analyses the pass declares it preserves (its
``preserves``); every other cached analysis is dropped (LLVM's new pass manager:
``AM.invalidate(M, PA)``). Passes never recompute a fact another pass already derived.
"""

from __future__ import annotations

from typing import TypeVar

import onnx_graphsurgeon as gs

A = TypeVar("A", bound="Analysis")


class Analysis:
    """Base class of analyses: subclasses implement ``compute``."""

    @classmethod
    def compute(cls: type[A], graph: gs.Graph, ctx) -> A:  # pragma: no cover - interface
        raise NotImplementedError


class AnalysisManager:
    """Caches the analyses of one graph for one run.

    Args:
        graph: the main graph the passes edit.
        ctx: the run's :class:`onnxopt.pass_manager.PassContext` (template model, feeds).
    """

    def __init__(self, graph: gs.Graph, ctx) -> None:
        self.graph, self.ctx = graph, ctx
        self._cache: dict[type, Analysis] = {}
        #: How many times each analysis was computed (how well caching works).
        self.computed: dict[str, int] = {}

    def get(self, kind: type[A]) -> A:
        """The analysis ``kind`` of the graph as it is now."""
        cached = self._cache.get(kind)
        if cached is None:
            cached = kind.compute(self.graph, self.ctx)
            self._cache[kind] = cached
            self.computed[kind.__name__] = self.computed.get(kind.__name__, 0) + 1
        return cached

    def invalidate(self, preserved: frozenset[type] = frozenset()) -> None:
        """Drop every cached analysis not in ``preserved`` (the graph changed)."""
        self._cache = {k: v for k, v in self._cache.items() if k in preserved}
