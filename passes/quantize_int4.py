"""Block-wise 4-bit weights of MatMul (``int4-weight``): round-to-nearest, MSE clip search, GPTQ
and AWQ, stored as ONNX ``DequantizeLinear`` with ``block_size`` or as com.microsoft
``MatMulNBits``.

For a MatMul ``Y = X W`` with a constant ``W`` of shape ``[K, N]``, ``W`` is cut along the
input-channel axis ``K`` into ``n_blocks = ceil(K / B)`` blocks of ``B`` in {32, 64, 128} rows
(the last one shorter when ``B`` does not divide ``K``); every column ``n`` of every block ``b``
gets its own scale ``s[b, n]`` (and zero point ``z[b, n]``)::

    symmetric (int4, [-8, 7], z = 0):  s = max|w| / 7            q = clip(round(w / s), -8, 7)
    asymmetric (uint4, [0, 15]):       s = (max(w, 0) - min(w, 0)) / 15,
                                       z = clip(round(-min(w, 0) / s), 0, 15)
                                       q = clip(round(w / s) + z, 0, 15)
    W'[k, n] = (q[k, n] - z[k // B, n]) * s[k // B, n]

Scales (option ``method``):

* ``rtn``: round to nearest with the scales above.
* ``mse``: per block and column, the clip ratio ``c`` in ``[0.5, 1]`` (20 steps) of the range
  that minimizes ``||w - W'||^2`` (scales ``c`` times those above; outliers are clipped when that
  costs less than the coarser grid).
* ``gptq``: Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers" (ICLR), Algorithm 1. With ``H = 2 X^T X + λ I`` from the calibration
  activations (``λ = damp · mean diag(H)``) and ``U`` the upper Cholesky factor of ``H^-1``
  (``H^-1 = U^T U``), the rows ``k = 0..K-1`` of ``W`` are quantized in order; the error of row
  ``k`` is spread over the rows not yet quantized::

      e = (W[k] - W'[k]) / U[k, k]          W[j] -= U[k, j] e   for j > k

  (lazily: within batches of 128 rows, the rest once per batch). The scales of a block are set
  from the block's rows as updated when the block starts (the paper's ``groupsize``). Row ``k``
  of ``U`` is read, not column ``k`` (which is zero below the diagonal): reading the column is why
  onnxruntime's and Neural Compressor's numpy GPTQ never compensates and equals round to nearest.
  Option ``act_order`` (the reference implementation's ``--act-order``, IST-DASLab/gptq, with
  ``--static-groups``): rows in decreasing ``H_kk``, so the input channels with the largest
  activations are quantized first, while the most rows are left to absorb their error; the
  blocks' scales are then fixed from the original rows beforehand, since a block's rows are no
  longer quantized together. On MiniLM-L6 (evaluation sentences, masked cosine, the mode's other
  settings) it adds about 0.0002.
* ``awq``: Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
  Acceleration" (MLSys), section 3.2. Per input tensor ``X`` (shared by the MatMuls that read
  it), per-channel scales ``s_j = mean|x_j|^α`` (normalized by ``sqrt(max s · min s)``), ``α`` in
  ``[0, 1]`` (11 steps; ``α = 0`` is round to nearest) chosen to minimize the calibration output
  error of all its readers; ``X W = (X / s) (s W)``: the weights become ``diag(s) W`` before
  quantization and ``X`` is divided by ``s`` by an inserted ``Mul(X, 1/s)`` feeding the quantized
  readers (outputs are unchanged up to float rounding before quantization).

With calibration data (GPTQ, AWQ) the output error ``||X (W - W')||^2 = tr((W - W')^T G (W - W'))``
(``G = X^T X``, ``onnxopt.analyses.activations.ActivationGrams``) of each method and of round to
nearest is reported, relative to ``||X W||^2``.

Forms:

* default: ``DequantizeLinear(q, s[, z], axis=0, block_size=B)`` (ONNX opset 21, int4 or uint4
  initializers, two values a byte, the first in the low nibble: onnx/docs/IR.md "4 bit integer
  types"), its float output read by the MatMul. Models below opset 21 are upgraded by the API
  (``upgrade_opset``); onnxruntime fuses the pair into MatMulNBits itself when optimizing.
* ``contrib_ops=True``: the MatMul becomes com.microsoft ``MatMulNBits`` (onnxruntime's
  docs/ContribOperators.md): ``B`` uint8 ``[N, n_blocks, B / 2]`` (column ``n``'s block ``b``,
  ``K`` padded with zeros to a whole block, low nibble first), scales ``[N, n_blocks]``, zero
  points packed two a byte ``[N, ceil(n_blocks / 2)]`` (absent: 8, so symmetric codes are stored
  as ``q + 8``), attributes ``K``, ``N``, ``bits = 4``, ``block_size``, ``accuracy_level``
  (default 4: int8 activations in the kernel, 2.3x faster on CPU than the float kernel of level
  0). Block sizes are limited to 32/64/128 (onnxruntime's MatMulNBits returned zeros at 512).

Mixed precision (option ``ratio`` < 1): the weights with the largest 4-bit harm per element are
stored in 8 bits instead (same blocks and form: int8/uint8 DequantizeLinear, MatMulNBits
``bits = 8``), greedily while they fit in ``1 - ratio`` of the elements (NNCF's mixed int4/int8
``ratio``). The harm (option ``ranking``):

* ``error``: the weight's relative output error (calibration Gram) or, without calibration
  data, its relative weight error -- a local measure, blind to what follows the MatMul;
* ``measured``: the drift of the model's outputs (the run's first drift criterion, on
  :data:`onnxopt.budget.RANKING_FEEDS` of the budget's feeds) with that weight alone at 4
  bits: the leave-one-in sensitivity of mixed-precision search (Dong et al. 2019, "HAWQ", section 3,
  ranks layers by measured sensitivity; the drift budget's own ranking does the same). It sees
  the graph around the weight: on MiniLM-L6 a value projection at 4 bits costs 5-10 times the
  cosine of the query or key projection reading the same input (softmax damps those), which
  the local error cannot tell apart. Without a drift budget, or with more than
  :data:`SENSITIVITY_MAX_WEIGHTS` weights (one evaluation each), ``error`` is used.

Refused, with the reason counted: weights read other than as MatMul's ``B`` (Gemm, Gather, ...),
not 2-D, not float32, graph inputs or outputs, with non-finite values, fewer than ``min_elements``
elements, or excluded by the user. Under ``gptq``/``awq`` a weight whose input has no Gram matrix
(a subgraph, ``K > 8192``) or that is shared by several MatMuls is rounded to nearest instead.

Drift budget: one proposal per weight (its effective float value ``W'``, or ``W'/s`` under AWQ;
group: the MatMul's name); the budget leaves the most harmful in float.

Statistics: ``tensors_quantized``, ``scheme``, ``method``, ``block_size``, ``proposed``,
``accepted``, ``refused`` (``{reason: count}``), ``bytes_before`` / ``bytes_after`` (float32 data
versus codes, scales and zero points of the accepted weights), ``output_error`` (with
calibration: ``{method: ..., "rtn": ...}``, mean over the 4-bit weights of the relative output
error), ``awq_alpha`` (mean chosen α), ``eight_bit`` (weights left at 8 bits by ``ratio``),
``round_to_nearest`` (why ``gptq``/``awq`` rounded some weights to nearest), ``ranking`` (the
harm that chose the 8-bit weights, and why ``measured`` fell back to ``error``).

Errors: none of its own.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxopt import external
from onnxopt.analyses import UseDef
from onnxopt.analyses.activations import ActivationGrams
from onnxopt.budget import RANKING_FEEDS, Dequantized, Proposal
from onnxopt.edit import input_slots
from onnxopt.graph import import_graph, iter_graphs
from onnxopt.names import fresh_name
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._quant import (QuantizeOptions, excluded, gptq_rows, import_domain,
                                   weight_refusal, weight_summary)

#: Block sizes offered (onnxruntime's MatMulNBits returned zeros at 512).
BLOCK_SIZES = (32, 64, 128)
METHODS = ("rtn", "mse", "gptq", "awq")
#: First opset whose DequantizeLinear takes ``block_size`` and int4/uint4 inputs.
BLOCK_DQ_OPSET = 21
#: First IR version with int4/uint4 tensors.
INT4_IR_VERSION = 10
#: Weights with fewer elements stay float.
MIN_ELEMENTS = 256
#: Clip ratios tried by ``mse`` (of the range; 1.0 is round to nearest).
CLIP_RATIOS = np.linspace(1.0, 0.5, 20)
#: Exponents tried by ``awq`` (0 is round to nearest).
AWQ_ALPHAS = np.linspace(0.0, 1.0, 11)
RANKINGS = ("error", "measured")
#: More 4-bit candidates than this: the ``measured`` ranking (one evaluation each) falls back to
#: ``error``.
SENSITIVITY_MAX_WEIGHTS = 64
_CALIBRATED = ("gptq", "awq")


@dataclass(frozen=True)
class QuantizeInt4Options(QuantizeOptions):
    """Options of :class:`QuantizeInt4` (and ``exclude`` / ``ops``, see
    :class:`~onnxopt.passes._quant.QuantizeOptions`).

    Attributes:
        block_size: rows of ``W`` (input channels) sharing a scale: 32, 64 or 128.
        symmetric: int4 codes with zero point 0 (True) or uint4 codes with a zero point per
            block (False).
        method: ``rtn`` (round to nearest), ``mse`` (clip search), ``gptq`` or ``awq`` (these
            two need calibration data); see the module docstring.
        contrib_ops: emit com.microsoft ``MatMulNBits`` (onnxruntime only, fastest) instead of
            the standard ``DequantizeLinear`` (opset 21).
        accuracy_level: MatMulNBits' ``accuracy_level`` (0: float kernel; 4: int8 activations,
            the fast one on CPU).
        damp: GPTQ's dampening, a fraction of the mean diagonal of ``H`` added to it.
        clip_search: under ``gptq`` and ``awq``, also choose each block's clip ratio as ``mse``
            does (``mse`` is ``rtn`` with this search).
        act_order: under ``gptq``, quantize the rows by decreasing ``H_kk`` with scales fixed
            beforehand (see :func:`quantize_gptq`).
        ratio: fraction of the quantized weights' elements stored in 4 bits; the rest -- the
            weights whose 4-bit harm per element is largest (see ``ranking``) -- in 8 bits,
            block-wise in the same form (NNCF's mixed int4/int8 ``ratio``).
        ranking: the harm ranking the 8-bit weights under ``ratio`` < 1: ``error`` (output
            error on the calibration Gram, or weight error) or ``measured`` (drift of the
            model's outputs with the weight alone at 4 bits); see the module docstring.
        min_elements: weights with fewer elements stay float.
    """

    block_size: int = 32
    symmetric: bool = True
    method: str = "rtn"
    contrib_ops: bool = False
    accuracy_level: int = 4
    damp: float = 0.01
    clip_search: bool = False
    act_order: bool = False
    ratio: float = 1.0
    ranking: str = "error"
    min_elements: int = MIN_ELEMENTS

    def check(self) -> str | None:
        if self.block_size not in BLOCK_SIZES:
            return f"option block_size must be one of {BLOCK_SIZES}, got {self.block_size}"
        if self.method not in METHODS:
            return f"option method must be one of {', '.join(METHODS)}, got {self.method!r}"
        if self.accuracy_level not in range(5):
            return f"option accuracy_level must be 0 to 4, got {self.accuracy_level}"
        if not 0.0 < self.damp < 1.0:
            return f"option damp must be in (0, 1), got {self.damp}"
        if self.ranking not in RANKINGS:
            return f"option ranking must be one of {', '.join(RANKINGS)}, got {self.ranking!r}"
        if not 0.0 <= self.ratio <= 1.0:
            return f"option ratio must be in [0, 1], got {self.ratio}"
        if self.min_elements < 1:
            return f"option min_elements must be at least 1, got {self.min_elements}"
        return super().check()


@dataclass
class BlockQuantized:
    """A ``[K, N]`` weight quantized in blocks of ``block_size`` rows.

    Attributes:
        codes: uint8 ``[K, N]`` in ``[0, 2^bits - 1]`` (symmetric codes are ``q + 2^(bits-1)``);
            in a large model's run ``onnxopt.external.SpilledValues`` (see :meth:`spilled`).
        scale: float32 ``[n_blocks, N]``.
        zero_point: uint8 ``[n_blocks, N]`` (``2^(bits-1)`` everywhere when symmetric).
        block_size: rows per block.
        symmetric: whether the zero point is the grid's middle (int4/int8 with zero point 0).
        bits: 4, or 8 for the weights ``ratio`` leaves at 8 bits.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    block_size: int
    symmetric: bool
    bits: int = 4

    def dequantize(self) -> np.ndarray:
        """``(codes - zero_point) * scale`` per block (float32 ``[K, N]``), as DequantizeLinear
        and MatMulNBits compute it."""
        codes = external.unspill(self.codes)
        k = codes.shape[0]
        z = np.repeat(self.zero_point, self.block_size, axis=0)[:k].astype(np.float32)
        s = np.repeat(self.scale, self.block_size, axis=0)[:k]
        return (codes.astype(np.float32) - z) * s

    def spilled(self) -> "BlockQuantized":
        """This weight with its codes in the run's spill file when the run spills (see
        ``onnxopt.external.spill``): a decoder's codes wait there for the budget's decision."""
        self.codes = external.spill(self.codes)
        return self

    @property
    def size(self) -> int:
        """Number of codes (``K * N``)."""
        return int(np.prod(self.codes.shape, dtype=np.int64))


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w`` ``[K, N]`` zero-padded to whole blocks: ``[n_blocks, block_size, N]`` (float64)."""
    k, n = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((nb * block_size, n), np.float64)
    padded[:k] = w
    return padded.reshape(nb, block_size, n)


def _grid(lo: np.ndarray, hi: np.ndarray, symmetric: bool,
          bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (float64 integers) of ``bits``-bit blocks whose values
    span ``[lo, hi]`` (arrays of one shape), per the module docstring (8 bits: ``/ 127``,
    ``/ 255``, zero point 128 when symmetric)."""
    top, mid = 2 ** bits - 1, 2 ** (bits - 1)
    if symmetric:
        scale = np.maximum(np.abs(lo), np.abs(hi)) / (mid - 1)
        zp = np.full(scale.shape, float(mid))
    else:
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / top
    scale = scale.astype(np.float32)
    scale = np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1.0))
    if not symmetric:
        zp = np.clip(np.rint(-lo / scale), 0, top)
    return scale, zp


