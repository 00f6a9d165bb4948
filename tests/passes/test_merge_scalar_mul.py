"""Tests of passes/merge_scalar_mul.py: two Mul/Div by one-element constants become one node
(compared with the original on onnxruntime within float rounding, batch 0 included); every
refusal refused."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    assert_same_outputs,
    initializers,
    make_model,
    ops,
    run_once,
    run_passes,
    with_and_without,
)
from onnx import helper


def _scale(op, x, c, out, const_first=False):
    return helper.make_node(op, [c, x] if const_first else [x, c], [out])


def _chain_model(first, c1, second, c2, x_shape=("N", 3), dtype=np.float32, const_first=False,
                 extra_outputs=()):
    """X -> first(c1) -> A -> second(c2) -> Y."""
    inits = {"c1": np.asarray(c1, dtype), "c2": np.asarray(c2, dtype)}
    nodes = [_scale(first, "X", "c1", "A", const_first and first == "Mul"),
             _scale(second, "A", "c2", "Y", const_first and second == "Mul")]
    rank = [None] * max(len(x_shape), np.ndim(c1), np.ndim(c2))
    outputs = [("Y", dtype, rank)] + [(n, dtype, rank) for n in extra_outputs]
    if "R" in extra_outputs:
        nodes.append(helper.make_node("Neg", ["A"], ["R"]))
    return make_model(nodes, [("X", dtype, list(x_shape))], outputs, inits)


def _feeds(shapes, dtype=np.float32):
    rng = np.random.default_rng(0)
    return [{"X": np.asarray(rng.normal(size=s) * 10, dtype)} for s in shapes]


@pytest.mark.parametrize("first,second,op", [("Mul", "Mul", "Mul"), ("Mul", "Div", "Mul"),
                                             ("Div", "Mul", "Mul"), ("Div", "Div", "Div")])
@pytest.mark.parametrize("c1,c2", [(0.5, 3.0), ([1.5], [[-0.125]]), ([[7.0]], 0.3)])
@pytest.mark.parametrize("const_first", [False, True])
def test_pair_merged(first, second, op, c1, c2, const_first):
    model = _chain_model(first, c1, second, c2, const_first=const_first)
    out, records = run_passes(model, ["merge_scalar_mul"])
    assert ops(out) == [op] and list(out.graph.node[0].input)[0] == "X"
    assert records[0].stats == {"rewritten": 1, "by_kind": {f"{first}·{second}": 1}}
    k = initializers(out)[out.graph.node[0].input[1]]
    assert k.shape == np.broadcast_shapes(np.shape(c1), np.shape(c2))
    assert_same_outputs(model, out, _feeds([(4, 3), (0, 3), (1, 3)]), rtol=1e-6, atol=0)


def test_scalar_input_with_one_element_constant_keeps_shape():
    """A scalar X times [1] is [1]: the folded constant keeps that shape."""
    model = _chain_model("Mul", [2.0], "Div", 3.0, x_shape=())
    out, _ = run_passes(model, ["merge_scalar_mul"])
    assert ops(out) == ["Mul"]
    assert_same_outputs(model, out, _feeds([()]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_long_chain_folds_into_one_node(dtype):
    inits = {f"c{i}": np.asarray(v, dtype) for i, v in enumerate((2.0, 0.25, 3.0, 1.5))}
    nodes = [_scale("Mul", "X", "c0", "A"), _scale("Div", "A", "c1", "B"),
             _scale("Mul", "B", "c2", "C"), _scale("Div", "C", "c3", "Y")]
    model = make_model(nodes, [("X", dtype, ["N", 3])], [("Y", dtype, ["N", 3])], inits)
    out, _ = run_passes(model, ["merge_scalar_mul"])
    assert ops(out) == ["Mul"]
    np.testing.assert_allclose(initializers(out)[out.graph.node[0].input[1]], 16.0)
    assert_same_outputs(model, out, _feeds([(4, 3), (0, 3)], dtype), rtol=2e-3, atol=0)


@pytest.mark.parametrize("kwargs,reason", [
    ({"extra_outputs": ("A",)}, "intermediate is a graph output"),
    ({"extra_outputs": ("R",)}, "intermediate has other readers"),
    ({"c1": 0.0}, "constant is zero or not finite"),
    ({"c2": np.inf}, "constant is zero or not finite"),
    ({"c1": 300.0, "c2": 300.0, "dtype": np.float16}, "folded constant over- or underflows"),
    ({"c1": 1e-3, "c2": 1e-3, "dtype": np.float16}, "folded constant over- or underflows"),
    ({"dtype": np.int64, "c1": 2, "c2": 3}, "dtype is not float16, float or double"),
])
def test_refused(kwargs, reason):
    args = {"first": "Mul", "c1": 2.0, "second": "Mul", "c2": 3.0, **kwargs}
    model = _chain_model(**args)
    out, result = run_once(model, "merge_scalar_mul")
    assert not result.modified and result.stats["refused"] == {reason: 1}


@pytest.mark.parametrize("case", ["per_channel", "divisor_is_x", "overridable"])
def test_not_a_scale_chain(case):
    """A constant of more than one element, x as the divisor, or a constant that is also a graph
    input: not this rule."""
    c2 = [1.0, 2.0, 3.0] if case == "per_channel" else 3.0
    model = _chain_model("Mul", 2.0, "Mul", c2)
    if case == "divisor_is_x":
        model.graph.node[1].CopyFrom(helper.make_node("Div", ["c2", "A"], ["Y"]))
    if case == "overridable":
        model.graph.input.append(helper.make_tensor_value_info("c1", 1, []))
    _, result = run_once(model, "merge_scalar_mul")
    assert result.stats == {"rewritten": 0}


@pytest.mark.zoo
@pytest.mark.parametrize("name,fewer", [("ch_PP-OCRv4_det_infer", 24),
                                        ("ch_PP-OCRv4_rec_infer", 28)])
def test_real_models(name, fewer):
    """PaddleOCR's hard-swish ends in ``Div(., 6)``, which a learned scalar scale
    (``whswish_b``) multiplies: one Mul each, and the model still validates (without
    ``fuse_hard_swish``, which folds that ``/ 6`` into the scale itself)."""
    (_, base), (_, report) = with_and_without(name, "merge_scalar_mul",
                                              also_without=["fuse_hard_swish"])
    assert report.after.nodes == base.after.nodes - fewer
