"""Calibration: the real range ``[lo, hi]`` of each activation that static quantization maps onto
its integer grid, from streamed statistics (:class:`onnxopt.analyses.activations.TensorStats`:
min/max and a 2048-bin histogram over ``[-r, r]``, non-finite values skipped, so a ``-inf``
attention mask never makes a range infinite).

Methods (``CALIBRATION_METHODS``):

* ``minmax``: ``[min x, max x]`` over every feed.
* ``percentile``: ``lo`` and ``hi`` are the ``(100 - p)``-th and ``p``-th percentiles of the
  values (one tail each), clipping rare outliers (``p`` default 99.999, as onnxruntime).
* ``entropy``: TensorRT's KL-divergence calibration (Migacz, 2017, "8-bit Inference with
  TensorRT", GTC, slides 29-38): on the histogram of ``|x|`` (``B`` bins), for each threshold bin
  ``i >= 128`` the reference ``P`` is bins ``[0, i)`` with the outliers beyond added to the last
  bin, the candidate ``Q`` the same bins merged into 128 levels and expanded back over their
  non-empty bins; the threshold ``T = i* . width`` minimizes ``KL(P || Q)``, and the range is
  ``[max(min x, -T), min(max x, T)]``.
* ``mse``: the range ``[a . min x, a . max x]``, ``a`` in ``(0, 1]``, minimizing the expected
  squared error of quantize-dequantize over the histogram (bin centres weighted by their counts,
  clipping error included) on the grid of the activation type (uint8 or int8, asymmetric).

Memory: the statistics are one fixed-size histogram per tensor, folded feed by feed in
``activations.collect``; nothing grows with the number of feeds.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx

from onnxopt.analyses.activations import HISTOGRAM_BINS, TensorStats, collect
from onnxopt.errors import UsageError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy", "mse")
#: Default percentile of ``percentile`` calibration (onnxruntime's default too).
DEFAULT_PERCENTILE = 99.999
#: Levels of the candidate distribution in ``entropy`` (the positive half of int8).
ENTROPY_LEVELS = 128
#: Candidate shrink factors of ``mse``.
MSE_STEPS = 200


def minmax_range(s: TensorStats) -> tuple[float, float]:
    """``(min, max)`` of the finite values seen ((0, 0) when none)."""
    if s.count == 0:
        return 0.0, 0.0
    return float(s.minimum), float(s.maximum)


def _edges(s: TensorStats) -> np.ndarray:
    return np.linspace(-s.range, s.range, HISTOGRAM_BINS + 1)


def percentile_range(s: TensorStats, percentile: float = DEFAULT_PERCENTILE
                     ) -> tuple[float, float]:
    """``(lo, hi)``: the ``100 - percentile`` and ``percentile`` percentiles of the values seen
    (bin resolution ``2 r / 2048``), never wider than ``(min, max)``.

    Raises:
        UsageError: ``percentile`` is not in (50, 100].
    """
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (50, 100], got {percentile}")
    total = int(s.histogram.sum())
    if total == 0:
        return 0.0, 0.0
    edges, cum = _edges(s), np.cumsum(s.histogram)
    tail = (100.0 - percentile) / 100.0 * total
    lo = edges[int(np.searchsorted(cum, tail, side="right"))]
    hi = edges[int(np.searchsorted(cum, total - tail, side="left")) + 1]
    return max(float(lo), float(s.minimum)), min(float(hi), float(s.maximum))


def entropy_threshold(magnitudes: np.ndarray, levels: int = ENTROPY_LEVELS) -> int:
    """TensorRT's KL threshold over a histogram of ``|x|`` (counts, ``[B]``, bin 0 next to 0):
    the number ``i`` of leading bins whose range minimizes ``KL(P || Q)`` (see the module
    docstring); ``B`` when the histogram has no more than ``levels`` bins in use."""
    hist = np.asarray(magnitudes, np.float64)
    n = hist.size
    used = int(np.flatnonzero(hist)[-1]) + 1 if hist.any() else 0
    if used <= levels:
        return max(used, 1)
    best, best_i = np.inf, n
    suffix = np.cumsum(hist[::-1])[::-1]  # suffix[i] = sum(hist[i:])
    for i in range(levels, used + 1):
        p = hist[:i].copy()
        if i < n:
            p[-1] += suffix[i]
        # merge the i bins into `levels` groups and spread each group's mass over its non-empty
        # bins (TensorRT's expansion)
        group = (np.arange(i) * levels) // i
        nonzero = hist[:i] > 0
        mass = np.bincount(group, weights=hist[:i], minlength=levels)
        filled = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, mass[group] / np.maximum(filled[group], 1), 0.0)
        p_sum, q_sum = p.sum(), q.sum()
        if q_sum == 0:
            continue
        p, q = p / p_sum, q / q_sum
        support = p > 0
        # P mass where Q is empty (only the outlier bin can be): smooth Q there
        qs = np.where(q[support] > 0, q[support], 1e-12)
        kl = float(np.sum(p[support] * np.log(p[support] / qs)))
        if kl < best:
            best, best_i = kl, i
    return best_i


def entropy_range(s: TensorStats) -> tuple[float, float]:
    """``(lo, hi)`` clipped at TensorRT's KL threshold of ``|x|`` (see the module docstring)."""
    if int(s.histogram.sum()) == 0:
        return 0.0, 0.0
    centre = HISTOGRAM_BINS // 2
    magnitudes = s.histogram[centre:] + s.histogram[:centre][::-1]
    width = s.range / centre
    threshold = entropy_threshold(magnitudes) * width
    return max(float(s.minimum), -threshold), min(float(s.maximum), threshold)


