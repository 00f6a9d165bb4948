"""Static int8 quantization (mode ``int8-static``): QuantizeLinear/DequantizeLinear (QDQ) pairs
with ranges calibrated on data, placed where onnxruntime runs integer kernels.

Placement, decided from the graph (not by op-type lists the user writes):

* quantized nodes: ``MatMul`` and ``Gemm`` whose weight (B) is a float32 initializer and whose
  other operand is a float activation, and ``Conv`` with an initializer kernel. onnxruntime fuses
  ``DQ(x), DQ(W) -> MatMul`` into ``MatMulIntegerToFloat``, ``DQ(x), DQ(W) -> Conv -> Q`` into
  ``QLinearConv`` and ``DQ(x), DQ(W) -> Gemm -> Q`` into ``QGemm``
  (``QDQSelectorActionTransformer``; checked in the tests through ``SessionOptions.optimized_model_filepath``), so the output of a
  Conv or Gemm is quantized too (with its own calibrated range) when it is not a graph output.
  Known gap: onnxruntime rewrites a 2-D ``MatMul -> Add(bias)`` into a Gemm before its QDQ
  fusions, which then runs in float (DQ -> Gemm) unless its output is quantized;
* everything else stays float, by construction: the attention mask path (its ``-inf`` never
  reaches a weighted op), Softmax, LayerNorm internals (Pow/Sqrt/Div/ReduceMean), activation x
  activation MatMuls and graph outputs -- the placements that make onnxruntime's own
  ``quantize_static`` collapse transformers (cosine 0.39 on MiniLM);
* propagation: the QDQ of an activation is repeated, with the same scale and zero point, on the
  inputs of the scale-preserving ops that produce it (Reshape, Transpose, Flatten, Squeeze,
  Unsqueeze, Identity, MaxPool, Relu, Clip, Concat), for that path's reader only. Those ops
  commute with ``Q`` up to saturation, so the result is unchanged, and TensorRT-style runtimes see
  the int8 path they expect; onnxruntime removes the redundant pairs.

Control flow: nodes inside If branches (nested Ifs too) are placed like the main graph's, their
QDQ in their own branch (onnxruntime fuses them there: QLinearConv inside silero-vad's
branches); calibration reaches branch tensors through the If's outputs
(``onnxopt.analyses.activations``), so a branch no calibration feed takes has no range and
stays float, reported as such (silero-vad calibrated at 16 kHz quantizes the 16 kHz branch and
leaves the 8 kHz one float). So does a branch none of the drift budget's feeds takes: the budget
leaves such groups unchanged (``Proposal.unexercised``, reported with that reason) rather than
accept them unmeasured (silero-vad calibrated at 8 kHz and validated at 16 kHz: its 8 kHz
outputs at cosine 0.982 against a budget of 0.99 before this rule). Node names may
repeat across branches; such nodes are grouped and reported as ``name (output name)``. Nodes of Loop and Scan bodies stay float (``in a Loop or Scan
body``): a body's tensor holds one iteration at a time, which calibration does not reach.
Latency-guided placement times the main graph's sites only; those of branches stay with the
drift budget.

Arithmetic (ONNX QuantizeLinear/DequantizeLinear; Jacob et al., 2018, section 2.1; onnxruntime's
QDQ format)::

    activations  a' = (clip(round(a / s_a) + z_a, qmin, qmax) - z_a) . s_a   uint8 (or int8),
                 asymmetric, [lo, hi] from calibration (onnxopt.analyses.calibration)
    weights      W'_c = clip(round(W_c / s_c), -m, m) . s_c, s_c = max|W_c| / m  per channel,
                 m = 63 (``reduce_range``, the default: see the option) or 127
    bias         b_q = round(b / (s_a . s_c))  int32, DequantizeLinear scale s_a . s_c (axis 0)

With ``uint8_weights`` a MatMul weight is stored as ``W_q + 128`` (uint8, zero point 128 per
channel), the full grid ``m = 127``: onnxruntime fuses ``DQ(x), DQ(W_u8) -> MatMul`` into a u8u8
``MatMulIntegerToFloat`` (checked in the tests), whose x86 kernels widen both operands to int16
before ``VPMADDWD`` and never saturate, while the u8s8 kernels of int8 weights do without VNNI
(``reduce_range``). Measured on MiniLM-L6 (every MatMul quantized, SmoothQuant alpha 0.75, cosine
of ``last_hidden_state`` over non-padding evaluation tokens): int8 7-bit 0.9944, uint8 8-bit
0.9960 (``mse``), 0.9970 (``minmax``), 0.9972 (``percentile``, the ``int8-static`` mode's choice).
The u8u8 kernels are slower than u8s8 here (onnxruntime 1.32, AVX2, 2 threads, one interleaved
run on a loaded machine): MiniLM ``int8-static`` 0.83x fp32 with uint8 weights, 0.72x with 7-bit
int8 ones (cosine 0.9954); on PP-OCRv4 rec (MatMuls of its SVTR blocks) CER 0.0053 with uint8
weights and ``percentile``, 0.0080 with int8 weights and ``mse``, latency within the noise.

Mixed weight grids (option ``uint8_fraction`` with ``uint8_weights = false``): the u8u8
kernels cost most of the latency the 8-bit grid buys, and the 7-bit grid costs accuracy only on
some weights. So every MatMul weight is first rounded on both grids (GPTQ when ``rounding`` says
so), each grid's drift is measured for each weight alone through the drift budget (the run's
first criterion on :data:`onnxopt.budget.RANKING_FEEDS` feeds, ``DriftBudget.harm_alone``:
leave-one-in sensitivity, Dong et al. 2019, "HAWQ", section 3), and by decreasing drift saved
per weight element (the 7-bit grid's harm minus the uint8 grid's) weights get uint8 codes while
their elements stay within ``uint8_fraction`` of all quantized MatMul weight elements (a MatMul's
multiply-adds per input row are its weight's elements). Without a drift budget every MatMul
weight is uint8 (the accurate choice); the statistics (``uint8_weights_mixed``) list the
weights given uint8 and each weight's measured gain. Measured on MiniLM-L6 (the int8-static
mode otherwise, 96 calibration batches; masked cosine on the evaluation sentences, latency
against fp32 -- 88.1 ms -- in one interleaved run of 15 rounds, 2026-12-07): every MatMul uint8
(nearest rounding) 0.99737 at 0.76x, every MatMul 7-bit (GPTQ) 0.99686 at 0.49x; GPTQ with
``uint8_fraction`` 0.34 (9 of 37 MatMuls uint8, chosen as above) 0.99731 at 0.57x, 0.2
0.99709 at 0.53x, the six FFN output projections by name (a third of the elements) 0.99728
at 0.57x; with nearest rounding 0.34 gives 0.99660. The budget's choice mixes FFN and
attention weights of several layers. The ``int8-static`` mode's default (0.34, GPTQ
rounding); its second decision (``onnxopt.pipeline.SECOND_DECISION``, when a result fails
validation) goes back to uint8 weights rounded to nearest, which ``tools/quant_benchmark.py``
measures as the ``int8-static-uint8`` recipe.

Full int8 grid for MatMuls (option ``matmul_reduce_range = false``, the ``int8-static``
mode's default since this was measured): MatMul and Gemm weights on the full grid ``[-127,
127]`` with the fast u8s8 kernels; the rare saturated pairs (above) are what onnxruntime
computes, and the drift budget, which checks its decision on the real model, measures them
(the float simulation cannot); Conv weights keep the 7-bit grid (``reduce_range``). Measured
with ``tools/quant_benchmark.py`` (2026-12-07, one run, load 2.5; the ``int8-static-int8``
recipe makes Conv weights 8-bit too): MiniLM-L6 0.99773 at 0.50x fp32 against the mixed grids'
0.99729 at 0.55x (every weight on the full grid: 0.9977 at 0.50x), the 9 uint8 MatMuls having
cost 11.4 ms of the 20.8 ms its 36 integer MatMuls took in onnxruntime's profiler; with Conv
weights 8-bit as well, PP-OCRv4 det left 8 Convs float instead of 6 (0.94x against 0.84x) and
rec's CER rose 0.001 -> 0.003, which is why Convs keep 7 bits.

GPTQ rounding (option ``rounding = "gptq"``; Frantar et al. 2023, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR, Algorithm 1, in
``onnxopt.passes._quant.gptq_rows``): a MatMul or Gemm weight is rounded input channel by input
channel on its per-channel grid (the scales fixed beforehand, as above), each channel's rounding
error spread over the channels not yet rounded through the inverse of ``H = 2 X^T X`` (the Gram
matrix of the layer's calibration inputs, ``damp`` times its mean diagonal added), channels in
decreasing ``H_kk`` (act-order: free here, the scales do not depend on the order). Conv weights
are rounded to nearest, unless ``gptq_convs``: then a pointwise Conv (1x1, group 1, no padding:
a MatMul of each position's channels) is rounded like a Gemm with ``transB``, the Gram matrix
of its input's channels as ``H``. Measured on PP-OCRv4 rec (``int8-static`` mode otherwise,
validated on the evaluation images, 2026-12-07): the drift budget accepted 18 nodes instead of
15 (15 weights rounded by GPTQ instead of 9), but the result failed validation in
onnxruntime's default session (cosine 0.9885, 0.9912 with its optimizations off) and the
second decision kept 12 -- more integer sites, more of the tie roundings described below --
so it is off by default. Measured on MiniLM-L6 (``int8-static`` mode, evaluation sentences,
masked cosine of ``last_hidden_state``): uint8 weights 0.99708 -> 0.99755, 7-bit int8 weights
0.99544 -> 0.99611. On PP-OCRv4 rec (6 MatMuls rounded by GPTQ, 38 Convs to nearest) the
drift budget's choice can fail validation: with the calibration images as validation feeds,
cosine 0.9876 in onnxruntime's default session against 0.9950 with its optimizations off
(validated on the evaluation images, it passes). The gap is onnxruntime's integer kernels
(with its ``QDQSelectorActionTransformer`` disabled the default session agrees with the
unoptimized one): QLinearConv requantizes a few outputs to the neighbouring code at ties (1 of
245,760 codes of one Conv's output on one image), which the float simulation of the budget
cannot see, and the backbone's 40 Convs and the final Softmax amplify them; which roundings
the budget accepts only moves the model nearer to or further from that edge. The
``int8-static`` mode rounds by GPTQ and, when the result fails validation, decides once more
with nearest rounding on uint8 MatMul weights (``onnxopt.pipeline.SECOND_DECISION``; rec then
validates with 17 nodes quantized).

Bias overflow guard: when ``|b_c| / (s_a . s_c) > 2^31 - 1`` (near-zero weights with a large
bias), ``s_c`` is raised to ``|b_c| / (s_a (2^31 - 1))`` so the bias fits; the weight is then
quantized on the coarser grid, whose error is at most ``s_c / 2`` per weight -- small beside the
bias that forced it.

Bias correction (option ``bias_correction``; Nagel et al., 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", ICCV, section 4.2, in its empirical form): quantizing a
weight shifts the layer's expected output by ``E[(W' - W) x] = (W' - W) E[x]``; with ``E[x]`` per
input channel from the calibration data (``TensorStats.channel_mean``; for a Conv the spatial
mean, padding ignored), the bias becomes ``b - (W' - W) E[x]``. The bias is a Conv's or Gemm's
own (then quantized to int32) or, for a MatMul, the float32 constant of the ``Add`` that is the
MatMul output's only reader (what onnxruntime folds into ``MatMulIntegerToFloat``); a node with
neither is quantized uncorrected (reported). The corrected bias is part of the node's proposal
group, so the drift budget measures the correction it would apply.

Defaults, measured here (onnxruntime 1.32 CPU, AVX2 without VNNI, 2 threads; 32 calibration and
40/32 evaluation feeds of ``models/data``): ``mse`` calibration (PP-OCRv4 rec CER 0.016 against
0.020 percentile, 0.025 minmax; MiniLM cosine 0.9876, the same as the others within 0.001;
``entropy`` clips softmax-like and GELU outputs: MiniLM 0.955); uint8 activations (int8 ones are
not fused into QLinearConv here: 5 of 38 Convs, 1.09x fp32); ``reduce_range`` (8-bit weights
saturate: CER 0.036); ``bias_correction`` (every node quantized: PP-OCRv4 rec CER 0.0174 -> 0.0080,
MiniLM cosine of the worst output 0.817 -> 0.976 (over non-padding tokens 0.9946 -> 0.9944),
angle classifier unchanged (argmax 1.0, cosine 0.99970); under the default drift budget PP-OCRv4
rec keeps 22 of 51 nodes quantized instead of 15, CER 0.0040 instead of 0.0027).

Drift budget: one proposal group per quantized node (the node's name): its weight (value: the
dequantized weight), its bias (value: the dequantized int32 bias, corrected or not; a MatMul's
corrected Add constant) and its quantized activation inputs, simulated by QuantizeLinear ->
DequantizeLinear with the calibrated parameters and routed to that node only. The budget leaves
the most harmful nodes float (sensitivity-ranked mixed precision); the statistics list the nodes
quantized, those left float and why.

Latency-guided placement (option ``latency_guided``): QDQ is worth it only where onnxruntime's
integer kernel, with the Q/DQ the placement adds around it, beats the float kernel; on small
CNNs it often does not (the angle classifier: QLinearConv 2.5 ms against float NCHWc Conv
0.9 ms per run for the same 50 convolutions in onnxruntime's profile, plus 3.1 ms of
QuantizeLinear/DequantizeLinear left around the hard-swish and squeeze-excitation ops between
them: 1.66x fp32 with every site quantized). Measured on this machine, in two steps, with
onnxruntime's graph optimizations on and its per-node profiler (``onnxopt.kernel_timing``: the
sum of each kernel's shortest time in ``latency_rounds`` interleaved runs):

1. each site -- the quantized readers of one activation, which share its QuantizeLinear -- is
   timed alone, as a small model in its integer form (``Q -> DQ`` of the input, or the codes when
   a QLinearConv produces it; DQ of the weight and int32 bias; ``Q`` of the output when the
   placement quantizes it: what onnxruntime fuses into QLinearConv, QGemm or
   MatMulIntegerToFloat) and in its float form, on the input's real shape (from the first
   calibration feed); the layout conversions onnxruntime puts around a lone kernel (NCHWc
   ``Reorder*``, NHWC ``Transpose``) are left out of both, as a whole model pays them once per
   run of same-layout ops. A site stays float when ``integer > float * (1 + latency_margin)``.
   TensorRT's builder chooses a layer's precision the same way, among those allowed, by timing
   the layer's kernels (with reformatting layers between precisions); and unlike a whole-model
   profile it needs no mapping from onnxruntime's fused and renamed nodes back to the sites;
2. the whole model confirms: the sites step 1 kept, every site, and no site quantized, each
   built and timed; the placement is the first of them within the margin of the fastest and
   not slower than the float model. Step 1 cannot see what a placement costs between sites
   (a Q/DQ and two layout conversions at every integer/float boundary): on the angle classifier
   it kept 5 to 16 of 54 sites (nine runs at load 5-10), and with them the whole model took
   2.7-3.2 ms of kernel time against 2.2-2.6 ms in float (six runs).

Shortest kernel times and a margin make two runs agree on a quiet machine; on a loaded one a
site within a few per cent of the margin can go either way (the statistics give both times):
at load 5-10 on 2 cores, five quantizations of the angle classifier wrote the same model, and
two of PP-OCRv4 rec chose the same whole-model candidate but disagreed on one 30 us Conv and a
few 50-70 us MatMuls alone -- and the drift budget, deciding among different sites, then
left a different set float.

The drift budget then decides among the sites kept. Off by default, in the pass and in the
``int8-static`` mode: with it, the output depends on the machine that quantizes and, near the
margin, on its load (measured faster on both OCR models: ``optimizer/pipeline.py`` has the
figures). Cost: one short run of two small models per site and ``latency_rounds`` runs
of three whole models (PP-OCRv4 rec: 22 s of a 120 s pass at load 5-6).

Statistics: ``nodes_quantized``, ``nodes_float`` (``{node: reason}``), ``refused``
(``{reason: count}``), ``scheme``, ``calibration`` (method, feeds, and ``rows``: the drift mask
whose 0 positions the ranges leave out), ``activation_type``, ``bias_quantized``,
``bias_scale_raised`` (overflow guard), ``bias_correction`` (``off``, or ``corrected`` nodes
among those quantized and ``not corrected`` ``{reason: count}``), ``rounding`` (``nearest``, or
with ``gptq`` the nodes quantized by GPTQ and ``nearest`` ``{reason: count}``),
``bytes_before``/``bytes_after`` (of the quantized weights), ``qdq_pairs``, ``latency`` (``off``,
or ``rounds``, ``margin``, ``float_faster`` and ``integer_kept`` ``{sites: {integer_us,
float_us}}`` of step 1, their sums ``integer_us``/``float_us``, ``whole_model_us`` per candidate
placement, the ``chosen`` one, and the ``seconds`` all this took).

Errors: UsageError for invalid options (from the pass manager's checks).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.analyses.activations import calibration_feeds, collect
from onnxopt.analyses.calibration import (CALIBRATION_METHODS, DEFAULT_PERCENTILE,
                                          tensor_range)
from onnxopt.budget import RANKING_FEEDS, UNEXERCISED, Proposal
from onnxopt.edit import nbytes
from onnxopt.graph import (branch_labels, branch_scopes, export_graph, import_graph,
                           iter_graphs, opset_version)
from onnxopt.errors import UsageError
from onnxopt.names import fresh_name
from onnxopt.ops import FLOAT_DTYPES, is_default_domain, output_channel_axis
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._quant import (QMAX, QRANGE, QuantizeOptions, broadcastable, dequantize,
                                   ROUNDINGS, excluded, gptq_weight, quantize_symmetric,
                                   rounding_summary, scale_zero_point)

#: Weights with fewer elements stay float.
MIN_ELEMENTS = 16
#: Largest weight magnitude with ``reduce_range`` (7 bits).
REDUCED_QMAX = 63
#: Zero point of ``uint8_weights`` (the symmetric int8 grid shifted into uint8).
UINT8_ZERO_POINT = 128
#: Largest int32 bias magnitude.
INT32_MAX = 2**31 - 1
#: Layout conversions onnxruntime inserts around a lone kernel (NCHWc float Conv, NHWC
#: QLinearConv): in a whole model they are paid once per run of same-layout ops, not per op, so
#: the latency comparison leaves them out of both forms.
LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput", "Transpose"})
#: Default relative margin of the latency comparison (``latency_margin``): two quantizations
#: of PP-OCRv4 rec at load 6 on 2 cores disagreed on 5 MatMuls of 50-70 us alone (up to 16 %
#: apart) with 0.05 and 20 rounds; its Convs and the whole-model choice agreed.
LATENCY_MARGIN = 0.1
#: Default timed runs of each form (``latency_rounds``).
LATENCY_ROUNDS = 50
#: The weighted ops quantized, with the index of their activation input.
QUANTIZED_OPS = {"MatMul": 0, "Gemm": 0, "Conv": 0}
#: Ops whose integer kernel in onnxruntime needs a QuantizeLinear on the output (QLinearConv,
#: QGemm); a MatMul without one runs as MatMulIntegerToFloat.
QUANTIZED_OUTPUT = frozenset({"Conv", "Gemm"})
#: Ops that commute with QuantizeLinear (same scale and zero point on input and output): the
#: QDQ of their output is repeated on their data inputs (all inputs for Concat).
SCALE_PRESERVING = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
                              "Identity", "MaxPool", "Relu", "Clip", "Concat"})
_ACTIVATION_TYPES = {"uint8": np.uint8, "int8": np.int8}
#: The quantized ops whose weights GPTQ rounds (and a pointwise Conv's with ``gptq_convs``:
#: :func:`_pointwise`).
GPTQ_OPS = frozenset({"MatMul", "Gemm"})


def _pointwise(node: gs.Node, w: gs.Constant) -> bool:
    """Whether the Conv ``node`` with weight ``w`` ``[O, C, 1, ...]`` is a 1x1 convolution over
    all input channels (group 1, no padding): a MatMul of each position's ``C`` channels by
    ``W[:, :, 0...].T``, so the Gram matrix of its input's channels is its GPTQ Hessian (a
    strided one reads a subset of the positions the Gram sums over)."""
    return (len(w.shape) >= 3 and all(d == 1 for d in w.shape[2:])
            and node.attrs.get("group", 1) == 1
            and not any(node.attrs.get("pads", [0]))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


@dataclass(frozen=True)
class QuantizeStaticOptions(QuantizeOptions):
    """Options of :class:`QuantizeStatic` (and ``exclude`` / ``ops``).

    Attributes:
        calibration: range method, one of ``minmax``, ``percentile``, ``entropy``, ``mse``
            (``onnxopt.analyses.calibration``).
        percentile: the percentile of ``percentile`` calibration, in (50, 100].
        activation_type: ``uint8`` or ``int8`` asymmetric activations.
        per_channel: one weight scale per output channel (False: per tensor).
        bias_correction: subtract the expected output shift of the quantized weight from the bias
            (Nagel et al. 2019, section 4.2).
        reduce_range: 7-bit weights (``[-63, 63]``): onnxruntime's uint8 x int8 kernels on x86
            CPUs without VNNI (AVX2 ``VPMADDUBSW``) sum pairs of products in int16 and saturate
            with 8-bit weights (measured here: QLinearConv off by 0.26 on a sigmoid output,
            exact with 7-bit weights); False on VNNI/ARM targets keeps the eighth bit.
        matmul_reduce_range: ``reduce_range`` for MatMul and Gemm weights (None: as
            ``reduce_range``). False: their full int8 grid with u8s8 kernels, whose saturation
            the drift budget's check on the real model measures (``onnxopt.budget``; module
            docstring, "Full int8 grid for MatMuls"); mixed grids (``uint8_fraction``) need
            the 7-bit grid: the pair is refused.
        uint8_weights: store MatMul weights as uint8 with zero point 128 (the full 8-bit grid
            ``[-127, 127]`` shifted by 128): onnxruntime fuses ``DQ(x), DQ(W_u8) -> MatMul`` into
            a u8u8 MatMulIntegerToFloat, whose kernels widen to int16 before multiplying and
            never saturate (module docstring); ``reduce_range`` then does not apply to them.
            Gemm and Conv weights stay int8 (QGemm/QLinearConv).
        uint8_fraction: with ``uint8_weights`` False, mixed weight grids: the MatMul weights
            are 7-bit int8 (fast u8s8 kernels), and those whose 7-bit grid costs the most drift
            per element, measured alone through the drift budget against their uint8 grid, get
            uint8 weights while their elements stay within this fraction of all quantized MatMul
            weight elements (module docstring, "Mixed weight grids"). None: one grid for all.
        min_elements: weights with fewer elements stay float.
        min_macs: a node doing fewer multiply-adds per model run than this (its weight's
            elements times the positions its input has per calibration feed) stays float: its
            QuantizeLinear/DequantizeLinear pairs cost more than its integer kernel saves (the
            1x1 convolutions of squeeze-and-excitation blocks, on a ``[N, C, 1, 1]`` input).
            0: no such rule.
        latency_guided: time every quantized site (the readers of one activation tensor, which
            share its QuantizeLinear) on onnxruntime in integer and in float form, and leave it
            float when the integer form is slower by more than ``latency_margin`` (module
            docstring, "Latency-guided placement"). Unset, ``onnxopt.optimize`` decides again
            with it a validated result more than 1.1x as slow as the lossless passes' float
            result (``onnxopt.api.RETRY_SLOWER``); setting it, true or false, is final.
        latency_margin: relative noise margin of that comparison: a site stays integer unless
            ``integer > float * (1 + latency_margin)``.
        latency_rounds: timed runs of each form (each kernel's shortest time counts).
        rounding: how weights are rounded onto their grid: ``nearest``, or ``gptq`` (MatMul and
            Gemm weights whose input has a Gram matrix; GPTQ's inverse-Hessian error
            compensation with the per-channel scales fixed beforehand, rows in act-order: see
            the module docstring). Conv weights are rounded to nearest unless ``gptq_convs``.
        damp: GPTQ's dampening, a fraction of the mean diagonal of ``H`` added to it.
        gptq_convs: with ``gptq``, also round pointwise (1x1, group 1, unpadded) Conv weights
            by GPTQ, their input channels' Gram matrix as the Hessian (module docstring).
    """

    calibration: str = "mse"
    percentile: float = DEFAULT_PERCENTILE
    activation_type: str = "uint8"
    per_channel: bool = True
    bias_correction: bool = True
    reduce_range: bool = True
    matmul_reduce_range: bool | None = None
    uint8_weights: bool = False
    uint8_fraction: float | None = None
    min_elements: int = MIN_ELEMENTS
    min_macs: int = 0
    latency_guided: bool = False
    latency_margin: float = LATENCY_MARGIN
    latency_rounds: int = LATENCY_ROUNDS
    rounding: str = "nearest"
    damp: float = 0.01
    gptq_convs: bool = False

    @property
    def matmul_reduced(self) -> bool:
        """Whether MatMul and Gemm weights take the 7-bit grid (``matmul_reduce_range``, or
        ``reduce_range`` when that is None)."""
        return self.reduce_range if self.matmul_reduce_range is None else \
            self.matmul_reduce_range

    def check(self) -> str | None:
        if self.calibration not in CALIBRATION_METHODS:
            return (f"option calibration must be one of {', '.join(CALIBRATION_METHODS)}, got "
                    f"{self.calibration!r}")
        if not 50.0 < self.percentile <= 100.0:
            return f"option percentile must be in (50, 100], got {self.percentile}"
        if self.activation_type not in _ACTIVATION_TYPES:
            return f"option activation_type must be uint8 or int8, got {self.activation_type!r}"
        if self.min_macs < 0:
            return f"option min_macs must be at least 0, got {self.min_macs}"
        if self.min_elements < 1:
            return f"option min_elements must be at least 1, got {self.min_elements}"
        if self.uint8_fraction is not None:
            if not 0.0 < self.uint8_fraction < 1.0:
                return f"option uint8_fraction must be in (0, 1), got {self.uint8_fraction}"
            if self.uint8_weights:
                return ("option uint8_fraction mixes 7-bit int8 and uint8 MatMul weights: it "
                        "needs uint8_weights = false (true makes every MatMul weight uint8)")
            if not self.matmul_reduced:
                return ("option uint8_fraction mixes 7-bit int8 and uint8 MatMul weights: it "
                        "needs 7-bit MatMul weights (matmul_reduce_range = true, or unset with "
                        "reduce_range = true)")
        if not 0.0 <= self.latency_margin < 1.0:
            return f"option latency_margin must be in [0, 1), got {self.latency_margin}"
        if self.latency_rounds < 1:
            return f"option latency_rounds must be at least 1, got {self.latency_rounds}"
        if self.rounding not in ROUNDINGS:
            return f"option rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}"
        if not 0.0 < self.damp <= 1.0:
            return f"option damp must be in (0, 1], got {self.damp}"
        return super().check()


def _is_float(t: gs.Tensor, types: TensorTypes) -> bool:
    dtype = t.dtype if t.dtype is not None else types.dtype(t)
    return dtype is not None and np.dtype(dtype).type in FLOAT_DTYPES


def _group(node: gs.Node, ambiguous: frozenset[str] = frozenset()) -> str:
    """The proposal group of ``node``: its name, or its first output's name when unnamed; a
    name of ``ambiguous`` (carried by several weighted nodes: ONNX lets the nodes of two
    branches share one) with the output's name added (tensor names are unique in the model)."""
    if not node.name:
        return node.outputs[0].name
    return f"{node.name} ({node.outputs[0].name})" if node.name in ambiguous else node.name


@dataclass
class _Site:
    """One quantized node: its activation input, weight, bias, and the tensors whose QDQ it
    needs (``chain``: ``(tensor, reader, index)``, the propagated copies included)."""

    node: gs.Node
    x: gs.Variable
    weight: gs.Constant
    axis: int | None
    bias: gs.Constant | None
    chain: list = dataclasses.field(default_factory=list)
    output: gs.Variable | None = None
    #: the output a QLinearConv / QGemm quantizes (``output`` unless a consumer's chain does)
    quantizable_output: gs.Variable | None = None
    #: a MatMul's bias: the float32 constant of the Add that alone reads its output
    bias_add: gs.Constant | None = None
    #: the graph holding ``node``: an If branch, or None for the main graph
    scope: gs.Graph | None = None


def _refusal(node: gs.Node, types: TensorTypes, options: QuantizeStaticOptions) -> str | None:
    """Why ``node`` (a MatMul/Gemm/Conv of the main graph) stays float, or None."""
    if (reason := excluded(node, options)) is not None:
        return reason
    x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant):
        return "activation x activation" if isinstance(w, gs.Variable) else "no weight"
    if not isinstance(x, gs.Variable) or x.is_empty():
        return "constant operand"
    if np.dtype(w.dtype) != np.float32 or not isinstance(w.values, np.ndarray):
        return "weight not float32"
    if not _is_float(x, types):
        return "activation not float"
    if len(w.shape) < 2 or (node.op == "MatMul" and len(w.shape) != 2):
        return "weight not a matrix"
    if node.op == "Gemm" and node.attrs.get("transA", 0):
        return "Gemm with transA"
    if w.values.size < options.min_elements:
        return f"fewer than {options.min_elements} elements"
    if not np.isfinite(w.values).all():
        return "non-finite weight"
    if any(r is not node for r in w.outputs):
        return "weight shared with other nodes"
    return None


