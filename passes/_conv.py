"""Conv and ConvTranspose weight arithmetic shared by the fusions that rewrite them: scaling a
weight along its output or input channels, and absorbing the node that follows a Conv into its
weight and bias.

Layouts (ONNX spec): Conv ``W[M, C/group, k...]``, ConvTranspose ``W[C, M/group, k...]``; the
channel counts are ``onnxopt.ops.conv_output_channels`` and ``conv_input_channels``, the axes
those of the op facts table. Channel ``o = g · (n/group) + j`` of the axis a weight holds per
group (Conv's input channels, ConvTranspose's output channels) is column ``j`` of group ``g``'s
rows.
Arithmetic is float64; results are cast to the weight's dtype only when they stay finite where the
sources were (:func:`overflows`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal
from onnxopt.ops import (FLOAT_DTYPES, conv_output_channels, input_channel_axis,
                         output_channel_axis)
from onnxopt.rewrite import Scope, producer_in_scope

CONV_OPS = ("Conv", "ConvTranspose")


def conv_weight_refusal(conv: gs.Node) -> str | None:
    """Why the weights of ``conv`` cannot be rewritten, or None."""
    if len(conv.inputs) < 2 or len(conv.outputs) != 1:
        return "conv has no weight input"
    w = conv.inputs[1]
    reason = constant_refusal(w, "weight")
    if reason:
        return reason
    if np.dtype(w.dtype).type not in FLOAT_DTYPES:
        return "weight is not float"
    if w.values.ndim < 3:
        return "weight rank below 3"
    group = conv.attrs.get("group", 1)
    if conv.op == "ConvTranspose" and w.shape[0] % group:
        return "weight channels not divisible by group"
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        b = conv.inputs[2]
        reason = constant_refusal(b, "conv bias")
        if reason:
            return reason
        if np.dtype(b.dtype) != np.dtype(w.dtype):
            return "dtypes differ"
        if tuple(b.shape) != (conv_output_channels(conv),):
            return "conv bias shape is not [M]"
    return None


def _scale_rows(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w · s`` along axis 0."""
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1))


def _scale_grouped_columns(w: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """``w · s`` along the channels axis 1 holds per group: ``w`` viewed as
    ``[group, rows/group, cols, k...]`` times ``s`` viewed as ``[group, 1, cols, 1...]``."""
    grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
    return (grouped * s.reshape((group, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)


def _scale_along(conv: gs.Node, s: np.ndarray, axis: int) -> np.ndarray:
    """``W · s`` along weight ``axis`` as the op facts give it (``onnxopt.ops``): axis 0 holds
    all the channels, axis 1 the channels of one group."""
    w = np.asarray(conv.inputs[1].values, dtype=np.float64)
    if axis == 0:
        return _scale_rows(w, s)
    return _scale_grouped_columns(w, s, conv.attrs.get("group", 1))


def scale_conv_output_channels(conv: gs.Node, s: np.ndarray) -> np.ndarray:
    """``W · s`` along the output channels of ``conv`` (``s`` a vector of M), in float64:
    axis 0 of Conv's ``W[M, C/group, k...]``; for ConvTranspose's ``W[C, M/group, k...]``, ``W``
    viewed as ``[group, C/group, M/group, k...]`` times ``s`` as ``[group, 1, M/group, 1...]``."""
    rank = len(conv.inputs[1].shape)
    return _scale_along(conv, s, output_channel_axis(conv, 1, rank))


def scale_conv_input_channels(conv: gs.Node, s: np.ndarray) -> np.ndarray:
    """``W · s`` along the input channels of ``conv`` (``s`` a vector of C), in float64: Conv's
    ``W[M, C/group, k...]`` viewed as ``[group, M/group, C/group, k...]`` times ``s`` as
    ``[group, 1, C/group, 1...]``; axis 0 of ConvTranspose's ``W[C, M/group, k...]``."""
    rank = len(conv.inputs[1].shape)
    return _scale_along(conv, s, input_channel_axis(conv, 1, rank))


def per_channel(c: np.ndarray, rank: int, m: int) -> np.ndarray | None:
    """``c`` as a float64 vector of length ``m`` if it broadcasts per channel against a rank-
    ``rank`` tensor with ``m`` channels at axis 1 without changing its shape (``rank(c) <= rank``;
    aligned from the right, every dim 1 except the channel dim, which is 1 or ``m``), else None."""
    if c.ndim > rank:
        return None
    dims = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(dims) if i != 1) or dims[1] not in (1, m):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (m,))


def conv_bias(conv: gs.Node) -> np.ndarray:
    """The bias of ``conv`` in float64, zeros when absent."""
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        return np.asarray(conv.inputs[2].values, dtype=np.float64)
    return np.zeros(conv_output_channels(conv))


def overflows(folded: np.ndarray, dtype, *sources: np.ndarray) -> bool:
    """True when ``folded`` (computed in float64 from ``sources``) has an infinity or NaN in
    ``dtype`` while every source is finite: the folded weight would turn outputs that were
    finite for some inputs (a small x in ``(x * s) * W``) into infinities for all of them."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(folded).astype(dtype)
    return not np.isfinite(cast).all() and all(np.isfinite(src).all() for src in sources)


def conv_producing(t: gs.Tensor) -> gs.Node | None:
    """The default-domain Conv or ConvTranspose whose output is ``t``, or None."""
    producer = producer_in_scope(t)
    return producer if producer is not None and producer.op in CONV_OPS else None


def absorb_refusal(conv: gs.Node, follower: gs.Node, scope: Scope) -> str | None:
    """Why ``follower`` (a node of ``scope.graph`` reading ``conv``'s output) cannot be absorbed
    into ``conv``, as far as the Conv is concerned, or None: the output has another reader, the
    Conv is in another scope, the output is a graph output, or :func:`conv_weight_refusal`."""
    y = conv.outputs[0]
    if len(y.outputs) != 1:
        return "conv output has other consumers"
    if scope.usedef.owner(conv) is not scope.graph:
        return f"{follower.op} in another scope"
    if scope.is_output(y):
        return "conv output is a graph output"
    return conv_weight_refusal(conv)


def absorb_into_conv(conv: gs.Node, follower: gs.Node, weight: np.ndarray | None,
                     bias: np.ndarray, *sources: np.ndarray,
                     fresh: Callable[[str], str]) -> bool:
    """Make ``conv`` compute what ``follower`` -- the only reader of its output -- computed.

    ``conv`` gets new weight (None: the current one is kept) and bias initializers, cast to the
    weight's dtype and named by ``fresh`` (``Scope.fresh``), and writes ``follower``'s output
    tensor, so that name survives (it may be a graph output); ``follower`` is disconnected (the
    walker drops it from its graph's nodes). Nothing changes, and False is returned, when the new
    weight or bias :func:`overflows` the dtype while the current weight and bias and ``sources``
    (the follower's constants) are finite.
    """
    dtype = np.dtype(conv.inputs[1].dtype)
    inputs = [np.asarray(conv.inputs[1].values, np.float64), conv_bias(conv), *sources]
    if any(overflows(new, dtype, *inputs) for new in (weight, bias) if new is not None):
        return False
    w = conv.inputs[1] if weight is None else gs.Constant(
        fresh(conv.inputs[1].name), weight.astype(dtype))
    b = gs.Constant(fresh(f"{conv.inputs[1].name}_bias"), bias.astype(dtype))
    out = follower.outputs[0]
    follower.inputs.clear()
    follower.outputs.clear()
    x = conv.inputs[0]
    conv.inputs.clear()
    conv.inputs.extend([x, w, b])
    conv.outputs[0] = out
    return True
