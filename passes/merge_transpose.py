"""Transpose merging: consecutive Transposes become one, also across a Squeeze or Unsqueeze.

ONNX ``Transpose`` (spec, opsets 1-21): ``Y = Transpose(X, perm)`` has
``Y.shape[i] = X.shape[perm[i]]`` and ``Y[j_0, ..., j_{r-1}] = X[k]`` with ``k[perm[i]] = j_i``;
an omitted ``perm`` is the reversal ``(r-1, ..., 0)``. Every op here only moves elements, so each
rewrite is exact for any dtype.

1. ``Transpose(Transpose(X, p1), p2)`` becomes ``Transpose(X, q)``. Composing
   ``Y1 = Transpose(X, p1)`` and ``Y2 = Transpose(Y1, p2)``::

       Y2.shape[i] = Y1.shape[p2[i]] = X.shape[p1[p2[i]]]    so    q[i] = p1[p2[i]]

   and the elements follow the same index map. When ``q`` is the identity the second node is
   bypassed (its consumers read ``X``; a graph output keeps its name, see ``onnxopt.edit.bypass``)
   -- or, when bypassing would lose a graph output name, it stays as a Transpose with the
   identity ``perm`` reading ``X``. An omitted ``perm`` takes its rank from the other node's
   ``perm``; when both are omitted the two reversals cancel.

2. A Transpose moves through a ``Squeeze``/``Unsqueeze`` (``S``) to meet the Transposes reading
   ``S`` (or to vanish). Track where each axis of a result comes from: an axis of ``X``, or a new
   size-1 axis. ``Z = S(Transpose(X, p), A)`` (``A`` normalized: by the rank ``r`` of ``X`` for
   ``Squeeze``, by ``r + |A|`` for ``Unsqueeze``; spec of ``Squeeze``/``Unsqueeze`` 1-21):

   - ``Squeeze``: ``Z``'s axes are ``p[i]`` for the ``i`` not in ``A``, in order; the removed
     axes are ``D = {p[i] : i in A}`` of ``X`` (size 1 in ``X`` exactly when size 1 in the
     Transpose's output, so the original fails exactly when the rewrite does).
   - ``Unsqueeze``: ``Z``'s axis ``j`` is new for ``j in A``, and ``p[i]`` for the ``i``-th
     ``j`` not in ``A``.

   A reader ``W = Transpose(Z, p2)`` has ``src_W[k] = src_Z[p2[k]]``; any other reader takes
   ``Z`` itself (``p2`` the identity). Then ``W = Transpose(S'(X, B), q)`` with

   - ``Squeeze``: ``B = D``; ``U = Squeeze(X, D)`` keeps the axes ``K`` of ``X`` not in ``D`` in
     order, so ``q[k] = K.index(src_W[k])``.
   - ``Unsqueeze``: ``B = {k : src_W[k] new}``; ``U = Unsqueeze(X, B)`` has new axes at ``B``
     and the axes of ``X`` in order elsewhere, at positions ``P = sorted(complement of B)``, so
     ``q[k] = k`` for ``k in B`` (any new axis may stand for any other: all have size 1) and
     ``q[k] = P[src_W[k]]`` otherwise.

   Indexing follows the same map as the shapes, so the values agree. ``S`` is rewritten to
   ``S'(X, B)`` and each reader Transpose gets ``perm = q`` (bypassed when ``q`` is the
   identity), so the first Transpose disappears: applied only when it has no other reader, every
   reader Transpose of ``S`` computes the same ``B`` (always true for ``Squeeze``), and ``q`` is
   the identity for every reader that is not a Transpose (so the node count always drops). E.g.
   ``LSTM.Y [S,1,B,H] -> Transpose([2,1,0,3]) -> Squeeze([1]) -> Transpose([1,0,2])`` is
   ``Squeeze(Y, [1])`` (DTLN). Axes must be constant (attribute before opset 13, initializer
   input from 13); they are written in the opset's form, a new initializer from 13.

The second Transpose (or ``S``) is rewritten in place (it keeps its output tensor); the first one is
removed when nothing else reads it, otherwise it stays for its other consumers (rewrite 1).
``Transpose`` of an initializer is left to constant folding. Every graph and subgraph is handled;
the first node may be in an enclosing graph (the rewritten node then reads X from that outer scope).

Refused (stats ``refused``): ``graph_output_name_needs_rank`` (two omitted perms cancel, the second
output is a graph output that cannot be bypassed, and the identity ``perm`` to write needs the
rank); for rewrite 2: ``transpose_read_elsewhere`` (the first Transpose has another reader or is a
graph output), ``axes_unknown`` (axes not constant, or a Squeeze without axes), ``rank_unknown``
(an omitted ``perm`` of unknown rank), ``transpose_would_stay`` (a reader that is not a Transpose
would need one, or the readers need different ``B``).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.analyses import TensorTypes
from onnxopt.edit import bypass, drop_disconnected, drop_if_unused, int_list
from onnxopt.names import fresh_name
from onnxopt.ops import is_default_domain
from onnxopt.rewrite import consecutive_pairs

_SQUEEZES = ("Squeeze", "Unsqueeze")


def _compose(p1, p2) -> list[int] | None:
    """``q[i] = p1[p2[i]]``; an omitted perm is the reversal of the rank the other one gives. Two
    omitted perms give None: the identity of a rank that is not known."""
    if p1 is None and p2 is None:
        return None
    rank = len(p1 if p1 is not None else p2)
    p1 = [int(p) for p in p1] if p1 is not None else list(range(rank - 1, -1, -1))
    p2 = [int(p) for p in p2] if p2 is not None else list(range(rank - 1, -1, -1))
    return [p1[i] for i in p2]


def _perm(node: gs.Node, rank: int | None) -> list[int] | None:
    """The ``perm`` of a Transpose, the reversal of ``rank`` when omitted (None: rank unknown)."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    return None if rank is None else list(range(rank - 1, -1, -1))


