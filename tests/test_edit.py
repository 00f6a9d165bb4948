"""Tests of optimizer/edit.py: bypassing a node keeps a graph output's name, well-formed If
branches, disconnected nodes swept."""

from __future__ import annotations

import numpy as np
from onnx import helper

from helpers import assert_same_outputs, make_branch, make_model
from onnxopt.edit import bypass, drop_disconnected, if_branches
from onnxopt.graph import export_graph, import_graph


def test_bypass_of_a_node_writing_a_graph_output_renames_the_producer():
    model = make_model([helper.make_node("Relu", ["x"], ["r"]),
                        helper.make_node("Identity", ["r"], ["y"])],
                       [("x", np.float32, [3])], [("y", np.float32, [3])])
    graph = import_graph(model)
    relu, identity = graph.nodes
    assert bypass(graph, identity, identity.inputs[0], identity.outputs[0])
    assert drop_disconnected(graph) == 1
    out = export_graph(graph, model)
    assert [n.op_type for n in out.graph.node] == ["Relu"] and out.graph.node[0].output == ["y"]
    assert_same_outputs(model, out)


def test_bypass_refuses_when_the_kept_tensor_is_a_graph_input():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])],
                       [("x", np.float32, [3])], [("y", np.float32, [3])])
    graph = import_graph(model)
    node = graph.nodes[0]
    assert not bypass(graph, node, node.inputs[0], node.outputs[0])
    assert node.outputs  # untouched


def test_if_branches_only_when_well_formed():
    then = make_branch([helper.make_node("Neg", ["x"], ["t"])], [("t", np.float32, [2])])
    other = make_branch([helper.make_node("Abs", ["x"], ["e"])], [("e", np.float32, [2])],
                        name="else")
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                       [("x", np.float32, [2]), ("c", np.bool_, [])], [("y", np.float32, [2])])
    node = import_graph(model).nodes[0]
    branches = if_branches(node)
    assert branches is not None and [b.nodes[0].op for b in branches] == ["Neg", "Abs"]
    node.outputs.append(node.outputs[0])  # now the branches have too few outputs
    assert if_branches(node) is None
