"""Quantization arithmetic and options shared by the quantization passes (private module).

Integer grids, from the ONNX ``QuantizeLinear`` / ``DequantizeLinear`` specs
(https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html)::

    q = saturate(round_half_even(x / scale) + zero_point)      x' = (q - zero_point) * scale

Symmetric int8 weights use the grid ``[-127, 127]`` with zero point 0 (see
``quantize_weights``' docstring for why not -128); asymmetric activations use the whole
``[qmin, qmax]`` of their type with a zero point that represents 0.0 exactly (Jacob et al., 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR, section 2.1).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.edit import nbytes

#: Largest magnitude of the symmetric int8 weight grid.
QMAX = 127
#: ``(qmin, qmax)`` of each integer type.
QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
          "int4": (-8, 7), "uint4": (0, 15)}


def broadcastable(scale: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """``scale`` reshaped to ``[1, .., C, .., 1]``, broadcasting along ``axis`` of a tensor of rank
    ``rank`` (unchanged when per-tensor)."""
    if axis is None:
        return scale
    shape = [1] * rank
    shape[axis] = scale.size
    return scale.reshape(shape)


def quantize_symmetric(values: np.ndarray, axis: int | None,
                       qmax: int = QMAX) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``values`` per channel along ``axis`` (None: per tensor) onto
    ``[-qmax, qmax]`` with zero point 0: ``scale_c = max |W_c| / qmax`` (1.0 when that is below
    float32's smallest normal, e.g. an all-zero channel: q is then 0 anyway).

    Returns:
        ``(q, scale)``: ``q`` int8 with the shape of ``values``; ``scale`` float32 of shape
        ``[values.shape[axis]]``, or a 0-d array when ``axis`` is None.
    """
    w = np.asarray(values, dtype=np.float64)
    reduce = tuple(a for a in range(w.ndim) if a != axis) if axis is not None else None
    amax = np.abs(w).max(axis=reduce)
    scale = (amax / qmax).astype(np.float32)
    scale = np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / broadcastable(scale, w.ndim, axis)), -qmax, qmax).astype(np.int8)
    return q, scale


#: GPTQ's lazy batch (rows updated together; a multiple of every block size).
GPTQ_BATCH = 128


