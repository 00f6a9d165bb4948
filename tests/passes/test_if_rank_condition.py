"""Tests of passes/if_rank_condition.py: ``Equal(Size(Shape(y)), k)``, ``y`` an If output whose
branches have ranks 2 (then, ``Squeeze``) and 3 (else, ``Identity``), becomes the If's condition,
its negation or false; it stays when a rank is unknown, the ranks are equal, its output is a
graph output, or the condition's shape differs for a reader that is no If. Every model is checked
with the ONNX checker (full check) and compared with the original on onnxruntime with each branch
taken."""

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
    with_and_without,
)
from onnx import TensorProto, helper

from onnxopt.passes import LOSSLESS_PIPELINE

PASS = ["if_rank_condition"]
X = ("x", np.float32, [2, 3, 1])
C = ("c", np.bool_, [])
AXES = {"minus_one": np.array([-1], np.int64)}


def _y(x: str = "x", then_op: str = "Squeeze", cond: str = "c") -> onnx.NodeProto:
    """``y = If(cond)``: then ``then_op(x, [-1])`` (or ``then_op(x)``), else ``Identity(x)``;
    the branch outputs declare no shape, so the ranks come from the ops."""
    then_inputs = [x, "minus_one"] if then_op == "Squeeze" else [x]
    then = make_branch([helper.make_node(then_op, then_inputs, ["y_t"])],
                       [("y_t", np.float32, None)], name="y_then")
    other = make_branch([helper.make_node("Identity", [x], ["y_e"])],
                        [("y_e", np.float32, None)], name="y_else")
    return helper.make_node("If", [cond], ["y"], then_branch=then, else_branch=other)


def _rank_test(k, swap: bool = False, shape_attrs: dict | None = None) -> tuple[list, dict]:
    """Nodes computing ``e = Equal(Size(Shape(y)), k)`` (``swap``: ``Equal(k, ...)``) and the
    initializer ``k``."""
    k = np.asarray(k, np.int64)
    pair = ["k", "n"] if swap else ["n", "k"]
    return [helper.make_node("Shape", ["y"], ["s"], **(shape_attrs or {})),
            helper.make_node("Size", ["s"], ["n"]),
            helper.make_node("Equal", pair, ["e"])], {"k": k}


def _choose(cond: str = "e", out: str = "z") -> onnx.NodeProto:
    """``out = If(cond)``: then ``ReduceSum(y)``, else ``ReduceMax(y)`` (scalars: a graph
    output needs a shape)."""
    then = make_branch([helper.make_node("ReduceSum", ["y"], [f"{out}_t"], keepdims=0)],
                       [(f"{out}_t", np.float32, [])], name=f"{out}_then")
    other = make_branch([helper.make_node("ReduceMax", ["y"], [f"{out}_e"], keepdims=0)],
                        [(f"{out}_e", np.float32, [])], name=f"{out}_else")
    return helper.make_node("If", [cond], [out], then_branch=then, else_branch=other)


def _model(k=2, swap=False, shape_attrs=None, inputs=(X, C)) -> onnx.ModelProto:
    """``z = If(Equal(Size(Shape(y)), k))[ReduceSum(y)][ReduceMax(y)]``."""
    test, inits = _rank_test(k, swap, shape_attrs)
    return make_model([_y()] + test + [_choose()], list(inputs), [("z", np.float32, [])],
                      {**AXES, **inits})


def _feeds(**extra):
    x = np.random.default_rng(0).normal(size=[2, 3, 1]).astype(np.float32)
    return [{"x": x, "c": np.array(v), **extra} for v in (True, False)]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _total(model: onnx.ModelProto) -> int:
    return sum(len(g.node) for g in all_graphs(model.graph))


def _check(model, names=PASS, feeds=None):
    out, records = run_passes(model, names)
    assert_same_outputs(model, out, feeds or _feeds())
    return out, records


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("k", [2, [2]])
def test_then_rank_test_becomes_the_condition(k, swap):
    out, records = _check(_model(k, swap))
    assert _ops(out) == ["If", "If"]
    assert out.graph.node[1].input[0] == "c"
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"condition": 1}},
                                          {"rewritten": 0}]


def test_else_rank_test_becomes_the_negated_condition():
    """``rank(y) == 3`` holds when ``c`` is false: ``Not(c)``. In the default pipeline
    fold_not_into_if folds it into the If reading it, which fuse_if then fuses with ``y``'s."""
    model = _model(3)
    out, records = _check(model)
    assert _ops(out) == ["If", "Not", "If"]
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"negated condition": 1}},
                                          {"rewritten": 0}]
    full, _ = _check(model, LOSSLESS_PIPELINE)
    assert _ops(full) == ["If"]
    assert _total(full) <= _total(model) - 4


def test_rank_no_branch_has_becomes_false():
    """``rank(y) == 4`` never holds: false, and the If it chose is inlined in the pipeline."""
    model = _model([4])
    out, records = _check(model)
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"constant": 1}},
                                          {"rewritten": 0}]
    assert _total(out) == _total(model) - 3
    full, _ = _check(model, LOSSLESS_PIPELINE)
    assert _ops(full) == ["If", "ReduceMax"]


