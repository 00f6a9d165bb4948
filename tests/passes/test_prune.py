"""Tests of passes/prune.py: which initializers are pruned, exactly which values, and that the
pruned model computes what the same model with numpy-pruned weights computes on onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import with_initializers
from onnxopt import optimize
from onnxopt.budget import DriftBudget
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager, get_pass
from tools import zoo

THRESHOLD = 0.05
WEIGHTS = ("W_mm", "W_conv", "table")
NON_WEIGHTS = ("W_shared", "B_conv", "bn_scale", "bn_bias", "bn_mean", "bn_var", "shape", "idx")


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def _numpy_prune(w: np.ndarray, threshold: float) -> np.ndarray:
    return np.where(np.abs(w.astype(np.float64)) < threshold, 0, w).astype(w.dtype)


def _small_values(rng, shape, scale=0.1) -> np.ndarray:
    """Normal values with some exact zeros (and a -0.0) so ``zeros_before`` is not trivial."""
    w = rng.normal(0.0, scale, size=shape).astype(np.float32)
    flat = w.reshape(-1)
    flat[::7] = 0.0
    flat[1] = -0.0
    return w


def build_model(seed: int = 0, indices_input: bool = False) -> onnx.ModelProto:
    """MatMul, Conv + bias, BatchNormalization, Reshape by a shape initializer, Gather with int64
    indices, and a weight that an Add also reads.

    The Gather indices are an initializer, or with ``indices_input`` a graph input ``idx`` (so
    that constant folding cannot turn the Gather into a constant).
    """
    rng = np.random.default_rng(seed)
    inits = {
        "W_mm": _small_values(rng, (8, 6)),
        "W_shared": rng.normal(0.0, 0.1, size=(8, 8)).astype(np.float32),
        "W_conv": _small_values(rng, (3, 2, 3, 3), scale=0.2),
        # biases and BN statistics are small on purpose: pruning them would show
        "B_conv": np.array([0.01, -0.02, 0.3], np.float32),
        "bn_scale": np.array([1.0, 0.001, 0.5], np.float32),
        "bn_bias": np.array([0.001, -0.04, 0.0], np.float32),
        "bn_mean": np.array([0.002, 0.01, -0.03], np.float32),
        "bn_var": np.array([1.0, 0.04, 0.5], np.float32),
        "shape": np.array([1, -1], np.int64),
        "table": _small_values(rng, (10, 4)),
        "idx": np.array([0, 3, 9, 3], np.int64),
    }
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8]),
              helper.make_tensor_value_info("Z", TensorProto.FLOAT, [8, 8]),
              helper.make_tensor_value_info("IMG", TensorProto.FLOAT, [1, 2, 5, 5])]
    if indices_input:
        del inits["idx"]
        inputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, [4]))
    nodes = [
        helper.make_node("MatMul", ["X", "W_mm"], ["Y_mm"]),
        helper.make_node("MatMul", ["X", "W_shared"], ["Y_shared"]),
        helper.make_node("Add", ["Z", "W_shared"], ["Y_add"]),
        helper.make_node("Conv", ["IMG", "W_conv", "B_conv"], ["C"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["C", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                         ["BN"]),
        helper.make_node("Reshape", ["BN", "shape"], ["Y_conv"]),
        helper.make_node("Gather", ["table", "idx"], ["Y_gather"]),
    ]
    graph = helper.make_graph(
        nodes, "prune_test", inputs,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in (
            ("Y_mm", [2, 6]), ("Y_shared", [2, 8]), ("Y_add", [8, 8]), ("Y_conv", [1, 75]),
            ("Y_gather", [4, 4]))],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def feed(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"X": rng.normal(size=(2, 8)).astype(np.float32),
            "Z": rng.normal(size=(8, 8)).astype(np.float32),
            "IMG": rng.normal(size=(1, 2, 5, 5)).astype(np.float32)}


def run_ort(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs)))


def run_pass(model: onnx.ModelProto, threshold: float | None):
    graph = import_graph(model)
    result = PassManager([]).run_pass(get_pass("prune", threshold=threshold), graph,
                                      PassContext(template=model))
    return export_graph(graph, model), result


def test_prunes_exactly_the_small_weight_values():
    model = build_model()
    before = _initializers(model)
    pruned, result = run_pass(model, THRESHOLD)
    after = _initializers(pruned)

    assert result.modified
    assert set(after) == set(before)
    for name in WEIGHTS:
        expected = _numpy_prune(before[name], THRESHOLD)
        assert after[name].dtype == before[name].dtype and after[name].shape == before[name].shape
        np.testing.assert_array_equal(after[name], expected)
        small = (np.abs(before[name]) < THRESHOLD) & (before[name] != 0)
        assert small.any(), name  # the test model must have something to prune
        assert np.all(after[name][small] == 0)
        np.testing.assert_array_equal(after[name][~small], before[name][~small])
    for name in NON_WEIGHTS:
        np.testing.assert_array_equal(after[name], before[name])
        assert after[name].dtype == before[name].dtype


def test_stats_match_numpy():
    model = build_model()
    before = _initializers(model)
    _, result = run_pass(model, THRESHOLD)
    stats = json.loads(json.dumps(result.stats))  # JSON-serializable, and unchanged by it
    assert stats == result.stats

    assert set(stats["per_tensor"]) == set(WEIGHTS)
    total = zeros_before = zeros_after = 0
    for name in WEIGHTS:
        w = before[name]
        zb = int(np.count_nonzero(w == 0))
        za = int(np.count_nonzero(_numpy_prune(w, THRESHOLD) == 0))
        assert stats["per_tensor"][name] == {
            "shape": list(w.shape), "size": w.size, "zeros_before": zb, "zeros_after": za,
            "sparsity": pytest.approx(za / w.size)}
        assert za > zb > 0
        total, zeros_before, zeros_after = total + w.size, zeros_before + zb, zeros_after + za
    assert stats["weights"] == total == 8 * 6 + 3 * 2 * 3 * 3 + 10 * 4
    assert stats["zeros_before"] == zeros_before
    assert stats["zeros_after"] == zeros_after
    assert stats["values_pruned"] == zeros_after - zeros_before
    assert stats["sparsity"] == pytest.approx(zeros_after / total)
    assert stats["tensors"] == 3 and stats["tensors_changed"] == 3
    assert stats["threshold"] == THRESHOLD


def test_pruned_model_matches_onnxruntime_on_numpy_pruned_weights():
    model = build_model()
    before = _initializers(model)
    pruned, _ = run_pass(model, THRESHOLD)
    expected_model = with_initializers(
        model, {n: _numpy_prune(before[n], THRESHOLD) for n in WEIGHTS})
    inputs = feed()
    got, want = run_ort(pruned, inputs), run_ort(expected_model, inputs)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)

    w_mm = _numpy_prune(before["W_mm"], THRESHOLD)
    np.testing.assert_allclose(got["Y_mm"], inputs["X"] @ w_mm, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["Y_gather"],
                                  _numpy_prune(before["table"], THRESHOLD)[before["idx"]])
    # the weight also read by Add is untouched, so both of its outputs are the original's
    original = run_ort(model, inputs)
    np.testing.assert_array_equal(got["Y_add"], original["Y_add"])
    np.testing.assert_array_equal(got["Y_shared"], original["Y_shared"])
    assert not np.allclose(got["Y_mm"], original["Y_mm"], rtol=0, atol=1e-7)


def test_no_threshold_does_nothing():
    model = build_model()
    pruned, result = run_pass(model, None)
    assert not result.modified
    assert result.stats == {}
    for name, value in _initializers(model).items():
        np.testing.assert_array_equal(_initializers(pruned)[name], value)


def test_threshold_below_every_magnitude_is_not_a_modification():
    model = build_model()
    graph = import_graph(model)
    arrays = {t.name: t.values for t in graph.tensors().values() if t.name in WEIGHTS}
    result = PassManager([]).run_pass(get_pass("prune", threshold=1e-30), graph,
                                      PassContext(template=model))
    assert not result.modified
    assert result.stats["values_pruned"] == 0 and result.stats["tensors_changed"] == 0
    assert result.stats["zeros_after"] == result.stats["zeros_before"] > 0
    for name, t in graph.tensors().items():
        if name in WEIGHTS:
            assert t.values is arrays[name]  # not even replaced by an equal copy


def test_original_array_is_not_mutated():
    model = build_model()
    graph = import_graph(model)
    w = graph.tensors()["W_mm"]
    original, snapshot = w.values, w.values.copy()
    PassManager([]).run_pass(get_pass("prune", threshold=THRESHOLD), graph,
                             PassContext(template=model))
    assert w.values is not original
    np.testing.assert_array_equal(original, snapshot)
    assert np.count_nonzero(w.values == 0) > np.count_nonzero(snapshot == 0)


def test_float16_compared_without_rounding_the_threshold():
    # float16(0.0009996) rounds down to 0.00099945, the weight's value: compared in float16 the
    # weight would not be below the threshold, though it is below 0.0009996.
    w = np.array([[0.00099945, 0.0011, -0.0005, 0.5]], np.float16)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "fp16",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [1, 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [1, 4])],
        [numpy_helper.from_array(w, "W")]), opset_imports=[helper.make_opsetid("", 17)])
    pruned, result = run_pass(model, 0.0009996)
    got = _initializers(pruned)["W"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.array([[0, 0.0011, 0, 0.5]], np.float16))
    assert result.stats["values_pruned"] == 2


def test_weight_in_subgraph_is_pruned():
    w = np.array([[0.01, 0.2], [-0.3, -0.001]], np.float32)

    def branch(name: str) -> onnx.GraphProto:  # reads W from the outer scope
        return helper.make_graph(
            [helper.make_node("MatMul", ["X", "W"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 2])])

    model = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=branch("then"),
                          else_branch=branch("else"))], "sub",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "W")]), opset_imports=[helper.make_opsetid("", 17)])
    pruned, result = run_pass(model, 0.05)
    assert result.modified and set(result.stats["per_tensor"]) == {"W"}
    x = np.array([[1.0, 2.0]], np.float32)
    out = run_ort(pruned, {"cond": np.array(True), "X": x})["Y"]
    np.testing.assert_allclose(out, x @ np.array([[0, 0.2], [-0.3, 0]], np.float32), rtol=1e-6)


def test_optimize_end_to_end():
    model = build_model(indices_input=True)
    threshold = 0.01
    inputs = dict(feed(), idx=np.array([0, 3, 9, 3], np.int64))
    # passes=[]: only pruning, so the weights can be compared one to one with numpy
    optimized, report = optimize(model, passes=[], prune_threshold=threshold, inputs=inputs)
    assert report.validation is not None and report.validation.passed
    assert report.validation.mode == "lossy"
    records = [r for r in report.passes if r.name == "prune"]
    assert len(records) == 1 and records[0].modified
    stats = records[0].stats
    assert set(stats["per_tensor"]) == set(WEIGHTS)
    before = _initializers(model)
    expected_zeros = sum(int(np.count_nonzero(_numpy_prune(before[n], threshold) == 0))
                         for n in WEIGHTS)
    assert stats["zeros_after"] == expected_zeros > stats["zeros_before"]
    assert stats["sparsity"] == pytest.approx(expected_zeros / stats["weights"])
    after = _initializers(optimized)
    for name in WEIGHTS:
        np.testing.assert_array_equal(after[name], _numpy_prune(before[name], threshold))
    np.testing.assert_array_equal(after["W_shared"], before["W_shared"])
    json.dumps(report.to_dict())


@pytest.mark.zoo
def test_real_model_ppocr_cls():
    name = "ch_ppocr_mobile_v2.0_cls_infer"
    onnx_file = zoo.model_path(zoo.DEFAULT_DEST, name)
    npz_file = zoo.inputs_path(zoo.DEFAULT_DEST, name)
    if not onnx_file.is_file() or not npz_file.is_file():
        pytest.skip(f"{onnx_file} not fetched (tools/fetch_models.py)")
    _, report = optimize(str(onnx_file), prune_threshold=1e-3, inputs=str(npz_file))
    assert report.validation.passed and report.validation.mode == "lossy"
    (record,) = [r for r in report.passes if r.name == "prune"]
    assert record.modified
    assert record.stats["sparsity"] > 0
    assert record.stats["zeros_after"] > record.stats["zeros_before"]


# -- sparsity, N:M, activation importance, reconstruction (issue 10) ----------------------------

def chain_model(k: int = 16, n: int = 8, seed: int = 0, hidden: int | None = None
                ) -> onnx.ModelProto:
    """``Y = ((X @ W1 + b1) @ W2) + b2``: two MatMul layers, each followed by an Add of a bias
    initializer (X is [rows, k], W1 [k, hidden], W2 [hidden, n])."""
    rng = np.random.default_rng(seed)
    hidden = hidden or k
    inits = {"W1": rng.normal(size=(k, hidden)).astype(np.float32),
             "b1": rng.normal(size=hidden).astype(np.float32),
             "W2": rng.normal(size=(hidden, n)).astype(np.float32),
             "b2": rng.normal(size=n).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["H"]),
             helper.make_node("MatMul", ["H", "W2"], ["y"]),
             helper.make_node("Add", ["y", "b2"], ["Y"])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(v, name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def correlated_feeds(k: int = 16, count: int = 4, rows: int = 64, seed: int = 2,
                     scales: np.ndarray | None = None, mean: float = 0.0) -> list[dict]:
    """Feeds ``X = Z A + noise`` (features strongly correlated), times ``scales`` per feature,
    plus ``mean``."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(4, k))
    scales = np.ones(k) if scales is None else scales
    return [{"X": ((rng.normal(size=(rows, 4)) @ mix + 0.1 * rng.normal(size=(rows, k)))
                   * scales + mean).astype(np.float32)} for _ in range(count)]