def gptq_rows(w: np.ndarray, gram: np.ndarray, quantize_row, damp: float = 0.01,
              act_order: bool = False) -> None:
    """GPTQ's column-by-column quantization with inverse-Hessian error compensation (Frantar et
    al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", ICLR, Algorithm 1, with its lazy batch updates) of ``w`` (float ``[K, N]``:
    the K input features are the rows here, the paper's columns), given ``gram = X^T X``
    (``[K, K]``) of the layer's calibration inputs. ``H = 2 X^T X``; features never active (zero
    diagonal) get ``H_kk = 1``; ``damp`` times the mean diagonal is added to it. With
    ``act_order`` the rows are visited by decreasing ``H_kk`` (the paper's "act-order").

    ``quantize_row(position, row, work)`` is called once per row, in visiting order: ``row`` is
    the row's index in ``w``, ``work`` (float64 ``[K, N]``, rows in visiting order) holds the
    error-compensated rows, ``work[position]`` the one to quantize (later rows may be read, e.g.
    to set a block's scale); it returns the row's dequantized value (float ``[N]``) and keeps
    the codes itself. The rounding error of each row, divided by the pivot of the upper Cholesky
    factor ``U`` of ``H^-1``, is spread over the rows not yet visited.

    Raises:
        numpy.linalg.LinAlgError: ``H`` is not positive definite even after dampening (cannot
            happen for a Gram matrix plus ``λ I``, ``λ > 0``).
    """
    k = w.shape[0]
    h = 2.0 * np.asarray(gram, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    u = np.linalg.cholesky(np.linalg.inv(h[np.ix_(order, order)])).T  # upper: H^-1 = U^T U
    work = np.asarray(w, np.float64)[order]
    for start in range(0, k, GPTQ_BATCH):
        stop = min(start + GPTQ_BATCH, k)
        errors = np.zeros((stop - start, w.shape[1]))
        for i in range(start, stop):
            err = (work[i] - quantize_row(i, int(order[i]), work)) / u[i, i]
            work[i + 1:stop] -= np.outer(u[i, i + 1:stop], err)
            errors[i - start] = err
        work[stop:k] -= u[start:stop, stop:k].T @ errors


def gptq_symmetric(w: np.ndarray, gram: np.ndarray, scale: np.ndarray, qmax: int,
                   damp: float = 0.01, act_order: bool = True) -> np.ndarray:
    """GPTQ (:func:`gptq_rows`) of ``w`` (float ``[K, N]``) onto the symmetric grid
    ``[-qmax, qmax]`` with the given ``scale`` (float32 ``[N]`` per output channel, or a scalar
    per tensor) and zero point 0: the int8 codes ``[K, N]``, what
    ``clip(round(w / scale), -qmax, qmax)`` would be without the error compensation."""
    s = np.broadcast_to(np.asarray(scale, np.float64), (w.shape[1],))
    codes = np.zeros(w.shape, np.int8)

    def row(position: int, index: int, work: np.ndarray) -> np.ndarray:
        c = np.clip(np.rint(work[position] / s), -qmax, qmax)
        codes[index] = c
        return c * s

    gptq_rows(w, gram, row, damp, act_order)
    return codes


#: Weight rounding methods (option ``rounding`` of ``quantize_static`` and ``quantize_dynamic``).
ROUNDINGS = ("nearest", "gptq")


def gptq_weight(values: np.ndarray, gram, scale: np.ndarray, qmax: int, damp: float,
                transposed: bool = False) -> np.ndarray:
    """:func:`gptq_symmetric` of a MatMul/Gemm weight in its stored layout: ``values`` ``[K, N]``,
    or ``[N, K]`` when ``transposed`` (Gemm ``transB``); ``gram`` ``[K, K]`` possibly spilled to
    disk (``onnxopt.external``). Returns the int8 codes in the layout of ``values``."""
    w = values.T if transposed else values
    codes = gptq_symmetric(w, external.unspill(gram), scale, qmax, damp)
    return codes.T if transposed else codes


def rounding_summary(rounding: str, gptq: int, nearest: Iterable[str]) -> dict | str:
    """The ``rounding`` statistics of a pass: ``"nearest"``, or with ``gptq`` the number of
    quantized weights GPTQ rounded and ``{reason: count}`` of those rounded to nearest."""
    if rounding != "gptq":
        return "nearest"
    return {"method": "gptq", "gptq": gptq,
            "nearest": dict(sorted(collections.Counter(nearest).items()))}


def dequantize(q, scale: np.ndarray, axis: int | None,
               zero_point: np.ndarray | None = None) -> np.ndarray:
    """What DequantizeLinear computes: ``float32(q - zero_point) * scale`` broadcast along
    ``axis`` (float32, the shape of ``q``; ``q`` an integer array or its
    ``onnxopt.external.SpilledValues``, mapped for this call only)."""
    q = external.unspill(q)
    x = q.astype(np.float32)
    if zero_point is not None:
        x = x - broadcastable(np.asarray(zero_point).astype(np.float32), q.ndim, axis)
    return x * broadcastable(np.asarray(scale, np.float32), q.ndim, axis)


def scale_zero_point(rmin: float, rmax: float, dtype: np.dtype,
                     symmetric: bool = False) -> tuple[np.float32, np.ndarray]:
    """Scale and zero point mapping the real range ``[rmin, rmax]`` (widened to hold 0.0) onto
    the integer type ``dtype`` (int8 or uint8); symmetric: zero point at the grid's centre
    (0 for int8, 128 for uint8) and ``scale = max(|rmin|, |rmax|) / (qmax - zp)``.

    Returns:
        ``(scale, zero_point)``: float32 scalar; 0-d array of ``dtype``.
    """
    dtype = np.dtype(dtype)
    qmin, qmax = QRANGE[dtype]
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if symmetric:
        zp = 0 if qmin < 0 else (qmax + 1) // 2
        peak = max(abs(rmin), abs(rmax))
        scale = peak / (qmax - zp) if peak > 0 else 1.0
    else:
        scale = (rmax - rmin) / (qmax - qmin) if rmax > rmin else 1.0
        zp = int(np.clip(np.rint(qmin - rmin / scale), qmin, qmax))
    scale = np.float32(scale if scale >= np.finfo(np.float32).tiny else 1.0)
    return scale, np.array(zp, dtype)


@dataclass(frozen=True)
class QuantizeOptions:
    """Options every quantization pass has (``--quantize-exclude``, ``--quantize-ops``).

    Attributes:
        exclude: op types or node names left in float.
        ops: when given, only nodes of these op types are quantized.
    """

    exclude: tuple | list = ()
    ops: tuple | list | None = None

    def check(self) -> str | None:
        if not all(isinstance(x, str) for x in list(self.exclude) + list(self.ops or [])):
            return "options exclude and ops must be lists of op types or node names"
        return None


def excluded(node: gs.Node, options: QuantizeOptions) -> str | None:
    """Why ``node`` must stay float by the user's choice (``exclude``, ``ops``), or None."""
    if node.op in options.exclude or (node.name and node.name in options.exclude):
        return "excluded by the user"
    if options.ops is not None and node.op not in options.ops:
        return "op type not selected (ops)"
    return None


# --- Model-level helpers for passes that emit contrib ops (added for quantize_embeddings) ---

def import_domain(graph: gs.Graph, domain: str, version: int) -> None:
    """Make the model of ``graph`` import ``domain`` at ``version`` if it does not yet (the
    default domain is kept at the graph's opset)."""
    import onnx

    from onnxopt.graph import opset_version

    domains = list(graph.import_domains or [onnx.helper.make_opsetid("", opset_version(graph))])
    if not any(d.domain == domain for d in domains):
        domains.append(onnx.helper.make_opsetid(domain, version))
    graph.import_domains = domains


# -- refusals shared by the passes that quantize initializers ------------------------------------

def weight_refusal(t: gs.Constant, slots: list, usedef, options, accepts, what: str,
                   ndim: int | None = None) -> str | None:
    """Why the float initializer ``t``, read at ``slots`` (``[(node, input index)]``), must stay
    float, or None. In order: a reader excluded by the user (``options.exclude`` / ``ops``); a
    read that ``accepts(node, index)`` refuses (the reason is ``what``); readers in more than one
    graph (``usedef``: an :class:`~onnxopt.analyses.UseDef`); a graph input or output; not
    float32 (DequantizeLinear outputs float32 before opset 19); a sparse initializer; rank other
    than ``ndim``; fewer than ``options.min_elements`` elements; non-finite values."""
    for n, _ in slots:
        if (reason := excluded(n, options)) is not None:
            return reason
    if not all(accepts(n, i) for n, i in slots):
        return what
    if len({id(usedef.owner(n)) for n, _ in slots}) > 1:
        return "readers in more than one graph"
    if usedef.on_boundary(t):
        return "graph input or output"
    if np.dtype(t.dtype) != np.float32:
        return "not float32"
    values = external.peek(t)  # an external weight: mapped for this check only
    if not isinstance(values, np.ndarray):
        return "sparse initializer"
    if ndim is not None and values.ndim != ndim:
        return f"not {ndim}-D"
    if values.size < options.min_elements:
        return f"fewer than {options.min_elements} elements"
    if not np.isfinite(values).all():
        return "non-finite values"
    return None


def spread(magnitudes: np.ndarray) -> float:
    """``max / median`` of per-channel magnitudes (the outlier ratio SmoothQuant and cross-layer
    equalization reduce); infinite when the median is 0."""
    median = float(np.median(magnitudes))
    return float(magnitudes.max() / median) if median > 0 else float("inf")


def weight_summary(result, accepted: list, scheme: str, stored: dict[int, int]) -> dict:
    """The statistics every initializer-quantizing pass reports once the drift budget decided:
    ``tensors_quantized``, ``scheme``, ``proposed``, ``accepted``, ``refused`` (with the
    proposals the budget kept float), ``bytes_before`` (float data of the accepted tensors) and
    ``bytes_after`` (what replaced them: ``stored`` by ``id`` of the tensor)."""
    refused = collections.Counter(result.stats.get("refused", {}))
    kept = len(result.proposals) - len(accepted)
    if kept:
        refused["kept float: drift budget"] += kept
    return {
        "tensors_quantized": len(accepted), "scheme": scheme,
        "proposed": len(result.proposals), "accepted": len(accepted),
        "refused": dict(sorted(refused.items())),
        "bytes_before": sum(nbytes(p.tensor) for p in accepted),
        "bytes_after": sum(stored.get(id(p.tensor), 0) for p in accepted),
    }