def test_shape_slice_length():
    """``Shape(y, start=1)`` has 1 element in the then branch (rank 2) and 2 in the else."""
    out, records = _check(_model(1, shape_attrs={"start": 1}))
    assert records[0].stats == {"rewritten": 1, "by_kind": {"condition": 1}}
    assert _ops(out) == ["If", "If"]


def _also_cast(cond: tuple) -> onnx.ModelProto:
    """``_model(2)`` with ``e`` (shape []) also cast to float, an output; ``cond`` is ``c``."""
    test, inits = _rank_test(2)
    cast = helper.make_node("Cast", ["e"], ["f"], to=TensorProto.FLOAT)
    return make_model([_y()] + test + [_choose(), cast], [X, cond],
                      [("z", np.float32, []), ("f", np.float32, [])], {**AXES, **inits})


def test_reader_that_is_no_if_gets_the_condition_when_the_shapes_match():
    """``c`` has shape [] as ``e`` has: it replaces ``e`` for the Cast too."""
    out, _ = _check(_also_cast(C))
    assert sorted(_ops(out)) == ["Cast", "If", "If"]
    assert [n.input[0] for n in out.graph.node if n.op_type == "Cast"] == ["c"]


def _refused(model, reason, feeds=None):
    out, records = _check(model, feeds=feeds)
    assert records[0].stats == {"rewritten": 0, "refused": {reason: 1}}
    assert _total(out) == _total(model)


def test_reader_that_is_no_if_and_a_condition_of_another_shape_is_refused():
    """``c`` has shape [1], ``e`` shape []: a Cast reading ``e`` would change its output shape."""
    feeds = [dict(f, c=f["c"].reshape(1)) for f in _feeds()]
    _refused(_also_cast(("c", np.bool_, [1])), "condition shape differs", feeds)


def test_unknown_rank_is_refused():
    """``x = Reshape(x0, shape)`` with ``shape`` a graph input of unknown length: no branch
    output has a known rank."""
    test, inits = _rank_test(2)
    model = make_model([helper.make_node("Reshape", ["x0", "shape"], ["x"]), _y()] + test
                       + [_choose()], [("x0", np.float32, [6]), ("shape", np.int64, [None]), C],
                       [("z", np.float32, [])], {**AXES, **inits})
    feeds = [{"x0": f["x"].reshape(6), "shape": np.array([2, 3, 1]), "c": f["c"]}
             for f in _feeds()]
    _refused(model, "branch rank unknown", feeds)


def test_equal_ranks_are_refused():
    """then ``Neg(x)``: both branches have rank 3, the test does not depend on ``c``."""
    test, inits = _rank_test(3)
    model = make_model([_y(then_op="Neg")] + test + [_choose()], [X, C],
                       [("z", np.float32, [])], {**AXES, **inits})
    _refused(model, "ranks equal")


def test_equal_output_that_is_a_graph_output_is_refused():
    test, inits = _rank_test(2)
    model = make_model([_y()] + test + [_choose()], [X, C],
                       [("z", np.float32, []), ("e", np.bool_, [])], {**AXES, **inits})
    _refused(model, "equal output is a graph output")


def test_shape_with_another_reader_stays():
    test, inits = _rank_test(2)
    model = make_model([_y()] + test + [_choose()], [X, C],
                       [("z", np.float32, []), ("s", np.int64, [None])], {**AXES, **inits})
    out, records = _check(model)
    assert _ops(out) == ["If", "Shape", "If"]
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"condition": 1}},
                                          {"rewritten": 0}]


def test_rank_test_inside_a_branch():
    """The test sits in a branch of an If on ``d`` and reads ``y`` from the outer scope."""
    test, inits = _rank_test(2)
    then = make_branch(test + [_choose()], [("z", np.float32, [])], inits, name="outer_then")
    other = make_branch([helper.make_node("ReduceMin", ["x"], ["w"], keepdims=0)],
                        [("w", np.float32, [])], name="outer_else")
    model = make_model([_y(), helper.make_node("If", ["d"], ["o"], then_branch=then,
                                               else_branch=other)],
                       [X, C, ("d", np.bool_, [])], [("o", np.float32, [])], AXES)
    feeds = [dict(f, d=np.array(d)) for f in _feeds() for d in (True, False)]
    out, records = _check(model, feeds=feeds)
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"condition": 1}},
                                          {"rewritten": 0}]
    assert _total(out) == _total(model) - 3


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["silero_vad_16k_op15", "silero_vad_half"])
def test_real_models(name):
    """torch's LSTM wrapper tests ``rank(y) == 2`` for the If that squeezed its input or not:
    Shape, Size and Equal go, and the three Ifs on the test join that If (fuse_if)."""
    (_, base), (_, report) = with_and_without(name, "if_rank_condition", verify_each=True)
    assert report.after.nodes == base.after.nodes - 4
    assert report.after.nodes_total == base.after.nodes_total - 5
    stats = [r.stats for r in report.passes if r.name == "if_rank_condition" and r.modified]
    assert stats == [{"rewritten": 1, "by_kind": {"condition": 1}}]
