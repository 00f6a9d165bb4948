"""Conv + per-channel affine fusion: fold a ``Mul``, ``Div``, ``Add`` or ``Sub`` by a constant that
follows a Conv or ConvTranspose into the Conv's weights and bias.

With ``Y = Conv(x, W) + B`` (B = 0 when absent) and a constant ``c`` that is the same for every
position of an output channel ``o`` (ONNX spec, Conv/ConvTranspose and the element-wise ops with
multidirectional broadcasting)::

    Y · c[o] = Conv(x, W · c) + B · c          (Mul, either operand order)
    Y / c[o] = Conv(x, W / c) + B / c          (Div, Y on the left, every c ≠ 0)
    Y + c[o] = Conv(x, W)     + (B + c)        (Add, either operand order)
    Y − c[o] = Conv(x, W)     + (B − c)        (Sub, Y on the left)

where ``W · c`` scales the output-channel axis: axis 0 of Conv's ``W[M, C/group, k...]``; for
ConvTranspose's ``W[C, M/group, k...]`` output channel ``o = g · (M/group) + m`` is column ``m`` of
group ``g``'s rows, so ``W`` is viewed as ``[group, C/group, M/group, k...]`` and ``c`` as
``[group, 1, M/group, 1...]``.

``c`` is per-channel when broadcasting it against ``Y`` (rank r = rank of W, channel axis 1) keeps
``Y``'s shape: ``rank(c) <= r`` and, aligned from the right, every dim of ``c`` is 1 except the
channel dim, which is 1 or M (scalar, ``[1]``, ``[M, 1, 1]``, ``[1, M, 1, 1]``...). Its dtype
must equal the weight's, so the output dtype is unchanged. Arithmetic is float64, cast back to the
weight dtype; new initializers are always created. The Conv then writes the folded node's output
tensor, so that name survives. Works in every subgraph.

Matched from the Mul/Div/Add/Sub, one operand of which a Conv computes; the graph is walked in
topological order, so a chain (Mul then Add) folds in one run.

Refused (counted under ``refused`` by reason): the Conv output has another reader or is a graph
output; the op is in another scope; W, B or c is not an initializer or is a graph input; dtypes
differ or are not float; c does not broadcast per channel; c is not finite; a Div by zero; the
constant is the left operand of Sub or Div; the folded weight or bias overflows the dtype
(``onnxopt.passes._conv.overflows``).

Statistics: ``rewritten`` (ops folded), ``by_kind`` (per op: ``Mul``, ``Div``, ``Add``, ``Sub``),
``refused``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal
from onnxopt.ops import conv_output_channels
from onnxopt.pass_manager import register
from onnxopt.passes._conv import (
    absorb_into_conv, absorb_refusal, conv_bias, conv_producing, per_channel,
    scale_conv_output_channels)
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


def _conv_operand(op: gs.Node) -> gs.Node | None:
    """The Conv computing an operand of ``op`` (the left one when both are), or None."""
    for t in op.inputs[:2]:
        conv = conv_producing(t)
        if conv is not None:
            return conv
    return None


def _affine_constant(op: gs.Node, conv: gs.Node) -> Refusal | np.ndarray:
    """Why ``op`` cannot be folded into ``conv``, or its constant as a vector of M."""
    y = conv.outputs[0]
    if len(op.inputs) != 2 or len(op.outputs) != 1:
        return refuse("unexpected arity")
    right = op.inputs[0] is y
    if not right and op.op in ("Sub", "Div"):
        return refuse(f"constant is the left operand of {op.op}")
    c = op.inputs[1] if right else op.inputs[0]
    reason = constant_refusal(c, "constant")
    if reason:
        return refuse(reason)
    if np.dtype(c.dtype) != np.dtype(conv.inputs[1].dtype):
        return refuse("dtypes differ")
    vector = per_channel(np.asarray(c.values), conv.inputs[1].values.ndim,
                         conv_output_channels(conv))
    if vector is None:
        return refuse("constant is not per-channel")
    if not np.isfinite(vector).all():
        return refuse("constant is not finite")
    if op.op == "Div" and not vector.all():
        return refuse("division by zero")
    return vector


@register
class FuseConvAffine(RewritePass):
    name = "fuse_conv_affine"
    description = "Fold Mul/Div/Add/Sub by a per-channel constant into the preceding Conv."
    ops = ("Mul", "Div", "Add", "Sub")
    sorted_walk = True

    def match(self, op: gs.Node, scope: Scope) -> Refusal | tuple[gs.Node, np.ndarray] | None:
        conv = _conv_operand(op)
        if conv is None:
            return None
        reason = absorb_refusal(conv, op, scope)
        if reason:
            return refuse(reason)
        vector = _affine_constant(op, conv)
        return vector if isinstance(vector, Refusal) else (conv, vector)

    def rewrite(self, op: gs.Node, match: tuple[gs.Node, np.ndarray], scope: Scope
                ) -> str | Refusal:
        conv, c = match
        w, b = None, conv_bias(conv)  # Add and Sub keep the weight
        if op.op == "Mul":
            w, b = scale_conv_output_channels(conv, c), b * c
        elif op.op == "Div":
            w, b = scale_conv_output_channels(conv, 1.0 / c), b / c
        elif op.op == "Add":
            b = b + c
        else:
            b = b - c
        if not absorb_into_conv(conv, op, w, b, c, fresh=scope.fresh):
            return refuse("folded weights overflow the dtype")
        return op.op
