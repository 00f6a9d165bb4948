"""Tests of optimizer/analyses/activations.py: statistics streamed over calibration feeds equal
numpy's over all the activations at once (onnxruntime computes the activations)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, run_ort
from onnxopt.analyses import ActivationStats, AnalysisManager, TensorStats
from onnxopt.analyses.activations import HISTOGRAM_BINS, activation_inputs
from onnxopt.errors import UsageError
from onnxopt.graph import import_graph
from onnxopt.pass_manager import PassContext


def _model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["m"]),
             helper.make_node("Conv", ["img", "K"], ["c"]),
             helper.make_node("Add", ["m", "x2"], ["y"])]
    return make_model(nodes, [("x", np.float32, ["n", 4]), ("x2", np.float32, ["n", 3]),
                              ("img", np.float32, [1, 2, 5, 5])],
                      [("y", np.float32, ["n", 3]), ("c", np.float32, [1, 3, 3, 3])],
                      {"W": rng.normal(size=(4, 3)).astype(np.float32),
                       "K": rng.normal(size=(3, 2, 3, 3)).astype(np.float32)})


def _feeds(k):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(n, 4)).astype(np.float32) * (n + 1),
             "x2": rng.normal(size=(n, 3)).astype(np.float32),
             "img": rng.normal(size=(1, 2, 5, 5)).astype(np.float32)}
            for n in range(1, k + 1)]


def test_collected_tensors_are_the_data_inputs_of_weighted_ops():
    graph = import_graph(_model())
    assert activation_inputs(graph) == {"h": -1, "img": 1}


def test_streamed_statistics_equal_numpy_over_all_feeds():
    model, feeds = _model(), _feeds(4)
    graph = import_graph(model)
    served = []

    def stream():  # a generator: consumed once, one feed at a time
        for f in feeds:
            served.append(1)
            yield f

    ctx = PassContext(template=model, calibration=stream())
    stats = AnalysisManager(graph, ctx).get(ActivationStats)
    assert stats.feeds == len(served) == 4
    h = np.concatenate([np.maximum(f["x"], 0) for f in feeds])
    s = stats["h"]
    assert s.count == h.size and s.minimum == h.min() and s.maximum == pytest.approx(h.max())
    np.testing.assert_allclose(s.channel_norm, np.linalg.norm(h, axis=0), rtol=1e-6)
    np.testing.assert_allclose(s.channel_absmax, np.abs(h).max(axis=0), rtol=1e-6)
    assert s.histogram.sum() == h.size
    img = np.stack([f["img"][0] for f in feeds])  # [feeds, C, H, W]
    np.testing.assert_allclose(stats["img"].channel_norm,
                               np.sqrt((img.astype(np.float64) ** 2).sum(axis=(0, 2, 3))),
                               rtol=1e-6)
    # the activations really are what onnxruntime computes (Relu output)
    assert run_ort(model, feeds[0])["y"].shape == (1, 3)


def test_histogram_range_doubles_without_losing_counts():
    s = TensorStats("t", None)
    s.update(np.array([0.5, -0.25, 1.0]))
    s.update(np.array([7.9, -3.0]))  # needs the range doubled three times
    assert s.range == 8.0 and s.histogram.sum() == 5
    edges = np.linspace(-s.range, s.range, HISTOGRAM_BINS + 1)
    expected, _ = np.histogram([0.5, -0.25, 1.0, 7.9, -3.0], bins=edges)
    # re-binned counts stay within one bin of where a single pass puts them
    assert np.abs(np.cumsum(s.histogram) - np.cumsum(expected)).max() <= 3
    lo, hi = s.percentile_range(100.0)
    assert lo == -hi and hi >= 7.9


def test_non_finite_values_are_skipped():
    s = TensorStats("t", 0)
    s.update(np.array([[1.0, np.inf], [np.nan, -2.0]]))
    assert s.count == 2 and s.minimum == -2.0 and s.maximum == 1.0
    np.testing.assert_allclose(s.channel_sq_sum, [1.0, 4.0])


def test_without_calibration_data_a_usage_error():
    model = _model()
    graph = import_graph(model)
    with pytest.raises(UsageError, match="calibration"):
        AnalysisManager(graph, PassContext(template=model)).get(ActivationStats)


def _gemm_model():
    rng = np.random.default_rng(2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Gemm", ["xt", "V"], ["g"], transA=1),
             helper.make_node("Conv", ["img", "K"], ["c"])]
    return make_model(nodes, [("x", np.float32, [2, "t", 5]), ("xt", np.float32, [3, "n"]),
                              ("img", np.float32, [1, 2, 5, 5])],
                      [("m", np.float32, [2, "t", 4]), ("g", np.float32, ["n", 2]),
                       ("c", np.float32, [1, 3, 3, 3])],
                      {"W": rng.normal(size=(5, 4)).astype(np.float32),
                       "V": rng.normal(size=(3, 2)).astype(np.float32),
                       "K": rng.normal(size=(3, 2, 3, 3)).astype(np.float32)})


def _gemm_feeds(k):
    rng = np.random.default_rng(3)
    base = rng.normal(size=(5, 5))  # correlated channels
    return [{"x": (rng.normal(size=(2, t, 5)) @ base).astype(np.float32),
             "xt": rng.normal(size=(3, t + 1)).astype(np.float32),
             "img": rng.normal(size=(1, 2, 5, 5)).astype(np.float32)} for t in range(1, k + 1)]


def test_gram_matrices_equal_numpy_over_all_feeds_and_only_when_asked():
    from onnxopt.analyses.activations import ActivationGrams

    model, feeds = _gemm_model(), _gemm_feeds(5)
    graph = import_graph(model)
    stats = AnalysisManager(graph, PassContext(template=model, calibration=iter(feeds))).get(
        ActivationGrams)
    x = np.concatenate([f["x"].reshape(-1, 5) for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(stats["x"].gram, x.T @ x, rtol=1e-9)
    assert stats["x"].rows == x.shape[0]
    np.testing.assert_allclose(stats["x"].channel_abs_mean, np.abs(x).mean(axis=0), rtol=1e-9)
    xt = np.concatenate([f["xt"].T for f in feeds]).astype(np.float64)  # Gemm transA: A^T rows
    np.testing.assert_allclose(stats["xt"].gram, xt.T @ xt, rtol=1e-9)
    assert stats["img"].gram is None  # Conv inputs get no Gram matrix
    plain = AnalysisManager(graph, PassContext(template=model, feeds=feeds)).get(ActivationStats)
    assert plain["x"].gram is None
    np.testing.assert_allclose(plain["x"].channel_abs_mean, np.abs(x).mean(axis=0), rtol=1e-9)


def test_gram_not_collected_above_the_channel_limit(monkeypatch):
    import onnxopt.analyses.activations as activations

    monkeypatch.setattr(activations, "GRAM_MAX_CHANNELS", 4)
    s = TensorStats("t", 1, wants_gram=True)
    s.update(np.ones((3, 5)))
    assert s.gram is None and s.rows == 3
    s = TensorStats("t", 1, wants_gram=True)
    s.update(np.ones((3, 4)))
    np.testing.assert_array_equal(s.gram, np.full((4, 4), 3.0))


def _masked_model():
    """x [2, t, 5] read by a MatMul (masked by "mask" [2, t]), xt [3, n] by a Gemm with transA
    (its leading dimensions are not the mask's: taken whole)."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Gemm", ["xt", "V"], ["g"], transA=1),
             helper.make_node("Cast", ["mask"], ["mf"], to=1)]
    return make_model(nodes, [("x", np.float32, [2, "t", 5]), ("xt", np.float32, [3, "n"]),
                              ("mask", np.int64, [2, "t"])],
                      [("m", np.float32, [2, "t", 4]), ("g", np.float32, ["n", 2]),
                       ("mf", np.float32, [2, "t"])],
                      {"W": rng.normal(size=(5, 4)).astype(np.float32),
                       "V": rng.normal(size=(3, 2)).astype(np.float32)})


