"""Pad fusion: a zero ``Pad`` of the spatial axes followed by ``Conv`` or ``AveragePool`` becomes
the consumer's own ``pads``.

Conv and AveragePool (ONNX spec, https://onnx.ai/onnx/operators/) pad their input ``X`` of shape
``(N, C, x1, ..., xk)`` with zeros by ``pads = [x1_begin, ..., xk_begin, x1_end, ..., xk_end]``
before sliding the kernel; the output shape is
``floor((xi + begin_i + end_i - dilation_i · (kernel_i - 1) - 1) / stride_i) + 1`` either way.
``Pad`` in constant mode with value 0 and ``pads = [p1_begin, ..., pr_begin, p1_end, ..., pr_end]``
over all ``r = k + 2`` axes (or over the listed ``axes``, opset 18+) writes the same zeros
explicitly. So when the batch and channel pads are 0::

    Conv(Pad(X, p), pads=q)        = Conv(X, pads=q + p[spatial])
    AveragePool(Pad(X, p), pads=q) = AveragePool(X, pads=q + p[spatial], count_include_pad=1)

For AveragePool the explicit zeros are elements of the window and always count in the divisor,
so the fused pool must count its pads too (``count_include_pad=1``). That is the same divisor
only if the pool's own pads ``q`` were counted already (``count_include_pad=1``) or are all 0;
a pool with ``count_include_pad=0`` and non-zero pads is refused, and so is ``ceil_mode=1``, to be
safe: a last window running past the padded input has a divisor the spec leaves open
(onnxruntime 1.32 agrees on it, other runtimes and the reference implementation have differed).
onnxruntime rejects pooling pads not smaller than the kernel, so those are refused as well.

MaxPool is refused: its pads hold -inf, not 0, so a zero Pad is not its padding.

Conditions (each refusal is counted under ``refused`` by reason): the Pad is in constant mode
(``mode`` absent or ``constant``); its value is absent or a constant 0; its pads (attribute
``pads`` or ``paddings`` before opset 11, an initializer input from 11) and ``axes`` (opset 18)
are constants; every pad is >= 0 and the batch and channel pads are 0; the Pad's output is read
only by input 0 of the consumer, in the same graph, and is not a graph output; the consumer's
``auto_pad`` is absent or ``NOTSET``. The consumer then reads the Pad's input; the Pad is removed.
Works in every subgraph.

Statistics: ``rewritten`` (Pads removed), ``by_kind`` (per consumer op: ``Conv``,
``AveragePool``), ``refused``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

_CONSUMERS = ("Conv", "AveragePool", "MaxPool")


def _attr_str(node: gs.Node, name: str, default: str) -> str:
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    if len(node.inputs) > index and not node.inputs[index].is_empty():
        return node.inputs[index]
    return None


def _constant_ints(t: gs.Tensor, what: str) -> tuple[list[int] | None, str | None]:
    reason = constant_refusal(t, what)
    if reason:
        return None, reason
    return [int(v) for v in np.asarray(t.values).reshape(-1)], None


def _pad_amounts(pad: gs.Node, rank_of_consumer: int | None
                 ) -> tuple[list[int] | None, str | None]:
    """The Pad's ``[begin..., end...]`` over all axes of its input, or a refusal reason."""
    if _attr_str(pad, "mode", "constant") != "constant":
        return None, f"Pad mode is {_attr_str(pad, 'mode', 'constant')}"
    axes = None
    if "pads" in pad.attrs or "paddings" in pad.attrs:  # opset < 11
        pads = [int(v) for v in pad.attrs.get("pads", pad.attrs.get("paddings"))]
        if float(pad.attrs.get("value", 0.0)) != 0.0:
            return None, "pad value is not 0"
    else:
        if _optional_input(pad, 1) is None:
            return None, "Pad has no pads"
        pads, reason = _constant_ints(pad.inputs[1], "pads")
        if reason:
            return None, reason
        value = _optional_input(pad, 2)
        if value is not None:
            reason = constant_refusal(value, "pad value")
            if reason:
                return None, reason
            if np.any(np.asarray(value.values) != 0):
                return None, "pad value is not 0"
        if _optional_input(pad, 3) is not None:
            axes, reason = _constant_ints(pad.inputs[3], "axes")
            if reason:
                return None, reason
    if axes is None:
        return pads, None
    if rank_of_consumer is None:
        return None, "Pad has axes and the input rank is unknown"
    r = rank_of_consumer
    if len(pads) != 2 * len(axes) or any(not -r <= a < r for a in axes):
        return None, "Pad axes do not match its pads"
    full = [0] * (2 * r)
    for i, a in enumerate(axes):
        full[a % r] = pads[i]
        full[a % r + r] = pads[i + len(axes)]
    return full, None


