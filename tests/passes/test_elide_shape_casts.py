"""elide_shape_casts: the int32 detour of shape computations goes, outputs stay identical."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxopt
from onnxopt.passes import LOSSLESS_PIPELINE
from tools import zoo


def _model(extra_consumer: str | None = None) -> onnx.ModelProto:
    """x[N, 6] -> Reshape(x, Cast64(Concat(Slice(Cast32(Shape(x))), [2, 3]))) -> y[N, 2, 3]."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["s32", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "dims"], ["target32"], axis=0),
        helper.make_node("Cast", ["target32"], ["target"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_consumer == "Add":
        nodes.append(helper.make_node("Add", ["target32", "target32"], ["doubled"]))
        outputs.append(helper.make_tensor_value_info("doubled", TensorProto.INT32, None))
    elif extra_consumer == "output":
        outputs.append(helper.make_tensor_value_info("target32", TensorProto.INT32, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])], outputs,
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("dims", TensorProto.INT32, [2], [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_round_trip_removed_and_outputs_equal():
    model = _model()
    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    optimized, report = onnxopt.optimize(model, passes=["elide_shape_casts"], inputs={"x": x})
    assert report.validation.passed
    ops = [n.op_type for n in optimized.graph.node]
    assert "Cast" not in ops
    assert report.passes[0].stats == {"rewritten": 1}
    concat_consts = [i for i in optimized.graph.initializer if i.data_type == TensorProto.INT32]
    assert not concat_consts
    for a, b in zip(_run(model, x), _run(optimized, x)):
        np.testing.assert_array_equal(a, b)
    x2 = np.ones((7, 6), np.float32)  # another batch size: the shape is still computed
    np.testing.assert_array_equal(_run(model, x2)[0], _run(optimized, x2)[0])


@pytest.mark.parametrize("consumer, reason", [("Add", "int32 tensor read by Add"),
                                              ("output", "int32 tensor is a graph output")])
def test_refused_when_int32_values_escape(consumer, reason):
    model = _model(consumer)
    x = np.ones((2, 6), np.float32)
    optimized, report = onnxopt.optimize(model, passes=["elide_shape_casts"], inputs={"x": x})
    assert report.validation.passed
    assert not report.passes[0].modified
    assert [n.op_type for n in optimized.graph.node].count("Cast") == 2
    assert report.passes[0].stats["refused"] == {reason: 1}


def test_real_model_magika():
    entry = zoo.find_entry("magika")
    path = zoo.model_path(zoo.DEFAULT_DEST, "magika")
    if not path.exists():
        pytest.skip("magika not fetched (tools/fetch_models.py)")
    without = [p for p in LOSSLESS_PIPELINE if p != "elide_shape_casts"]
    npz = str(zoo.inputs_path(zoo.DEFAULT_DEST, entry["name"]))
    _, before = onnxopt.optimize(str(path), passes=without, inputs=npz)
    _, after = onnxopt.optimize(str(path), passes=without + ["elide_shape_casts"], inputs=npz)
    assert after.validation.passed
    assert after.after.op_counts.get("Cast", 0) <= before.after.op_counts.get("Cast", 0) - 4
    assert after.after.nodes <= before.after.nodes - 4
