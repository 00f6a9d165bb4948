"""Static quantization inside If branches (silero-vad's network lives in the two branches of an
If on the sample rate): calibration reaches branch tensors (nested Ifs too), the branch the
feeds take is quantized in place and fused by onnxruntime, the other stays float with the
reason, and Loop bodies are refused."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.analyses.activations import collect
from helpers import session
from onnxopt.graph import export_graph, graph_protos, import_graph
from onnxopt.pass_manager import PassContext, PassManager, verify_model
from onnxopt.passes.quantize_static import QuantizeStatic

RNG = np.random.default_rng(3)


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _branch(nodes, name, out, inits=(), shape=None):
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(
        out, TensorProto.FLOAT, shape)], list(inits))


def _model(then_branch, else_branch, inputs, shape=None, opset=13):
    node = helper.make_node("If", ["flag"], ["y"], then_branch=then_branch,
                            else_branch=else_branch)
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("flag", TensorProto.BOOL, [])] + inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _nested():
    """``If(flag)``: then ``a = Relu(x)``, ``If(inner)``: then ``c = Neg(a)``, else ``a``;
    else ``d = Abs(x) * 3``."""
    inner = helper.make_node(
        "If", ["inner"], ["b"],
        then_branch=_branch([helper.make_node("Neg", ["a"], ["c"])], "t2", "c"),
        else_branch=_branch([helper.make_node("Identity", ["a"], ["a2"])], "e2", "a2"))
    then = _branch([helper.make_node("Relu", ["x"], ["a"]), inner], "t", "b")
    other = _branch([helper.make_node("Abs", ["x"], ["d"]),
                     helper.make_node("Mul", ["d", "three"], ["e"])], "e", "e",
                    [_init("three", np.float32(3))])
    return _model(then, other, [helper.make_tensor_value_info("inner", TensorProto.BOOL, []),
                                helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])])


def test_collect_reaches_tensors_of_if_branches_and_nested_branches():
    model = _nested()
    xs = [RNG.normal(size=(2, 5)).astype(np.float32) * (k + 1) for k in range(4)]
    # feeds 0-2 take the then branch (feeds 1-2 its inner then branch), feed 3 the else branch
    feeds = [{"flag": np.array(k < 3), "inner": np.array(k >= 1), "x": x}
             for k, x in enumerate(xs)]
    stats = collect(model, {"a": None, "c": None, "d": None, "e": None, "x": None}, feeds)
    a = np.concatenate([np.maximum(x, 0).ravel() for x in xs[:3]])
    c = np.concatenate([-np.maximum(x, 0).ravel() for x in xs[1:3]])
    d = np.abs(xs[3]).ravel()
    for name, values in (("a", a), ("c", c), ("d", d), ("e", 3 * d), ("x", np.ravel(xs))):
        s = stats[name]
        assert s.count == values.size, name
        assert (s.minimum, s.maximum) == pytest.approx((values.min(), values.max())), name
    # a branch no feed takes adds nothing: no guessed statistics
    assert collect(model, {"d": None}, feeds[:3])["d"].count == 0
    # the caller's model is left as it was
    assert [len(g.output) for g in graph_protos(model.graph)] == [1, 1, 1, 1, 1]


def _conv(x, w, b, y, pads=1):
    return helper.make_node("Conv", [x, w, b], [y], pads=[pads] * 4)


def _convs_in_branches():
    """``If(flag)``: then ``Conv -> Relu -> Conv`` (16 and 8 channels), else ``Neg -> Conv``
    (a Conv reading the main graph's ``x`` directly would be calibrated by every feed)."""
    w1 = RNG.normal(size=(16, 3, 3, 3)).astype(np.float32)
    w2 = RNG.normal(size=(8, 16, 3, 3)).astype(np.float32) / 6
    w3 = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)
    then = _branch([_conv("x", "w1", "b1", "c1"), helper.make_node("Relu", ["c1"], ["r1"]),
                    _conv("r1", "w2", "b2", "t_out")], "then", "t_out",
                   [_init("w1", w1), _init("b1", RNG.normal(size=16).astype(np.float32)),
                    _init("w2", w2), _init("b2", RNG.normal(size=8).astype(np.float32))],
                   [1, 8, 12, 12])
    other = _branch([helper.make_node("Neg", ["x"], ["n3"]), _conv("n3", "w3", "b3", "e_out")],
                    "else", "e_out",
                    [_init("w3", w3), _init("b3", RNG.normal(size=8).astype(np.float32))],
                    [1, 8, 12, 12])
    for n, name in zip(list(then.node) + list(other.node),
                      ["conv1", "relu", "conv2", "neg", "conv3"]):
        n.name = name
    return _model(then, other, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [1, 3, 12, 12])], [1, 8, 12, 12])


