"""Tests of passes/reshape_from_shape.py: Reshape targets built from the input's own dims become
constants with 0 for the copied dims (every part form, with and without a -1, in an opset where
ONNX inference gives no rank), each refusal; compared with onnxruntime on the original at batch 2
and batch 0 (where the -1 makes both fail, both must fail)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_same_outputs, initializers, make_model, ops, random_feed, run_once, \
    run_ort
from onnx import helper

X = ("X", np.float32, ["n", 6, 4])
A = ("A", np.float32, ["n", 6, 4])
_GELU = helper.make_node("Gelu", ["A"], ["X"], domain="com.microsoft")


def _reshape_model(parts, inits, out_rank, extra=(), allowzero=None, opset=17, inputs=(X,)):
    """X -> Reshape(X, Concat(parts)) -> Y; ``extra`` nodes build the parts (and may compute X
    from a com.microsoft op, whose output rank ONNX inference does not give)."""
    attrs = {} if allowzero is None else {"allowzero": allowzero}
    nodes = [*extra, helper.make_node("Concat", parts, ["target"], axis=0),
             helper.make_node("Reshape", ["X", "target"], ["Y"], **attrs)]
    contrib = any(n.domain == "com.microsoft" for n in extra)
    model = make_model(nodes, list(inputs),
                       [("Y", np.float32, [f"y{i}" for i in range(out_rank)])], inits,
                       opset=opset, check=not contrib)
    if contrib:
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _gather(index, out, shape_out="S", scalar=False):
    """Shape(X) -> Gather(index) [-> Unsqueeze([0])] -> out."""
    nodes = [helper.make_node("Shape", ["X"], [shape_out]),
             helper.make_node("Gather", [shape_out, f"{out}_j"], [f"{out}_g" if scalar else out],
                              axis=0)]
    if scalar:
        nodes.append(helper.make_node("Unsqueeze", [f"{out}_g", "zero"], [out]))
    return nodes


def _compare(model, batches=(2, 0)):
    """The pass's output against the original at each batch size: same values, or both fail."""
    out, record = run_once(model, "reshape_from_shape")
    for dim in batches:
        feed = random_feed(model, 0, dim)
        try:
            ref = run_ort(model, feed)
        except Exception:  # noqa: BLE001 -- the original fails: so must the rewrite
            with pytest.raises(Exception):
                run_ort(out, feed)
            continue
        assert_same_outputs(model, out, [feed])
        assert ref
    return out, record


@pytest.mark.parametrize("scalar", [True, False])
@pytest.mark.parametrize("rest", [[-1, 2], [3, 8], [-1], [24]])
def test_batch_then_constants(scalar, rest):
    """[X.shape[0], rest...]: the 0-d index under Unsqueeze, or a 1-D index."""
    j = np.array(0 if scalar else [0], np.int64)
    inits = {"p_j": j, "zero": np.array([0], np.int64), "rest": np.array(rest, np.int64)}
    model = _reshape_model(["p", "rest"], inits, 1 + len(rest), _gather(0, "p", scalar=scalar))
    out, record = _compare(model)
    assert record.stats == {"rewritten": 1}
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert list(initializers(out)[reshape.input[1]]) == [0, *rest]


def test_two_dims_one_gather_and_shape_range():
    """[X.shape[0:2] (Shape start/end), -1] and [Gather(Shape, [0, 1]), -1], opset 15."""
    nodes = [helper.make_node("Shape", ["X"], ["p"], start=0, end=2)]
    model = _reshape_model(["p", "m1"], {"m1": np.array([-1], np.int64)}, 3, nodes, opset=15)
    out, record = _compare(model)
    assert record.stats == {"rewritten": 1}
    inits = {"p_j": np.array([0, 1], np.int64), "m1": np.array([-1], np.int64)}
    model = _reshape_model(["p", "m1"], inits, 3, _gather(0, "p"))
    out, record = _compare(model)
    assert record.stats == {"rewritten": 1}


def test_dims_after_constants():
    """[2, X.shape[1], -1]: a copied dim after a constant part, at its own position 1."""
    inits = {"c": np.array([2], np.int64), "p_j": np.array([1], np.int64),
             "m1": np.array([-1], np.int64)}
    x = ("X", np.float32, [2, "m", 4])
    model = _reshape_model(["c", "p", "m1"], inits, 3, _gather(0, "p"), inputs=[x])
    _, record = _compare(model, batches=(3,))
    assert record.stats == {"rewritten": 1}


