"""Tests of passes/merge_reshape.py: shape-only ops feeding a Reshape, and Squeeze/Unsqueeze pairs,
merged into one op (compared with the original on onnxruntime, in both axes forms: attribute below
opset 13, input from 13); every refusal refused; If branches; real models through the pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from helpers import (
    all_graphs,
    assert_same_outputs,
    initializers,
    make_branch,
    make_model,
    ops,
    output_names,
    run_once,
    run_ort,
    run_passes,
    with_and_without,
)
from onnx import TensorProto, helper



def _out(name, rank):
    return (name, np.float32, [f"{name}_{i}" for i in range(rank)])


def _axes_node(op, inp, out, axes, opset, inits):
    """Squeeze/Unsqueeze in the opset's form; axes None: omitted."""
    if axes is None:
        return helper.make_node(op, [inp], [out])
    if opset < 13:
        return helper.make_node(op, [inp], [out], axes=list(axes))
    inits[f"{out}_axes"] = np.array(axes, np.int64)
    return helper.make_node(op, [inp, f"{out}_axes"], [out])


def _reshape(inp, out, shape, inits, **attrs):
    inits[f"{out}_shape"] = np.array(shape, np.int64)
    return helper.make_node("Reshape", [inp, f"{out}_shape"], [out], **attrs)


def _pair_model(op1, a1, op2, a2, shape, opset, relu=False):
    """X [-> Relu] -> op1(a1) -> op2(a2) -> Y."""
    inits, nodes = {}, [helper.make_node("Relu", ["X"], ["R"])] if relu else []
    nodes += [_axes_node(op1, "R" if relu else "X", "A", a1, opset, inits),
              _axes_node(op2, "A", "Y", a2, opset, inits)]
    rank = len(shape)
    for op, axes in ((op1, a1), (op2, a2)):
        count = shape.count(1) if axes is None else len(axes)
        rank += count if op == "Unsqueeze" else -count
    return make_model(nodes, [("X", np.float32, shape)], [_out("Y", rank)], inits, opset=opset)


# (op1, axes1, op2, axes2, input shape, ops left after the pass)
_PAIRS = [
    ("Unsqueeze", [0], "Unsqueeze", [1], [3, 4], ["Unsqueeze"]),
    ("Unsqueeze", [1, -1], "Unsqueeze", [0, 3], [3, 4], ["Unsqueeze"]),
    ("Unsqueeze", [2], "Unsqueeze", [-1, 0], [3, 4], ["Unsqueeze"]),
    ("Squeeze", [0], "Squeeze", [1], [1, 3, 1, 4], ["Squeeze"]),
    ("Squeeze", [-1], "Squeeze", [0], [1, 3, 1], ["Squeeze"]),
    ("Squeeze", [2, 0], "Squeeze", [-1], [1, 3, 1, 4, 1], ["Squeeze"]),
    ("Squeeze", [1], "Unsqueeze", [1], [3, 1, 4], ["Relu"]),
    ("Squeeze", [-1], "Unsqueeze", [2], [3, 4, 1], ["Relu"]),
    ("Squeeze", None, "Unsqueeze", [0, 2], [1, 3, 1, 4], ["Relu"]),
    ("Unsqueeze", [0, 2], "Squeeze", [2], [3, 4], ["Unsqueeze"]),
    ("Unsqueeze", [1, 3], "Squeeze", [1], [3, 4], ["Unsqueeze"]),
    ("Unsqueeze", [0, -1], "Squeeze", [-1, 0], [3, 4], ["Relu"]),
]


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("op1,a1,op2,a2,shape,left", _PAIRS)
def test_squeeze_unsqueeze_pairs(op1, a1, op2, a2, shape, left, opset):
    model = _pair_model(op1, a1, op2, a2, shape, opset, relu=True)
    out, records = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Relu"] + [op for op in left if op != "Relu"]
    assert output_names(out) == ["Y"]
    kind = "cancelled" if left == ["Relu"] else "merged"
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {kind: 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out)


