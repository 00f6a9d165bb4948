"""Tests of passes/fold_zero.py: an all-zero bias is dropped and a product with an all-zero weight
becomes the constant it computes, with the original's outputs on onnxruntime for several values
of every symbolic dim (batch 0 included); each refusal is counted under its reason; the default
pipeline runs the pass and shrinks what it rewrote."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, ops, random_feed, run_once, run_passes
from onnx import helper

from onnxopt.passes import LOSSLESS_PIPELINE

F, I64 = np.float32, np.int64


def _model(nodes, inputs, inits, opset=17, y_dtype=F):
    """``inputs`` -> nodes -> y, with y's type from ONNX shape inference (never read by the
    pass)."""
    model = make_model(nodes, inputs, [("y", y_dtype, None)], inits, opset=opset, check=False)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
    model.graph.output[0].type.CopyFrom(inferred["y"].type)
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(model):
    """Feeds where every symbolic dim is 0, 1 and 3 in turn."""
    return [random_feed(model, seed, dim=dim) for seed, dim in enumerate((0, 1, 3))]


def _node(op, inputs, **attrs):
    return helper.make_node(op, list(inputs), ["y"], **attrs)


def _relu_then(op, inputs, **attrs):
    """Relu(x) -> r, then ``op`` reading r: the rewritten node never reads a graph input."""
    return [helper.make_node("Relu", ["x"], ["r"]), _node(op, inputs, **attrs)]


_ZERO_W = np.zeros((4, 5), F)
_CONV_X = ("x", F, ["N", 3, 8, 8])
_KERNEL0 = np.zeros((6, 3, 3, 3), F)
_BIAS = np.arange(6, dtype=F) - 2.5

# (id, model, the op of the by_kind label)
FOLDED = [
    ("matmul_zero_right_symbolic", _model(_relu_then("MatMul", ["r", "w"]),
                                          [("x", F, ["B", "S", 4])], {"w": _ZERO_W}), "MatMul"),
    ("matmul_zero_right_static", _model(_relu_then("MatMul", ["r", "w"]),
                                        [("x", F, [2, 3, 4])], {"w": _ZERO_W}), "MatMul"),
    ("matmul_zero_vector", _model(_relu_then("MatMul", ["r", "w"]), [("x", F, ["B", 4])],
                                  {"w": np.zeros(4, F)}), "MatMul"),
    ("matmul_zero_left", _model(_relu_then("MatMul", ["w", "r"]), [("x", F, ["B", 5, "N"])],
                                {"w": np.zeros((3, 5), F)}), "MatMul"),
    ("matmul_zero_left_vector", _model(_relu_then("MatMul", ["w", "r"]),
                                       [("x", F, ["B", 5, "N"])], {"w": np.zeros(5, F)}),
     "MatMul"),
    ("matmul_int_zero", _model(_relu_then("MatMul", ["r", "w"]), [("x", np.int32, ["B", 4])],
                               {"w": np.zeros((4, 2), np.int32)}, y_dtype=np.int32), "MatMul"),
    ("gemm_zero_b_bias_transb", _model(_relu_then("Gemm", ["r", "w", "c"], transB=1),
                                       [("x", F, ["M", 4])],
                                       {"w": np.zeros((5, 4), F), "c": np.arange(5, dtype=F)}),
     "Gemm"),
    ("gemm_zero_a_transa_no_bias", _model(_relu_then("Gemm", ["w", "r"], transA=1, alpha=3.0),
                                          [("x", F, [4, "N"])], {"w": np.zeros((4, 2), F)}),
     "Gemm"),
    ("gemm_zero_b_zero_bias", _model(_relu_then("Gemm", ["r", "w", "c"], beta=0.5),
                                     [("x", F, ["M", 4])],
                                     {"w": _ZERO_W, "c": np.zeros((1, 5), F)}), "Gemm"),
    ("conv_zero_kernel_bias", _model(_relu_then("Conv", ["r", "w", "b"], pads=[1, 1, 1, 1],
                                                strides=[2, 2]),
                                     [_CONV_X], {"w": _KERNEL0, "b": _BIAS}), "Conv"),
    ("conv_zero_kernel_grouped_no_bias", _model(_relu_then("Conv", ["r", "w"], group=3),
                                                [_CONV_X], {"w": np.zeros((6, 1, 3, 3), F)}),
     "Conv"),
]


@pytest.mark.parametrize("model, op", [c[1:] for c in FOLDED], ids=[c[0] for c in FOLDED])
def test_zero_weight_folded(model, op):
    out, result = run_once(model, "fold_zero")
    assert result.stats["by_kind"] == {f"{op} zero weight folded": 1}
    assert op not in ops(out)
    assert_same_outputs(model, out, _feeds(model), rtol=0, atol=0)


def test_symbolic_dims_are_read_at_run_time_static_ones_are_constants():
    dynamic = run_once(FOLDED[0][1], "fold_zero")[0]
    assert ops(dynamic) == ["Relu", "Shape", "Gather", "Concat", "ConstantOfShape"]
    static = run_once(FOLDED[1][1], "fold_zero")[0]
    assert ops(static) == ["Relu", "ConstantOfShape"]


def test_default_pipeline_folds_the_product_away():
    model = FOLDED[1][1]  # static: the zeros become one small initializer
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert "MatMul" not in ops(out) and "Relu" not in ops(out)
    assert_same_outputs(model, out, rtol=0, atol=0)


# (id, model, the op whose zero bias is dropped)
BIAS_DROPPED = [
    ("conv", _model(_relu_then("Conv", ["r", "w", "b"]), [_CONV_X],
                    {"w": np.random.default_rng(0).normal(size=(6, 3, 3, 3)).astype(F),
                     "b": np.zeros(6, F)}), "Conv"),
    ("conv_transpose", _model(_relu_then("ConvTranspose", ["r", "w", "b"], strides=[2, 2]),
                              [_CONV_X],
                              {"w": np.random.default_rng(1).normal(size=(3, 2, 3, 3)).astype(F),
                               "b": np.zeros(2, F)}), "ConvTranspose"),
    ("gemm_full_c", _model(_relu_then("Gemm", ["r", "w", "c"], beta=2.0), [("x", F, [3, 4])],
                           {"w": np.ones((4, 5), F), "c": np.zeros((3, 5), F)}), "Gemm"),
    ("gemm_scalar_c_symbolic_m", _model(_relu_then("Gemm", ["r", "w", "c"]),
                                        [("x", F, ["M", 4])],
                                        {"w": np.ones((4, 5), F), "c": np.zeros((), F)}), "Gemm"),
    ("layer_norm", _model(_relu_then("LayerNormalization", ["r", "s", "b"]),
                          [("x", F, ["B", 7])],
                          {"s": np.linspace(-1, 1, 7, dtype=F), "b": np.zeros(7, F)}),
     "LayerNormalization"),
]


@pytest.mark.parametrize("model, op", [c[1:] for c in BIAS_DROPPED],
                         ids=[c[0] for c in BIAS_DROPPED])
def test_zero_bias_dropped(model, op):
    out, result = run_once(model, "fold_zero")
    assert result.stats["by_kind"] == {f"{op} zero bias dropped": 1}
    node = next(n for n in out.graph.node if n.op_type == op)
    assert len(node.input) == 2
    assert_same_outputs(model, out, _feeds(model), rtol=1e-6, atol=1e-6)


_INF_BETA = float("inf")

# (id, model, pass options, refusal reason or None when the node is not a case at all)
KEPT = [
    ("gemm_bias_required_opset9", _model(_relu_then("Gemm", ["r", "w", "c"]),
                                         [("x", F, [3, 4])],
                                         {"w": np.ones((4, 5), F), "c": np.zeros(5, F)}, opset=9),
     {}, "Gemm: bias is required before opset 11"),
    ("gemm_bias_infinite_beta", _model(_relu_then("Gemm", ["r", "w", "c"], beta=_INF_BETA),
                                       [("x", F, [3, 4])],
                                       {"w": np.ones((4, 5), F), "c": np.zeros(5, F)}),
     {}, "Gemm: beta is not finite"),
    ("matmul_rank3_constant", _model(_relu_then("MatMul", ["r", "w"]), [("x", F, ["B", 3, 4])],
                                     {"w": np.zeros((2, 4, 5), F)}),
     {}, "MatMul: constant of rank > 2: its batch dims broadcast with the input's"),
    ("conv_dynamic_spatial", _model(_relu_then("Conv", ["r", "w"]), [("x", F, [1, 3, "H", 8])],
                                    {"w": _KERNEL0}),
     {}, "Conv: output spatial dims not proved static"),
    ("conv_same_padding", _model(_relu_then("Conv", ["r", "w"], auto_pad="SAME_UPPER",
                                            strides=[2, 2]),
                                 [_CONV_X], {"w": _KERNEL0}),
     {}, "Conv: output spatial dims not proved static"),
    ("gemm_bias_scaled", _model(_relu_then("Gemm", ["r", "w", "c"], beta=2.0),
                                [("x", F, ["M", 4])], {"w": _ZERO_W, "c": np.ones(5, F)}),
     {}, "Gemm: bias is scaled by beta != 1"),
    ("float_not_assumed_finite", _model(_relu_then("MatMul", ["r", "w"]), [("x", F, ["B", 4])],
                                        {"w": _ZERO_W}),
     {"assume_finite": False},
     "MatMul: float product: the other operand may be non-finite (assume_finite is off)"),
    ("nonzero_weight", _model(_relu_then("MatMul", ["r", "w"]), [("x", F, ["B", 4])],
                              {"w": np.eye(4, 5, dtype=F)}), {}, None),
    ("bias_is_graph_input", make_model(
        _relu_then("Conv", ["r", "w", "b"]), [_CONV_X, ("b", F, [6])], [("y", F, None)],
        {"w": np.ones((6, 3, 3, 3), F), "b": np.zeros(6, F)}, check=False), {}, None),
]


@pytest.mark.parametrize("model, options, reason", [c[1:] for c in KEPT],
                         ids=[c[0] for c in KEPT])
def test_not_rewritten(model, options, reason):
    from onnxopt.pass_manager import get_pass

    out, result = run_once(model, get_pass("fold_zero", **options))
    assert not result.modified
    assert ops(out) == ops(model)
    assert result.stats.get("refused", {}) == ({reason: 1} if reason else {})


def test_integer_product_folded_without_assuming_finite():
    from onnxopt.pass_manager import get_pass

    model = next(c[1] for c in FOLDED if c[0] == "matmul_int_zero")
    out, result = run_once(model, get_pass("fold_zero", assume_finite=False))
    assert result.modified
    assert_same_outputs(model, out, _feeds(model), rtol=0, atol=0)


def test_assumed_finite_differs_only_on_non_finite_inputs():
    """The documented exception: inf * 0 is NaN in the original, 0 after the rewrite."""
    from helpers import run_ort

    model = FOLDED[0][1]
    out, _ = run_once(model, "fold_zero")
    feed = {"x": np.full((1, 2, 4), np.inf, F)}
    assert np.isnan(run_ort(model, feed)["y"]).all()
    assert (run_ort(out, feed)["y"] == 0).all()


def test_in_default_pipeline_and_stats_serializable():
    assert "fold_zero" in LOSSLESS_PIPELINE
    _, result = run_once(BIAS_DROPPED[0][1], "fold_zero")
    assert json.loads(json.dumps(result.stats)) == result.stats


def test_graph_output_written_by_the_replacement_in_full_pipeline():
    model = FOLDED[9][1]  # Conv with bias, symbolic batch: Expand(bias, [N, 6, 4, 4])
    out, records = run_passes(model, LOSSLESS_PIPELINE)
    assert "Conv" not in ops(out)
    assert any(r.name == "fold_zero" and r.modified for r in records)
    assert_same_outputs(model, out, _feeds(model), rtol=0, atol=0)


@pytest.mark.zoo
def test_minilm_zero_bias_dropped_and_validates():
    from helpers import with_and_without

    (_, without), (_, with_pass) = with_and_without("minilm_l6", "fold_zero")
    stats = [r.stats for r in with_pass.passes if r.name == "fold_zero" and r.modified]
    assert stats and stats[0]["by_kind"] == {"Gemm zero bias dropped": 1}
    assert with_pass.after.nodes <= without.after.nodes
    assert with_pass.after.file_bytes < without.after.file_bytes