def test_positions_a_mask_input_marks_zero_are_left_out():
    """With ``rows`` (the run's drift mask) every statistic of a tensor whose leading dimensions
    are the mask's -- range, histogram, per-channel norms, Gram matrix -- is numpy's over the
    kept positions only: padding with huge values changes none of them; other tensors are
    taken whole; without the mask the padding counts."""
    from onnxopt.analyses.activations import ActivationGrams
    from onnxopt.budget import DriftBudget

    rng = np.random.default_rng(5)
    model = _masked_model()
    feeds = []
    for t in (3, 6, 4):
        mask = (np.arange(t)[None, :] < np.array([[t - 1], [1]])).astype(np.int64)
        x = rng.normal(size=(2, t, 5)).astype(np.float32)
        x[mask == 0] = 1e3  # padding: far outside the real values
        feeds.append({"x": x, "xt": rng.normal(size=(3, t)).astype(np.float32), "mask": mask})
    budget = DriftBudget(model, feeds, 0.99, mask="mask")
    graph = import_graph(model)
    stats = AnalysisManager(graph, PassContext(template=model, calibration=iter(feeds),
                                               budget=budget)).get(ActivationGrams)
    kept = np.concatenate([f["x"][f["mask"] != 0] for f in feeds]).astype(np.float64)
    s = stats["x"]
    assert s.count == kept.size and s.maximum == pytest.approx(kept.max()) and s.maximum < 100
    assert s.histogram.sum() == kept.size and s.rows == kept.shape[0]
    np.testing.assert_allclose(s.gram, kept.T @ kept, rtol=1e-9)
    np.testing.assert_allclose(s.channel_norm, np.linalg.norm(kept, axis=0), rtol=1e-6)
    xt = np.concatenate([f["xt"].T for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(stats["xt"].gram, xt.T @ xt, rtol=1e-9)
    whole = AnalysisManager(graph, PassContext(template=model, calibration=iter(feeds))).get(
        ActivationGrams)
    assert whole["x"].maximum == pytest.approx(1e3)
    assert whole["x"].rows == sum(f["x"].shape[0] * f["x"].shape[1] for f in feeds)


def test_kept_rows_moves_the_channel_axis_and_leaves_other_layouts():
    from onnxopt.analyses.activations import kept_rows

    keep = np.array([[1, 0, 1], [0, 1, 1]])
    value = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out, axis = kept_rows(value, keep, -1)
    assert out.shape == (4, 4) and axis == 1
    np.testing.assert_array_equal(out, value[keep != 0])
    assert kept_rows(value, keep, None)[0].shape == (4, 4)
    same, axis = kept_rows(value, keep, 1)  # the channel axis is a masked one: taken whole
    assert same is value and axis == 1
    other = np.zeros((3, 2, 4), np.float32)  # leading dimensions not the mask's
    assert kept_rows(other, keep, -1)[0] is other
    assert kept_rows(value, None, -1)[0] is value


def test_a_feed_whose_mask_keeps_nothing_is_taken_whole():
    """As the metrics judge it (``kept_positions``): a mask of zeros leaves the feed whole
    rather than out (review finding: such feeds counted nothing)."""
    from onnxopt.analyses.activations import collect

    model = _masked_model()
    x = np.random.default_rng(6).normal(size=(2, 3, 5)).astype(np.float32)
    feed = {"x": x, "xt": np.ones((3, 3), np.float32), "mask": np.zeros((2, 3), np.int64)}
    stats = collect(model, {"x": -1}, [feed], rows="mask")
    assert stats["x"].count == x.size
    assert stats["x"].maximum == pytest.approx(float(x.max()))


def test_every_position_stats_ignore_the_drift_mask():
    """``EveryPositionStats`` (what smoothing for run-time quantized activations reads) keeps the
    padding the drift mask leaves out of ``ActivationStats``: DynamicQuantizeLinear's range
    sees every position."""
    from onnxopt.analyses.activations import EveryPositionStats
    from onnxopt.budget import DriftBudget

    model = _masked_model()
    rng = np.random.default_rng(8)
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.int64)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    x[mask == 0] = 1e3
    feeds = [{"x": x, "xt": rng.normal(size=(3, 3)).astype(np.float32), "mask": mask}]
    ctx = PassContext(template=model, calibration=feeds, mask="mask",
                      budget=DriftBudget(model, feeds, 0.99, mask="mask"))
    manager = AnalysisManager(import_graph(model), ctx)
    assert manager.get(ActivationStats)["x"].maximum < 100
    assert manager.get(EveryPositionStats)["x"].maximum == pytest.approx(1e3)