def test_every_small_unsqueeze_unsqueeze_and_squeeze_squeeze():
    """Brute force: every pair of single axes on a rank-2 input, one model with many outputs."""
    nodes, outputs, inits = [], [], {}
    for k, (a, b) in enumerate(itertools.product(range(-3, 3), range(-4, 4))):
        nodes += [_axes_node("Unsqueeze", "X", f"U{k}", [a], 13, inits),
                  _axes_node("Unsqueeze", f"U{k}", f"Y{k}", [b], 13, inits)]
        outputs.append(_out(f"Y{k}", 4))
    for k, (a, b) in enumerate(itertools.product(range(-4, 4), range(-3, 3))):
        nodes += [_axes_node("Squeeze", "Z", f"S{k}", [a], 13, inits),
                  _axes_node("Squeeze", f"S{k}", f"W{k}", [b], 13, inits)]
        outputs.append(_out(f"W{k}", 2))
    model = make_model(nodes, [("X", np.float32, [3, 4]), ("Z", np.float32, [1, 1, 1, 1])],
                       outputs, inits, opset=13)
    out, _ = run_passes(model, ["merge_reshape"])
    assert len(out.graph.node) == len(outputs)
    assert all(n.input[0] in ("X", "Z") for n in out.graph.node)
    assert_same_outputs(model, out)


@pytest.mark.parametrize("first", ["Reshape", "Flatten", "Squeeze", "Unsqueeze"])
@pytest.mark.parametrize("target", [[4, -1], [2, 2, 6], [-1]])
def test_shape_op_feeding_reshape(first, target):
    inits = {}
    if first == "Reshape":
        node = _reshape("X", "A", [6, 4], inits)
    elif first == "Flatten":
        node = helper.make_node("Flatten", ["X"], ["A"], axis=2)
    else:
        node = _axes_node(first, "X", "A", [1] if first == "Squeeze" else [0, 3], 13, inits)
    shape = [2, 1, 12] if first == "Squeeze" else [2, 3, 4]
    nodes = [node, _reshape("A", "Y", target, inits)]
    model = make_model(nodes, [("X", np.float32, shape)], [_out("Y", len(target))], inits)
    out, records = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape"] and out.graph.node[0].input == ["X", "Y_shape"]
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"merged": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out)


def test_zero_copying_a_static_dim_is_resolved():
    """Reshape(Reshape(X, [6, 4]), [0, 2, 2]): the 0 copies the intermediate's 6, which is
    written into a new shape initializer; the original one is unchanged (it is shared)."""
    inits = {}
    nodes = [_reshape("X", "A", [6, 4], inits), _reshape("A", "Y", [0, 2, 2], inits),
             helper.make_node("Reshape", ["W", "Y_shape"], ["Z"])]
    model = make_model(nodes, [("X", np.float32, [3, 2, 4]), ("W", np.float32, [5, 4])],
                       [_out("Y", 3), _out("Z", 3)], inits)
    out, _ = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape", "Reshape"]
    y = next(n for n in out.graph.node if n.output == ["Y"])
    assert y.input[0] == "X" and y.input[1] != "Y_shape"
    inits_after = initializers(out)
    np.testing.assert_array_equal(inits_after[y.input[1]], [6, 2, 2])
    np.testing.assert_array_equal(inits_after["Y_shape"], [0, 2, 2])
    assert_same_outputs(model, out)


def test_zero_copying_a_dynamic_dim_refused():
    inits = {}
    nodes = [_reshape("X", "A", [-1, 4], inits), _reshape("A", "Y", [0, 2, 2], inits)]
    model = make_model(nodes, [("X", np.float32, ["N", 3, 4])], [_out("Y", 3)], inits)
    out, result = run_once(model, "merge_reshape")
    assert not result.modified and result.stats["refused"] == {"zero copies unknown dim": 1}
    assert ops(out) == ["Reshape", "Reshape"]


def test_allowzero_keeps_literal_zero():
    inits = {}
    nodes = [_reshape("X", "A", [0], inits, allowzero=1),
             _reshape("A", "Y", [3, 0, 2], inits, allowzero=1)]
    model = make_model(nodes, [("X", np.float32, [2, 0, 3])], [_out("Y", 3)], inits, opset=14)
    out, _ = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape"] and out.graph.node[0].input == ["X", "Y_shape"]
    assert_same_outputs(model, out)


