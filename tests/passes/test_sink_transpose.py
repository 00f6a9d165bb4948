"""Tests of passes/sink_transpose.py: each rule (unary, broadcasting with constants of every rank
and with two transposed operands, Reduce both keepdims, ArgMax, Softmax, Pad), each refusal, the
count rule for shared Transposes, the NHWC Conv block of Keras exports through the default
pipeline, and a property test over random chains; every model compared with onnxruntime on the
original at a batch of 2 and of 0."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import assert_same_outputs, make_model, ops, random_feed, run_once, run_passes
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.passes import LOSSLESS_PIPELINE

NHWC = (0, 2, 3, 1)
NCHW = (0, 3, 1, 2)
PASSES = ["sink_transpose", "merge_transpose"]


def _x(shape=("n", 3, 4, 5), name="X", dtype=np.float32):
    return (name, dtype, list(shape))


def _out(name, rank=4, dtype=np.float32):
    """An output of known rank and symbolic dims (declared shapes are not read by the pass)."""
    return (name, dtype, [f"{name}_{i}" for i in range(rank)])


def _t(inp, out, perm):
    return helper.make_node("Transpose", [inp], [out], perm=list(perm))


def _feeds(model, batches=(2, 0)):
    """Random feeds with the dynamic batch at each size of ``batches``."""
    return [random_feed(model, seed, dim) for seed, dim in enumerate(batches)]


def _check(model, passes=PASSES, batches=(2, 0)):
    """Run ``passes`` to a fixed point, compare with the original; return (model, records)."""
    out, records = run_passes(model, passes)
    assert_same_outputs(model, out, _feeds(model, batches))
    return out, records


def _sandwich(middle, inputs=(), inits=None, opset=17, out_rank=4, out_dtype=np.float32,
              last=NHWC, first=NCHW):
    """X [n,3,4,5] -> Transpose(``first``) -> ``middle`` (nodes reading "T", writing "M") ->
    Transpose(``last``) -> Y; ``last`` None: M is the output."""
    nodes = [_t("X", "T", first), *middle]
    if last is not None:
        nodes.append(_t("M", "Y", last))
    return make_model(nodes, [_x(), *inputs], [_out("Y" if last else "M", out_rank, out_dtype)],
                      inits or {}, opset=opset)


@pytest.mark.parametrize("op,attrs,extra", [
    ("Relu", {}, ()), ("Sigmoid", {}, ()), ("Tanh", {}, ()), ("Neg", {}, ()), ("Abs", {}, ()),
    ("Exp", {}, ()), ("Sqrt", {}, ()), ("LeakyRelu", {"alpha": 0.3}, ()), ("Erf", {}, ()),
    ("Cast", {"to": TensorProto.DOUBLE}, ()), ("Clip", {}, ("lo", "hi")),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, ())])
def test_unary_pair_cancels(op, attrs, extra):
    inits = {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)} if extra else {}
    dtype = np.float64 if op == "Cast" else np.float32
    model = _sandwich([helper.make_node(op, ["T", *extra], ["M"], **attrs)], inits=inits,
                      out_dtype=dtype)
    out, records = _check(model)
    assert ops(out) == [op]
    assert records[0].stats == {"rewritten": 1, "by_kind": {op: 1}}


def test_chain_moves_in_one_run():
    """Sub, Mul, Add by [1,1,1,C], [C], [1,C] constants then Relu: one run moves the Transpose
    to the end, where it meets its inverse."""
    c = np.arange(1, 4, dtype=np.float32)
    inits = {"m": c.reshape(1, 1, 1, 3) / 4, "s": c + 1, "b": c.reshape(1, 3) - 2}
    nodes = [_t("X", "U", NHWC), helper.make_node("Sub", ["U", "m"], ["A"]),
             helper.make_node("Mul", ["A", "s"], ["B"]), helper.make_node("Add", ["B", "b"], ["C"]),
             helper.make_node("Relu", ["C"], ["M"]), _t("M", "Y", NCHW)]
    model = make_model(nodes, [_x()], [_out("Y")], inits)
    out, records = run_once(model, "sink_transpose")
    assert records.stats["by_kind"] == {"Add": 1, "Mul": 1, "Relu": 1, "Sub": 1}
    assert ops(out) == ["Sub", "Mul", "Add", "Relu", "Transpose", "Transpose"]
    out, _ = _check(model)
    assert "Transpose" not in ops(out)


@pytest.mark.parametrize("shape", [(), (1,), (3,), (1, 3), (5, 1), (5, 3), (1, 1, 1), (4, 1, 1),
                                   (1, 4, 5, 3), (2, 4, 5, 3)])
@pytest.mark.parametrize("op,left", [("Add", False), ("Sub", True), ("Div", True),
                                     ("Mul", False), ("Max", False), ("Pow", False)])
def test_constant_of_every_rank(shape, op, left):
    """A constant of rank 0..4 (left or right operand) broadcast against NHWC [n,4,5,3]: re-laid
    out for NCHW. (A [2,4,5,3] constant broadcasts the batch: valid only for n in {1, 2}.)"""
    rng = np.random.default_rng(len(shape))
    c = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    inputs = ["c", "U"] if left else ["U", "c"]
    nodes = [_t("X", "U", NHWC), helper.make_node(op, inputs, ["M"]), _t("M", "Y", NCHW)]
    if op == "Pow":  # a positive base
        nodes[:1] = [helper.make_node("Abs", ["X"], ["A"]), _t("A", "U", NHWC)]
    model = make_model(nodes, [_x()], [_out("Y")], {"c": c})
    out, _ = run_passes(model, PASSES)
    batches = (2, 1) if shape[:1] == (2,) else (2, 0)
    assert_same_outputs(model, out, [random_feed(model, s, d) for s, d in enumerate(batches)])
    assert ops(out) == ([op] if op != "Pow" else ["Abs", op])


def test_two_transposed_operands():
    nodes = [_t("X", "T", NCHW), _t("Z", "S", NCHW), helper.make_node("Add", ["T", "S"], ["M"]),
             _t("M", "Y", NHWC)]
    model = make_model(nodes, [_x(), _x(name="Z")], [_out("Y")])
    out, records = _check(model)
    assert ops(out) == ["Add"]
    assert records[0].stats == {"rewritten": 1, "by_kind": {"Add": 1}}


def test_residual_block():
    """Keras-style block: y = Relu(x) read by the next Conv's Transpose and by a residual Add
    whose other operand carries the same Transpose; everything but the Conv's own pair goes."""
    w = np.random.default_rng(0).normal(size=(3, 3, 1, 1)).astype(np.float32)
    nodes = [_t("X", "T0", NHWC), helper.make_node("Relu", ["T0"], ["R"]),
             _t("R", "I", NCHW), helper.make_node("Conv", ["I", "w"], ["C"]),
             _t("C", "O", NHWC), helper.make_node("Add", ["O", "R"], ["A"]),
             helper.make_node("Relu", ["A"], ["M"]), _t("M", "Y", NCHW)]
    model = make_model(nodes, [("X", np.float32, ["n", 3, 4, 5])], [_out("Y")], {"w": w})
    out, _ = _check(model)
    assert sorted(ops(out)) == ["Add", "Conv", "Relu", "Relu"]