def _sources(op: str, p: list[int], axes: list[int]) -> tuple[list[int | None], list[int]] | None:
    """Where each axis of ``op(Transpose(X, p), axes)`` comes from (an axis of ``X``, or None for a
    new one) and the axes of ``X`` a Squeeze removes; None for axes out of range or repeated
    (the original fails: left to onnxruntime)."""
    rank = len(p) + (len(axes) if op == "Unsqueeze" else 0)
    if not all(-rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        return None
    a = {ax % rank for ax in axes}
    if op == "Squeeze":
        return [p[i] for i in range(rank) if i not in a], sorted(p[i] for i in a)
    rest = iter(p)
    return [None if j in a else next(rest) for j in range(rank)], []


def _plan(op: str, src_z: list[int | None], removed: list[int], p2: list[int]
          ) -> tuple[list[int], list[int]]:
    """``(B, q)`` with ``Transpose(Z, p2) = Transpose(op(X, B), q)`` (rewrite 2 of the module
    docstring), ``src_z`` and ``removed`` from :func:`_sources`."""
    src_w = [src_z[j] for j in p2]
    if op == "Squeeze":
        kept = [x for x in range(len(src_z) + len(removed)) if x not in removed]
        return removed, [kept.index(s) for s in src_w]
    b = [k for k, s in enumerate(src_w) if s is None]
    positions = [k for k in range(len(src_w)) if k not in b]
    return b, [k if s is None else positions[s] for k, s in enumerate(src_w)]


def _set_axes(graph: gs.Graph, node: gs.Node, axes: list[int]) -> None:
    """Write ``axes`` in the node's own form: attribute, or a new int64 initializer input."""
    if "axes" in node.attrs:
        node.attrs["axes"] = axes
    else:
        name = fresh_name(graph, f"{node.outputs[0].name}_axes")
        node.inputs[1] = gs.Constant(name, np.array(axes, np.int64))


class _Owners:
    """The graph holding each node (for bypassing a reader in a subgraph)."""

    def __init__(self, graph: gs.Graph):
        self._owner = {id(n): g for g in iter_graphs(graph) for n in g.nodes}

    def __getitem__(self, node: gs.Node) -> gs.Graph:
        return self._owner[id(node)]


def _through_squeeze(g: gs.Graph, first: gs.Node, second: gs.Node, types: TensorTypes,
                     owners: _Owners) -> int | str:
    """Rewrite 2 for ``second(first(X))``, ``second`` a Squeeze/Unsqueeze of ``g``: the number of
    reader Transposes bypassed, or a refusal reason (nothing changed)."""
    mid, z = first.outputs[0], second.outputs[0]
    if len(mid.outputs) != 1 or any(t is mid for t in g.outputs):
        return "transpose_read_elsewhere"
    axes = int_list(second, "axes", 1)
    if not isinstance(axes, list):
        return "axes_unknown"
    x = first.inputs[0]
    p = _perm(first, len(first.attrs["perm"]) if "perm" in first.attrs else types.rank(x))
    if p is None:
        return "rank_unknown"
    sources = _sources(second.op, p, axes)
    if sources is None:
        return "axes_unknown"
    src_z, removed = sources
    identity = list(range(len(src_z)))
    readers = [n for n in z.outputs if n.op == "Transpose" and is_default_domain(n)
               and n.inputs[0] is z]
    others = len(z.outputs) > len(readers) or any(t is z for t in g.outputs)
    plans = [_plan(second.op, src_z, removed, _perm(n, len(src_z))) for n in readers]
    if others:
        plans.append(_plan(second.op, src_z, removed, identity))
        if plans[-1][1] != identity:
            return "transpose_would_stay"
    if not plans or len({tuple(b) for b, _ in plans}) != 1:
        return "transpose_would_stay"
    second.inputs[0] = x
    _set_axes(g, second, plans[0][0])
    bypassed = 0
    for reader, (_, q) in zip(readers, plans):
        if q == identity and bypass(owners[reader], reader, z, reader.outputs[0]):
            bypassed += 1
        else:
            reader.attrs["perm"] = q
    return bypassed


@register
class MergeTranspose(Pass):
    name = "merge_transpose"
    description = ("Merge consecutive Transposes into one (or none when they cancel), also "
                   "across a Squeeze or Unsqueeze.")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = cancelled = removed = through = 0
        refused: collections.Counter[str] = collections.Counter()
        types = ctx.analyses.get(TensorTypes)
        owners = _Owners(graph)
        for g, fg, first, second in consecutive_pairs(graph, ("Transpose",) + _SQUEEZES):
            if first.op != "Transpose":
                continue
            x = first.inputs[0]
            if second.op in _SQUEEZES:
                done = _through_squeeze(g, first, second, types, owners)
                if isinstance(done, str):
                    refused[done] += 1
                    continue
                through += 1
                cancelled += done
            else:
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
        stats = {"merged": merged, "cancelled": cancelled, "through_squeeze": through,
                 "nodes_removed": removed + cancelled, "refused": dict(refused)}
        return PassResult(merged + cancelled + through > 0, stats)