def test_shape_not_constant_refused():
    inits = {}
    nodes = [_reshape("X", "A", [6, 4], inits), helper.make_node("Reshape", ["A", "S"], ["Y"])]
    model = make_model(nodes, [("X", np.float32, [2, 3, 4]), ("S", np.int64, [2])],
                       [_out("Y", 2)], inits)
    _, result = run_once(model, "merge_reshape")
    assert result.stats["refused"] == {"shape not constant": 1}


def test_first_with_other_consumer_stays():
    inits = {}
    nodes = [_axes_node("Unsqueeze", "X", "A", [0], 13, inits),
             _axes_node("Unsqueeze", "A", "Y", [0], 13, inits),
             helper.make_node("Relu", ["A"], ["Z"])]
    model = make_model(nodes, [("X", np.float32, [3, 4])], [_out("Y", 4), _out("Z", 3)], inits,
                       opset=13)
    out, records = run_passes(model, ["merge_reshape"])
    assert sorted(ops(out)) == ["Relu", "Unsqueeze", "Unsqueeze"]
    assert next(n for n in out.graph.node if n.output == ["Y"]).input[0] == "X"
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"merged": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out)


@pytest.mark.parametrize("op1,a1,op2,a2,shape,reason", [
    ("Unsqueeze", [0], "Squeeze", [2], [3, 1, 4], "not one op"),
    ("Squeeze", [0], "Unsqueeze", [1], [1, 3], "not one op"),
    ("Squeeze", None, "Unsqueeze", [0], ["N", 1, 4], "axes unknown"),
])
def test_pair_refused(op1, a1, op2, a2, shape, reason):
    model = _pair_model(op1, a1, op2, a2, shape, 13, relu=True)
    out, result = run_once(model, "merge_reshape")
    assert not result.modified and result.stats["refused"] == {reason: 1}
    assert ops(out) == ["Relu", op1, op2]


def test_axes_not_constant_refused():
    inits = {}
    nodes = [_axes_node("Unsqueeze", "X", "A", [0], 13, inits),
             helper.make_node("Unsqueeze", ["A", "axes"], ["Y"])]
    model = make_model(nodes, [("X", np.float32, [3, 4]), ("axes", np.int64, [1])],
                       [_out("Y", 4)], inits, opset=13)
    _, result = run_once(model, "merge_reshape")
    assert result.stats["refused"] == {"axes unknown": 1}


def test_identity_pair_on_graph_input_to_graph_output_refused():
    model = _pair_model("Squeeze", [0], "Unsqueeze", [0], [1, 3], 13)
    out, result = run_once(model, "merge_reshape")
    assert result.stats["refused"] == {"graph output name lost": 1}
    assert ops(out) == ["Squeeze", "Unsqueeze"]


