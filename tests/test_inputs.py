"""Tests of optimizer/inputs.py: --input-shape parsing, feed synthesis (dtypes, ranks, index ranges,
size limit), warnings about setting-like inputs, and .npz feed loading and checking."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_branch, make_model, run_ort
from onnx import TensorProto, helper

from onnxopt.api import optimize, resolve_feeds
from onnxopt.errors import InputError, UsageError
from onnxopt.inputs import (
    DEFAULT_DIM,
    MAX_SYNTHESIZED_BYTES,
    check_feeds,
    input_warnings,
    load_feeds,
    parse_input_shapes,
    synthesize_feed,
)


@pytest.mark.parametrize("specs, expected", [
    (None, {}),
    ([], {}),
    (["x:1x3x224x224"], {"x": [1, 3, 224, 224]}),
    (["x:5", "scalar:"], {"x": [5], "scalar": []}),
    (["ns:input:0:2x0"], {"ns:input:0": [2, 0]}),
    (["x:1", "x:2"], {"x": [2]}),
    (["x:2,10,64", "y:[2,10,64]", "s:[]"], {"x": [2, 10, 64], "y": [2, 10, 64], "s": []}),
])
def test_parse_input_shapes(specs, expected):
    assert parse_input_shapes(specs) == expected


@pytest.mark.parametrize("spec", ["x", ":1x2", "x:1x", "x:x1", "x:1xx2", "x:-1", "x:1,", "x:a",
                                  "x:1.5", "x: 1", "x:1x2,3", "x:[1,2", "x:(1,2)"])
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
    with pytest.raises(UsageError, match="dim 1 is 4, but the model fixes it to 3"):
        synthesize_feed(model, {"f": [2, 4]})
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


# --- dtypes and ranks --------------------------------------------------------------------------

NUMPY_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [[], [1], [3, "n"], [2, 1, 4]])
def test_synthesized_inputs_keep_every_numpy_dtype_and_rank(dtype, shape):
    model = _identity_model([("x", dtype, shape)])
    x = synthesize_feed(model)["x"]
    assert isinstance(x, np.ndarray)
    assert x.dtype == dtype
    assert x.shape == tuple(DEFAULT_DIM if d == "n" else d for d in shape)
    out = run_ort(model, {"x": x})["x_out"]
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_inputs_are_synthesized(dtype):
    model = _identity_model([("z", dtype, [2, 3])])
    z = synthesize_feed(model)["z"]
    assert z.dtype == dtype and z.shape == (2, 3)
    assert (z.imag != 0).any() and ((z.real >= 0) & (z.real < 1)).all()


def _typed_input_model(elem: int) -> onnx.ModelProto:
    return make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", elem, [2])],
                      [("y", elem, [2])], opset=21, check=False)


@pytest.mark.parametrize("elem, name", [(TensorProto.BFLOAT16, "BFLOAT16"),
                                        (TensorProto.FLOAT8E4M3FN, "FLOAT8E4M3FN"),
                                        (TensorProto.INT4, "INT4")])
def test_dtypes_numpy_cannot_hold_are_refused_by_name(elem, name):
    with pytest.raises(InputError, match=f"input 'x' is {name}, which numpy has no native dtype"):
        synthesize_feed(_typed_input_model(elem))


def test_undefined_element_type_is_refused():
    with pytest.raises(InputError, match="'x' declares no element type"):
        synthesize_feed(_typed_input_model(TensorProto.UNDEFINED))


def test_string_input_is_refused_with_a_hint():
    model = _typed_input_model(TensorProto.STRING)
    with pytest.raises(InputError, match="input 'x' holds strings.*pass it with --inputs"):
        synthesize_feed(model)


@pytest.mark.parametrize("type_proto, kind", [
    (helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2])),
     "a sequence"),
    (helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2])),
     "an optional"),
    (helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
        TensorProto.FLOAT, [])), "a map"),
])
def test_non_tensor_inputs_are_refused(type_proto, kind):
    model = make_model([helper.make_node("Identity", ["s"], ["y"])],
                       [helper.make_value_info("s", type_proto)],
                       [helper.make_value_info("y", type_proto)], check=False)
    with pytest.raises(InputError, match=f"input 's' is {kind}, not a tensor.*--inputs"):
        synthesize_feed(model)


def test_negative_declared_dims_are_dynamic():
    # PaddleOCR exports declare dynamic dims as -1
    model = _identity_model([("x", np.float32, [1, 3, 48, 192])])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    assert synthesize_feed(model)["x"].shape == (DEFAULT_DIM, 3, 48, 192)
    assert synthesize_feed(model, {"x": [2, 3, 48, 192]})["x"].shape == (2, 3, 48, 192)


def test_input_without_shape_is_a_scalar_with_a_warning():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", np.float32, None)],
                       [("y", np.float32, None)], check=False)
    assert synthesize_feed(model)["x"].shape == ()
    assert any("'x' declares no shape" in w and "--input-shape" in w for w in input_warnings(model))
    assert synthesize_feed(model, {"x": [2, 2]})["x"].shape == (2, 2)
    assert input_warnings(model, {"x": [2, 2]}) == []


# --- indices stay in range ---------------------------------------------------------------------

def _assert_indices_in(values: np.ndarray, size: int):
    assert values.min() >= 0 and values.max() < size, (values.min(), values.max())


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_indices_stay_inside_the_axis(axis):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    size = data.shape[axis]
    model = make_model([helper.make_node("GatherElements", ["data", "idx"], ["y"], axis=axis)],
                       [("idx", np.int64, [3, 4])], [("y", np.float32, [3, 4])], {"data": data})
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], size)
    run_ort(model, feed)


def test_gather_elements_on_a_computed_tensor_uses_shape_inference():
    # the data is an input's Relu: its axis size is known only after shape inference
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("GatherElements", ["r", "idx"], ["y"], axis=1)],
                       [("x", np.float32, [2, 3]), ("idx", np.int64, [2, 50])],
                       [("y", np.float32, [2, 50])])
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], 3)
    run_ort(model, feed)


@pytest.mark.parametrize("batch_dims, depth", [(0, 1), (0, 2), (1, 1)])
def test_gather_nd_indices_stay_inside_the_indexed_dims(batch_dims, depth):
    data = np.arange(3 * 2 * 5, dtype=np.float32).reshape(3, 2, 5)
    limit = min(data.shape[batch_dims:batch_dims + depth])
    lead = [3, 40] if batch_dims else [40]
    model = make_model([helper.make_node("GatherND", ["data", "idx"], ["y"],
                                         batch_dims=batch_dims)],
                       [("idx", np.int64, lead + [depth])],
                       [("y", np.float32, lead + list(data.shape[batch_dims + depth:]))],
                       {"data": data})
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], limit)
    assert feed["idx"].max() == limit - 1
    run_ort(model, feed)


def test_gather_on_a_table_that_is_a_graph_input():
    model = make_model([helper.make_node("Gather", ["table", "idx"], ["y"], axis=1)],
                       [("table", np.float32, [2, 4]), ("idx", np.int64, [300])],
                       [("y", np.float32, [2, 300])])
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], 4)
    assert feed["idx"].max() == 3
    run_ort(model, feed)


def test_gather_on_a_dynamic_table_input_follows_its_synthesized_shape():
    model = make_model([helper.make_node("Gather", ["table", "idx"], ["y"])],
                       [("table", np.float32, ["rows", 2]), ("idx", np.int64, [300])],
                       [("y", np.float32, [300, 2])])
    _assert_indices_in(synthesize_feed(model)["idx"], DEFAULT_DIM)
    feed = synthesize_feed(model, {"table": [6, 2]})
    _assert_indices_in(feed["idx"], 6)
    assert feed["idx"].max() == 5
    run_ort(model, feed)


def _gather_branch(name: str, table_rows: int) -> onnx.GraphProto:
    return make_branch([helper.make_node("Gather", [f"{name}_table", "idx"], [f"{name}_y"])],
                       [(f"{name}_y", np.float32, [200, 2])],
                       {f"{name}_table": np.ones((table_rows, 2), np.float32)}, name)


def test_indices_read_inside_if_branches_through_outer_scope():
    model = make_model([helper.make_node("If", ["flag"], ["y"],
                                         then_branch=_gather_branch("t", 4),
                                         else_branch=_gather_branch("e", 3))],
                       [("flag", np.bool_, []), ("idx", np.int64, [200])],
                       [("y", np.float32, [200, 2])])
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], 3)
    assert feed["idx"].max() == 2
    for flag in (True, False):
        run_ort(model, {**feed, "flag": np.array(flag)})


def test_sibling_branches_reusing_a_name_bound_their_own_indices():
    """Both branches name a value ``c``: each Gather is bounded by the table its own ``c``
    indexes (4 rows for ``idx``, 2 for ``j``), not by the other branch's."""
    def branch(name, index, rows):
        return make_branch([helper.make_node("Cast", [index], ["c"], to=TensorProto.INT64),
                            helper.make_node("Gather", [f"{name}_table", "c"], [f"{name}_y"])],
                           [(f"{name}_y", np.float32, [500, 2])],
                           {f"{name}_table": np.ones((rows, 2), np.float32)}, name)

    model = make_model([helper.make_node("If", ["flag"], ["y"], then_branch=branch("t", "idx", 4),
                                         else_branch=branch("e", "j", 2))],
                       [("flag", np.bool_, []), ("idx", np.int32, [500]), ("j", np.int32, [500])],
                       [("y", np.float32, [500, 2])])
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], 4)
    assert feed["idx"].max() == 3
    _assert_indices_in(feed["j"], 2)
    for flag in (True, False):
        run_ort(model, {**feed, "flag": np.array(flag)})