def _propagate(x: gs.Variable, reader: gs.Node, index: int, types: TensorTypes,
               out: list, members: set[int]) -> None:
    """Append ``(tensor, reader, index)`` for ``x`` and, recursively, for the data inputs of the
    scale-preserving ops producing it among the nodes ``members`` (``id``s: the reader's graph;
    a QDQ stays in the graph of the node it feeds)."""
    out.append((x, reader, index))
    if len(x.inputs) != 1 or len(x.outputs) != 1:
        return  # a graph input, or a tensor others read: its QDQ would not be exact for them
    producer = x.inputs[0]
    if (producer.op not in SCALE_PRESERVING or not is_default_domain(producer)
            or id(producer) not in members):
        return
    if producer.op == "Clip":
        return  # Clip(min > 0) does not commute with a grid widened to hold 0.0
    slots = range(len(producer.inputs)) if producer.op == "Concat" else [0]
    for i in slots:
        t = producer.inputs[i]
        if (isinstance(t, gs.Variable) and _is_float(t, types)
                and not any(t is c for c, _, _ in out)):
            _propagate(t, producer, i, types, out, members)


def _bias_add(node: gs.Node, outputs: set[str]) -> gs.Constant | None:
    """The float32 constant ``c`` of ``MatMul -> Add(c)`` when that Add alone reads the MatMul
    output, ``c`` has one value per output column and nothing else reads it; else None."""
    y = node.outputs[0]
    if y.name in outputs or len(y.outputs) != 1:
        return None
    add = y.outputs[0]
    if add.op != "Add" or not is_default_domain(add) or len(add.inputs) != 2:
        return None
    c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    w = node.inputs[1]
    if not (isinstance(c, gs.Constant) and isinstance(c.values, np.ndarray)
            and np.dtype(c.dtype) == np.float32 and len(c.outputs) == 1
            and c.values.size == w.shape[-1] and c.shape[-1] == w.shape[-1]):
        return None
    return c


