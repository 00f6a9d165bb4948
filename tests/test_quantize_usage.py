"""Usage errors of the quantization options (issue 9): ``--quantize-exclude`` / ``--quantize-ops``
naming nothing in the model or contradicting each other, two quantizers in one pipeline, and a
stray comma in ``--max-drift`` -- each an exit 2 with one line on the CLI and a UsageError in
the API, raised before any pass runs (``onnxopt.pipeline.check_targets`` and
``build_pipeline``, ``onnxopt.metrics.parse_criteria``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxopt.api
from helpers import make_model
from onnxopt import optimize
from onnxopt.cli import main
from onnxopt.errors import UsageError


def _model() -> onnx.ModelProto:
    """x -> MatMul (node "proj") -> Relu -> MatMul -> y: two quantizable weights."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="out")]
    return make_model(nodes, [("x", np.float32, ["batch", 64])], [("y", np.float32, ["batch", 32])],
                      {"W1": rng.normal(size=(64, 64)).astype(np.float32),
                       "W2": rng.normal(size=(64, 32)).astype(np.float32)})


FEED = {"x": np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)}


@pytest.fixture
def no_pass_runs(monkeypatch):
    """Fail the test if the pipeline runs: the errors come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(onnxopt.api, "_run_pipeline", refuse)


# (keywords of optimize, the CLI flags saying the same, words the message must hold)
CASES = {
    "exclude names no op type or node": (
        dict(quantize="int8-weight", quantize_exclude=["NoSuchOp"]),
        ["--quantize", "int8-weight", "--quantize-exclude", "NoSuchOp"],
        ["'NoSuchOp'", "exclude", "neither an op type nor a node name"]),
    "exclude names a node the model lacks": (
        dict(quantize="int8-weight", quantize_exclude=["proj", "prj2"]),
        ["--quantize", "int8-weight", "--quantize-exclude", "proj,prj2"],
        ["'prj2'", "closest in the model: proj"]),
    "ops names no op type": (
        dict(quantize="int8-dynamic", quantize_ops=["MatMull"]),
        ["--quantize", "int8-dynamic", "--quantize-ops", "MatMull"],
        ["'MatMull'", "not an op type", "closest in the model: MatMul"]),
    "ops selects no node of the model": (
        dict(quantize="int8-dynamic", quantize_ops=["Conv", "Gemm"]),
        ["--quantize", "int8-dynamic", "--quantize-ops", "Conv,Gemm"],
        ["no node of type Conv, Gemm", "nothing would be quantized"]),
    "ops empty": (
        dict(quantize="int8-dynamic", quantize_ops=[]),
        ["--quantize", "int8-dynamic", "--quantize-ops", ","],
        ["option ops", "empty"]),
    "exclude and ops contradict": (
        dict(quantize="int8-dynamic", quantize_ops=["MatMul"], quantize_exclude=["MatMul"]),
        ["--quantize", "int8-dynamic", "--quantize-ops", "MatMul", "--quantize-exclude", "MatMul"],
        ["MatMul both quantized", "excluded"]),
    "two quantizers": (
        dict(passes=["quantize_static"], quantize="int8-weight"),
        ["--passes", "quantize_static", "--quantize", "int8-weight"],
        ["two quantization passes", "quantize_static",
         "quantize_weights (--quantize int8-weight)"]),
    "trailing comma in max drift": (
        dict(quantize="int8-weight", max_drift="cosine=0.999,"),
        ["--quantize", "int8-weight", "--max-drift", "cosine=0.999,"],
        ["'cosine=0.999,'", "empty criterion"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_api_raises_a_usage_error_before_any_pass_runs(case, no_pass_runs):
    keywords, _, words = CASES[case]
    with pytest.raises(UsageError) as err:
        optimize(_model(), inputs=FEED, calibration=FEED, **keywords)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message


@pytest.mark.parametrize("case", list(CASES))
def test_the_cli_exits_2_with_one_line(case, tmp_path, capsys, no_pass_runs):
    _, flags, words = CASES[case]
    path = tmp_path / "m.onnx"
    path.write_bytes(_model().SerializeToString())
    np.savez(tmp_path / "feed.npz", **FEED)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--inputs", str(tmp_path / "feed.npz"),
                 *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxopt: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err
    assert not out.exists()


def test_pass_options_are_checked_like_the_flags(no_pass_runs):
    with pytest.raises(UsageError, match="pass 'quantize_weights' option exclude.*'Nope'"):
        optimize(_model(), inputs=FEED, passes=["quantize_weights"],
                 options={"quantize_weights": {"exclude": ["Nope"]}})
    with pytest.raises(UsageError, match="pass 'quantize_dynamic'.*Relu both quantized"):
        optimize(_model(), inputs=FEED, passes=["quantize_dynamic"],
                 options={"quantize_dynamic": {"ops": ["Relu"], "exclude": ["Relu"]}})
    with pytest.raises(UsageError, match="two quantization passes: quantize_weights, "
                                         "quantize_dynamic"):
        optimize(_model(), inputs=FEED, passes=["quantize_weights", "quantize_dynamic"])


def test_names_and_op_types_that_exist_are_accepted():
    """A node name, an op type of the model, and an ONNX op type the model lacks (harmless: one
    list serves several models) are accepted; ops naming one type the model has is enough;
    the mode's embedding pass beside its main pass is not a second quantizer."""
    model, report = optimize(_model(), inputs=FEED, quantize="int8-dynamic",
                             quantize_exclude=["out", "Softmax"], quantize_ops=["MatMul", "Conv"])
    stats = next(r.stats for r in report.passes if r.name == "quantize_dynamic")
    assert report.validation.passed
    assert stats["nodes_quantized"] == {"MatMul": 1} and stats["refused"] == {
        "excluded by the user": 1}
    assert [n.name for n in model.graph.node if n.op_type == "MatMul"] == ["out"]


def test_a_node_name_in_a_subgraph_is_found():
    rng = np.random.default_rng(2)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wb"], ["yb"], name="inner")], "then", [],
        [helper.make_tensor_value_info("yb", onnx.TensorProto.FLOAT, ["batch", 64])],
        [onnx.numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "Wb")])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch,
                                         else_branch=branch)],
                       [("x", np.float32, ["batch", 64]), ("c", np.bool_, [])],
                       [("y", np.float32, ["batch", 64])])
    feed = {"x": FEED["x"], "c": np.array(True)}
    _, report = optimize(model, inputs=feed, quantize="int8-weight", quantize_exclude=["inner"])
    stats = next(r.stats for r in report.passes if r.name == "quantize_weights")
    assert stats["refused"] == {"excluded by the user": 1}
