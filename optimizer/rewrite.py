"""Rewrite rules: the shared walker for passes that rewrite the graph one node at a time.

A rule is a :class:`RewritePass` that declares the ops it looks at (``ops``, ``domain``; the opset
range is the pass's ``min_opset``/``max_opset``) and implements two methods:

* ``match(node, scope)``: None when the node is not a case of the rule at all, a :class:`Refusal`
  (``refuse("weight is not an initializer")``) when it is but cannot be rewritten, else any
  object describing the match;
* ``rewrite(node, match, scope)``: performs the rewrite; returns None, a kind label for the
  statistics (``"Mul"``), or a :class:`Refusal` when it finds late that it cannot (nothing
  changed).

The walker visits every scope -- the main graph, then If/Loop/Scan bodies, depth first --
in topological order when ``sorted_walk`` is set, skips nodes a previous rewrite disconnected,
counts refusals by reason under ``refused``, and after each scope sweeps the nodes left without
outputs. Statistics are always ``{"rewritten": n}``, plus ``"by_kind"`` when rewrites name a
kind and ``"refused"`` when anything was refused. Reasons are short prose, lower case.
"""

from __future__ import annotations

import collections
from typing import Any, ClassVar

import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes, UseDef
from onnxopt.edit import drop_disconnected, drop_if_unused, sort_nodes
from onnxopt.graph import iter_graphs, opset_version
from onnxopt.names import fresh_name
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import Pass, PassContext, PassResult


class Refusal(str):
    """Why a matched node is not rewritten: a reason in short lower-case prose."""


def refuse(reason: str) -> Refusal:
    """A :class:`Refusal` with ``reason``."""
    return Refusal(reason)


class Scope:
    """Where a rule is looking: the graph holding the node, and the whole model.

    Attributes:
        root: the main graph (names are fresh across the whole model).
        graph: the graph whose ``nodes`` hold the node being matched.
        ctx: the run's context.
        opset: the model's default-domain opset.
    """

    def __init__(self, root: gs.Graph, graph: gs.Graph, ctx: PassContext, opset: int) -> None:
        self.root, self.graph, self.ctx, self.opset = root, graph, ctx, opset
        #: State a rule keeps for the walk of this one graph (CSE's table of seen nodes, say).
        self.memo: dict[str, Any] = {}

    @property
    def types(self) -> TensorTypes:
        """Tensor types and shapes of the model (computed on the first question, then cached
        until a pass that does not preserve them changes the graph)."""
        return self.ctx.analyses.get(TensorTypes)

    @property
    def usedef(self) -> UseDef:
        """Scopes of nodes and interfaces of graphs, as at the start of this pass: nodes created
        or moved since are not in it."""
        return self.ctx.analyses.get(UseDef)

    def is_output(self, t: gs.Tensor) -> bool:
        """Whether ``t`` is an output of this scope's graph (as it is now: rules may change
        a subgraph's outputs)."""
        return any(o is t for o in self.graph.outputs)

    def fresh(self, base: str) -> str:
        """A name no tensor of the model uses (see ``onnxopt.names``)."""
        return fresh_name(self.root, base)

    def drop_if_unused(self, node: gs.Node) -> bool:
        """Disconnect ``node`` -- a node of this scope's graph or of an enclosing one, as at the
        start of the pass -- when nothing reads its outputs and none is an output of its graph
        (``onnxopt.edit.drop_if_unused``). A node of an enclosing graph also leaves that graph's
        ``nodes`` at once: the walker swept that graph before it came to this one.

        Returns:
            True if the node was disconnected.
        """
        owner = self.usedef.owner(node)
        if owner is None or not drop_if_unused(owner, node):
            return False
        if owner is not self.graph:
            drop_disconnected(owner)
        return True


class RewritePass(Pass):
    """A pass made of one node rule (see the module docstring)."""

    #: The op types the rule looks at (None: every op).
    ops: ClassVar[tuple[str, ...] | None]
    #: The rule's domain: "" is the default ONNX domain (also spelled "ai.onnx"); None: any
    #: domain (the rule's ``match`` then tells the domains apart).
    domain: ClassVar[str | None] = ""
    #: Walk each scope in topological order (a chain is then seen from its start).
    sorted_walk: ClassVar[bool] = False

    def match(self, node: gs.Node, scope: Scope) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def rewrite(self, node: gs.Node, match: Any, scope: Scope) -> str | Refusal | None:
        raise NotImplementedError  # pragma: no cover - interface

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        """Called once before the walk (per-run state, e.g. a cache shared by all matches)."""

    def extra_stats(self) -> dict[str, Any]:
        """Statistics of the pass beyond the walker's counts (called once after the walk)."""
        return {}

    def _wants(self, node: gs.Node) -> bool:
        if (self.ops is not None and node.op not in self.ops) or not node.outputs:
            return False
        if self.domain is None:
            return True
        return is_default_domain(node) if self.domain in ("", "ai.onnx") \
            else node.domain == self.domain

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = opset_version(graph)
        self.start(graph, ctx)
        kinds: collections.Counter[str] = collections.Counter()
        refused: collections.Counter[str] = collections.Counter()
        rewritten = 0
        for g in list(iter_graphs(graph)):
            if self.sorted_walk:
                sort_nodes(g)
            scope = Scope(graph, g, ctx, opset)
            for node in list(g.nodes):
                if not self._wants(node):
                    continue
                found = self.match(node, scope)
                if found is None:
                    continue
                if isinstance(found, Refusal):
                    refused[found] += 1
                    continue
                outcome = self.rewrite(node, found, scope)
                if isinstance(outcome, Refusal):
                    refused[outcome] += 1
                    continue
                rewritten += 1
                if outcome:
                    kinds[outcome] += 1
            drop_disconnected(g)
        stats: dict[str, Any] = {"rewritten": rewritten, **self.extra_stats()}
        if kinds:
            stats["by_kind"] = dict(sorted(kinds.items()))
        if refused:
            stats["refused"] = dict(sorted(refused.items()))
        return PassResult(rewritten > 0, stats)


def producer_in_scope(t: gs.Tensor) -> gs.Node | None:
    """The default-domain node producing ``t`` when it has exactly one producer, else None."""
    if len(t.inputs) != 1 or not is_default_domain(t.inputs[0]):
        return None
    return t.inputs[0]


def pair_start(second: gs.Node, scope: Scope, ops: tuple[str, ...]) -> gs.Node | None:
    """The node ``first`` of a pair ``second(first(X, ...), ...)``: the single producer of
    ``second``'s data input (input 0) when it is a default-domain node of ``ops`` that was in the
    model at the start of the pass (in ``scope.graph``, or in an enclosing graph when ``second``
    reads an outer-scope tensor -- remove it with :meth:`Scope.drop_if_unused`); else None.

    With ``sorted_walk`` a chain is seen from its start, so a rewrite of one pair is seen by the
    next -- the shape of every "merge two consecutive ops" rule, which matches on ``second``.
    """
    if not second.inputs:
        return None
    first = producer_in_scope(second.inputs[0])
    if first is None or first.op not in ops or scope.usedef.owner(first) is None:
        return None
    return first
