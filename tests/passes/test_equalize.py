"""Tests of passes/equalize.py: cross-layer equalization of Conv -> (homogeneous op) -> Conv,
outputs compared with onnxruntime on the original model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import zoo_files, session
from onnx import TensorProto, helper, numpy_helper

from onnxopt import optimize
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager, verify_model
from onnxopt.passes.equalize import Equalize

RNG = np.random.default_rng(0)


def _kernel(m, c, k=3):
    # per-output-channel ranges over three decades, as after folding BatchNormalization
    return RNG.normal(size=(m, c, k, k)) * np.logspace(-2, 1, m)[:, None, None, None]


def _conv(x, w, y, b=None, **attrs):
    return helper.make_node("Conv", [x, w] + ([b] if b else []), [y], pads=[1, 1, 1, 1], **attrs)


def _model(nodes, initializers, channels=4, opset=13):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return onnx.shape_inference.infer_shapes(model)


def _run(model, feed):
    return session(model).run(None, feed)[0]


def _equalize(model, **options):
    graph = import_graph(model)
    record = PassManager([]).run_pass(Equalize(**options), graph, PassContext(template=model))
    out = export_graph(graph, model)
    verify_model(out, "equalize")
    return out, record


def _between(*ops):
    """Conv(4 -> 8) -> ops -> Conv(8 -> 6)."""
    nodes, x = [_conv("x", "W1", "h", "B1")], "h"
    for k, (op, attrs, extra) in enumerate(ops):
        nodes.append(helper.make_node(op, [x] + extra, [f"a{k}"], **attrs))
        x = f"a{k}"
    nodes.append(_conv(x, "W2", "y", "B2"))
    return nodes, {"W1": _kernel(8, 4), "B1": RNG.normal(size=8), "W2": _kernel(6, 8),
                   "B2": RNG.normal(size=6)}


def _chain():
    nodes = [_conv("x", "W1", "h1", "B1"), helper.make_node("Relu", ["h1"], ["r1"]),
             _conv("r1", "W2", "h2", group=8), helper.make_node("Relu", ["h2"], ["r2"]),
             _conv("r2", "W3", "y")]
    return nodes, {"W1": _kernel(8, 4), "B1": RNG.normal(size=8), "W2": _kernel(8, 1),
                   "W3": _kernel(5, 8)}


CASES = {
    "direct": (lambda: _between(), 1),
    "relu": (lambda: _between(("Relu", {}, [])), 1),
    "leaky_relu": (lambda: _between(("LeakyRelu", {"alpha": 0.1}, [])), 1),
    "prelu_per_channel": (lambda: _between(("PRelu", {}, ["slope"])), 1),
    "clip_min_0": (lambda: _between(("Clip", {}, ["zero"])), 1),
    "relu_maxpool": (lambda: _between(("Relu", {}, []),
                                      ("MaxPool", {"kernel_shape": [2, 2]}, [])), 1),
    "depthwise_chain": (_chain, 2),
}


def _ranges(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    conv = [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]
    return conv


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_unchanged_and_ranges_balanced(case):
    build, pairs = CASES[case]
    nodes, inits = build()
    inits.update(slope=RNG.uniform(0.05, 0.3, (8, 1, 1)), zero=0.0)
    model = _model(nodes, {k: v for k, v in inits.items()
                           if any(k in n.input for n in nodes)})
    equalized, record = _equalize(model)
    assert record.modified and record.stats["pairs"] == pairs
    assert record.stats["spread_after"] < record.stats["spread_before"] / 2
    for _ in range(3):
        feed = {"x": RNG.normal(size=(1, 4, 8, 8)).astype(np.float32)}
        expected, got = _run(model, feed), _run(equalized, feed)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # output channel ranges of the first Conv: three decades, then closer to the second's
    w1_before, w1_after = _ranges(model)[0], _ranges(equalized)[0]
    spread = lambda w: np.ptp(np.log10(np.abs(w).reshape(w.shape[0], -1).max(axis=1)))  # noqa
    assert spread(w1_before) > 2.5 and spread(w1_after) < 0.7 * spread(w1_before)


@pytest.mark.parametrize("op,attrs,extra,reason", [
    ("Clip", {}, ["zero", "six"], "Clip with a bound other than min 0 (e.g. ReLU6) is not "
                                  "homogeneous"),
    ("Sigmoid", {}, [], "Sigmoid is not homogeneous"),
    ("HardSigmoid", {}, [], "HardSigmoid is not homogeneous"),
])
def test_non_homogeneous_activation_is_refused(op, attrs, extra, reason):
    nodes, inits = _between((op, attrs, extra))
    model = _model(nodes, {**inits, "zero": 0.0, "six": 6.0} if extra else inits)
    equalized, record = _equalize(model)
    assert not record.modified
    assert record.stats["refused"] == {reason: 1}


def test_conv_output_with_two_readers_is_not_a_pair():
    nodes, inits = _between(("Relu", {}, []))
    nodes.append(helper.make_node("Relu", ["h"], ["z"]))
    model = _model(nodes, inits)
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT,
                                                            [1, 8, 8, 8]))
    _, record = _equalize(model)
    assert not record.modified and record.stats["pairs"] == 0


def test_exclude():
    nodes, inits = _between(("Relu", {}, []))
    nodes[0].name = "first"
    _, record = _equalize(_model(nodes, inits), exclude=["first"])
    assert record.stats["refused"] == {"excluded by the user": 1}


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ch_ppocr_mobile_v2.0_cls_infer", "ch_PP-OCRv4_rec_infer"])
def test_real_model_exact(name):
    path, inputs = zoo_files(name)
    base, _ = optimize(path, inputs=inputs)
    equalized, report = optimize(path, passes=["default", "equalize"], inputs=inputs)
    stats = next(r.stats for r in report.passes if r.name == "equalize")
    assert stats["pairs"] >= 3 and stats["spread_after"] < stats["spread_before"]
    feed = dict(np.load(inputs))
    for expected, got in zip(ort.InferenceSession(base.SerializeToString()).run(None, feed),
                             ort.InferenceSession(equalized.SerializeToString()).run(None, feed)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
