"""Tests of passes/fuse_hard_swish.py: ``x * Clip(x + 3, 0, 6)`` (and its scale) becomes
HardSwish (opset 14 on) or x * HardSigmoid(x) below, compared with the original on onnxruntime
within float rounding (batch 0 included, values around the Clip's corners); every refusal
refused."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (assert_same_outputs, initializers, make_model, ops, run_once,
                     with_and_without)
from onnx import helper


def _h_swish(opset=14, scale=("Mul", 1 / 6), swapped=False, dtype=np.float32,
             three=3.0, high=6.0, extra=(), x_shape=("N", 4, 3), clip_attrs=False):
    """X -> Add(X, 3) -> Clip(0, 6) -> Mul(X, .) -> scale -> Y (scale None: the product is Y)."""
    inits = {"three": np.asarray(three, dtype)}
    if clip_attrs:
        clip = helper.make_node("Clip", ["A"], ["C"], min=0.0, max=float(high))
    else:
        inits.update(low=np.asarray(0.0, dtype), high=np.asarray(high, dtype))
        clip = helper.make_node("Clip", ["A", "low", "high"], ["C"])
    product = "M" if scale else "Y"
    nodes = [helper.make_node("Add", ["three", "X"] if swapped else ["X", "three"], ["A"]),
             clip,
             helper.make_node("Mul", ["C", "X"] if swapped else ["X", "C"], [product])]
    if scale:
        op, k = scale
        inits["k"] = np.asarray(k, dtype)
        nodes.append(helper.make_node(op, ["k", "M"] if swapped and op == "Mul" else ["M", "k"],
                                      ["Y"]))
    rank = [None] * 3
    outputs = [("Y", dtype, rank)] + [(n, dtype, rank) for n in extra]
    if "R" in extra:
        nodes.append(helper.make_node("Neg", ["C"], ["R"]))
    return make_model(nodes, [("X", dtype, None if x_shape is None else list(x_shape))],
                      outputs, inits, opset=opset, check=x_shape is not None)


def _feeds(dtype=np.float32, shape=(2, 4, 3)):
    rng = np.random.default_rng(0)
    corners = np.array([-3.0, 3.0, -3.0001, 2.9999, 0.0, -6.0, 6.0, 10.0, -10.0, 1.0, -1.0,
                        0.5], dtype)
    return [{"X": np.asarray(rng.normal(size=shape) * 4, dtype)},
            {"X": corners.reshape(1, 4, 3).astype(dtype)},
            {"X": np.zeros((0,) + tuple(shape[1:]), dtype)}]


@pytest.mark.parametrize("scale", [("Mul", 1 / 6), ("Div", 6.0),
                                   ("Mul", [[0.25], [-2.0], [1.5], [3.0]]),  # per channel
                                   ("Div", [[0.5], [4.0], [-1.0], [8.0]])])
@pytest.mark.parametrize("opset", [13, 14])
@pytest.mark.parametrize("swapped", [False, True])
def test_h_swish_fused_with_its_scale(scale, opset, swapped):
    model = _h_swish(opset, scale, swapped)
    out, result = run_once(model, "fuse_hard_swish")
    if opset >= 14:
        assert ops(out) == ["HardSwish", "Mul"]
        assert result.stats["by_kind"] == {"HardSwish (scale folded)": 1}
    else:
        assert sorted(ops(out)) == ["HardSigmoid", "Mul", "Mul"]
        assert result.stats["by_kind"] == {"HardSigmoid (scale folded)": 1}
        sigmoid = next(n for n in out.graph.node if n.op_type == "HardSigmoid")
        assert {a.name: round(a.f, 7) for a in sigmoid.attribute} == {"alpha": round(1 / 6, 7),
                                                                       "beta": 0.5}
    k = np.asarray(scale[1], np.float64)
    folded = [v for v in initializers(out).values() if v.shape == k.shape]
    np.testing.assert_allclose(folded[0], 6 * k if scale[0] == "Mul" else 6 / k, rtol=1e-6)
    assert_same_outputs(model, out, _feeds(), rtol=1e-5, atol=1e-6)


def test_clip_bounds_as_attributes_below_opset_11():
    model = _h_swish(opset=10, clip_attrs=True)
    out, result = run_once(model, "fuse_hard_swish")
    assert result.stats["rewritten"] == 1 and "HardSigmoid" in ops(out)
    assert_same_outputs(model, out, _feeds(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_dtypes_are_refused(dtype):
    """onnxruntime's CPU kernels of HardSigmoid (and HardSwish for double) are float only."""
    out, result = run_once(_h_swish(dtype=dtype), "fuse_hard_swish")
    assert not result.modified
    assert result.stats["refused"] == {"dtype is not float (onnxruntime's kernels)": 1}


def test_without_a_scale_the_six_stays_from_opset_14_and_nothing_changes_below():
    model = _h_swish(14, scale=None)
    out, result = run_once(model, "fuse_hard_swish")
    assert sorted(ops(out)) == ["HardSwish", "Mul"]
    assert result.stats["by_kind"] == {"HardSwish": 1}
    assert_same_outputs(model, out, _feeds(), rtol=1e-5, atol=1e-6)
    out, result = run_once(_h_swish(13, scale=None), "fuse_hard_swish")
    assert not result.modified
    assert result.stats["refused"] == {"no scale to fold the 6 into below opset 14 (no node "
                                       "saved)": 1}


def test_a_product_read_twice_keeps_its_scale_and_gets_the_six():
    """The product has a second reader: the scale cannot take the 6, so the product itself
    becomes Mul(HardSwish(x), 6)."""
    model = _h_swish(14, extra=("M",))
    out, result = run_once(model, "fuse_hard_swish")
    assert result.stats["by_kind"] == {"HardSwish": 1}
    assert_same_outputs(model, out, _feeds(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,reason", [
    ({"extra": ("A",)}, "x + 3 or its Clip has other readers or is a graph output"),
    ({"extra": ("R",)}, "x + 3 or its Clip has other readers or is a graph output"),
    ({"three": [[[3.0]]], "x_shape": None}, "the constant 3 may broadcast the shape of x"),
])
def test_refused(kwargs, reason):
    model = _h_swish(**kwargs)
    out, result = run_once(model, "fuse_hard_swish")
    assert not result.modified and result.stats["refused"] == {reason: 1}


@pytest.mark.parametrize("kwargs", [{"three": 2.0}, {"high": 5.0}])
def test_other_constants_are_not_h_swish(kwargs):
    out, result = run_once(_h_swish(**kwargs), "fuse_hard_swish")
    assert not result.modified and "refused" not in result.stats


@pytest.mark.zoo
@pytest.mark.parametrize("name,fused,fewer", [("ch_PP-OCRv4_det_infer", 24, 24),
                                              ("ch_PP-OCRv4_rec_infer", 28, 28),
                                              ("ch_ppocr_mobile_v2.0_cls_infer", 18, 27)])
def test_real_models(name, fused, fewer):
    """PaddleOCR's h-swish (opset 11-12 exports): ``x * HardSigmoid(x)`` with the 6 in the
    following scale, one node fewer each -- two where the scale was h-swish's own ``/ 6``,
    which becomes a Mul by 1 that ``remove_noop`` drops (9 of the angle classifier's 18) --
    and the model still validates."""
    (_, base), (_, report) = with_and_without(name, "fuse_hard_swish")
    assert report.after.nodes == base.after.nodes - fewer
    kinds = [r.stats.get("by_kind") for r in report.passes
             if r.name == "fuse_hard_swish" and r.stats["rewritten"]]
    assert kinds == [{"HardSigmoid (scale folded)": fused}]  # all in the first round
