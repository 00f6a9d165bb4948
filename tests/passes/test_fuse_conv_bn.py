"""Tests of passes/fuse_conv_bn.py: Conv/ConvTranspose + BatchNormalization becomes one Conv whose
outputs equal the original model's on onnxruntime; every refusal is refused and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import (assert_same_outputs, initializers, make_model, ops, random_feed, run_once,
                     run_ort, run_passes)
from helpers import initializer_as_input, initializer_as_variable
from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

#: The default pipeline without the fusions, to measure what this pass adds.
WITHOUT_FUSION = [p for p in LOSSLESS_PIPELINE if p not in ("fuse_conv_bn", "fuse_conv_affine")]

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"


def _bn_params(m: int, rng, dtype=np.float32) -> dict[str, np.ndarray]:
    # variances near epsilon so that the epsilon used shows in the result; γ spread per channel so
    # that a wrong channel mapping shows
    return {"gamma": rng.uniform(-3, 3, m).astype(dtype), "beta": rng.normal(size=m).astype(dtype),
            "mean": rng.normal(size=m).astype(dtype),
            "var": rng.uniform(1e-4, 2e-3, m).astype(dtype)}


def _assert_close(original, fused, feed=None):
    """Outputs equal on onnxruntime up to float32 rounding of the folded products: the absolute
    tolerance follows the output's magnitude (γ/√(σ²+ε) reaches ~100 here)."""
    feeds = [feed] if feed else [random_feed(original, seed) for seed in (0, 1)]
    for f in feeds:
        scale = max(float(np.abs(v).max()) for v in run_ort(original, f).values())
        assert_same_outputs(original, fused, [f], rtol=1e-5, atol=2e-6 * scale)


def conv_bn_model(op="Conv", c=4, m=6, group=1, bias=True, epsilon=None, dtype=np.float32,
                  spatial=(5, 5), seed=0, opset=17) -> onnx.ModelProto:
    """x[1, c, *spatial] → op(W, B) → BatchNormalization → y (a graph output)."""
    rng = np.random.default_rng(seed)
    k = (3,) * len(spatial)
    w_shape = (m, c // group) + k if op == "Conv" else (c, m // group) + k
    inits = {"W": rng.normal(size=w_shape).astype(dtype), **_bn_params(m, rng, dtype)}
    conv_inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.normal(size=m).astype(dtype)
        conv_inputs.append("B")
    bn_attrs = {} if epsilon is None else {"epsilon": epsilon}
    nodes = [helper.make_node(op, conv_inputs, ["c"], group=group, pads=[1] * 2 * len(spatial)),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"],
                              **bn_attrs)]
    return make_model(nodes, [("x", dtype, [1, c, *spatial])], [("y", dtype, [1, m, *spatial])],
                      inits, opset=opset)


CASES = {
    "conv g1 eps1e-3": dict(group=1, epsilon=1e-3),
    "conv g2 eps1e-3": dict(group=2, epsilon=1e-3),
    "conv g1 default eps": dict(group=1),
    "conv g2 no bias": dict(group=2, bias=False),
    "conv depthwise": dict(c=4, m=4, group=4, epsilon=1e-3),
    "conv depthwise multiplier 2": dict(c=4, m=8, group=4),
    "conv 1d": dict(spatial=(7,), epsilon=1e-3),
    "convT g1": dict(op="ConvTranspose", group=1, epsilon=1e-3),
    "convT g2": dict(op="ConvTranspose", group=2, epsilon=1e-3),
    "convT g2 no bias": dict(op="ConvTranspose", group=2, bias=False),
    "convT depthwise": dict(op="ConvTranspose", c=4, m=4, group=4),
    "convT grouped multiplier 3": dict(op="ConvTranspose", c=4, m=6, group=2, epsilon=1e-3),
}


@pytest.mark.parametrize("kwargs", CASES.values(), ids=CASES.keys())
def test_fused_outputs_equal(kwargs):
    model = conv_bn_model(**kwargs)
    fused, result = run_once(model, "fuse_conv_bn")
    assert result.modified and result.stats == {"rewritten": 1}
    assert ops(fused) == [kwargs.get("op", "Conv")]
    node = fused.graph.node[0]
    assert node.output == ["y"] and len(node.input) == 3
    inits = initializers(fused)
    assert set(inits) == {node.input[1], node.input[2]}  # W and B folded, BN statistics gone
    assert all(v.dtype == kwargs.get("dtype", np.float32) for v in inits.values())
    _assert_close(model, fused)


def test_regression_epsilon_is_the_bn_attribute():
    """Conv (group 1 and 2) + BN with epsilon 1e-3 → one Conv with folded initializers; the
    default epsilon would give visibly different values since the variances are ~1e-3."""
    for group in (1, 2):
        model = conv_bn_model(group=group, epsilon=1e-3)
        fused, _ = run_once(model, "fuse_conv_bn")
        assert ops(fused) == ["Conv"]
        _assert_close(model, fused)
        wrong = conv_bn_model(group=group, epsilon=1e-5)
        with pytest.raises(AssertionError):
            _assert_close(wrong, fused)


