"""Reshape merging: a chain of shape-only ops becomes one op.

Two rewrites, both about ops that move no element (row-major order is kept; ONNX spec of
``Reshape`` opsets 5-21, ``Flatten`` 1-21, ``Squeeze``/``Unsqueeze`` 1-21):

1. ``Reshape(R(X), s)`` with ``R`` one of ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``
   becomes ``Reshape(X, s)``. ``R`` keeps the elements and their order, so the outer Reshape's
   result depends only on the element count (the same for ``X`` and ``R(X)``) and on ``s`` -- except
   that an entry ``s[i] = 0`` with ``allowzero = 0`` copies dimension ``i`` *of ``R(X)``*. ``s`` must
   be an initializer; ``-1`` entries are kept (the element count they divide is unchanged); a ``0``
   entry with ``allowzero = 0`` is replaced by the intermediate's dimension ``i`` when shape
   inference knows it and it is positive (the new shape is a new initializer), else the node is
   refused; with ``allowzero = 1`` a ``0`` is a literal zero and is kept.

2. ``Squeeze``/``Unsqueeze`` pairs become one op with combined axes. With ``r`` the rank of ``X``,
   axes normalized (a negative axis of ``Squeeze`` counts from ``r``, of ``Unsqueeze`` from the
   *output* rank), and ``nth(E, k)`` the k-th (from 0) non-negative integer not in the set ``E``:

   - ``Squeeze(Squeeze(X, a), b)   = Squeeze(X, a ∪ {nth(a, k) : k in b})``
   - ``Unsqueeze(Unsqueeze(X, a), b) = Unsqueeze(X, b ∪ {nth(b, k) : k in a})``
   - ``Unsqueeze(Squeeze(X, a), b) = X`` when ``a = b`` (the same dims are removed and put back)
   - ``Squeeze(Unsqueeze(X, a), b) = Unsqueeze(X, {k - |{j in b : j < k}| : k in a \\ b})`` when
     ``b ⊆ a`` (only inserted dims are removed again), ``= X`` when ``a = b``.

   A ``Squeeze`` without axes (all size-1 dims) gets explicit axes when the input shape is fully
   static. The result is written in the opset's form: ``axes`` attribute below opset 13, an int64
   ``axes`` initializer input from 13 on. An identity result bypasses the second node (a graph
   output keeps its name, see ``passes._util.bypass``).

In both rewrites the second node is rewritten in place (it keeps its output tensor), new constants
are new initializers, and the first node is removed when nothing else reads it. Ranks and shapes
come from ONNX shape inference of the whole model, subgraphs included (``passes._util.TensorTypes``;
never from declared value_info).

Refused (stats ``refused``): ``shape_not_constant``, ``zero_copies_unknown_dim``,
``rank_unknown`` (negative axes whose rank is not known), ``axes_unknown`` (axes not an initializer,
or an axis-less Squeeze of a shape not fully static), ``not_one_op`` (a Squeeze/Unsqueeze pair that
is neither an identity nor one op, e.g. ``Squeeze(Unsqueeze(X, [0]), [1])``),
``graph_output_name_lost`` (an identity pair whose output is a graph output that cannot be
bypassed).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph import iter_graphs, opset_version
from optimizer.pass_manager import Pass, PassContext, PassResult, register
from passes._util import (
    consecutive_pairs,
    TensorTypes,
    bypass,
    constant_value,
    drop_disconnected,
    drop_if_unused,
    fresh_name,
)

_SHAPE_ONLY = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
_SQUEEZES = ("Squeeze", "Unsqueeze")


def _nth(excluded: set[int], k: int) -> int:
    """The k-th (from 0) non-negative integer not in ``excluded``."""
    i = -1
    for _ in range(k + 1):
        i += 1
        while i in excluded:
            i += 1
    return i


def _raw_axes(node: gs.Node) -> list[int] | None | str:
    """The node's axes as written, None when omitted, ``"unknown"`` when not an initializer."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) < 2 or node.inputs[1].is_empty():
        return None
    value = constant_value(node.inputs[1])
    return "unknown" if value is None else [int(a) for a in np.ravel(value)]


def _normalized_axes(node: gs.Node, rank: int | None, shape: tuple | None) -> set[int] | str:
    """Non-negative axes of a Squeeze/Unsqueeze whose input has ``rank``, or a refusal reason."""
    axes = _raw_axes(node)
    if axes == "unknown":
        return "axes_unknown"
    if axes is None:  # Squeeze of every size-1 dim (Unsqueeze requires axes)
        if node.op != "Squeeze" or shape is None or any(d is None for d in shape):
            return "axes_unknown"
        return {i for i, d in enumerate(shape) if d == 1}
    if all(a >= 0 for a in axes):
        return set(axes)
    if rank is None:
        return "rank_unknown"
    out_rank = rank + len(axes) if node.op == "Unsqueeze" else rank
    return {a % out_rank for a in axes}


