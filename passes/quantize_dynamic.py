"""Dynamic int8 quantization: int8 weights, activations quantized at run time.

Every MatMul or Gemm whose weight (MatMul B, Gemm B) is a float32 initializer -- and, when asked,
every Conv whose kernel is -- is rewritten into standard ONNX integer ops
(https://onnx.ai/onnx/operators/: ``DynamicQuantizeLinear``, ``MatMulInteger``, ``ConvInteger``)::

    x_q, s_x, z_x = DynamicQuantizeLinear(x)             uint8, one per tensor x (shared by
                                                         every quantized reader of x)
    acc = MatMulInteger(x_q, W_q, z_x)                   int32 = sum_k (x_q - z_x) * W_q
    y   = Cast(acc, float) * Mul(s_x, s_W)               + bias (an Add, when there is one)

``DynamicQuantizeLinear`` maps the run-time range of ``x``, widened to hold 0, onto uint8:
``s_x = (max(x, 0) - min(x, 0)) / 255``, ``z_x = saturate(round(-min(x, 0) / s_x))``,
``x_q = saturate(round(x / s_x) + z_x)``. The weights are symmetric int8 with zero point 0,
per output channel by default (``s_W[n] = max_k |W[k, n]| / qmax``, see
``onnxopt.passes._quant.quantize_symmetric``), so ``s_x * s_W`` is a vector ``[N]`` broadcast
along the last axis of the product and MatMulInteger needs no weight zero point at all. The
result is ``y = (x' @ W')`` with ``x' = s_x (x_q - z_x)`` and ``W' = s_W W_q``: the error is that of
rounding both operands (Jacob et al., 2018, "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR, sections 2.1-2.3).

This exact pattern is the one onnxruntime's graph optimizer fuses
(``onnxruntime/core/optimizer/matmul_integer_to_float.cc`` and
``dynamic_quantize_matmul_fusion.cc``): ``MatMulInteger -> Cast -> Mul(., Mul(s_x, s_W)) ->
Add(., bias)`` becomes ``com.microsoft.MatMulIntegerToFloat`` (bias included when the bias is the
Add's *second* input, a constant of shape ``[N]``), and, when the DynamicQuantizeLinear has no
other reader, ``DynamicQuantizeMatMul`` (quantization, integer GEMM, scaling and bias in one
kernel). PyTorch exports write the bias Add as ``Add(bias, x)``, which onnxruntime's own
``quantize_dynamic`` output leaves unfused (an extra pass over every projection's output); this
pass puts the bias second. When a tensor feeds several quantized nodes (a LayerNorm output read
by the Q, K and V projections) one DynamicQuantizeLinear serves them all and the three become
MatMulIntegerToFloat; the fused forms are what the saved model runs as.

Why 7-bit weights (``reduce_range``, ``[-63, 63]``) with uint8 activations by default:
onnxruntime's x86 u8s8 kernels on AVX2 without VNNI multiply with
``VPMADDUBSW``, whose int16 sum of the two products of adjacent reduction rows
``a_2j w_2j + a_(2j+1) w_(2j+1)`` saturates above 32767 (255 * 127 * 2 = 64770 can occur; on
Gaussian test data 8 % of the outputs of a 64 x 48 MatMul are off). onnxruntime's
``quantize_dynamic`` offers ``reduce_range`` (7-bit weights;
``onnxruntime/python/tools/quantization/quant_utils.py``) against it and defaults to int8 weights
without it. Measured on MiniLM-L6 (onnxruntime 1.32, 2 threads, 8 x 64 real sentences, cosine of
``last_hidden_state`` over non-padding tokens): full grid 0.9891; the same integers computed
without saturation 0.9905; 7-bit weights (``reduce_range``) 0.9887; int8 weights limited so that
no adjacent pair can saturate 0.9852 (exact, but coarser); uint8 weights with zero point 128
(``uint8_weights``: u8u8 kernels widen to int16 first and never saturate) 0.9903, about 10 %
slower. The full grid loses least on MiniLM, but what it loses is saturation, which the drift
budget's simulation (DynamicQuantizeLinear -> DequantizeLinear, exact arithmetic) cannot see:
its saved model scored 0.0014 of cosine below what the budget measured and failed a validation
the budget had promised (0.9887 < 0.99). 7-bit weights never saturate, so what the budget
measures is what the model computes, for 0.0004 of cosine; ``reduce_range=false`` gives the full
grid, ``uint8_weights`` exact u8u8 kernels. Since the drift budget checks its decision on the
real model (its onnxruntime kernels, saturation included), the ``int8-dynamic`` mode takes the
full grid (``reduce_range = false``; 7-bit weights in its second decision): MiniLM-L6 with
SmoothQuant and GPTQ rounding 0.99665 -> 0.99758 on the evaluation sentences (2026-12-07),
the same kernels.

Conv (``ConvInteger``, uint8 input and int8 kernel, output channels on axis 0): off by default,
``conv=True`` includes it. onnxruntime has no fused float-output form of ConvInteger (the Cast,
Mul and Add run as separate passes over the output) and its ConvInteger kernel is slow: with
every Conv of at least 1024 weights quantized, ch_ppocr_mobile_v2.0_cls ran 64x slower than its
float32 version and ch_PP-OCRv4_det 3.2x slower (onnxruntime 1.32, 2 threads).

Refused, with the reason counted in ``refused``: nodes excluded by the user (``exclude``, ``ops``);
weights that are not initializers, not float32, not 2-D (MatMul B; MatMulInteger's per-column
handling is for 2-D B), sparse, non-finite, smaller than ``min_elements``, read by another node or
slot, or graph inputs/outputs; a constant MatMul A (nothing to quantize at run time); Gemm with
``transA``; a Gemm bias that is not a constant when ``beta != 1``.

GPTQ rounding (option ``rounding = "gptq"``, the ``int8-dynamic`` mode's choice when it has
calibration data; Frantar et al. 2023, Algorithm 1, in ``onnxopt.passes._quant.gptq_rows``): a
MatMul or Gemm weight of the main graph is rounded input channel by input channel on its grid
(the scales above, fixed beforehand), each channel's rounding error spread over the channels not
yet rounded through the inverse of ``H = 2 X^T X`` from the calibration inputs at every
position, the drift mask ignored (``EveryPositionGrams``: fitted to the real tokens alone, the
compensation moved the error into what only the padding reads). The activations still get
their range at run time; only the weight codes change. Measured on MiniLM-L6 (the mode, masked
cosine over the evaluation sentences): 0.9957 -> 0.9961, and ``last_hidden_state`` over every
position (worst feed) 0.72 -> 0.976.

Drift budget: one proposal group per node (the node's name): the weight proposal (its
dequantized values ``W'``; its ``apply`` performs the whole rewrite of the node) and a simulated
proposal for the activation (``DynamicQuantizeLinear -> DequantizeLinear`` of ``x`` routed to
that node's input only), so that the budget measures both roundings together and leaves a
node wholly float when it must.

Statistics: ``nodes_quantized`` (by op type), ``dynamic_quantize_linear`` (nodes added),
``scheme``, ``proposed``, ``accepted``, ``refused`` (``{reason: count}``), ``bytes_before`` and
``bytes_after`` (float32 weights versus the int8 weights, scales and zero points),
``biases_fused`` (bias Adds reordered for onnxruntime's fusion), ``rounding`` (``nearest``, or
with ``gptq`` the nodes quantized with GPTQ and ``nearest`` ``{reason: count}``).

Errors: none of its own.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analyses import UseDef
from onnxopt.analyses.activations import EveryPositionGrams
from onnxopt.budget import Proposal
from onnxopt.edit import input_slots, nbytes
from onnxopt.names import fresh_name
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._quant import (QMAX, ROUNDINGS, QuantizeOptions, dequantize, excluded,
                                   gptq_weight, quantize_symmetric, rounding_summary)

#: Weights with fewer elements stay float: integer kernels do not pay for themselves.
MIN_ELEMENTS = 1024
#: Largest magnitude of the reduced (7-bit) weight grid, onnxruntime's ``reduce_range``.
REDUCED_QMAX = 63
#: First opset with DynamicQuantizeLinear, MatMulInteger and ConvInteger.
MIN_OPSET = 11

_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class QuantizeDynamicOptions(QuantizeOptions):
    """Options of :class:`QuantizeDynamic` (and ``exclude`` / ``ops``, see
    :class:`~onnxopt.passes._quant.QuantizeOptions`).

    Attributes:
        per_channel: one weight scale per output channel (True) or one per tensor.
        reduce_range: 7-bit weights (``[-63, 63]``) so that x86 AVX2 u8s8 kernels never
            saturate; costs weight resolution (see the module docstring); without effect on
            ``uint8_weights``, whose kernels never saturate.
        conv: also quantize Conv kernels (ConvInteger); off because it ran slower than float on
            onnxruntime CPU (module docstring).
        uint8_weights: store MatMul/Gemm weights as uint8 with zero point 128 (u8u8 kernels:
            exact, no saturation; see the module docstring for the measured speed).
        min_elements: weights with fewer elements stay float.
        rounding: ``nearest``, or ``gptq``: MatMul and Gemm weights of the main graph rounded
            with GPTQ's inverse-Hessian error compensation on their grid (the scales fixed
            beforehand; ``onnxopt.passes._quant.gptq_symmetric``), from the Gram matrices of
            their inputs over the calibration data; without calibration data, or for a Conv,
            round to nearest (statistics ``rounding``).
        damp: GPTQ's dampening, a fraction of the mean diagonal of ``H`` added to it.
    """

    per_channel: bool = True
    reduce_range: bool = True
    conv: bool = False
    uint8_weights: bool = False
    min_elements: int = MIN_ELEMENTS
    rounding: str = "nearest"
    damp: float = 0.01

    def check(self) -> str | None:
        if self.min_elements < 1:
            return f"option min_elements must be at least 1, got {self.min_elements}"
        if self.rounding not in ROUNDINGS:
            return f"option rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}"
        if not 0.0 < self.damp <= 1.0:
            return f"option damp must be in (0, 1], got {self.damp}"
        return super().check()


@dataclass
class _Plan:
    """One node to rewrite: its activation ``x``, weight ``w``, the int8 weight ``q`` in the
    layout the integer op reads (``[K, N]`` for MatMul/Gemm, ``[M, C/g, k...]`` for Conv), the
    weight scale (``[N]``/``[M]`` or 0-d) and the bias to add (a tensor, or None)."""

    node: gs.Node
    x: gs.Variable
    w: gs.Constant
    q: np.ndarray
    scale: np.ndarray
    value: np.ndarray
    bias: gs.Tensor | None = None
    stored: int = 0


def _weight_refusal(node: gs.Node, w: gs.Tensor, usedef: UseDef,
                    options: QuantizeDynamicOptions) -> str | None:
    """Why ``node``'s weight ``w`` cannot be quantized, or None."""
    if not isinstance(w, gs.Constant):
        return "weight not an initializer"
    if np.dtype(w.dtype) != _FLOAT32:
        return "weight not float32"
    if not isinstance(w.values, np.ndarray):
        return "sparse initializer"
    if len(input_slots(w)) != 1:
        return "weight also read elsewhere"
    if usedef.on_boundary(w):
        return "graph input or output"
    if node.op != "Conv" and w.values.ndim != 2:
        return "weight not 2-D"
    if w.values.size < options.min_elements:
        return f"fewer than {options.min_elements} elements"
    if not np.isfinite(w.values).all():
        return "non-finite values"
    return None


