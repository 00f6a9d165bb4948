"""Tests of optimizer/analyses/usedef.py: owner graphs of nodes and the interface of each scope;
and of onnxopt.edit.input_slots, the reads it leaves to onnx-graphsurgeon's links (each once)."""

from __future__ import annotations

import numpy as np
from onnx import helper

from helpers import make_branch, make_model
from onnxopt.analyses import UseDef
from onnxopt.edit import input_slots
from onnxopt.graph import import_graph


def test_owner_outputs_and_readers_across_scopes():
    then = make_branch([helper.make_node("Neg", ["x"], ["t"])], [("t", np.float32, [2])])
    other = make_branch([helper.make_node("Abs", ["x"], ["e"])], [("e", np.float32, [2])],
                        name="else")
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Relu", ["x"], ["r"])]
    model = make_model(nodes, [("x", np.float32, [2]), ("c", np.bool_, [])],
                       [("y", np.float32, [2]), ("r", np.float32, [2])])
    graph = import_graph(model)
    usedef = UseDef(graph)
    assert len(usedef.scopes) == 3
    if_node, relu = graph.nodes
    neg = usedef.scopes[1].nodes[0]
    assert usedef.owner(relu) is graph and usedef.owner(neg) is usedef.scopes[1]
    assert usedef.is_output(relu.outputs[0], graph)
    assert usedef.is_output(neg.outputs[0]) and not usedef.is_output(neg.outputs[0], graph)
    x = graph.inputs[0]
    assert usedef.on_boundary(x)
    # x is read by the Relu and, from the outer scope, by both branches
    assert sorted(n.op for n, _ in input_slots(x)) == ["Abs", "Neg", "Relu"]


def test_readers_list_each_read_once():
    """A node reading a tensor at two inputs is one reader per input, not per link."""
    model = make_model([helper.make_node("Mul", ["x", "x"], ["y"]),
                        helper.make_node("Relu", ["x"], ["r"])],
                       [("x", np.float32, [2])],
                       [("y", np.float32, [2]), ("r", np.float32, [2])])
    graph = import_graph(model)
    assert [(n.op, i) for n, i in input_slots(graph.inputs[0])] == [("Mul", 0), ("Mul", 1),
                                                                 ("Relu", 0)]