def _mask_model(inner="reshape", target="T", axis=0, start=None, inner_is_output=False):
    """``Y = Reshape(inner(X), Shape(target))`` with ``X = Gather(D, T, axis)``, ``D`` the mask
    ``M`` [B, S] as float [B·S, 1] (axis 0) or [1, B·S] (axis 1): the attention-mask idiom of
    BERT exports (``inner`` a Reshape to [-1], target ``T``) and variants. ``T`` [N, K] int64
    indices, ``U`` [P, Q] float."""
    inits = {}
    nodes = [helper.make_node("Cast", ["M"], ["F"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["F"], ["D"], axis=2 if axis == 0 else 0),
             helper.make_node("Gather", ["D", "T"], ["X"], axis=axis)]
    if inner == "reshape":
        nodes.append(_reshape("X", "A", [-1], inits))
    else:
        nodes.append(helper.make_node("Flatten", ["X"], ["A"], axis=0))
    attrs = {} if start is None else {"start": start}
    nodes += [helper.make_node("Shape", [target], ["S"], **attrs),
              helper.make_node("Reshape", ["A", "S"], ["Y"])]
    inputs = [("M", np.int64, ["B", "S"]), ("T", np.int64, ["N", "K"])]
    if target == "U":
        inputs.append(("U", np.float32, ["P", "Q"]))
    outputs = [_out("Y", 2 if start is None else 1)]
    if inner_is_output:
        outputs.append(_out("A", 1))
    return make_model(nodes, inputs, outputs, inits)


def _mask_feed(t_shape, u_shape=(2, 3), seed=0):
    """M [2, 3] and indices T (into B·S = 6 rows or columns) of ``t_shape``."""
    rng = np.random.default_rng(seed)
    return {"M": rng.integers(0, 2, (2, 3)).astype(np.int64),
            "T": rng.integers(0, 6, t_shape).astype(np.int64),
            "U": rng.normal(size=u_shape).astype(np.float32)}


def _reader_of(model, output):
    return next(n for n in model.graph.node if n.output == [output])


def test_runtime_shape_of_gather_indices_merged():
    """``Reshape(Reshape(Gather(D, T), [-1]), Shape(T))`` becomes ``Reshape(Gather(D, T),
    Shape(T))``: a 0 in ``Shape(T)`` at position 0 copies ``numel(X) = 0`` before and
    ``X.shape[0] = T.shape[0] = 0`` after. Checked on an empty ``T`` of shape [0, 3] too."""
    model = _mask_model()
    out, records = run_passes(model, ["merge_reshape"])
    assert sorted(ops(out)) == ["Cast", "Flatten", "Gather", "Reshape", "Shape"]
    assert _reader_of(out, "Y").input == ["X", "S"]
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"merged": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out, [_mask_feed(s) for s in ((2, 3), (1, 4), (0, 3))])


def test_runtime_shape_zero_past_rank_of_intermediate_fails_only_before():
    """A 0 at position 1 of ``Shape(T)`` copies a dim the 1-D intermediate does not have: the
    original fails, the merged Reshape copies ``X.shape[1] = 0`` (the accepted difference)."""
    model = _mask_model()
    out, _ = run_passes(model, ["merge_reshape"])
    feed = _mask_feed((3, 0))
    with pytest.raises(Exception, match="zero"):
        run_ort(model, feed)
    assert run_ort(out, feed)["Y"].shape == (3, 0)


def test_runtime_shape_of_own_input_merged():
    """``Reshape(Reshape(T, [-1]), Shape(T))``: ``X`` is ``T``, so a 0 copies ``T``'s own dim."""
    inits = {}
    nodes = [_reshape("T", "A", [-1], inits), helper.make_node("Shape", ["T"], ["S"]),
             helper.make_node("Reshape", ["A", "S"], ["Y"])]
    model = make_model(nodes, [("T", np.int64, ["N", "K"])], [("Y", np.int64, ["N", "K"])], inits)
    out, _ = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Shape", "Reshape"] and _reader_of(out, "Y").input == ["T", "S"]
    assert_same_outputs(model, out, [_mask_feed(s) for s in ((2, 3), (0, 3))])


def test_runtime_shape_with_allowzero_merged():
    """With ``allowzero = 1`` a 0 is literal, so any target shape is kept."""
    inits = {}
    nodes = [_reshape("X", "A", [-1], inits), helper.make_node("Reshape", ["A", "S"], ["Y"],
                                                               allowzero=1)]
    model = make_model(nodes, [("X", np.float32, ["A0", "A1", "A2"]), ("S", np.int64, [2])],
                       [_out("Y", 2)], inits, opset=14)
    out, _ = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape"] and out.graph.node[0].input == ["X", "S"]
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    assert_same_outputs(model, out, [{"X": x, "S": np.array([4, 6])},
                                     {"X": x[:, :0], "S": np.array([0, 5])}])


def test_runtime_shape_inner_reshape_with_other_reader_stays():
    model = _mask_model(inner_is_output=True)
    out, records = run_passes(model, ["merge_reshape"])
    assert ops(out).count("Reshape") == 2 and _reader_of(out, "Y").input == ["X", "S"]
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {"merged": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out, [_mask_feed(s) for s in ((2, 3), (0, 3))])