def _consumer_rank(node: gs.Node) -> int | None:
    """Rank of the consumer's input X: from ``kernel_shape`` or from a constant Conv weight."""
    if "kernel_shape" in node.attrs:
        return len(node.attrs["kernel_shape"]) + 2
    if node.op == "Conv" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        return len(node.inputs[1].shape)
    return None


def _consumer_refusal(node: gs.Node, spatial: int) -> str | None:
    if node.op == "MaxPool":
        return "MaxPool pads with -inf, not 0"
    if _attr_str(node, "auto_pad", "NOTSET") != "NOTSET":
        return f"{node.op} auto_pad is {_attr_str(node, 'auto_pad', 'NOTSET')}"
    if len(node.attrs.get("pads", [0] * 2 * spatial)) != 2 * spatial:
        return f"{node.op} pads do not match the input rank"
    if node.op == "AveragePool":
        if node.attrs.get("ceil_mode", 0):
            return "AveragePool ceil_mode=1"
        if not node.attrs.get("count_include_pad", 0) and any(node.attrs.get("pads", [])):
            return "AveragePool has its own uncounted pads (count_include_pad=0)"
    return None


def _new_pads(pad: gs.Node, consumer: gs.Node, scope: Scope) -> str | list[int]:
    """Why the Pad cannot be folded into ``consumer``, or the consumer's new pads."""
    y = pad.outputs[0]
    if len(y.outputs) != 1 or sum(t is y for t in consumer.inputs) != 1:
        return "Pad output has other consumers"
    if consumer.inputs[0] is not y:
        return f"Pad output is not the {consumer.op} input X"
    if scope.is_output(y):
        return "Pad output is a graph output"
    if scope.usedef.owner(consumer) is not scope.graph:
        return f"{consumer.op} in another scope"
    pads, reason = _pad_amounts(pad, _consumer_rank(consumer))
    if reason:
        return reason
    r = len(pads) // 2
    if len(pads) != 2 * r or r < 3:
        return "Pad pads do not cover a spatial input"
    if any(p < 0 for p in pads):
        return "negative pads (cropping)"
    if pads[0] or pads[1] or pads[r] or pads[r + 1]:
        return "Pad pads the batch or channel axis"
    rank = _consumer_rank(consumer)
    if rank is not None and rank != r:
        return "Pad rank differs from the consumer's"
    spatial = r - 2
    reason = _consumer_refusal(consumer, spatial)
    if reason:
        return reason
    old = [int(v) for v in consumer.attrs.get("pads", [0] * 2 * spatial)]
    new = [o + p for o, p in zip(old, pads[2:r] + pads[r + 2:])]
    if consumer.op != "Conv":
        kernel = consumer.attrs["kernel_shape"]
        if any(p >= kernel[i % spatial] for i, p in enumerate(new)):
            return "pooling pads would reach the kernel size"
    return new


@register
class FusePad(RewritePass):
    name = "fuse_pad"
    description = "Fold a zero constant Pad of the spatial axes into the following Conv or " \
                  "AveragePool's pads."
    ops = ("Pad",)

    def match(self, pad: gs.Node, scope: Scope) -> Refusal | tuple[gs.Node, list[int]] | None:
        if not pad.inputs:
            return None
        consumers = [n for n in pad.outputs[0].outputs
                     if n.op in _CONSUMERS and is_default_domain(n)]
        if not consumers:
            return None
        found = _new_pads(pad, consumers[0], scope)
        return refuse(found) if isinstance(found, str) else (consumers[0], found)

    def rewrite(self, pad: gs.Node, match: tuple[gs.Node, list[int]], scope: Scope) -> str:
        consumer, new_pads = match
        consumer.inputs[0] = pad.inputs[0]
        consumer.attrs["pads"] = new_pads
        if consumer.op == "AveragePool":
            consumer.attrs["count_include_pad"] = 1
        pad.inputs.clear()
        pad.outputs.clear()
        return consumer.op
