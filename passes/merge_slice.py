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
yields two independent merged nodes. The first Slice is removed when nothing else reads it.

Refused (stats ``refused``): ``same_axis`` (the two slices share an axis), ``non_constant``
(starts/ends/axes/steps not all initializers), ``attribute_form`` (opset < 10 Slice with
attributes), ``rank_unknown`` (a negative axis when shape inference, ``onnxopt.analyses.TensorTypes``,
does not know the rank).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.analyses import TensorTypes
from onnxopt.edit import constant_value, drop_disconnected, drop_if_unused
from onnxopt.names import fresh_name
from onnxopt.rewrite import consecutive_pairs


def _params(node: gs.Node) -> list[np.ndarray] | str:
    """``[starts, ends, axes, steps]`` as int64 vectors, or the reason they are not known."""
    if "starts" in node.attrs or len(node.inputs) < 3:
        return "attribute_form"
    values = []
    for t in node.inputs[1:5]:
        v = None if t.is_empty() else constant_value(t)
        if v is None and not t.is_empty():
            return "non_constant"
        values.append(v)
    values += [None] * (4 - len(values))
    starts, ends, axes, steps = values
    n = len(np.ravel(starts))
    axes = np.arange(n) if axes is None else axes
    steps = np.ones(n, np.int64) if steps is None else steps
    return [np.asarray(v, np.int64).ravel() for v in (starts, ends, axes, steps)]


@register
class MergeSlice(Pass):
    name = "merge_slice"
    description = "Merge two consecutive Slices on disjoint axes into one Slice."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = removed = 0
        refused: collections.Counter[str] = collections.Counter()
        types = ctx.analyses.get(TensorTypes)
        for g, fg, first, second in consecutive_pairs(graph, ("Slice",)):
            if first.op != "Slice":
                continue
            p1, p2 = _params(first), _params(second)
            reason = p1 if isinstance(p1, str) else p2 if isinstance(p2, str) else None
            if reason:
                refused[reason] += 1
                continue
            axes1, axes2 = p1[2], p2[2]
            if (axes1 < 0).any() or (axes2 < 0).any():
                rank = types.rank(second.inputs[0])
                rank = types.rank(first.inputs[0]) if rank is None else rank  # Slice keeps it
                if rank is None:
                    refused["rank_unknown"] += 1
                    continue
                axes1, axes2 = axes1 % rank, axes2 % rank
            if set(axes1.tolist()) & set(axes2.tolist()):
                refused["same_axis"] += 1
                continue
            x = first.inputs[0]
            combined = [np.concatenate([u, v]) for u, v in
                        zip((p1[0], p1[1], axes1, p1[3]), (p2[0], p2[1], axes2, p2[3]))]
            base = second.outputs[0].name
            second.inputs.clear()
            second.inputs.extend([x] + [
                gs.Constant(fresh_name(graph, f"{base}_{part}"), values)
                for part, values in zip(("starts", "ends", "axes", "steps"), combined)])
            merged += 1
            removed += drop_if_unused(fg, first)
        for g in iter_graphs(graph):
            drop_disconnected(g)
        stats = {"merged": merged, "nodes_removed": removed, "refused": dict(refused)}
        return PassResult(merged > 0, stats)