def _session(model, optimize=True, path=None):
    return session(model, optimize, path)


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _images(n, flag):
    return [{"flag": np.array(flag), "x": RNG.normal(size=(1, 3, 12, 12)).astype(np.float32)}
            for _ in range(n)]


def test_the_branch_the_feeds_take_is_quantized_and_fused_the_other_stays_float(tmp_path):
    model = _convs_in_branches()
    graph = import_graph(model)
    record = PassManager([]).run_pass(QuantizeStatic(calibration="minmax"), graph,
                                      PassContext(template=model, calibration=_images(16, True)))
    out = export_graph(graph.cleanup(recurse_subgraphs=True).toposort(), model)
    verify_model(out, "quantize_static")
    stats = record.stats
    assert stats["nodes_quantized"] == 2 and stats["bias_quantized"] == 2
    assert stats["nodes_float"] == {
        "conv3": "no calibration value (no feed takes its If branch, or none finite)"}
    assert stats["branches_not_taken"] == [
        "the else branch of If 'y' (its condition reads input 'flag')"]
    # the QDQ nodes are in the then branch, beside the Convs they feed; the main graph holds the
    # If alone and the else branch is unchanged
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    then, other = branches["then_branch"], branches["else_branch"]
    assert [n.op_type for n in out.graph.node] == ["If"]
    assert collections.Counter(n.op_type for n in then.node)["QuantizeLinear"] >= 2
    assert [n.op_type for n in other.node] == ["Neg", "Conv"]
    # onnxruntime fuses the branch's QDQ into integer kernels: conv1 -> Relu runs QLinearConv;
    # conv2 writes the branch's output, which stays float (as a graph output does): DQ -> Conv
    path = tmp_path / "optimized.onnx"
    _session(out, path=path)
    fused = collections.Counter(n.op_type for g in graph_protos(onnx.load(str(path)).graph)
                                for n in g.node)
    assert fused["QLinearConv"] == 1 and fused["QuantizeLinear"] == 1, fused
    ref, quant, qdq = _session(model), _session(out), _session(out, optimize=False)
    for feed in _images(4, True):
        a, b, c = ref.run(None, feed)[0], quant.run(None, feed)[0], qdq.run(None, feed)[0]
        assert _cosine(a, b) > 0.999
        assert np.abs(b - c).max() <= 1e-4 * np.abs(c).max()
    for feed in _images(2, False):  # the float branch computes exactly what it did
        np.testing.assert_array_equal(ref.run(None, feed)[0], quant.run(None, feed)[0])


def test_int8_static_mode_quantizes_branches_under_the_drift_budget_and_validates():
    """Through the API: calibration takes the then branch, validation both."""
    from onnxopt import optimize

    model = _convs_in_branches()
    out, report = optimize(model, quantize="int8-static", calibration=_images(16, True),
                           inputs=_images(3, True) + _images(3, False))
    stats = next(r.stats for r in report.passes if r.name == "quantize_static")
    assert report.validation.passed
    assert stats["nodes_quantized"] >= 1
    assert "conv3" in stats["nodes_float"]
    quantized = [n for g in graph_protos(out.graph) for n in g.node
                 if n.op_type == "QuantizeLinear"]
    assert quantized and not any(n.op_type == "QuantizeLinear" for n in out.graph.node)


