"""Int8 weight-only quantization: float32 weights become int8 and a scale, via DequantizeLinear.

Every float32 initializer used only as a weight -- MatMul B (and A when constant), Gemm B (and A
when constant), a Conv or ConvTranspose kernel -- is replaced by an int8 initializer ``q``, a
float32 ``scale`` and an int8 ``zero_point`` of zeros feeding a ``DequantizeLinear`` node whose
output every former reader now reads. Activations stay float: this is the weight-only QDQ form that
onnxruntime.quantization produces for weights, and runtimes may fuse the DequantizeLinear into an
int8 kernel or simply run it.

The mathematics (ONNX ``QuantizeLinear``/``DequantizeLinear``, https://onnx.ai/onnx/operators/;
symmetric weight scheme of Jacob et al., 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR, and of
``onnxruntime.quantization.quant_utils.compute_scale_zp(..., symmetric=True)``), for each output
channel ``c`` (or the whole tensor)::

    scale_c = max |W_c| / 127            (1.0 when that is below float32's smallest normal,
                                          e.g. an all-zero channel: q is then 0 anyway)
    q       = clip(round_half_even(W / scale_c), -127, 127)      int8, zero point 0
    W'      = DequantizeLinear(q, scale, 0) = q * scale_c        |W - W'| <= scale_c / 2

Why -127 and not -128: with zero point 0 the grid ``[-127, 127]`` is symmetric, so ``-W`` maps to
``-q`` and ``max |W_c|`` maps exactly to ±127; -128 would never be produced by ``max|W|/127`` and,
if allowed, makes int8 x int8 products of two -128 values overflow the int16 pair sums of
x86 VPMADDUBSW/VNNI kernels. onnxruntime's ``ONNX_INT_TYPE_SYMMETRIC_RANGE`` for int8 is the same.

Channel axis (the output-channel axis of the consumer):

* MatMul B ``[..., K, N]``: the last axis; MatMul A ``[..., M, K]``: the one before it;
* Gemm B: axis 1 (``[K, N]``), axis 0 when ``transB=1`` (``[N, K]``); Gemm A: axis 0, axis 1
  when ``transA=1``;
* Conv kernel ``[M, C/group, k...]``: axis 0; ConvTranspose kernel ``[C, M/group, k...]``: axis 1;
* a 1-D MatMul operand, or a weight whose readers disagree on the axis: one per-tensor scale.

Per-axis DequantizeLinear (1-D scale, ``axis`` attribute) exists from opset 13. For opset 10-12
(the PaddleOCR exports are 11 and 12) DequantizeLinear only takes a scalar scale, so the
per-channel scale is applied by a ``Mul`` after it: ``Mul(DequantizeLinear(q, 1.0, 0), scale)``,
``scale`` shaped ``[1, .., C, .., 1]`` to broadcast along the channel axis; the scalar
DequantizeLinear (scale 1.0, zero point 0) is an exact int8 -> float32 conversion that, unlike a
Cast, constant folding leaves alone. Per-tensor scales were tried first and fail the 0.99 cosine
check on the PaddleOCR models (cosine 0.988 on PP-OCRv4 rec and 0.03 on PP-OCRv4 det, against
0.998 and 0.915 per channel); converting the whole model to opset 13 with
``onnx.version_converter`` would rewrite unrelated ops for a storage detail. Below opset 10 there
is no DequantizeLinear: nothing is done.

The DequantizeLinear node is never folded back by ``fold_constants``, so the int8 initializers are
what the saved file stores (about 4x smaller weights).

Skipped, with the reason counted in the statistics: weights read by any other slot or op (a Gather
table, an Add operand, ...), weights read from more than one graph (an outer-scope constant read in
a subgraph and elsewhere), graph inputs or outputs, non-float32 weights (DequantizeLinear outputs
float32 before opset 19), sparse initializers, weights with non-finite values, and weights with
fewer than ``min_elements`` elements (an option, default :data:`MIN_ELEMENTS`).

Drift budget: each quantized weight is a proposal (its dequantized values, and the rewrite that
inserts the DequantizeLinear) in the group of its reader node (named by the node, for per-node
mixed precision; a weight read by several nodes is its own group); the run's drift budget
(``onnxopt.budget``) leaves the most harmful in float until every output keeps ``max_drift``
against the original. The groups kept float are listed in the statistics.

Statistics (JSON-serializable): ``tensors_quantized``; ``scheme`` (``"per-channel"``, or
``"per-channel (DequantizeLinear + Mul)"`` below opset 13; below opset 10 the pass manager does
not run the pass and records the refusal); ``proposed`` and ``accepted``; ``per_channel`` and
``per_tensor`` (tensors of each kind); ``refused`` (``{reason: count}``);
``bytes_before`` and ``bytes_after`` (of the quantized weights: float32 data versus int8 data,
scales and zero points); ``drift_budget`` (``{target, cosine_all, cosine_final, evaluations,
kept}``, ``kept`` being the weights left float) when feeds were given.

Errors: none of its own.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses import UseDef
from onnxopt.budget import Dequantized, Proposal
from onnxopt.edit import input_slots, replace_uses
from onnxopt.graph import opset_version
from onnxopt.names import fresh_name
from onnxopt.ops import output_channel_axis, weight_slot
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._quant import (QuantizeOptions, broadcastable, dequantize,
                                   quantize_symmetric, weight_refusal, weight_summary)

#: Weights with fewer elements stay float: the scale and zero point would cost as much as they save.
MIN_ELEMENTS = 16
#: First opset whose DequantizeLinear takes a 1-D scale and an ``axis``.
PER_AXIS_OPSET = 13
#: First opset with DequantizeLinear at all.
DQ_OPSET = 10

#: The weight slots quantized (``onnxopt.ops``): MatMul/Gemm operands and Conv kernels.
QUANTIZED_KINDS = frozenset({"matrix", "kernel"})
_FLOAT32 = np.dtype(np.float32)


def quantize(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of ``values`` per channel along ``axis`` (None: per tensor);
    see :func:`onnxopt.passes._quant.quantize_symmetric`."""
    return quantize_symmetric(values, axis)


