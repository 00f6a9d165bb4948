"""Tests of passes/merge_transpose.py: Transpose pairs merged into one (or none), compared with the
original model on onnxruntime; the first Transpose kept for its other consumers; graph output names;
If branches; a real model through the pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import (all_graphs, assert_same_outputs, make_branch, make_model, ops, output_names,
                     run_once, run_passes)
from helpers import zoo_files
from onnx import TensorProto, helper

from optimizer import optimize
from passes import LOSSLESS_PIPELINE

X = ("X", np.float32, [2, 3, 4, 5])


def _out(name, rank=4):
    """A float output of known rank and symbolic dims (declared shapes are not read by the pass)."""
    return (name, np.float32, [f"{name}_{i}" for i in range(rank)])


def _transpose(inp, out, perm=None):
    return helper.make_node("Transpose", [inp], [out], **({} if perm is None else {"perm": perm}))


def _pair(p1, p2, relu=False):
    """X [-> Relu] -> Transpose(p1) -> Transpose(p2) -> Y (a graph output)."""
    nodes = [helper.make_node("Relu", ["X"], ["R"])] if relu else []
    src = "R" if relu else "X"
    nodes += [_transpose(src, "T1", p1), _transpose("T1", "Y", p2)]
    return make_model(nodes, [X], [_out("Y")])


@pytest.mark.parametrize("p1,p2", [((0, 2, 1, 3), (3, 1, 0, 2)), ((1, 2, 3, 0), (2, 0, 3, 1)),
                                   (None, (0, 2, 1, 3)), ((3, 0, 2, 1), None)])
def test_pair_becomes_one_transpose(p1, p2):
    model = _pair(p1, p2)
    out, records = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Transpose"]
    assert out.graph.node[0].input == ["X"]
    assert records[0].stats["merged"] == 1 and records[0].stats["nodes_removed"] == 1
    assert_same_outputs(model, out)


def test_every_rank3_pair():
    """All 36 pairs of rank-3 permutations in one model, each an output."""
    nodes, outputs = [], []
    for k, (p1, p2) in enumerate(itertools.product(itertools.permutations(range(3)), repeat=2)):
        nodes += [_transpose("X", f"A{k}", list(p1)), _transpose(f"A{k}", f"Y{k}", list(p2))]
        outputs.append(_out(f"Y{k}", 3))
    model = make_model(nodes, [("X", np.float32, [2, 3, 4])], outputs)
    out, _ = run_passes(model, ["merge_transpose"])
    assert len(out.graph.node) == 36  # 6 identity pairs on a graph input keep one Transpose each
    assert all(n.input[0] == "X" for n in out.graph.node)
    assert_same_outputs(model, out)


def test_cancelling_pair_with_graph_output_keeps_name():
    """Transpose(p) then its inverse: nothing left; Relu now writes the graph output Y."""
    model = _pair((0, 2, 3, 1), (0, 3, 1, 2), relu=True)
    out, records = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Relu"] and out.graph.node[0].output == ["Y"]
    assert output_names(out) == ["Y"]
    assert records[0].stats["cancelled"] == 1 and records[0].stats["nodes_removed"] == 2
    assert_same_outputs(model, out)


def test_cancelling_pair_on_graph_input_becomes_identity_transpose():
    """Bypassing would turn the graph output Y into the graph input X: one identity Transpose."""
    model = _pair((0, 2, 3, 1), (0, 3, 1, 2))
    out, _ = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Transpose"] and list(out.graph.node[0].attribute[0].ints) == [0, 1, 2, 3]
    assert output_names(out) == ["Y"]
    assert_same_outputs(model, out)


def test_cancelling_pair_inside_graph():
    nodes = [_transpose("X", "T1", [1, 0, 2, 3]), _transpose("T1", "T2", [1, 0, 2, 3]),
             helper.make_node("Relu", ["T2"], ["Y"])]
    model = make_model(nodes, [X], [_out("Y")])
    out, _ = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Relu"] and out.graph.node[0].input == ["X"]
    assert_same_outputs(model, out)


def test_first_transpose_with_other_consumer_stays():
    nodes = [_transpose("X", "T1", [0, 2, 1, 3]), _transpose("T1", "Y", [0, 1, 3, 2]),
             helper.make_node("Relu", ["T1"], ["Z"])]
    model = make_model(nodes, [X], [_out("Y"), _out("Z")])
    out, records = run_passes(model, ["merge_transpose"])
    assert sorted(ops(out)) == ["Relu", "Transpose", "Transpose"]
    second = next(n for n in out.graph.node if n.output == ["Y"])
    assert second.input == ["X"]
    assert records[0].stats["merged"] == 1 and records[0].stats["nodes_removed"] == 0
    assert_same_outputs(model, out)


def test_two_omitted_perms_on_graph_input_refused():
    """Two reversals cancel, but the identity perm to write needs the rank, which is not read."""
    model = _pair(None, None)
    out, result = run_once(model, "merge_transpose")
    assert not result.modified
    assert result.stats["refused"] == {"graph_output_name_needs_rank": 1}
    assert ops(out) == ["Transpose", "Transpose"]


def test_chain_of_three():
    nodes = [_transpose("X", "A", [1, 2, 3, 0]), _transpose("A", "B", [1, 2, 3, 0]),
             _transpose("B", "Y", [3, 2, 0, 1])]
    model = make_model(nodes, [X], [_out("Y")])
    out, _ = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Transpose"]
    assert_same_outputs(model, out)


def test_chain_in_if_branch():
    then = make_branch([_transpose("X", "A", [0, 3, 1, 2]), _transpose("A", "TY", [0, 2, 3, 1]),
                        helper.make_node("Relu", ["TY"], ["TZ"])], [_out("TZ")],
                       name="then")
    other = make_branch([_transpose("X", "B", [3, 2, 1, 0]), _transpose("B", "EY", [1, 0, 2, 3])],
                        [_out("EY")], name="else")
    node = helper.make_node("If", ["C"], ["Y"], then_branch=then, else_branch=other)
    model = make_model([node], [X, ("C", TensorProto.BOOL, [])], [_out("Y")])
    out, _ = run_passes(model, ["merge_transpose"])
    else_out, then_out = list(all_graphs(out.graph))[1:]  # attributes sorted by name
    assert ops(then_out) == ["Relu"] and then_out.node[0].input == ["X"]
    assert ops(else_out) == ["Transpose"] and else_out.node[0].input == ["X"]
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    assert_same_outputs(model, out, [{"X": x, "C": np.array(c)} for c in (True, False)])


@pytest.mark.zoo
def test_real_model_rec():
    """PP-OCRv4 rec: Transpose-heavy; the pipeline keeps validating with the pass."""
    name = "ch_PP-OCRv4_rec_infer"
    onnx_file, npz_file = zoo_files(name)
    _, base = optimize(str(onnx_file), passes=LOSSLESS_PIPELINE, inputs=str(npz_file))
    _, report = optimize(str(onnx_file), passes=LOSSLESS_PIPELINE + ["merge_transpose"],
                         inputs=str(npz_file))
    assert report.validation.passed
    assert report.after.nodes <= base.after.nodes
