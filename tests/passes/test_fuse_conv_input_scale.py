"""Tests of passes/fuse_conv_input_scale.py: a Mul or Div by a per-input-channel constant whose
every reader is a Conv/ConvTranspose data input is folded into their weights, and the outputs equal
the original's on onnxruntime (grouped and transposed weight layouts with distinct per-channel
scales); every refusal is refused and counted."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (assert_same_outputs, initializer_as_variable, initializers, make_model, ops,
                     run_once, run_passes, with_and_without)
from onnx import TensorProto, helper

from onnxopt.passes import LOSSLESS_PIPELINE

C, SPATIAL = 4, (5, 5)


def _scale(shape, rng):
    """Distinct values away from 0 with mixed signs, so a wrong channel mapping shows."""
    value = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return np.asarray(value, np.float32)


def scale_conv_model(s_shape=(1, C, 1, 1), kind="Mul", scale_left=False, convs=(("Conv", 6, 1),),
                     spatial=SPATIAL, x_shape=None, seed=0, conv_attrs=None, s_value=None,
                     extra_nodes=(), extra_outputs=()) -> onnx.ModelProto:
    """x → kind(x, s) → z → one ``op(z, W_i, B_i)`` → y_i per ``(op, M, group)`` of ``convs``."""
    rng = np.random.default_rng(seed)
    k = (3,) * len(spatial)
    inits = {"s": _scale(s_shape, rng) if s_value is None else np.asarray(s_value, np.float32)}
    nodes = [helper.make_node(kind, ["s", "x"] if scale_left else ["x", "s"], ["z"])]
    outputs = []
    attrs = conv_attrs or {"pads": [1] * 2 * len(spatial)}
    for i, (op, m, group) in enumerate(convs):
        w_shape = (m, C // group) + k if op == "Conv" else (C, m // group) + k
        inits[f"W{i}"] = rng.normal(size=w_shape).astype(np.float32)
        inits[f"B{i}"] = rng.normal(size=m).astype(np.float32)
        nodes.append(helper.make_node(op, ["z", f"W{i}", f"B{i}"], [f"y{i}"], group=group,
                                      **attrs))
        outputs.append((f"y{i}", np.float32, None))
    nodes.extend(extra_nodes)
    model = make_model(nodes, [("x", np.float32, list(x_shape or (1, C, *spatial)))],
                       [*outputs, *extra_outputs], inits, check=False)
    # outputs declared without shape: onnxruntime gives the real ones
    return model


FUSED = {
    "mul scalar": dict(s_shape=()),
    "mul [1]": dict(s_shape=(1,)),
    "mul [1,C,1,1]": dict(),
    "mul left [C,1,1]": dict(s_shape=(C, 1, 1), scale_left=True),
    "div [1,C,1,1]": dict(kind="Div"),
    "div scalar": dict(kind="Div", s_shape=()),
    "group 2, distinct per-channel scales": dict(convs=(("Conv", 6, 2),)),
    "depthwise": dict(convs=(("Conv", C, C),)),
    "depthwise multiplier 2, div": dict(convs=(("Conv", 2 * C, C),), kind="Div"),
    "conv 1d [C,1]": dict(s_shape=(C, 1), spatial=(7,)),
    "strides, dilations, asymmetric pads": dict(conv_attrs={"strides": [2, 2], "dilations": [2, 1],
                                                            "pads": [2, 0, 1, 1]}),
    "strides, SAME_UPPER": dict(conv_attrs={"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "convT g1": dict(convs=(("ConvTranspose", 6, 1),)),
    "convT g2, distinct per-channel scales": dict(convs=(("ConvTranspose", 6, 2),)),
    "convT depthwise, div": dict(convs=(("ConvTranspose", C, C),), kind="Div"),
    "three readers: Conv g1, Conv g2, ConvTranspose g2": dict(
        convs=(("Conv", 6, 1), ("Conv", 6, 2), ("ConvTranspose", 6, 2))),
}


@pytest.mark.parametrize("kwargs", FUSED.values(), ids=FUSED.keys())
def test_fused_outputs_equal(kwargs):
    model = scale_conv_model(**kwargs)
    fused, result = run_once(model, "fuse_conv_input_scale")
    convs = kwargs.get("convs", (("Conv", 6, 1),))
    assert result.stats == {"rewritten": 1, "convs": len(convs)}
    assert ops(fused) == [op for op, _, _ in convs]
    assert all(node.input[0] == "x" for node in fused.graph.node)
    assert "s" not in initializers(fused)
    assert_same_outputs(model, fused, rtol=1e-5, atol=1e-5)


def test_zero_in_scale_is_folded():
    s = np.array([1.5, 0.0, -2.0, 0.5], np.float32).reshape(1, C, 1, 1)
    model = scale_conv_model(s_value=s, convs=(("Conv", 6, 2),))
    fused, result = run_once(model, "fuse_conv_input_scale")
    assert result.stats == {"rewritten": 1, "convs": 1}
    assert_same_outputs(model, fused, rtol=1e-5, atol=1e-5)


def test_shared_weight():
    """Two readers with one weight share one scaled copy; a Conv of the unscaled input that reads
    the same weight keeps it unchanged."""
    rng = np.random.default_rng(4)
    inits = {"s": _scale((1, C, 1, 1), rng), "W": rng.normal(size=(6, C, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Mul", ["x", "s"], ["z"]),
             helper.make_node("Conv", ["z", "W"], ["y0"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["z", "W"], ["y1"], strides=[2, 2]),
             helper.make_node("Conv", ["x", "W"], ["y2"])]
    model = make_model(nodes, [("x", np.float32, [1, C, 5, 5])],
                       [(f"y{i}", np.float32, None) for i in range(3)], inits, check=False)
    fused, result = run_once(model, "fuse_conv_input_scale")
    assert result.stats == {"rewritten": 1, "convs": 2}
    w0, w1, w2 = (node.input[1] for node in fused.graph.node)
    assert w0 == w1 != w2 == "W"
    np.testing.assert_array_equal(initializers(fused)["W"], inits["W"])
    assert_same_outputs(model, fused, rtol=1e-5, atol=1e-5)


def test_gelu_half_before_pointwise_conv_in_pipeline():
    """The PP-OCRv6 pattern: GELU written as ``x · (1 + erf(x/√2)) · 0.5`` before a 1x1 Conv; the
    ``· 0.5`` folds, the other Mul (no constant) stays."""
    rng = np.random.default_rng(5)
    inits = {"r2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32),
             "half": np.array(0.5, np.float32),
             "W": rng.normal(size=(6, C, 1, 1)).astype(np.float32),
             "B": rng.normal(size=6).astype(np.float32)}
    nodes = [helper.make_node("Div", ["x", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]),
             helper.make_node("Mul", ["x", "a"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["g"]),
             helper.make_node("Conv", ["g", "W", "B"], ["y"])]
    model = make_model(nodes, [("x", np.float32, ["n", C, "h", "w"])],
                       [("y", np.float32, ["n", 6, "h", "w"])], inits)
    fused, records = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(fused) == ["Div", "Erf", "Add", "Mul", "Conv"]
    stats = [r.stats for r in records if r.name == "fuse_conv_input_scale"]
    assert stats[0] == {"rewritten": 1, "convs": 1}
    assert stats[1] == {"rewritten": 0, "convs": 0, "refused": {"scale is not an initializer": 1}}
    x = rng.normal(size=(2, C, 3, 4)).astype(np.float32)
    assert_same_outputs(model, fused, [{"x": x}], rtol=1e-5, atol=1e-5)


def test_inside_if_branch():
    rng = np.random.default_rng(6)
    consts = {"s": _scale((C, 1, 1), rng),
              "W": rng.normal(size=(6, C // 2, 3, 3)).astype(np.float32)}
    then_graph = helper.make_graph(
        [helper.make_node("Mul", ["s", "x"], ["z"]),
         helper.make_node("Conv", ["z", "W"], ["yt"], group=2)], "then", [],
        [helper.make_tensor_value_info("yt", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()])
    else_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W_out"], ["ye"], group=2)], "else", [],
        [helper.make_tensor_value_info("ye", TensorProto.FLOAT, None)])
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_graph,
                                         else_branch=else_graph)],
                       [("cond", np.bool_, []), ("x", np.float32, [1, C, 5, 5])],
                       [("y", np.float32, None)], {"W_out": consts["W"]}, check=False)
    fused, result = run_once(model, "fuse_conv_input_scale")
    assert result.stats == {"rewritten": 1, "convs": 1}
    (then_fused,) = [a.g for a in fused.graph.node[0].attribute if a.name == "then_branch"]
    assert ops(then_fused) == ["Conv"]
    x = rng.normal(size=(1, C, 5, 5)).astype(np.float32)
    assert_same_outputs(model, fused, [{"cond": np.array(True), "x": x}], rtol=1e-5, atol=1e-5)


def test_conv_in_a_branch_reads_the_outer_scaled_tensor():
    """One reader in the main graph, one in an If branch: both take the scale."""
    rng = np.random.default_rng(9)
    w = rng.normal(size=(6, C, 3, 3)).astype(np.float32)
    branch = helper.make_graph([helper.make_node("Conv", ["z", "Wb"], ["yb"])], "then", [],
                               [helper.make_tensor_value_info("yb", TensorProto.FLOAT, None)],
                               [onnx.numpy_helper.from_array(w, "Wb")])
    other = helper.make_graph([helper.make_node("Conv", ["x", "Wb_out"], ["yo"])], "else", [],
                              [helper.make_tensor_value_info("yo", TensorProto.FLOAT, None)])
    model = make_model(
        [helper.make_node("Mul", ["x", "s"], ["z"]),
         helper.make_node("Conv", ["z", "W"], ["y0"]),
         helper.make_node("If", ["cond"], ["y1"], then_branch=branch, else_branch=other)],
        [("cond", np.bool_, []), ("x", np.float32, [1, C, 5, 5])],
        [("y0", np.float32, None), ("y1", np.float32, None)],
        {"s": _scale((1, C, 1, 1), rng), "W": w, "Wb_out": w}, check=False)
    fused, result = run_once(model, "fuse_conv_input_scale")
    assert result.stats == {"rewritten": 1, "convs": 2}
    assert ops(fused) == ["Conv", "If"]
    x = rng.normal(size=(1, C, 5, 5)).astype(np.float32)
    assert_same_outputs(model, fused, [{"cond": np.array(True), "x": x}], rtol=1e-5, atol=1e-5)


def _refused(model, reason, feed=None):
    out, result = run_once(model, "fuse_conv_input_scale")
    assert not result.modified
    assert result.stats == {"rewritten": 0, "convs": 0, "refused": {reason: 1}}
    assert ops(out) == ops(model)
    assert_same_outputs(model, out, feed and [feed])


def _x(shape):
    return {"x": np.random.default_rng(7).normal(size=shape).astype(np.float32)}


REFUSED = {
    "scale on the width axis [1,1,1,W]": (dict(s_shape=(1, 1, 1, 5)),
                                         "scale is not per input channel"),
    "scale [C] broadcasts along the width": (dict(s_shape=(C,), spatial=(C, C)),
                                             "scale is not per input channel"),
    "Div with the scale on the left": (dict(kind="Div", scale_left=True),
                                       "scale is the left operand of Div"),
    "division by zero": (dict(kind="Div", s_value=np.array([1, 2, 0, 3], np.float32)
                              .reshape(1, C, 1, 1)), "division by zero"),
    "scale not finite": (dict(s_value=np.array([1, np.inf, 2, 3], np.float32).reshape(1, C, 1, 1)),
                         "scale is not finite"),
    "scale broadcasts one data channel to C": (dict(x_shape=(1, 1, 5, 5)),
                                               "Mul broadcasts the data to more channels"),
    "scale broadcasts the data to rank 4": (dict(x_shape=(C, 5, 5), s_shape=(1, C, 1, 1)),
                                            "data rank is not the Conv's"),
}


@pytest.mark.parametrize("kwargs,reason", REFUSED.values(), ids=REFUSED.keys())
def test_refused(kwargs, reason):
    model = scale_conv_model(**kwargs)
    _refused(model, reason, _x(kwargs["x_shape"]) if "x_shape" in kwargs else None)


def test_refused_data_shape_unknown():
    model = scale_conv_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    _refused(model, "data rank unknown", _x((1, C, 5, 5)))
    model = scale_conv_model(x_shape=(1, "c", 5, 5))
    _refused(model, "data channel dim unknown", _x((1, C, 5, 5)))


def test_refused_other_reader():
    relu = helper.make_node("Relu", ["z"], ["r"])
    model = scale_conv_model(extra_nodes=[relu], extra_outputs=[("r", np.float32, None)])
    _refused(model, "output read by another op")
    model = scale_conv_model(extra_outputs=[("z", np.float32, None)])
    _refused(model, "output is a graph output")


def test_refused_read_as_a_weight():
    """``z`` [1, C, 5, 5] is also the weight of a Conv with M = 1 (non-constant)."""
    conv = helper.make_node("Conv", ["x", "z"], ["v"])
    model = scale_conv_model(extra_nodes=[conv], extra_outputs=[("v", np.float32, None)])
    _refused(model, "output read as a Conv weight or bias")


def test_refused_scale_not_constant():
    _refused(initializer_as_variable(scale_conv_model(), "s"), "scale is not an initializer",
             {**_x((1, C, 5, 5)), "s": np.full((1, C, 1, 1), 2.0, np.float32)})


def test_refused_both_operands_constant():
    """Left to constant folding."""
    model = scale_conv_model()
    x = onnx.numpy_helper.from_array(_x((1, C, 5, 5))["x"], "x")
    del model.graph.input[:]
    model.graph.initializer.append(x)
    _refused(model, "both operands are initializers", {})


def test_refused_weight_not_constant():
    model = initializer_as_variable(scale_conv_model(), "W0")
    w = np.random.default_rng(8).normal(size=(6, C, 3, 3)).astype(np.float32)
    _refused(model, "weight is not an initializer", {**_x((1, C, 5, 5)), "W0": w})


def _set(model, name, value):
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(value, name))
    return model


INVALID = {
    "scale float64 before a float32 Conv": (
        lambda m: _set(m, "s", np.full((1, C, 1, 1), 2.0)), "dtypes differ"),
    "Convs disagree on C": (
        lambda m: _set(m, "W1", np.ones((6, 2 * C, 3, 3), np.float32)),
        "Convs disagree on the input channels"),
    "Conv M not divisible by group": (
        lambda m: _set(_set(m, "W1", np.ones((5, C // 2, 3, 3), np.float32)), "B1",
                       np.ones(5, np.float32)),
        "weight channels not divisible by group"),
}


@pytest.mark.parametrize("edit,reason", INVALID.values(), ids=INVALID.keys())
def test_refused_invalid_models(edit, reason):
    """Invalid models on purpose (onnxruntime refuses them): the pass must not guess."""
    model = edit(scale_conv_model(convs=(("Conv", 6, 1), ("Conv", 6, 2))))
    out, result = run_once(model, "fuse_conv_input_scale")
    assert result.stats == {"rewritten": 0, "convs": 0, "refused": {reason: 1}}
    assert ops(out) == ops(model)


@pytest.mark.zoo
def test_real_model_ppocrv6_det():
    """PP-OCRv6 det small: GELU's ``· 0.5`` before 13 pointwise Convs."""
    (_, before), (_, after) = with_and_without("PP-OCRv6_det_small", "fuse_conv_input_scale")
    assert sum(r.stats["rewritten"] for r in after.passes
               if r.name == "fuse_conv_input_scale") == 13
    assert after.after.nodes == before.after.nodes - 13
