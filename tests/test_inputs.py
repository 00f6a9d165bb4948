"""Tests of optimizer/inputs.py: --input-shape parsing, feed synthesis and .npz feed loading."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import make_model, run_ort
from optimizer.errors import InputError, UsageError
from optimizer.inputs import DEFAULT_DIM, load_feeds, parse_input_shapes, synthesize_feed


@pytest.mark.parametrize("specs, expected", [
    (None, {}),
    ([], {}),
    (["x:1x3x224x224"], {"x": [1, 3, 224, 224]}),
    (["x:5", "scalar:"], {"x": [5], "scalar": []}),
    (["ns:input:0:2x0"], {"ns:input:0": [2, 0]}),
    (["x:1", "x:2"], {"x": [2]}),
])
def test_parse_input_shapes(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("spec", ["x", ":1x2", "x:1x", "x:x1", "x:1xx2", "x:-1", "x:1,2", "x:a",
                                  "x:1.5", "x: 1"])
def test_parse_input_shapes_errors(spec):
    with pytest.raises(UsageError, match="--input-shape"):
        parse_input_shapes([spec])


def _identity_model(inputs) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _, _ in inputs]
    outputs = [(f"{name}_out", dtype, shape) for name, dtype, shape in inputs]
    return make_model(nodes, inputs, outputs)


def test_synthesize_feed_dtypes_shapes_and_dynamic_dims():
    model = _identity_model([("f", np.float32, ["batch", 3]), ("h", np.float16, [2]),
                             ("d", np.float64, []), ("i", np.int64, [4, "n"]),
                             ("u", np.uint8, [5]), ("b", np.bool_, [6]), ("i32", np.int32, [3])])
    feed = synthesize_feed(model, seed=3)
    assert list(feed) == ["f", "h", "d", "i", "u", "b", "i32"]
    expected = {"f": (np.float32, (DEFAULT_DIM, 3)), "h": (np.float16, (2,)), "d": (np.float64, ()),
                "i": (np.int64, (4, DEFAULT_DIM)), "u": (np.uint8, (5,)), "b": (np.bool_, (6,)),
                "i32": (np.int32, (3,))}
    for name, (dtype, shape) in expected.items():
        assert feed[name].dtype == dtype and feed[name].shape == shape, name
    assert DEFAULT_DIM == 1
    assert ((feed["f"] >= 0) & (feed["f"] < 1)).all()
    assert ((feed["i"] >= 0) & (feed["i"] < 10)).all()
    run_ort(model, feed)  # onnxruntime accepts the feed


def test_synthesize_feed_is_reproducible_by_seed():
    model = _identity_model([("f", np.float32, [4, 4])])
    np.testing.assert_array_equal(synthesize_feed(model, seed=1)["f"], synthesize_feed(model, seed=1)["f"])
    assert not np.array_equal(synthesize_feed(model, seed=1)["f"], synthesize_feed(model, seed=2)["f"])


def test_input_shape_overrides_declared_dims():
    model = _identity_model([("f", np.float32, ["batch", 3]), ("g", np.float32, ["n"])])
    feed = synthesize_feed(model, parse_input_shapes(["f:7x3", "g:0"]))
    assert feed["f"].shape == (7, 3)
    assert feed["g"].shape == (0,)


def test_input_shape_errors():
    model = _identity_model([("f", np.float32, ["batch", 3])])
    with pytest.raises(UsageError, match="rank"):
        synthesize_feed(model, {"f": [2, 3, 4]})
    with pytest.raises(UsageError, match="nope"):
        synthesize_feed(model, {"nope": [1]})


def test_initializers_listed_as_inputs_are_not_synthesized():
    model = make_model([helper.make_node("Add", ["x", "W"], ["y"])],
                       [("x", np.float32, [2]), ("W", np.float32, [2])], [("y", np.float32, [2])],
                       {"W": np.ones(2, np.float32)})
    assert list(synthesize_feed(model)) == ["x"]


def _gather_model(table_rows=7, axis=0, through=("Cast",)) -> onnx.ModelProto:
    nodes, name = [], "idx"
    for i, op in enumerate(through):
        attrs = {"to": TensorProto.INT64} if op == "Cast" else {}
        nodes.append(helper.make_node(op, [name], [f"p{i}"], **attrs))
        name = f"p{i}"
    table_shape = (table_rows, 4) if axis == 0 else (4, table_rows)
    nodes.append(helper.make_node("Gather", ["table", name], ["y"], axis=axis))
    out_shape = [1000, 4] if axis == 0 else [4, 1000]
    return make_model(nodes, [("idx", np.int32, [1000])], [("y", np.float32, out_shape)],
                      {"table": np.arange(table_rows * 4, dtype=np.float32).reshape(table_shape)})


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_indices_through_cast_stay_inside_the_table(axis):
    model = _gather_model(7, axis)
    feed = synthesize_feed(model)
    idx = feed["idx"]
    assert idx.dtype == np.int32
    assert idx.min() >= 0 and idx.max() < 7
    assert idx.max() == 6  # the whole table is reachable (1000 draws)
    run_ort(model, feed)


def test_gather_indices_through_several_pass_through_ops():
    model = _gather_model(3, 0, through=("Cast", "Identity"))
    idx = synthesize_feed(model)["idx"]
    assert idx.min() >= 0 and idx.max() < 3


def test_gather_table_as_constant_node_bounds_indices():
    table = helper.make_node("Constant", [], ["table"], value=helper.make_tensor(
        "t", TensorProto.FLOAT, [5, 2], list(range(10))))
    model = make_model([table, helper.make_node("Gather", ["table", "idx"], ["y"])],
                       [("idx", np.int64, [500])], [("y", np.float32, [500, 2])])
    idx = synthesize_feed(model)["idx"]
    assert idx.max() == 4 and idx.min() >= 0


def test_string_input_is_an_input_error():
    model = make_model([helper.make_node("Identity", ["s"], ["y"])],
                       [("s", TensorProto.STRING, [2])], [("y", TensorProto.STRING, [2])])
    with pytest.raises(InputError, match="'s'"):
        synthesize_feed(model)


def test_load_feeds_from_a_file(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(tmp_path / "feed.npz", x=x, n=np.array(3))
    feeds = load_feeds(tmp_path / "feed.npz")
    assert len(feeds) == 1 and set(feeds[0]) == {"x", "n"}
    np.testing.assert_array_equal(feeds[0]["x"], x)
    assert feeds[0]["n"].shape == ()


def test_load_feeds_from_a_folder_sorted_by_name(tmp_path):
    for i in (2, 0, 1):
        np.savez(tmp_path / f"feed_{i}.npz", x=np.full(2, i, np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = load_feeds(str(tmp_path))
    assert [f["x"][0] for f in feeds] == [0, 1, 2]


def test_load_feeds_errors(tmp_path):
    with pytest.raises(InputError, match="no such"):
        load_feeds(tmp_path / "absent.npz")
    with pytest.raises(InputError, match="no .npz"):
        load_feeds(tmp_path)
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(InputError, match="bad.npz"):
        load_feeds(tmp_path / "bad.npz")


def test_load_feeds_of_a_npy_file_is_an_input_error(tmp_path):
    np.save(tmp_path / "feed.npy", np.zeros(3, np.float32))
    with pytest.raises(InputError):
        load_feeds(tmp_path / "feed.npy")


def test_load_feeds_refuses_pickled_objects(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="obj.npz"):
        load_feeds(tmp_path / "obj.npz")
