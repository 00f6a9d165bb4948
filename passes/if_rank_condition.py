"""Rank tests of If outputs: ``Equal(Size(Shape(y)), k)``, where ``y`` is an If output whose two
branches give it different static ranks, becomes the If's condition (or its negation, or a
constant).

ONNX spec: ``Shape`` (opsets 1-21) is the 1-D int64 tensor of its input's dims; from opset 15 the
attributes ``start`` and ``end`` select dims ``[start, end)``, a negative value counting from the
back, both clamped to ``[0, r]`` for an input of rank ``r``, an empty slice when ``start >= end``.
``Size`` (opsets 1-21) is the int64 scalar count of its input's elements. So ``Size(Shape(y))`` is
``len(r) = max(0, clamp(end) - clamp(start))``, plain ``r`` without the attributes. ``If``
(opsets 1-21): output ``j`` is output ``j`` of ``then_branch`` when the condition ``c`` (one bool)
is true, of ``else_branch`` otherwise. With ``r_t`` and ``r_e`` the ranks of the two branch
outputs ``j``, and ``k`` an initializer of one element (``Equal`` broadcasts; its output has
``k``'s shape)::

    Equal(Size(Shape(y)), k)  ==  c        if len(r_t) == k != len(r_e)
                              ==  Not(c)   if len(r_e) == k != len(r_t)
                              ==  false    if neither is k

for every run, whatever the dims. ``Equal(k, Size(Shape(y)))`` is the same. torch exports an LSTM
whose input rank is dynamic with ``rank(y) == 2`` tests of this kind, where ``y`` is the If that
squeezed the input or not: the tests become that If's own condition, and the Ifs they choose can
then be fused with it (``fuse_if``).

The ranks come from ``onnxopt.analyses.TensorTypes`` (ONNX shape inference from graph inputs,
initializers and op semantics; declared value_info and graph output shapes are ignored, since
real exports get them wrong). ``c`` replaces the Equal's output where every reader is an If
condition (one element is all an If asks) or where ``c``'s static shape is the Equal's; ``Not(c)``
takes the Equal's place under the same rule (``fold_not_into_if`` then removes it when only Ifs
read it); ``false`` is an initializer of ``k``'s shape. The Shape and Size go when nothing else
reads them.

Every graph and subgraph is handled; the Shape and Size may be in an enclosing graph.

Statistics: ``rewritten``, ``by_kind`` per replacement (``condition``, ``negated condition``,
``constant``), and ``refused`` per reason: either branch's rank unknown (``branch rank
unknown``), ``len(r_t) == len(r_e)`` (``ranks equal``: the Equal does not depend on ``c``; when
the ranks are equal the rank of ``y`` is static and ``fold_constants`` folds the test), a
malformed If (``malformed branch``), the Equal's output is a graph output (``equal output is a
graph output``), and ``c``'s shape is not known to be the Equal's while something other than an
If condition reads it (``condition shape differs``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.edit import constant_value, if_branches, input_slots, replace_uses
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    """The default-domain ``op`` node writing ``t``, or None."""
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    return node if node.op == op and is_default_domain(node) else None


def _match(equal: gs.Node) -> tuple[gs.Node, gs.Node, gs.Node, np.ndarray] | None:
    """``(size, shape, if_node, k)`` when ``equal`` is ``Equal(Size(Shape(y)), k)`` (either
    order) with ``y`` an If output and ``k`` an initializer of one element, else None."""
    if len(equal.inputs) != 2 or len(equal.outputs) != 1:
        return None
    for probe, other in (equal.inputs, reversed(equal.inputs)):
        size, k = _producer(probe, "Size"), constant_value(other)
        if size is None or k is None or np.asarray(k).size != 1 or not size.inputs:
            continue
        shape = _producer(size.inputs[0], "Shape")
        if shape is None or not shape.inputs:
            continue
        if_node = _producer(shape.inputs[0], "If")
        if if_node is not None and if_node.inputs:
            return size, shape, if_node, np.asarray(k)
    return None


def _shape_length(shape: gs.Node, rank: int) -> int:
    """``Size(Shape(y))`` for ``y`` of rank ``rank``, with Shape's ``start``/``end`` (opset 15)."""
    def clamp(axis: int) -> int:
        return min(max(axis + rank if axis < 0 else axis, 0), rank)

    start = clamp(int(shape.attrs.get("start", 0)))
    end = clamp(int(shape.attrs.get("end", rank)))
    return max(0, end - start)


