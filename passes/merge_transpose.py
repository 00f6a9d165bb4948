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
``Transpose`` of an initializer is left to constant folding. Every graph and subgraph is handled,
each in topological order (a chain is merged from its start); the first node may be in an
enclosing graph (the rewritten node then reads X from that outer scope).

Statistics: ``rewritten`` (pairs rewritten), ``by_kind`` (``merged``: one Transpose left;
``cancelled``: the pair bypassed; ``through Squeeze``, ``through Unsqueeze``: rewrite 2), and
``refused`` per reason: ``graph output name needs rank`` (two omitted perms cancel, the second
output is a graph output that cannot be bypassed, and the identity ``perm`` to write needs the
rank); for rewrite 2: ``transpose read elsewhere`` (the first Transpose has another reader or is
a graph output), ``axes unknown`` (axes not constant, or a Squeeze without axes), ``rank
unknown`` (an omitted ``perm`` of unknown rank), ``transpose would stay`` (a reader that is not
a Transpose would need one, or the readers need different ``B``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import bypass, int_list
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, pair_start, refuse

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


def _set_axes(scope: Scope, node: gs.Node, axes: list[int]) -> None:
    """Write ``axes`` in the node's own form: attribute, or a new int64 initializer input."""
    if "axes" in node.attrs:
        node.attrs["axes"] = axes
    else:
        name = scope.fresh(f"{node.outputs[0].name}_axes")
        node.inputs[1] = gs.Constant(name, np.array(axes, np.int64))


@dataclass
class _ThroughSqueeze:
    """Rewrite 2, planned: ``S`` is to read ``X`` with ``axes`` (``B``); each reader Transpose
    gets its ``q`` from ``perms``."""

    axes: list[int]
    readers: list[gs.Node]
    perms: list[list[int]]


def _plan_through_squeeze(first: gs.Node, second: gs.Node, scope: Scope
                          ) -> _ThroughSqueeze | Refusal:
    """Rewrite 2 for ``second(first(X))``, ``second`` a Squeeze/Unsqueeze, or a refusal."""
    mid, z = first.outputs[0], second.outputs[0]
    if len(mid.outputs) != 1 or scope.is_output(mid):
        return refuse("transpose read elsewhere")
    axes = int_list(second, "axes", 1)
    if not isinstance(axes, list):
        return refuse("axes unknown")
    x = first.inputs[0]
    p = _perm(first, len(first.attrs["perm"]) if "perm" in first.attrs else scope.types.rank(x))
    if p is None:
        return refuse("rank unknown")
    sources = _sources(second.op, p, axes)
    if sources is None:
        return refuse("axes unknown")
    src_z, removed = sources
    identity = list(range(len(src_z)))
    readers = [n for n in z.outputs if n.op == "Transpose" and is_default_domain(n)
               and n.inputs[0] is z]
    others = len(z.outputs) > len(readers) or scope.is_output(z)
    plans = [_plan(second.op, src_z, removed, _perm(n, len(src_z))) for n in readers]
    if others:
        plans.append(_plan(second.op, src_z, removed, identity))
        if plans[-1][1] != identity:
            return refuse("transpose would stay")
    if not plans or len({tuple(b) for b, _ in plans}) != 1:
        return refuse("transpose would stay")
    return _ThroughSqueeze(plans[0][0], readers, [q for _, q in plans[:len(readers)]])


@register
class MergeTranspose(RewritePass):
    name = "merge_transpose"
    description = ("Merge consecutive Transposes into one (or none when they cancel), also "
                   "across a Squeeze or Unsqueeze.")
    ops = ("Transpose",) + _SQUEEZES
    sorted_walk = True

    def match(self, node: gs.Node, scope: Scope
              ) -> tuple[gs.Node, list[int] | None | _ThroughSqueeze] | Refusal | None:
        first = pair_start(node, scope, ("Transpose",))
        if first is None:
            return None
        if node.op in _SQUEEZES:
            plan = _plan_through_squeeze(first, node, scope)
            return plan if isinstance(plan, Refusal) else (first, plan)
        return first, _compose(first.attrs.get("perm"), node.attrs.get("perm"))

    def rewrite(self, node: gs.Node, match: tuple[gs.Node, list[int] | None | _ThroughSqueeze],
                scope: Scope) -> str | Refusal:
        first, plan = match
        x = first.inputs[0]
        if isinstance(plan, _ThroughSqueeze):
            z = node.outputs[0]
            node.inputs[0] = x
            _set_axes(scope, node, plan.axes)
            for reader, q in zip(plan.readers, plan.perms):
                if not (q == sorted(q) and bypass(scope.usedef.owner(reader), reader, z,
                                                  reader.outputs[0])):
                    reader.attrs["perm"] = q
            kind = f"through {node.op}"
        elif (plan is None or plan == sorted(plan)) and bypass(scope.graph, node, x,
                                                                node.outputs[0]):
            kind = "cancelled"
        elif plan is None:
            return refuse("graph output name needs rank")
        else:
            node.inputs[0] = x
            node.attrs["perm"] = plan
            kind = "merged"
        scope.drop_if_unused(first)
        return kind