def test_nhwc_conv_block_through_default_pipeline():
    """The wrapped Conv of a Keras export: after the Transposes cancel, the batch norm's
    Sub/Mul/Add fold into the Conv, leaving the input Transpose, the Conv and the Relu."""
    rng = np.random.default_rng(1)
    inits = {"w": rng.normal(size=(6, 3, 3, 3)).astype(np.float32),
             "m": rng.normal(size=(1, 1, 1, 6)).astype(np.float32),
             "s": rng.uniform(0.5, 1.5, (6,)).astype(np.float32),
             "b": rng.normal(size=(1, 1, 1, 6)).astype(np.float32)}
    nodes = [_t("X", "I", NCHW), helper.make_node("Conv", ["I", "w"], ["C"], pads=[1, 1, 1, 1]),
             _t("C", "O", NHWC), helper.make_node("Sub", ["O", "m"], ["A"]),
             helper.make_node("Mul", ["A", "s"], ["B"]), helper.make_node("Add", ["B", "b"], ["D"]),
             helper.make_node("Relu", ["D"], ["E"]),
             helper.make_node("ReduceMean", ["E"], ["Y"], axes=[1, 2], keepdims=0)]
    model = make_model(nodes, [("X", np.float32, ["n", 4, 5, 3])],
                       [("Y", np.float32, ["n", 6])], inits, opset=13)
    out, _ = _check(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["Transpose", "Conv", "Relu", "ReduceMean"]


@pytest.mark.parametrize("opset,form", [(13, "attr"), (18, "input")])
@pytest.mark.parametrize("axes,keepdims", [([1, 2], 0), ([1, 2], 1), ([-1], 0), ([0, 3], 0),
                                           ([2], 1), (None, 0), (None, 1)])
def test_reduce_absorbs(opset, form, axes, keepdims):
    """ReduceMean/ReduceSum of an NHWC view: axes renumbered; with keepdims=0 the Transpose
    disappears when the kept axes stay in order."""
    inits, inputs, attrs = {}, ["T"], {"keepdims": keepdims}
    if axes is not None and form == "input":
        inits["axes"] = np.array(axes, np.int64)
        inputs.append("axes")
    elif axes is not None:
        attrs["axes"] = axes
    rank = 4 if keepdims else 4 - (len(axes) if axes else 4)
    results = []
    for op in ("ReduceMean", "ReduceSum"):
        if op == "ReduceSum" and form == "attr" and opset >= 13:
            continue
        model = _sandwich([helper.make_node(op, inputs, ["M"], **attrs)], inits=inits,
                          opset=opset, out_rank=rank, last=None, first=NHWC)
        out, _ = _check(model, ["sink_transpose"])
        results.append(ops(out))
    kept = [i for i in range(4) if axes is not None and i % 4 not in {a % 4 for a in axes}]
    in_order = [NHWC[i] for i in kept] == sorted(NHWC[i] for i in kept)
    for found in results:
        gone = axes is None or (not keepdims and in_order)
        assert found.count("Transpose") == (0 if gone else 1)


def test_reduce_noop_with_empty_axes():
    model = _sandwich([helper.make_node("ReduceMax", ["T"], ["M"], noop_with_empty_axes=1)],
                      opset=18)
    out, _ = _check(model)
    assert ops(out) == ["ReduceMax"]


@pytest.mark.parametrize("axis,keepdims", [(1, 0), (3, 1), (-1, 0)])
def test_argmax(axis, keepdims):
    model = _sandwich([helper.make_node("ArgMax", ["T"], ["M"], axis=axis, keepdims=keepdims)],
                      out_rank=4 if keepdims else 3, out_dtype=np.int64, last=None)
    _check(model, ["sink_transpose"])


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_axis(op):
    model = _sandwich([helper.make_node(op, ["T"], ["M"], axis=2)])
    out, _ = _check(model)
    assert ops(out) == [op]


def test_softmax_before_opset_13_refused():
    model = _sandwich([helper.make_node("Softmax", ["T"], ["M"], axis=1)], opset=11)
    out, record = run_once(model, "sink_transpose")
    assert record.stats == {"rewritten": 0,
                            "refused": {"softmax axis flattens before opset 13": 1}}


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("opset", [11, 18])
def test_pad(mode, opset):
    inits = {"pads": np.array([0, 1, 2, 0, 0, 2, 1, 0], np.int64)}
    model = _sandwich([helper.make_node("Pad", ["T", "pads"], ["M"], mode=mode)], inits=inits,
                      opset=opset)
    out, _ = _check(model)
    assert ops(out) == ["Pad"]


def test_pad_with_axes():
    inits = {"pads": np.array([1, 2, 0, 1], np.int64), "axes": np.array([2, -1], np.int64)}
    model = _sandwich([helper.make_node("Pad", ["T", "pads", "", "axes"], ["M"])], inits=inits,
                      opset=18)
    out, _ = _check(model)
    assert ops(out) == ["Pad"]


def test_graph_output_name_kept():
    """The moved Transpose writes the op's output, a graph output."""
    model = _sandwich([helper.make_node("Relu", ["T"], ["M"])], last=None)
    out, _ = _check(model)
    assert ops(out) == ["Relu", "Transpose"] and out.graph.node[1].output == ["M"]


def test_shared_transpose_reader_refuses():
    """T read by a Relu (a graph output) and by a MatMul (not layout-neutral): moving it below
    the Relu would add a Transpose, so it stays."""
    nodes = [_t("X", "T", NCHW), helper.make_node("Relu", ["T"], ["Y"]),
             helper.make_node("MatMul", ["T", "w"], ["Z"])]
    model = make_model(nodes, [_x()], [_out("Y"), _out("Z")],
                       {"w": np.ones((4, 2), np.float32)})
    out, record = run_once(model, "sink_transpose")
    assert record.stats == {"rewritten": 0,
                            "refused": {"transpose would stay for other readers": 1}}
    assert_same_outputs(model, out, _feeds(model))


def test_shared_transpose_all_readers_meet_inverses():
    """T read by a Relu and a Sigmoid, each followed by the inverse: both move (their output
    Transposes merge), and T goes."""
    nodes = [_t("X", "T", NCHW), helper.make_node("Relu", ["T"], ["R"]), _t("R", "Y", NHWC),
             helper.make_node("Sigmoid", ["T"], ["S"]), _t("S", "Z", NHWC)]
    model = make_model(nodes, [_x()], [_out("Y"), _out("Z")])
    out, _ = _check(model)
    assert sorted(ops(out)) == ["Relu", "Sigmoid"]


@pytest.mark.parametrize("case,reason", [
    ("higher rank", "constant has a higher rank"),
    ("variable", "operand is not transposed"),
    ("perms", "operands transposed differently"),
])
def test_refusals(case, reason):
    inputs, inits, operand = [_x()], {}, "c"
    nodes = [_t("X", "T", NCHW)]
    if case == "higher rank":
        inits["c"] = np.ones((2, 1, 1, 1, 1), np.float32)
    elif case == "variable":
        inputs.append(("c", np.float32, [4]))
    else:
        inputs.append(("W", np.float32, ["n", 5, 4, 3]))
        nodes.append(_t("W", "S", (0, 1, 3, 2)))
        operand = "S"
    nodes += [helper.make_node("Add", ["T", operand], ["M"])]
    rank = 5 if case == "higher rank" else 4
    model = make_model(nodes, inputs, [_out("M", rank)], inits)
    out, record = run_once(model, "sink_transpose")
    assert record.stats == {"rewritten": 0, "refused": {reason: 1}}
    assert_same_outputs(model, out, _feeds(model))


def test_all_ones_variable_operand_accepted():
    """A non-constant operand of inferred shape [1, 1] broadcasts the same in any layout."""
    nodes = [_t("X", "T", NCHW), helper.make_node("Mul", ["T", "s"], ["M"]), _t("M", "Y", NHWC)]
    model = make_model(nodes, [_x(), ("s", np.float32, [1, 1])], [_out("Y")])
    out, _ = _check(model)
    assert ops(out) == ["Mul"]


def test_every_rank3_perm_with_constant():
    """Every perm p of rank 3, then Mul by a [4,1,3]-broadcastable constant and the inverse."""
    nodes, outputs, inits = [], [], {}
    for k, p in enumerate(itertools.permutations(range(3))):
        shape = [(2, 3, 4)[i] for i in p]
        inits[f"c{k}"] = np.arange(np.prod(shape[1:]), dtype=np.float32).reshape(shape[1:]) + 1
        inv = list(np.argsort(p))
        nodes += [_t("X", f"T{k}", p), helper.make_node("Mul", [f"T{k}", f"c{k}"], [f"M{k}"]),
                  _t(f"M{k}", f"Y{k}", inv)]
        outputs.append(_out(f"Y{k}", 3))
    model = make_model(nodes, [("X", np.float32, [2, 3, 4])], outputs, inits)
    out, _ = run_passes(model, PASSES)
    assert ops(out).count("Transpose") == 0
    assert_same_outputs(model, out)


_UNARY_CHOICES = ("Relu", "Neg", "Abs", "Sigmoid", "Tanh")
_BINARY_CHOICES = ("Add", "Sub", "Mul", "Max", "Min")


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_chains(data):
    """Random chains of unary ops, binary ops with constants of random broadcastable shapes
    (either side) and with a second transposed input, Reduce and a final inverse or no
    Transpose: outputs equal the original's at batch 2 and 0; Transposes never increase."""
    perm = data.draw(st.sampled_from(list(itertools.permutations(range(4)))))
    dims = [3, 4, 5]
    nhwc = ["n", *dims]
    src = [nhwc[i] for i in np.argsort(perm)]  # so that Transpose(src, perm) is [n, 3, 4, 5]
    nodes = [_t("X", "t0", perm), _t("Z", "z0", perm)]
    inits, cur = {}, "t0"
    for k in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["unary", "const", "pair"]))
        out = f"t{k + 1}"
        if kind == "unary":
            nodes.append(helper.make_node(data.draw(st.sampled_from(_UNARY_CHOICES)), [cur], [out]))
        else:
            op = data.draw(st.sampled_from(_BINARY_CHOICES))
            if kind == "const":
                rank = data.draw(st.integers(0, 3))
                shape = [data.draw(st.sampled_from([1, d])) for d in dims[3 - rank:]]
                inits[f"c{k}"] = np.random.default_rng(k).normal(size=shape).astype(np.float32)
                other = f"c{k}"
            else:
                other = "z0"
            pair = [other, cur] if data.draw(st.booleans()) else [cur, other]
            nodes.append(helper.make_node(op, pair, [out]))
        cur = out
    end = data.draw(st.sampled_from(["inverse", "none", "reduce"]))
    if end == "inverse":
        nodes.append(_t(cur, "Y", np.argsort(perm)))
        outputs = [_out("Y")]
    elif end == "reduce":
        nodes.append(helper.make_node("ReduceMean", [cur], ["Y"], axes=[1, 2], keepdims=0))
        outputs = [_out("Y", 2)]
    else:
        outputs = [(cur, np.float32, ["n", *dims])]
    model = make_model(nodes, [("X", np.float32, src), ("Z", np.float32, src)], outputs, inits,
                       opset=13)
    out, _ = run_passes(model, PASSES)
    assert ops(out).count("Transpose") <= ops(model).count("Transpose")
    assert_same_outputs(model, out, _feeds(model))