def _branch_lengths(types: TensorTypes, shape: gs.Node, if_node: gs.Node
                    ) -> tuple[int, int] | Refusal:
    """``Size(Shape(y))`` in the then and else branch, or why it is not known."""
    j = next(i for i, t in enumerate(if_node.outputs) if t is shape.inputs[0])
    branches = if_branches(if_node)
    if branches is None:
        return refuse("malformed branch")
    lengths = []
    for branch in branches:
        rank = types.rank(branch.outputs[j])
        if rank is None:
            return refuse("branch rank unknown")
        lengths.append(_shape_length(shape, rank))
    if lengths[0] == lengths[1]:
        return refuse("ranks equal")
    return lengths[0], lengths[1]


def _only_if_conditions(t: gs.Tensor) -> bool:
    return all(node.op == "If" and is_default_domain(node) and i == 0
               for node, i in input_slots(t))


def _refusal(equal: gs.Node, c: gs.Tensor, lengths: tuple[int, int], k: np.ndarray,
             scope: Scope) -> Refusal | None:
    """Why the Equal's output cannot be replaced, once the branch lengths are known."""
    e = equal.outputs[0]
    if scope.usedef.is_output(e):
        return refuse("equal output is a graph output")
    if int(k.reshape(-1)[0]) in lengths and not _only_if_conditions(e) \
            and scope.types.static_shape(c) != k.shape:
        return refuse("condition shape differs")
    return None


def _rewrite(scope: Scope, equal: gs.Node, c: gs.Tensor, lengths: tuple[int, int],
             k: np.ndarray) -> str:
    """Replace the Equal's output (see the module docstring); return which replacement."""
    e, value = equal.outputs[0], int(k.reshape(-1)[0])
    if value == lengths[1]:
        equal.op, equal.attrs = "Not", {}
        equal.inputs.clear()
        equal.inputs.append(c)
        return "negated condition"
    if value == lengths[0]:
        replace_uses(e, c)
        kind = "condition"
    else:
        replace_uses(e, gs.Constant(scope.fresh(f"{e.name}_false"), np.zeros(k.shape, bool)))
        kind = "constant"
    equal.inputs.clear()
    equal.outputs.clear()
    return kind


@register
class IfRankCondition(RewritePass):
    name = "if_rank_condition"
    description = ("Replace Equal(Size(Shape(y)), k), y an If output whose branches have "
                   "different static ranks, by the If's condition, its negation or a constant.")
    ops = ("Equal",)

    def match(self, node: gs.Node, scope: Scope
              ) -> tuple[gs.Node, gs.Node, gs.Node, np.ndarray, tuple[int, int]] \
            | Refusal | None:
        found = _match(node)
        if found is None:
            return None
        size, shape, if_node, k = found
        lengths = _branch_lengths(scope.types, shape, if_node)
        if isinstance(lengths, Refusal):
            return lengths
        reason = _refusal(node, if_node.inputs[0], lengths, k, scope)
        return reason if reason is not None else (size, shape, if_node, k, lengths)

    def rewrite(self, node: gs.Node,
                match: tuple[gs.Node, gs.Node, gs.Node, np.ndarray, tuple[int, int]],
                scope: Scope) -> str:
        size, shape, if_node, k, lengths = match
        kind = _rewrite(scope, node, if_node.inputs[0], lengths, k)
        for n in (size, shape):
            scope.drop_if_unused(n)
        return kind
