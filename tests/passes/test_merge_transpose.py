"""Tests of passes/merge_transpose.py: Transpose pairs merged into one (or none), compared with the
original model on onnxruntime; the first Transpose kept for its other consumers; graph output names;
If branches; Transposes across a Squeeze/Unsqueeze (every perm of small ranks, both axes forms,
each refusal); real models through the pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import (all_graphs, assert_same_outputs, make_branch, make_model, ops, output_names,
                     run_once, run_passes)
from helpers import zoo_files
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

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
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"merged": 1}},
                                          {"rewritten": 0}]
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
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"cancelled": 1}},
                                          {"rewritten": 0}]
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
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"merged": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out)


def test_two_omitted_perms_on_graph_input_refused():
    """Two reversals cancel, but the identity perm to write needs the rank, which is not read."""
    model = _pair(None, None)
    out, result = run_once(model, "merge_transpose")
    assert not result.modified
    assert result.stats == {"rewritten": 0, "refused": {"graph output name needs rank": 1}}
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


# ----------------------------------------------------------------- across a Squeeze or Unsqueeze

def _axes_node(op, inp, out, axes, opset, inits):
    """Squeeze/Unsqueeze in the opset's form: attribute below 13, initializer input from 13."""
    if opset < 13:
        return helper.make_node(op, [inp], [out], axes=list(axes))
    inits[f"{out}_axes"] = np.array(axes, np.int64)
    return helper.make_node(op, [inp, f"{out}_axes"], [out])


def _sandwich(shape, p1, op, axes, p2s, opset=17, relu=False):
    """X [-> Relu] -> Transpose(p1) -> op(axes) -> Transpose(p2) -> Y{k} for each p2 of ``p2s``
    (None: the op's output is read by a Relu instead)."""
    inits, src = {}, "X"
    nodes = [helper.make_node("Relu", ["X"], ["R"])] if relu else []
    src = "R" if relu else "X"
    nodes += [_transpose(src, "T1", p1), _axes_node(op, "T1", "S", axes, opset, inits)]
    rank = len(shape) + (len(axes) if op == "Unsqueeze" else -len(axes))
    outputs = []
    for k, p2 in enumerate(p2s):
        if p2 is None:
            nodes.append(helper.make_node("Relu", ["S"], [f"Y{k}"]))
        else:
            nodes.append(_transpose("S", f"Y{k}", p2))
        outputs.append(_out(f"Y{k}", rank))
    return make_model(nodes, [("X", np.float32, shape)], outputs, inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 13])
def test_lstm_output_idiom_becomes_one_squeeze(opset):
    """DTLN: LSTM.Y [S,1,B,H] -> Transpose([2,1,0,3]) -> Squeeze([1]) -> Transpose([1,0,2]) is
    Squeeze(Y, [1]) (rank 4 -> 3; every dim but the squeezed one differs, so a wrong perm fails)."""
    model = _sandwich([3, 1, 2, 5], [2, 1, 0, 3], "Squeeze", [1], [[1, 0, 2]], opset=opset,
                      relu=True)
    out, records = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Relu", "Squeeze"]
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"through Squeeze": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_squeeze_every_perm_rank4():
    """Every perm p1 of X [2,1,3,4] with the size-1 axis squeezed (positive and negative axes),
    every reader perm p2: one model, one output each; a single Transpose (or none) per output."""
    nodes, outputs, inits = [], [], {}
    for k, p1 in enumerate(itertools.permutations(range(4))):
        pos = p1.index(1)
        axes = [pos] if k % 2 else [pos - 4]
        nodes += [_transpose("X", f"T{k}", list(p1)),
                  _axes_node("Squeeze", f"T{k}", f"S{k}", axes, 17, inits)]
        for j, p2 in enumerate(itertools.permutations(range(3))):
            nodes.append(_transpose(f"S{k}", f"Y{k}_{j}", list(p2)))
            outputs.append(_out(f"Y{k}_{j}", 3))
    model = make_model(nodes, [("X", np.float32, [2, 1, 3, 4])], outputs, inits)
    out, records = run_passes(model, ["merge_transpose"])
    assert ops(out).count("Transpose") == 24 * 6 - 24  # one reader of each Squeeze cancels
    assert records[0].stats == {"rewritten": 24, "by_kind": {"through Squeeze": 24}}
    assert_same_outputs(model, out, rtol=0, atol=0)


@pytest.mark.parametrize("axes", [[0], [2], [3], [-1], [0, 2], [4, -4]])
def test_unsqueeze_every_perm_rank3(axes):
    """Every perm p1 of X [2,3,4], Unsqueeze(axes), one reader Transpose per p2 (a sample of the
    perms of the output rank); each chain alone in its own model so every reader is alone."""
    rank = 3 + len(axes)
    rng = np.random.default_rng(len(axes) * 10 + axes[0])
    p2s = list(itertools.permutations(range(rank)))
    for p1 in itertools.permutations(range(3)):
        p2 = list(p2s[rng.integers(len(p2s))])
        model = _sandwich([2, 3, 4], list(p1), "Unsqueeze", axes, [p2])
        out, records = run_passes(model, ["merge_transpose"])
        assert ops(out).count("Transpose") <= 1
        assert records[0].stats == {"rewritten": 1, "by_kind": {"through Unsqueeze": 1}}
        assert_same_outputs(model, out, rtol=0, atol=0)


