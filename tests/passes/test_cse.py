"""Tests of passes/cse.py: equal nodes merge (also in subgraphs), nodes that differ in an attribute,
in a subgraph or are random never do, graph outputs keep their names; compared with onnxruntime on
the original model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from onnx import TensorProto, helper

from helpers import (assert_same_outputs, make_branch, make_model, ops, random_models, run_once,
                     run_passes)

PASS = ["cse", "eliminate_dead"]


def test_merges_equal_nodes_and_their_consumers_transitively():
    nodes = [helper.make_node("Relu", ["x"], ["a1"]), helper.make_node("Relu", ["x"], ["a2"]),
             helper.make_node("Mul", ["a1", "W"], ["b1"]), helper.make_node("Mul", ["a2", "W"], ["b2"]),
             helper.make_node("Add", ["b1", "b2"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])],
                       {"W": np.full(3, 2.0, np.float32)})
    out, records = run_passes(model, PASS)
    assert ops(out) == ["Relu", "Mul", "Add"]
    assert sum(r.stats.get("rewritten", 0) for r in records) == 2
    assert_same_outputs(model, out)


@pytest.mark.parametrize("attrs1, attrs2", [
    ({"perm": [1, 0, 2]}, {"perm": [0, 2, 1]}),
    ({"axis": 0}, {"axis": 1}),
])
def test_nodes_differing_in_one_attribute_are_not_merged(attrs1, attrs2):
    op = "Transpose" if "perm" in attrs1 else "Softmax"
    nodes = [helper.make_node(op, ["x"], ["a"], **attrs1), helper.make_node(op, ["x"], ["b"], **attrs2)]
    shape = [2, 2, 2]
    model = make_model(nodes, [("x", np.float32, shape)], [("a", np.float32, shape),
                                                           ("b", np.float32, shape)])
    out, result = run_once(model, "cse")
    assert not result.modified
    assert len(out.graph.node) == 2
    assert_same_outputs(model, out)


def test_nodes_differing_in_a_default_attribute_spelled_out_are_not_merged_wrongly():
    # Cast to different types: same op, same input
    nodes = [helper.make_node("Cast", ["x"], ["a"], to=TensorProto.INT32),
             helper.make_node("Cast", ["x"], ["b"], to=TensorProto.INT64)]
    model = make_model(nodes, [("x", np.float32, [3])], [("a", np.int32, [3]), ("b", np.int64, [3])])
    out, result = run_once(model, "cse")
    assert not result.modified
    assert_same_outputs(model, out)


def test_nodes_with_inputs_in_another_order_are_not_merged():
    nodes = [helper.make_node("Sub", ["x", "z"], ["a"]), helper.make_node("Sub", ["z", "x"], ["b"])]
    model = make_model(nodes, [("x", np.float32, [3]), ("z", np.float32, [3])],
                       [("a", np.float32, [3]), ("b", np.float32, [3])])
    assert not run_once(model, "cse")[1].modified


def _if_node(out, then_op, else_op):
    then_g = make_branch([helper.make_node(then_op, ["x"], [out + "_t"])], [(out + "_t", np.float32, [3])])
    else_g = make_branch([helper.make_node(else_op, ["x"], [out + "_e"])], [(out + "_e", np.float32, [3])])
    return helper.make_node("If", ["cond"], [out], then_branch=then_g, else_branch=else_g)


def test_if_nodes_whose_branches_differ_are_not_merged():
    nodes = [_if_node("a", "Relu", "Neg"), _if_node("b", "Relu", "Abs"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [3]), ("cond", np.bool_, [])], [("y", np.float32, [3])])
    out, result = run_once(model, "cse")
    assert not result.modified
    assert ops(out).count("If") == 2
    x = np.array([-1, 0, 2], np.float32)
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])


def test_merges_equal_nodes_inside_a_subgraph():
    then_g = make_branch([helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Relu", ["x"], ["r2"]),
                          helper.make_node("Add", ["r1", "r2"], ["t_out"])], [("t_out", np.float32, [3])])
    else_g = make_branch([helper.make_node("Neg", ["x"], ["e_out"])], [("e_out", np.float32, [3])])
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [("x", np.float32, [3]), ("cond", np.bool_, [])], [("y", np.float32, [3])])
    out, records = run_passes(model, PASS)
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert ops(branches["then_branch"]) == ["Relu", "Add"]
    x = np.array([-1, 0, 2], np.float32)
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])


def test_merge_rewires_consumers_inside_a_subgraph():
    then_g = make_branch([helper.make_node("Neg", ["r2"], ["t_out"])], [("t_out", np.float32, [3])])
    else_g = make_branch([helper.make_node("Abs", ["r1"], ["e_out"])], [("e_out", np.float32, [3])])
    nodes = [helper.make_node("Relu", ["x"], ["r1"]), helper.make_node("Relu", ["x"], ["r2"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", np.float32, [3]), ("cond", np.bool_, [])], [("y", np.float32, [3])])
    out, _ = run_passes(model, PASS)
    assert ops(out) == ["Relu", "If"]
    x = np.array([-1, 0, 2], np.float32)
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])


def test_equal_nodes_producing_graph_outputs_keep_their_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Relu", ["x"], ["c"]), helper.make_node("Neg", ["c"], ["z"])]
    model = make_model(nodes, [("x", np.float32, [3])],
                       [("a", np.float32, [3]), ("b", np.float32, [3]), ("z", np.float32, [3])])
    out, _ = run_passes(model, PASS)
    assert [o.name for o in out.graph.output] == ["a", "b", "z"]
    assert ops(out).count("Relu") == 2  # c merged into a (or b); a and b both stay
    assert_same_outputs(model, out)


def test_merged_node_listed_twice_as_graph_output():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
             helper.make_node("Neg", ["b"], ["z"])]
    model = make_model(nodes, [("x", np.float32, [3])],
                       [("a", np.float32, [3]), ("z", np.float32, [3]), ("a", np.float32, [3])],
                       check=False)
    out, _ = run_passes(model, PASS)
    assert [o.name for o in out.graph.output] == ["a", "z", "a"]
    assert ops(out) == ["Relu", "Neg"]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("op", ["RandomUniformLike", "RandomNormalLike", "Bernoulli"])
def test_random_nodes_are_never_merged(op):
    nodes = [helper.make_node(op, ["x"], ["r1"]), helper.make_node(op, ["x"], ["r2"]),
             helper.make_node("Sub", ["r1", "r2"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])])
    out, result = run_once(model, "cse")
    assert not result.modified
    assert ops(out).count(op) == 2


@settings(max_examples=20, deadline=None)
@given(random_models())
def test_generated_graphs_through_cse_match_the_original(model):
    out, _ = run_passes(model, PASS)
    assert_same_outputs(model, out)