def test_shared_weight_gets_a_new_initializer():
    rng = np.random.default_rng(1)
    inits = {"W": rng.normal(size=(4, 4, 3, 3)).astype(np.float32), **_bn_params(4, rng)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"]),
             helper.make_node("Conv", ["x", "W"], ["z"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", np.float32, [1, 4, 5, 5])],
                       [("y", np.float32, [1, 4, 5, 5]), ("z", np.float32, [1, 4, 5, 5])], inits)
    fused, result = run_once(model, "fuse_conv_bn")
    assert result.stats == {"rewritten": 1} and ops(fused) == ["Conv", "Conv"]
    np.testing.assert_array_equal(initializers(fused)["W"], inits["W"])
    _assert_close(model, fused)


def test_bn_output_feeding_a_node_and_the_pipeline():
    model = conv_bn_model(group=2, epsilon=1e-3)
    model.graph.node.append(helper.make_node("Relu", ["y"], ["r"]))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 6, 5, 5]))
    fused, records = run_passes(model, WITHOUT_FUSION + ["fuse_conv_bn"])
    assert ops(fused) == ["Conv", "Relu"]
    _assert_close(model, fused)


def test_inside_if_branch():
    inner = conv_bn_model(m=4, group=2, epsilon=1e-3)
    shape = [1, 4, 5, 5]
    then_graph = helper.make_graph(list(inner.graph.node), "then", [],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                                   list(inner.graph.initializer))
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)])
    model = make_model([helper.make_node("If", ["cond"], ["out"], then_branch=then_graph,
                                         else_branch=else_graph)],
                       [("cond", np.bool_, []), ("x", np.float32, [1, 4, 5, 5])],
                       [("out", np.float32, shape)])
    fused, result = run_once(model, "fuse_conv_bn")
    assert result.stats == {"rewritten": 1}
    (then_fused,) = [a.g for a in fused.graph.node[0].attribute if a.name == "then_branch"]
    assert ops(then_fused) == ["Conv"]
    x = np.random.default_rng(0).normal(size=(1, 4, 5, 5)).astype(np.float32)
    _assert_close(model, fused, {"cond": np.array(True), "x": x})


def _refused(model, reason):
    out, result = run_once(model, "fuse_conv_bn")
    assert not result.modified
    assert result.stats == {"rewritten": 0, "refused": {reason: 1}}
    assert "BatchNormalization" in ops(out)


def test_refused_other_consumer():
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"]))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 6, 5, 5]))
    _refused(model, "conv output has other consumers")


def test_refused_conv_output_is_graph_output():
    model = conv_bn_model()
    model.graph.output.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 6, 5, 5]))
    _refused(model, "conv output is a graph output")


@pytest.mark.parametrize("name,what", [("W", "weight"), ("B", "conv bias"), ("gamma", "scale"),
                                       ("beta", "bias"), ("mean", "mean"), ("var", "variance")])
def test_refused_non_constant(name, what):
    _refused(initializer_as_variable(conv_bn_model(), name), f"{what} is not an initializer")
    _refused(initializer_as_input(conv_bn_model(), name), f"{what} is not an initializer")


def test_refused_training_mode():
    model = conv_bn_model(opset=15)
    bn = model.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    _refused(model, "batchnorm in training mode")


def test_refused_used_running_statistics():
    model = conv_bn_model(opset=9)
    bn = model.graph.node[1]
    bn.output.extend(["running_mean"])
    model.graph.output.append(helper.make_tensor_value_info("running_mean", TensorProto.FLOAT,
                                                            [6]))
    _refused(model, "batchnorm in training mode")


def test_unused_extra_outputs_are_fine():
    model = conv_bn_model(opset=9)
    model.graph.node[1].output.extend(["running_mean", "running_var"])
    fused, result = run_once(model, "fuse_conv_bn")
    assert result.stats == {"rewritten": 1} and ops(fused) == ["Conv"]


def test_refused_dtypes_differ():
    model = conv_bn_model(dtype=np.float16, opset=15)
    for init in model.graph.initializer:
        if init.name in ("mean", "var"):
            init.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float32), init.name))
    _refused(model, "dtypes differ")


@pytest.mark.zoo
@pytest.mark.parametrize("name,bn_count", [("ch_ppocr_mobile_v2.0_cls_infer", 35),
                                           ("ch_PP-OCRv4_rec_infer", 6)])
def test_real_models(name, bn_count):
    onnx_file, npz = ZOO / f"{name}.onnx", ZOO / f"{name}.inputs.npz"
    if not onnx_file.is_file() or not npz.is_file():
        pytest.skip(f"{onnx_file} not fetched (tools/fetch_models.py)")
    _, before = optimize(str(onnx_file), passes=WITHOUT_FUSION, inputs=str(npz))
    _, after = optimize(str(onnx_file), passes=WITHOUT_FUSION + ["fuse_conv_bn"],
                        inputs=str(npz))
    assert after.validation.passed
    assert "BatchNormalization" not in after.after.op_counts
    assert after.after.nodes == before.after.nodes - bn_count
    assert sum(r.stats["rewritten"] for r in after.passes if r.name == "fuse_conv_bn") == bn_count
