"""Conv + BatchNormalization fusion: fold an inference-mode BatchNormalization into the weights and
bias of the Conv or ConvTranspose that feeds it.

BatchNormalization (ONNX spec, opsets 1-15, inference form) computes per channel ``o``::

    Y[:, o] = γ[o] · (X[:, o] − μ[o]) / √(σ²[o] + ε) + β[o]

With ``s = γ / √(σ² + ε)`` and ``X = Conv(x, W) + B`` (B = 0 when absent) this is again a Conv
(onnxscript rewriter, ``rules/common/_fuse_batchnorm.py``)::

    W' = W · s  (along the output-channel axis),   B' = (B − μ) · s + β

The output-channel axis (ONNX spec, Conv and ConvTranspose):

- Conv ``W[M, C/group, k1, ...]``: axis 0, whatever the group.
- ConvTranspose ``W[C, M/group, k1, ...]``: output channel ``o = g · (M/group) + m`` is column
  ``m`` of the rows of group ``g``; so ``W`` is viewed as ``[group, C/group, M/group, k1, ...]``
  and multiplied by ``s`` viewed as ``[group, 1, M/group, 1, ...]``.

Arithmetic is float64, the result is cast to the weight dtype. New initializers are always created
(the old ones become dead, and stay right for any other reader). The Conv then writes the BN's
output tensor, so that name survives (it may be a graph output). Works in every subgraph.

Refused (counted under ``skipped`` by reason): the Conv output has another reader or is a graph
output; the Conv and BN are in different scopes; W, B, γ, β, μ or σ² is not an initializer or is
an initializer that the model also declares as a graph input (a caller may override it); their
dtypes differ or are not float; a parameter's shape is not ``[M]``; the BN is in training mode
(``training_mode=1``, ``is_test=0``, ``spatial=0``, or a used mean/variance output).
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
    absorb_into_conv, conv_bias, conv_weight_refusal, scale_conv_output_channels)

_CONV_OPS = ("Conv", "ConvTranspose")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
_DEFAULT_EPSILON = 1e-5


def _bn_refusal(bn: gs.Node, conv: gs.Node, g: gs.Graph) -> str | None:
    """Why ``bn`` cannot be folded into ``conv``, or None."""
    if len(bn.inputs) != 5:
        return "batchnorm has not 5 inputs"
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("is_test", 1) == 0:
        return "batchnorm in training mode"
    if bn.attrs.get("spatial", 1) == 0:
        return "batchnorm not spatial"
    graph_outputs = {id(t) for t in g.outputs}
    if any(not t.is_empty() and (t.outputs or id(t) in graph_outputs) for t in bn.outputs[1:]):
        return "batchnorm in training mode"
    m = conv_output_channels(conv)
    dtype = np.dtype(conv.inputs[1].dtype)
    for t, what in zip(bn.inputs[1:], ("scale", "bias", "mean", "variance")):
        reason = constant_refusal(t, what)
        if reason:
            return reason
        if np.dtype(t.dtype) != dtype:
            return "dtypes differ"
        if tuple(t.shape) != (m,):
            return f"{what} shape is not [M]"
    return None


@register
class FuseConvBn(Pass):
    name = "fuse_conv_bn"
    description = "Fold inference BatchNormalization into the preceding Conv/ConvTranspose."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        fused, skipped = 0, Counter()
        for g in iter_graphs(graph):
            in_graph = {id(n) for n in g.nodes}
            for conv in list(g.nodes):
                if conv.op not in _CONV_OPS or not is_default_domain(conv) or not conv.outputs:
                    continue
                y = conv.outputs[0]
                bns = [n for n in y.outputs
                       if n.op == "BatchNormalization" and is_default_domain(n)]
                if not bns:
                    continue
                reason = self._refusal(conv, bns[0], g, in_graph)
                if reason:
                    skipped[reason] += 1
                    continue
                if not self._fuse(graph, conv, bns[0]):
                    skipped["folded weights overflow the dtype"] += 1
                    continue
                fused += 1
            g.nodes = [n for n in g.nodes if n.outputs]
        stats = {"fused": fused}
        if skipped:
            stats["skipped"] = dict(skipped)
        return PassResult(fused > 0, stats)

    @staticmethod
    def _refusal(conv: gs.Node, bn: gs.Node, g: gs.Graph, in_graph: set[int]) -> str | None:
        y = conv.outputs[0]
        if len(y.outputs) != 1 or bn.inputs[0] is not y:
            return "conv output has other consumers"
        if any(t is y for t in g.outputs):
            return "conv output is a graph output"
        if id(bn) not in in_graph:
            return "batchnorm in another scope"
        return conv_weight_refusal(conv) or _bn_refusal(bn, conv, g)

    @staticmethod
    def _fuse(graph: gs.Graph, conv: gs.Node, bn: gs.Node) -> bool:
        """Fold ``bn`` into ``conv``; False (nothing changed) when the result overflows."""
        gamma, beta, mean, var = (np.asarray(t.values, dtype=np.float64) for t in bn.inputs[1:])
        eps = float(bn.attrs.get("epsilon", _DEFAULT_EPSILON))
        s = gamma / np.sqrt(var + eps)
        return absorb_into_conv(graph, conv, bn, scale_conv_output_channels(conv, s),
                                (conv_bias(conv) - mean) * s + beta, gamma, beta, mean, var)
