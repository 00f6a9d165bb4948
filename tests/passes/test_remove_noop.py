"""Tests of passes/remove_noop.py: each no-op rule removes its node and the model computes what the
original computes on onnxruntime; each refusal is refused (and counted under its reason); graph
output names survive; If branches get every rule, Loop bodies none that needs a loop-carried
value's shape; real models still validate."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    assert_same_outputs,
    make_branch,
    make_model,
    ops,
    random_feed,
    run_once,
    run_ort,
    run_passes,
    with_and_without,
)
from helpers import zoo_files as _zoo_files
from onnx import TensorProto as TP
from onnx import helper

from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

F, I64 = np.float32, np.int64
BIG = np.iinfo(np.int64).max


def _node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def _model(nodes, x_shape=(2, 3), x_dtype=F, inits=None, opset=17, y_dtype=None, extra=(),
           y_shape=None):
    """x -> nodes -> y; ``y`` is declared with ``y_shape`` or the shape ONNX shape inference
    gives it (the checker wants one), which the pass never reads."""
    model = make_model(nodes, [("x", x_dtype, list(x_shape)), *extra],
                       [("y", y_dtype or x_dtype, y_shape)], inits or {}, opset=opset, check=False)
    if y_shape is None:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
        model.graph.output[0].type.CopyFrom(inferred["y"].type)
    onnx.checker.check_model(model, full_check=True)
    return model


def _cast(src, dst, to):
    return _node("Cast", [src], [dst], to=to)


# (id, model, ops left after the pass)
REMOVED = [
    ("cast_same", _model([_node("Relu", ["x"], ["r"]), _cast("r", "y", TP.FLOAT)]), ["Relu"]),
    ("cast_int32_int64_int32",
     _model([_node("Neg", ["x"], ["n"]), _cast("n", "a", TP.INT64), _cast("a", "b", TP.INT32),
             _node("Abs", ["b"])], x_dtype=np.int32), ["Neg", "Abs"]),
    ("cast_f16_f32_f16",
     _model([_node("Neg", ["x"], ["n"]), _cast("n", "a", TP.FLOAT), _cast("a", "b", TP.FLOAT16),
             _node("Abs", ["b"])], x_dtype=np.float16), ["Neg", "Abs"]),
    ("cast_bool_int8_bool",
     _model([_node("Not", ["x"], ["n"]), _cast("n", "a", TP.INT8), _cast("a", "b", TP.BOOL),
             _node("Not", ["b"])], x_dtype=np.bool_), ["Not", "Not"]),
    ("cast_chain_shortened_int8_int32_int64",
     _model([_cast("x", "a", TP.INT32), _cast("a", "y", TP.INT64)], x_dtype=np.int8,
            y_dtype=I64), ["Cast"]),
    ("cast_chain_wrap_int16_int32_int8",
     _model([_cast("x", "a", TP.INT32), _cast("a", "y", TP.INT8)], x_dtype=np.int16,
            y_dtype=np.int8), ["Cast"]),
    ("castlike_same", _model([_node("Relu", ["x"], ["r"]), _node("CastLike", ["r", "t"])],
                             inits={"t": np.zeros(1, F)}), ["Relu"]),
    ("reshape_same", _model([_node("Relu", ["x"], ["r"]), _node("Reshape", ["r", "s"])],
                            inits={"s": np.array([0, -1], I64)}), ["Relu"]),
    ("reshape_dynamic_copy", _model([_node("Relu", ["x"], ["r"]), _node("Reshape", ["r", "s"])],
                                    x_shape=("N", 3), inits={"s": np.array([0, 3], I64)}),
     ["Relu"]),
    ("flatten_2d", _model([_node("Relu", ["x"], ["r"]), _node("Flatten", ["r"])],
                          x_shape=("N", "M")), ["Relu"]),
    ("expand_same", _model([_node("Relu", ["x"], ["r"]), _node("Expand", ["r", "s"])],
                           x_shape=("N", 3), inits={"s": np.array([1, 3], I64)}), ["Relu"]),
    ("squeeze_unsqueeze", _model([_node("Relu", ["x"], ["r"]), _node("Squeeze", ["r", "a"], ["s"]),
                                  _node("Unsqueeze", ["s", "b"])], x_shape=(2, 1, 3),
                                 inits={"a": np.array([1], I64), "b": np.array([-2], I64)}),
     ["Relu"]),
    ("unsqueeze_squeeze_opset11",
     _model([_node("Relu", ["x"], ["r"]), _node("Unsqueeze", ["r"], ["u"], axes=[0, 3]),
             _node("Squeeze", ["u"], axes=[3, 0])], opset=11, x_shape=("N", 3)), ["Relu"]),
    ("squeeze_no_axes_no_ones", _model([_node("Relu", ["x"], ["r"]), _node("Squeeze", ["r"])]),
     ["Relu"]),
    ("unsqueeze_empty_axes", _model([_node("Relu", ["x"], ["r"]), _node("Unsqueeze", ["r", "a"])],
                                    inits={"a": np.zeros(0, I64)}), ["Relu"]),
    ("transpose_identity", _model([_node("Relu", ["x"], ["r"]),
                                   _node("Transpose", ["r"], perm=[0, 1])]), ["Relu"]),
    ("transpose_1d_default", _model([_node("Relu", ["x"], ["r"]), _node("Transpose", ["r"])],
                                    x_shape=("N",)), ["Relu"]),
    ("pad_zero_reflect", _model([_node("Relu", ["x"], ["r"]),
                                 _node("Pad", ["r", "p"], mode="reflect")],
                                inits={"p": np.zeros(4, I64)}), ["Relu"]),
    ("pad_zero_opset9", _model([_node("Relu", ["x"], ["r"]), _node("Pad", ["r"], pads=[0] * 4)],
                               opset=9), ["Relu"]),
    ("slice_whole_dynamic", _model([_node("Relu", ["x"], ["r"]),
                                    _node("Slice", ["r", "s", "e", "a", "t"])],
                                   x_shape=("N", "M"),
                                   inits={"s": np.array([0, 0], I64),
                                          "e": np.array([BIG, 2**31 - 1], I64),
                                          "a": np.array([0, 1], I64), "t": np.ones(2, I64)}),
     ["Relu"]),
    ("slice_whole_static_negative_start",
     _model([_node("Relu", ["x"], ["r"]), _node("Slice", ["r", "s", "e", "a"])],
            inits={"s": np.array([-7], I64), "e": np.array([3], I64), "a": np.array([-1], I64)}),
     ["Relu"]),
    ("slice_opset1_attrs", _model([_node("Relu", ["x"], ["r"]),
                                   _node("Slice", ["r"], starts=[0], ends=[5], axes=[0])],
                                  opset=9), ["Relu"]),
    ("concat_single", _model([_node("Relu", ["x"], ["r"]), _node("Concat", ["r"], axis=0)]),
     ["Relu"]),
    ("split_single", _model([_node("Relu", ["x"], ["r"]), _node("Split", ["r"], axis=1)]),
     ["Relu"]),
    ("mul_ones_broadcast", _model([_node("Relu", ["x"], ["r"]), _node("Mul", ["r", "c"])],
                                  x_shape=(3, 4), inits={"c": np.ones((1, 4), F)}), ["Relu"]),
    ("mul_one_left_dynamic", _model([_node("Relu", ["x"], ["r"]), _node("Mul", ["c", "r"])],
                                    x_shape=("N", 4), inits={"c": np.ones((), F)}), ["Relu"]),
    ("add_zero_int", _model([_node("Neg", ["x"], ["r"]), _node("Add", ["c", "r"])],
                            x_dtype=I64, inits={"c": np.zeros(3, I64)}), ["Neg"]),
    ("sub_zero_right", _model([_node("Relu", ["x"], ["r"]), _node("Sub", ["r", "c"])],
                              inits={"c": np.zeros((2, 1), F)}), ["Relu"]),
    ("div_one_right", _model([_node("Relu", ["x"], ["r"]), _node("Div", ["r", "c"])],
                             inits={"c": np.ones(1, F)}), ["Relu"]),
    ("resize_scales_one", _model([_node("Relu", ["x"], ["r"]),
                                  _node("Resize", ["r", "", "s"], mode="linear")],
                                 x_shape=("N", 3, 4, 5), inits={"s": np.ones(4, F)}), ["Relu"]),
    ("resize_sizes_equal", _model([_node("Relu", ["x"], ["r"]),
                                   _node("Resize", ["r", "", "", "z"], mode="cubic")],
                                  x_shape=(1, 3, 4, 5), inits={"z": np.array([1, 3, 4, 5], I64)}),
     ["Relu"]),
    ("resize10_scales_one", _model([_node("Relu", ["x"], ["r"]), _node("Resize", ["r", "s"])],
                                   opset=10, x_shape=(1, 2, 3, 3), inits={"s": np.ones(4, F)}),
     ["Relu"]),
]


@pytest.mark.parametrize("model, expected", [c[1:] for c in REMOVED], ids=[c[0] for c in REMOVED])
def test_noop_removed(model, expected):
    out, _ = run_passes(model, ["remove_noop"])
    assert ops(out) == expected
    assert_same_outputs(model, out, rtol=0, atol=0)


# (id, model, refusal reason or None when the node is simply not a no-op)
KEPT = [
    ("cast_chain_narrowing_last_step",
     _model([_cast("x", "a", TP.DOUBLE), _cast("a", "y", TP.FLOAT16)], y_dtype=np.float16),
     "Cast: cast chain: the last conversion may round differently from the first type"),
    ("cast_chain_lossy_middle",
     _model([_cast("x", "a", TP.FLOAT16), _cast("a", "y", TP.FLOAT)]), None),
    ("add_zero_grows_rank", _model([_node("Add", ["x", "c"])], x_shape=(2, 3, 4, 5),
                                   inits={"c": np.zeros((1, 1, 1, 1, 5), F)}, y_dtype=F),
     "Add: broadcast would grow the rank"),
    ("mul_ones_grows_dim", _model([_node("Mul", ["x", "c"])], x_shape=(1, 4),
                                  inits={"c": np.ones((3, 1), F)}),
     "Mul: broadcast would change a dim"),
    ("mul_ones_dynamic_dim", _model([_node("Mul", ["x", "c"])], x_shape=("N", 4),
                                    inits={"c": np.ones((3, 1), F)}),
     "Mul: broadcast may grow a dynamic dim"),
    ("sub_zero_left", _model([_node("Sub", ["c", "x"])], inits={"c": np.zeros((), F)}), None),
    ("div_one_left", _model([_node("Div", ["c", "x"])], inits={"c": np.ones((), F)}), None),
    ("mul_two", _model([_node("Mul", ["x", "c"])], inits={"c": np.full((), 2, F)}), None),
    ("reshape_other_shape", _model([_node("Reshape", ["x", "s"])], inits={"s": np.array([3, 2],
                                                                                         I64)}),
     None),
    ("reshape_dynamic_dim", _model([_node("Reshape", ["x", "s"])], x_shape=("N", 3),
                                   inits={"s": np.array([3, 3], I64)}),
     "Reshape: input dim not static"),
    ("flatten_3d", _model([_node("Flatten", ["x"])], x_shape=(2, 3, 1)), None),
    ("expand_grows", _model([_node("Expand", ["x", "s"])], inits={"s": np.array([4, 1, 1], I64)}),
     None),
    ("squeeze_no_axes_has_one", _model([_node("Squeeze", ["x"])], x_shape=(2, 1, 3)), None),
    ("squeeze_no_axes_dynamic", _model([_node("Squeeze", ["x"])], x_shape=("N", 3),
                                                        y_shape=["A", "B"]),
     "Squeeze: squeeze without axes: a dynamic dim may be 1"),
    ("squeeze_unsqueeze_other_axes",
     _model([_node("Squeeze", ["x", "a"], ["s"]), _node("Unsqueeze", ["s", "b"])],
            x_shape=(2, 1, 3), inits={"a": np.array([1], I64), "b": np.array([0], I64)}), None),
    ("transpose_swap", _model([_node("Transpose", ["x"], perm=[1, 0])]), None),
    ("pad_nonzero", _model([_node("Pad", ["x", "p"])], inits={"p": np.array([0, 1, 0, 0], I64)}),
     None),
    ("slice_reverse", _model([_node("Slice", ["x", "s", "e", "a", "t"])],
                             inits={"s": np.array([-1], I64), "e": np.array([-BIG], I64),
                                    "a": np.array([0], I64), "t": np.array([-1], I64)}), None),
    ("slice_short_end", _model([_node("Slice", ["x", "s", "e"])], x_shape=("N", 3),
                               inits={"s": np.array([0], I64), "e": np.array([2], I64)}),
     "Slice: input dim not static"),
    ("resize_tf_crop_and_resize",
     _model([_node("Resize", ["x", "roi", "s"],
                   coordinate_transformation_mode="tf_crop_and_resize")],
            x_shape=(1, 1, 3, 3), inits={"roi": np.array([0, 0, .2, .2, 1, 1, .8, .8], F),
                                         "s": np.ones(4, F)}),
     "Resize: coordinate_transformation_mode tf_crop_and_resize moves the sampling points"),
    ("resize_sizes_other", _model([_node("Resize", ["x", "", "", "z"])], x_shape=(1, 1, 3, 3),
                                  inits={"z": np.array([1, 1, 6, 6], I64)}), None),
    ("mul_overridable_one", _model([_node("Mul", ["x", "c"])], inits={"c": np.ones(3, F)},
                                   extra=[("c", F, [3])]), None),
    ("output_name_from_graph_input", _model([_node("Transpose", ["x"], perm=[0, 1])]),
     ("Transpose: graph output name cannot be kept (input is a graph input, initializer or "
      "outer-scope tensor)")),
]


@pytest.mark.parametrize("model, reason", [c[1:] for c in KEPT], ids=[c[0] for c in KEPT])
def test_not_removed(model, reason):
    out, result = run_once(model, "remove_noop")
    assert ops(out) == ops(model)
    assert not result.modified
    assert result.stats.get("refused", {}) == ({reason: 1} if reason else {})
    feeds = [random_feed(model, seed, dim=3) for seed in (0, 1)]  # N = 3 broadcasts with 3
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


_IDENTITY_ALGEBRA = [c for c in REMOVED if c[0] in (
    "mul_ones_broadcast", "mul_one_left_dynamic", "add_zero_int", "sub_zero_right",
    "div_one_right")] + [
    ("add_zero_left_symbolic", _model([_node("Relu", ["x"], ["r"]), _node("Add", ["c", "r"])],
                                      x_shape=("N", "M", 4), inits={"c": np.zeros((1, 4), F)}),
     ["Relu"]),
    ("div_ones_symbolic", _model([_node("Relu", ["x"], ["r"]), _node("Div", ["r", "c"])],
                                 x_shape=("N", 4), inits={"c": np.ones((1, 1), F)}), ["Relu"]),
]


@pytest.mark.parametrize("model, expected", [c[1:] for c in _IDENTITY_ALGEBRA],
                         ids=[c[0] for c in _IDENTITY_ALGEBRA])
def test_identity_algebra_for_every_value_of_the_symbolic_dims(model, expected):
    """x + 0, 0 + x, x - 0, x * 1, x / 1 removed: the same outputs with each symbolic dim 0, 1
    and 3 (a batch of 0 included), exactly; -0.0 + 0 = +0.0 compares equal."""
    out, _ = run_passes(model, ["remove_noop"])
    assert ops(out) == expected
    feeds = [random_feed(model, seed, dim=dim) for seed, dim in enumerate((0, 1, 3))]
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def test_output_name_survives():
    model = _model([_node("Relu", ["x"], ["r"]), _node("Transpose", ["r"], perm=[0, 1])])
    out, result = run_once(model, "remove_noop")
    assert ops(out) == ["Relu"] and [o.name for o in out.graph.output] == ["y"]
    assert result.stats == {"rewritten": 1, "by_kind": {"Transpose": 1}}
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_cast_chain_shortened_and_its_first_cast_removed():
    model = _model([_cast("x", "a", TP.INT32), _cast("a", "y", TP.INT64)], x_dtype=np.int8,
                   y_dtype=I64)
    out, result = run_once(model, "remove_noop")
    assert ops(out) == ["Cast"] and out.graph.node[0].input[0] == "x"
    assert result.stats == {"rewritten": 1, "by_kind": {"Cast chain shortened": 1},
                            "producers_removed": {"Cast": 1}}
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_tensor_listed_twice_as_output():
    model = make_model([_node("Relu", ["x"], ["r"]), _node("Pad", ["r", "p"])],
                       [("x", F, [2, 3])], [("y", F, [2, 3]), ("y", F, [2, 3])],
                       {"p": np.zeros(4, I64)}, check=False)
    out, _ = run_passes(model, ["remove_noop"])
    assert ops(out) == ["Relu"] and [o.name for o in out.graph.output] == ["y", "y"]
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_cast_and_mul_by_computed_one_in_full_pipeline():
    """x -> Cast(float) -> Mul(Div(2, 2)) -> Identity -> y: the Mul's output is the graph output
    and its kept input is the graph input x, so the Mul must stay; the Cast goes."""
    model = _model([_cast("x", "c", TP.FLOAT), _node("Div", ["two", "two"], ["one"]),
                    _node("Mul", ["c", "one"], ["m"]), _node("Identity", ["m"])],
                   inits={"two": np.full((), 2, F)})
    out, report = optimize(model, passes=LOSSLESS_PIPELINE + ["remove_noop"])
    assert report.validation.passed
    assert [o.name for o in out.graph.output] == ["y"]
    assert "Cast" not in ops(out) and "Identity" not in ops(out)
    x = np.random.default_rng(0).normal(size=(2, 3)).astype(F)
    np.testing.assert_array_equal(run_ort(out, {"x": x})["y"], x)


def test_if_branches_get_every_rule():
    then = make_branch([_node("Transpose", ["x"], ["t"], perm=[0, 1]),
                        _node("Slice", ["t", "s", "e"], ["sl"]), _node("Neg", ["sl"], ["n"]),
                        _node("Reshape", ["n", "shape"], ["ty"])], [("ty", F, [2, 3])],
                       {"s": np.zeros(1, I64), "e": np.array([BIG], I64),
                        "shape": np.array([2, 3], I64)}, name="then")
    other = make_branch([_node("Neg", ["x"], ["ey"])], [("ey", F, [2, 3])], name="else")
    model = make_model([_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                       [("x", F, [2, 3]), ("cond", np.bool_, [])], [("y", F, [2, 3])])
    out, result = run_once(model, "remove_noop")
    (then,) = [a.g for a in out.graph.node[0].attribute if a.name == "then_branch"]
    assert [n.op_type for n in then.node] == ["Neg"] and then.output[0].name == "ty"
    assert result.stats == {"rewritten": 3, "by_kind": {"Reshape": 1, "Slice": 1, "Transpose": 1}}
    for cond in (True, False):
        feed = {"x": np.arange(6, dtype=F).reshape(2, 3), "cond": np.array(cond)}
        np.testing.assert_array_equal(run_ort(out, feed)["y"], run_ort(model, feed)["y"])


def test_loop_carried_shape_is_not_trusted():
    """``v`` is [3] in the first iteration only, then [1]: ``Expand(-v, [3])`` is a no-op for the
    initial shape (which the body input also declares) but not later."""
    body = helper.make_graph(
        [_node("Neg", ["v"], ["w"]), _node("Expand", ["w", "three"], ["e"]),
         _node("Slice", ["e", "two", "big"], ["v_next"]),
         _node("Identity", ["cond"], ["cond_out"]), _node("Neg", ["x"], ["outer"]),
         _node("Reshape", ["outer", "shape"], ["scan"])],
        "body", [helper.make_tensor_value_info("i", TP.INT64, []),
                 helper.make_tensor_value_info("cond", TP.BOOL, []),
                 helper.make_tensor_value_info("v", TP.FLOAT, [3])],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
         helper.make_tensor_value_info("v_next", TP.FLOAT, [1]),
         helper.make_tensor_value_info("scan", TP.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(v, n) for n, v in
         (("three", np.array([3], I64)), ("two", np.array([2], I64)),
          ("big", np.array([BIG], I64)), ("shape", np.array([2, 3], I64)))])
    model = make_model([_node("Loop", ["m", "", "v0"], ["y", "scans"], body=body)],
                       [("x", F, [2, 3]), ("m", I64, []), ("v0", F, [3])],
                       [("y", F, [1]), ("scans", F, [2, 2, 3])])
    out, result = run_once(model, "remove_noop")
    assert result.stats["by_kind"] == {"Reshape": 1}  # reads the outer x: its shape is known
    assert result.stats["refused"] == {"Expand: input shape unknown": 1}
    feed = {"x": np.ones((2, 3), F), "m": np.array(2, I64), "v0": np.arange(3, dtype=F)}
    for name, value in run_ort(model, feed).items():
        np.testing.assert_array_equal(run_ort(out, feed)[name], value)


def _loop_model(body_nodes, inits, v0_shape=(2, 3), v_dtype=F):
    """A Loop over ``v`` (loop-carried, initial value ``v0``) whose body computes ``v_next`` from
    ``v`` with ``body_nodes``: inside the body the rank of ``v`` is not known to the pass (the
    declared ``[a, b]`` of a body input is not read)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(v_dtype))
    body = helper.make_graph(
        list(body_nodes) + [_node("Identity", ["cond"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("i", TP.INT64, []),
                 helper.make_tensor_value_info("cond", TP.BOOL, []),
                 helper.make_tensor_value_info("v", elem, ["a", "b"])],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
         helper.make_tensor_value_info("v_next", elem, ["a", "b"])],
        [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    return make_model([_node("Loop", ["m", "", "v0"], ["y"], body=body)],
                      [("v0", v_dtype, list(v0_shape)), ("m", I64, [])],
                      [("y", v_dtype, ["a", "b"])])


def _loop_feed(v_dtype=F):
    v0 = np.random.default_rng(0).normal(size=(2, 3)) * 5
    v0[0, 0] = -0.0
    return {"v0": v0.astype(v_dtype), "m": np.array(3, I64)}


def _body(model):
    return model.graph.node[0].attribute[0].g


@pytest.mark.parametrize("op, zero, dtype", [("Add", np.zeros(1, F), F),
                                             ("Sub", np.zeros(1, F), F),
                                             ("Add", np.zeros(1, I64), I64),
                                             ("Add", np.zeros((1, 1), F), F)])
def test_add_zero_of_rank_known_from_unsqueeze(op, zero, dtype):
    """paddle2onnx Loop bodies: Unsqueeze(v, [0]) -> Add(., 0[1]) -> Squeeze(., [0]); the rank of
    v is unknown, but the Unsqueeze output has rank >= 1 (>= 2 for two axes): the zero goes, and
    then the Squeeze/Unsqueeze pair."""
    axes = [0] if zero.ndim == 1 else [0, 1]
    model = _loop_model([_node("Unsqueeze", ["v", "ax"], ["u"]), _node(op, ["u", "zero"], ["a"]),
                         _node("Squeeze", ["a", "ax"], ["s"]), _node("Neg", ["s"], ["v_next"])],
                        {"ax": np.array(axes, I64), "zero": zero}, v_dtype=dtype)
    out, records = run_passes(model, ["remove_noop"])
    assert ops(_body(out)) == ["Neg", "Identity"]
    assert records[0].stats["by_kind"] == {op: 1, "Squeeze": 1}
    assert records[0].stats["producers_removed"] == {"Unsqueeze": 1}
    assert_same_outputs(model, out, [_loop_feed(dtype)], rtol=0, atol=0)


_UNSQUEEZED = [_node("Unsqueeze", ["v", "ax"], ["u"]), _node("Add", ["u", "zero"], ["a0"]),
               _node("Squeeze", ["a0", "ax"], ["a"])]


@pytest.mark.parametrize("nodes, zero", [
    ([_node("Add", ["v", "zero"], ["a"])], np.zeros(1, F)),  # rank of v unknown
    (_UNSQUEEZED, np.zeros((1, 1), F)),  # rank 2 may exceed the Unsqueeze output's (>= 1)
    (_UNSQUEEZED, np.zeros(2, F)),  # not all 1s: may broadcast a dim
], ids=["rank_unknown", "zero_of_higher_rank", "zero_not_all_ones"])
def test_add_zero_rank_not_known_enough_refused(nodes, zero):
    model = _loop_model(nodes + [_node("Neg", ["a"], ["v_next"])],
                        {"ax": np.array([0], I64), "zero": zero}, v0_shape=(2, 2))
    out, result = run_once(model, "remove_noop")
    assert sorted(ops(_body(out))) == sorted(ops(_body(model)))
    assert result.stats["refused"] == {"Add: input shape unknown": 1}
    feed = {"v0": _loop_feed()["v0"][:, :2], "m": np.array(3, I64)}
    np.testing.assert_array_equal(run_ort(out, feed)["y"], run_ort(model, feed)["y"])


def test_expand_ones_of_rank_known_from_unsqueeze():
    model = _loop_model([_node("Unsqueeze", ["v", "ax"], ["u"]),
                         _node("Expand", ["u", "ones"], ["e"]),
                         _node("Squeeze", ["e", "ax"], ["s"]), _node("Neg", ["s"], ["v_next"])],
                        {"ax": np.array([0, 2], I64), "ones": np.ones(2, I64)})
    out, records = run_passes(model, ["remove_noop"])
    assert sorted(ops(_body(out))) == ["Identity", "Neg"]
    assert records[0].stats["by_kind"] == {"Expand": 1, "Squeeze": 1}
    assert records[0].stats["producers_removed"] == {"Unsqueeze": 1}
    assert_same_outputs(model, out, [_loop_feed()], rtol=0, atol=0)


def test_stats_are_json_serializable():
    import json
    _, result = run_once(REMOVED[0][1], "remove_noop")
    assert json.loads(json.dumps(result.stats)) == result.stats


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["silero_vad_openvino_16k", "silero_vad_16k_op15"])
def test_real_model_fewer_nodes(name):
    onnx_file, npz_file = _zoo_files(name)
    without = [p for p in LOSSLESS_PIPELINE if p != "remove_noop"]
    _, base = optimize(onnx_file, passes=without, inputs=npz_file)
    _, report = optimize(onnx_file, passes=without + ["remove_noop"], inputs=npz_file)
    assert report.validation.passed
    assert report.after.nodes < base.after.nodes


@pytest.mark.zoo
def test_real_model_with_if_subgraphs():
    onnx_file, npz_file = _zoo_files("silero_vad")
    _, report = optimize(onnx_file, passes=LOSSLESS_PIPELINE + ["remove_noop"], inputs=npz_file)
    assert report.validation.passed
    removed = sum(r.stats.get("by_kind", {}).get("Slice", 0) for r in report.passes
                  if r.name == "remove_noop")
    assert removed > 0


def _ml_model(nodes, inputs, outputs):
    """A model importing ai.onnx.ml (opset 3) besides the default domain."""
    model = make_model(nodes, inputs, outputs, check=False)
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 3))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_cast_to_the_type_an_ml_op_always_outputs():
    """Scaler (float whatever its input), LinearClassifier labels (int64 with integer class
    labels), SVMClassifier scores (float) and Imputer (its input's type): ONNX type inference
    reports none of Scaler, Imputer, the SVM scores, so only the spec's table shows these Casts
    are no-ops. Graph outputs keep their names (the ML op's output is renamed)."""
    ml = "ai.onnx.ml"
    nodes = [
        helper.make_node("Scaler", ["X"], ["S"], domain=ml, offset=[0.5, 1.0, 0.0],
                         scale=[2.0, 1.0, 3.0]),
        helper.make_node("Cast", ["S"], ["Y_scaled"], to=TP.FLOAT),
        helper.make_node("Cast", ["S"], ["Y_double"], to=TP.DOUBLE),
        helper.make_node("LinearClassifier", ["F"], ["L", "P"], domain=ml,
                         coefficients=[1.0, -2.0, 0.5, 0.3, 0.1, -1.0], intercepts=[0.1, -0.2],
                         classlabels_ints=[3, 7]),
        helper.make_node("Cast", ["L"], ["Y_label"], to=TP.INT64),
        helper.make_node("SVMClassifier", ["F"], ["SL", "SP"], domain=ml, kernel_type="LINEAR",
                         kernel_params=[0.0, 0.0, 1.0],
                         classlabels_strings=["a", "b"], coefficients=[1.0, -1.0],
                         vectors_per_class=[1, 1], support_vectors=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                         rho=[0.1]),
        helper.make_node("Cast", ["SP"], ["Y_scores"], to=TP.FLOAT),
        helper.make_node("Imputer", ["F"], ["I"], domain=ml, imputed_value_floats=[0.0, 1.0, 2.0],
                         replaced_value_float=0.0),
        helper.make_node("Cast", ["I"], ["R"], to=TP.FLOAT),
        helper.make_node("Relu", ["R"], ["Y_imputed"]),
    ]
    outputs = [("Y_scaled", np.float32, ["N", 3]), ("Y_double", np.float64, ["N", 3]),
               ("Y_label", np.int64, ["N"]), ("Y_scores", np.float32, ["N", 2]),
               ("Y_imputed", np.float32, ["N", 3])]
    model = _ml_model(nodes, [("X", np.float64, ["N", 3]), ("F", np.float32, ["N", 3])], outputs)
    out, result = run_once(model, "remove_noop")
    assert result.stats["by_kind"] == {"Cast": 4}
    assert ops(out).count("Cast") == 1  # the Cast to double converts
    rng = np.random.default_rng(0)
    feeds = [{"X": rng.normal(size=(n, 3)), "F": rng.normal(size=(n, 3)).astype(np.float32)}
             for n in (4, 1)]
    assert_same_outputs(model, out, feeds)


def test_cast_of_string_labels_to_int64_kept():
    """LinearClassifier with string class labels outputs strings: a Cast to int64 converts."""
    nodes = [helper.make_node("LinearClassifier", ["F"], ["L", "P"], domain="ai.onnx.ml",
                              coefficients=[1.0, -2.0, 0.5, 0.3], intercepts=[0.0, 0.0],
                              classlabels_strings=["1", "2"]),
             helper.make_node("Cast", ["L"], ["Y"], to=TP.INT64)]
    model = _ml_model(nodes, [("F", np.float32, ["N", 2])], [("Y", np.int64, ["N"]),
                                                            ("P", np.float32, ["N", 2])])
    out, result = run_once(model, "remove_noop")
    assert not result.modified and ops(out) == ["LinearClassifier", "Cast"]


@pytest.mark.zoo
def test_real_ml_model_cast_removed():
    """skl2onnx's MLP pipeline: Scaler (float output, not inferred) then Cast to float."""
    (_, base), (_, report) = with_and_without("surfaces_mlp_skl2onnx", "remove_noop")
    assert "Cast" not in report.after.op_counts and base.after.op_counts["Cast"] == 1
