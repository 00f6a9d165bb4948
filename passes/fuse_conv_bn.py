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

Matched from the BatchNormalization whose input X a Conv computes. Refused (counted under
``refused`` by reason): the Conv output has another reader or is a graph output; the Conv and BN
are in different scopes; W, B, γ, β, μ or σ² is not an initializer or is an initializer that the
model also declares as a graph input (a caller may override it); their dtypes differ or are not
float; a parameter's shape is not ``[M]``; the BN is in training mode (``training_mode=1``,
``is_test=0``, ``spatial=0``, or a used mean/variance output); the folded weight or bias overflows
the dtype (``onnxopt.passes._conv.overflows``).

Statistics: ``rewritten`` (BNs folded), ``refused``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal
from onnxopt.ops import conv_output_channels
from onnxopt.pass_manager import register
from onnxopt.passes._conv import (
    absorb_into_conv, absorb_refusal, conv_bias, conv_producing, scale_conv_output_channels)
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

_DEFAULT_EPSILON = 1e-5


def _bn_refusal(bn: gs.Node, conv: gs.Node, scope: Scope) -> str | None:
    """Why ``bn`` cannot be folded into ``conv``, or None."""
    if len(bn.inputs) != 5:
        return "batchnorm has not 5 inputs"
    if bn.attrs.get("training_mode", 0) or bn.attrs.get("is_test", 1) == 0:
        return "batchnorm in training mode"
    if bn.attrs.get("spatial", 1) == 0:
        return "batchnorm not spatial"
    if any(not t.is_empty() and (t.outputs or scope.is_output(t)) for t in bn.outputs[1:]):
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
class FuseConvBn(RewritePass):
    name = "fuse_conv_bn"
    description = "Fold inference BatchNormalization into the preceding Conv/ConvTranspose."
    ops = ("BatchNormalization",)

    def match(self, bn: gs.Node, scope: Scope) -> Refusal | gs.Node | None:
        conv = conv_producing(bn.inputs[0]) if bn.inputs else None
        if conv is None:
            return None
        reason = absorb_refusal(conv, bn, scope) or _bn_refusal(bn, conv, scope)
        return refuse(reason) if reason else conv

    def rewrite(self, bn: gs.Node, conv: gs.Node, scope: Scope) -> Refusal | None:
        gamma, beta, mean, var = (np.asarray(t.values, dtype=np.float64) for t in bn.inputs[1:])
        eps = float(bn.attrs.get("epsilon", _DEFAULT_EPSILON))
        s = gamma / np.sqrt(var + eps)
        if not absorb_into_conv(conv, bn, scale_conv_output_channels(conv, s),
                                (conv_bias(conv) - mean) * s + beta, gamma, beta, mean, var,
                                fresh=scope.fresh):
            return refuse("folded weights overflow the dtype")
        return None
