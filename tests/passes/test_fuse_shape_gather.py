"""Tests of passes/fuse_shape_gather.py: Unsqueeze(Gather(Shape(x), i), [0]) becomes one Shape with
start/end, and the model computes what the original computes on onnxruntime for inputs of several
sizes; the Gather's other readers, older opsets and the refusals leave the graph alone; If
branches."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from helpers import assert_same_outputs, make_branch, make_model, ops, run_once, run_passes
from onnx import TensorProto, helper

I64 = np.int64


def _chain(index=0, shape_attrs=None, axes=(0,), opset=17, x_shape=("N", 3, "M"), extra=()):
    """x -> Shape(**shape_attrs) -> Gather(index) -> Unsqueeze(axes) -> Concat with [-1] -> s;
    y = Reshape(x, s) and s are the outputs; ``extra`` nodes are appended."""
    inits = {"i": np.array(index, I64), "minus1": np.array([-1], I64)}
    if opset >= 13:
        inits["ax"] = np.array(axes, I64)
        unsqueeze = helper.make_node("Unsqueeze", ["g", "ax"], ["u"])
    else:
        unsqueeze = helper.make_node("Unsqueeze", ["g"], ["u"], axes=list(axes))
    nodes = [helper.make_node("Shape", ["x"], ["sh"], **(shape_attrs or {})),
             helper.make_node("Gather", ["sh", "i"], ["g"]), unsqueeze,
             helper.make_node("Concat", ["u", "minus1"], ["s"], axis=0),
             helper.make_node("Reshape", ["x", "s"], ["y"]), *extra]
    outputs = [("y", np.float32, ["a", "b"]), ("s", I64, [2])]
    outputs += [(n.output[0], I64, [1] if n.op_type == "Unsqueeze" else []) for n in extra]
    return make_model(nodes, [("x", np.float32, list(x_shape) if x_shape else None)], outputs,
                      inits, opset=opset, check=False)


def _feeds(*shapes):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=s).astype(np.float32)} for s in shapes]


FEEDS = _feeds((2, 3, 4), (5, 3, 1))


@pytest.mark.parametrize("index, shape_attrs, axes", [
    (0, None, (0,)), (2, None, (0,)), (-1, None, (-1,)), (-3, None, (0,)),
    (0, {"start": 1}, (0,)), (-1, {"start": -2, "end": -1}, (0,)),
])
def test_becomes_one_shape(index, shape_attrs, axes):
    model = _chain(index, shape_attrs, axes)
    out, records = run_passes(model, ["fuse_shape_gather"])
    assert ops(out) == ["Shape", "Concat", "Reshape"]
    assert records[0].stats == {"rewritten": 1, "by_kind": {"gather": 1}}
    assert_same_outputs(model, out, FEEDS, rtol=0, atol=0)


def test_opset_15():
    """The first opset with Shape start/end (below it nothing is done: next test)."""
    model = _chain(1, opset=15)
    out, _ = run_passes(model, ["fuse_shape_gather"])
    assert ops(out) == ["Shape", "Concat", "Reshape"]
    assert_same_outputs(model, out, FEEDS, rtol=0, atol=0)


def test_opset_below_15_untouched():
    model = _chain(1, opset=12)
    out, result = run_once(model, "fuse_shape_gather")
    assert not result.modified and ops(out) == ops(model)
    assert result.stats == {"refused": {"opset 12 < 15": 1}}


def test_two_unsqueeze_readers_and_a_shape_with_other_readers():
    """Both Unsqueezes of the Gather become Shapes; the full Shape stays for its Gather(1) ->
    Cast reader (that Gather has a reader other than an Unsqueeze: left alone)."""
    extra = [helper.make_node("Unsqueeze", ["g", "ax"], ["u2"]),
             helper.make_node("Gather", ["sh", "one"], ["g1"]),
             helper.make_node("Cast", ["g1"], ["c"], to=TensorProto.INT64)]
    model = _chain(0, extra=extra)
    model.graph.initializer.append(helper.make_tensor("one", TensorProto.INT64, [], [1]))
    out, records = run_passes(model, ["fuse_shape_gather"])
    assert sorted(ops(out)) == sorted(["Shape", "Shape", "Shape", "Concat", "Reshape", "Gather",
                                       "Cast"])
    # one Gather, its two Unsqueezes now Shapes
    assert records[0].stats == {"rewritten": 1, "by_kind": {"gather": 1}}
    assert_same_outputs(model, out, FEEDS, rtol=0, atol=0)


def test_gather_with_another_reader_untouched():
    extra = [helper.make_node("Cast", ["g"], ["c"], to=TensorProto.INT64)]
    model = _chain(0, extra=extra)
    out, result = run_once(model, "fuse_shape_gather")
    assert not result.modified and result.stats == {"rewritten": 0}
    assert sorted(ops(out)) == sorted(ops(model))


def test_rank_unknown_refused():
    model = _chain(0, x_shape=None)
    out, result = run_once(model, "fuse_shape_gather")
    assert result.stats["refused"] == {"rank unknown": 1} and ops(out) == ops(model)
    assert_same_outputs(model, out, FEEDS, rtol=0, atol=0)


def test_index_out_of_range_refused():
    """Index 3 of a rank-3 shape: the original fails at run time; the rewrite would not."""
    model = _chain(3)
    out, result = run_once(model, "fuse_shape_gather")
    assert result.stats["refused"] == {"index out of range": 1} and ops(out) == ops(model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with pytest.raises(Exception):
        sess = ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        sess.run(None, FEEDS[0])


def test_in_if_branch_reading_outer_shape():
    then = make_branch([helper.make_node("Gather", ["sh", "i"], ["g"]),
                        helper.make_node("Unsqueeze", ["g", "ax"], ["ty"])],
                       [("ty", I64, [1])], {"i": np.array(2, I64), "ax": np.array([0], I64)},
                       name="then")
    other = make_branch([helper.make_node("Shape", ["x"], ["ey"], start=0, end=1)],
                        [("ey", I64, [1])], name="else")
    model = make_model([helper.make_node("Shape", ["x"], ["sh"]),
                        helper.make_node("If", ["c"], ["y"], then_branch=then,
                                         else_branch=other)],
                       [("x", np.float32, ["N", 3, "M"]), ("c", TensorProto.BOOL, [])],
                       [("y", I64, [1])])
    out, _ = run_passes(model, ["fuse_shape_gather"])
    assert ops(out) == ["If"]
    branch = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert ops(branch) == ["Shape"]
    feeds = [{**f, "c": np.array(c)} for f in FEEDS for c in (True, False)]
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def _two_layers():
    """Two tensors of dims ``[b, 2, s, 4]`` (``t1`` and ``t2 = Relu(t1)``), each reshaped to
    ``[-1, s, 4]`` with ``s`` taken by ``Slice(Shape(t), -2, -1)`` from itself, as torch's
    dynamo export of scaled_dot_product_attention does in every layer."""
    nodes = [helper.make_node("Reshape", ["x", "split"], ["v"]),
             helper.make_node("Transpose", ["v"], ["t1"], perm=[0, 2, 1, 3]),
             helper.make_node("Relu", ["t1"], ["t2"])]
    for k in (1, 2):
        nodes += [helper.make_node("Shape", [f"t{k}"], [f"sh{k}"]),
                  helper.make_node("Slice", [f"sh{k}", "m2", "m1"], [f"s{k}"]),
                  helper.make_node("Concat", ["m1", f"s{k}", "four"], [f"c{k}"], axis=0),
                  helper.make_node("Reshape", [f"t{k}", f"c{k}"], [f"y{k}"])]
    inits = {"split": np.array([0, 0, 2, 4], I64), "m2": np.array([-2], I64),
             "m1": np.array([-1], I64), "four": np.array([4], I64)}
    return make_model(nodes, [("x", np.float32, ["b", "s", 8])],
                      [("y1", np.float32, ["a", "s", 4]), ("y2", np.float32, ["a", "s", 4])],
                      inits)


def test_equal_dims_share_one_shape():
    """Each Slice becomes ``Shape(t, 2, 3)``, both then read ``x``'s dim 1 (the first tensor
    with dim ``s``), and CSE leaves one Shape and one Concat; batch 0 and other lengths give
    the original's outputs."""
    model = _two_layers()
    out, records = run_passes(model, ["fuse_shape_gather", "cse", "eliminate_dead"])
    assert ops(out).count("Shape") == ops(out).count("Concat") == 1
    shape = next(n for n in out.graph.node if n.op_type == "Shape")
    assert list(shape.input) == ["x"]
    kinds = [r.stats.get("by_kind", {}) for r in records if r.name == "fuse_shape_gather"]
    assert sum(k.get("first source", 0) for k in kinds) == 2  # Shape(t2); then s from x
    assert sum(k.get("slice", 0) for k in kinds) == 2
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.normal(size=(b, s, 8)).astype(np.float32)}
             for b, s in ((2, 3), (0, 3), (1, 1), (3, 5))]
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def test_other_dims_keep_their_shape():
    """``t2`` of dims ``[b, 2, t, 4]`` (another input): its Shape is not ``t1``'s."""
    model = _two_layers()
    model.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT,
                                                           ["b", 2, "t", 4]))
    model.graph.node[2].input[0] = "z"
    out, _ = run_passes(model, ["fuse_shape_gather", "cse", "eliminate_dead"])
    assert sorted(n.input[0] for n in out.graph.node if n.op_type == "Shape") == ["x", "z"]