def propose(model: onnx.ModelProto, calibration=None, feeds=None, synthesized=False,
            drift_mask=None, **options):
    """Run the pass on ``model`` and return ``({tensor: proposed value}, proposals, stats)``
    (the graph is not edited; the summary assumes every proposal is accepted); ``drift_mask``:
    the run's (its drift budget's, on ``feeds`` or ``calibration``)."""
    graph = import_graph(model)
    budget = None if drift_mask is None else DriftBudget(
        model, feeds or calibration, 0.99, mask=drift_mask)
    ctx = PassContext(template=model, calibration=calibration, feeds=feeds,
                      synthesized=synthesized, budget=budget)
    p = get_pass("prune", **options)
    result = p.run(graph, ctx)
    values = {pr.tensor.name: pr.value for pr in result.proposals}
    return values, result.proposals, p.summarize(result, result.proposals)


def outputs(model: onnx.ModelProto, feeds: list[dict], values=None, name: str = "Y"):
    """``name`` on every feed (stacked), with ``values`` replacing initializers; ``name`` may be
    an intermediate tensor."""
    m = with_initializers(model, values or {})
    if name not in {o.name for o in m.graph.output}:
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    return np.concatenate([run_ort(m, f)[name] for f in feeds])


def test_wanda_prunes_by_weight_times_input_norm():
    model = chain_model()
    scales = np.geomspace(0.01, 100.0, 16)  # input norms differ by 4 orders of magnitude
    cal = correlated_feeds(scales=scales)
    values, _, stats = propose(model, cal, sparsity=0.5, scope="row", importance="activation")
    w1 = _initializers(model)["W1"]
    norms = np.sqrt(sum((f["X"].astype(np.float64) ** 2).sum(axis=0) for f in cal))
    score = np.abs(w1) * norms[:, None]
    expected_keep = score >= np.median(score, axis=0, keepdims=True)  # per output column
    np.testing.assert_array_equal(values["W1"] != 0, expected_keep)
    np.testing.assert_array_equal(values["W1"][expected_keep], w1[expected_keep])
    magnitude_keep = np.abs(w1) >= np.median(np.abs(w1), axis=0, keepdims=True)
    assert (magnitude_keep != expected_keep).sum() > 20  # the criterion matters here
    assert stats["per_tensor"]["W1"]["sparsity"] == 0.5 and stats["importance"] == "activation"
    # onnxruntime computes with the proposed values what numpy does
    x = cal[0]["X"]
    got = outputs(model, cal[:1], values, "h")
    np.testing.assert_allclose(got, x @ values["W1"], rtol=1e-4, atol=1e-3)