def _combine(first: gs.Node, second: gs.Node, types: TensorTypes
             ) -> tuple[str | None, list[int]] | str:
    """The op and axes equivalent to ``second(first(X))`` (op None: the identity), or a reason."""
    x, mid = first.inputs[0], second.inputs[0]
    if first.op == "Squeeze" and second.op == "Unsqueeze" and _raw_axes(first) == _raw_axes(second) \
            and isinstance(_raw_axes(first), list):
        return None, []  # same length, so negative axes normalize against the same rank
    needs_rank = any(isinstance(a, list) and min(a, default=0) < 0 or a is None
                     for a in (_raw_axes(first), _raw_axes(second)))
    rank = types.rank(x) if needs_rank else None
    a = _normalized_axes(first, rank, types.shape(x) if needs_rank else None)
    if isinstance(a, str):
        return a
    mid_rank = None if rank is None else rank + len(a) * (1 if first.op == "Unsqueeze" else -1)
    b = _normalized_axes(second, mid_rank, types.shape(mid) if needs_rank else None)
    if isinstance(b, str):
        return b
    if first.op == second.op == "Squeeze":
        return "Squeeze", sorted(a | {_nth(a, k) for k in b})
    if first.op == second.op == "Unsqueeze":
        return "Unsqueeze", sorted(b | {_nth(b, k) for k in a})
    if first.op == "Squeeze":
        return (None, []) if a == b else "not_one_op"
    if not b <= a:
        return "not_one_op"
    rest = sorted(k - sum(j < k for j in b) for k in a - b)
    return ("Unsqueeze", rest) if rest else (None, [])


def _set_axes(graph: gs.Graph, node: gs.Node, op: str, x: gs.Tensor, axes: list[int],
              as_input: bool) -> None:
    node.op = op
    node.inputs.clear()
    node.attrs.pop("axes", None)
    if as_input:
        name = fresh_name(graph, f"{node.outputs[0].name}_axes")
        node.inputs.extend([x, gs.Constant(name, np.array(axes, np.int64))])
    else:
        node.inputs.append(x)
        node.attrs["axes"] = axes


def _resolved_shape(second: gs.Node, types: TensorTypes) -> np.ndarray | None | str:
    """The outer Reshape's target shape with its 0 entries resolved (None: no 0 to resolve), or a
    refusal reason."""
    target = constant_value(second.inputs[1])
    if target is None:
        return "shape_not_constant"
    target = np.asarray(target)
    if second.attrs.get("allowzero", 0) or not (target == 0).any():
        return None
    mid_shape = types.shape(second.inputs[0])
    resolved = target.copy()
    for i in np.flatnonzero(target == 0):
        if mid_shape is None or i >= len(mid_shape) or not mid_shape[i]:
            return "zero_copies_unknown_dim"
        resolved[i] = mid_shape[i]
    return resolved


@register
class MergeReshape(Pass):
    name = "merge_reshape"
    description = ("Merge Reshape/Flatten/Squeeze/Unsqueeze feeding a Reshape, and Squeeze/"
                   "Unsqueeze pairs, into one op.")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = cancelled = removed = 0
        refused: collections.Counter[str] = collections.Counter()
        types = TensorTypes.of(graph, ctx)
        axes_as_input = opset_version(graph) >= 13
        for g, fg, first, second in consecutive_pairs(graph, ("Reshape",) + _SQUEEZES):
            if first.op not in (_SHAPE_ONLY if second.op == "Reshape" else _SQUEEZES):
                continue
            x = first.inputs[0]
            if second.op == "Reshape":
                target = _resolved_shape(second, types)
                if isinstance(target, str):
                    refused[target] += 1
                    continue
                second.inputs[0] = x
                if target is not None:
                    second.inputs[1] = gs.Constant(
                        fresh_name(graph, f"{second.outputs[0].name}_shape"), target)
                merged += 1
            else:
                plan = _combine(first, second, types)
                if isinstance(plan, str):
                    refused[plan] += 1
                    continue
                op, axes = plan
                if op is None:
                    if not bypass(g, second, x, second.outputs[0]):
                        refused["graph_output_name_lost"] += 1
                        continue
                    cancelled += 1
                else:
                    _set_axes(graph, second, op, x, axes, axes_as_input)
                    merged += 1
            removed += drop_if_unused(fg, first)
        for g in iter_graphs(graph):
            drop_disconnected(g)
        stats = {"merged": merged, "cancelled": cancelled, "nodes_removed": removed + cancelled,
                 "refused": dict(refused)}
        return PassResult(merged + cancelled > 0, stats)