def _dynamic_zero_model():
    inits = {}
    nodes = [_reshape("X", "A", [-1, 4], inits), _reshape("A", "Y", [0, 2, 2], inits)]
    return make_model(nodes, [("X", np.float32, ["N", 3, 4])], [_out("Y", 3)], inits)


def _x_feed(n):
    return {"X": np.random.default_rng(0).normal(size=(n, 3, 4)).astype(np.float32)}


# (model, reason, feeds the original runs, feed on which the unchecked merge differs from it)
_UNSAFE = {
    "shape_of_unrelated_tensor": (
        lambda: _mask_model(target="U"), "zero copies unrelated dim",
        [_mask_feed((2, 3), u_shape=(3, 2))], _mask_feed((2, 3), u_shape=(0, 1))),
    "gather_along_axis_1": (
        lambda: _mask_model(axis=1), "zero copies unrelated dim",
        [_mask_feed((2, 3))], _mask_feed((0, 1))),
    "intermediate_2d_not_copying_dims": (
        lambda: _mask_model(inner="flatten0"), "zero copies unrelated dim",
        [_mask_feed((2, 3))], _mask_feed((0, 0))),
    "shape_from_dim_1": (
        lambda: _mask_model(start=1), "shape not constant",
        [_mask_feed((1, 3))], _mask_feed((2, 0))),
    "constant_zero_copying_dynamic_dim": (
        _dynamic_zero_model, "zero copies unknown dim", [_x_feed(1)], _x_feed(2)),
}


@pytest.mark.parametrize("case", list(_UNSAFE))
def test_unsafe_zero_copy_refused(case):
    """Each refused pair has a feed on which merging it regardless would change the result."""
    build, reason, feeds, counterexample = _UNSAFE[case]
    model = build()
    out, result = run_once(model, "merge_reshape")
    assert not result.modified and result.stats["refused"] == {reason: 1}
    assert_same_outputs(model, out, feeds + [counterexample])
    unchecked = onnx.ModelProto()
    unchecked.CopyFrom(model)
    reshape = _reader_of(unchecked, "Y")
    reshape.input[0] = _reader_of(unchecked, reshape.input[0]).input[0]
    expected = run_ort(model, counterexample)["Y"]
    try:
        got = run_ort(unchecked, counterexample)["Y"]
    except Exception as err:  # noqa: BLE001 -- onnxruntime's own error types
        assert "cannot be reshaped" in str(err)  # the merge would fail where the original runs
        return
    assert got.shape != expected.shape


def _absorb_model(s, op, arg, x_shape, opset=13, allowzero=None, outputs=("Y",)):
    """X -> Reshape(s) -> op(arg) -> Y: ``arg`` the axes of a Squeeze/Unsqueeze (None: omitted)
    or the perm of a Transpose (None: default)."""
    inits = {}
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    nodes = [_reshape("X", "A", s, inits, **attrs)]
    if op == "Transpose":
        nodes.append(helper.make_node("Transpose", ["A"], ["Y"],
                                      **({} if arg is None else {"perm": arg})))
    else:
        nodes.append(_axes_node(op, "A", "Y", arg, opset, inits))
    rank = len(s) + {"Transpose": 0, "Unsqueeze": len(arg or []),
                     "Squeeze": -(s.count(1) if arg is None else len(arg))}[op]
    outs = [_out("Y", rank)] + ([_out("A", len(s))] if "A" in outputs else [])
    return make_model(nodes, [("X", np.float32, x_shape)], outs, inits, opset=opset)


def _feeds(x_shapes):
    rng = np.random.default_rng(0)
    return [{"X": rng.normal(size=shape).astype(np.float32)} for shape in x_shapes]