def test_two_four_pattern_along_the_input_dimension():
    rng = np.random.default_rng(3)
    w_mm = rng.normal(size=(8, 6)).astype(np.float32)
    w_conv = rng.normal(size=(3, 8, 3, 3)).astype(np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["X", "W_mm"], ["Y"]),
         helper.make_node("Conv", ["IMG", "W_conv"], ["C"], pads=[1, 1, 1, 1])], "nm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8]),
         helper.make_tensor_value_info("IMG", TensorProto.FLOAT, [1, 8, 5, 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 6]),
         helper.make_tensor_value_info("C", TensorProto.FLOAT, [1, 3, 5, 5])],
        [numpy_helper.from_array(w_mm, "W_mm"), numpy_helper.from_array(w_conv, "W_conv")]),
        opset_imports=[helper.make_opsetid("", 17)])
    values, _, stats = propose(model, pattern="2:4")
    mm = values["W_mm"].reshape(2, 4, 6)  # groups of 4 consecutive inputs of each output
    assert np.all((mm != 0).sum(axis=1) == 2)
    top2 = np.sort(np.abs(w_mm.reshape(2, 4, 6)), axis=1)[:, 2:, :]
    np.testing.assert_array_equal(np.sort(np.abs(mm), axis=1)[:, 2:, :], top2)
    conv = values["W_conv"].reshape(3, 2, 4, 3, 3)  # input channels on axis 1
    assert np.all((conv != 0).sum(axis=2) == 2)
    assert stats["sparsity"] == 0.5 and stats["pattern"] == "2:4"
    x = {"X": rng.normal(size=(2, 8)).astype(np.float32),
         "IMG": rng.normal(size=(1, 8, 5, 5)).astype(np.float32)}
    got = run_ort(with_initializers(model, values), x)
    np.testing.assert_allclose(got["Y"], x["X"] @ values["W_mm"], rtol=1e-4, atol=1e-4)