def _node_refusal(node: gs.Node, options: QuantizeDynamicOptions) -> str | None:
    """Why ``node`` (MatMul, Gemm or Conv) stays float whatever its weight, or None."""
    if (reason := excluded(node, options)) is not None:
        return reason
    if not isinstance(node.inputs[0], gs.Variable):
        return "activation is a constant"
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA"
        beta = float(node.attrs.get("beta", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name and beta != 1.0 \
                and not isinstance(node.inputs[2], gs.Constant):
            return "Gemm bias not a constant and beta != 1"
    return None


def _plan(node: gs.Node, graph: gs.Graph, options: QuantizeDynamicOptions,
          gram: np.ndarray | None = None) -> _Plan:
    """Quantize the weight of an accepted ``node`` (with GPTQ when ``gram``, the Gram matrix of
    a MatMul/Gemm input, is given)."""
    x, w = node.inputs[0], node.inputs[1]
    values = w.values
    qmax = REDUCED_QMAX if options.reduce_range and not options.uint8_weights else QMAX
    transposed = node.op == "Gemm" and bool(node.attrs.get("transB", 0))
    axis = (0 if node.op == "Conv" or transposed else 1) if options.per_channel else None
    q, scale = quantize_symmetric(values, axis, qmax)
    if gram is not None:
        q = gptq_weight(values, gram, scale, qmax, options.damp, transposed)
    value = dequantize(q, scale, axis)
    bias = None
    if node.op == "Gemm":
        alpha = np.float32(node.attrs.get("alpha", 1.0))
        scale = (scale * alpha).astype(np.float32)
        if transposed:
            q = np.ascontiguousarray(q.T)
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias, beta = node.inputs[2], float(node.attrs.get("beta", 1.0))
            if beta != 1.0:
                bias = gs.Constant(fresh_name(graph, f"{bias.name}_beta"),
                                   (bias.values * np.float32(beta)).astype(np.float32))
    elif node.op == "Conv" and len(node.inputs) > 2 and node.inputs[2].name:
        bias = node.inputs[2]
    return _Plan(node, x, w, q, scale, value, bias)


@register
class QuantizeDynamic(Pass):
    name = "quantize_dynamic"
    description = ("Int8 weights and run-time (dynamic) uint8 activations: "
                   "DynamicQuantizeLinear + MatMulInteger (+ ConvInteger).")
    Options = QuantizeDynamicOptions
    lossless = False
    quantizes = True
    min_opset = MIN_OPSET

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        usedef = ctx.analyses.get(UseDef)
        ops = {"MatMul", "Gemm"} | ({"Conv"} if self.options.conv else set())
        refused: collections.Counter[str] = collections.Counter()
        self._shared: dict[tuple[int, str], tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
        self._plans: dict[int, _Plan] = {}
        self._biases_fused = 0
        self._nearest: dict[str, str] = {}  # group -> why GPTQ did not round its weight
        grams = self._grams(ctx)
        proposals = []
        for g in usedef.scopes:
            for node in list(g.nodes):
                if node.op == "Conv" and "Conv" not in ops and len(node.inputs) > 1 and \
                        isinstance(node.inputs[1], gs.Constant):
                    refused["Conv (option conv off: ConvInteger ran slower than float)"] += 1
                    continue
                if node.op not in ops or len(node.inputs) < 2:
                    continue
                reason = _node_refusal(node, self.options) \
                    or _weight_refusal(node, node.inputs[1], usedef, self.options)
                if reason is not None:
                    refused[reason] += 1
                    continue
                plan = _plan(node, graph, self.options, self._gram(node, g, graph, grams))
                self._plans[id(plan.w)] = plan
                proposals.extend(self._proposals(graph, g, plan))
        self._scheme = ("int8 " + ("per-channel" if self.options.per_channel else "per-tensor")
                        + (" 7-bit" if self.options.reduce_range else "")
                        + " symmetric weights, uint8 dynamic activations")
        stats = {"refused": dict(sorted(refused.items()))} if refused else {}
        return PassResult(False, stats, proposals=proposals)

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        done = [self._plans[id(p.tensor)] for p in accepted if p.value is not None]
        groups = [p.node.name or p.w.name for p in done]
        refused = collections.Counter(result.stats.get("refused", {}))
        weights = [p for p in result.proposals if p.value is not None]
        if len(weights) > len(done):
            refused["kept float: drift budget"] += len(weights) - len(done)
        return {
            "nodes_quantized": dict(sorted(collections.Counter(p.node.op for p in done).items())),
            "dynamic_quantize_linear": len(self._shared),
            "scheme": self._scheme,
            "proposed": len(result.proposals), "accepted": len(accepted),
            "refused": dict(sorted(refused.items())),
            "bytes_before": sum(nbytes(p.w) for p in done),
            "bytes_after": sum(p.stored for p in done),
            "biases_fused": self._biases_fused,
            "rounding": rounding_summary(
                self.options.rounding, sum(1 for g in groups if g not in self._nearest),
                (self._nearest[g] for g in groups if g in self._nearest)),
        }

    def _grams(self, ctx: PassContext):
        """The Gram matrices of the MatMul/Gemm inputs over every calibration position
        (``EveryPositionGrams``: the activations are quantized at run time over all of them,
        padding included) when ``rounding`` is ``gptq`` and the run has calibration data; else
        None."""
        if self.options.rounding != "gptq" or not ctx.has_calibration():
            return None
        return ctx.analyses.get(EveryPositionGrams)

    def _gram(self, node: gs.Node, g: gs.Graph, root: gs.Graph, grams) -> np.ndarray | None:
        """The Gram matrix of ``node``'s input for GPTQ, or None (the reason recorded)."""
        if self.options.rounding != "gptq":
            return None
        why, gram = self._gram_or_reason(node, g is root, grams)
        if why is not None:
            self._nearest[node.name or node.inputs[1].name] = why
        return gram

    @staticmethod
    def _gram_or_reason(node: gs.Node, in_main_graph: bool, grams) -> tuple[str | None, object]:
        """``(None, gram)`` of ``node``'s input, or ``(why not, None)``."""
        if grams is None:
            return "no calibration data", None
        if node.op not in ("MatMul", "Gemm"):
            return f"{node.op} weight", None
        if not in_main_graph:
            return "in a subgraph", None
        stats = grams.tensors.get(node.inputs[0].name)
        k = node.inputs[1].shape[1 if node.attrs.get("transB", 0) else 0]
        if stats is None or stats.gram is None or stats.gram.shape[0] != k:
            return "no Gram matrix of the input", None
        return None, stats.gram

    def _proposals(self, root: gs.Graph, g: gs.Graph, plan: _Plan) -> list[Proposal]:
        """The node's proposal group: its weight (whose ``apply`` rewrites the node) and, when
        its activation as a simulated DynamicQuantizeLinear round trip (in the node's graph)."""
        def apply() -> None:
            self._rewrite(root, g, plan)

        group = plan.node.name or plan.w.name
        weight = Proposal(tensor=plan.w, value=plan.value, apply=apply, group=group)
        return [weight,
                Proposal(tensor=plan.x, value=None, apply=lambda: None, group=group,
                         simulate=simulate_dynamic_quantization,
                         readers=[(plan.node, 0)], scope=None if g is root else g)]

    def _quantized_input(self, root: gs.Graph, g: gs.Graph,
                         x: gs.Variable) -> tuple[gs.Variable, gs.Variable, gs.Variable]:
        """``(x_q, s_x, z_x)`` of the one DynamicQuantizeLinear of ``x`` in ``g`` (added on first
        use)."""
        key = (id(g), x.name)
        if key not in self._shared:
            outs = [gs.Variable(fresh_name(root, f"{x.name}_{s}"), dtype=d, shape=shape)
                    for s, d, shape in (("quantized", np.uint8, x.shape),
                                        ("scale", np.float32, []), ("zero_point", np.uint8, []))]
            g.nodes.append(gs.Node("DynamicQuantizeLinear",
                                   name=fresh_name(root, f"{x.name}_DynamicQuantizeLinear"),
                                   inputs=[x], outputs=outs))
            self._shared[key] = tuple(outs)
        return self._shared[key]

    def _rewrite(self, root: gs.Graph, g: gs.Graph, plan: _Plan) -> None:
        """Replace ``plan.node`` by the integer pattern writing its output tensor."""
        node, y = plan.node, plan.node.outputs[0]
        x_q, s_x, z_x = self._quantized_input(root, g, plan.x)
        base = node.name or y.name

        def name(suffix: str) -> str:
            return fresh_name(root, f"{base}_{suffix}")

        q = gs.Constant(name("weight_quantized"), plan.q)
        conv = node.op == "Conv"
        w_scale = plan.scale.reshape(-1, *([1] * (plan.q.ndim - 2))) if conv and plan.scale.ndim \
            else plan.scale
        scale = gs.Constant(name("weight_scale"), w_scale.astype(np.float32))
        plan.stored = plan.q.nbytes + scale.values.nbytes
        acc = gs.Variable(name("int32"), dtype=np.int32, shape=y.shape)
        if conv:
            w_zp = gs.Constant(name("weight_zero_point"), np.zeros((), np.int8))
            plan.stored += 1
            g.nodes.append(gs.Node("ConvInteger", name=name("ConvInteger"),
                                   attrs=dict(node.attrs), inputs=[x_q, q, z_x, w_zp],
                                   outputs=[acc]))
        elif self.options.uint8_weights:
            q.values = (plan.q.astype(np.int16) + 128).astype(np.uint8)
            w_zp = gs.Constant(name("weight_zero_point"), np.array(128, np.uint8))
            plan.stored += 1
            g.nodes.append(gs.Node("MatMulInteger", name=name("MatMulInteger"),
                                   inputs=[x_q, q, z_x, w_zp], outputs=[acc]))
        else:
            g.nodes.append(gs.Node("MatMulInteger", name=name("MatMulInteger"),
                                   inputs=[x_q, q, z_x], outputs=[acc]))
        acc_f = gs.Variable(name("int32_float"), dtype=np.float32, shape=y.shape)
        g.nodes.append(gs.Node("Cast", name=name("Cast"), attrs={"to": onnx.TensorProto.FLOAT},
                               inputs=[acc], outputs=[acc_f]))
        # Mul(s_x, s_W) as its own node, s_x first: the operand order onnxruntime's
        # MatMulIntegerToFloat fusion reads A_Scale and B_Scale in.
        joint = gs.Variable(name("scale"), dtype=np.float32)
        g.nodes.append(gs.Node("Mul", name=name("scale_Mul"), inputs=[s_x, scale],
                               outputs=[joint]))
        bias = plan.bias
        if conv and bias is not None:
            bias = gs.Constant(name("bias"), bias.values.reshape(-1, 1, 1).astype(np.float32)) \
                if isinstance(bias, gs.Constant) and bias.values.ndim == 1 else bias
        scaled = y if bias is None else gs.Variable(name("scaled"), dtype=np.float32,
                                                    shape=y.shape)
        g.nodes.append(gs.Node("Mul", name=name("Mul"), inputs=[acc_f, joint], outputs=[scaled]))
        if bias is not None:
            g.nodes.append(gs.Node("Add", name=name("bias_Add"), inputs=[scaled, bias],
                                   outputs=[y]))
        node.outputs.clear()
        node.inputs.clear()
        g.nodes.remove(node)
        if bias is None and not conv:
            self._biases_fused += _bias_second(scaled, g)


def _bias_second(y: gs.Variable, g: gs.Graph) -> int:
    """Swap the operands of ``Add(bias, y)`` when it is ``y``'s only reader and ``bias`` a
    constant ``[N]``, so that onnxruntime fuses the bias into the integer kernel (1 if swapped)."""
    if len(y.outputs) != 1 or y in g.outputs:
        return 0
    add = y.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2 or add.inputs[1] is not y \
            or not isinstance(add.inputs[0], gs.Constant) or add.inputs[0].values.ndim != 1:
        return 0
    add.inputs[0], add.inputs[1] = add.inputs[1], add.inputs[0]
    return 1


def simulate_dynamic_quantization(graph: gs.Graph, x: gs.Variable) -> gs.Variable:
    """Append to ``graph`` ``DequantizeLinear(DynamicQuantizeLinear(x))`` and return its output:
    the float32 values (shape of ``x``) the integer kernels compute with in place of ``x``."""
    q, s, z = (gs.Variable(fresh_name(graph, f"{x.name}_simulated_{k}"), dtype=d, shape=shape)
               for k, d, shape in (("q", np.uint8, x.shape), ("scale", np.float32, []),
                                   ("zero_point", np.uint8, [])))
    out = gs.Variable(fresh_name(graph, f"{x.name}_simulated"), dtype=np.float32, shape=x.shape)
    graph.nodes.append(gs.Node("DynamicQuantizeLinear",
                               name=fresh_name(graph, f"{x.name}_simulated_DynamicQuantizeLinear"),
                               inputs=[x], outputs=[q, s, z]))
    graph.nodes.append(gs.Node("DequantizeLinear",
                               name=fresh_name(graph, f"{x.name}_simulated_DequantizeLinear"),
                               inputs=[q, s, z], outputs=[out]))
    return out
