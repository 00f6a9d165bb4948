"""Tests of optimizer/analyses/calibration.py: each range method on a known distribution, the
-inf attention-mask case, and streaming (memory independent of the number of feeds)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxopt.analyses.activations import TensorStats
from onnxopt.analyses.calibration import (calibrate, entropy_range, entropy_threshold,
                                          minmax_range, mse_range, percentile_range,
                                          tensor_range)
from onnxopt.errors import UsageError

RNG = np.random.default_rng(0)


def _stats(*chunks) -> TensorStats:
    s = TensorStats("x", None)
    for c in chunks:
        s.update(c)
    return s


def test_minmax_is_the_extremes_over_feeds():
    a, b = RNG.normal(size=1000), RNG.normal(size=1000) * 3
    assert minmax_range(_stats(a, b)) == (min(a.min(), b.min()), max(a.max(), b.max()))


def test_percentile_matches_numpy_on_a_gaussian():
    x = RNG.normal(size=200_000)
    lo, hi = percentile_range(_stats(x[:100_000], x[100_000:]), 99.0)
    width = 2 * np.abs(x).max() / 2048  # histogram resolution (after range doubling: x2)
    assert abs(lo - np.percentile(x, 1.0)) <= 2 * width
    assert abs(hi - np.percentile(x, 99.0)) <= 2 * width


def test_percentile_clips_a_rare_outlier():
    x = np.concatenate([RNG.uniform(-1, 1, 100_000), [1000.0]])
    s = _stats(x)
    lo, hi = percentile_range(s, 99.99)
    resolution = 2 * s.range / 2048
    assert hi < 1.0 + resolution and lo > -1.0 - resolution
    assert minmax_range(_stats(x))[1] == 1000.0


def test_non_finite_mask_values_give_finite_ranges():
    """An attention mask (-inf on padding) must not break percentile/entropy (onnxruntime
    raises "range not finite")."""
    x = RNG.normal(size=(4, 64))
    x[:, 40:] = -np.inf
    s = _stats(x, np.full((2, 8), np.nan))
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = tensor_range(s, method)
        assert np.isfinite(lo) and np.isfinite(hi) and lo < 0 < hi, method


def test_entropy_clips_a_long_tail_and_keeps_a_uniform():
    uniform = _stats(RNG.uniform(-1, 1, 100_000))
    lo, hi = entropy_range(uniform)
    assert hi > 0.9 and lo < -0.9  # nothing to clip
    tail = _stats(np.concatenate([RNG.laplace(size=100_000), [60.0, -60.0]]))
    lo, hi = entropy_range(tail)
    assert 3.0 < hi < 30.0 and -30.0 < lo < -3.0


def test_entropy_threshold_of_few_bins_is_their_extent():
    h = np.zeros(1024)
    h[:50] = 1
    assert entropy_threshold(h) == 50


def test_mse_range_is_the_best_clipping_of_a_heavy_tail():
    x = RNG.laplace(size=200_000)
    s = _stats(x)

    def error(lo, hi):
        scale = (hi - lo) / 255
        zp = np.clip(np.rint(-lo / scale), 0, 255)
        q = np.clip(np.rint(x / scale) + zp, 0, 255)
        return float(np.mean(((q - zp) * scale - x) ** 2))

    found = error(*mse_range(s))
    assert found < 0.8 * error(*minmax_range(s))
    best = min(error(a * x.min(), a * x.max()) for a in np.linspace(0.05, 1.0, 96))
    assert found <= 1.05 * best


def test_unknown_method_and_bad_percentile():
    s = _stats(RNG.normal(size=10))
    with pytest.raises(UsageError):
        tensor_range(s, "kl")
    with pytest.raises(UsageError):
        percentile_range(s, 20.0)


def test_calibrate_streams_over_a_model():
    """calibrate() exposes the tensors, runs the feeds once (a generator), and its state is one
    fixed-size histogram per tensor, whatever the number of feeds."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    feeds = [{"x": RNG.normal(size=(2, 8)).astype(np.float32)} for _ in range(20)]
    ranges = calibrate(model, ["r", "y"], iter(feeds), "minmax")
    allx = np.stack([f["x"] for f in feeds])
    assert ranges["r"] == pytest.approx((0.0, float(np.maximum(allx, 0).max())))
    assert ranges["y"] == pytest.approx((-float(np.maximum(allx, 0).max()), 0.0))
