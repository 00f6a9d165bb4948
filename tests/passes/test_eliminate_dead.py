"""Tests of passes/eliminate_dead.py: dead nodes and initializers go, graph inputs and whatever a
subgraph reads from an outer scope stay; compared with onnxruntime on the original model."""

from __future__ import annotations

import numpy as np
from onnx import helper

from helpers import (all_initializers, assert_same_outputs, initializers, make_branch, make_model,
                     ops, run_once, run_passes)


def test_removes_dead_nodes_and_initializers_keeps_unused_inputs():
    nodes = [helper.make_node("Relu", ["x"], ["y"]),
             helper.make_node("Add", ["x", "W"], ["dead1"]),
             helper.make_node("Neg", ["dead1"], ["dead2"]),
             helper.make_node("Mul", ["unused", "V"], ["dead3"])]
    model = make_model(nodes, [("x", np.float32, [3]), ("unused", np.float32, [3])],
                       [("y", np.float32, [3])],
                       {"W": np.ones(3, np.float32), "V": np.ones(3, np.float32),
                        "orphan": np.zeros(2, np.float32)})
    out, result = run_once(model, "eliminate_dead")
    assert ops(out) == ["Relu"]
    assert initializers(out) == {}
    assert [i.name for i in out.graph.input] == ["x", "unused"]
    assert result.modified and result.stats["nodes_removed"] == 3
    assert result.stats["initializers_removed"] == 2
    assert_same_outputs(model, out)


def test_live_graph_is_not_modified():
    model = make_model([helper.make_node("Add", ["x", "W"], ["y"])], [("x", np.float32, [3])],
                       [("y", np.float32, [3])], {"W": np.ones(3, np.float32)})
    out, result = run_once(model, "eliminate_dead")
    assert not result.modified
    assert ops(out) == ["Add"] and list(initializers(out)) == ["W"]


def test_node_read_only_by_a_subgraph_stays():
    then_g = make_branch([helper.make_node("Add", ["h", "B"], ["t_out"])], [("t_out", np.float32, [3])])
    else_g = make_branch([helper.make_node("Neg", ["h"], ["e_out"]),
                          helper.make_node("Abs", ["x"], ["dead_in_branch"])],
                         [("e_out", np.float32, [3])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", np.float32, [3]), ("cond", np.bool_, [])],
                       [("y", np.float32, [3])], {"B": np.full(3, 2.0, np.float32)})
    out, _ = run_passes(model, ["eliminate_dead"])
    assert ops(out) == ["Relu", "If"]
    branches = {a.name: a.g for a in out.graph.node[1].attribute}
    assert ops(branches["else_branch"]) == ["Neg"]  # the dead Abs in the branch is gone
    assert [i.name for i in all_initializers(out)] == ["B"]
    x = np.array([-1, 0, 2], np.float32)
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])


def test_optional_output_unused_keeps_the_node():
    nodes = [helper.make_node("TopK", ["x", "k"], ["values", "indices"])]
    model = make_model(nodes, [("x", np.float32, [5])], [("values", np.float32, [2])],
                       {"k": np.array([2], np.int64)})
    out, _ = run_passes(model, ["eliminate_dead"])
    assert ops(out) == ["TopK"]
    assert_same_outputs(model, out)