def test_pattern_refuses_input_dimension_not_a_multiple():
    model = chain_model(k=6, n=8, hidden=8)  # W1 has 6 input features, W2 8
    values, _, stats = propose(model, pattern="2:4")
    assert set(values) == {"W2"}
    assert stats["refused"] == {"pattern: input features not a multiple of 4": 1}


def _layer_error(model, cal, values) -> float:
    """``||X W1 - X W1'||^2`` on ``cal`` (the first layer, as onnxruntime computes it)."""
    return float(((outputs(model, cal, None, "h") - outputs(model, cal, values, "h")) ** 2).sum())


def test_reconstruction_reduces_the_layer_output_error():
    model = chain_model()
    cal = correlated_feeds()
    plain, _, _ = propose(model, cal, sparsity=0.5, scope="row", importance="activation")
    refit, _, stats = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                              reconstruct=True, bias_correction=False)
    assert np.all((refit["W1"] == 0).sum(axis=0) == 8)  # still half of each output's weights
    assert stats["reconstruct"] and stats["sparsity"] == 0.5
    e_plain, e_refit = _layer_error(model, cal, plain), _layer_error(model, cal, refit)
    assert e_refit < 0.2 * e_plain, (e_refit, e_plain)
    # the kept weights were refit, not only masked
    assert not np.allclose(refit["W1"][refit["W1"] != 0],
                           _initializers(model)["W1"][refit["W1"] != 0])


