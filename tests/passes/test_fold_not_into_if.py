"""Tests of passes/fold_not_into_if.py: a Not read only by If conditions goes and those Ifs swap
their branches (in the same graph and in a subgraph reading it from an outer scope); a Not whose
output is read by anything else, or is a graph output, stays. Every model is compared with the
original on onnxruntime with the condition true and false."""

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
from onnx import helper

from onnxopt.passes import LOSSLESS_PIPELINE

PASS = ["fold_not_into_if"]
X = ("x", np.float32, [2, 3])
C = ("c", np.bool_, [])


def _if(cond: str, out: str, then_op: str = "Neg", else_op: str = "Relu") -> onnx.NodeProto:
    """``out = If(cond)``: then ``then_op(x)``, else ``else_op(x)``."""
    then = make_branch([helper.make_node(then_op, ["x"], [f"{out}_then"])],
                       [(f"{out}_then", np.float32, [2, 3])], name=f"{out}_then_branch")
    other = make_branch([helper.make_node(else_op, ["x"], [f"{out}_else"])],
                        [(f"{out}_else", np.float32, [2, 3])], name=f"{out}_else_branch")
    return helper.make_node("If", [cond], [out], then_branch=then, else_branch=other)


def _feeds():
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
    return [{"x": x, "c": np.array(v)} for v in (True, False)]


def _count(model: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for g in all_graphs(model.graph) for n in g.node)


def _then_ops(model: onnx.ModelProto) -> list[str]:
    return [attr.g.node[0].op_type for g in all_graphs(model.graph) for n in g.node
            if n.op_type == "If" for attr in n.attribute if attr.name == "then_branch"]


def test_not_read_by_two_ifs_goes_and_both_swap():
    model = make_model([helper.make_node("Not", ["c"], ["nc"]), _if("nc", "y"),
                        _if("nc", "z", "Abs", "Sigmoid")],
                       [X, C], [("y", np.float32, [2, 3]), ("z", np.float32, [2, 3])])
    out, records = run_passes(model, PASS)
    assert _count(out, "Not") == 0
    assert [n.input[0] for n in out.graph.node] == ["c", "c"]
    assert _then_ops(out) == ["Relu", "Sigmoid"]
    assert records[0].stats == {"rewritten": 1, "ifs_swapped": 2}
    assert_same_outputs(model, out, _feeds())


def test_if_in_a_subgraph_reading_the_not_from_the_outer_scope():
    outer_then = make_branch([_if("nc", "inner")], [("inner", np.float32, [2, 3])], name="outer_t")
    outer_else = make_branch([helper.make_node("Identity", ["x"], ["e"])],
                             [("e", np.float32, [2, 3])], name="outer_e")
    model = make_model([helper.make_node("Not", ["c"], ["nc"]),
                        helper.make_node("If", ["d"], ["y"], then_branch=outer_then,
                                         else_branch=outer_else), _if("nc", "z")],
                       [X, C, ("d", np.bool_, [])],
                       [("y", np.float32, [2, 3]), ("z", np.float32, [2, 3])])
    out, _ = run_passes(model, PASS)
    assert _count(out, "Not") == 0
    feeds = [dict(f, d=np.array(d)) for f in _feeds() for d in (True, False)]
    assert_same_outputs(model, out, feeds)


def test_not_inside_a_branch():
    then = make_branch([helper.make_node("Not", ["c"], ["nc"]), _if("nc", "inner")],
                       [("inner", np.float32, [2, 3])], name="outer_t")
    other = make_branch([helper.make_node("Identity", ["x"], ["e"])],
                        [("e", np.float32, [2, 3])], name="outer_e")
    model = make_model([helper.make_node("If", ["d"], ["y"], then_branch=then, else_branch=other)],
                       [X, C, ("d", np.bool_, [])], [("y", np.float32, [2, 3])])
    out, _ = run_passes(model, PASS)
    assert _count(out, "Not") == 0
    feeds = [dict(f, d=np.array(d)) for f in _feeds() for d in (True, False)]
    assert_same_outputs(model, out, feeds)


def test_not_also_read_by_another_node_stays():
    model = make_model([helper.make_node("Not", ["c"], ["nc"]), _if("nc", "y"),
                        helper.make_node("Cast", ["nc"], ["k"], to=onnx.TensorProto.FLOAT),
                        helper.make_node("Mul", ["y", "k"], ["z"])],
                       [X, C], [("z", np.float32, [2, 3])])
    out, records = run_passes(model, PASS)
    assert _count(out, "Not") == 1
    assert _then_ops(out) == ["Neg"]
    assert records[0].stats["refused"] == {"not output read by other than an if condition": 1}
    assert_same_outputs(model, out, _feeds())


def test_not_that_is_a_graph_output_stays():
    model = make_model([helper.make_node("Not", ["c"], ["nc"]), _if("nc", "y")],
                       [X, C], [("y", np.float32, [2, 3]), ("nc", np.bool_, [])])
    out, records = run_passes(model, PASS)
    assert _count(out, "Not") == 1
    assert records[0].stats["refused"] == {"not output is a graph output": 1}
    assert_same_outputs(model, out, _feeds())


def test_through_the_default_pipeline():
    model = make_model([helper.make_node("Not", ["c"], ["nc"]), _if("nc", "y")],
                       [X, C], [("y", np.float32, [2, 3])])
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert [n.op_type for n in out.graph.node] == ["If"]
    assert_same_outputs(model, out, _feeds())


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["silero_vad_16k_op15", "silero_vad_half"])
def test_real_models(name):
    """silero-vad's LSTM wrapper negates ``rank == 2`` for three Ifs: the Not goes, and then
    (only then: the Not reads the test, not an If) if_rank_condition replaces the test by the
    condition of the If that squeezed the LSTM input (Shape, Size, Equal go) and fuse_if joins
    that If and two of the three: five main-graph nodes fewer, six in total (the fused else
    branch loses an Identity)."""
    (_, base), (_, report) = with_and_without(name, "fold_not_into_if", verify_each=True)
    assert report.after.nodes == base.after.nodes - 5
    assert report.after.nodes_total == base.after.nodes_total - 6
    stats = [r.stats for r in report.passes if r.name == "fold_not_into_if" and r.modified]
    assert stats == [{"rewritten": 1, "ifs_swapped": 3}]