def test_indices_carried_into_a_loop_body():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["carried"], ["carried_out"]),
         helper.make_node("Gather", ["table", "carried"], ["scan_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("carried", TensorProto.INT64, [100])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("carried_out", TensorProto.INT64, [100]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [100])],
        [onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "table")])
    model = make_model(
        [helper.make_node("Constant", [], ["trips"], value_int=2),
         helper.make_node("Constant", [], ["go"], value=helper.make_tensor("go", TensorProto.BOOL,
                                                                            [], [True])),
         helper.make_node("Loop", ["trips", "go", "idx"], ["final", "scans"], body=body)],
        [("idx", np.int64, [100])],
        [("final", np.int64, [100]), ("scans", np.float32, [2, 100])])
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], 4)
    run_ort(model, feed)


def test_indices_stay_inside_the_dtype():
    # 300 rows, but an int8 index cannot exceed 127; values stay non-negative
    model = make_model([helper.make_node("Cast", ["idx"], ["wide"], to=TensorProto.INT64),
                        helper.make_node("Gather", ["table", "wide"], ["y"])],
                       [("idx", np.int8, [2000])], [("y", np.float32, [2000])],
                       {"table": np.arange(300, dtype=np.float32)})
    idx = synthesize_feed(model)["idx"]
    assert idx.dtype == np.int8 and idx.min() >= 0 and idx.max() == 127