def test_bias_correction_removes_the_mean_shift():
    model = chain_model()
    cal = correlated_feeds(mean=3.0)  # inputs far from zero mean: pruning shifts the output
    plain, _, _ = propose(model, cal, sparsity=0.5)
    corrected, proposals, stats = propose(model, cal, sparsity=0.5, bias_correction=True)
    assert set(corrected) == {"W1", "b1", "W2", "b2"}
    np.testing.assert_array_equal(corrected["W1"], plain["W1"])  # the weights are the same
    groups = {p.tensor.name: p.group for p in proposals}
    assert groups["W1"] == groups["b1"] != groups["W2"] == groups["b2"]
    assert stats["biases_corrected"] == 2
    # the first layer sees the original's inputs: its mean output is restored exactly
    ref = outputs(model, cal, None, "H").mean(axis=0)
    shift_plain = np.abs(outputs(model, cal, {"W1": plain["W1"]}, "H").mean(axis=0) - ref)
    shift = np.abs(outputs(model, cal, {"W1": corrected["W1"], "b1": corrected["b1"]}, "H")
                   .mean(axis=0) - ref)
    assert shift_plain.max() > 0.5
    assert shift.max() < 1e-3 * shift_plain.max() + 1e-4


def test_bias_correction_without_a_bias_is_refused_with_a_reason():
    model = chain_model()
    del model.graph.node[3]  # Y = H @ W2: no bias after the second MatMul
    model.graph.node[2].output[0] = "Y"
    model.graph.initializer.pop()
    cal = correlated_feeds()
    values, _, stats = propose(model, cal, sparsity=0.5, bias_correction=True)
    assert "b1" in values and "W2" in values
    assert stats["refused"] == {"bias correction: no bias (MatMul not followed by one Add)": 1}


def test_sequential_statistics_come_from_the_pruned_model():
    from onnxopt.passes._sparse import sparsegpt

    model = chain_model()
    cal = correlated_feeds()
    values, _, _ = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                           reconstruct=True, bias_correction=False, target="pruned", refine=0)
    w2 = _initializers(model)["W2"]

    def gram(of: dict | None, *other: dict | None) -> np.ndarray:
        a = outputs(model, cal, of, "H").astype(np.float64)
        b = outputs(model, cal, other[0], "H").astype(np.float64) if other else a
        return a.T @ b

    pruned_inputs = sparsegpt(w2, gram({"W1": values["W1"]}), 0.5, "row")
    original_inputs = sparsegpt(w2, gram(None), 0.5, "row")
    np.testing.assert_allclose(values["W2"], pruned_inputs.astype(np.float32), rtol=1e-3,
                               atol=1e-4)
    assert not np.allclose(values["W2"], original_inputs, rtol=1e-3, atol=1e-4)
    # the default target: the original model's outputs, through the cross Gram X~^T X
    taught, _, stats = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                               reconstruct=True, bias_correction=False, refine=0)
    assert stats["target"] == "original"
    # the first layer sees X itself: the same mask, the same refit (to float32 Gram rounding)
    np.testing.assert_array_equal(taught["W1"] == 0, values["W1"] == 0)
    np.testing.assert_allclose(taught["W1"], values["W1"], rtol=1e-3, atol=1e-4)
    cross = sparsegpt(w2, gram({"W1": values["W1"]}), 0.5, "row",
                      cross=gram({"W1": values["W1"]}, None), target_damp=0.5)
    np.testing.assert_allclose(taught["W2"], cross.astype(np.float32), rtol=1e-3, atol=1e-4)


