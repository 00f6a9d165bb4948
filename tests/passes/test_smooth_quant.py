"""Tests of passes/smooth_quant.py: activations divided by per-channel factors folded into their
producer, weights multiplied; outputs compared with onnxruntime on the original model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import zoo_files, session
from onnx import TensorProto, helper, numpy_helper

from onnxopt import optimize
from onnxopt.analyses.activations import collect
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager, verify_model
from onnxopt.passes.smooth_quant import SmoothQuant

RNG = np.random.default_rng(0)
C = 16


def _model(nodes, initializers, opset=17):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6, C])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)  # the full checker wants output shapes


def _run(model, feed):
    return session(model).run(None, feed)[0]


def _feeds(n=4):
    return [{"x": RNG.normal(size=(4, 6, C)).astype(np.float32)} for _ in range(n)]


def _smooth(model, feeds, **options):
    graph = import_graph(model)
    record = PassManager([]).run_pass(SmoothQuant(**options), graph,
                                      PassContext(template=model, feeds=feeds))
    out = export_graph(graph, model)
    verify_model(out, "smooth_quant")
    return out, record


def _outlier_gamma():
    gamma = RNG.uniform(0.5, 1.5, C)
    gamma[[3, 11]] = 40.0  # the outlier channels of LLM activations (Xiao et al., figure 4)
    return gamma


def _weights():
    return {f"W{k}": RNG.normal(size=(C, 8)) * 0.2 for k in "qkv"}


def _readers(a):
    """Q, K, V MatMuls reading ``a`` and a residual Add (a reader that cannot absorb s)."""
    return [helper.make_node("MatMul", [a, "Wq"], ["q"]),
            helper.make_node("MatMul", [a, "Wk"], ["k"]),
            helper.make_node("MatMul", [a, "Wv"], ["v"]),
            helper.make_node("Concat", ["q", "k", "v"], ["qkv"], axis=-1),
            helper.make_node("MatMul", ["qkv", "Wo"], ["o"]),
            helper.make_node("Add", [a, "o"], ["y"])]


def _layer_norm():
    init = {"gamma": _outlier_gamma(), "beta": RNG.normal(size=C) * 0.1, **_weights(),
            "Wo": RNG.normal(size=(24, C)) * 0.2}
    return _model([helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["a"],
                                    axis=-1, epsilon=1e-5)] + _readers("a"), init)


def _decomposed_layer_norm():
    """The ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add LayerNorm of older exports (opset 11)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
             helper.make_node("Sub", ["x", "mu"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["d2"]),
             helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["n"]),
             helper.make_node("Mul", ["n", "gamma"], ["g"]),
             helper.make_node("Add", ["g", "beta"], ["a"])]
    init = {"two": 2.0, "eps": 1e-5, "gamma": _outlier_gamma(), "beta": RNG.normal(size=C) * .1,
            **_weights(), "Wo": RNG.normal(size=(24, C)) * 0.2}
    return _model(nodes + _readers("a"), init, opset=11)


