"""Loop and Scan nodes with an omitted output (valid ONNX) that onnxruntime 1.32 cannot run: a
Loop's omitted final carried value ends the process with a segmentation fault, the other
omissions fail to load. onnxopt names them (``onnxopt.ops.name_omitted_outputs``), validates
against the original so named and writes a model onnxruntime runs. The optimizing runs go
through the console script in a child process, so that a regression fails the test instead of
killing pytest."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from onnxopt import optimize, validate
from onnxopt.errors import OnnxoptWarning
from onnxopt.ops import OMISSION_CRASHES, name_omitted_outputs


def _loop(omit: int) -> onnx.ModelProto:
    """``Loop(n, "", x)`` carrying ``a`` (``a + 1`` per trip) and scanning ``2 a``; output
    ``omit`` (0: the final ``a``, 1: the scan) omitted."""
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]),
         h.make_node("Add", ["a_in", "one"], ["a_out"]),
         h.make_node("Mul", ["a_in", "two"], ["scan"])], "body",
        [h.make_tensor_value_info("i", T.INT64, []),
         h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("a_in", T.FLOAT, [2])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []),
         h.make_tensor_value_info("a_out", T.FLOAT, [2]),
         h.make_tensor_value_info("scan", T.FLOAT, [2])],
        [h.make_tensor("one", T.FLOAT, [], [1.0]), h.make_tensor("two", T.FLOAT, [], [2.0])])
    outputs = ["final", "scanned"]
    outputs[omit] = ""
    shapes = {"final": [2], "scanned": ["trips", 2]}
    graph = h.make_graph(
        [h.make_node("Loop", ["n", "", "x"], outputs, body=body, name="loop")], "g",
        [h.make_tensor_value_info("n", T.INT64, []), h.make_tensor_value_info("x", T.FLOAT, [2])],
        [h.make_tensor_value_info(o, T.FLOAT, shapes[o]) for o in outputs if o])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


def _scan(omit: int) -> onnx.ModelProto:
    """``Scan(s0, xs)``: state ``s + x_t``, scan output ``2 x_t``; output ``omit`` omitted."""
    body = h.make_graph(
        [h.make_node("Add", ["s_in", "x_t"], ["s_out"]),
         h.make_node("Mul", ["x_t", "two"], ["y_t"])], "body",
        [h.make_tensor_value_info("s_in", T.FLOAT, [2]),
         h.make_tensor_value_info("x_t", T.FLOAT, [2])],
        [h.make_tensor_value_info("s_out", T.FLOAT, [2]),
         h.make_tensor_value_info("y_t", T.FLOAT, [2])],
        [h.make_tensor("two", T.FLOAT, [], [2.0])])
    outputs = ["final", "scanned"]
    outputs[omit] = ""
    shapes = {"final": [2], "scanned": ["steps", 2]}
    graph = h.make_graph(
        [h.make_node("Scan", ["s0", "xs"], outputs, body=body, num_scan_inputs=1,
                     name="scan")], "g",
        [h.make_tensor_value_info("s0", T.FLOAT, [2]),
         h.make_tensor_value_info("xs", T.FLOAT, ["steps", 2])],
        [h.make_tensor_value_info(o, T.FLOAT, shapes[o]) for o in outputs if o])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


def _feeds(op: str, size: int) -> dict[str, np.ndarray]:
    x = np.array([0.5, -1.25], np.float32)
    if op == "Loop":
        return {"n": np.array(size, np.int64), "x": x}
    return {"s0": x, "xs": np.arange(2 * size, dtype=np.float32).reshape(size, 2) - 1.5}


def _expected(op: str, size: int, feed: dict) -> dict[str, np.ndarray]:
    """The outputs by numpy, per the operator specs (Loop, Scan)."""
    if op == "Loop":
        x = feed["x"]
        return {"final": x + size,
                "scanned": np.array([2 * (x + k) for k in range(size)],
                                    np.float32).reshape(size, 2)}
    return {"final": feed["s0"] + feed["xs"].sum(axis=0), "scanned": 2 * feed["xs"]}


CASES = [(op, omit) for op in OMISSION_CRASHES for omit in (0, 1)]


@pytest.mark.parametrize("op, omit", CASES)
def test_a_model_onnxruntime_cannot_run_is_optimized_and_runs(op, omit, tmp_path):
    model = (_loop if op == "Loop" else _scan)(omit)
    onnx.checker.check_model(model, full_check=True)
    source, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(model, source)
    np.savez(tmp_path / "feed.npz", **_feeds(op, 3))
    run = subprocess.run([sys.executable, "-m", "onnxopt", "optimize", str(source), "-o",
                          str(out), "--inputs", str(tmp_path / "feed.npz")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "named 1 omitted Loop/Scan output(s)" in " ".join(run.stdout.split() +
                                                             run.stderr.split())
    result = onnx.load(out)
    node = next(n for n in result.graph.node if n.op_type == op)
    assert all(node.output) and len(node.output) == 2
    assert [o.name for o in result.graph.output] == [o.name for o in model.graph.output]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # other trip counts / sequence lengths than validated (onnxruntime runs no Scan of 0 steps)
    for size in (0, 1, 3, 7) if op == "Loop" else (1, 3, 7):
        feed = _feeds(op, size)
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        expected = _expected(op, size, feed)
        for name, value in got.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op, omit", [c for c in CASES if c != ("Loop", 0)])
def test_the_api_names_a_copy_and_validate_runs_such_models(op, omit):
    """In the caller's process (the cases onnxruntime refuses rather than crashes on): the
    caller's ModelProto is left as given; ``validate`` compares such models too."""
    model = (_loop if op == "Loop" else _scan)(omit)
    given = model.SerializeToString()
    feed = _feeds(op, 3)
    with pytest.warns(OnnxoptWarning, match="omitted Loop/Scan output"):
        result, report = optimize(model, inputs=[feed])
    assert model.SerializeToString() == given
    assert report.validation.passed
    assert all(all(n.output) for n in result.graph.node)
    with pytest.warns(OnnxoptWarning, match="named 1 omitted"):
        checked = validate(model, result, inputs=[feed])
    assert checked.validation.passed and model.SerializeToString() == given


