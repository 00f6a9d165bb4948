"""Tests of passes/fuse_conv_affine.py: Conv/ConvTranspose followed by Mul, Div, Add or Sub by a
per-channel constant becomes one Conv whose outputs equal the original's on onnxruntime; every
refusal is refused and counted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import assert_same_outputs, initializers, make_branch, make_model, ops, run_once
from helpers import initializer_as_input, initializer_as_variable
from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

#: The default pipeline without the fusions, to measure what this pass adds.
WITHOUT_FUSION = [p for p in LOSSLESS_PIPELINE if p not in ("fuse_conv_bn", "fuse_conv_affine")]

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
C, SPATIAL = 4, (5, 5)


def conv_affine_model(steps, op="Conv", m=6, group=1, bias=True, spatial=SPATIAL, seed=0,
                      outputs=None) -> onnx.ModelProto:
    """x → op(W[, B]) → steps → y. ``steps`` is a list of ``(op, constant shape, conv on the
    left)``; constants are named k0, k1, ..., drawn away from 0 with mixed signs."""
    rng = np.random.default_rng(seed)
    k = (3,) * len(spatial)
    w_shape = (m, C // group) + k if op == "Conv" else (C, m // group) + k
    inits = {"W": rng.normal(size=w_shape).astype(np.float32)}
    conv_inputs = ["x", "W"]
    if bias:
        inits["B"] = rng.normal(size=m).astype(np.float32)
        conv_inputs.append("B")
    nodes = [helper.make_node(op, conv_inputs, ["t0"], group=group, pads=[1] * 2 * len(spatial))]
    for i, (kind, shape, conv_left) in enumerate(steps):
        value = rng.uniform(0.5, 2.0, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        inits[f"k{i}"] = np.asarray(value, np.float32)
        operands = [f"t{i}", f"k{i}"] if conv_left else [f"k{i}", f"t{i}"]
        out = "y" if i == len(steps) - 1 else f"t{i + 1}"
        nodes.append(helper.make_node(kind, operands, [out]))
    outputs = outputs or [("y", np.float32, [1, m, *spatial])]
    return make_model(nodes, [("x", np.float32, [1, C, *spatial])], outputs, inits)


M = 6
CASES = {
    "mul [M,1,1]": dict(steps=[("Mul", (M, 1, 1), True)]),
    "mul left [1,M,1,1]": dict(steps=[("Mul", (1, M, 1, 1), False)]),
    "mul scalar rank0": dict(steps=[("Mul", (), True)]),
    "mul [1]": dict(steps=[("Mul", (1,), False)]),
    "add [1,M,1,1]": dict(steps=[("Add", (1, M, 1, 1), True)]),
    "add left scalar, no bias": dict(steps=[("Add", (), False)], bias=False),
    "sub [M,1,1]": dict(steps=[("Sub", (M, 1, 1), True)]),
    "div [1,M,1,1]": dict(steps=[("Div", (1, M, 1, 1), True)]),
    "div scalar no bias": dict(steps=[("Div", (1, 1, 1, 1), True)], bias=False),
    "mul then add (learnable affine block)": dict(steps=[("Mul", (1,), False),
                                                         ("Add", (1,), True)]),
    "group 2 mul add": dict(steps=[("Mul", (M, 1, 1), True), ("Add", (M, 1, 1), True)], group=2),
    "depthwise div sub": dict(steps=[("Div", (C, 1, 1), True), ("Sub", (1, C, 1, 1), True)],
                              m=C, group=C),
    "conv 1d mul [M,1]": dict(steps=[("Mul", (M, 1), True)], spatial=(7,)),
    "convT g1 mul add": dict(steps=[("Mul", (1, M, 1, 1), True), ("Add", (M, 1, 1), False)],
                             op="ConvTranspose"),
    "convT g2 mul": dict(steps=[("Mul", (1, M, 1, 1), False)], op="ConvTranspose", group=2),
    "convT g2 div no bias": dict(steps=[("Div", (M, 1, 1), True)], op="ConvTranspose", group=2,
                                 bias=False),
    "convT depthwise mul sub": dict(steps=[("Mul", (C, 1, 1), True), ("Sub", (C, 1, 1), True)],
                                    op="ConvTranspose", m=C, group=C),
}


@pytest.mark.parametrize("kwargs", CASES.values(), ids=CASES.keys())
def test_fused_outputs_equal(kwargs):
    model = conv_affine_model(**kwargs)
    fused, result = run_once(model, "fuse_conv_affine")
    steps = kwargs["steps"]
    assert result.modified and result.stats["rewritten"] == len(steps)
    assert result.stats["by_kind"] == dict(Counter(kind for kind, _, _ in steps))
    assert ops(fused) == [kwargs.get("op", "Conv")]
    node = fused.graph.node[0]
    assert node.output == ["y"] and len(node.input) == 3
    assert set(initializers(fused)) == {node.input[1], node.input[2]}
    assert_same_outputs(model, fused, rtol=1e-5, atol=1e-5)


def test_shared_weight_and_bias_are_not_edited():
    model = conv_affine_model([("Mul", (M, 1, 1), True)])
    model.graph.node.append(helper.make_node("Conv", ["x", "W", "B"], ["z"], pads=[1, 1, 1, 1]))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, M, 5, 5]))
    before = initializers(model)
    fused, result = run_once(model, "fuse_conv_affine")
    assert result.stats["rewritten"] == 1 and ops(fused) == ["Conv", "Conv"]
    after = initializers(fused)
    for name in ("W", "B"):
        np.testing.assert_array_equal(after[name], before[name])
    assert_same_outputs(model, fused, rtol=1e-5, atol=1e-5)


def test_inside_if_branch():
    inner = conv_affine_model([("Mul", (M, 1, 1), True), ("Add", (), True)])
    shape = [1, M, 5, 5]
    then_graph = helper.make_graph(list(inner.graph.node), "then", [],
                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                                   list(inner.graph.initializer))
    else_graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["e0"], axis=1),
         helper.make_node("Slice", ["e0", "starts", "ends", "axes"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, shape)])
    model = make_model([helper.make_node("If", ["cond"], ["out"], then_branch=then_graph,
                                         else_branch=else_graph)],
                       [("cond", np.bool_, []), ("x", np.float32, [1, C, 5, 5])],
                       [("out", np.float32, shape)],
                       {"starts": np.array([0]), "ends": np.array([M]), "axes": np.array([1])})
    fused, result = run_once(model, "fuse_conv_affine")
    assert result.stats["rewritten"] == 2
    (then_fused,) = [a.g for a in fused.graph.node[0].attribute if a.name == "then_branch"]
    assert ops(then_fused) == ["Conv"]
    x = np.random.default_rng(0).normal(size=(1, C, 5, 5)).astype(np.float32)
    assert_same_outputs(model, fused, [{"cond": np.array(True), "x": x}], rtol=1e-5, atol=1e-5)


def _refused(model, reason):
    out, result = run_once(model, "fuse_conv_affine")
    assert not result.modified
    assert result.stats["rewritten"] == 0 and result.stats["refused"] == {reason: 1}
    assert len(out.graph.node) == len(model.graph.node)


REFUSALS = {
    "constant [M] aligns with the last axis": ([("Mul", (M,), True)], "constant is not per-channel"),
    "constant [M,1] aligns with height": ([("Add", (M, 1), True)], "constant is not per-channel"),
    "spatial constant": ([("Mul", (1, 1, M, M), True)], "constant is not per-channel"),
    "constant adds a dimension": ([("Add", (1, 1, M, 1, 1), True)], "constant is not per-channel"),
    "batch dim of constant": ([("Mul", (2, M, 1, 1), True)], "constant is not per-channel"),
    "constant on the left of Sub": ([("Sub", (M, 1, 1), False)],
                                    "constant is the left operand of Sub"),
    "constant on the left of Div": ([("Div", (M, 1, 1), False)],
                                    "constant is the left operand of Div"),
}


@pytest.mark.parametrize("steps,reason", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_shapes_and_sides(steps, reason):
    # a square M x M image, so that constants misaligned with the channel axis still broadcast
    y_shape = np.broadcast_shapes((1, M, M, M), steps[0][1])
    _refused(conv_affine_model(steps, spatial=(M, M), outputs=[("y", np.float32, list(y_shape))]),
             reason)


def _set_constant(model, name, value):
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))
    return model


def test_refused_division_by_zero_and_non_finite():
    zero = np.ones((M, 1, 1)); zero[2] = 0.0
    _refused(_set_constant(conv_affine_model([("Div", (M, 1, 1), True)]), "k0", zero),
             "division by zero")
    inf = np.ones((M, 1, 1)); inf[3] = np.inf
    _refused(_set_constant(conv_affine_model([("Mul", (M, 1, 1), True)]), "k0", inf),
             "constant is not finite")


@pytest.mark.parametrize("name,what", [("W", "weight"), ("B", "conv bias"), ("k0", "constant")])
def test_refused_non_constant(name, what):
    steps = [("Mul", (M, 1, 1), True)]
    _refused(initializer_as_variable(conv_affine_model(steps), name), f"{what} is not an initializer")
    _refused(initializer_as_input(conv_affine_model(steps), name), f"{what} is not an initializer")


def test_refused_other_consumer_and_graph_output():
    model = conv_affine_model([("Add", (M, 1, 1), True)])
    model.graph.node.append(helper.make_node("Relu", ["t0"], ["r"]))
    model.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, M, 5, 5]))
    _refused(model, "conv output has other consumers")
    model = conv_affine_model([("Add", (M, 1, 1), True)])
    model.graph.output.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, M, 5, 5]))
    _refused(model, "conv output is a graph output")


@pytest.mark.parametrize("else_reads,reason", [("z", "Mul in another scope"),
                                                 ("c", "conv output has other consumers")])
def test_refused_op_in_another_scope(else_reads, reason):
    """A Mul in an If branch reading the outer Conv's output stays: the Conv would have to write
    a tensor of the branch."""
    then_graph = make_branch([helper.make_node("Mul", ["c", "k"], ["ty"])],
                             [("ty", np.float32, [1, M, 5, 5])],
                             {"k": np.full((M, 1, 1), 2.0, np.float32)})
    else_graph = make_branch([helper.make_node("Neg", [else_reads], ["ey"])],
                             [("ey", np.float32, [1, M, 5, 5])])
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["c"]),
                        helper.make_node("If", ["cond"], ["y"], then_branch=then_graph,
                                         else_branch=else_graph)],
                       [("x", np.float32, [1, C, 5, 5]), ("cond", np.bool_, [])],
                       [("y", np.float32, [1, M, 5, 5])],
                       {"W": rng.normal(size=(M, C, 1, 1)).astype(np.float32),
                        "z": rng.normal(size=(1, M, 5, 5)).astype(np.float32)})
    _refused(model, reason)


def test_refused_dtypes_differ():
    """An invalid model on purpose (Mul of float32 by float64): the pass must not guess."""
    model = conv_affine_model([("Mul", (M, 1, 1), True)])
    init = next(i for i in model.graph.initializer if i.name == "k0")
    init.CopyFrom(onnx.numpy_helper.from_array(np.ones((M, 1, 1)), "k0"))
    _refused(model, "dtypes differ")


@pytest.mark.zoo
def test_real_model_det():
    """PP-OCRv4 det: 28 learnable affine blocks (Mul then Add by scalars) after Conv, 2 Adds after
    ConvTranspose; with fuse_conv_bn the BN behind the ConvTranspose + Add then fuses too."""
    name = "ch_PP-OCRv4_det_infer"
    onnx_file, npz = ZOO / f"{name}.onnx", ZOO / f"{name}.inputs.npz"
    if not onnx_file.is_file() or not npz.is_file():
        pytest.skip(f"{onnx_file} not fetched (tools/fetch_models.py)")
    _, before = optimize(str(onnx_file), passes=WITHOUT_FUSION, inputs=str(npz))
    _, after = optimize(str(onnx_file), passes=WITHOUT_FUSION + ["fuse_conv_affine"],
                        inputs=str(npz))
    assert after.validation.passed
    assert sum(r.stats["rewritten"] for r in after.passes if r.name == "fuse_conv_affine") == 58
    assert after.after.nodes == before.after.nodes - 58
    _, both = optimize(str(onnx_file),
                       passes=WITHOUT_FUSION + ["fuse_conv_affine", "fuse_conv_bn"],
                       inputs=str(npz))
    assert both.validation.passed and both.after.nodes == before.after.nodes - 61
    assert "BatchNormalization" not in both.after.op_counts
