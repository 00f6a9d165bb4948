"""Tests of passes/remove_identity.py: Identity and inference Dropout removal, graph outputs keep
their names, and the cases where the node must stay; compared with onnxruntime on the original."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import assert_same_outputs, make_branch, make_model, ops, run_passes

PASS = ["remove_identity", "eliminate_dead"]


def test_removes_identity_chain_and_inference_dropout():
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Identity", ["b"], ["c"]),
             helper.make_node("Identity", ["c"], ["d"]),
             helper.make_node("Dropout", ["d"], ["e"]),
             helper.make_node("Dropout", ["e", "ratio", "training"], ["f"]),
             helper.make_node("Neg", ["f"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4])],
                       {"ratio": np.array(0.5, np.float32), "training": np.array(False)})
    out, records = run_passes(model, PASS)
    assert ops(out) == ["Relu", "Neg"]
    assert records[0].stats == {"rewritten": 5, "by_kind": {"Dropout": 2, "Identity": 3}}
    assert_same_outputs(model, out)


def test_identity_producing_a_graph_output_keeps_the_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"]),
             helper.make_node("Neg", ["r"], ["z"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4]),
                                                          ("z", np.float32, [4])])
    out, _ = run_passes(model, PASS)
    assert ops(out) == ["Relu", "Neg"]
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert [n.output[0] for n in out.graph.node] == ["y", "z"]
    assert_same_outputs(model, out)


def test_identity_from_graph_input_to_graph_output_stays():
    nodes = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4]),
                                                          ("z", np.float32, [4])])
    out, records = run_passes(model, PASS)
    assert sorted(ops(out)) == ["Identity", "Neg"]
    assert records[0].stats["refused"] == {"graph output name cannot be kept": 1}
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert_same_outputs(model, out)


def test_identity_between_two_graph_outputs_stays():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("a", np.float32, [4]),
                                                          ("b", np.float32, [4])])
    out, records = run_passes(model, PASS)
    assert ops(out) == ["Relu", "Identity"]
    assert records[0].stats["refused"] == {"graph output name cannot be kept": 1}
    assert_same_outputs(model, out)


def test_identity_of_an_initializer_to_a_graph_output_stays():
    model = make_model([helper.make_node("Identity", ["W"], ["y"])], [("x", np.float32, [2])],
                       [("y", np.float32, [2])], {"W": np.ones(2, np.float32)})
    out, _ = run_passes(model, PASS)
    assert ops(out) == ["Identity"]
    assert_same_outputs(model, out)


def test_tensor_listed_twice_as_graph_output_through_identity():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4]),
                                                          ("y", np.float32, [4])], check=False)
    out, _ = run_passes(model, PASS)
    assert [o.name for o in out.graph.output] == ["y", "y"]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("mask_is_output", [False, True])
def test_dropout_with_a_used_mask_stays(mask_is_output):
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]),
             helper.make_node("Relu", ["d"], ["y"])]
    outputs = [("y", np.float32, [4])]
    if mask_is_output:
        outputs.append(("mask", np.bool_, [4]))
    else:
        nodes.append(helper.make_node("Cast", ["mask"], ["m"], to=1))
        outputs.append(("m", np.float32, [4]))
    model = make_model(nodes, [("x", np.float32, [4])], outputs)
    out, records = run_passes(model, PASS)
    assert "Dropout" in ops(out)
    reason = "mask is a graph output" if mask_is_output else "mask is read"
    assert records[0].stats["refused"] == {reason: 1}
    assert_same_outputs(model, out)


def test_dropout_with_unused_mask_is_removed():
    nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"]), helper.make_node("Relu", ["d"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4])])
    out, _ = run_passes(model, PASS)
    assert ops(out) == ["Relu"]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("training", ["constant_true", "input"])
def test_dropout_in_training_mode_stays(training):
    inputs = [("x", np.float32, [4])]
    inits = {"ratio": np.array(0.5, np.float32)}
    if training == "input":
        inputs.append(("training", np.bool_, []))
    else:
        inits["training"] = np.array(True)
    nodes = [helper.make_node("Dropout", ["x", "ratio", "training"], ["d"]),
             helper.make_node("Relu", ["d"], ["y"])]
    model = make_model(nodes, inputs, [("y", np.float32, [4])], inits)
    out, records = run_passes(model, PASS)
    assert ops(out) == ["Dropout", "Relu"]
    assert records[0].stats["refused"] == {"training mode may be on": 1}


def test_identity_in_a_branch_reading_an_outer_tensor_to_the_branch_output_stays_valid():
    then_g = make_branch([helper.make_node("Identity", ["h"], ["t_out"])], [("t_out", np.float32, [3])])
    else_g = make_branch([helper.make_node("Identity", ["h"], ["e_mid"]),
                          helper.make_node("Neg", ["e_mid"], ["e_out"])], [("e_out", np.float32, [3])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [("x", np.float32, [3]), ("cond", np.bool_, [])],
                       [("y", np.float32, [3])])
    out, _ = run_passes(model, PASS)
    branches = {a.name: a.g for a in out.graph.node[1].attribute}
    assert ops(branches["then_branch"]) == ["Identity"]
    assert ops(branches["else_branch"]) == ["Neg"]
    x = np.array([-1, 0, 2], np.float32)
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])
