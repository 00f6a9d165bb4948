"""Conv input-scale fusion: fold a ``Mul`` or ``Div`` by a constant that feeds Conv or ConvTranspose
data inputs into their weights, and drop it.

Conv (ONNX spec, https://onnx.ai/onnx/operators/onnx__Conv.html) with ``X[N, C, ...]``,
``W[M, C/group, k...]`` and bias ``B[M]`` computes, for output channel ``o`` of group
``g = o // (M/group)``::

    Y[n, o, p] = B[o] + Σ_{j < C/group} Σ_k W[o, j, k] · X̂[n, g · C/group + j, p + k]

where ``X̂`` is ``X`` padded with zeros (``pads``/``auto_pad``: Conv pads with zeros only; strides
and dilations only change which positions ``p + k`` are read). Input channel ``c`` is read only by
the output channels of group ``c // (C/group)``, through column ``j = c mod (C/group)`` of their
weights. If ``X = s · x`` with ``s[c]`` the same at every position of channel ``c``, then
``X̂ = s · x̂`` (``s · 0 = 0``), and since the sum is linear in ``X̂``::

    Conv(s · x, W, B) = Conv(x, W', B),   W'[o, j, k] = W[o, j, k] · s[g · C/group + j]

(``W`` viewed as ``[group, M/group, C/group, k...]`` times ``s`` viewed as
``[group, 1, C/group, 1...]``). ConvTranspose (https://onnx.ai/onnx/operators/onnx__ConvTranspose.html)
has ``W[C, M/group, k...]``: input channel ``c`` is row ``c`` of ``W`` whatever the group, and
``Y`` is again linear in ``X`` (``output_padding`` and ``pads`` only add or crop positions that
receive the bias alone), so ``W'[c] = W[c] · s[c]``. ``Div(x, s)`` is ``Mul(x, 1/s)`` (every
``s[c] ≠ 0``).

``s`` is per input channel when broadcasting it against ``X`` (rank r = rank of W, channel axis 1)
keeps ``X``'s shape: ``rank(s) <= r`` and, aligned from the right, every dim of ``s`` is 1 except
the channel dim, which is 1 or C (scalar, ``[1]``, ``[C, 1, 1]``, ``[1, C, 1, 1]``...). The data
operand ``x`` must then have the Mul's output shape: its rank (``onnxopt.analyses.TensorTypes``) must be
r, and its channel dim C unless ``s`` is a scalar in effect -- otherwise the Mul broadcasts ``x`` up
and dropping it would feed the Conv another shape.

Exactness: as in BatchNormalization folding (``fuse_conv_bn``) and ``fuse_conv_affine``, the same
sums are computed with different roundings: ``x · (W · s)`` with ``W · s`` computed in float64 and
rounded once to the weight dtype, instead of ``(s · x)`` rounded, then times ``W``; ``1/s`` for a
Div is not bitwise ``/ s``. The results agree within float tolerance, except where an intermediate
overflows in one form and not in the other (``s · x`` or ``W · s`` beyond the dtype's range). A
zero in ``s`` is folded: ``0 · x = 0`` for finite ``x``; for ``x`` infinite or NaN the original
gives NaN at ``s · x`` and the folded Conv NaN at ``x · 0``, so non-finite inputs propagate either
way (as with BN folding, whose ``γ`` may be 0).

Every reader of the Mul's output must be the data input (input 0) of a Conv or ConvTranspose (in
the Mul's graph or in a subgraph of it), each of which gets new weight initializers (the old ones
stay right for any other reader) and reads the Mul's data operand instead; the Mul is then
dropped. Works in every subgraph.

Refused (counted under ``refused`` by reason), for a Mul/Div one of whose readers is a Conv's data
input: the output is a graph output or has another reader (another op, a Conv's weight or bias);
the scale is not an initializer, is the left operand of Div, is not per input channel, is not
finite, or (Div) has a zero; both operands are initializers (constant folding's work); dtypes
differ; the data operand's rank is unknown or not the Conv's, or its channel dim is unknown or not
C; a Conv's weight or bias is not an initializer or not float (``conv_weight_refusal``); the
weights disagree on C or (Conv) have output channels not divisible by ``group`` (invalid models);
a scaled weight overflows the dtype (``onnxopt.passes._conv.overflows``).

Statistics: ``rewritten`` (Mul/Div dropped), ``convs`` (weights rewritten), ``refused``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal
from onnxopt.ops import conv_input_channels, is_default_domain
from onnxopt.pass_manager import PassContext, register
from onnxopt.passes._conv import (
    CONV_OPS, conv_weight_refusal, overflows, per_channel, scale_conv_input_channels)
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


def _readers(z: gs.Tensor) -> list[gs.Node]:
    """The nodes reading ``z``, each once."""
    return list({id(n): n for n in z.outputs}.values())


def _conv_refusal(conv: gs.Node, z: gs.Tensor) -> str | None:
    """Why ``conv``, a reader of the scaled tensor ``z``, cannot take the scale, or None."""
    if conv.op not in CONV_OPS or not is_default_domain(conv):
        return "output read by another op"
    if conv.inputs[0] is not z or any(t is z for t in conv.inputs[1:]):
        return "output read as a Conv weight or bias"
    reason = conv_weight_refusal(conv)
    if reason:
        return reason
    if conv.op == "Conv" and conv.inputs[1].shape[0] % conv.attrs.get("group", 1):
        return "weight channels not divisible by group"
    return None


def _scale_and_data(op: gs.Node, scope: Scope) -> str | tuple[gs.Tensor, np.ndarray]:
    """Why ``op`` cannot be folded, or its data operand and its scale as a vector of C (``1/s``
    for a Div)."""
    z = op.outputs[0]
    if scope.is_output(z):
        return "output is a graph output"
    readers = _readers(z)
    for conv in readers:
        reason = _conv_refusal(conv, z)
        if reason:
            return reason
    w = readers[0].inputs[1]
    rank, c = w.values.ndim, conv_input_channels(readers[0])
    if any((r.inputs[1].values.ndim, conv_input_channels(r)) != (rank, c) for r in readers):
        return "Convs disagree on the input channels"
    x, s = op.inputs
    if op.op == "Mul" and isinstance(x, gs.Constant):
        x, s = s, x
    if isinstance(x, gs.Constant):
        return "both operands are initializers" if isinstance(s, gs.Constant) \
            else "scale is the left operand of Div"
    reason = constant_refusal(s, "scale")
    if reason:
        return reason
    dtype = np.dtype(w.dtype)  # a float (conv_weight_refusal)
    if any(np.dtype(t.dtype) != dtype for t in [s, *(r.inputs[1] for r in readers)]):
        return "dtypes differ"
    value = np.asarray(s.values)
    vector = per_channel(value, rank, c)
    if vector is None:
        return "scale is not per input channel"
    if not np.isfinite(vector).all():
        return "scale is not finite"
    if op.op == "Div" and not vector.all():
        return "division by zero"
    x_shape = scope.types.shape(x)
    if x_shape is None:
        return "data rank unknown"
    if len(x_shape) != rank:
        return "data rank is not the Conv's"
    if value.size > 1 and x_shape[1] is None:
        return "data channel dim unknown"
    if value.size > 1 and x_shape[1] != c:
        return "Mul broadcasts the data to more channels"
    return x, (1.0 / vector if op.op == "Div" else vector)


@register
class FuseConvInputScale(RewritePass):
    name = "fuse_conv_input_scale"
    description = "Fold Mul/Div by a per-input-channel constant into the Convs that read it."
    ops = ("Mul", "Div")

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._convs = 0

    def extra_stats(self) -> dict[str, int]:
        return {"convs": self._convs}

    def match(self, op: gs.Node, scope: Scope) -> Refusal | tuple[gs.Tensor, np.ndarray] | None:
        if len(op.outputs) != 1 or len(op.inputs) != 2:
            return None
        z = op.outputs[0]
        if not any(n.op in CONV_OPS and n.inputs and n.inputs[0] is z for n in z.outputs):
            return None
        found = _scale_and_data(op, scope)
        return refuse(found) if isinstance(found, str) else found

    def rewrite(self, op: gs.Node, match: tuple[gs.Tensor, np.ndarray], scope: Scope
                ) -> Refusal | None:
        """Every reader Conv reads the data operand with its weight scaled; ``op`` is
        disconnected. Refused, and nothing changed, when a scaled weight overflows its dtype."""
        x, s = match
        readers = _readers(op.outputs[0])

        def key(conv: gs.Node) -> tuple:  # Convs sharing a weight share its scaled copy
            return id(conv.inputs[1]), conv.op, conv.attrs.get("group", 1)

        scaled: dict[tuple, tuple[gs.Constant, np.ndarray]] = {}
        for conv in readers:
            if key(conv) not in scaled:
                scaled[key(conv)] = conv.inputs[1], scale_conv_input_channels(conv, s)
        if any(overflows(value, w.dtype, np.asarray(w.values, np.float64), s)
               for w, value in scaled.values()):
            return refuse("scaled weight overflows the dtype")
        weights = {k: gs.Constant(scope.fresh(w.name), value.astype(w.dtype))
                   for k, (w, value) in scaled.items()}
        for conv in readers:
            conv.inputs[0], conv.inputs[1] = x, weights[key(conv)]
        op.inputs.clear()
        op.outputs.clear()
        self._convs += len(readers)
        return None