def test_unsqueeze_readers_with_the_same_new_axes():
    """Two reader Transposes that keep the new axis at position 0: one Unsqueeze for both."""
    model = _sandwich([2, 3, 4], [2, 0, 1], "Unsqueeze", [0], [[0, 2, 3, 1], [0, 3, 1, 2]])
    out, records = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Unsqueeze", "Transpose"]  # the second reader cancels
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"through Unsqueeze": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_squeeze_makes_transpose_vanish():
    """Transpose([1,0,2]) of [1,3,4] then Squeeze([0]) only moved the size-1 axis: Squeeze([1]),
    read by a Relu."""
    model = _sandwich([3, 1, 4], [1, 0, 2], "Squeeze", [0], [None], relu=True)
    out, _ = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Relu", "Squeeze", "Relu"]
    assert_same_outputs(model, out, rtol=0, atol=0)


def test_omitted_perms_use_the_rank():
    """Transpose without perm (reversal) of [4,1,3] (rank from shape inference), Squeeze, reversal
    again: Squeeze(X, [1])."""
    model = _sandwich([4, 1, 3], None, "Squeeze", [1], [None], relu=True)
    model.graph.node[-1].CopyFrom(_transpose("S", "Y0"))
    out, _ = run_passes(model, ["merge_transpose"])
    assert ops(out) == ["Relu", "Squeeze"]
    assert_same_outputs(model, out, rtol=0, atol=0)


def _if_model(else_reads):
    """Relu -> Transpose T1 in the main graph; the then branch squeezes T1 and transposes it back;
    the else branch reads ``else_reads``."""
    then = make_branch([helper.make_node("Squeeze", ["T1", "ax"], ["S"]),
                        _transpose("S", "TY", [1, 0])], [_out("TY", 2)], {"ax": np.array([1])},
                       name="then")
    other = make_branch([helper.make_node("Relu", [else_reads], ["EY0"]),
                         helper.make_node("Flatten", ["EY0"], ["EY"])], [_out("EY", 2)],
                        name="else")
    nodes = [helper.make_node("Relu", ["X"], ["R"]), _transpose("R", "T1", [1, 2, 0]),
             helper.make_node("If", ["C"], ["Y"], then_branch=then, else_branch=other)]
    return make_model(nodes, [("X", np.float32, [3, 4, 1]), ("C", TensorProto.BOOL, [])],
                      [_out("Y", 2)])


@pytest.mark.parametrize("else_reads", ["R", "T1"])
def test_in_if_branch_reading_outer_transpose(else_reads):
    """The first Transpose in the main graph, the Squeeze and its reader in a branch; refused when
    the other branch also reads the Transpose."""
    model = _if_model(else_reads)
    out, records = run_passes(model, ["merge_transpose"])
    then_out = next(g for g in list(all_graphs(out.graph))[1:] if g.name == "then")
    if else_reads == "R":
        assert ops(out) == ["Relu", "If"] and ops(then_out) == ["Squeeze"]
    else:
        assert ops(out) == ["Relu", "Transpose", "If"]
        assert ops(then_out) == ["Squeeze", "Transpose"]
        assert records[0].stats["refused"] == {"transpose read elsewhere": 1}
    x = np.random.default_rng(0).normal(size=(3, 4, 1)).astype(np.float32)
    feeds = [{"X": x, "C": np.array(c)} for c in (True, False)]
    assert_same_outputs(model, out, feeds, rtol=0, atol=0)


def _refused(model):
    out, result = run_once(model, "merge_transpose")
    assert sorted(ops(out)) == sorted(ops(model))
    assert_same_outputs(model, out, rtol=0, atol=0)
    return result.stats["refused"]


def test_refused_axes_not_constant():
    model = _sandwich([3, 1, 2, 5], [2, 1, 0, 3], "Squeeze", [1], [[1, 0, 2]])
    model.graph.initializer.pop()  # S_axes becomes a graph input
    model.graph.input.append(helper.make_tensor_value_info("S_axes", TensorProto.INT64, [1]))
    out, result = run_once(model, "merge_transpose")
    assert ops(out) == ops(model) and result.stats["refused"] == {"axes unknown": 1}
    feed = {"X": np.random.default_rng(0).normal(size=(3, 1, 2, 5)).astype(np.float32),
            "S_axes": np.array([1], np.int64)}
    assert_same_outputs(model, out, [feed], rtol=0, atol=0)


def test_refused_first_transpose_has_other_reader():
    model = _sandwich([3, 1, 2, 5], [2, 1, 0, 3], "Squeeze", [1], [[1, 0, 2]])
    model.graph.node.append(helper.make_node("Relu", ["T1"], ["Z"]))
    model.graph.output.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, None))
    assert _refused(model) == {"transpose read elsewhere": 1}


def test_refused_when_a_transpose_would_stay():
    """The Squeeze's output is read by a Relu: the Transpose would have to stay for it."""
    model = _sandwich([3, 1, 2, 5], [2, 1, 0, 3], "Squeeze", [1], [[1, 0, 2], None])
    assert _refused(model) == {"transpose would stay": 1}


def test_refused_unsqueeze_readers_need_other_new_axes():
    model = _sandwich([2, 3, 4], [2, 0, 1], "Unsqueeze", [0], [[0, 2, 3, 1], [2, 0, 3, 1]])
    assert _refused(model) == {"transpose would stay": 1}