# (s, op, axes or perm, X shape, X shapes fed (batch 0 among them), target of the one Reshape)
_ABSORBED = [
    ([-1, 3, 4], "Unsqueeze", [1], ["N", 12], [(2, 12), (0, 12), (5, 12)], [-1, 1, 3, 4]),
    ([-1, 3, 4], "Unsqueeze", [-1, 0], ["N", 12], [(2, 12), (0, 12)], [1, -1, 3, 4, 1]),
    ([-1, 1, 12], "Squeeze", [1], ["N", 3, 4], [(2, 3, 4), (0, 3, 4)], [-1, 12]),
    ([-1, 1, 12, 1], "Squeeze", [-1, 1], ["N", 12], [(3, 12), (0, 12)], [-1, 12]),
    ([2, 1, 6], "Squeeze", None, [3, 4], [(3, 4)], [2, 6]),
    ([-1, 1, 3, 4], "Transpose", [0, 2, 1, 3], ["N", 12], [(2, 12), (0, 12)], [-1, 3, 1, 4]),
    ([1, -1], "Transpose", None, ["N", 5], [(2, 5), (0, 5)], [-1, 1]),
    # a 0 that stays in place copies the same dim of X (next to a -1, batch 0 fails in both)
    ([0, 0, -1], "Unsqueeze", [3], ["B", "S", 4, 2], [(2, 3, 4, 2), (1, 5, 4, 2)], [0, 0, -1, 1]),
    ([0, 1, -1], "Squeeze", [1], ["B", 3, 4], [(2, 3, 4), (1, 3, 4)], [0, -1]),
    ([0, 1, -1], "Transpose", [0, 2, 1], ["B", 3, 4], [(2, 3, 4), (1, 3, 4)], [0, -1, 1]),
    ([0, 1, 12], "Transpose", [0, 2, 1], ["B", 3, 4], [(2, 3, 4), (0, 3, 4)], [0, 12, 1]),
    # a 0 that moves is replaced by X's static dim
    ([0, -1], "Unsqueeze", [0], [3, "N"], [(3, 2), (3, 0)], [1, 3, -1]),
]


@pytest.mark.parametrize("s,op,arg,x_shape,fed,target", _ABSORBED)
def test_squeeze_unsqueeze_transpose_after_reshape_absorbed(s, op, arg, x_shape, fed, target):
    model = _absorb_model(s, op, arg, x_shape)
    out, records = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape"] and output_names(out) == ["Y"]
    assert out.graph.node[0].input[0] == "X"
    np.testing.assert_array_equal(initializers(out)[out.graph.node[0].input[1]], target)
    assert [r.stats for r in records] == [{"rewritten": 1, "by_kind": {f"{op} absorbed": 1}},
                                          {"rewritten": 0}]
    assert_same_outputs(model, out, _feeds(fed))


def test_every_transpose_of_size_1_dims_brute_force():
    """All 24 perms after a Reshape to [-1, 1, 3, 1]: exactly those keeping dims 0 and 2 in
    order (12) become a Reshape, and every output stays the same (also for batch 0). The others
    reorder the literal 3, real transpositions, which are not counted as refusals."""
    inits, outputs = {}, []
    nodes = [_reshape("X", "A", [-1, 1, 3, 1], inits)]
    for k, perm in enumerate(itertools.permutations(range(4))):
        nodes.append(helper.make_node("Transpose", ["A"], [f"Y{k}"], perm=list(perm)))
        outputs.append(_out(f"Y{k}", 4))
    model = make_model(nodes, [("X", np.float32, ["N", 3])], outputs, inits)
    out, records = run_passes(model, ["merge_reshape"])
    assert records[0].stats == {"rewritten": 12, "by_kind": {"Transpose absorbed": 12}}
    assert sorted(ops(out)) == ["Reshape"] * 13 + ["Transpose"] * 12
    assert_same_outputs(model, out, _feeds([(2, 3), (0, 3), (7, 3)]))


@pytest.mark.parametrize("opset", [11, 13])
def test_chain_after_reshape_becomes_one_reshape(opset):
    """Reshape -> Unsqueeze -> Transpose -> Squeeze: each absorbed in turn, in both axes forms."""
    inits = {}
    nodes = [_reshape("X", "A", [-1, 12], inits), _axes_node("Unsqueeze", "A", "B", [1], opset,
                                                             inits),
             helper.make_node("Transpose", ["B"], ["C"], perm=[0, 2, 1]),
             _axes_node("Squeeze", "C", "Y", [-1], opset, inits)]
    model = make_model(nodes, [("X", np.float32, ["N", 3, 4])], [_out("Y", 2)], inits,
                       opset=opset)
    out, _ = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape"]
    np.testing.assert_array_equal(initializers(out)[out.graph.node[0].input[1]], [-1, 12])
    assert_same_outputs(model, out, _feeds([(2, 3, 4), (0, 3, 4)]))


