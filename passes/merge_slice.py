"""Slice merging: two consecutive ``Slice`` nodes on disjoint axes become one ``Slice``.

ONNX ``Slice`` (spec, opsets 10-13, input form): ``Slice(data, starts, ends, axes, steps)`` slices
each axis ``axes[i]`` (negative: counted from the end; omitted: ``0 .. len(starts)-1``) by
``starts[i]:ends[i]:steps[i]`` (``steps`` omitted: all 1), clamped to that axis' dimension, and
leaves the other axes whole. Slicing never changes the rank, and an axis a Slice does not name keeps
its dimension and its elements. So when ``Y = Slice(X, s1, e1, a1, t1)`` and
``Z = Slice(Y, s2, e2, a2, t2)`` name disjoint sets of axes, every axis of ``a2`` has in ``Y`` the
dimension it has in ``X``, each axis is sliced by exactly one of the two, and::

    Z = Slice(X, s1 ++ s2, e1 ++ e2, a1 ++ a2, t1 ++ t2)

with the four lists concatenated (as int64; the axes normalized to non-negative when either node
uses a negative axis and the rank is known). Two slices of the same axis are never joined.

The second Slice is rewritten in place (it keeps its output tensor) and gets four new initializers
of its own -- constants may be shared by other nodes, and a first Slice read by two sibling Slices
yields two independent merged nodes. The first Slice is removed when nothing else reads it. Every
graph and subgraph is handled, each in topological order (a chain is merged from its start).

Statistics: ``rewritten`` (pairs merged) and ``refused`` per reason: ``same axis`` (the two slices
share an axis), ``not constant`` (starts/ends/axes/steps not all initializers), ``attribute
form`` (opset < 10 Slice with attributes), ``rank unknown`` (a negative axis when shape
inference, ``onnxopt.analyses.TensorTypes``, does not know the rank).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_value
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, pair_start, refuse


def _params(node: gs.Node) -> list[np.ndarray] | Refusal:
    """``[starts, ends, axes, steps]`` as int64 vectors, or the reason they are not known."""
    if "starts" in node.attrs or len(node.inputs) < 3:
        return refuse("attribute form")
    values = []
    for t in node.inputs[1:5]:
        v = None if t.is_empty() else constant_value(t)
        if v is None and not t.is_empty():
            return refuse("not constant")
        values.append(v)
    values += [None] * (4 - len(values))
    starts, ends, axes, steps = values
    n = len(np.ravel(starts))
    axes = np.arange(n) if axes is None else axes
    steps = np.ones(n, np.int64) if steps is None else steps
    return [np.asarray(v, np.int64).ravel() for v in (starts, ends, axes, steps)]


@register
class MergeSlice(RewritePass):
    name = "merge_slice"
    description = "Merge two consecutive Slices on disjoint axes into one Slice."
    ops = ("Slice",)
    sorted_walk = True

    def match(self, node: gs.Node, scope: Scope
              ) -> tuple[gs.Node, list[np.ndarray]] | Refusal | None:
        first = pair_start(node, scope, ("Slice",))
        if first is None:
            return None
        p1, p2 = _params(first), _params(node)
        if isinstance(p1, Refusal) or isinstance(p2, Refusal):
            return p1 if isinstance(p1, Refusal) else p2
        axes1, axes2 = p1[2], p2[2]
        if (axes1 < 0).any() or (axes2 < 0).any():
            rank = scope.types.rank(node.inputs[0])
            rank = scope.types.rank(first.inputs[0]) if rank is None else rank  # Slice keeps it
            if rank is None:
                return refuse("rank unknown")
            axes1, axes2 = axes1 % rank, axes2 % rank
        if set(axes1.tolist()) & set(axes2.tolist()):
            return refuse("same axis")
        return first, [np.concatenate([u, v]) for u, v in
                       zip((p1[0], p1[1], axes1, p1[3]), (p2[0], p2[1], axes2, p2[3]))]

    def rewrite(self, node: gs.Node, match: tuple[gs.Node, list[np.ndarray]],
                scope: Scope) -> None:
        first, combined = match
        x = first.inputs[0]
        base = node.outputs[0].name
        node.inputs.clear()
        node.inputs.extend([x] + [
            gs.Constant(scope.fresh(f"{base}_{part}"), values)
            for part, values in zip(("starts", "ends", "axes", "steps"), combined)])
        scope.drop_if_unused(first)