def mse_range(s: TensorStats, dtype=np.uint8, steps: int = MSE_STEPS) -> tuple[float, float]:
    """``(a . min, a . max)`` minimizing the histogram's expected quantize-dequantize squared
    error on the grid of ``dtype`` (uint8 or int8, asymmetric); see the module docstring."""
    lo, hi = minmax_range(s)
    if lo == hi:
        return lo, hi
    s_lo, s_hi = lo, hi
    edges = _edges(s)
    counts = s.histogram.astype(np.float64)
    used = counts > 0
    centres, counts = ((edges[:-1] + edges[1:]) / 2)[used], counts[used]
    info = np.iinfo(np.dtype(dtype))
    qmin, qmax = int(info.min), int(info.max)
    lo, hi = min(lo, 0.0), max(hi, 0.0)  # the grid holds 0.0 exactly (as QuantizeLinear's)
    best, best_a = np.inf, 1.0
    for a in np.linspace(1.0 / steps, 1.0, steps):
        scale = a * (hi - lo) / (qmax - qmin)
        zp = np.clip(np.rint(qmin - a * lo / scale), qmin, qmax)
        q = np.clip(np.rint(centres / scale) + zp, qmin, qmax)
        err = float(np.sum(counts * ((q - zp) * scale - centres) ** 2))
        if err < best:
            best, best_a = err, float(a)
    return max(best_a * lo, s_lo), min(best_a * hi, s_hi)


def tensor_range(s: TensorStats, method: str, percentile: float = DEFAULT_PERCENTILE,
                 dtype=np.uint8) -> tuple[float, float]:
    """The calibrated ``(lo, hi)`` of one tensor by ``method`` (``CALIBRATION_METHODS``).

    Raises:
        UsageError: unknown method or percentile out of range.
    """
    if method == "minmax":
        return minmax_range(s)
    if method == "percentile":
        return percentile_range(s, percentile)
    if method == "entropy":
        return entropy_range(s)
    if method == "mse":
        return mse_range(s, dtype)
    raise UsageError(f"unknown calibration method '{method}'; known: "
                     f"{', '.join(CALIBRATION_METHODS)}")


def calibrate(model: onnx.ModelProto, tensors: Iterable[str], feeds: Iterable[dict],
              method: str = "minmax", percentile: float = DEFAULT_PERCENTILE,
              dtype=np.uint8) -> dict[str, tuple[float, float]]:
    """Run ``model`` over ``feeds`` (consumed once, one feed's activations held at a time) and
    return ``{tensor: (lo, hi)}`` for each of ``tensors`` (main-graph tensor names) by ``method``.

    Raises:
        UsageError: unknown method, percentile out of range.
        InputError: onnxruntime cannot load or run the instrumented model.
    """
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method '{method}'; known: "
                         f"{', '.join(CALIBRATION_METHODS)}")
    stats = collect(model, {t: None for t in tensors}, feeds)
    return {name: tensor_range(s, method, percentile, dtype) for name, s in stats.tensors.items()}