def _gelu_scalar_mul():
    """The last Mul of an exported GELU (by a scalar 0.5) feeding the second FFN MatMul."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["xb"]),
             helper.make_node("Relu", ["xb"], ["r"]),
             helper.make_node("Mul", ["r", "half"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["y"])]
    big = np.ones(C)
    big[5] = 30.0
    return _model(nodes, {"big": big, "half": 0.5, "W": RNG.normal(size=(C, 8))})


CASES = {"layer_norm": (_layer_norm, 3, 1), "decomposed": (_decomposed_layer_norm, 3, 1),
         "gelu_mul": (_gelu_scalar_mul, 1, 0)}


def _spread(model, feeds, name):
    absmax = collect(model, {name: -1}, feeds)[name].channel_absmax
    return absmax.max() / np.median(absmax)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_unchanged_and_outliers_reduced(case):
    build, scaled, compensated = CASES[case]
    model, feeds = build(), _feeds()
    smoothed, record = _smooth(model, feeds)
    assert record.modified
    stats = record.stats
    assert stats["smoothed"] == 1, stats
    assert stats["weights_scaled"] == scaled and stats["compensated"] == compensated
    for feed in feeds + _feeds(2):
        expected, got = _run(model, feed), _run(smoothed, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    reader = next(n for n in smoothed.graph.node if n.op_type == "MatMul")
    before, after = _spread(model, feeds, reader.input[0]), _spread(smoothed, feeds,
                                                                     reader.input[0])
    assert after < before / 2
    assert stats["max_ratio_after"] < stats["max_ratio_before"]


def test_alpha_zero_leaves_activations_and_normalizes_weights():
    model, feeds = _gelu_scalar_mul(), _feeds()
    smoothed, _ = _smooth(model, feeds, alpha=0.0)
    w = next(numpy_helper.to_array(i) for i in smoothed.graph.initializer
             if i.name.startswith("W_"))
    # s_j = 1 / max|W_j|: every row of the scaled weight has max magnitude 1
    np.testing.assert_allclose(np.abs(w).max(axis=1), 1.0, rtol=1e-6)


def test_reader_that_cannot_absorb_without_compensation_is_refused():
    model, feeds = _layer_norm(), _feeds()
    smoothed, record = _smooth(model, feeds, compensate=False)
    assert not record.modified
    assert record.stats["refused"] == {"a reader cannot absorb the factors": 1,
                                       "produced by Concat": 1}


def test_activation_from_an_unscalable_op_or_graph_input_is_refused():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "W2"], ["y"])]
    model = _model(nodes, {"W": RNG.normal(size=(C, C)), "W2": RNG.normal(size=(C, 4))})
    _, record = _smooth(model, _feeds())
    assert not record.modified
    assert record.stats["refused"] == {"graph input or output": 1, "produced by Tanh": 1}


def test_smoothing_that_would_raise_the_error_proxy_is_refused():
    """The largest activation channel meets the one large weight: s_j would raise every other
    output channel's weight step ~30x for a ~sqrt(max|X|) smaller activation step (the FFN2
    input of MiniLM at alpha 0.5 is refused the same way)."""
    nodes = [helper.make_node("Mul", ["x", "gain"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["y"])]
    w = np.full((C, 8), 1e-3)
    w[0, 0] = 1.0
    gain = np.ones(C)
    gain[0] = 3.0
    model = _model(nodes, {"gain": gain, "W": w})
    _, record = _smooth(model, _feeds())
    assert not record.modified
    assert record.stats["refused"] == {"smoothing would not reduce max|X| x max|W|": 1}


def test_needs_calibration():
    with pytest.raises(UsageError, match="calibration"):
        optimize(_layer_norm(), passes=["smooth_quant"], validate=False)


@pytest.mark.zoo
def test_minilm_exact_and_smoother():
    path, inputs = zoo_files("minilm_l6")
    base, _ = optimize(path, inputs=inputs)
    smoothed, report = optimize(path, passes=["default", "smooth_quant"], inputs=inputs)
    stats = next(r.stats for r in report.passes if r.name == "smooth_quant")
    assert stats["smoothed"] >= 12 and stats["max_ratio_after"] < stats["max_ratio_before"] / 2
    feed = dict(np.load(inputs))
    for expected, got in zip(ort.InferenceSession(base.SerializeToString()).run(None, feed),
                             ort.InferenceSession(smoothed.SerializeToString()).run(None, feed)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _erf_gelu_then_reshape():
    """x * big + bias -> exported erf-GELU (Div, Erf, Add, Mul, Mul 0.5) -> MatMul, and x
    through a Reshape into a second MatMul (a producer that cannot absorb s)."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["xs"]),
             helper.make_node("Add", ["xs", "bias"], ["xb"]),
             helper.make_node("Div", ["xb", "sqrt2"], ["d"]),
             helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]),
             helper.make_node("Mul", ["xb", "e1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["a"]),
             helper.make_node("MatMul", ["a", "W"], ["h"]),
             helper.make_node("Constant", [], ["shape"],
                              value=numpy_helper.from_array(np.array([4, 6, C], np.int64))),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["h2"]),
             helper.make_node("Add", ["h", "h2"], ["y"])]
    big = np.ones(C)
    big[5] = 30.0
    return _model(nodes, {"big": big, "bias": RNG.normal(size=C), "sqrt2": np.sqrt(2.0),
                          "one": 1.0, "half": 0.5,
                          "W": RNG.normal(size=(C, 8)), "W2": RNG.normal(size=(C, 8))})