def _codes(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``clip(round(w / s) + z, 0, 2^bits - 1)`` of ``blocks`` ``[..., B, N]`` with
    per-block ``scale`` and ``zp`` ``[..., N]`` (float64)."""
    return np.clip(np.rint(blocks / scale[..., None, :]) + zp[..., None, :], 0, 2 ** bits - 1)


def _finish(w: np.ndarray, codes: np.ndarray, scale: np.ndarray, zp: np.ndarray,
            block_size: int, symmetric: bool, bits: int) -> BlockQuantized:
    k, n = w.shape
    return BlockQuantized(codes.reshape(-1, n)[:k].astype(np.uint8), scale.astype(np.float32),
                          zp.astype(np.uint8), block_size, symmetric, bits)


def _search(blocks: np.ndarray, symmetric: bool, ratios=(1.0,),
            bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, zero point and codes of ``blocks`` ``[nb, B, N]``: per block and column, the clip
    ratio of ``ratios`` (of the range) with the least squared error (the first on ties)."""
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    best = None
    for ratio in ratios:
        scale, zp = _grid(lo * ratio, hi * ratio, symmetric, bits)
        codes = _codes(blocks, scale, zp, bits)
        if len(ratios) == 1:
            return scale, zp, codes
        err = (((codes - zp[:, None, :]) * scale[:, None, :] - blocks) ** 2).sum(axis=1)
        if best is None:
            best = [err, scale, zp, codes]
            continue
        better = err < best[0]
        best[0] = np.where(better, err, best[0])
        best[1] = np.where(better, scale, best[1])
        best[2] = np.where(better, zp, best[2])
        best[3] = np.where(better[:, None, :], codes, best[3])
    return best[1], best[2], best[3]


def quantize_rtn(w: np.ndarray, block_size: int, symmetric: bool,
                 clip_search: bool = False, bits: int = 4) -> BlockQuantized:
    """Round-to-nearest block quantization of ``w`` (float ``[K, N]``) to ``bits`` (4 or 8);
    with ``clip_search``, per block and column the clip ratio of :data:`CLIP_RATIOS` with the
    least squared error."""
    scale, zp, codes = _search(_blocks(w, block_size), symmetric,
                               CLIP_RATIOS if clip_search else (1.0,), bits)
    return _finish(w, codes, scale, zp, block_size, symmetric, bits)


def quantize_gptq(w: np.ndarray, gram: np.ndarray, block_size: int, symmetric: bool,
                  damp: float = 0.01, clip_search: bool = False,
                  act_order: bool = False) -> BlockQuantized:
    """GPTQ (module docstring) of ``w`` (float ``[K, N]``) given ``gram = X^T X`` (``[K, K]``)
    of its calibration inputs. Channels never active (zero diagonal) get ``H_kk = 1``. With
    ``clip_search`` the scales come from the clip search of :func:`quantize_rtn`. With
    ``act_order`` rows are quantized by decreasing ``H_kk`` (the paper's "act-order"), and the
    blocks' scales are set beforehand from the original rows ("static groups", as the
    reference implementation does with ``--static-groups``), since a block's rows are no
    longer quantized together.

    Raises:
        numpy.linalg.LinAlgError: ``H`` is not positive definite even after dampening (cannot
            happen for a Gram matrix plus ``λ I``, ``λ > 0``).
    """
    k, n = w.shape
    ratios = CLIP_RATIOS if clip_search else (1.0,)
    codes = np.zeros((k, n))
    nb = -(-k // block_size)
    if act_order:
        scale, zp, _ = _search(_blocks(w, block_size), symmetric, ratios, 4)
    else:
        scale, zp = np.zeros((nb, n), np.float32), np.zeros((nb, n))

    def row(position: int, index: int, work: np.ndarray) -> np.ndarray:
        b = index // block_size
        if not act_order and position % block_size == 0:
            found = _search(work[None, position:position + block_size], symmetric, ratios, 4)
            scale[b], zp[b] = found[0][0], found[1][0]
        codes[index] = _codes(work[position][None, None, :], scale[b][None, :],
                              zp[b][None, :], 4)[0, 0]
        return (codes[index] - zp[b]) * scale[b]

    gptq_rows(w, gram, row, damp, act_order)
    return _finish(w, codes, scale, zp, block_size, symmetric, 4)


def output_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray,
                 relative: bool = True) -> float:
    """``||X (w - w_hat)||^2`` from ``gram = X^T X``: the calibration output error of replacing
    ``w`` (``[K, N]``) by ``w_hat``, divided by ``||X w||^2`` when ``relative`` (0 when that
    is 0)."""
    d = np.asarray(w, np.float64) - w_hat
    num = float(np.sum((gram @ d) * d))
    if not relative:
        return num
    den = float(np.sum((gram @ w) * w))
    return num / den if den > 0 else 0.0


def awq_scales(weights: list[np.ndarray], gram: np.ndarray, abs_mean: np.ndarray,
               block_size: int, symmetric: bool) -> tuple[np.ndarray, float]:
    """AWQ's per-input-channel scales for the readers ``weights`` (each ``[K, N_r]``) of one
    input whose calibration rows have Gram matrix ``gram`` and mean ``|x_j|`` ``abs_mean``.

    Returns:
        ``(s, alpha)``: float32 ``[K]`` (all ones when ``alpha`` is 0) and the chosen exponent.
    """
    base = np.maximum(np.asarray(abs_mean, np.float64), 1e-4)
    best = (np.inf, np.ones(base.shape, np.float32), 0.0)
    for alpha in AWQ_ALPHAS:
        s = base ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = 0.0
        for w in weights:
            q = quantize_rtn(w * s[:, None], block_size, symmetric).dequantize()
            err += output_error(w, q / s[:, None], gram, relative=False)
        if err < best[0]:
            best = (err, s, float(alpha))
    return best[1], best[2]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit values a byte along the last axis, the first in the low nibble (the ONNX int4
    layout and MatMulNBits'): uint8 ``[..., L]`` (values 0-15) -> uint8 ``[..., ceil(L / 2)]``
    (an odd ``L`` is padded with a zero nibble)."""
    u = np.asarray(codes, np.uint8) & 0x0F
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _code_constant(name: str, codes: np.ndarray, signed: bool, bits: int) -> gs.Constant:
    """An int4/int8 (``codes - 2^(bits-1)``) or uint4/uint8 (``codes``) initializer of
    ``codes``' shape."""
    codes = external.unspill(codes)
    data = (np.asarray(codes, np.int16) - (2 ** (bits - 1) if signed else 0)).astype(np.uint8)
    if bits == 8:
        return gs.Constant(name, external.spill(data.view(np.int8) if signed else data))
    kind = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    packed = external.spill(pack_nibbles(data.ravel()), kind, codes.shape)
    if isinstance(packed, external.SpilledValues):
        return gs.Constant(name, packed)
    return gs.Constant(name, LazyValues(onnx.helper.make_tensor(
        name, kind, list(codes.shape), packed.tobytes(), raw=True)))


def _packed(codes: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' layout of ``codes`` along the last axis: two a byte at 4 bits."""
    return pack_nibbles(codes) if bits == 4 else np.ascontiguousarray(codes, np.uint8)



def _proposal(t: gs.Constant, quantized: BlockQuantized, scale: np.ndarray | None,
              **fields) -> Proposal:
    """The proposal of ``t``'s block-quantized value (AWQ ``scale`` undone), computed when the
    budget runs the model (a large model keeps only the packed weights, not a float copy of
    each) and fed as its codes (``Dequantized``); ``fields``: ``apply``, ``group``."""
    return Proposal(tensor=t, value=functools.partial(_dequantized, quantized, scale),
                    dequantized=Dequantized(quantized.codes, quantized.scale,
                                            quantized.zero_point, axis=0,
                                            block_size=quantized.block_size,
                                            row_divisor=scale), **fields)


def _dequantized(quantized, scale: np.ndarray | None) -> np.ndarray:
    """The float32 values ``quantized`` (a block-quantized weight) stands for, with an AWQ
    input-channel ``scale`` (per row of the [K, N] weight) undone."""
    value = quantized.dequantize()
    if scale is not None:
        value = value / scale[:, None]
    return value.astype(np.float32)

@register
class QuantizeInt4(Pass):
    name = "quantize_int4"
    description = ("Block-wise 4-bit MatMul weights (RTN, MSE, GPTQ or AWQ) as DequantizeLinear "
                   "(opset 21) or com.microsoft MatMulNBits.")
    Options = QuantizeInt4Options
    lossless = False
    quantizes = True
    #: The DequantizeLinear form needs opset 21; the API upgrades older models to it.
    upgrade_opset = BLOCK_DQ_OPSET

    def __init__(self, options=None, **fields) -> None:
        super().__init__(options, **fields)
        if self.options.contrib_ops:
            self.upgrade_opset = None
        self.requires = frozenset({"calibration"}) if self.options.method in _CALIBRATED \
            else frozenset()

    def applies_to(self, opset: int) -> str | None:
        if not self.options.contrib_ops and opset < BLOCK_DQ_OPSET:
            return (f"opset {opset} < {BLOCK_DQ_OPSET} (block-wise DequantizeLinear; "
                    "contrib_ops=True uses MatMulNBits)")
        return None

    def wants_upgrade(self, model: onnx.ModelProto) -> bool:
        """Whether converting ``model`` to ``upgrade_opset`` could let the pass quantize
        anything, from the graph alone (no data, no conversion), for the API to ask before it
        upgrades: a default-domain MatMul the user does not exclude whose B is a 2-D float32
        initializer of at least ``min_elements`` elements, or is computed from constants only
        (the lossless passes may fold it into one). False for a model with no such MatMul, which
        the upgrade (opset and IR version, output dims renamed by the converter's inference)
        would change for nothing."""
        graph = import_graph(model)
        return any(node.op == "MatMul" and is_default_domain(node) and len(node.inputs) == 2
                   and excluded(node, self.options) is None
                   and self._may_be_weight(node.inputs[1])
                   for g in iter_graphs(graph) for node in g.nodes)

    def _may_be_weight(self, t: gs.Tensor) -> bool:
        """Whether ``t`` is, or the lossless passes may fold into, a weight this pass takes."""
        if isinstance(t, gs.Constant):
            return (np.dtype(t.dtype) == np.float32 and len(t.shape) == 2
                    and int(np.prod(t.shape)) >= self.options.min_elements)
        seen, stack = set(), [t]
        while stack:  # every value it is computed from is a constant
            v = stack.pop()
            if isinstance(v, gs.Constant) or id(v) in seen:
                continue
            seen.add(id(v))
            if not v.inputs:  # a graph input (or a value of an outer scope)
                return False
            stack.extend(i for i in v.inputs[0].inputs if not i.is_empty())
        return True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        refused: collections.Counter[str] = collections.Counter()
        self._errors: dict[str, list[float]] = {o.method: [], "rtn": []}
        self._alphas: list[float] = []
        self._stored: dict[int, int] = {}
        self._muls: dict[tuple[int, bytes], gs.Variable] = {}
        self._fallback = collections.Counter()
        self._eight_bit: set[int] = set()
        if not o.contrib_ops and ctx.template is not None \
                and ctx.template.ir_version < INT4_IR_VERSION:
            refused[f"IR version {ctx.template.ir_version} < {INT4_IR_VERSION} (int4)"] += 1
            return PassResult(False, {"refused": dict(refused)})
        usedef = ctx.analyses.get(UseDef)
        candidates: dict[int, gs.Constant] = {}
        for g in usedef.scopes:
            for node in g.nodes:
                t = node.inputs[1] if node.op == "MatMul" and len(node.inputs) == 2 else None
                if isinstance(t, gs.Constant) and is_default_domain(node):
                    candidates.setdefault(id(t), t)
        stats = ctx.analyses.get(ActivationGrams) if o.method in _CALIBRATED else None
        plans = []
        for t in candidates.values():
            slots = input_slots(t)
            reason = self._refusal(t, slots, usedef)
            if reason is not None:
                refused[reason] += 1
                continue
            plans.append((t, [n for n, _ in slots]))
        awq = self._awq_plan(plans, stats) if o.method == "awq" else {}
        chosen = []
        for t, readers in plans:
            w = np.asarray(external.peek(t), np.float64)  # an external weight: mapped here only
            stored_gram = self._gram(readers, stats)
            gram = external.unspill(stored_gram)  # mapped while this weight is quantized
            scale = awq.get(id(t))
            quantized = self._quantize(w, gram, scale)
            value = _dequantized(quantized, scale)
            harm = output_error(w, value, gram) if gram is not None else \
                float(np.sum((w - value) ** 2) / max(np.sum(w * w), 1e-30))
            chosen.append([t, readers, quantized.spilled(), scale, stored_gram, harm])
            del w, gram, value
        self._eight_bit = self._eight_bit_set(chosen, graph, ctx)
        proposals = []
        for t, readers, quantized, scale, gram, harm in chosen:
            if id(t) in self._eight_bit:
                w = np.asarray(external.peek(t), np.float64)
                quantized = quantize_rtn(w, o.block_size, o.symmetric, bits=8).spilled()
                scale = None
            elif gram is not None:
                self._errors[o.method].append(harm)
                if o.method != "rtn":
                    w = np.asarray(external.peek(t), np.float64)
                    rtn = quantize_rtn(w, o.block_size, o.symmetric).dequantize()
                    self._errors["rtn"].append(output_error(w, rtn, external.unspill(gram)))
            proposals.append(_proposal(
                t, quantized, scale, group=readers[0].name or t.name,
                apply=self._rewrite(graph, usedef.owner(readers[0]), t, readers, quantized,
                                    scale)))
        result_stats = {"refused": dict(sorted(refused.items()))} if refused else {}
        return PassResult(False, result_stats, proposals=proposals)

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        o = self.options
        form = "MatMulNBits" if o.contrib_ops else "DequantizeLinear"
        scheme = (f"{'int4 symmetric' if o.symmetric else 'uint4 asymmetric'}, "
                  f"block {o.block_size} along K, {form}")
        stats = {**weight_summary(result, accepted, scheme, self._stored),
                 "method": o.method, "block_size": o.block_size}
        eight = [p.name for p in accepted if id(p.tensor) in self._eight_bit]
        if eight:
            stats["eight_bit"] = eight
        if o.ratio < 1:
            stats["ranking"] = self._ranking
        if self._fallback:
            stats["round_to_nearest"] = dict(sorted(self._fallback.items()))
        if self._errors[o.method]:
            stats["output_error"] = {m: float(np.mean(e)) for m, e in self._errors.items() if e}
        if self._alphas:
            stats["awq_alpha"] = float(np.mean(self._alphas))
        return stats

    def _refusal(self, t: gs.Constant, slots: list, usedef: UseDef) -> str | None:
        """Why ``t`` stays float, or None."""
        return weight_refusal(
            t, slots, usedef, self.options,
            lambda n, i: n.op == "MatMul" and i == 1 and is_default_domain(n),
            "also read other than as MatMul's B", ndim=2)

    def _eight_bit_set(self, chosen: list, graph: gs.Graph, ctx: PassContext) -> set[int]:
        """Ids of the weights left at 8 bits: by decreasing harm per element at 4 bits
        (``chosen[i][-1]``, or measured, see :meth:`_measured_harm`), each one that still fits
        in ``1 - ratio`` of the elements (ties: the order of ``chosen``)."""
        self._ranking = "error"
        if self.options.ratio >= 1.0 or not chosen:
            return set()
        harms = [c[-1] for c in chosen]
        if self.options.ranking == "measured":
            if ctx.budget is None:
                self._ranking = "error (no drift budget to measure with)"
            elif len(chosen) > SENSITIVITY_MAX_WEIGHTS:
                self._ranking = (f"error ({len(chosen)} weights > {SENSITIVITY_MAX_WEIGHTS} "
                                 "to measure)")
            else:
                harms = self._measured_harm(chosen, graph, ctx)
                self._ranking = "measured"
        left = (1.0 - self.options.ratio) * sum(c[2].size for c in chosen)
        out: set[int] = set()
        for i in sorted(range(len(chosen)), key=lambda i: -harms[i] / chosen[i][2].size):
            if chosen[i][2].size <= left:
                out.add(id(chosen[i][0]))
                left -= chosen[i][2].size
        return out

    def _measured_harm(self, chosen: list, graph: gs.Graph, ctx: PassContext) -> list[float]:
        """Per weight of ``chosen``, how much the run's first drift criterion worsens on
        :data:`onnxopt.budget.RANKING_FEEDS` of the budget's feeds when that weight alone takes
        its 4-bit value (the others as they are), against the graph with none taken
        (``DriftBudget.harm_alone``: one session). The budget's feeds are the validation feeds, as
        for its own ranking."""
        proposals = [_proposal(t, quantized, scale, apply=lambda: None)
                     for t, _, quantized, scale, *_ in chosen]
        for i, p in enumerate(proposals):
            p.group = str(i)  # one group per weight, whatever the readers
        harm = ctx.budget.harm_alone(graph, ctx.template, proposals, RANKING_FEEDS)
        return [harm[p.group] for p in proposals]

    def _gram(self, readers: list[gs.Node], stats) -> np.ndarray | None:
        """The Gram matrix of ``readers``' input (one reader), or None, counting why."""
        if stats is None:
            return None
        if len(readers) > 1:
            self._fallback["weight shared by several MatMuls"] += 1
            return None
        x = readers[0].inputs[0]
        s = stats.tensors.get(x.name)
        if s is None or s.gram is None:
            self._fallback["no Gram matrix of the input"] += 1
            return None
        return s.gram

    def _quantize(self, w: np.ndarray, gram: np.ndarray | None,
                  awq_scale: np.ndarray | None) -> BlockQuantized:
        o = self.options
        if o.method == "mse":
            return quantize_rtn(w, o.block_size, o.symmetric, clip_search=True)
        if o.method == "gptq" and gram is not None:
            return quantize_gptq(w, gram, o.block_size, o.symmetric, o.damp, o.clip_search,
                                 o.act_order)
        if awq_scale is not None:
            w = w * awq_scale[:, None]
        return quantize_rtn(w, o.block_size, o.symmetric, o.clip_search)

    def _awq_plan(self, plans: list, stats) -> dict[int, np.ndarray]:
        """AWQ scales per weight id: one search per input tensor over its single-reader
        weights (other weights are rounded to nearest); all-ones scales are dropped."""
        by_input: dict[str, list[tuple[gs.Constant, list[gs.Node]]]] = collections.defaultdict(list)
        for t, readers in plans:
            if len(readers) == 1:
                by_input[readers[0].inputs[0].name].append((t, readers))
        out = {}
        for name, group in by_input.items():
            s = stats.tensors.get(name)
            if s is None or s.gram is None or s.channel_abs_mean is None:
                continue
            scale, alpha = awq_scales([np.asarray(t.values, np.float64) for t, _ in group],
                                      external.unspill(s.gram), s.channel_abs_mean,
                                      self.options.block_size,
                                      self.options.symmetric)
            self._alphas.append(alpha)
            if alpha > 0:
                out.update({id(t): scale for t, _ in group})
        return out

    def _rewrite(self, root: gs.Graph, g: gs.Graph, t: gs.Constant, readers: list[gs.Node],
                 quantized: BlockQuantized, awq_scale: np.ndarray | None):
        """The proposal's ``apply``."""
        def apply() -> None:
            if awq_scale is not None:
                self._divide_input(root, g, readers[0], awq_scale)
            if self.options.contrib_ops:
                self._stored[id(t)] = self._matmul_nbits(root, g, t, readers, quantized)
            else:
                self._stored[id(t)] = self._dequantize_linear(root, g, t, quantized)
        return apply

    def _divide_input(self, root: gs.Graph, g: gs.Graph, node: gs.Node,
                      scale: np.ndarray) -> None:
        """Make ``node`` read ``Mul(x, 1/scale)`` (one Mul per input and scale)."""
        x = node.inputs[0]
        key = (id(x), scale.tobytes())
        out = self._muls.get(key)
        if out is None:
            base = fresh_name(root, f"{x.name}_awq")
            inverse = gs.Constant(fresh_name(root, f"{base}_inverse_scale"),
                                  (1.0 / scale).astype(np.float32))
            out = gs.Variable(base, dtype=x.dtype, shape=x.shape)
            g.nodes.append(gs.Node("Mul", name=fresh_name(root, f"{base}_Mul"),
                                   inputs=[x, inverse], outputs=[out]))
            self._muls[key] = out
        node.inputs[0] = out

    def _dequantize_linear(self, root: gs.Graph, g: gs.Graph, t: gs.Constant,
                           quantized: BlockQuantized) -> int:
        """Insert ``DequantizeLinear(axis=0, block_size)`` in place of ``t``; the bytes added."""
        def name(suffix: str) -> str:
            return fresh_name(root, f"{t.name}_{suffix}")

        sym, bits = quantized.symmetric, quantized.bits
        inputs = [_code_constant(name("quantized"), quantized.codes, sym, bits),
                  gs.Constant(name("scale"), quantized.scale)]
        if not sym:
            inputs.append(_code_constant(name("zero_point"), quantized.zero_point, False, bits))
        out = gs.Variable(name("dequantized"), dtype=np.float32, shape=list(t.shape))
        g.nodes.append(gs.Node("DequantizeLinear", name=name("DequantizeLinear"),
                               attrs={"axis": 0, "block_size": quantized.block_size},
                               inputs=inputs, outputs=[out]))
        for node, i in input_slots(t):
            node.inputs[i] = out
        return (quantized.size * bits + 7) // 8 + quantized.scale.nbytes \
            + (0 if sym else (quantized.zero_point.size * bits + 7) // 8)

    def _matmul_nbits(self, root: gs.Graph, g: gs.Graph, t: gs.Constant,
                      readers: list[gs.Node], quantized: BlockQuantized) -> int:
        """Replace every MatMul reading ``t`` by MatMulNBits; the bytes added."""
        def name(suffix: str) -> str:
            return fresh_name(root, f"{t.name}_{suffix}")

        k, n = quantized.codes.shape
        bs = quantized.block_size
        nb = quantized.scale.shape[0]
        padded = np.zeros((nb * bs, n), np.uint8)
        padded[:k] = external.unspill(quantized.codes)
        bits = quantized.bits
        blob = _packed(padded.reshape(nb, bs, n).transpose(2, 0, 1), bits)  # [N, nb, bs*bits/8]
        inputs = [gs.Constant(name("quantized"), blob),
                  gs.Constant(name("scale"), np.ascontiguousarray(quantized.scale.T))]
        if not quantized.symmetric:
            inputs.append(gs.Constant(name("zero_point"), _packed(quantized.zero_point.T, bits)))
        attrs = {"K": k, "N": n, "bits": bits, "block_size": bs,
                 "accuracy_level": self.options.accuracy_level}
        for node in readers:
            x, y = node.inputs[0], node.outputs[0]
            node.inputs.clear()
            node.outputs.clear()
            g.nodes.remove(node)
            g.nodes.append(gs.Node("MatMulNBits", name=node.name, domain="com.microsoft",
                                   attrs=attrs, inputs=[x, *inputs], outputs=[y]))
        import_domain(root, "com.microsoft", 1)
        return sum(c.values.nbytes for c in inputs)

