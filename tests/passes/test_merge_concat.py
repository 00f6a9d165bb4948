"""Tests of passes/merge_concat.py: a Concat read only by a Concat on the same axis is spliced into
it (compared with the original on onnxruntime, empty operands included); every refusal refused;
If branches."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import all_graphs, assert_same_outputs, make_branch, make_model, ops, run_once, \
    run_passes, with_and_without
from onnx import TensorProto, helper


def _concat(inputs, out, axis):
    return helper.make_node("Concat", inputs, [out], axis=axis)


def _feeds(*rows):
    """Feeds of A, B, C of shape [n, 2, k] with the given (n_A, n_B, n_C) along axis 0."""
    rng = np.random.default_rng(0)
    return [{name: rng.normal(size=(n, 2, 3)).astype(np.float32) for name, n in zip("ABC", ns)}
            for ns in rows]


def _inputs():
    return [(name, np.float32, [f"{name}0", 2, 3]) for name in "ABC"]


def test_tree_of_concats_becomes_one():
    """Concat(A, Concat(B, Concat(C, A)), B) on axis 0 (-3 spelled on one of them): one Concat
    of A, B, C, A, B, also when some operands are empty."""
    nodes = [_concat(["C", "A"], "I", -3), _concat(["B", "I"], "J", 0),
             _concat(["A", "J", "B"], "Y", 0)]
    model = make_model(nodes, _inputs(), [("Y", np.float32, ["N", 2, 3])])
    out, records = run_passes(model, ["merge_concat"])
    assert ops(out) == ["Concat"] and list(out.graph.node[0].input) == ["A", "B", "C", "A", "B"]
    assert records[0].stats == {"rewritten": 2, "concats_removed": 2}
    assert_same_outputs(model, out, _feeds((1, 2, 3), (0, 2, 1), (0, 0, 0)))


def test_inner_read_twice_by_the_outer_spliced_twice():
    nodes = [_concat(["A", "B"], "I", 1), _concat(["I", "C", "I"], "Y", 1)]
    inputs = [(name, np.float32, [2, f"{name}1", 3]) for name in "ABC"]
    model = make_model(nodes, inputs, [("Y", np.float32, [2, "N", 3])])
    out, _ = run_passes(model, ["merge_concat"])
    assert ops(out) == ["Concat"] and list(out.graph.node[0].input) == ["A", "B", "C", "A", "B"]
    rng = np.random.default_rng(0)
    feeds = [{n: rng.normal(size=(2, k, 3)).astype(np.float32) for n, k in zip("ABC", ks)}
             for ks in ((1, 2, 3), (0, 1, 0))]
    assert_same_outputs(model, out, feeds)


def test_int64_shape_vector():
    """The exporters' shape vectors: Concat(Concat(Shape(x)[0:1], [1]), [-1, 64])."""
    nodes = [helper.make_node("Shape", ["A"], ["S"], end=1), _concat(["S", "one"], "I", 0),
             _concat(["I", "tail"], "Y", 0)]
    model = make_model(nodes, [("A", np.float32, ["N", 2, 3])], [("Y", np.int64, [4])],
                       {"one": np.array([1], np.int64), "tail": np.array([-1, 64], np.int64)})
    out, _ = run_passes(model, ["merge_concat"])
    assert ops(out) == ["Shape", "Concat"]
    assert_same_outputs(model, out, [{"A": np.zeros((n, 2, 3), np.float32)} for n in (0, 5)])


# (inner axis, outer axis, input shapes, extra output, reason)
_REFUSED = [
    (0, 1, [None, None, 3], None, "different axis"),
    (-1, 2, None, None, "rank unknown"),
    (0, 0, [2, 2, 3], "I", "inner output is a graph output"),
    (0, 0, [2, 2, 3], "R", "inner output has other readers"),
]


def test_refusals():
    for inner_axis, outer_axis, shape, extra, reason in _REFUSED:
        nodes = [_concat(["A", "B"], "I", inner_axis), _concat(["I", "C"], "Y", outer_axis)]
        rank = None if shape is None else [None] * 3
        outputs = [("Y", np.float32, rank)]
        if extra == "R":
            nodes.append(helper.make_node("Relu", ["I"], ["R"]))
        if extra:
            outputs.append((extra, np.float32, rank))
        model = make_model(nodes, [(n, np.float32, shape) for n in "ABC"], outputs,
                           check=shape is not None)  # inputs of unknown rank: not checkable
        out, result = run_once(model, "merge_concat")
        assert not result.modified and result.stats["refused"] == {reason: 1}, reason
        assert ops(out).count("Concat") == 2


def test_inner_in_enclosing_graph():
    """A Concat in an If branch reading a Concat of the main graph read by nothing else."""
    then = make_branch([_concat(["I", "C"], "TY", 0)], [("TY", np.float32, [None, 2, 3])],
                       name="then")
    other = make_branch([helper.make_node("Identity", ["C"], ["EY"])],
                        [("EY", np.float32, [None, 2, 3])], name="else")
    nodes = [_concat(["A", "B"], "I", 0),
             helper.make_node("If", ["cond"], ["Y"], then_branch=then, else_branch=other)]
    model = make_model(nodes, _inputs() + [("cond", TensorProto.BOOL, [])],
                       [("Y", np.float32, [None, 2, 3])])
    out, _ = run_passes(model, ["merge_concat"])
    assert ops(out) == ["If"]
    then_out = [g for g in all_graphs(out.graph) if g.name == "then"][0]
    assert list(then_out.node[0].input) == ["A", "B", "C"]
    feeds = [{**f, "cond": np.array(c)} for f in _feeds((1, 2, 3), (0, 1, 0))
             for c in (True, False)]
    assert_same_outputs(model, out, feeds)


@pytest.mark.zoo
def test_real_model():
    """basic_pitch (tf2onnx): Concats of shape pieces nested on axis 0 become single Concats."""
    (_, base), (_, report) = with_and_without("basic_pitch_nmp", "merge_concat")
    assert report.after.nodes == base.after.nodes - 7