def _gelu_fused(model, tmp_path):
    """Whether onnxruntime's optimized graph of ``model`` runs a fused Gelu/BiasGelu kernel."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    return bool(ops & {"Gelu", "BiasGelu"})


def test_explicit_mul_keeps_onnxruntime_gelu_fusion_and_reaches_any_producer(tmp_path):
    """explicit_mul: a scalar GELU constant stays scalar (onnxruntime still fuses Gelu) and a
    Reshape output is smoothed too, each through one inserted Mul; the outputs are unchanged."""
    model = _erf_gelu_then_reshape()
    x = np.zeros((4, 6, C), np.float32)
    x[..., 2] = 20.0  # the Reshape-read activation gets an outlier channel as well
    feeds = [{"x": (f["x"] + x).astype(np.float32)} for f in _feeds()]
    assert _gelu_fused(model, tmp_path)
    folded, record = _smooth(model, feeds, alpha=0.75)
    assert record.stats["refused"] == {"produced by Reshape": 1}
    assert not _gelu_fused(folded, tmp_path)  # 0.5 became a vector
    smoothed, record = _smooth(model, feeds, alpha=0.75, explicit_mul=True)
    assert record.stats["smoothed"] == record.stats["inserted"] == 2, record.stats
    assert record.stats["compensated"] == 0
    assert _gelu_fused(smoothed, tmp_path)
    for feed in feeds + _feeds(2):
        expected, got = _run(model, feed), _run(smoothed, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    for name in ("a", "r"):
        reader = next(n for n in smoothed.graph.node
                      if n.op_type == "MatMul" and n.input[0].startswith(f"{name}_smoothed"))
        assert _spread(smoothed, feeds, reader.input[0]) < _spread(model, feeds, name) / 2


def _projected_heads():
    """``q``, ``k``, ``v`` projections of ``x`` (``v`` with bias ``bv``), split into heads by
    ``Reshape(., split)`` and the Transposes of queries (``qh``), keys (``kh``) and values
    (``vh``)."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"]),
             helper.make_node("MatMul", ["x", "Wk"], ["k"]),
             helper.make_node("MatMul", ["x", "Wv"], ["vm"]),
             helper.make_node("Add", ["vm", "bv"], ["v"])]
    for name in "qkv":
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}h"],
                                   perm=[0, 2, 3, 1] if name == "k" else [0, 2, 1, 3])]
    return nodes


def _attention(merge_perm=(0, 2, 1, 3), v_read_twice=False):
    """One self-attention block of 4 heads of 4 channels over ``x`` [4, 6, 16]: softmax(Q K^T)
    V, heads merged by Reshape(Transpose) and projected by ``Wo``; the value projection has
    two outlier columns, so the merged heads have two outlier channels."""
    wv = RNG.normal(size=(C, C)) * 0.2
    wv[:, [2, 9]] *= 40.0
    nodes = _projected_heads()
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vh"], ["heads"]),
              helper.make_node("Transpose", ["heads"], ["heads_t"], perm=list(merge_perm)),
              helper.make_node("Reshape", ["heads_t", "merge"], ["a"]),
              helper.make_node("MatMul", ["a", "Wo"], ["o"])]
    if v_read_twice:
        nodes += [helper.make_node("Add", ["o", "v"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", ["o"], ["y"])]
    init = {"Wq": RNG.normal(size=(C, C)) * 0.2, "Wk": RNG.normal(size=(C, C)) * 0.2, "Wv": wv,
            "bv": RNG.normal(size=C), "Wo": RNG.normal(size=(C, C)) * 0.2}
    shapes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.array(value, np.int64))) for name, value in [("split", [0, 0, -1, 4]),
                                                        ("merge", [0, 0, -1])]]
    return _model(shapes + nodes, init)