def test_names_are_fresh_in_every_graph_and_other_ops_are_left_alone():
    model = _loop(0)
    body = model.graph.node[0].attribute[0].g
    body.node.append(h.make_node("Loop", ["i", "", "a_in"], ["", "loop_out1__0"],
                                 body=_loop(1).graph.node[0].attribute[0].g))
    body.node.append(h.make_node("Split", ["a_in"], ["", "half"], axis=0))
    named = name_omitted_outputs(model)
    assert named == ["loop_out0__0", "Loop_out0__0"]
    assert list(body.node[-1].output) == ["", "half"]  # Split's omission is onnxruntime's to run
    assert list(body.node[-2].output) == ["Loop_out0__0", "loop_out1__0"]
    assert name_omitted_outputs(model) == []


def test_a_loop_in_a_local_function_and_names_only_declared_are_named_apart():
    """Breaker's cases: a Loop omitting its output inside a model-local function (onnxruntime
    inlines it and crashes the same way) is named too, and the names given avoid every name
    the model declares, value_info included."""
    loop = _loop(0)
    body = loop.graph.node[0].attribute[0].g
    function = h.make_function("my", "LoopFn", ["n", "x"], ["scanned"],
                               [h.make_node("Loop", ["n", "", "x"], ["", "scanned"], body=body,
                                            name="loop")],
                               opset_imports=[h.make_opsetid("", 13)])
    graph = h.make_graph(
        [h.make_node("LoopFn", ["n", "x"], ["scanned"], domain="my")], "g",
        [h.make_tensor_value_info("n", T.INT64, []), h.make_tensor_value_info("x", T.FLOAT, [2])],
        [h.make_tensor_value_info("scanned", T.FLOAT, ["trips", 2])],
        value_info=[h.make_tensor_value_info("loop_out0__0", T.INT32, [7])])
    model = h.make_model(graph, functions=[function],
                         opset_imports=[h.make_opsetid("", 13), h.make_opsetid("my", 1)])
    onnx.checker.check_model(model, full_check=True)
    assert name_omitted_outputs(model) == ["loop_out0__1"]
    assert list(model.functions[0].node[0].output) == ["loop_out0__1", "scanned"]


def test_validate_runs_a_named_model_with_external_data(tmp_path):
    """An external-data model is run from its file -- except one whose omissions were named
    (the file still omits them): that one runs as named, its tensors read in."""
    model = _loop(1)
    model.graph.initializer.append(onnx.numpy_helper.from_array(
        np.arange(4096, dtype=np.float32), "unused_weight"))
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, size_threshold=0,
              location="model.onnx.data")
    feed = _feeds("Loop", 3)
    with pytest.warns(OnnxoptWarning, match="reference: named 1"):
        report = validate(str(path), str(path), inputs=[feed])
    assert report.validation.passed
