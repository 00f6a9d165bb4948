"""Concat merging: a Concat reading another Concat on the same axis becomes one Concat.

ONNX ``Concat`` (spec, https://onnx.ai/onnx/operators/onnx__Concat.html, opsets 1-21) joins its
inputs along ``axis`` (required from opset 4, default 1 before; negative: counted from the rank,
opset 11 on); every input has the same rank and the same dims off the axis. Joining is
associative, so with ``inner = Concat(b1, ..., bm, axis=k)``::

    Concat(a1, ..., inner, ..., an, axis=k) = Concat(a1, ..., b1, ..., bm, ..., an, axis=k)

element for element (the inner operands take the inner output's place along the axis), whatever
the dtype and shapes, empty operands included. The two axes are the same when they are equal, or
equal once normalized by the rank (all operands have the output's rank; from ONNX shape
inference, ``onnxopt.analyses.TensorTypes``). The typical source is exporters building shape
vectors and KV caches piecewise: ``Concat(Concat(Shape(x)[0], [1]), [-1, 64])``.

The inner output disappears, so every reader of it must be the outer Concat (which may read it
more than once: each place gets the operands) and it must not be a graph output. Every inner
Concat of one outer Concat is spliced in one rewrite; with the walk in topological order an inner
Concat has already absorbed its own inner Concats, so a tree of Concats becomes one node. The
outer Concat is rewritten in place (it keeps its output tensor) and each spliced inner Concat is
removed. Every graph and subgraph is handled; an inner Concat may be in an enclosing graph.

Statistics: ``rewritten`` (outer Concats that absorbed at least one inner Concat),
``concats_removed`` (inner Concats spliced), and ``refused`` per reason: ``inner output has other
readers``, ``inner output is a graph output``, ``different axis``, ``rank unknown`` (axes of
different signs and no known rank); an outer Concat none of whose inner Concats can be spliced
counts once, under the reason of its first.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, producer_in_scope, refuse


def _axis(node: gs.Node) -> int:
    return int(node.attrs.get("axis", 1))


def _refusal(outer: gs.Node, inner: gs.Node, owner: gs.Graph, scope: Scope) -> Refusal | None:
    """Why ``inner`` (a Concat of graph ``owner`` producing an input of ``outer``) cannot be
    spliced, or None."""
    t = inner.outputs[0]
    if any(n is not outer for n in t.outputs):
        return refuse("inner output has other readers")
    if any(t is o for o in owner.outputs):
        return refuse("inner output is a graph output")
    a, b = _axis(outer), _axis(inner)
    if a == b:
        return None
    rank = scope.types.rank(outer.outputs[0])
    if rank is None:
        rank = scope.types.rank(t)
    if rank is None and (a < 0) != (b < 0):
        return refuse("rank unknown")
    return None if rank is not None and a % rank == b % rank else refuse("different axis")


@register
class MergeConcat(RewritePass):
    name = "merge_concat"
    description = "Splice a Concat read only by a Concat on the same axis into it."
    ops = ("Concat",)
    sorted_walk = True

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._removed = 0

    def match(self, node: gs.Node, scope: Scope) -> list[gs.Node] | Refusal | None:
        inners: list[gs.Node] = []
        reasons: list[Refusal] = []
        for t in node.inputs:
            inner = producer_in_scope(t)
            owner = None if inner is None else scope.usedef.owner(inner)
            if owner is None or inner.op != "Concat" or any(inner is i for i in inners):
                continue
            reason = _refusal(node, inner, owner, scope)
            if reason is None:
                inners.append(inner)
            else:
                reasons.append(reason)
        return inners or (reasons[0] if reasons else None)

    def rewrite(self, node: gs.Node, inners: list[gs.Node], scope: Scope) -> None:
        spliced = {id(i.outputs[0]): list(i.inputs) for i in inners}
        operands = [x for t in node.inputs for x in spliced.get(id(t), [t])]
        node.inputs.clear()
        node.inputs.extend(operands)
        for inner in inners:
            scope.drop_if_unused(inner)
        self._removed += len(inners)

    def extra_stats(self) -> dict[str, int]:
        return {"concats_removed": self._removed} if self._removed else {}