def test_merged_attention_heads_are_divided_in_the_value_projection():
    """The output projection's input (merged heads) is smoothed by dividing the value
    projection's weight columns and bias: no Mul inserted, outputs unchanged; a value that has
    another reader, or heads merged in another order, get the inserted Mul instead."""
    model, feeds = _attention(), _feeds()
    smoothed, record = _smooth(model, feeds, alpha=0.75, explicit_mul=True)
    stats = record.stats
    assert stats["smoothed"] == 1 and stats["inserted"] == 0, stats  # a (x: a graph input)
    assert stats["weights_scaled"] == 1  # Wo's rows; Wv's columns and bv are the producer's
    changed = {i.name.split("_smoothed")[0] for i in smoothed.graph.initializer
               if "_smoothed" in i.name}
    assert changed == {"Wo", "Wv", "bv"}
    assert not any(n.op_type == "Mul" for n in smoothed.graph.node)
    for feed in feeds + _feeds(2) + [{"x": np.zeros((4, 6, C), np.float32)}]:
        expected, got = _run(model, feed), _run(smoothed, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    reader = next(n for n in smoothed.graph.node if n.op_type == "MatMul" and "Wo" in n.input[1])
    assert reader.input[0] == "a"
    assert _spread(smoothed, feeds, "a") < _spread(model, feeds, "a") / 2
    # channel d * heads + n after a [0, 2, 3, 1] merge: not column n * 4 + d of the values
    for variant in (_attention(v_read_twice=True), _attention(merge_perm=(0, 2, 3, 1))):
        smoothed, record = _smooth(variant, feeds, alpha=0.75, explicit_mul=True)
        assert record.stats["inserted"] == 1, record.stats  # the merged heads: Mul(a, 1/s)
        for feed in feeds[:2]:
            expected, got = _run(variant, feed), _run(smoothed, feed)
            np.testing.assert_allclose(got, expected, rtol=1e-5,
                                       atol=1e-5 * np.abs(expected).max())


def test_heads_of_an_unbatched_input_are_not_divided_in_the_value_projection():
    """Breaker's case: ``x`` [S, D] with heads of one channel -- ``Reshape(v, [0, 0, -1, 1])``
    copies v's channel axis, so ``P v`` sums over v's channels and dividing ``W_v``'s column
    ``c`` does not divide merged channel ``c`` (outputs were 0.1-0.5 off, relative). The split
    input's rank is not 3: the merged heads get the inserted Mul and the outputs stay."""
    d, rng = 8, np.random.default_rng(2)
    shapes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.array(value, np.int64))) for name, value in [("split", [0, 0, -1, 1]),
                                                        ("merge", [0, 0, -1])]]
    nodes = _projected_heads()
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["scores"]),  # [S, 1, D, D]
              helper.make_node("Add", ["scores", "rel"], ["biased"]),  # [S, D, D, D]
              helper.make_node("Softmax", ["biased"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vh"], ["heads"]),  # [S, D, D, 1]
              helper.make_node("Transpose", ["heads"], ["heads_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["heads_t", "merge"], ["a"]),  # [S, D, D]
              helper.make_node("MatMul", ["a", "Wo"], ["y"])]
    wv = rng.normal(size=(d, d)) * 0.3
    wv[:, [2, 5]] *= 40.0  # outlier value columns
    rel = rng.normal(size=(1, d, d, d))
    for i in range(d):
        rel[0, i, :, i] += 3.0  # "head" n looks mostly at v's channel n
    init = {"Wq": rng.normal(size=(d, d)) * 0.3, "Wk": rng.normal(size=(d, d)) * 0.3,
            "Wv": wv, "bv": rng.normal(size=d), "rel": rel, "Wo": rng.normal(size=(d, 6))}
    graph = helper.make_graph(
        shapes + nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", d, 6])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in init.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = [{"x": rng.normal(size=(5, d)).astype(np.float32)} for _ in range(4)]
    smoothed, record = _smooth(model, feeds, alpha=0.75, explicit_mul=True)
    assert record.stats["smoothed"] == 1 and record.stats["inserted"] == 1, record.stats
    for s in (1, 3, 9):
        feed = {"x": rng.normal(size=(s, d)).astype(np.float32)}
        expected, got = _run(model, feed), _run(smoothed, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
