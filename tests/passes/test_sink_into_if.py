"""Tests of passes/sink_into_if.py: a shape op or Cast reading an If output moves into both
branches when it merges there with the node computing the branch output (Identity, a
Squeeze/Unsqueeze pair that cancels, ops the merge passes fold, a nested If), and stays
otherwise. Every model is checked with the ONNX checker (full check) and compared with the
original on onnxruntime with each branch taken; through the default pipeline the main graph
shrinks and the total node count (subgraphs included) never grows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    all_graphs,
    assert_same_outputs,
    make_branch,
    make_model,
    run_passes,
    zoo_files,
)
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

PASS = ["sink_into_if"]
X = ("x", np.float32, [2, 3])
C = ("c", np.bool_, [])
W = ("w", np.float32, [1, 2, 3])
X3 = ("x3", np.float32, [2, 3, 1])
AXES = {"zero": np.array([0], np.int64), "one": np.array([1], np.int64),
        "minus_one": np.array([-1], np.int64)}


def _total(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in all_graphs(model.graph))


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def _branch_ops(model: onnx.ModelProto, node: int = 0) -> tuple[list[str], list[str]]:
    attrs = {a.name: a.g for a in model.graph.node[node].attribute}
    return _ops(attrs["then_branch"]), _ops(attrs["else_branch"])


def _if(then_nodes, else_nodes, out_shape=None, cond="c", out="o", dtype=np.float32):
    then = make_branch(then_nodes, [(then_nodes[-1].output[0], dtype, out_shape)], name=f"{out}_t")
    other = make_branch(else_nodes, [(else_nodes[-1].output[0], dtype, out_shape)],
                        name=f"{out}_e")
    return helper.make_node("If", [cond], [out], then_branch=then, else_branch=other)


def _feeds(extra: dict | None = None, **conds):
    rng = np.random.default_rng(0)
    x = rng.normal(size=[2, 3]).astype(np.float32)
    w = rng.normal(size=[1, 2, 3]).astype(np.float32)
    names = list(conds) or ["c"]
    feeds = []
    for bits in range(2 ** len(names)):
        feed = {"x": x, "w": w, "x3": x.reshape(2, 3, 1), **(extra or {})}
        for i, name in enumerate(names):
            feed[name] = np.array(bool(bits >> i & 1))
        feeds.append(feed)
    return feeds


def _unsqueeze_model(then_nodes, else_nodes, axes="zero", out_shape=(1, 2, 3)):
    """``y = Relu(Unsqueeze(If(c)[then][else], axes))``."""
    return make_model([_if(then_nodes, else_nodes),
                       helper.make_node("Unsqueeze", ["o", axes], ["u"]),
                       helper.make_node("Relu", ["u"], ["y"])],
                      [X, C], [("y", np.float32, list(out_shape))], AXES)


def _check(model, names=PASS, feeds=None):
    out, records = run_passes(model, names)
    assert_same_outputs(model, out, feeds or _feeds())
    return out, records


def test_identity_in_one_branch_and_unsqueeze_in_the_other():
    """The silero-vad pattern: then ``Unsqueeze(x, [0])``, else ``Identity(x)``, then
    ``Unsqueeze(o, [0])``: one Unsqueeze per branch in the end."""
    model = make_model([_if([helper.make_node("Unsqueeze", ["x", "zero"], ["t"])],
                            [helper.make_node("Identity", ["w"], ["e"])]),
                        helper.make_node("Unsqueeze", ["o", "zero"], ["u"]),
                        helper.make_node("Relu", ["u"], ["y"])],
                       [X, C, W], [("y", np.float32, [1, 1, 2, 3])], AXES)
    out, records = _check(model)
    assert _ops(out.graph) == ["If", "Relu"]
    assert _branch_ops(out) == (["Unsqueeze", "Unsqueeze"], ["Unsqueeze"])
    assert records[0].stats["branch_nodes"] == {"appended": 1, "replaced": 1}
    full, _ = _check(model, LOSSLESS_PIPELINE)
    assert _ops(full.graph) == ["If", "Relu"]
    assert _branch_ops(full) == (["Unsqueeze"], ["Unsqueeze"])
    assert _total(full) == _total(model) - 1


def test_sunk_op_writing_a_graph_output_keeps_its_name():
    model = make_model([_if([helper.make_node("Neg", ["x"], ["t0"]),
                             helper.make_node("Identity", ["t0"], ["t"])],
                            [helper.make_node("Identity", ["x"], ["e"])]),
                        helper.make_node("Unsqueeze", ["o", "one"], ["y"])],
                       [X, C], [("y", np.float32, [2, 1, 3])], AXES)
    out, _ = _check(model, LOSSLESS_PIPELINE)
    assert _ops(out.graph) == ["If"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert list(out.graph.node[0].output) == ["y"]
    assert _total(out) < _total(model)


@pytest.mark.parametrize("first, second", [("Squeeze", "Unsqueeze"), ("Unsqueeze", "Squeeze")])
def test_squeeze_unsqueeze_pair_with_the_same_axes_cancels(first, second):
    """then ``first(v, [-1])``, else ``Identity(w)``; ``second(o, [-1])`` after the If."""
    v, w = (("x3", [2, 3, 1]), ("x", [2, 3])) if first == "Squeeze" else (("x", [2, 3]),
                                                                          ("x3", [2, 3, 1]))
    model = make_model([_if([helper.make_node(first, [v[0], "minus_one"], ["t"])],
                            [helper.make_node("Identity", [w[0]], ["e"])]),
                        helper.make_node(second, ["o", "minus_one"], ["u"]),
                        helper.make_node("Relu", ["u"], ["y"])],
                       [X, C, X3], [("y", np.float32, [2, 3, 1] if first == "Squeeze" else [2, 3])],
                       AXES)
    out, records = _check(model)
    assert _branch_ops(out) == (["Identity"], [second])
    assert records[0].stats["branch_nodes"] == {"cancelled": 1, "replaced": 1}
    full, _ = _check(model, LOSSLESS_PIPELINE)
    assert _ops(full.graph) == ["If", "Relu"]
    assert _total(full) == _total(model) - 1


def test_nested_if():
    """o = If(c)[If(d)[Unsqueeze(x, [0])][Identity(w)]][Identity(w)]; Unsqueeze(o, [0]) moves
    into all three leaves."""
    inner = _if([helper.make_node("Unsqueeze", ["x", "zero"], ["it"])],
                [helper.make_node("Identity", ["w"], ["ie"])], cond="d", out="inner")
    then = make_branch([inner], [("inner", np.float32, [1, 2, 3])], name="outer_t")
    other = make_branch([helper.make_node("Identity", ["w"], ["e"])],
                        [("e", np.float32, [1, 2, 3])], name="outer_e")
    model = make_model([helper.make_node("If", ["c"], ["o"], then_branch=then, else_branch=other),
                        helper.make_node("Unsqueeze", ["o", "zero"], ["u"]),
                        helper.make_node("Relu", ["u"], ["y"])],
                       [X, C, W, ("d", np.bool_, [])], [("y", np.float32, [1, 1, 2, 3])], AXES)
    feeds = _feeds(c=True, d=True)
    out, records = _check(model, feeds=feeds)
    assert _ops(out.graph) == ["If", "Relu"]
    assert records[0].stats["branch_nodes"] == {"appended": 1, "nested": 1, "replaced": 2}
    full, _ = _check(model, LOSSLESS_PIPELINE, feeds)
    assert _total(full) == _total(model) - 1


def test_transpose_reshape_flatten_and_cast():
    """Four outputs of one If, each read by another op: Transpose after Transpose, Reshape
    after Flatten, Cast after Identity, Flatten after Identity."""
    then = make_branch([helper.make_node("Transpose", ["x"], ["t0"], perm=[1, 0]),
                        helper.make_node("Flatten", ["x"], ["t1"], axis=0),
                        helper.make_node("Identity", ["x"], ["t2"]),
                        helper.make_node("Identity", ["x"], ["t3"])],
                       [("t0", np.float32, [3, 2]), ("t1", np.float32, [1, 6]),
                        ("t2", np.float32, [2, 3]), ("t3", np.float32, [2, 3])], name="t")
    other = make_branch([helper.make_node("Identity", ["x"], ["e0"]),
                         helper.make_node("Reshape", ["x", "s16"], ["e1"]),
                         helper.make_node("Neg", ["x"], ["n2"]),
                         helper.make_node("Identity", ["n2"], ["e2"]),
                         helper.make_node("Identity", ["n2"], ["e3"])],
                        [("e0", np.float32, [2, 3]), ("e1", np.float32, [1, 6]),
                         ("e2", np.float32, [2, 3]), ("e3", np.float32, [2, 3])], name="e")
    model = make_model(
        [helper.make_node("If", ["c"], ["o0", "o1", "o2", "o3"], then_branch=then,
                          else_branch=other),
         helper.make_node("Transpose", ["o0"], ["y0"], perm=[1, 0]),
         helper.make_node("Reshape", ["o1", "s32"], ["y1"]),
         helper.make_node("Cast", ["o2"], ["y2"], to=TensorProto.INT32),
         helper.make_node("Flatten", ["o3"], ["y3"], axis=1)],
        [X, C], [("y0", np.float32, [2, 3]), ("y1", np.float32, [3, 2]),
                 ("y2", np.int32, [2, 3]), ("y3", np.float32, [2, 3])],
        {"s16": np.array([1, 6], np.int64), "s32": np.array([3, 2], np.int64)})
    out, records = _check(model)
    assert _ops(out.graph) == ["If"]
    assert records[0].stats["rewritten"] == 4
    full, _ = _check(model, LOSSLESS_PIPELINE)
    assert _ops(full.graph) == ["If"]
    assert _total(full) <= _total(model) - 4


def _refused(model, reason, feeds=None):
    out, records = _check(model, feeds=feeds)
    assert records[0].stats == {"rewritten": 0, "branch_nodes": {}, "refused": {reason: 1}}
    assert _total(out) == _total(model)
    full, _ = _check(model, LOSSLESS_PIPELINE, feeds)
    assert _total(full) <= _total(model)


def test_if_output_with_two_readers_is_refused():
    model = make_model([_if([helper.make_node("Unsqueeze", ["x", "zero"], ["t"])],
                            [helper.make_node("Identity", ["w"], ["e"])]),
                        helper.make_node("Unsqueeze", ["o", "zero"], ["u"]),
                        helper.make_node("Relu", ["o"], ["r"])],
                       [X, C, W], [("u", np.float32, [1, 1, 2, 3]), ("r", np.float32, [1, 2, 3])],
                       AXES)
    _refused(model, "if output has several readers")


def test_op_whose_second_input_is_not_constant_is_refused():
    model = make_model([_if([helper.make_node("Flatten", ["x"], ["t"], axis=0)],
                            [helper.make_node("Identity", ["x"], ["e"])]),
                        helper.make_node("Reshape", ["o", "shape"], ["y"])],
                       [X, C, ("shape", np.int64, [2])], [("y", np.float32, [3, 2])])
    feeds = [dict(f, shape=np.array([3, 2], np.int64)) for f in _feeds()]
    _refused(model, "other input not an initializer", feeds)


def test_if_output_that_is_a_graph_output_is_refused():
    model = make_model([_if([helper.make_node("Identity", ["x"], ["t"])],
                            [helper.make_node("Identity", ["x"], ["e"])]),
                        helper.make_node("Unsqueeze", ["o", "zero"], ["u"])],
                       [X, C], [("o", np.float32, [2, 3]), ("u", np.float32, [1, 2, 3])], AXES)
    _refused(model, "if output is a graph output")


def test_branch_node_that_does_not_merge_is_refused():
    model = _unsqueeze_model([helper.make_node("Relu", ["x"], ["t"])],
                             [helper.make_node("Identity", ["x"], ["e"])])
    _refused(model, "branch output from Relu does not merge with Unsqueeze")


def test_unsqueezes_with_negative_axes_are_refused():
    """merge_reshape needs the rank to merge negative axes: not guaranteed to merge."""
    model = make_model([_if([helper.make_node("Unsqueeze", ["x", "minus_one"], ["t"])],
                            [helper.make_node("Identity", ["x3"], ["e"])]),
                        helper.make_node("Unsqueeze", ["o", "minus_one"], ["u"]),
                        helper.make_node("Relu", ["u"], ["y"])],
                       [X, C, X3], [("y", np.float32, [2, 3, 1, 1])], AXES)
    _refused(model, "branch output from Unsqueeze does not merge with Unsqueeze")


def test_branch_output_also_read_in_the_branch_is_refused():
    then = make_branch([helper.make_node("Identity", ["x"], ["t"]),
                        helper.make_node("Neg", ["t"], ["t2"])],
                       [("t", np.float32, [2, 3]), ("t2", np.float32, [2, 3])], name="t")
    other = make_branch([helper.make_node("Identity", ["x"], ["e"]),
                         helper.make_node("Abs", ["x"], ["e2"])],
                        [("e", np.float32, [2, 3]), ("e2", np.float32, [2, 3])], name="e")
    model = make_model([helper.make_node("If", ["c"], ["o", "o2"], then_branch=then,
                                         else_branch=other),
                        helper.make_node("Unsqueeze", ["o", "zero"], ["y"])],
                       [X, C], [("y", np.float32, [1, 2, 3]), ("o2", np.float32, [2, 3])], AXES)
    _refused(model, "branch output also read in the branch")


def test_branch_output_that_is_an_initializer_is_refused():
    """Sinking would need a new node in that branch."""
    then = make_branch([], [("k", np.float32, [2, 3])], {"k": np.ones([2, 3], np.float32)},
                       name="t")
    other = make_branch([helper.make_node("Identity", ["x"], ["e"])],
                        [("e", np.float32, [2, 3])], name="e")
    model = make_model([helper.make_node("If", ["c"], ["o"], then_branch=then, else_branch=other),
                        helper.make_node("Unsqueeze", ["o", "zero"], ["u"]),
                        helper.make_node("Relu", ["u"], ["y"])],
                       [X, C], [("y", np.float32, [1, 2, 3])], AXES)
    _refused(model, "branch output not computed in the branch")


def test_branch_output_bound_twice_is_refused():
    """Compared with the else branch taken only: onnxruntime (1.32, optimizations off) returns
    zeros for the first of two If outputs bound to one then-branch tensor, before and after."""
    then = make_branch([helper.make_node("Identity", ["x"], ["t"])],
                       [("t", np.float32, [2, 3]), ("t", np.float32, [2, 3])], name="t")
    other = make_branch([helper.make_node("Identity", ["x"], ["e"]),
                         helper.make_node("Neg", ["x"], ["e2"])],
                        [("e", np.float32, [2, 3]), ("e2", np.float32, [2, 3])], name="e")
    model = make_model([helper.make_node("If", ["c"], ["o", "o2"], then_branch=then,
                                         else_branch=other),
                        helper.make_node("Unsqueeze", ["o", "zero"], ["y"])],
                       [X, C], [("y", np.float32, [1, 2, 3]), ("o2", np.float32, [2, 3])], AXES)
    _refused(model, "branch output bound twice", _feeds()[:1])


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["silero_vad_16k_op15", "silero_vad_half"])
def test_real_models(name):
    """silero-vad's LSTM input and state ``Unsqueeze(If(...), [0])`` (three, now outputs of one
    fused If) and the new state's ``Unsqueeze(If(...)[1], [0])`` move into the Ifs: four
    main-graph nodes fewer, three in total (without this pass, once fuse_if has put the If
    squeezing the LSTM input in the same branches, remove_identity drops a branch Identity that
    this pass turns into an Unsqueeze)."""
    onnx_file, npz_file = zoo_files(name)
    _, base = optimize(onnx_file, passes=[p for p in LOSSLESS_PIPELINE if p != "sink_into_if"],
                       inputs=npz_file)
    _, report = optimize(onnx_file, passes=LOSSLESS_PIPELINE, inputs=npz_file, verify_each=True)
    assert report.validation.passed
    assert report.after.nodes == base.after.nodes - 4
    assert report.after.nodes_total == base.after.nodes_total - 3