def test_allowzero_literal_zero_absorbed():
    model = _absorb_model([0, 3], "Unsqueeze", [0], ["N", 3], opset=14, allowzero=1)
    out, _ = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape"] and out.graph.node[0].attribute[0].i == 1
    np.testing.assert_array_equal(initializers(out)[out.graph.node[0].input[1]], [1, 0, 3])
    assert_same_outputs(model, out, _feeds([(0, 3)]))


def test_first_reshape_with_other_reader_stays():
    model = _absorb_model([-1, 3, 4], "Unsqueeze", [0], ["N", 12], outputs=("Y", "A"))
    out, _ = run_passes(model, ["merge_reshape"])
    assert ops(out) == ["Reshape", "Reshape"]
    assert all(n.input[0] == "X" for n in out.graph.node)
    assert_same_outputs(model, out, _feeds([(2, 12), (0, 12)]))


# (s, op, axes or perm, X shape, reason (None: not a case), feeds on which the naive rewrite
# differs or fails)
_NOT_ABSORBED = [
    ([-1, 12], "Squeeze", [0], ["N", 12], "squeezed dim not provably 1", None),
    ([1, -1, 1], "Squeeze", None, ["N"], "squeezed dim not provably 1", None),
    ([2, 3, 4], "Transpose", [1, 0, 2], [24], None, None),  # a real transposition
    ([-1, 1, 3], "Transpose", [2, 0, 1], ["N", 3], None, None),
    ([0, 1, -1], "Transpose", [2, 1, 0], ["B", 3, 4], "moves a dim not provably 1", None),
    # the moved 0 would copy X's dim 1 instead of dim 0
    ([0, -1], "Unsqueeze", [0], ["N", "M"], "zero copies unknown dim", [(2, 3)]),
    ([1, 0, -1], "Squeeze", [0], [1, "N", 4], "zero copies unknown dim", [(1, 2, 4)]),
]


@pytest.mark.parametrize("s,op,arg,x_shape,reason,counter", _NOT_ABSORBED)
def test_not_absorbed(s, op, arg, x_shape, reason, counter):
    model = _absorb_model(s, op, arg, x_shape)
    out, result = run_once(model, "merge_reshape")
    assert result.stats == ({"rewritten": 0, "refused": {reason: 1}} if reason
                            else {"rewritten": 0})
    assert ops(out) == ["Reshape", op]
    if counter:  # the 0 moved as is: a different result or a failure
        naive = onnx.ModelProto()
        naive.CopyFrom(model)
        target = [v for v in s]
        target.insert(0, 1) if op == "Unsqueeze" else target.pop(0)
        naive.graph.initializer.append(onnx.numpy_helper.from_array(
            np.array(target, np.int64), "naive_shape"))
        naive.graph.node[1].CopyFrom(helper.make_node("Reshape", ["X", "naive_shape"], ["Y"]))
        feed = _feeds(counter)[0]
        expected = run_ort(model, feed)["Y"]
        try:
            assert run_ort(naive, feed)["Y"].shape != expected.shape
        except Exception as err:  # noqa: BLE001 -- onnxruntime's own error types
            assert "reshape" in str(err).lower()


def test_absorb_shape_not_constant_refused():
    nodes = [helper.make_node("Reshape", ["X", "S"], ["A"]),
             helper.make_node("Unsqueeze", ["A", "axes"], ["Y"])]
    model = make_model(nodes, [("X", np.float32, [2, 3]), ("S", np.int64, [2])], [_out("Y", 3)],
                       {"axes": np.array([0], np.int64)})
    _, result = run_once(model, "merge_reshape")
    assert result.stats["refused"] == {"shape not constant": 1}