def test_weighted_nodes_of_a_loop_body_are_refused_with_the_reason():
    w = RNG.normal(size=(8, 8)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["h2"], name="body_mm"),
         helper.make_node("Identity", ["cond"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h2", TensorProto.FLOAT, [2, 8])], [_init("w", w)])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], "g",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    feeds = [{"n": np.array(3, np.int64), "x": RNG.normal(size=(2, 8)).astype(np.float32)}]
    g = import_graph(model)
    record = PassManager([]).run_pass(QuantizeStatic(), g,
                                      PassContext(template=model, calibration=feeds))
    assert record.stats["nodes_float"] == {"body_mm": "in a Loop or Scan body (not calibrated)"}
    assert record.stats["nodes_quantized"] == 0


def test_a_branch_no_validation_feed_takes_stays_float():
    """Calibration takes both branches, validation only the then branch: the drift budget
    cannot measure the else branch's Conv (on the validation feeds it does not run), so it
    stays float, with the reason, and computes exactly what it did."""
    from onnxopt import optimize

    model = _convs_in_branches()
    out, report = optimize(model, quantize="int8-static",
                           calibration=_images(8, True) + _images(8, False),
                           inputs=_images(4, True))
    stats = next(r.stats for r in report.passes if r.name == "quantize_static")
    assert stats["nodes_float"]["conv3"] == ("no validation feed takes its If branch (the "
                                             "drift budget cannot measure it)")
    assert "conv1" not in stats["nodes_float"]
    assert any("left nodes of If branches unchanged in the else branch of If" in w
               and "--inputs" in w for w in report.warnings)
    ref, quant = _session(model), _session(out)
    for feed in _images(2, False):
        np.testing.assert_array_equal(ref.run(None, feed)[0], quant.run(None, feed)[0])
    # validated on both branches, the else branch's Conv is measured and quantized
    _, report = optimize(model, quantize="int8-static",
                         calibration=_images(8, True) + _images(8, False),
                         inputs=_images(4, True) + _images(4, False))
    stats = next(r.stats for r in report.passes if r.name == "quantize_static")
    assert "conv3" not in stats["nodes_float"] and report.validation.passed


def test_nodes_sharing_a_name_across_branches_are_told_apart():
    """ONNX lets a main-graph node and a node of each branch share a name: each is its own
    proposal group, counted and reported under its name plus its output's."""
    w0, w1, w2 = (RNG.normal(size=(16, 16)).astype(np.float32) for _ in range(3))

    def branch(op, w, out):
        return helper.make_graph(
            [helper.make_node(op, ["a"], [f"{out}_in"]),
             helper.make_node("MatMul", [f"{out}_in", w], [out], name="mm")], out, [],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [4, 16])],
            [_init(w, {"w1": w1, "w2": w2}[w])])

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w0"], ["a"], name="mm"),
         helper.make_node("If", ["flag"], ["y"], then_branch=branch("Sin", "w1", "t"),
                          else_branch=branch("Cos", "w2", "e"))], "g",
        [helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], [_init("w0", w0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8

    def feeds(n, flag):
        return [{"flag": np.array(flag), "x": RNG.normal(size=(4, 16)).astype(np.float32)}
                for _ in range(n)]

    g = import_graph(model)
    record = PassManager([]).run_pass(
        QuantizeStatic(min_elements=1), g,
        PassContext(template=model, calibration=feeds(8, True)))
    stats = record.stats
    assert stats["nodes_quantized"] == 2 and stats["bytes_before"] == 2 * w0.nbytes
    assert stats["nodes_float"] == {
        "mm (e)": "no calibration value (no feed takes its If branch, or none finite)"}


def test_drift_budget_leaves_unmeasured_branches_of_any_lossy_pass_unchanged():
    """int8-weight has no branch rule of its own: the drift budget leaves out the groups acting
    only in If branches none of its feeds takes, says so, and decides the others as usual."""
    from onnxopt import optimize

    model = _convs_in_branches()
    out, report = optimize(model, quantize="int8-weight", inputs=_images(3, False))
    record = next(r for r in report.passes if r.name == "quantize_weights")
    assert sorted(record.stats["drift_budget"]["unexercised"]) == ["conv1", "conv2"]
    assert record.stats["drift_budget"]["unexercised_branches"] == [
        "the then branch of If 'y' (its condition reads input 'flag')"]
    assert any("no validation feed takes (the then branch of If 'y'" in w
               for w in report.warnings)
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Conv", "Relu", "Conv"]
    assert "DequantizeLinear" in [n.op_type for n in branches["else_branch"].node]
    assert report.validation.passed


def test_drift_budget_with_every_group_unmeasured():
    """Every proposal in a branch the feeds never take: nothing to measure, nothing applied."""
    from onnxopt import optimize

    w = RNG.normal(size=(16, 16)).astype(np.float32)
    then = _branch([helper.make_node("MatMul", ["x", "w"], ["t"], name="mm")], "then", "t",
                   [_init("w", w)], [4, 16])
    other = _branch([helper.make_node("Neg", ["x"], ["e"])], "else", "e", (), [4, 16])
    model = _model(then, other, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                               [4, 16])], [4, 16])
    feeds = [{"flag": np.array(False), "x": RNG.normal(size=(4, 16)).astype(np.float32)}
             for _ in range(3)]
    out, report = optimize(model, quantize="int8-weight", inputs=feeds)
    record = next(r for r in report.passes if r.name == "quantize_weights")
    assert record.stats["drift_budget"]["unexercised"] == ["mm"]
    assert "DequantizeLinear" not in [n.op_type for g in graph_protos(out.graph) for n in g.node]
    assert report.validation.passed