def test_original_target_recovers_the_original_output():
    """With the first layer pruned, refitting the second to the original model's outputs
    (``X~^T X`` target) recovers them better than refitting it to its own dense outputs on
    the pruned inputs (``X~ W2``, the old target), on the calibration data and on other data
    from the same distribution (SparseGPT's updates alone: ``refine=0``)."""
    model = chain_model(k=16, hidden=16, n=16)
    feeds = correlated_feeds(count=12)  # one mixing matrix: one distribution
    cal, held_out = feeds[:8], feeds[8:]
    ref_cal, ref_out = outputs(model, cal), outputs(model, held_out)
    errors = {}
    for label, options in (("original", {}), ("original, light ridge", {"target_damp": 0.01}),
                           ("pruned", {"target": "pruned"})):
        values, _, _ = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                               reconstruct=True, refine=0, **options)
        errors[label] = (float(((outputs(model, cal, values) - ref_cal) ** 2).sum()),
                         float(((outputs(model, held_out, values) - ref_out) ** 2).sum()))
    assert errors["original, light ridge"][0] < 0.5 * errors["pruned"][0], errors
    assert errors["original, light ridge"][1] < 0.5 * errors["pruned"][1], errors
    assert errors["original"][0] < 0.8 * errors["pruned"][0], errors  # the default ridge: less
    assert errors["original"][1] < 0.9 * errors["pruned"][1], errors


def test_global_scope_uses_one_threshold_across_tensors():
    model = chain_model()
    w = _initializers(model)
    w["W1"] = w["W1"] * 10  # W2's weights are smaller: pruned more under one threshold
    model = with_initializers(model, {"W1": w["W1"]})
    values, _, stats = propose(model, sparsity=0.5, scope="global")
    both = np.concatenate([np.abs(w["W1"]).ravel(), np.abs(w["W2"]).ravel()])
    threshold = np.sort(both)[both.size // 2 - 1]
    for name in ("W1", "W2"):
        np.testing.assert_array_equal(values[name] == 0, np.abs(w[name]) <= threshold)
    assert stats["sparsity"] == 0.5
    assert stats["per_tensor"]["W2"]["allocated"] > 0.9 > stats["per_tensor"]["W1"]["allocated"]


def test_sensitivity_allocation_meets_the_global_target():
    model = chain_model(k=16, n=16, hidden=64)
    w1 = _initializers(model)["W1"]
    outliers = np.random.default_rng(5).random(w1.shape) < 0.2
    # W1's energy is in a few large weights: pruning half of it costs little, W2's much more
    model = with_initializers(model, {"W1": np.where(outliers, w1 * 30, w1)})
    cal = correlated_feeds()
    values, _, stats = propose(model, cal, sparsity=0.5, allocation="sensitivity",
                               importance="activation")
    allocated = {n: stats["per_tensor"][n]["allocated"] for n in ("W1", "W2")}
    assert allocated["W1"] > 0.5 > allocated["W2"]
    assert stats["sparsity"] == pytest.approx(0.5, abs=0.05)
    for name, s in allocated.items():
        assert stats["per_tensor"][name]["sparsity"] == pytest.approx(s, abs=1 / 64)


def test_relative_threshold_uses_the_tensor_rms():
    model = chain_model()
    values, _, stats = propose(model, relative=0.5)
    for name in ("W1", "W2"):
        w = _initializers(model)[name]
        rms = np.sqrt(np.mean(w.astype(np.float64) ** 2))
        np.testing.assert_array_equal(values[name], np.where(np.abs(w) < 0.5 * rms, 0, w))
    assert stats["relative"] == 0.5


def test_auto_strength_never_reaches_run():
    from onnxopt.errors import UsageError

    p = get_pass("prune", sparsity="auto")
    assert type(p).strength == "sparsity" and type(p).ladder[0] == 0.1
    assert list(type(p).ladder) == sorted(type(p).ladder)
    with pytest.raises(UsageError, match="auto"):
        p.run(import_graph(chain_model()), PassContext(template=chain_model()))


@pytest.mark.parametrize("options, message", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": "half"}, "sparsity"),
    ({"sparsity": 0.5, "threshold": 0.1}, "exclude"), ({"pattern": "4:2"}, "N:M"),
    ({"pattern": "2-4"}, "N:M"), ({"sparsity": 0.5, "scope": "column"}, "scope"),
    ({"sparsity": 0.5, "importance": "hessian"}, "importance"),
    ({"threshold": 0.1, "reconstruct": True}, "needs sparsity"),
    ({"pattern": "2:4", "scope": "global"}, "pattern"),
    ({"sparsity": 0.5, "allocation": "sensitivity", "scope": "global"}, "exclude"),
    ({"sparsity": 0.5, "damp": 0.0}, "damp"), ({"relative": -1.0}, "relative"),
    ({"sparsity": 0.5, "reconstruct": True, "refine": -1}, "refine"),
    ({"sparsity": 0.5, "reconstruct": True, "refine": 2.5}, "refine"),
    ({"sparsity": 0.5, "rows": "attention_mask"}, "needs reconstruct")])