def _input_channels(node: gs.Node, w: gs.Constant) -> int:
    """How many channels of the activation input the weight reads (K, or C of a Conv)."""
    if node.op == "Conv":
        return w.shape[1] * node.attrs.get("group", 1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return w.shape[1]
    return w.shape[0]


def _macs(site: _Site, stats) -> float:
    """Multiply-adds of ``site``'s node per calibration feed: its weight's elements (one
    multiply-add each per position) times the positions of its input -- the input's elements
    per feed over the channels the weight reads (stride ignored)."""
    x = stats[site.x.name]
    positions = x.count / max(stats.feeds, 1) / _input_channels(site.node, site.weight)
    return positions * site.weight.values.size


def _settle_outputs(sites: list[_Site], unranged: set[str]) -> None:
    """Set each site's ``output``: its quantizable output, unless it has no calibrated range
    or a consumer's chain quantizes it with another tensor's parameters (a QDQ propagated
    through a scale-preserving op). A tensor that consumers' chains quantize directly is the
    output too, with the same parameters (their QDQ is shared): the site's QDQ reaches every
    reader, whichever consumers the drift budget keeps float, without which onnxruntime cannot
    fuse the producer (``QLinearConv`` needs ``Q`` as its output's only reader: a residual
    ``Add`` or a float consumer reading the output left the Conv in float, its weight
    dequantized on every run)."""
    propagated = {id(t) for s in sites for t, _, _ in s.chain if t is not s.x}
    for s in sites:
        y = s.quantizable_output
        s.output = y if y is not None and id(y) not in propagated and y.name not in unranged \
            else None


def _by_input(sites: list[_Site]) -> dict[str, list[_Site]]:
    """The sites by the name of the activation they read (the readers of one QuantizeLinear),
    in graph order."""
    groups: dict[str, list[_Site]] = collections.defaultdict(list)
    for site in sites:
        groups[site.x.name].append(site)
    return groups


def _int32_bias(b: np.ndarray, s_x: np.float32, scale: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """A bias as int32 codes and their scale ``s_x * s_w`` (float32, per output channel or
    scalar), what QLinearConv / QGemm / MatMulIntegerToFloat add in the accumulator (ONNX
    QLinearConv spec: ``B`` int32 with scale ``x_scale * w_scale``, zero point 0). Codes
    beyond the int32 range saturate at ``+-INT32_MAX``; the division and the clip are done in
    float64, where ``INT32_MAX`` is exact (in float32 it rounds up to ``2**31``, which the cast
    wraps to ``-2**31``: a saturated positive bias would flip its sign)."""
    bias_scale = np.asarray(float(s_x) * np.asarray(scale, np.float64), np.float32)
    codes = np.rint(np.asarray(b, np.float64) / np.asarray(bias_scale, np.float64))
    return np.clip(codes, -INT32_MAX, INT32_MAX).astype(np.int32), bias_scale


def _stored(q: np.ndarray, scale: np.ndarray, unsigned: bool) -> tuple[np.ndarray, np.ndarray]:
    """The weight codes as stored and their zero point: int8 ``q`` with zero point 0, or
    (``unsigned``) ``q + 128`` as uint8 with zero point 128, one per element of ``scale``."""
    if unsigned:
        return ((q.astype(np.int16) + UINT8_ZERO_POINT).astype(np.uint8),
                np.full_like(scale, UINT8_ZERO_POINT, np.uint8))
    return q, np.zeros_like(scale, np.int8)


def float_faster(times: dict[str, tuple[float, float]], margin: float) -> set[str]:
    """The keys of ``times`` (``{site group: (integer us, float us)}``) whose integer form is
    slower than ``float * (1 + margin)``: within the margin a site stays integer (smaller, and
    the difference is not told apart from noise)."""
    return {k for k, (t_int, t_float) in times.items() if t_int > t_float * (1.0 + margin)}


def whole_model_choice(times: dict[str, float], margin: float, float_model: str) -> str:
    """The placement to keep among ``times`` (``{placement: us}`` in order of preference: the
    sites measured faster alone, every site, none; ``float_model`` names the one without
    integer sites): the first within ``margin`` of the fastest and not slower than the float
    model. The whole model overrules the sites' own timings only beyond the noise margin, and
    integer sites never make the model slower than fp32 as measured."""
    bound = min(min(times.values()) * (1.0 + margin), times[float_model])
    return next(name for name, t in times.items() if t <= bound)


@register
class QuantizeStatic(Pass):
    name = "quantize_static"
    description = ("Static int8 QDQ quantization with calibrated activation ranges, placed where "
                   "integer kernels run.")
    Options = QuantizeStaticOptions
    lossless = False
    quantizes = True
    requires = frozenset({"calibration"})
    #: Per-channel DequantizeLinear (1-D scale, axis) exists from opset 13.
    min_opset = 13
    #: The pass manager upgrades opset 11/12 models to this opset first.
    upgrade_opset = 13

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        dtype = np.dtype(_ACTIVATION_TYPES[o.activation_type])
        refused: collections.Counter[str] = collections.Counter()
        self._float: dict[str, str] = {}
        # mixed weight grids: chosen below, after any latency-guided placement (which times
        # the 7-bit grid until then)
        self._uint8: set[str] | None = None
        self._mixed: dict | None = None
        sites: list[_Site] = []
        types = ctx.analyses.get(TensorTypes)
        named = collections.Counter(n.name for g in iter_graphs(graph) for n in g.nodes
                                    if n.op in QUANTIZED_OPS and n.name)
        self._ambiguous = frozenset(name for name, k in named.items() if k > 1)
        for scope, _, calibrated in branch_scopes(graph):
            outputs = set(t.name for t in scope.outputs)
            members = {id(n) for n in scope.nodes}
            for node in scope.nodes:
                if node.op not in QUANTIZED_OPS or not is_default_domain(node):
                    continue
                reason = _refusal(node, types, o) if calibrated else \
                    "in a Loop or Scan body (not calibrated)"
                if reason is not None:
                    refused[reason] += 1
                    self._float[self._group(node)] = reason
                    continue
                w = node.inputs[1]
                bias = node.inputs[2] if len(node.inputs) > 2 else None
                if not (isinstance(bias, gs.Constant) and len(bias.shape) == 1
                        and np.dtype(bias.dtype) == np.float32):
                    bias = None
                axis = output_channel_axis(node, 1, len(w.shape)) if o.per_channel else None
                site = _Site(node, node.inputs[0], w, axis, bias,
                             scope=None if scope is graph else scope)
                if o.bias_correction and node.op == "MatMul":
                    site.bias_add = _bias_add(node, outputs)
                _propagate(site.x, node, 0, types, site.chain, members)
                y = node.outputs[0]
                if (node.op in QUANTIZED_OUTPUT and y.name not in outputs
                        and _is_float(y, types)):
                    site.quantizable_output = y  # QLinearConv / QGemm: DQ -> Conv/Gemm -> Q
                sites.append(site)

        _settle_outputs(sites, set())
        names = {s.x.name for s in sites} | {s.output.name for s in sites if s.output}
        if o.latency_guided:  # a site left float may leave its producer's output unquantized
            names |= {s.quantizable_output.name for s in sites if s.quantizable_output}
        feeds = calibration_feeds(ctx, "static quantization")
        gptq = o.rounding == "gptq"
        channel = {s.x.name: (1 if s.node.op == "Conv" else -1) for s in sites} \
            if o.bias_correction or gptq else {}
        grams = sorted({s.x.name for s in sites if self._gptq_rounds(s)}) if gptq else []
        stats = collect(export_graph(graph, ctx.template),
                        {n: channel.get(n) for n in sorted(names)}, feeds, grams=grams,
                        rows=ctx.drift_mask())
        # A tensor the calibration feeds never gave a finite value of has no range: its node
        # stays float (quantizing it with scale 1.0 would be a guess); none at all is bad data.
        # (a tensor of an If branch no feed takes has none either: its node stays float)
        unseen = sorted(n for n in names if stats[n].count == 0)
        main = {s.x.name for s in sites if s.scope is None}
        if unseen and len(unseen) == len(names) and main:
            raise UsageError(f"calibration data gave no finite value of any tensor to quantize "
                             f"(e.g. '{sorted(main)[0]}'): all NaN, infinite or empty feeds?")
        self._root = graph
        self._untaken: dict[int, gs.Graph] = {}  # If branches left float for want of feeds
        for site in [s for s in sites if stats[s.x.name].count == 0]:
            why = ("no finite calibration value" if site.scope is None else
                   "no calibration value (no feed takes its If branch, or none finite)")
            if site.scope is not None:
                self._untaken[id(site.scope)] = site.scope
            refused[why] += 1
            self._float[self._group(site.node)] = why
            sites.remove(site)
        for site in [s for s in sites if o.min_macs and _macs(s, stats) < o.min_macs]:
            refused["too small to gain"] += 1
            self._float[self._group(site.node)] = (
                f"too small to gain ({_macs(site, stats):.0f} multiply-adds per run)")
            sites.remove(site)
        unranged = {n for n in names if stats[n].count == 0}
        _settle_outputs(sites, unranged)
        self._ranges = {n: tensor_range(stats[n], o.calibration, o.percentile, dtype)
                        for n in names if n not in unranged}
        self._latency: dict | None = None
        self._rounded_codes: dict[tuple, np.ndarray] = {}
        if o.latency_guided and any(s.scope is None for s in sites):
            # the main graph's sites (timing models take main-graph shapes); If branches' stay
            branched = [s for s in sites if s.scope is not None]
            sites = self._place_by_latency(graph, ctx.template,
                                           [s for s in sites if s.scope is None],
                                           next(iter(feeds)), stats, dtype, unranged,
                                           refused) + branched
        self._calibration = {"method": o.calibration, "feeds": stats.feeds,
                             **({"rows": ctx.drift_mask()} if ctx.drift_mask() else {}),
                             **({"percentile": o.percentile}
                                if o.calibration == "percentile" else {})}
        if o.uint8_fraction is not None and not o.uint8_weights:
            self._reset_tallies()  # GPTQ's codes of both grids are cached, not counted
            self._uint8 = self._choose_uint8(graph, ctx, sites, stats)
        self._reset_tallies()
        proposals = []
        for site in sites:
            proposals.extend(self._site_proposals(graph, site, stats, dtype))
        self._sites = {self._group(s.node): s for s in sites}
        return PassResult(False, {"refused": dict(sorted(refused.items()))} if refused else {},
                          proposals=proposals)

    def _scheme(self) -> str:
        """The weights' grids in words: uint8 (zero point 128), 7-bit int8 (``[-63, 63]``,
        ``reduce_range``) or 8-bit int8 (``[-127, 127]``), for MatMul/Gemm and Conv weights."""
        o = self.options
        bits = {True: "7-bit", False: "8-bit"}
        matmul = bits[o.matmul_reduced]
        conv = bits[o.reduce_range]
        scheme = "QDQ, per-channel" if o.per_channel else "QDQ, per-tensor"
        if o.uint8_weights:
            return f"{scheme} uint8 MatMul weights (zero point 128), {conv} int8 others"
        if self._mixed is not None and self._mixed.get("uint8"):
            return (f"{scheme} {matmul} int8 weights, uint8 for the MatMuls listed in "
                    f"uint8_weights_mixed")
        if matmul == conv:
            return f"{scheme} {conv} int8 weights"
        return f"{scheme} int8 weights, {matmul} MatMul/Gemm, {conv} Conv"

    def _group(self, node: gs.Node) -> str:
        """:func:`_group` of ``node`` in this run."""
        return _group(node, self._ambiguous)

    def _reset_tallies(self) -> None:
        """Forget what building and applying proposals counted (QDQ pairs, stored bytes, biases,
        corrections): the tallies of the proposals the pass returns start from here."""
        self._qdq: dict[tuple, gs.Variable] = {}
        self._stored: dict[str, int] = {}
        self._raised = self._biases = 0
        self._corrected: set[str] = set()
        self._uncorrected: collections.Counter[str] = collections.Counter()
        self._gptq: set[str] = set()
        self._nearest: dict[str, str] = {}  # group -> why its weight was rounded to nearest

    def _params(self, name: str, dtype: np.dtype) -> tuple[np.float32, np.ndarray]:
        lo, hi = self._ranges[name]
        return scale_zero_point(lo, hi, dtype)

    def _site_proposals(self, graph: gs.Graph, site: _Site, stats, dtype) -> list[Proposal]:
        """The proposal group of ``site``: its weight (and int32 or corrected bias) and its
        simulated activation QDQ; ``graph`` is the main graph (names come from its authority,
        nodes go to the site's own graph)."""
        o, node, w = self.options, site.node, site.weight
        scope = site.scope if site.scope is not None else graph
        s_x, z_x = self._params(site.x.name, dtype)
        unsigned, qmax = self._grid(node)
        bias_q = None
        out_axis = output_channel_axis(node, 1, len(w.shape))
        channels = w.shape[out_axis]
        if site.bias is not None and site.bias.values.size != channels:
            site.bias = None  # a broadcast Gemm C: left float
        group = self._group(node)
        mean = self._input_mean(site, stats[site.x.name]) if o.bias_correction else None
        extra = []
        needed = None
        if site.bias is not None:
            b = np.asarray(site.bias.values, np.float64)
            # overflow guard: |b| / (s_x s_w) must fit in int32 (module docstring)
            needed = ((np.abs(b) if site.axis is not None else np.abs(b).max())
                      / (float(s_x) * INT32_MAX)).astype(np.float32)
        q, scale = self._codes(site, stats, qmax, needed)
        if site.bias is not None:
            if mean is not None:
                b = b - self._shift(node, dequantize(q, scale, site.axis) - w.values, mean)
            bias_q, bias_scale = _int32_bias(b, s_x, scale)
            # what the int32 bias dequantizes to (DequantizeLinear: float32 product), for the
            # budget to measure the model apply_weight writes: a bias rounded differently flips
            # roundings of the QuantizeLinear after the node, which the budget, choosing among
            # many groups on the same feeds, would otherwise fit to (cls: estimate 0.99995,
            # saved model 0.99921)
            value = bias_q.astype(np.float32) * bias_scale
            extra.append(Proposal(tensor=site.bias, value=value, apply=lambda: None, group=group))
        elif mean is not None and site.bias_add is not None:
            c = site.bias_add
            value = (np.asarray(c.values, np.float64) - self._shift(
                node, dequantize(q, scale, site.axis) - w.values, mean).reshape(c.shape)
                     ).astype(np.float32)

            def apply_add() -> None:
                c.values = value

            extra.append(Proposal(tensor=c, value=value, apply=apply_add, group=group))
        elif mean is not None:
            self._uncorrected["no bias to absorb the correction"] += 1
            mean = None
        if mean is not None:
            self._corrected.add(group)
        w_q = dequantize(q, scale, site.axis)

        def apply_weight() -> None:
            def name(suffix):
                return fresh_name(graph, f"{w.name}_{suffix}")
            attrs = {"axis": site.axis} if site.axis is not None else {}
            out = gs.Variable(name("dequantized"), np.float32, w.shape)
            stored, zero_point = _stored(q, scale, unsigned)
            added = [gs.Constant(name("quantized"), stored), gs.Constant(name("scale"), scale),
                     gs.Constant(name("zero_point"), zero_point)]
            scope.nodes.append(gs.Node("DequantizeLinear", name("DequantizeLinear"), attrs,
                                       list(added), [out]))
            node.inputs[1] = out
            self._stored[group] = sum(c.values.nbytes for c in added)
            if bias_q is not None:
                bname = (site.bias.name if site.bias is not None else f"{node.name}_bias")
                bout = gs.Variable(fresh_name(graph, f"{bname}_dequantized"), np.float32,
                                   list(bias_q.shape))
                bconsts = [gs.Constant(fresh_name(graph, f"{bname}_quantized"), bias_q),
                           gs.Constant(fresh_name(graph, f"{bname}_scale"), bias_scale),
                           gs.Constant(fresh_name(graph, f"{bname}_zero_point"),
                                       np.zeros(bias_scale.shape, np.int32))]
                scope.nodes.append(gs.Node("DequantizeLinear",
                                           fresh_name(graph, f"{bname}_DequantizeLinear"),
                                           {"axis": 0} if bias_scale.ndim else {}, bconsts,
                                           [bout]))
                while len(node.inputs) < 3:
                    node.inputs.append(gs.Variable.empty())
                node.inputs[2] = bout
                self._biases += 1

        proposals = [Proposal(tensor=w, value=w_q, apply=apply_weight, group=group), *extra]
        for t, reader, index in site.chain:
            if t is site.x:
                proposals.append(self._activation(graph, site.scope, t, (s_x, z_x),
                                                  [(reader, index)], site.chain, group))
        if site.output is not None:
            y = site.output
            params = self._params(y.name, dtype)
            chain = [(y, r, i) for r in list(y.outputs) for i, t in enumerate(r.inputs)
                     if t is y]
            proposals.append(self._activation(graph, site.scope, y, params, None, chain, group))
        return proposals

    def _codes(self, site: _Site, stats, qmax: int, needed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, scale)`` of ``site``'s weight on the symmetric grid ``[-qmax, qmax]``,
        rounded as ``rounding`` says; ``needed``: the smallest scale per channel the int32 bias
        allows (the overflow guard raises the scale to it, counted in ``bias_scale_raised``)."""
        w = site.weight.values
        q, scale = quantize_symmetric(w, site.axis, qmax)
        if needed is not None and np.any(needed > scale):
            self._raised += int(np.sum(needed > scale))
            scale = np.asarray(np.maximum(scale, needed * np.float32(1.0 + 1e-6)), np.float32)
            q = np.clip(np.rint(w / broadcastable(scale, w.ndim, site.axis)),
                        -qmax, qmax).astype(np.int8)
        return self._rounded(site, stats, q, scale, qmax), scale

    def _rounded(self, site: _Site, stats, q: np.ndarray, scale: np.ndarray,
                 qmax: int) -> np.ndarray:
        """The weight codes of ``site`` on the grid ``scale`` (int8, the weight's layout):
        ``q`` (round to nearest) unless ``rounding`` is ``gptq`` and the input's Gram matrix is
        known; then GPTQ's (computed once per site and scale)."""
        node, group = site.node, self._group(site.node)
        if self.options.rounding != "gptq":
            return q
        conv = node.op == "Conv"
        if not self._gptq_rounds(site):
            self._nearest[group] = f"{node.op} weight" + (
                "" if not conv else " (not 1x1)" if self.options.gptq_convs else
                " (gptq_convs off)")
            return q
        gram = stats[site.x.name].gram
        transposed = conv or node.op == "Gemm" and bool(node.attrs.get("transB", 0))
        if gram is None or gram.shape[0] != _input_channels(node, site.weight):
            self._nearest[group] = "no Gram matrix of the input"
            return q
        key = (site.weight.name, np.asarray(scale).tobytes())  # tensor names are unique
        if key not in self._rounded_codes:
            values = site.weight.values  # a pointwise Conv's [O, C, 1...] as [O, C] (transB)
            codes = gptq_weight(values.reshape(values.shape[:2]) if conv else values, gram,
                                scale, qmax, self.options.damp, transposed)
            self._rounded_codes[key] = codes.reshape(values.shape)
        self._gptq.add(group)
        return self._rounded_codes[key]

    def _gptq_rounds(self, site: _Site) -> bool:
        """Whether GPTQ rounds ``site``'s weight (given a Gram matrix of its input)."""
        if site.node.op == "Conv":
            return self.options.gptq_convs and _pointwise(site.node, site.weight)
        return site.node.op in GPTQ_OPS

    def _grid(self, node: gs.Node, unsigned: bool | None = None) -> tuple[bool, int]:
        """``(unsigned, qmax)`` of ``node``'s weight: uint8 codes (``uint8_weights``, or the
        MatMuls ``uint8_fraction`` chose; MatMul only) and the largest code magnitude.
        ``unsigned`` given: that grid (a MatMul's)."""
        if unsigned is None:
            chosen = self._uint8
            unsigned = node.op == "MatMul" and (
                self.options.uint8_weights if chosen is None else self._group(node) in chosen)
        return unsigned, REDUCED_QMAX if self._reduced(node) and not unsigned else QMAX

    def _reduced(self, node: gs.Node) -> bool:
        """Whether ``node``'s weight takes the 7-bit grid (``reduce_range`` options)."""
        o = self.options
        return o.matmul_reduced if node.op in ("MatMul", "Gemm") else o.reduce_range

    def _choose_uint8(self, graph: gs.Graph, ctx: PassContext, sites: list[_Site],
                      stats) -> set[str]:
        """The MatMul sites (groups) given uint8 weights by ``uint8_fraction`` (module
        docstring, "Mixed weight grids"); the measurement goes to ``self._mixed``."""
        matmuls = [s for s in sites if s.node.op == "MatMul"]
        total = sum(int(s.weight.values.size) for s in matmuls)
        self._mixed = {"fraction": self.options.uint8_fraction, "uint8": [],
                       "elements_uint8": 0, "elements": total}
        if not matmuls:
            return set()
        if ctx.budget is None:  # nothing to measure with: the accurate grid everywhere
            chosen = {self._group(s.node) for s in matmuls}
            self._mixed.update(ranking="none (no drift budget to measure with): every MatMul "
                               "weight uint8", uint8=sorted(chosen), elements_uint8=total)
            return chosen
        harm = {}
        for unsigned in (False, True):  # one tensor takes one proposal per measurement
            proposals = []
            for site in matmuls:
                q, scale = self._codes(site, stats, self._grid(site.node, unsigned)[1])
                proposals.append(Proposal(tensor=site.weight,
                                          value=dequantize(q, scale, site.axis),
                                          apply=lambda: None, group=self._group(site.node)))
            harm[unsigned] = ctx.budget.harm_alone(graph, ctx.template, proposals,
                                                   RANKING_FEEDS)
        # what the uint8 grid saves over the 7-bit one, per weight element
        gain = {g: harm[False][g] - harm[True][g] for g in harm[False]}
        size = {self._group(s.node): int(s.weight.values.size) for s in matmuls}
        limit = self.options.uint8_fraction * total
        chosen, used = set(), 0
        for group in sorted(gain, key=lambda g: -gain[g] / size[g]):
            if gain[group] > 0 and used + size[group] <= limit:
                chosen.add(group)
                used += size[group]
        self._mixed.update(ranking="measured", uint8=sorted(chosen), elements_uint8=used,
                           gain={g: gain[g] for g in sorted(gain, key=lambda g: -gain[g])})
        return chosen

    def _place_by_latency(self, graph: gs.Graph, template, sites: list[_Site], feed: dict,
                          stats, dtype: np.dtype, unranged: set[str],
                          refused: collections.Counter) -> list[_Site]:
        """The sites to quantize when onnxruntime's speed decides (module docstring,
        "Latency-guided placement"); the others are recorded as float, with their times.

        Raises:
            InputError: onnxruntime cannot run the model or a timing model.
        """
        from onnxopt.kernel_timing import kernel_times

        o = self.options
        start = time.perf_counter()
        measured = self._time_sites(graph, template, sites, feed, dtype)
        slower = float_faster(measured, o.latency_margin)
        kept = [s for s in sites if s.x.name not in slower]
        _settle_outputs(kept, unranged)
        # the whole model confirms: isolated timings miss what a placement costs between its
        # sites (layout conversions, Q/DQ at every integer/float boundary)
        candidates = {"measured": kept, "every site": sites, "none": []}
        models, placed = {}, {}
        for name, chosen in candidates.items():
            key = frozenset(id(s) for s in chosen)
            if key not in placed:  # not the placement of an earlier candidate
                placed[key] = name
                models[name] = self._placed_model(graph, template, chosen, stats, dtype,
                                                  unranged)
        times = kernel_times(models, {name: feed for name in models}, o.latency_rounds)
        choice = whole_model_choice(times, o.latency_margin, placed[frozenset()])
        groups = _by_input(sites)

        def listing(keys):
            return {", ".join(self._group(s.node) for s in groups[x]):
                    {"integer_us": measured[x][0], "float_us": measured[x][1]} for x in keys}

        self._latency = {
            "rounds": o.latency_rounds, "margin": o.latency_margin,
            "float_faster": listing(x for x in groups if x in slower),
            "integer_kept": listing(x for x in groups if x not in slower),
            "integer_us": sum(t for t, _ in measured.values()),
            "float_us": sum(t for _, t in measured.values()),
            "whole_model_us": times, "chosen": choice,
            "seconds": round(time.perf_counter() - start, 2)}
        chosen = candidates[choice]
        with_kept = times["measured"]
        quantized = {id(s) for s in chosen}
        for site in sites:
            if id(site) in quantized:
                continue
            refused["kept float: faster than integer"] += 1
            t_int, t_float = measured[site.x.name]
            self._float[self._group(site.node)] = (
                f"float faster ({t_float:.0f} us, integer {t_int:.0f} us)"
                if site.x.name in slower else
                f"float faster in the whole model ({times[choice]:.0f} us, {with_kept:.0f} us "
                f"with the sites faster alone in integer form)")
        _settle_outputs(chosen, unranged)
        return chosen

    def _placed_model(self, graph: gs.Graph, template, sites: list[_Site], stats,
                      dtype: np.dtype, unranged: set[str]) -> onnx.ModelProto:
        """The model with every proposal of ``sites`` applied, built on a copy of ``graph``
        (the pass's graph is left as it was; its tallies are reset before its own proposals)."""
        model = export_graph(graph, template)
        if not sites:
            return model
        copy = import_graph(model)
        tensors = copy.tensors()
        producers = {n.outputs[0].name: n for n in copy.nodes if n.outputs}

        def tensor(t):
            return None if t is None else tensors[t.name]

        def node(n):
            return producers[n.outputs[0].name]

        moved = [_Site(node(s.node), tensor(s.x), tensor(s.weight), s.axis, tensor(s.bias),
                       [(tensor(t), node(r), i) for t, r, i in s.chain], tensor(s.output),
                       tensor(s.quantizable_output), tensor(s.bias_add)) for s in sites]
        _settle_outputs(moved, unranged)
        self._reset_tallies()
        for site in moved:
            for proposal in self._site_proposals(copy, site, stats, dtype):
                proposal.apply()
        copy.cleanup().toposort()
        return export_graph(copy, template)

    def _time_sites(self, graph: gs.Graph, template, sites: list[_Site], feed: dict,
                    dtype: np.dtype) -> dict[str, tuple[float, float]]:
        """``{activation: (integer us, float us)}``: the sites reading each activation, timed
        alone in both forms (:meth:`_timing_models`) on its shape when the model runs on
        ``feed``, layout conversions left out."""
        from onnxopt.kernel_timing import kernel_times, tensor_shapes

        groups = _by_input(sites)
        shapes = tensor_shapes(export_graph(graph, template), sorted(groups), feed)
        opset, ir_version = opset_version(graph), max(template.ir_version, 7)
        coded = ({id(s.output) for s in sites if s.output is not None}
                 | {id(t) for s in sites for t, _, _ in s.chain})
        site_nodes = {id(s.node) for s in sites}
        models, feeds = {}, {}
        for x, members in groups.items():
            pair = self._timing_models(members, shapes[x], coded, site_nodes, dtype, opset,
                                       ir_version)
            for form, (m, f) in zip(("integer", "float"), pair):
                models[(x, form)], feeds[(x, form)] = m, f
        times = kernel_times(models, feeds, self.options.latency_rounds, skip=LAYOUT_OPS)
        return {x: (times[(x, "integer")], times[(x, "float")]) for x in groups}

    def _timing_models(self, sites: list[_Site], shape: tuple, coded: set[int],
                       site_nodes: set[int], dtype: np.dtype, opset: int,
                       ir_version: int) -> tuple[tuple, tuple]:
        """The integer and the float form of the sites reading one activation ``x`` (shape
        ``shape``), each as ``(model, feed)``: ``x -> Q -> DQ`` once, then each site's op on its
        dequantized weight and int32 bias, its output quantized when the placement quantizes it
        (then onnxruntime fuses QLinearConv / QGemm / MatMulIntegerToFloat as in the whole model);
        and the ops on the float weights. When ``x`` is the quantized output of another site (a
        QLinearConv feeding a QLinearConv), the integer form starts from its codes, as the whole
        model does. ``coded``, ``site_nodes``: ``id`` of the tensors the placement quantizes and
        of the nodes it quantizes. Feeds are random: kernel time does not depend on the values."""
        h, x = onnx.helper, sites[0].x
        rng = np.random.default_rng(0)
        s_x, z_x = self._params(x.name, dtype)
        # x, or a tensor its QDQ is propagated to, is the output of a quantized Conv/Gemm
        from_codes = any(id(t) in coded and len(t.inputs) == 1 and id(t.inputs[0]) in site_nodes
                         and t.inputs[0].op in QUANTIZED_OUTPUT for t, _, _ in sites[0].chain)
        elem = h.np_dtype_to_tensor_dtype(np.dtype(dtype))
        init_i, init_f, nodes_i, nodes_f, outs_i, outs_f = [], [], [], [], [], []

        def const(store, name, value):
            store.append(onnx.numpy_helper.from_array(np.asarray(value), name))
            return name

        const(init_i, "x_scale", s_x), const(init_i, "x_zero_point", z_x)
        if from_codes:
            inputs_i = [h.make_tensor_value_info("xq", elem, shape)]
        else:
            inputs_i = [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)]
            nodes_i.append(h.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"]))
        nodes_i.append(h.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"]))
        for k, site in enumerate(sites):
            node, w = site.node, site.weight
            unsigned, qmax = self._grid(node)
            q, scale = quantize_symmetric(w.values, site.axis, qmax)
            stored, zero_point = _stored(q, scale, unsigned)
            axis = {"axis": site.axis} if site.axis is not None else {}
            nodes_i.append(h.make_node("DequantizeLinear", [
                const(init_i, f"w{k}", stored), const(init_i, f"w{k}_scale", scale),
                const(init_i, f"w{k}_zero_point", zero_point)], [f"w{k}d"], **axis))
            names_i, names_f = ["xd", f"w{k}d"], ["x", const(init_f, f"w{k}", w.values)]
            if site.bias is not None:
                b_q, b_scale = _int32_bias(site.bias.values, s_x, scale)
                const(init_i, f"b{k}", b_q), const(init_i, f"b{k}_scale", b_scale)
                const(init_i, f"b{k}_zero_point", np.zeros(b_scale.shape, np.int32))
                nodes_i.append(h.make_node("DequantizeLinear", [f"b{k}", f"b{k}_scale",
                                                                f"b{k}_zero_point"], [f"b{k}d"],
                                           **({"axis": 0} if b_scale.ndim else {})))
                names_i.append(f"b{k}d")
                names_f.append(const(init_f, f"b{k}", site.bias.values))
            attrs = dict(node.attrs)
            nodes_i.append(h.make_node(node.op, names_i, [f"y{k}"], **attrs))
            nodes_f.append(h.make_node(node.op, names_f, [f"y{k}"], **attrs))
            outs_f.append(h.make_empty_tensor_value_info(f"y{k}"))
            y = node.outputs[0]
            if id(y) in coded and y.name in self._ranges:
                s_y, z_y = self._params(y.name, dtype)
                const(init_i, f"y{k}_scale", s_y), const(init_i, f"y{k}_zero_point", z_y)
                nodes_i.append(h.make_node("QuantizeLinear", [f"y{k}", f"y{k}_scale",
                                                              f"y{k}_zero_point"], [f"y{k}q"]))
                outs_i.append(h.make_empty_tensor_value_info(f"y{k}q"))
            else:
                outs_i.append(h.make_empty_tensor_value_info(f"y{k}"))
        opsets = [h.make_opsetid("", opset)]
        model_i = h.make_model(h.make_graph(nodes_i, "integer", inputs_i, outs_i, init_i),
                               opset_imports=opsets, ir_version=ir_version)
        model_f = h.make_model(h.make_graph(nodes_f, "float", [h.make_tensor_value_info(
            "x", onnx.TensorProto.FLOAT, shape)], outs_f, init_f), opset_imports=opsets,
            ir_version=ir_version)
        lo, hi = QRANGE[np.dtype(dtype)]
        feed_i = ({"xq": rng.integers(lo, hi + 1, shape).astype(dtype)} if from_codes
                  else {"x": rng.standard_normal(shape).astype(np.float32)})
        return (model_i, feed_i), (model_f, {"x": rng.standard_normal(shape).astype(np.float32)})

    def _input_mean(self, site: _Site, stats) -> np.ndarray | None:
        """``E[x]`` per input channel of ``site`` (float64, ``[C]``), or None (reason counted)."""
        mean = stats.channel_mean
        if mean is None or mean.size != _input_channels(site.node, site.weight):
            self._uncorrected["no per-channel mean of the input"] += 1
            return None
        return mean

    @staticmethod
    def _shift(node: gs.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray:
        """``E[(W' - W) x] = (W' - W) E[x]`` per output channel (float64, ``[M]``); ``delta``
        is ``W' - W`` in the weight's layout, ``mean`` ``E[x]`` per input channel (``[C]``)."""
        delta = delta.astype(np.float64)
        if node.op == "Conv":
            groups, m = node.attrs.get("group", 1), delta.shape[0]
            per_output = mean.reshape(groups, -1)[np.arange(m) // (m // groups)]  # [M, C/group]
            return np.einsum("ock,oc->o", delta.reshape(m, per_output.shape[1], -1), per_output)
        if node.op == "Gemm" and node.attrs.get("transB", 0):
            return delta @ mean
        return mean @ delta

    def _activation(self, graph: gs.Graph, scope: gs.Graph | None, x: gs.Variable, params,
                    readers, chain, group: str) -> Proposal:
        """The simulated proposal of quantizing ``x`` for ``readers`` (None: all) of ``scope``
        (None: the main graph ``graph``), whose ``apply`` routes every ``(tensor, reader,
        index)`` of ``chain`` through a QDQ in ``scope`` shared by the readers there."""
        scale, zp = params
        where = scope if scope is not None else graph

        def simulate(g: gs.Graph, t: gs.Variable) -> gs.Variable:
            return self._qdq_nodes(g, g, t, scale, zp)

        def apply() -> None:
            for t, reader, index in chain:
                key = (id(where), t.name, float(scale), int(zp))
                if key not in self._qdq:
                    self._qdq[key] = self._qdq_nodes(graph, where, t, scale, zp)
                reader.inputs[index] = self._qdq[key]

        return Proposal(tensor=x, value=None, apply=apply, group=group, simulate=simulate,
                        readers=readers, scope=scope)

    @staticmethod
    def _qdq_nodes(root: gs.Graph, g: gs.Graph, t: gs.Variable, scale, zp) -> gs.Variable:
        """Append ``DequantizeLinear(QuantizeLinear(t))`` to ``g`` (``root``: the main graph, or
        ``g`` with the main graph's name authority); return its output."""
        def name(suffix):
            return fresh_name(root, f"{t.name}_{suffix}")
        s = gs.Constant(name("scale"), np.asarray(scale, np.float32))
        z = gs.Constant(name("zero_point"), np.asarray(zp))
        q = gs.Variable(name("quantized"), np.asarray(zp).dtype, t.shape)
        out = gs.Variable(name("dequantized"), np.float32, t.shape)
        g.nodes.append(gs.Node("QuantizeLinear", name("QuantizeLinear"), {}, [t, s, z], [q]))
        g.nodes.append(gs.Node("DequantizeLinear", name("DequantizeLinear"), {}, [q, s, z],
                               [out]))
        return out

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        groups = collections.defaultdict(list)
        for p in result.proposals:
            groups[getattr(p, "group", None) or p.name].append(p)
        ok = {id(p) for p in accepted}
        quantized = [g for g, ps in groups.items() if all(id(p) in ok for p in ps)]
        nodes_float = dict(self._float)
        refused = collections.Counter(result.stats.get("refused", {}))
        untaken = dict(self._untaken)
        for g in groups:
            if g in quantized:
                continue
            if all(p.unexercised for p in groups[g]):  # in an If branch no budget feed takes
                nodes_float[g] = UNEXERCISED
                refused[UNEXERCISED] += 1
                scope = self._sites[g].scope
                untaken[id(scope)] = scope
            else:
                nodes_float[g] = "drift budget"
                refused["kept float: drift budget"] += 1
        sites = [self._sites[g] for g in quantized if g in self._sites]
        return {
            "nodes_quantized": len(quantized), "nodes_float": nodes_float,
            "refused": dict(sorted(refused.items())),
            "scheme": self._scheme(),
            **({"uint8_weights_mixed": self._mixed} if self._mixed is not None else {}),
            "activation_type": self.options.activation_type,
            "calibration": self._calibration,
            "bias_quantized": self._biases, "bias_scale_raised": self._raised,
            "bias_correction": ({"corrected": len(self._corrected.intersection(quantized)),
                                 "not corrected": dict(sorted(self._uncorrected.items()))}
                                if self.options.bias_correction else "off"),
            "rounding": rounding_summary(
                self.options.rounding, len(self._gptq.intersection(quantized)),
                (why for g, why in self._nearest.items() if g in quantized)),
            "qdq_pairs": len(self._qdq),
            **({"branches_not_taken": branch_labels(self._root, untaken.values())}
               if untaken else {}),
            "latency": self._latency if self._latency is not None else "off",
            "proposed": len(result.proposals), "accepted": len(accepted),
            "bytes_before": sum(nbytes(s.weight) for s in sites),
            "bytes_after": sum(self._stored.get(self._group(s.node), 0) for s in sites),
        }
