"""Weight sharing by k-means: each large weight stored as cluster indices plus a float codebook.

Deep Compression's weight sharing (Han et al., 2016, "Deep Compression: Compressing Deep Neural
Networks with Pruning, Trained Quantization and Huffman Coding", ICLR, section 3): the values of a
weight tensor ``W`` (``n`` elements) are clustered into ``K`` clusters by 1-D k-means,

    minimize  sum_i  a_i (w_i - c_{k(i)})^2   over the codebook c[K] and the assignment k(i),

and ``W`` is stored as the indices ``k(i)`` (``log2 K`` bits each) and the codebook. Lloyd
iterations refine initial centroids; in one dimension the nearest centroid of ``w`` is found by a
binary search among the midpoints of the sorted centroids, so an iteration costs ``O(n log K)``.
Initialization: the paper's *linear* one (``init="linear"``: evenly spaced between ``min W`` and
``max W``, section 3.1, chosen there because it keeps the few large weights that retraining then
tunes) leaves most centroids in the sparse tails of a bell-shaped weight distribution, and Lloyd
iterations move them out only slowly; without retraining the default is the *companded*
initialization (``init="companded"``): centroids at the quantiles of ``p^(1/3)``, ``p`` the
(weighted) histogram of the values, the point density of the mean-square-optimal quantizer at
high resolution (Panter and Dite, 1951, "Quantization distortion in pulse-count modulation with
nonuniform spacing of levels", Proc. IRE; Gersho and Gray, "Vector Quantization and Signal
Compression", section 6.3), which keeps centroids in the tails too. Measured on MiniLM-L6 (30
iterations), the relative error ``||W' - W|| / ||W||`` at K = 256 / 16: word embedding 0.031 /
0.145 linear, 0.0077 / 0.103 companded; an FFN output matrix 0.046 / 0.187 linear, 0.028 /
0.159 companded. A codebook of more than ``4 B`` elements (an embedding table; ``B`` =
:data:`BINS` for one codebook, ``max(BINS / C, MIN_ROW_BINS)`` for ``C``) is first reduced to a
histogram of ``B`` bins (each bin its weighted mean and total weight) on which the Lloyd
iterations run; a final exact assignment, centroid update and assignment on
every element follow. The weights ``a_i`` are 1, or with ``weighted`` the squared norm
``||x_j||^2`` over the calibration feeds of the input channel ``j`` the element multiplies
(``TensorStats.channel_norm`` of the node's input): ``sum_rows ||X dW||^2`` is approximated by
its diagonal ``sum_ij ||x_j||^2 dW_ij^2``, so the error goes where inputs are small (the
diagonal of the layer Hessian, the salience of Wanda, Sun et al. 2023, and of GPTQ/AWQ). The
weighted run initializes from the weighted histogram, so centroids start where the weight
mass is (from the linear initialization, Lloyd iterations cannot pull them there).

Hessian-compensated assignment (``method="gptvq"``; van Baalen et al., 2024, "GPTVQ: The
Blessing of Dimensionality for LLM Quantization", section 3, with 1-D codebooks): nearest-centroid
assignment minimizes ``||W' - W||``, not the layer's output error ``||X (W' - W)||^2 =
tr(dW^T H dW)``, ``H = X^T X`` over the calibration inputs (``ActivationGrams``). For a
MatMul/Gemm weight viewed as ``W[K, N]`` (``y = x W``) the codebook comes from the weighted
k-means above (weights ``diag H``, also without ``weighted``); then the input features are
visited in order of decreasing ``H_kk`` (GPTQ's act-order), each feature's N weights go to their
nearest centroids, and the error is spread over the features not yet visited with the upper
Cholesky factor ``U`` of the damped ``H^-1`` (``H + damp · mean diag H``): ``W[j] -= U_kj (W[k]
- Q[k]) / U_kk`` for ``j`` after ``k`` -- GPTQ (Frantar et al., 2023, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR, Algorithm 1) with the
grid replaced by the codebook. A feature whose weights are all centroids spreads no error, so a
tensor stored exactly stays exact. Weights without a Gram matrix (tables, Conv kernels,
weights read by several nodes) keep the k-means assignment, and the statistics say why.
Measured on MiniLM-L6 at K = 16 with ``per_channel`` (calibration and evaluation sets apart;
masked cosine of ``last_hidden_state``; file 14.4 % of fp32): weighted k-means 0.9713, GPTVQ
0.9786. With only the MatMul weights clustered: weighted k-means 0.9709, GPTVQ 0.9810 (one
codebook per tensor: 0.9492 and 0.9545); GPTVQ's least-squares codebook update after the
assignment 0.9816 at twice the time (not done), without act-order 0.9805, damp 0.1 0.9818.

Per-channel codebooks (``per_channel``): one codebook per output channel of a MatMul/Gemm weight
or Conv kernel (``onnxopt.ops`` output axis; ``C`` codebooks of ``K`` values), each clustered on
its own channel; for a Gather table ``[V, D]``, one per embedding dimension (its last axis: a
codebook per row would outweigh the table). A tensor whose codebooks would take more than half
the bytes of its indices gets one codebook (K = 256 on a 384 x 384 matrix: 393 kB of codebooks
for 147 kB of indices; on MiniLM's 30522 x 384 word embedding, 393 kB for 11.7 MB).

Runtime form, standard ops only, folded by onnxruntime into a float initializer at session
initialization (measured: the session's optimized graph holds only the consumer, so inference
runs at fp32 speed); the file holds the indices and the codebook::

    K > 16 :  idx  uint8 [shape of W]
              W' = Gather(codebook[K], Cast<int32>(idx))
    K <= 16:  two 4-bit indices per byte; flat index i (of n, padded to 2m, m = ceil(n / 2))
              is the low nibble of byte i for i < m and the high nibble of byte i - m after:
              P  uint8 [m]
              i  = Cast<int32>(Reshape(Slice(Concat(Mod(P, 16), BitShift(P, 4, RIGHT)), 0, n),
                                       shape of W))
              W' = Gather(codebook[K], i)

Per-channel, the codebook is flattened to ``[C K]`` and channel ``c``'s indices are offset by
``c K`` (an int32 ``Add`` with a constant ``[1, .., C, .., 1]`` of ``c K``) before the same
``Gather``: an ordinary 1-D Gather, which onnxruntime folds like the per-tensor one
(GatherElements would need the codebook broadcast to the weight's shape). BitShift is opset 11,
Mod on integers opset 10, so the pass applies from opset 11 (BitwiseAnd would need opset 18).
Storage (float32): ``n`` (or ``ceil(n / 2)``) bytes plus ``4 K`` (per-channel: ``4 C K`` and
``4 C`` of offsets) against ``4 n``, plus the unpacking's constants (16, 4, the shape, the slice
bounds: ``2 + 8 rank`` bytes, 16 more for odd ``n``); ``bytes_after`` counts all of them, which
is what the file holds. Every node the pass creates has its output named in
``PassContext.storage`` (compressed storage, like DequantizeLinear): ``fold_constants`` does not
fold it back -- its 64 KiB growth limit alone let it unpack the 4 bits one step at a time (a
256 x 256 weight stored as 64 kB of uint8 indices, not 32 kB) and decompress small tables into
floats.

A tensor with at most ``K`` distinct values (per codebook) is stored exactly: its codebook is
those values, without k-means (which could leave a centroid where no value is and merge two
close values).

Float16 codebooks (``codebook_dtype="float16"``): the codebook is stored in float16 (half the
bytes of the codebooks: about 1.4 MB of the 13.1 MB of MiniLM-L6's K = 16 per-channel form)
and the gathered weight is Cast to W's dtype (``Gather`` then ``Cast``, folded by onnxruntime
like the rest). Rounding a centroid to float16 moves it by at most ``2^-11`` of its value,
small against the clustering error at K <= 256; a tensor of few values is then exact only
when they are float16 values.

Mixed strength (``wide_clusters`` with ``size_budget``): the tensors are clustered at
``clusters``; each one's proposal alone is measured through the drift budget (the run's first
criterion on :data:`onnxopt.budget.RANKING_FEEDS` of its feeds, ``DriftBudget.harm_alone``:
leave-one-in sensitivity, Dong et al. 2019, "HAWQ", section 3), and by decreasing measured
harm per index byte widening adds, each tensor is re-clustered at ``wide_clusters`` while the
graph's initializers stay within ``size_budget`` of their bytes before. The local error cannot rank
them: on MiniLM-L6 at K = 16 the Spearman correlation of the masked-cosine drift of each MatMul
weight alone with its relative output error ``tr(dW^T H dW) / tr(W^T H W)`` is -0.33, with the
absolute ``tr(dW^T H dW)`` 0.04 (the cosine lost per tensor alone ranges from 5e-5 to 1.8e-3;
the FFN weights and a few attention projections of the last layers harm most). Without a drift
budget nothing is widened and ``ranking`` says why. Measured on MiniLM-L6
(``tools/prune_benchmark.py --sections cluster``; K = 16, per-channel, ``"gptvq"``): float32
codebooks 0.9786 at 14.4 % of the fp32 file, float16 codebooks 0.9786 at 13.6 %; with
``wide_clusters`` 256 and ``size_budget`` 0.148 (10 of 39 tensors at 256, the budget measuring
on the calibration feeds over real tokens) 0.9861 at 14.88 %; 0.149 (12 at 256) 0.9863 at
15.02 % (the graph takes 0.14 % of the file beside the initializers). Tried and not kept (measured with the MatMul weights only;
1-D per-channel GPTVQ 0.9810 there): GPTVQ's 2-D codebooks (256 pairs of adjacent outputs, one
uint8 index per pair, one codebook per tensor, act-order compensation) 0.6081, with the columns
scaled by their RMS 0.5258 -- comparable per attention matrix (output error 0.8-1.3x) but 1.5x
on the FFN inputs and diverging on the FFN outputs ``[1536, 384]`` (output error 0.04-0.24
against 1e-4-1e-3: the compensation pushes the weights off a codebook fitted before it); a 2-D
codebook of the word embedding (token-frequency weighted) costs what its 1-D per-dimension one
does (cosine 0.99758 vs 0.99779, each alone), and 3-D (2.67 bits a weight) 0.9907.

The proposal's value is ``codebook[idx]`` in W's dtype: exactly what the model computes.

Drift budget: each tensor is one proposal (its own group). Statistics: ``clusters``,
``per_channel``, ``weighted``, ``method``; with ``"gptvq"``, ``compensated`` (tensors whose
assignment was compensated) and ``uncompensated`` (``{reason: count}``); ``unweighted``:
tensors clustered without weights although ``weighted`` or ``"gptvq"`` was asked (Gather
tables, weights whose input has no statistics); ``one_codebook``: tensors given one codebook
although ``per_channel`` was asked (see above); ``tensors_clustered``,
``proposed``/``accepted``; ``bytes_before``/``bytes_after`` (of the accepted tensors);
``refused`` (``{reason: count}``); ``per_tensor``: ``{name: {shape, clusters, bytes_before,
bytes_after, relative_error}}`` for every proposal (``relative_error`` = ``||W' - W|| /
||W||``; ``accepted`` says whether the budget took it; ``drift``: the measured harm of the
tensor alone, with ``wide_clusters``); ``codebook_dtype``; with ``wide_clusters``:
``wide_clusters``, ``size_budget``, ``ranking`` (``"measured"``, or why nothing was measured)
and ``wide`` (the accepted tensors at ``wide_clusters``).

Errors: :class:`onnxopt.errors.UsageError` when ``weighted`` or ``"gptvq"`` is asked without
calibration data.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses import UseDef
from onnxopt.analyses.activations import ActivationGrams, ActivationStats
from onnxopt.budget import RANKING_FEEDS, Proposal
from onnxopt.edit import input_slots
from onnxopt.errors import UsageError
from onnxopt.names import fresh_name
from onnxopt.ops import conv_input_channels, input_channel_axis, output_channel_axis, \
    weight_initializers, weight_slot
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._sparse import damped_hessian, inverse_upper

#: The weight slots clustered (``onnxopt.ops``): MatMul/Gemm operands, Conv kernels, Gather tables.
CLUSTERED_KINDS = frozenset({"matrix", "kernel", "table"})
#: Largest K whose indices are packed two per byte.
NIBBLE_CLUSTERS = 16
#: Bins of the histograms of all codebooks of a tensor together (at least MIN_ROW_BINS each);
#: a codebook of more than 4 times its bins' elements is clustered on its histogram first.
BINS = 1 << 16
MIN_ROW_BINS = 1024
METHODS = ("kmeans", "gptvq")
#: Input features whose assignment errors are spread at once before the rest of the weight is
#: updated (GPTQ's lazy batch, Frantar et al. 2023, section 4 step 2).
GPTVQ_BATCH = 128
CODEBOOK_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ClusterWeightsOptions:
    """Options of :class:`ClusterWeights`.

    Attributes:
        clusters: K, the codebook size (2..256; up to 16 stores 4-bit indices), or ``"auto"``
            (the pass manager's strength search picks it from ``ClusterWeights.ladder``); None
            (the default) clusters nothing, and the pipeline refuses the pass without it.
        per_channel: one codebook per output channel of MatMul/Gemm weights and Conv kernels,
            per embedding dimension of Gather tables, where the codebooks take at most half
            the bytes of the indices.
        weighted: weight each element by the squared norm of its input channel over the
            calibration data (needs calibration data).
        min_size: tensors with fewer elements stay as they are.
        iterations: Lloyd iterations of k-means.
        init: initial centroids: ``"companded"`` (quantiles of ``p^(1/3)``, default) or
            ``"linear"`` (Deep Compression's linear initialization).
        method: ``"kmeans"`` (each value to its nearest centroid) or ``"gptvq"`` (the
            assignment of MatMul/Gemm weights with a Gram matrix compensated through the
            inverse Hessian of the calibration inputs, GPTVQ; needs calibration data; the
            codebook comes from the weighted k-means).
        damp: with ``"gptvq"``, the dampening added to the Hessian's diagonal, a fraction of
            its mean.
        codebook_dtype: ``"float32"`` (default: W's dtype) or ``"float16"`` (codebooks stored
            in float16, the gathered weight Cast to W's dtype).
        wide_clusters: with ``size_budget``, the codebook size of the tensors whose
            ``clusters`` proposal harms the measured drift most per byte widening saves
            (mixed strength; needs a drift budget, see the module docstring).
        size_budget: the bytes of the graph's initializers after clustering at most this
            fraction of their bytes before (about the file's fraction); tensors are given
            ``wide_clusters`` greedily while it holds.
    """

    clusters: int | str | None = None
    per_channel: bool = False
    weighted: bool = False
    min_size: int = 4096
    iterations: int = 30
    init: str = "companded"
    method: str = "kmeans"
    damp: float = 0.01
    codebook_dtype: str = "float32"
    wide_clusters: int | None = None
    size_budget: float | None = None

    def check(self) -> str | None:
        if self.clusters is not None and self.clusters != "auto" and (
                isinstance(self.clusters, str) or not 2 <= self.clusters <= 256):
            return f"option clusters must be an integer from 2 to 256 or 'auto', got " \
                   f"{self.clusters!r}"
        if self.min_size < 1:
            return f"option min_size must be at least 1, got {self.min_size}"
        if self.init not in ("companded", "linear"):
            return f"option init must be 'companded' or 'linear', got {self.init!r}"
        if self.iterations < 0:
            return f"option iterations must not be negative, got {self.iterations}"
        if self.method not in METHODS:
            return f"option method must be one of {', '.join(METHODS)}, got {self.method!r}"
        if not 0 < self.damp < 1:
            return f"option damp must be in (0, 1), got {self.damp}"
        if self.codebook_dtype not in CODEBOOK_DTYPES:
            return f"option codebook_dtype must be one of {', '.join(CODEBOOK_DTYPES)}, got " \
                   f"{self.codebook_dtype!r}"
        if (self.wide_clusters is None) != (self.size_budget is None):
            return "options wide_clusters and size_budget go together"
        if self.wide_clusters is not None and (
                isinstance(self.wide_clusters, str) or not 2 <= self.wide_clusters <= 256):
            return f"option wide_clusters must be an integer from 2 to 256, got " \
                   f"{self.wide_clusters!r}"
        if self.size_budget is not None and not 0 < self.size_budget <= 1:
            return f"option size_budget must be in (0, 1], got {self.size_budget}"
        return None


def _assign(values: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each value: ``values`` [C, n], sorted ``centers``
    [C, K] (float64) -> int64 [C, n]. Rows are made disjoint by mapping row ``c`` into
    ``[2c, 2c + 1]`` so one binary search serves every row."""
    c, k = centers.shape
    lo = np.minimum(values.min(axis=1, initial=np.inf), centers[:, 0])[:, None]
    span = np.maximum(values.max(axis=1, initial=-np.inf), centers[:, -1])[:, None] - lo
    span = np.where(span > 0, span, 1.0)
    shift = 2.0 * np.arange(c)[:, None]
    v = (values - lo) / span + shift
    m = ((centers - lo) / span + shift).ravel()
    index = np.searchsorted((m[1:] + m[:-1]) / 2, v.ravel()).reshape(v.shape)
    return index - k * np.arange(c)[:, None]


def _update(values: np.ndarray, weights: np.ndarray, index: np.ndarray,
            centers: np.ndarray) -> np.ndarray:
    """Weighted mean of each cluster (an empty cluster keeps its centroid), sorted per row."""
    c, k = centers.shape
    flat = (index + k * np.arange(c)[:, None]).ravel()
    total = np.bincount(flat, weights.ravel(), c * k).reshape(c, k)
    moment = np.bincount(flat, (weights * values).ravel(), c * k).reshape(c, k)
    new = np.where(total > 0, moment / np.where(total > 0, total, 1.0), centers)
    return np.sort(new, axis=1)


def _companded_centers(values: np.ndarray, weights: np.ndarray, k: int, bins: int
                       ) -> np.ndarray:
    """Initial centroids at the quantiles ``(i + 1/2) / k`` of the density ``p^(1/3)`` (``p``
    the weighted histogram of each row, ``bins`` bins): sorted float64 ``[C, k]``."""
    c = values.shape[0]
    lo, hi = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    b = np.minimum(((values - lo) / span * bins).astype(np.int64), bins - 1)
    mass = np.bincount((b + bins * np.arange(c)[:, None]).ravel(), weights.ravel(),
                       c * bins).reshape(c, bins)
    cdf = np.cumsum(np.cbrt(mass), axis=1)
    cdf /= np.where(cdf[:, -1:] > 0, cdf[:, -1:], 1.0)
    q = (np.arange(k) + 0.5) / k
    edges = np.arange(1, bins + 1) / bins  # bin i ends at fraction (i + 1) / bins of the span
    frac = np.stack([np.interp(q, cdf[r], edges) for r in range(c)])
    return np.sort(lo + span * frac, axis=1)


def kmeans_1d(values: np.ndarray, k: int, iterations: int,
              weights: np.ndarray | None = None, init: str = "companded"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted 1-D k-means of each row (see the module docstring).

    Args:
        values: ``[C, n]`` finite floats (one codebook per row).
        k: clusters per row.
        iterations: Lloyd iterations (on each row's histogram for long rows).
        weights: non-negative ``[C, n]`` element weights, None for 1.
        init: ``"companded"`` (quantiles of ``p^(1/3)``) or ``"linear"`` (evenly spaced
            between the row's minimum and maximum).

    Returns:
        ``(codebook, indices)``: float64 ``[C, k]`` sorted per row, int64 ``[C, n]`` in
        ``0..k-1``. A row of at most ``k`` distinct values gets exactly those values as its
        codebook (the last repeated to fill ``k``), without k-means: no error.
    """
    values = np.asarray(values, np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, np.float64)
    lo, hi = values.min(axis=1), values.max(axis=1)
    if init == "linear":
        centers = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, k)[None, :]
    else:
        centers = _companded_centers(values, weights, k, min(
            max(MIN_ROW_BINS, BINS // values.shape[0]), max(4 * k, values.shape[1] // 4)))
    c, n = values.shape
    bins = max(MIN_ROW_BINS, BINS // c)
    if n > 4 * bins:  # Lloyd iterations on each row's histogram: bin means, bin weights
        span = np.where(hi > lo, hi - lo, 1.0)[:, None]
        b = np.minimum(((values - lo[:, None]) / span * bins).astype(np.int64), bins - 1)
        b += bins * np.arange(c)[:, None]
        point_weights = np.bincount(b.ravel(), weights.ravel(), c * bins).reshape(c, bins)
        moment = np.bincount(b.ravel(), (weights * values).ravel(), c * bins).reshape(c, bins)
        middle = lo[:, None] + span * (np.arange(bins) + 0.5) / bins
        points = np.where(point_weights > 0, moment / np.where(point_weights > 0,
                                                                point_weights, 1.0), middle)
    else:
        points, point_weights = values, weights
    few = _few_values(values, k)
    for _ in range(iterations if len(few) < c else 0):
        centers = _update(points, point_weights, _assign(points, centers), centers)
    if points is not values and len(few) < c:
        centers = _update(values, weights, _assign(values, centers), centers)
    index = _assign(values, centers)
    for r, distinct in few.items():  # the codebook is the row's values: exact
        centers[r] = np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
        index[r] = np.searchsorted(distinct, values[r])
    return centers, index


def hessian_assign(matrix: np.ndarray, gram: np.ndarray, codebook: np.ndarray,
                   damp: float = 0.01, batch: int = GPTVQ_BATCH) -> np.ndarray:
    """GPTVQ's assignment (module docstring) of ``matrix`` to ``codebook``.

    Args:
        matrix: float ``[K, N]``, the layer computing ``y = x @ matrix`` for an input row
            ``x[K]``.
        gram: ``X^T X`` (``[K, K]``) of the calibration inputs; never-active features (zero
            diagonal) get ``H_kk = 1`` (``passes/_sparse.damped_hessian``).
        codebook: sorted float64 ``[C, k]``: one codebook (``C = 1``) or one per output
            (``C = N``).
        damp: added to the diagonal, a fraction of its mean.
        batch: input features whose errors are spread together (the result depends on it
            only through rounding).

    Returns:
        int64 ``[K, N]``: each weight's index into its output's codebook.

    Raises:
        numpy.linalg.LinAlgError: the damped Hessian is not positive definite (cannot happen
            for a Gram matrix with ``damp > 0``).
    """
    k, n = matrix.shape
    h, _ = damped_hessian(gram, damp)
    order = np.argsort(-np.diag(h), kind="stable")  # GPTQ's act-order: salient inputs first
    u = inverse_upper(h[np.ix_(order, order)])  # upper: H^-1 = U^T U
    work = np.array(matrix, np.float64)[order]
    index = np.zeros((k, n), np.int64)
    per_output = codebook.shape[0] > 1
    columns = np.arange(n)
    for start in range(0, k, batch):
        stop = min(start + batch, k)
        errors = np.zeros((stop - start, n))
        for i in range(start, stop):
            row = work[i]
            if per_output:
                j = _assign(row[:, None], codebook)[:, 0]
                err = (row - codebook[columns, j]) / u[i, i]
            else:
                j = _assign(row[None, :], codebook)[0]
                err = (row - codebook[0, j]) / u[i, i]
            work[i + 1:stop] -= np.outer(u[i, i + 1:stop], err)
            errors[i - start] = err
            index[order[i]] = j
        work[stop:] -= u[start:stop, stop:].T @ errors
    return index


def _few_values(values: np.ndarray, k: int) -> dict[int, np.ndarray]:
    """The rows of ``values`` [C, n] with at most ``k`` distinct values: ``{row: its sorted
    distinct values}``. A row whose first ``4 k + 1`` elements already hold more is not sorted."""
    few = {}
    for r, row in enumerate(values):
        if np.unique(row[:4 * k + 1]).size > k:
            continue
        distinct = np.unique(row)
        if distinct.size <= k:
            few[r] = distinct
    return few


def pack_nibbles(indices: np.ndarray) -> np.ndarray:
    """Flat indices (0..15, any shape, ``n`` values) as ``ceil(n / 2)`` bytes: index ``i`` in
    the low nibble of byte ``i`` for ``i < m``, in the high nibble of byte ``i - m`` after."""
    flat = indices.astype(np.uint8).ravel()
    m = (flat.size + 1) // 2
    padded = np.zeros(2 * m, np.uint8)
    padded[:flat.size] = flat
    return padded[:m] | (padded[m:] << 4)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: the ``n`` flat indices (uint8)."""
    return np.concatenate([packed & 15, packed >> 4])[:n]


@dataclass
class _Plan:
    """One tensor's clustering: codebook ``[C, K]`` (``codebook_dtype``), indices (uint8, W's
    shape, into the codebook of the element's channel), the channel axis (None: one codebook),
    the value the model computes with, ``||W' - W|| / ||W||``, the bytes stored; whether
    ``per_channel`` gave way to one codebook, whether weights were asked but not found, why
    ``"gptvq"`` did not compensate (None: it did, or not asked); the measured drift of the
    tensor alone (mixed strength) and whether it has ``wide_clusters``."""

    tensor: gs.Constant
    codebook: np.ndarray
    indices: np.ndarray
    axis: int | None
    value: np.ndarray
    relative_error: float
    bytes_after: int
    one_codebook: bool = False
    unweighted: bool = False
    uncompensated: str | None = None
    drift: float | None = None
    wide: bool = False


def _channel_weights(t: gs.Constant, slots, stats: ActivationStats) -> np.ndarray | None:
    """``sum over readers of ||x_j||^2`` broadcast to W's shape (float64), None when a reader's
    input has no statistics (a Gather table, a weight read in a subgraph)."""
    total = np.zeros(t.shape, np.float64)
    for node, index in slots:
        slot = weight_slot(node, index)
        if slot.kind == "table" or node.op not in ("MatMul", "Gemm", "Conv"):
            return None
        x = node.inputs[1 - index] if node.op in ("MatMul", "Gemm") else node.inputs[0]
        if x.name not in stats or stats[x.name].channel_norm is None:
            return None
        norm_sq = stats[x.name].channel_norm ** 2
        if node.op == "Conv":
            group, out = node.attrs.get("group", 1), t.shape[0]
            per_group = t.shape[1]
            if norm_sq.size != conv_input_channels(node):
                return None
            channel = (np.arange(out)[:, None] // (out // group)) * per_group \
                + np.arange(per_group)[None, :]
            shape = (out, per_group) + (1,) * (len(t.shape) - 2)
            total = total + norm_sq[channel].reshape(shape)
            continue
        axis = input_channel_axis(node, index, len(t.shape))
        if axis is None or norm_sq.size != t.shape[axis]:
            return None
        shape = [1] * len(t.shape)
        shape[axis] = norm_sq.size
        total = total + norm_sq.reshape(shape)
    return total


def _hessian(t: gs.Constant, slots, stats: ActivationStats) -> tuple[int, object] | str:
    """``(input axis, X^T X of the input)`` of a 2-D weight that one MatMul/Gemm applies to an
    activation ``X`` (the Gram matrix as stored: an array or ``external.SpilledValues``), or
    why its assignment is not compensated."""
    if len(slots) != 1:
        return "weight read by several nodes"
    node, index = slots[0]
    if node.op not in ("MatMul", "Gemm") or index != 1 or len(t.shape) != 2:
        return "not the 2-D weight of a MatMul or Gemm"
    x = node.inputs[0]
    if x.name not in stats or stats[x.name].gram is None:
        return "no Gram matrix of the input"
    axis = input_channel_axis(node, index, 2)
    if stats[x.name].gram.shape != (t.shape[axis],) * 2:
        return "Gram matrix does not match the weight's input features"
    return axis, stats[x.name].gram


def _index_bytes(n: int, k: int) -> int:
    """Bytes of the indices of ``n`` elements into ``k`` clusters: 4 or 8 bits each."""
    return (n + 1) // 2 if k <= NIBBLE_CLUSTERS else n


def _stored_bytes(shape: tuple, k: int, codebook: np.ndarray, axis: int | None) -> int:
    """Bytes of the initializers the runtime form of a weight of ``shape`` holds (see the
    module docstring and ``ClusterWeights._rewrite``): indices, codebook, offsets, and the small
    constants of the unpacking (16, 4, the slice bounds, the shape)."""
    n = int(np.prod(shape))
    index = _index_bytes(n, k)
    if k <= NIBBLE_CLUSTERS:
        index += 2 + (16 if n % 2 else 0) + 8 * len(shape)
    return index + codebook.nbytes + (0 if axis is None else 4 * codebook.shape[0])


@register
class ClusterWeights(Pass):
    name = "cluster_weights"
    description = "Weight sharing: k-means clusters of each large weight, stored as uint8 (or " \
                  "4-bit) indices and a float codebook (Deep Compression)."
    Options = ClusterWeightsOptions
    lossless = False
    # after the lossless passes, on the weights that run (a BatchNormalization folded into a
    # Conv after clustering would rescale every value and undo the sharing)
    weights = "fused"
    min_opset = 11
    strength: ClassVar[str | None] = "clusters"
    ladder: ClassVar[tuple] = (256, 128, 64, 32, 16, 8, 4)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        k = self.options.clusters
        if k is None:
            return PassResult(False, {"clusters": None})
        if k == "auto":
            raise UsageError("pass 'cluster_weights': clusters 'auto' is resolved by the pass "
                             "manager's strength search (give max_drift)")
        stats = None
        gptvq = self.options.method == "gptvq"
        if self.options.weighted or gptvq:
            if not ctx.has_calibration():
                raise UsageError("pass 'cluster_weights': weighted and method 'gptvq' need "
                                 "calibration data (--calibration-data, or real --inputs)")
            stats = ctx.analyses.get(ActivationGrams if gptvq else ActivationStats)
        usedef = ctx.analyses.get(UseDef)
        refused: collections.Counter[str] = collections.Counter()
        self._ranking = None
        plans = []
        for t in weight_initializers(graph, CLUSTERED_KINDS):
            reason, plan = self._plan(t, usedef, stats, k)
            if reason is not None:
                refused[reason] += 1
                continue
            plans.append(plan)
        if self.options.wide_clusters is not None and plans:
            plans = self._widen(plans, usedef, stats, graph, ctx)
        self._plans = {id(p.tensor): p for p in plans}
        proposals = [Proposal(tensor=p.tensor, value=p.value, apply=self._rewrite(
            graph, usedef.owner(input_slots(p.tensor)[0][0]), p, ctx)) for p in plans]
        result = {"clusters": k, "per_channel": self.options.per_channel,
                  "weighted": self.options.weighted, "method": self.options.method,
                  "codebook_dtype": self.options.codebook_dtype}
        if gptvq:
            result["compensated"] = sum(p.uncompensated is None for p in plans)
            uncompensated = collections.Counter(p.uncompensated for p in plans
                                                if p.uncompensated is not None)
            if uncompensated:
                result["uncompensated"] = dict(sorted(uncompensated.items()))
        if self._ranking is not None:
            result["wide_clusters"] = self.options.wide_clusters
            result["size_budget"] = self.options.size_budget
            result["ranking"] = self._ranking
        if refused:
            result["refused"] = dict(sorted(refused.items()))
        if any(p.unweighted for p in plans):
            result["unweighted"] = sum(p.unweighted for p in plans)
        if any(p.one_codebook for p in plans):
            result["one_codebook"] = sum(p.one_codebook for p in plans)
        return PassResult(False, result, proposals=proposals)

    def _plan(self, t: gs.Constant, usedef: UseDef, stats: ActivationStats | None, k: int
              ) -> tuple[str | None, _Plan | None]:
        """Why ``t`` stays as it is, or its clustering into ``k`` clusters (per codebook)."""
        w = t.values
        if not isinstance(w, np.ndarray):
            return "sparse initializer", None
        if w.size < self.options.min_size:
            return "smaller than min_size", None
        if not np.isfinite(w).all():
            return "non-finite values", None
        slots = input_slots(t)
        if len({id(usedef.owner(n)) for n, _ in slots}) != 1:
            return "read in several graphs", None
        book_dtype = np.dtype(np.float16) if self.options.codebook_dtype == "float16" \
            else w.dtype
        axis, one_codebook = None, False
        if self.options.per_channel:
            axes = {input_channel_axis(n, i, w.ndim) if weight_slot(n, i).kind == "table"
                    else output_channel_axis(n, i, w.ndim) for n, i in slots}
            if len(axes) != 1 or None in axes:
                return "no common output-channel axis", None
            axis = axes.pop()
            if w.shape[axis] * k * book_dtype.itemsize > _index_bytes(w.size, k) // 2:
                axis, one_codebook = None, True
        a = None
        if stats is not None:
            a = _channel_weights(t, slots, stats)
            if a is not None:
                a = a + 1e-12 * max(float(a.mean()), 1e-30)  # channels never active count
        moved = np.moveaxis(w, axis, 0) if axis is not None else w.reshape(1, -1)
        rows = moved.reshape(moved.shape[0], -1)
        a_rows = None if a is None else (
            np.moveaxis(np.broadcast_to(a, w.shape), axis, 0) if axis is not None
            else a).reshape(rows.shape)
        centers, index = kmeans_1d(rows, k, self.options.iterations, a_rows,
                                  self.options.init)
        uncompensated = None
        if self.options.method == "gptvq":
            found = _hessian(t, slots, stats)
            if isinstance(found, str):
                uncompensated = found
            else:
                inputs, gram = found
                matrix = w if inputs == 0 else w.T  # [K, N]
                assigned = hessian_assign(matrix, external.unspill(gram), centers,
                                          self.options.damp)
                assigned = assigned if inputs == 0 else assigned.T
                index = (np.moveaxis(assigned, axis, 0) if axis is not None
                         else assigned).reshape(index.shape)
        codebook = centers.astype(book_dtype)
        gathered = np.take_along_axis(codebook, index, axis=1).reshape(moved.shape)
        value = (np.moveaxis(gathered, 0, axis) if axis is not None
                 else gathered.reshape(w.shape)).astype(w.dtype)
        index = index.astype(np.uint8).reshape(moved.shape)
        index = np.ascontiguousarray(np.moveaxis(index, 0, axis)) if axis is not None \
            else index.reshape(w.shape)
        norm = float(np.linalg.norm(w.astype(np.float64)))
        error = float(np.linalg.norm(value.astype(np.float64) - w)) / norm if norm else 0.0
        return None, _Plan(t, codebook, index, axis, value, error,
                           _stored_bytes(w.shape, k, codebook, axis), one_codebook,
                           stats is not None and a is None, uncompensated)

    def _widen(self, plans: list[_Plan], usedef: UseDef, stats, graph: gs.Graph,
               ctx: PassContext) -> list[_Plan]:
        """``plans`` with the tensors chosen for ``wide_clusters`` re-planned (mixed strength,
        see the module docstring): by decreasing measured harm per byte widening adds, each
        one whose wider plan keeps the stored bytes within ``size_budget``."""
        o = self.options
        if ctx.budget is None:
            self._ranking = "none (no drift budget to measure with)"
            return plans
        proposals = [Proposal(tensor=p.tensor, value=p.value, apply=lambda: None,
                              group=str(i)) for i, p in enumerate(plans)]
        harm = ctx.budget.harm_alone(graph, ctx.template, proposals, RANKING_FEEDS)
        for i, p in enumerate(plans):
            p.drift = harm[str(i)]
        self._ranking = "measured"
        planned = {id(p.tensor) for p in plans}
        others = sum(t.values.nbytes for t in graph.tensors().values()
                     if isinstance(t, gs.Constant) and id(t) not in planned
                     and isinstance(t.values, np.ndarray))
        limit = o.size_budget * (others + sum(p.value.nbytes for p in plans))
        total = others + sum(p.bytes_after for p in plans)
        added = [max(1, _index_bytes(p.value.size, o.wide_clusters)
                     - _index_bytes(p.value.size, o.clusters)) for p in plans]
        out = list(plans)
        for i in sorted(range(len(plans)), key=lambda i: -plans[i].drift / added[i]):
            if total + added[i] - plans[i].codebook.nbytes > limit or plans[i].drift <= 0:
                continue  # cannot fit even with no codebook, or no harm to remove
            _, wide = self._plan(plans[i].tensor, usedef, stats, o.wide_clusters)
            if total - plans[i].bytes_after + wide.bytes_after <= limit:
                total += wide.bytes_after - plans[i].bytes_after
                wide.drift, wide.wide = plans[i].drift, True
                out[i] = wide
        return out

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        done = {id(p.tensor) for p in accepted}
        per_tensor = {}
        before = after = 0
        for key, plan in self._plans.items():
            size = int(plan.value.nbytes)
            per_tensor[plan.tensor.name] = {
                "shape": [int(d) for d in plan.value.shape],
                "clusters": int(plan.codebook.shape[1]),
                "codebooks": int(plan.codebook.shape[0]), "bytes_before": size,
                "bytes_after": plan.bytes_after, "relative_error": plan.relative_error,
                "accepted": key in done}
            if plan.drift is not None:
                per_tensor[plan.tensor.name]["drift"] = plan.drift
            if key in done:
                before += size
                after += plan.bytes_after
        wide = [p.tensor.name for key, p in self._plans.items() if p.wide and key in done]
        if wide:
            result.stats["wide"] = wide
        return {**result.stats, "tensors_clustered": len(accepted),
                "proposed": len(result.proposals), "accepted": len(accepted),
                "bytes_before": before, "bytes_after": after, "per_tensor": per_tensor}

    def _rewrite(self, root: gs.Graph, g: gs.Graph, plan: _Plan, ctx: PassContext):
        """The proposal's ``apply``: every reader of the tensor reads the rebuilt weight, and
        the outputs of the nodes rebuilding it are marked as compressed storage
        (``ctx.storage``), which the lossless passes do not fold back."""
        def apply() -> None:
            t, w = plan.tensor, plan.value
            nodes: list[gs.Node] = []

            def name(suffix: str) -> str:
                return fresh_name(root, f"{t.name}_{suffix}")

            def node(op: str, inputs: list, dtype, **attrs) -> gs.Variable:
                out = gs.Variable(name(f"{op}_output"), dtype=dtype)
                nodes.append(gs.Node(op, name=name(op), attrs=attrs, inputs=inputs,
                                     outputs=[out]))
                return out

            c, k = plan.codebook.shape
            if k <= NIBBLE_CLUSTERS:
                packed = gs.Constant(name("packed_indices"), pack_nibbles(plan.indices))
                low = node("Mod", [packed, gs.Constant(name("sixteen"), np.array(16, np.uint8))],
                           np.uint8)
                high = node("BitShift", [packed, gs.Constant(name("four"),
                                                             np.array(4, np.uint8))],
                            np.uint8, direction="RIGHT")
                flat = node("Concat", [low, high], np.uint8, axis=0)
                if w.size % 2:
                    flat = node("Slice", [flat, gs.Constant(name("start"), np.array([0])),
                                          gs.Constant(name("end"), np.array([w.size]))],
                                np.uint8)
                codes = node("Reshape", [flat, gs.Constant(name("shape"),
                                                            np.array(w.shape, np.int64))],
                             np.uint8)
            else:
                codes = gs.Constant(name("indices"), plan.indices)
            index = node("Cast", [codes], np.int32, to=onnx.TensorProto.INT32)
            if plan.axis is not None:
                offsets = (np.arange(c, dtype=np.int32) * k).reshape(
                    [c if i == plan.axis else 1 for i in range(w.ndim)])
                index = node("Add", [index, gs.Constant(name("offsets"), offsets)], np.int32)
            book = gs.Constant(name("codebook"), plan.codebook.ravel())
            rebuilt = node("Gather", [book, index], plan.codebook.dtype, axis=0)
            if plan.codebook.dtype != w.dtype:
                rebuilt.shape = list(w.shape)
                rebuilt = node("Cast", [rebuilt], w.dtype,
                               to=onnx.helper.np_dtype_to_tensor_dtype(w.dtype))
            rebuilt.shape = list(w.shape)
            for reader, i in input_slots(t):
                reader.inputs[i] = rebuilt
            g.nodes[0:0] = nodes
            ctx.storage.update(out.name for n in nodes for out in n.outputs)
        return apply
