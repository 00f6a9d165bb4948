"""Tests of passes/merge_slice.py: Slices on disjoint axes merged (compared with the original on
onnxruntime), shared constants never mutated (sibling Slices), every refusal refused, If branches,
a real model through the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (all_graphs, assert_same_outputs, initializers, make_branch, make_model, ops,
                     run_once, run_passes)
from helpers import zoo_files
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

X = ("X", np.float32, [6, 8, 10])


def _out(name, rank=3):
    return (name, np.float32, [f"{name}_{i}" for i in range(rank)])


def _slice(inp, out, prefix, starts, ends, axes=None, steps=None, dtype=np.int64):
    """A Slice node reading initializers ``{prefix}_starts`` ...; returns (node, initializers)."""
    inits, names = {}, [inp]
    for part, values in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps)):
        if values is None:
            names.append("")
            continue
        inits[f"{prefix}_{part}"] = np.array(values, dtype)
        names.append(f"{prefix}_{part}")
    while names[-1] == "":
        names.pop()
    return helper.make_node("Slice", names, [out]), inits


def _model(specs, outputs=("Y",), inputs=(X,), opset=17):
    nodes, inits = [], {}
    for spec in specs:
        node, i = _slice(*spec[:5], **spec[5] if len(spec) > 5 else {})
        nodes.append(node)
        inits.update(i)
    return make_model(nodes, list(inputs), [_out(o) for o in outputs], inits, opset=opset)


@pytest.mark.parametrize("first,second", [
    (([1], [5], [0]), ([2], [8], [2])),
    (([1, 0], [-1, 100], [0, 2], [1, 3]), ([7], [0], [1], [-2])),
    (([-4], [1000], [-1]), ([1], [-1], [-3])),      # negative axes, normalized by the rank
    (([1], [4]), ([0, 2], [3, 9], [1, 2], [2, 3])),  # axes omitted: 0 .. len(starts)-1
])
def test_disjoint_slices_become_one(first, second):
    model = _model([("X", "A", "s1", *first[:2], {"axes": first[2] if len(first) > 2 else None,
                                                    "steps": first[3] if len(first) > 3 else None}),
                    ("A", "Y", "s2", *second[:2], {"axes": second[2] if len(second) > 2 else None,
                                                     "steps": second[3] if len(second) > 3 else None})])
    out, records = run_passes(model, ["merge_slice"])
    assert ops(out) == ["Slice"] and out.graph.node[0].input[0] == "X"
    assert [r.stats for r in records] == [{"rewritten": 1}, {"rewritten": 0}]
    assert_same_outputs(model, out)


def test_int32_and_int64_parameters_mix():
    n1, i1 = _slice("X", "A", "s1", [1], [5], [0], dtype=np.int32)
    n2, i2 = _slice("A", "Y", "s2", [0], [5], [1])
    model = make_model([n1, n2], [X], [_out("Y")], {**i1, **i2})
    out, _ = run_passes(model, ["merge_slice"])
    assert ops(out) == ["Slice"]
    assert_same_outputs(model, out)


def test_sibling_slices_get_their_own_constants():
    """Regression: one Slice on axis 0 read by two Slices on axis 1 sharing their constants; each
    merged Slice gets new initializers, the shared ones are unchanged, and both results are right."""
    n0, i0 = _slice("X", "A", "s0", [1], [5], [0])
    n1, i1 = _slice("A", "Y", "s1", [0], [4], [1])
    n2 = helper.make_node("Slice", ["A", "s1_starts", "s1_ends", "s1_axes"], ["Z"])
    n3, i3 = _slice("A", "W", "s3", [2], [6], [1])
    model = make_model([n0, n1, n2, n3], [X], [_out("Y"), _out("Z"), _out("W")],
                       {**i0, **i1, **i3})
    before = initializers(model)
    out, records = run_passes(model, ["merge_slice"])
    assert ops(out) == ["Slice"] * 3
    assert all(n.input[0] == "X" for n in out.graph.node)
    assert [r.stats for r in records] == [{"rewritten": 3}, {"rewritten": 0}]
    used = [name for n in out.graph.node for name in n.input[1:]]
    assert len(used) == len(set(used)) == 12  # no node shares a parameter tensor
    after = initializers(out)
    for name, value in before.items():
        if name in after:
            np.testing.assert_array_equal(after[name], value)
    assert_same_outputs(model, out)


def test_first_slice_with_other_consumer_stays():
    n0, i0 = _slice("X", "A", "s0", [1], [5], [0])
    n1, i1 = _slice("A", "Y", "s1", [0], [4], [1])
    model = make_model([n0, n1, helper.make_node("Relu", ["A"], ["Z"])], [X],
                       [_out("Y"), _out("Z")], {**i0, **i1})
    out, records = run_passes(model, ["merge_slice"])
    assert sorted(ops(out)) == ["Relu", "Slice", "Slice"]
    assert next(n for n in out.graph.node if n.output == ["Y"]).input[0] == "X"
    assert [r.stats for r in records] == [{"rewritten": 1}, {"rewritten": 0}]
    assert_same_outputs(model, out)


def test_chain_of_three_slices():
    model = _model([("X", "A", "s0", [1], [5], {"axes": [0]}),
                    ("A", "B", "s1", [1], [7], {"axes": [1], "steps": [2]}),
                    ("B", "Y", "s2", [9], [0], {"axes": [2], "steps": [-3]})])
    out, _ = run_passes(model, ["merge_slice"])
    assert ops(out) == ["Slice"]
    assert_same_outputs(model, out)


def test_same_axis_refused():
    model = _model([("X", "A", "s1", [1], [5], {"axes": [0]}),
                    ("A", "Y", "s2", [1], [3], {"axes": [-3]})])
    out, result = run_once(model, "merge_slice")
    assert not result.modified and result.stats["refused"] == {"same axis": 1}
    assert ops(out) == ["Slice", "Slice"]


def test_non_constant_refused():
    n1, i1 = _slice("X", "A", "s1", [1], [5], [0])
    n2 = helper.make_node("Slice", ["A", "S", "E", "s1_axes"], ["Y"])
    model = make_model([n1, n2], [X, ("S", np.int64, [1]), ("E", np.int64, [1])], [_out("Y")], i1)
    _, result = run_once(model, "merge_slice")
    assert result.stats["refused"] == {"not constant": 1}


def test_initializer_that_is_a_graph_input_is_not_constant():
    n1, i1 = _slice("X", "A", "s1", [1], [5], [0])
    n2, i2 = _slice("A", "Y", "s2", [1], [5], [1])
    inputs = [X, ("s2_starts", np.int64, [1])]  # may be overridden at run time
    model = make_model([n1, n2], inputs, [_out("Y")], {**i1, **i2})
    _, result = run_once(model, "merge_slice")
    assert result.stats["refused"] == {"not constant": 1}


def test_attribute_form_refused():
    n1 = helper.make_node("Slice", ["X"], ["A"], starts=[1], ends=[5], axes=[0])
    n2 = helper.make_node("Slice", ["A"], ["Y"], starts=[1], ends=[5], axes=[1])
    model = make_model([n1, n2], [X], [_out("Y")], opset=9)
    _, result = run_once(model, "merge_slice")
    assert result.stats["refused"] == {"attribute form": 1}


def _if_model(then_nodes, inits, then_out="TY"):
    then = make_branch(then_nodes, [_out(then_out)], inits, name="then")
    other = make_branch([helper.make_node("Neg", ["X"], ["EY"])], [_out("EY")], name="else")
    node = helper.make_node("If", ["C"], ["Y"], then_branch=then, else_branch=other)
    return make_model([node], [X, ("C", TensorProto.BOOL, [])], [_out("Y")])


def _if_feeds():
    x = np.random.default_rng(0).normal(size=(6, 8, 10)).astype(np.float32)
    return [{"X": x, "C": np.array(c)} for c in (True, False)]


def test_chain_in_if_branch():
    n1, i1 = _slice("X", "A", "s1", [1], [5], [0])
    n2, i2 = _slice("A", "TY", "s2", [-3], [100], [-1])  # X's rank is known: it is a main input
    model = _if_model([n1, n2], {**i1, **i2})
    out, _ = run_passes(model, ["merge_slice"])
    _, then_out = list(all_graphs(out.graph))[1:]  # attributes sorted by name: else first
    assert ops(then_out) == ["Slice"] and then_out.node[0].input[0] == "X"
    assert_same_outputs(model, out, _if_feeds())


def test_negative_axis_of_subgraph_tensor_merged():
    """The rank of a tensor computed in the branch comes from shape inference of the branch."""
    n1, i1 = _slice("R", "A", "s1", [1], [5], [0])
    n2, i2 = _slice("A", "TY", "s2", [2], [100], [-1])
    model = _if_model([helper.make_node("Relu", ["X"], ["R"]), n1, n2], {**i1, **i2})
    out, records = run_passes(model, ["merge_slice"])
    assert [r.stats for r in records] == [{"rewritten": 1}, {"rewritten": 0}]
    _, then_out = list(all_graphs(out.graph))[1:]  # attributes sorted by name: else first
    assert ops(then_out) == ["Relu", "Slice"]
    assert_same_outputs(model, out, _if_feeds())


@pytest.mark.zoo
def test_real_model_silero_sequence():
    """silero_vad_16k_sequence: the STFT's real/imaginary Slices merge (two nodes fewer)."""
    name = "silero_vad_16k_sequence"
    onnx_file, npz_file = zoo_files(name)
    _, base = optimize(str(onnx_file), passes=[p for p in LOSSLESS_PIPELINE if p != "merge_slice"],
                       inputs=str(npz_file))
    _, report = optimize(str(onnx_file), passes=LOSSLESS_PIPELINE, inputs=str(npz_file))
    assert report.validation.passed
    assert report.after.nodes == base.after.nodes - 2