def test_invalid_options_are_refused(options, message):
    from onnxopt.errors import UsageError

    with pytest.raises(UsageError, match=message):
        get_pass("prune", **options)


def test_data_driven_options_refuse_synthesized_feeds():
    from onnxopt.errors import UsageError

    model = chain_model()
    for options in ({"importance": "activation"}, {"reconstruct": True}):
        with pytest.raises(UsageError, match="calibration data"):
            propose(model, feeds=correlated_feeds(), synthesized=True, sparsity=0.5, **options)
    values, _, _ = propose(model, feeds=correlated_feeds(), synthesized=True, sparsity=0.5)
    assert set(values) == {"W1", "W2"}  # magnitude needs no data


def test_sparse_storage_is_refused_with_a_reason():
    with pytest.raises(UsageError, match="sparse_storage is not supported: sparse storage"):
        get_pass("prune", sparsity=0.5, sparse_storage=True)


def residual_model() -> onnx.ModelProto:
    """:func:`chain_model` with its output added to the first layer's: ``Y = (H @ W2 + b2) + H``
    (``H = X @ W1 + b1``, the stream W2's output is added to: a residual connection; W2 scaled
    by 0.3, so that the stream dominates as in a transformer block)."""
    model = chain_model(n=16)
    model.graph.node[3].output[0] = "y_b"
    model.graph.node.append(helper.make_node("Add", ["y_b", "H"], ["Y"]))
    return with_initializers(model, {"W2": 0.3 * _initializers(model)["W2"]})


def test_residual_stream_error_is_made_up_for():
    """With W1 pruned, the stream H that W2's output is added to differs from the original;
    refitting W2 to ``H W2 + (H - H~)`` (``residual``) brings Y closer to the original model's
    than refitting W2's own output, on the calibration data and on held-out data, and the bias
    correction restores Y's mean."""
    model = residual_model()
    feeds = correlated_feeds(count=12, mean=1.0)
    cal, held_out = feeds[:8], feeds[8:]
    errors, values = {}, {}
    for residual in (False, True):
        values[residual], _, stats = propose(model, cal, sparsity=0.5, scope="row",
                                             importance="activation", reconstruct=True,
                                             residual=residual, refine=0)
        errors[residual] = [float(((outputs(model, f, values[residual]) - outputs(model, f))
                                   ** 2).sum()) for f in (cal, held_out)]
    assert "refused" not in stats
    np.testing.assert_array_equal(values[True]["W1"], values[False]["W1"])  # first: no stream
    assert np.all((values[True]["W2"] == 0).sum(axis=0) == 8)
    assert errors[True][0] < 0.85 * errors[False][0], errors  # measured 0.78
    assert errors[True][1] < 0.9 * errors[False][1], errors  # measured 0.84
    # without a bias the first layer's mean shift stays in the stream; W2's bias takes it out
    model = residual_model()
    del model.graph.node[1]  # H = X @ W1
    model.graph.node[0].output[0] = "H"
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "b1"))
    shifts = {}
    for residual in (False, True):
        found, _, _ = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                              reconstruct=True, residual=residual, refine=0)
        shifts[residual] = np.abs(outputs(model, cal, found).mean(axis=0)
                                  - outputs(model, cal).mean(axis=0)).max()
    assert shifts[True] < 1e-3 * shifts[False], shifts


