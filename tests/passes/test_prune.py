"""Tests of passes/prune.py: which initializers are pruned, exactly which values, and that the
pruned model computes what the same model with numpy-pruned weights computes on onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import optimize
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


def with_initializers(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return out


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
