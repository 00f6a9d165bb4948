"""Tests of passes/fuse_pad.py: a zero constant Pad of the spatial axes followed by Conv or
AveragePool folds into the consumer's pads, and the model computes what the original computes
on onnxruntime; reflect/edge modes, non-zero values, negative pads, batch/channel pads, MaxPool and
the other refusals are refused and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_same_outputs, make_branch, make_model, ops, run_once
from onnx import TensorProto, helper

C, M = 3, 4


def pad_model(consumer="Conv", spatial=(6, 6), pads=None, consumer_attrs=None, opset=17,
              mode=None, value=None, axes=None, pad_as_attr=False, extra_nodes=(),
              extra_outputs=()):
    """x [1, C, *spatial] → Pad → t → consumer → y. ``pads`` over all axes,
    [begin..., end...] (default 1 before and 2 after each spatial axis); ``value`` None leaves
    the input out."""
    rank = 2 + len(spatial)
    if pads is None:
        pads = [0, 0] + [1] * len(spatial) + [0, 0] + [2] * len(spatial)
    rng = np.random.default_rng(0)
    inits, pad_attrs = {}, {}
    if mode is not None:
        pad_attrs["mode"] = mode
    if pad_as_attr:
        pad_attrs["pads"] = pads
        if value is not None:
            pad_attrs["value"] = float(value)
        pad_inputs = ["x"]
    else:
        inits["pads"] = np.array(pads, np.int64)
        pad_inputs = ["x", "pads"]
        if value is not None or axes is not None:
            if value is not None:
                inits["value"] = np.array(value, np.float32)
            pad_inputs.append("value" if value is not None else "")
        if axes is not None:
            inits["axes"] = np.array(axes, np.int64)
            pad_inputs.append("axes")
    attrs = dict(consumer_attrs or {})
    if consumer == "Conv":
        inits["W"] = rng.normal(size=(M, C) + (3,) * len(spatial)).astype(np.float32)
        inits["B"] = rng.normal(size=M).astype(np.float32)
        consumer_inputs = ["t", "W", "B"]
    else:
        attrs.setdefault("kernel_shape", [3] * len(spatial))
        consumer_inputs = ["t"]
    nodes = [helper.make_node("Pad", pad_inputs, ["t"], **pad_attrs),
             helper.make_node(consumer, consumer_inputs, ["y"], **attrs), *extra_nodes]
    outputs = [("y", np.float32, [None] * rank), *extra_outputs]
    return make_model(nodes, [("x", np.float32, [1, C, *spatial])], outputs, inits, opset=opset,
                      check=False)


def _fused(model, pads, count_include_pad=None):
    out, result = run_once(model, "fuse_pad")
    assert result.modified and result.stats["rewritten"] == 1 and "refused" not in result.stats
    assert ops(out) == [n.op_type for n in model.graph.node if n.op_type != "Pad"]
    node = out.graph.node[0]
    assert node.input[0] == "x" and node.output[0] == "y"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["pads"] == pads
    if count_include_pad is not None:
        assert attrs["count_include_pad"] == count_include_pad
    # positive inputs: a wrong divisor or padding value cannot hide behind cancellation
    x = np.random.default_rng(3).uniform(1.0, 2.0, size=(1, C, *model_x_spatial(model)))
    assert_same_outputs(model, out, [{"x": x.astype(np.float32)}], rtol=1e-5, atol=1e-5)
    return out, result


def model_x_spatial(model):
    return [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:]]


FUSED = {
    "conv 2-D": (dict(), [1, 1, 2, 2]),
    "conv 2-D with its own pads": (dict(consumer_attrs={"pads": [1, 0, 0, 1]}), [2, 1, 2, 3]),
    "conv 2-D strided dilated": (dict(consumer_attrs={"strides": [2, 1], "dilations": [1, 2]}),
                                 [1, 1, 2, 2]),
    "conv 1-D": (dict(spatial=(7,), pads=[0, 0, 2, 0, 0, 1]), [2, 1]),
    "conv 3-D": (dict(spatial=(4, 5, 4), pads=[0, 0, 1, 0, 1, 0, 0, 0, 1, 1]),
                 [1, 0, 1, 0, 1, 1]),
    "conv explicit zero value": (dict(value=0.0), [1, 1, 2, 2]),
    "conv explicit constant mode": (dict(mode="constant"), [1, 1, 2, 2]),
    "conv auto_pad NOTSET": (dict(consumer_attrs={"auto_pad": "NOTSET"}), [1, 1, 2, 2]),
    "conv opset 10 pads attribute": (dict(opset=10, pad_as_attr=True), [1, 1, 2, 2]),
    "conv opset 18 axes [2, 3]": (dict(opset=18, pads=[1, 2, 0, 1], axes=[2, 3]), [1, 2, 0, 1]),
    "conv opset 18 axes [-1]": (dict(opset=18, pads=[2, 1], axes=[-1]), [0, 2, 0, 1]),
    "conv opset 18 axes, explicit value": (dict(opset=18, pads=[1, 1], axes=[2], value=0.0),
                                           [1, 0, 1, 0]),
}


@pytest.mark.parametrize("kwargs,pads", FUSED.values(), ids=FUSED.keys())
def test_conv_fused(kwargs, pads):
    _, result = _fused(pad_model(**kwargs), pads)
    assert result.stats["by_kind"] == {"Conv": 1}


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_average_pool_fused_counts_the_pads(count_include_pad):
    """Pad + AveragePool(count_include_pad=c) = AveragePool(pads, count_include_pad=1), c = 0, 1."""
    model = pad_model("AveragePool", pads=[0, 0, 1, 2, 0, 0, 2, 1],
                      consumer_attrs={"count_include_pad": count_include_pad, "strides": [2, 2]})
    _, result = _fused(model, [1, 2, 2, 1], count_include_pad=1)
    assert result.stats["by_kind"] == {"AveragePool": 1}


def test_average_pool_with_counted_own_pads():
    model = pad_model("AveragePool", pads=[0, 0, 1, 0, 0, 0, 1, 0],
                      consumer_attrs={"count_include_pad": 1, "pads": [1, 1, 0, 1]})
    _fused(model, [2, 1, 1, 1], count_include_pad=1)


def test_average_pool_1d():
    model = pad_model("AveragePool", spatial=(8,), pads=[0, 0, 1, 0, 0, 2])
    _fused(model, [1, 2], count_include_pad=1)


def _refused(model, reason):
    out, result = run_once(model, "fuse_pad")
    assert not result.modified
    assert result.stats == {"rewritten": 0, "refused": {reason: 1}}
    assert ops(out) == ops(model)
    x = np.random.default_rng(3).uniform(1.0, 2.0, size=(1, C, *model_x_spatial(model)))
    assert_same_outputs(model, out, [{"x": x.astype(np.float32)}])


REFUSALS = {
    "reflect mode": (dict(mode="reflect"), "Pad mode is reflect"),
    "edge mode": (dict(mode="edge"), "Pad mode is edge"),
    "non-zero value": (dict(value=1.5), "pad value is not 0"),
    "non-zero value attribute (opset 10)": (dict(opset=10, pad_as_attr=True, value=-1.0),
                                            "pad value is not 0"),
    "negative pads": (dict(pads=[0, 0, 1, -1, 0, 0, 1, 1]), "negative pads (cropping)"),
    "batch-axis pad": (dict(pads=[1, 0, 1, 1, 0, 0, 1, 1]), "Pad pads the batch or channel axis"),
    "channel-axis pad": (dict(pads=[0, 0, 0, 0, 0, 1, 0, 0], consumer="AveragePool"),
                         "Pad pads the batch or channel axis"),
    "channel axis through axes": (dict(opset=19, pads=[1, 0], axes=[1], consumer="AveragePool"),
                                  "Pad pads the batch or channel axis"),
    "MaxPool": (dict(consumer="MaxPool"), "MaxPool pads with -inf, not 0"),
    "conv auto_pad SAME_UPPER": (dict(consumer_attrs={"auto_pad": "SAME_UPPER"}),
                                 "Conv auto_pad is SAME_UPPER"),
    "AveragePool uncounted own pads": (
        dict(consumer="AveragePool", consumer_attrs={"pads": [1, 1, 1, 1]}),
        "AveragePool has its own uncounted pads (count_include_pad=0)"),
    "AveragePool ceil_mode": (dict(consumer="AveragePool",
                                   consumer_attrs={"ceil_mode": 1, "strides": [2, 2]}),
                              "AveragePool ceil_mode=1"),
    "AveragePool pads reach the kernel": (
        dict(consumer="AveragePool", pads=[0, 0, 3, 0, 0, 0, 0, 0]),
        "pooling pads would reach the kernel size"),
}


@pytest.mark.parametrize("kwargs,reason", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused(kwargs, reason):
    _refused(pad_model(**kwargs), reason)


def test_refused_pads_not_constant():
    model = pad_model()
    model.graph.input.append(helper.make_tensor_value_info("pads", TensorProto.INT64, [8]))
    _refused(model, "pads is not an initializer")


def test_refused_pad_output_read_elsewhere():
    model = pad_model(extra_outputs=[("t", np.float32, [1, C, 9, 9])])
    _refused(model, "Pad output is a graph output")
    model = pad_model(extra_nodes=[helper.make_node("Relu", ["t"], ["r"])],
                      extra_outputs=[("r", np.float32, [1, C, 9, 9])])
    _refused(model, "Pad output has other consumers")


def test_refused_pad_output_is_the_weight():
    """A Pad producing the Conv weight, not X, is not padding of the convolution."""
    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Pad", ["w", "pads"], ["wp"]),
         helper.make_node("Conv", ["x", "wp"], ["y"])],
        [("x", np.float32, [1, C, 6, 6])], [("y", np.float32, [1, M, 4, 4])],
        {"w": rng.normal(size=(M, C, 2, 2)).astype(np.float32),
         "pads": np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64)})
    _refused(model, "Pad output is not the Conv input X")


def test_inside_if_branch():
    inner = pad_model(pads=[0, 0, 1, 1, 0, 0, 1, 1])
    shape = [1, M, 6, 6]
    then_graph = make_branch(list(inner.graph.node), [("y", np.float32, shape)],
                             list(inner.graph.initializer), name="then")
    else_graph = make_branch([helper.make_node("Conv", ["x", "W2"], ["e"], pads=[1, 1, 1, 1])],
                             [("e", np.float32, shape)], name="else")
    model = make_model([helper.make_node("If", ["cond"], ["out"], then_branch=then_graph,
                                         else_branch=else_graph)],
                       [("cond", np.bool_, []), ("x", np.float32, [1, C, 6, 6])],
                       [("out", np.float32, shape)],
                       {"W2": np.ones((M, C, 3, 3), np.float32)})
    out, result = run_once(model, "fuse_pad")
    assert result.stats["rewritten"] == 1
    (then_fused,) = [a.g for a in out.graph.node[0].attribute if a.name == "then_branch"]
    assert ops(then_fused) == ["Conv"]
    x = np.random.default_rng(0).normal(size=(1, C, 6, 6)).astype(np.float32)
    assert_same_outputs(model, out, [{"cond": np.array(c), "x": x} for c in (True, False)],
                        rtol=1e-5, atol=1e-5)


def test_stats_are_json_serializable():
    _, result = run_once(pad_model(mode="reflect"), "fuse_pad")
    assert json.loads(json.dumps(result.stats)) == result.stats
