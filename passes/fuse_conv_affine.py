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
tensor, so that name survives. A chain (Mul then Add) folds in one run. Works in every subgraph.

Refused (counted under ``skipped`` by reason): the Conv output has another reader or is a graph
output; the op is in another scope; W, B or c is not an initializer or is a graph input; dtypes
differ or are not float; c does not broadcast per channel; c is not finite; a Div by zero; the
constant is the left operand of Sub or Div.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import constant_refusal
from onnxopt.ops import conv_output_channels, is_default_domain
from onnxopt.passes._conv import (
    absorb_into_conv, conv_bias, conv_weight_refusal, per_channel, scale_conv_output_channels)

_CONV_OPS = ("Conv", "ConvTranspose")
_AFFINE_OPS = ("Mul", "Div", "Add", "Sub")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def _affine_refusal(op: gs.Node, conv: gs.Node
                    ) -> tuple[str | None, np.ndarray | None]:
    """Why ``op`` cannot be folded into ``conv`` (or None) and its constant as a vector of M."""
    y = conv.outputs[0]
    if len(op.inputs) != 2 or len(op.outputs) != 1:
        return "unexpected arity", None
    if op.inputs[0] is y and op.inputs[1] is y:
        return "constant is not an initializer", None
    right = op.inputs[0] is y
    if not right and op.op in ("Sub", "Div"):
        return f"constant is the left operand of {op.op}", None
    c = op.inputs[1] if right else op.inputs[0]
    reason = constant_refusal(c, "constant")
    if reason:
        return reason, None
    if np.dtype(c.dtype) != np.dtype(conv.inputs[1].dtype):
        return "dtypes differ", None
    vector = per_channel(np.asarray(c.values), conv.inputs[1].values.ndim,
                         conv_output_channels(conv))
    if vector is None:
        return "constant is not per-channel", None
    if not np.isfinite(vector).all():
        return "constant is not finite", None
    if op.op == "Div" and not vector.all():
        return "division by zero", None
    return None, vector


@register
class FuseConvAffine(Pass):
    name = "fuse_conv_affine"
    description = "Fold Mul/Div/Add/Sub by a per-channel constant into the preceding Conv."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused, skipped = Counter(), Counter()
        for g in iter_graphs(graph):
            in_graph = {id(n) for n in g.nodes}
            for conv in list(g.nodes):
                if conv.op not in _CONV_OPS or not is_default_domain(conv) or not conv.outputs:
                    continue
                while True:  # a chain such as Mul then Add folds in one run
                    y = conv.outputs[0]
                    ops = [n for n in y.outputs if n.op in _AFFINE_OPS and is_default_domain(n)]
                    if not ops:
                        break
                    reason, vector = self._refusal(conv, ops[0], g, in_graph)
                    if reason:
                        skipped[reason] += 1
                        break
                    if not self._fuse(graph, conv, ops[0], vector):
                        skipped["folded weights overflow the dtype"] += 1
                        break
                    fused[ops[0].op] += 1
            g.nodes = [n for n in g.nodes if n.outputs]
        stats = {"fused": sum(fused.values()), "by_op": dict(fused)}
        if skipped:
            stats["skipped"] = dict(skipped)
        return PassResult(bool(fused), stats)

    @staticmethod
    def _refusal(conv: gs.Node, op: gs.Node, g: gs.Graph, in_graph: set[int]
                 ) -> tuple[str | None, np.ndarray | None]:
        y = conv.outputs[0]
        if len(y.outputs) != 1:
            return "conv output has other consumers", None
        if any(t is y for t in g.outputs):
            return "conv output is a graph output", None
        if id(op) not in in_graph:
            return f"{op.op} in another scope", None
        reason = conv_weight_refusal(conv)
        if reason:
            return reason, None
        return _affine_refusal(op, conv)

    @staticmethod
    def _fuse(graph: gs.Graph, conv: gs.Node, op: gs.Node, c: np.ndarray) -> bool:
        """Fold ``op`` (by ``c``) into ``conv``; False (nothing changed) when the result
        overflows."""
        w = np.asarray(conv.inputs[1].values, dtype=np.float64)
        b = conv_bias(conv)
        if op.op == "Mul":
            w, b = scale_conv_output_channels(conv, c), b * c
        elif op.op == "Div":
            w, b = scale_conv_output_channels(conv, 1.0 / c), b / c
        elif op.op == "Add":
            b = b + c
        else:
            b = b - c
        return absorb_into_conv(graph, conv, op, w if op.op in ("Mul", "Div") else None, b, c)