def test_no_float16_transpose_onnxruntime_crashes_on(tmp_path):
    """``Cast(Transpose(x, [1, 0, 2]), float16)`` read by a MatMul with a constant weight: moved
    below the Cast, the Transpose would be float16, which onnxruntime 1.32's default session
    crashes on (``onnxopt.ops.onnxruntime_crashes_on_transpose``): refused, and the model
    loads. Read by a Relu instead, it moves."""
    from helpers import loads_optimized

    def model(reader):
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
                 helper.make_node("Cast", ["t"], ["c"], to=TensorProto.FLOAT16),
                 helper.make_node("MatMul", ["c", "W"], ["y"]) if reader == "MatMul"
                 else helper.make_node("Relu", ["c"], ["y"])]
        w = {"W": np.ones((8, 3), np.float16)} if reader == "MatMul" else {}
        return make_model(nodes, [("x", np.float32, [4, 2, 8])],
                          [("y", np.float16, [2, 4, 3 if reader == "MatMul" else 8])], w)

    out, record = run_once(model("MatMul"), "sink_transpose")
    assert ops(out) == ["Transpose", "Cast", "MatMul"]
    assert any("crashes on a float16 Transpose" in r for r in record.stats["refused"])
    assert loads_optimized(out, tmp_path) == 0
    out, _ = run_once(model("Relu"), "sink_transpose")
    assert ops(out) == ["Cast", "Relu", "Transpose"]