def test_residual_without_a_stream_changes_nothing():
    model = chain_model()  # Y = H @ W2 + b2: no residual Add
    cal = correlated_feeds()
    plain, _, _ = propose(model, cal, sparsity=0.5, reconstruct=True, importance="activation")
    residual, _, stats = propose(model, cal, sparsity=0.5, reconstruct=True,
                                 importance="activation", residual=True)
    for name in plain:
        np.testing.assert_array_equal(residual[name], plain[name])
    assert "refused" not in stats


def test_refine_lowers_the_layer_error_with_the_same_mask():
    from onnxopt.passes._sparse import damped_hessian, refit_masked, sparsegpt

    model = chain_model()
    cal = correlated_feeds()
    once, _, _ = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                         reconstruct=True, bias_correction=False, refine=0)
    refined, _, stats = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                                reconstruct=True, bias_correction=False, refine=40)
    np.testing.assert_array_equal(refined["W1"] == 0, once["W1"] == 0)
    assert stats["sparsity"] == 0.5 and stats["refine"] == 40
    again, _, _ = propose(model, cal, sparsity=0.5, scope="row", importance="activation",
                          reconstruct=True, bias_correction=False, refine=40)
    for name in refined:  # deterministic: the same run gives the same bytes
        assert again[name].tobytes() == refined[name].tobytes()
    e_once, e_refined = _layer_error(model, cal, once), _layer_error(model, cal, refined)
    assert e_refined < 0.9 * e_once, (e_refined, e_once)
    y = outputs(model, cal)  # and the model's output, through both refit layers
    assert ((outputs(model, cal, refined) - y) ** 2).sum() < \
        0.5 * ((outputs(model, cal, once) - y) ** 2).sum()
    # the masked least-squares optimum, by a direct solve per output on the damped Hessian
    x = np.concatenate([f["X"] for f in cal]).astype(np.float64)
    h, _ = damped_hessian(x.T @ x, 0.01)
    w1 = _initializers(model)["W1"].astype(np.float64)
    keep = once["W1"] != 0
    best = np.zeros_like(w1)
    for j in range(w1.shape[1]):
        s = keep[:, j]
        best[s, j] = np.linalg.solve(h[np.ix_(s, s)], (h @ w1[:, j])[s])
    got = refit_masked(sparsegpt(w1, x.T @ x, 0.5, "row"), w1, h, keep, 40)
    np.testing.assert_allclose(got, best, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(refined["W1"], best.astype(np.float32), rtol=1e-3, atol=1e-4)


def test_rows_leave_out_the_masked_calibration_positions():
    """``rows="M"``: the reconstruction's statistics come from the rows where the fed mask is
    1 only -- the same result as calibrating on those rows alone -- and the rows it leaves out
    (here from another distribution) do not pull the refit away from them."""
    model = chain_model()
    model.graph.input.append(helper.make_tensor_value_info("M", TensorProto.INT64, ["rows"]))
    cal = correlated_feeds(count=4, mean=1.0)
    other = correlated_feeds(count=4, seed=9)  # padding-like rows of another distribution
    masked, kept = [], []
    for i, (f, g) in enumerate(zip(cal, other)):
        mask = (np.arange(64) % 2 == i % 2).astype(np.int64)
        x = np.where(mask[:, None] == 1, f["X"], 10 * g["X"]).astype(np.float32)
        masked.append({"X": x, "M": mask})
        kept.append({"X": x[mask == 1]})
    options = dict(sparsity=0.5, scope="row", importance="activation", reconstruct=True,
                   residual=False)
    with_rows, _, stats = propose(model, masked, rows="M", **options)
    alone, _, _ = propose(chain_model(), kept, **options)
    every, _, _ = propose(model, masked, **options)
    assert stats["rows"] == "M" and "refused" not in stats
    for name in ("W2", "b2"):  # W1's mask is by Wanda's norms over every row
        np.testing.assert_allclose(with_rows[name], alone[name], rtol=1e-4, atol=1e-5)
    # without the option, the run's drift mask (--drift-mask) is what rows default to
    by_mask, _, stats = propose(model, masked, drift_mask="M", **options)
    assert stats["rows"] == "M" and all(np.array_equal(by_mask[n], with_rows[n])
                                        for n in with_rows)

    def error(values):
        plain = chain_model()
        return float(((outputs(plain, kept, values) - outputs(plain, kept)) ** 2).sum())
    assert error(with_rows) < error(every)
    _, _, refused = propose(model, masked, rows="absent", **options)
    assert refused["refused"] == {"rows: 'absent' is not fed or does not match the rows of a "
                                  "layer input; every row used": 2}