def test_indices_used_twice_take_the_smaller_table():
    model = make_model([helper.make_node("Gather", ["big", "idx"], ["y"]),
                        helper.make_node("Unsqueeze", ["idx", "axes"], ["u"]),
                        helper.make_node("Gather", ["small", "u"], ["z"])],
                       [("idx", np.int64, [500])],
                       [("y", np.float32, [500]), ("z", np.float32, [500, 1])],
                       {"big": np.zeros(50, np.float32), "small": np.zeros(5, np.float32),
                        "axes": np.array([1])})
    feed = synthesize_feed(model)
    _assert_indices_in(feed["idx"], 5)
    run_ort(model, feed)


# --- warnings: settings and control flow -------------------------------------------------------

def _vad_like_model(sr_shape=()) -> onnx.ModelProto:
    """Like silero_vad: an int64 sample rate ``sr`` picks the If branch by Equal(sr, 16000)."""
    then_b = make_branch([helper.make_node("Mul", ["x", "two"], ["t_y"])],
                         [("t_y", np.float32, [4])], {"two": np.float32(2)}, "then")
    else_b = make_branch([helper.make_node("Mul", ["x", "three"], ["e_y"])],
                         [("e_y", np.float32, [4])], {"three": np.float32(3)}, "else")
    nodes = [helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
             helper.make_node("Reshape", ["is16k", "scalar"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_b, else_branch=else_b,
                              name="pick_rate")]
    return make_model(nodes, [("x", np.float32, [4]), ("sr", np.int64, list(sr_shape))],
                      [("y", np.float32, [4])],
                      {"rate": np.array(16000, np.int64), "scalar": np.zeros(0, np.int64)})


@pytest.mark.parametrize("sr_shape", [(), (1,)])
def test_sample_rate_like_input_is_warned_about(sr_shape):
    model = _vad_like_model(sr_shape)
    warnings = input_warnings(model)
    assert len(warnings) == 1, warnings
    assert "input 'sr'" in warnings[0] and "--inputs" in warnings[0]
    assert "16000" in warnings[0] and "If 'pick_rate'" in warnings[0]
    run_ort(model, synthesize_feed(model))  # still synthesized: a warning, not an error


def test_int_scalar_compared_with_a_constant_without_if_is_warned_about():
    model = make_model([helper.make_node("Greater", ["mode", "limit"], ["g"]),
                        helper.make_node("Cast", ["g"], ["y"], to=TensorProto.FLOAT)],
                       [("mode", np.int32, [])], [("y", np.float32, [])],
                       {"limit": np.array(2, np.int32)})
    (warning,) = input_warnings(model)
    assert "input 'mode'" in warning and "compared with 2 by an unnamed Greater node" in warning


def test_input_deciding_an_if_condition_through_comparisons_is_warned_about():
    then_b = make_branch([helper.make_node("Identity", ["x"], ["t_y"])],
                         [("t_y", np.float32, [4])], name="then")
    else_b = make_branch([helper.make_node("Neg", ["x"], ["e_y"])],
                         [("e_y", np.float32, [4])], name="else")
    model = make_model([helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
                        helper.make_node("Greater", ["m", "threshold"], ["above"]),
                        helper.make_node("Not", ["above"], ["below"]),
                        helper.make_node("If", ["below"], ["y"], then_branch=then_b,
                                         else_branch=else_b, name="gate"),
                        helper.make_node("Identity", ["flag"], ["f"]),
                        helper.make_node("If", ["f"], ["z"], then_branch=then_b,
                                         else_branch=else_b)],
                       [("x", np.float32, [4]), ("threshold", np.float32, []),
                        ("flag", np.bool_, [])],
                       [("y", np.float32, [4]), ("z", np.float32, [4])])
    warnings = input_warnings(model)
    assert [w.split("'")[1] for w in warnings] == ["threshold", "flag"]
    assert "condition of If 'gate'" in warnings[0]
    assert "condition of an unnamed If node" in warnings[1]


def test_data_and_index_inputs_are_not_warned_about():
    model = make_model([helper.make_node("Gather", ["table", "idx"], ["g"]),
                        helper.make_node("Add", ["g", "x"], ["y"]),
                        helper.make_node("Equal", ["y", "x"], ["same"])],
                       [("idx", np.int64, [1]), ("x", np.float32, [1, 2])],
                       [("y", np.float32, [1, 2]), ("same", np.bool_, [1, 2])],
                       {"table": np.zeros((4, 2), np.float32)})
    assert input_warnings(model) == []


def test_resolve_feeds_records_the_warnings():
    model = _vad_like_model()
    _, described = resolve_feeds(model, None, None, 0)
    assert [w.split("'")[1] for w in described["warnings"]] == ["sr"]
    _, report = optimize(model)
    assert report.inputs["warnings"] == described["warnings"]
    assert "warnings" in report.to_dict()["inputs"]
    _, clean = resolve_feeds(_identity_model([("x", np.float32, [2])]), None, None, 0)
    assert "warnings" not in clean


def test_silero_vad_sample_rate_is_warned_about():
    from tools import zoo
    path = zoo.model_path(zoo.DEFAULT_DEST, "silero_vad")
    if not path.exists():
        pytest.skip("silero_vad is not fetched (tools/fetch_models.py)")
    warnings = input_warnings(onnx.load(str(path)))
    assert any(w.startswith("input 'sr'") and "--inputs" in w for w in warnings), warnings


# --- size limit --------------------------------------------------------------------------------

def test_oversized_dynamic_dims_are_refused_with_a_shape_that_fits():
    model = _identity_model([("x", np.float32, [1, 3, "height", "width"])])
    with pytest.raises(InputError) as err:
        synthesize_feed(model, {"x": [1, 3, 32768, 32768]})
    message = str(err.value)
    assert message.startswith("input 'x' would be 12.0 GiB with shape [1, 3, 32768, 32768]")
    assert "dims 2 ('height') and 3 ('width') are dynamic" in message
    spec = message.rsplit("--input-shape ", 1)[1]
    (shape,) = parse_input_shapes([spec]).values()
    assert spec.startswith("x:1x3x") and np.prod(shape) * 4 <= MAX_SYNTHESIZED_BYTES
    assert synthesize_feed(model, {"x": [1, 3, 64, 32]})["x"].shape == (1, 3, 64, 32)


def test_oversized_anonymous_dynamic_dim_is_named_by_index():
    model = _identity_model([("x", np.float64, [None, 1 << 20])])
    with pytest.raises(InputError, match=r"dim 0 is dynamic; set it with --input-shape "
                                          r"x:128x1048576"):
        synthesize_feed(model, {"x": [1 << 12, 1 << 20]})


def test_oversized_static_shape_is_refused():
    model = _identity_model([("x", np.float32, [4, 1 << 30])])
    with pytest.raises(InputError, match=r"input 'x' would be 16.0 GiB .*all static.*--inputs"):
        synthesize_feed(model)
    model = _identity_model([("y", np.float32, ["n", 1 << 30])])
    with pytest.raises(InputError, match=r"'y' .*static dims alone exceed"):
        synthesize_feed(model)


# --- given feeds are checked -------------------------------------------------------------------

def _two_input_model() -> onnx.ModelProto:
    return make_model([helper.make_node("Gather", ["x", "i"], ["y"])],
                      [("x", np.float32, ["n", 3]), ("i", np.int64, [2])],
                      [("y", np.float32, [2, 3])])


def _good_feed(**changes):
    feed = {"x": np.zeros((4, 3), np.float32), "i": np.array([0, 1])}
    feed.update(changes)
    return {k: v for k, v in feed.items() if v is not None}


@pytest.mark.parametrize("changes, message", [
    ({"i": None}, "no value for input 'i'"),
    ({"x": np.zeros((4, 3), np.float64)}, "input 'x' is float64, but the model declares float"),
    ({"i": np.array([0, 1], np.int32)}, "input 'i' is int32, but the model declares int64"),
    ({"x": np.zeros((4, 3, 1), np.float32)}, "input 'x' has rank 3"),
    ({"x": np.zeros((4, 2), np.float32)}, r"input 'x' has shape \[4, 2\].*dim 1 = 3"),
])
def test_feed_files_are_checked_against_the_model(tmp_path, changes, message):
    np.savez(tmp_path / "a.npz", **_good_feed())
    np.savez(tmp_path / "b.npz", **_good_feed(**changes))
    with pytest.raises(InputError, match=f"b.npz: {message}"):
        resolve_feeds(_two_input_model(), tmp_path, None, 0)
    with pytest.raises(InputError, match=f"feed 1: {message}"):
        check_feeds(_two_input_model(), [_good_feed(), _good_feed(**changes)])


def test_extra_feed_keys_are_warnings(tmp_path):
    model = make_model([helper.make_node("Add", ["x", "W"], ["y"])],
                       [("x", np.float32, [2]), ("W", np.float32, [2])], [("y", np.float32, [2])],
                       {"W": np.ones(2, np.float32)})
    np.savez(tmp_path / "a.npz", x=np.zeros(2, np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros(2, np.float32), extra=np.zeros(1), W=np.zeros(2))
    feeds, described = resolve_feeds(model, tmp_path, None, 0)
    assert len(feeds) == 2
    assert described["warnings"] == [
        f"{tmp_path / 'b.npz'}: 'extra' names no model input; ignored",
        f"{tmp_path / 'b.npz'}: 'W' names an initializer, which validation does not override;"
        + " ignored"]
    _, report = optimize(model, inputs=tmp_path)
    assert report.validation.passed and len(report.inputs["warnings"]) == 2


# -- calibration feeds stream ------------------------------------------------------------------

def _stream_model():
    from onnx import helper as h

    from helpers import make_model

    return make_model([h.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [2, 3])],
                      [("y", np.float32, [2, 3])])


def test_a_folder_of_calibration_feeds_is_read_one_file_at_a_time_each_iteration(
        tmp_path, monkeypatch):
    import onnxopt.inputs as inputs_module
    from onnxopt.inputs import FeedStream

    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", x=np.full((2, 3), i, np.float32))
    reads = []
    real = inputs_module.load_feed
    monkeypatch.setattr(inputs_module, "load_feed", lambda f: reads.append(f) or real(f))
    stream = FeedStream(tmp_path, _stream_model())
    assert len(stream) == 3 and reads == []
    it = iter(stream)
    assert next(it)["x"][0, 0] == 0 and len(reads) == 1  # lazily: one file read so far
    assert [f["x"][0, 0] for f in stream] == [0, 1, 2]  # re-iterable: read again
    assert len(reads) == 4


def test_a_streamed_feed_is_checked_when_read(tmp_path):
    from onnxopt.inputs import FeedStream

    np.savez(tmp_path / "a.npz", x=np.zeros((2, 3), np.float32))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3), np.int64))
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 3), np.float32), extra=np.zeros(1))
    stream = FeedStream(tmp_path, _stream_model())
    it = iter(stream)
    next(it)
    with pytest.raises(InputError, match=r"b\.npz: input 'x' is int64"):
        next(it)
    with pytest.raises(InputError, match="no such file"):
        FeedStream(tmp_path / "missing", _stream_model())