def _if_model(then_nodes, inits, rank):
    then = make_branch(then_nodes, [_out("TY", rank)], inits, name="then")
    other = make_branch([helper.make_node("Unsqueeze", ["X", "e_axes"], ["EY"])], [_out("EY", rank)],
                        {"e_axes": np.arange(rank - 2, dtype=np.int64)}, name="else")
    node = helper.make_node("If", ["C"], ["Y"], then_branch=then, else_branch=other)
    return make_model([node], [("X", np.float32, [3, 4]), ("C", TensorProto.BOOL, [])],
                      [_out("Y", rank)], opset=13)


def _if_feeds():
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    return [{"X": x, "C": np.array(c)} for c in (True, False)]


def test_chain_in_if_branch():
    inits = {}
    nodes = [_axes_node("Unsqueeze", "X", "A", [0], 13, inits),
             _axes_node("Unsqueeze", "A", "B", [-1], 13, inits),
             _axes_node("Unsqueeze", "B", "TY", [1], 13, inits)]
    model = _if_model(nodes, inits, 5)
    out, _ = run_passes(model, ["merge_reshape"])
    _, then_out = list(all_graphs(out.graph))[1:]  # attributes sorted by name: else first
    assert ops(then_out) == ["Unsqueeze"] and then_out.node[0].input[0] == "X"
    assert_same_outputs(model, out, _if_feeds())


def test_negative_axes_of_subgraph_tensor_merged():
    """The rank of a tensor computed in the branch comes from shape inference of the branch."""
    inits = {}
    nodes = [helper.make_node("Relu", ["X"], ["R"]),
             _axes_node("Unsqueeze", "R", "A", [-1], 13, inits),
             _axes_node("Unsqueeze", "A", "TY", [0], 13, inits)]
    model = _if_model(nodes, inits, 4)
    out, records = run_passes(model, ["merge_reshape"])
    assert records[0].stats == {"rewritten": 1, "by_kind": {"merged": 1}}
    assert_same_outputs(model, out, _if_feeds())


@pytest.mark.zoo
@pytest.mark.parametrize("name,fewer,merged", [("minilm_l6", 8, 7), ("silero_vad", 0, 8)])
def test_real_models(name, fewer, merged):
    """MiniLM: three Unsqueeze chains of three (position ids, attention mask) become single
    Unsqueezes, and the attention mask's ``Reshape(Reshape(Gather(D, T), [-1]), Shape(T))`` one
    Reshape (its target then folds to a constant, so the Shape goes too). silero_vad: in the If
    branches, LSTM state Squeeze(0) -> Squeeze(0) pairs read by a nested If become
    Squeeze([0, 1]) of the LSTM output (the first Squeeze has other readers), and the Unsqueezes
    ``sink_into_if`` appends in If branches merge with the branches' own."""
    (_, base), (_, report) = with_and_without(name, "merge_reshape")
    assert report.after.nodes == base.after.nodes - fewer
    assert sum(r.stats.get("by_kind", {}).get("merged", 0)
               for r in report.passes if r.name == "merge_reshape") == merged


@pytest.mark.zoo
@pytest.mark.parametrize("name,absorbed", [
    ("basic_pitch_nmp", {"Unsqueeze absorbed": 35}),
    ("khmersm_dynamo", {"Transpose absorbed": 2, "Unsqueeze absorbed": 3}),
])
def test_real_models_absorb(name, absorbed):
    """A tf2onnx audio model (basic_pitch: ``Unsqueeze(Reshape(x, [-1, 1, C]))`` before every
    Conv1D-as-Conv2D) and a dynamo export (Reshape then Transpose of a size-1 head axis, then
    Unsqueeze): rewrite 3 fires, and the default pipeline still validates."""
    _, (_, report) = with_and_without(name, "merge_reshape")
    kinds: dict[str, int] = {}
    for r in report.passes:
        if r.name == "merge_reshape":
            for kind, n in r.stats.get("by_kind", {}).items():
                if kind.endswith("absorbed"):
                    kinds[kind] = kinds.get(kind, 0) + n
    assert kinds == absorbed
