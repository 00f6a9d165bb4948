"""Conv and ConvTranspose weight arithmetic shared by the fusions that rewrite them.

Layouts (ONNX spec): Conv ``W[M, C/group, k...]``, ConvTranspose ``W[C, M/group, k...]``; the
output-channel count is ``onnxopt.ops.conv_output_channels``. Arithmetic is float64; results are
cast to the weight's dtype only when they stay finite where the sources were (:func:`overflows`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal
from onnxopt.names import fresh_name
from onnxopt.ops import FLOAT_DTYPES, conv_output_channels


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


def scale_conv_output_channels(conv: gs.Node, s: np.ndarray) -> np.ndarray:
    """``W · s`` along the output-channel axis of ``conv``, in float64.

    Conv ``W[M, C/group, k...]``: axis 0. ConvTranspose ``W[C, M/group, k...]``: output channel
    ``o = g · (M/group) + m`` is column ``m`` of group ``g``'s rows, so ``W`` is viewed as
    ``[group, C/group, M/group, k...]`` and ``s`` as ``[group, 1, M/group, 1...]`` (ONNX spec).
    """
    w = np.asarray(conv.inputs[1].values, dtype=np.float64)
    if conv.op == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    group = conv.attrs.get("group", 1)
    grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
    return (grouped * s.reshape((group, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)


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


def absorb_into_conv(graph: gs.Graph, conv: gs.Node, follower: gs.Node,
                     weight: np.ndarray | None, bias: np.ndarray, *sources: np.ndarray) -> bool:
    """Make ``conv`` compute what ``follower`` -- the only reader of its output -- computed.

    ``conv`` gets new weight (None: the current one is kept) and bias initializers, cast to the
    weight's dtype, and writes ``follower``'s output tensor, so that name survives (it may be a
    graph output); ``follower`` is disconnected (the caller drops it from its graph's nodes).
    Nothing changes, and False is returned, when the new weight or bias :func:`overflows` the
    dtype while the current weight and bias and ``sources`` (the follower's constants) are finite.
    """
    dtype = np.dtype(conv.inputs[1].dtype)
    inputs = [np.asarray(conv.inputs[1].values, np.float64), conv_bias(conv), *sources]
    if any(overflows(new, dtype, *inputs) for new in (weight, bias) if new is not None):
        return False
    w = conv.inputs[1] if weight is None else gs.Constant(
        fresh_name(graph, conv.inputs[1].name), weight.astype(dtype))
    b = gs.Constant(fresh_name(graph, f"{conv.inputs[1].name}_bias"), bias.astype(dtype))
    out = follower.outputs[0]
    follower.inputs.clear()
    follower.outputs.clear()
    x = conv.inputs[0]
    conv.inputs.clear()
    conv.inputs.extend([x, w, b])
    conv.outputs[0] = out
    return True