def test_iterables_of_feeds_stream_and_a_generator_is_consumed_once():
    from onnxopt.inputs import FeedStream

    feed = {"x": np.ones((2, 3), np.float32)}
    twice = FeedStream(lambda: (dict(feed) for _ in range(2)), _stream_model())
    assert len(list(twice)) == 2 and len(list(twice)) == 2
    once = FeedStream((dict(feed) for _ in range(2)), _stream_model())
    assert len(list(once)) == 2
    with pytest.raises(UsageError, match="already consumed"):
        list(once)
    assert len(list(FeedStream(feed, _stream_model()))) == 1
    with pytest.raises(InputError, match="calibration feed 0: expected"):
        list(FeedStream([3], _stream_model()))
    with pytest.raises(UsageError, match="no feeds"):  # not a silent run without data
        FeedStream([], _stream_model())


def test_optimize_hands_passes_a_streaming_calibration(tmp_path):
    from onnxopt import optimize
    from onnxopt.inputs import FeedStream
    from onnxopt.pass_manager import Pass, PassResult

    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", x=np.full((2, 3), i, np.float32))
    seen = []

    class Reads(Pass):
        name = "test_reads_calibration"
        description = "test only"
        requires = frozenset({"calibration"})

        def run(self, graph, ctx):
            seen.append((type(ctx.calibration), [f["x"][0, 0] for f in ctx.calibration],
                         len(list(ctx.calibration))))
            return PassResult(False)

    optimize(_stream_model(), passes=[Reads()], calibration=tmp_path)
    assert seen == [(FeedStream, [0, 1, 2], 3)]