def test_no_rank_needed_past_unknown_op():
    """X comes from a com.microsoft op that ONNX inference does not know: the Gather form needs
    no rank."""
    inits = {"p_j": np.array(0, np.int64), "zero": np.array([0], np.int64),
             "rest": np.array([-1], np.int64)}
    model = _reshape_model(["p", "rest"], inits, 2, [_GELU, *_gather(0, "p", scalar=True)],
                           inputs=[A])
    out, record = _compare(model)
    assert record.stats == {"rewritten": 1}
    assert "Concat" in ops(out)  # left to eliminate_dead


@pytest.mark.parametrize("case,reason", [
    ("position", "dim at another position"),
    ("allowzero", "allowzero"),
    ("other tensor", "part not recognized"),
    ("negative unknown rank", "rank unknown"),
])
def test_refusals(case, reason):
    inits = {"p_j": np.array([1 if case == "position" else 0], np.int64),
             "rest": np.array([-1], np.int64)}
    extra, inputs = _gather(0, "p"), [X]
    if case == "other tensor":  # of other dims: Z's dim 0 is not X's
        extra[0] = helper.make_node("Shape", ["Z"], ["S"])
        inputs.append(("Z", np.float32, ["k", 6, 4]))
    if case == "allowzero":  # the -1 (m * 4) is not a number: no allowzero 0 target
        inputs = [("X", np.float32, ["n", "m", 4])]
    if case == "negative unknown rank":
        inits["p_j"] = np.array([-3], np.int64)
        extra, inputs = [_GELU, *extra], [A]
    model = _reshape_model(["p", "rest"], inits, 2, extra, inputs=inputs,
                           allowzero=1 if case == "allowzero" else None)
    _, record = run_once(model, "reshape_from_shape")
    assert record.stats == {"rewritten": 0, "refused": {reason: 1}}


def _attention_model(allowzero, h_shape=("b", "s", 8)):
    """``q = MatMul(h, W)`` reshaped to ``[Shape(h)[0], Shape(h)[1], -1, 4]`` (the dims of
    another tensor than the Reshape's input, as in every attention block of a torch export)."""
    nodes = [helper.make_node("MatMul", ["h", "W"], ["q"]),
             helper.make_node("Shape", ["h"], ["b1"], start=0, end=1),
             helper.make_node("Shape", ["h"], ["s1"], start=1, end=2),
             helper.make_node("Concat", ["b1", "s1", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["q", "target"], ["Y"], allowzero=allowzero)]
    inits = {"W": np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32),
             "rest": np.array([-1, 4], np.int64)}
    return make_model(nodes, [("h", np.float32, list(h_shape))],
                      [("Y", np.float32, ["y0", "y1", "y2", "y3"])], inits)


def _feeds(*shapes):
    rng = np.random.default_rng(0)
    return [{"h": rng.normal(size=(*s, 8)).astype(np.float32)} for s in shapes]


@pytest.mark.parametrize("allowzero", [0, 1])
def test_dims_of_another_tensor_with_the_same_symbols(allowzero):
    """``h`` and ``q`` have dims ``b, s``: the target is ``[0, 0, -1, 4]`` (allowzero 0), or
    ``[0, 0, 2, 4]`` with allowzero 0 (allowzero 1: the -1 is proved to be 2; a -1 beside a
    copied 0 would fail at batch 0, where allowzero 1 gives [0, s, 2, 4]). Batch 0 and empty
    sequences: the same outputs, or both fail."""
    model = _attention_model(allowzero)
    out, record = run_once(model, "reshape_from_shape")
    assert record.stats == {"rewritten": 1}
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert list(initializers(out)[reshape.input[1]]) == [0, 0, 2 if allowzero else -1, 4]
    assert helper.get_attribute_value(reshape.attribute[0]) == 0
    for feed in _feeds((2, 3), (0, 3), (2, 0), (0, 0), (1, 1)):
        try:
            ref = run_ort(model, feed)
        except Exception:  # noqa: BLE001 -- the original fails: so must the rewrite
            assert not allowzero  # allowzero 1 runs on every size
            with pytest.raises(Exception):
                run_ort(out, feed)
            continue
        assert_same_outputs(model, out, [feed])
        assert ref


def test_dims_of_another_tensor_refused():
    """``h[b, s, 8]`` but ``q = MatMul(h', W)`` of ``h'[b, t, 8]``: dim 1 differs (the parts are
    not dims of ``q`` itself either)."""
    model = _attention_model(0)
    model.graph.input.append(helper.make_tensor_value_info("h2", 1, ["b", "t", 8]))
    model.graph.node[0].input[0] = "h2"
    _, record = run_once(model, "reshape_from_shape")
    assert record.stats == {"rewritten": 0, "refused": {"part not recognized": 1}}