@dataclass(frozen=True)
class QuantizeWeightsOptions(QuantizeOptions):
    """Options of :class:`QuantizeWeights` (and ``exclude`` / ``ops``, see
    :class:`~onnxopt.passes._quant.QuantizeOptions`).

    Attributes:
        min_elements: weights with fewer elements stay float (their scale and zero point would
            cost about as much as they save).
    """

    min_elements: int = MIN_ELEMENTS

    def check(self) -> str | None:
        if self.min_elements < 1:
            return f"option min_elements must be at least 1, got {self.min_elements}"
        return super().check()


def _refusal(t: gs.Constant, slots: list, usedef: UseDef,
             options: QuantizeWeightsOptions) -> str | None:
    """Why ``t`` must stay float, or None if it can be quantized."""
    return weight_refusal(
        t, slots, usedef, options,
        lambda n, i: (w := weight_slot(n, i)) is not None and w.kind in QUANTIZED_KINDS,
        "also read outside a weight slot")


@register
class QuantizeWeights(Pass):
    name = "quantize_weights"
    description = "Symmetric per-channel int8 weights read through DequantizeLinear (weight-only)."
    Options = QuantizeWeightsOptions
    lossless = False
    quantizes = True
    min_opset = DQ_OPSET

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = opset_version(graph)
        refused: collections.Counter[str] = collections.Counter()
        usedef = ctx.analyses.get(UseDef)
        weights: dict[int, gs.Constant] = {}
        for g in usedef.scopes:
            for node in g.nodes:
                for i, t in enumerate(node.inputs):
                    w = weight_slot(node, i)
                    if (isinstance(t, gs.Constant) and w is not None and w.kind in QUANTIZED_KINDS
                            and np.issubdtype(np.dtype(t.dtype), np.floating)):
                        weights.setdefault(id(t), t)

        per_axis = opset >= PER_AXIS_OPSET
        proposals = []
        self._axes: dict[int, int | None] = {}
        self._stored: dict[int, int] = {}
        for t in weights.values():
            slots = input_slots(t)
            reason = _refusal(t, slots, usedef, self.options)
            if reason is not None:
                refused[reason] += 1
                continue
            axes = {output_channel_axis(n, i, len(t.shape)) for n, i in slots}
            axis = axes.pop() if len(axes) == 1 else None
            q, scale = quantize(external.peek(t), axis)  # an external weight: mapped here only
            q = external.spill(q)  # a large model's codes wait on disk for the budget's decision
            self._axes[id(t)] = axis
            readers = {id(n): n for n, _ in slots}
            node = next(iter(readers.values()))
            proposals.append(Proposal(
                tensor=t, value=functools.partial(dequantize, q, scale, axis),
                dequantized=Dequantized(q, scale, axis=axis),
                apply=self._rewrite(graph, usedef.owner(node), t, q, scale, axis, per_axis),
                group=node.name if len(readers) == 1 and node.name else None))
        self._scheme = "per-channel" if per_axis else "per-channel (DequantizeLinear + Mul)"
        stats = {"refused": dict(sorted(refused.items()))} if refused else {}
        return PassResult(False, stats, proposals=proposals)

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        counts = collections.Counter(
            "per_tensor" if self._axes[id(p.tensor)] is None else "per_channel" for p in accepted)
        return {**weight_summary(result, accepted, self._scheme, self._stored),
                "per_channel": counts["per_channel"], "per_tensor": counts["per_tensor"]}

    def _rewrite(self, root: gs.Graph, g: gs.Graph, t: gs.Constant, q: np.ndarray,
                 scale: np.ndarray, axis: int | None, per_axis: bool):
        """The proposal's ``apply``: insert the dequantization and make every reader use it."""
        def apply() -> None:
            out, self._stored[id(t)] = self._dequantize(root, g, t, q, scale, axis, per_axis)
            replace_uses(t, out)
        return apply

    @staticmethod
    def _dequantize(root: gs.Graph, g: gs.Graph, t: gs.Constant, q: np.ndarray,
                    scale: np.ndarray, axis: int | None,
                    per_axis: bool) -> tuple[gs.Variable, int]:
        """Add to ``g`` the nodes turning ``q`` back into float32.

        Returns:
            The float32 output replacing ``t``, and the bytes of the initializers added.
        """
        def name(suffix: str) -> str:
            return fresh_name(root, f"{t.name}_{suffix}")

        out = gs.Variable(name("dequantized"), dtype=np.float32, shape=t.shape)
        # Opset 10-12: a scalar DequantizeLinear (an exact int8 -> float32 conversion), then a Mul
        # by the per-channel scale.
        by_mul = axis is not None and not per_axis
        dq_scale = np.array(1.0, np.float32) if by_mul else scale
        added = [gs.Constant(name("quantized"), q), gs.Constant(name("scale"), dq_scale),
                 gs.Constant(name("zero_point"), np.zeros_like(dq_scale, np.int8))]
        attrs = {"axis": axis} if per_axis and axis is not None else {}
        dq_out = gs.Variable(name("int_values"), dtype=np.float32, shape=t.shape) if by_mul else out
        g.nodes.append(gs.Node("DequantizeLinear", name=name("DequantizeLinear"), attrs=attrs,
                               inputs=list(added), outputs=[dq_out]))
        if by_mul:
            added.append(gs.Constant(name("channel_scale"),
                                     broadcastable(scale, len(t.shape), axis)))
            g.nodes.append(gs.Node("Mul", name=name("scale_Mul"), inputs=[dq_out, added[-1]],
                                   outputs=[out]))
        return out, sum(c.values.nbytes for c in added)
