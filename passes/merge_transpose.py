"""Transpose merging: ``Transpose(Transpose(X, p1), p2)`` becomes one ``Transpose(X, q)``.

ONNX ``Transpose`` (spec, opsets 1-21): ``Y = Transpose(X, perm)`` has
``Y.shape[i] = X.shape[perm[i]]`` and ``Y[j_0, ..., j_{r-1}] = X[k]`` with ``k[perm[i]] = j_i``;
an omitted ``perm`` is the reversal ``(r-1, ..., 0)``. Composing ``Y1 = Transpose(X, p1)`` and
``Y2 = Transpose(Y1, p2)``::

    Y2.shape[i] = Y1.shape[p2[i]] = X.shape[p1[p2[i]]]    so    q[i] = p1[p2[i]]

and the elements follow the same index map, so ``Y2 = Transpose(X, q)`` exactly, for any dtype.
When ``q`` is the identity the second node is bypassed (its consumers read ``X``; a graph output
keeps its name, see ``passes._util.bypass``) -- or, when bypassing would lose a graph output name,
it stays as a Transpose with the identity ``perm`` reading ``X``.

The second Transpose is rewritten in place (it keeps its output tensor); the first one is removed
when nothing else reads it, otherwise it stays for its other consumers. ``Transpose`` of an
initializer is left to constant folding. Every graph and subgraph is handled; the first node must
may be in an enclosing graph (the merged node then reads X from that outer scope).

An omitted ``perm`` takes its rank from the other node's ``perm``; when both are omitted the two
reversals cancel. Refused (stats ``refused``): ``graph_output_name_needs_rank`` (two omitted perms cancel, the second output is a graph output that
cannot be bypassed, and the identity ``perm`` to write needs the rank).
"""

from __future__ import annotations

import collections

import onnx_graphsurgeon as gs

from optimizer.graph import iter_graphs
from optimizer.pass_manager import Pass, PassContext, PassResult, register
from passes._util import (
    bypass, consecutive_pairs, drop_disconnected, drop_if_unused)


def _compose(p1, p2) -> list[int] | None:
    """``q[i] = p1[p2[i]]``; an omitted perm is the reversal of the rank the other one gives. Two
    omitted perms give None: the identity of a rank that is not known."""
    if p1 is None and p2 is None:
        return None
    rank = len(p1 if p1 is not None else p2)
    p1 = [int(p) for p in p1] if p1 is not None else list(range(rank - 1, -1, -1))
    p2 = [int(p) for p in p2] if p2 is not None else list(range(rank - 1, -1, -1))
    return [p1[i] for i in p2]


@register
class MergeTranspose(Pass):
    name = "merge_transpose"
    description = "Merge two consecutive Transposes into one (or none when they cancel)."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = cancelled = removed = 0
        refused: collections.Counter[str] = collections.Counter()
        for g, fg, first, second in consecutive_pairs(graph, ("Transpose",)):
            if first.op != "Transpose":
                continue
            x = first.inputs[0]
            q = _compose(first.attrs.get("perm"), second.attrs.get("perm"))
            if (q is None or q == sorted(q)) and bypass(g, second, x, second.outputs[0]):
                cancelled += 1
            elif q is None:
                refused["graph_output_name_needs_rank"] += 1
                continue
            else:
                second.inputs[0] = x
                second.attrs["perm"] = q
                merged += 1
            removed += drop_if_unused(fg, first)
        for g in iter_graphs(graph):
            drop_disconnected(g)
        stats = {"merged": merged, "cancelled": cancelled, "nodes_removed": removed + cancelled,
                 "refused": dict(refused)}
        return PassResult(merged + cancelled > 0, stats)
