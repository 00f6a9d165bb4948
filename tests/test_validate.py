"""Tests of optimizer/validate.py: comparing a candidate model with its reference on onnxruntime."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from helpers import make_model, run_ort
from onnxopt.errors import InputError
from onnxopt.validate import compare_models

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(4, 3)).astype(np.float32)
W2 = RNG.normal(size=(4, 5)).astype(np.float32)


def _model(w1=W1, w2=W2, outputs=("y1", "y2"), extra_nodes=(), out_types=None) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["y1"]),
             helper.make_node("MatMul", ["x", "W2"], ["y2"]), *extra_nodes]
    shapes = {"y1": [2, 3], "y2": [2, 5]}
    out_types = out_types or {}
    outs = [(o, out_types.get(o, (np.float32, shapes.get(o)))[0],
             out_types.get(o, (np.float32, shapes.get(o)))[1]) for o in outputs]
    return make_model(nodes, [("x", np.float32, [2, 4])], outs, {"W1": w1, "W2": w2})


def _feed(seed=1, scale=1.0):
    return {"x": (np.random.default_rng(seed).normal(size=(2, 4)) * scale).astype(np.float32)}


def test_identical_models_pass():
    result = compare_models(_model(), _model(), [_feed()])
    assert result.passed and result.reason == ""
    assert [m.name for m in result.outputs] == ["y1", "y2"]
    for m in result.outputs:
        assert m.passed and m.max_abs == 0 and m.cosine == pytest.approx(1.0) and m.snr_db == math.inf
    d = result.to_dict()
    json.dumps(d)
    assert d["outputs"][0]["snr_db"] == "inf"


def test_weight_perturbed_beyond_tolerance_fails_naming_the_output():
    w2 = W2.copy()
    w2[1, 2] += 1e-2
    result = compare_models(_model(), _model(w2=w2), [_feed()])
    assert not result.passed
    assert "'y2'" in result.reason
    by_name = {m.name: m for m in result.outputs}
    assert by_name["y1"].passed and not by_name["y2"].passed
    feed = _feed()
    expected = np.abs(run_ort(_model(w2=w2), feed)["y2"].astype(np.float64)
                      - run_ort(_model(), feed)["y2"]).max()
    assert by_name["y2"].max_abs == pytest.approx(expected)
    assert by_name["y2"].max_abs > by_name["y2"].tolerance


def test_the_failure_message_quotes_the_worst_feed():
    """Several failing feeds: the message gives the largest error, the one the table shows."""
    w2 = W2.copy()
    w2[1, 2] += 1e-2
    feeds = [{k: v * scale for k, v in _feed().items()} for scale in (1.0, 30.0, 2.0)]
    result = compare_models(_model(), _model(w2=w2), feeds)
    y2 = {m.name: m for m in result.outputs}["y2"]
    assert not y2.passed
    assert y2.reason.startswith(f"max abs error {y2.max_abs:.3g} ")


def test_perturbation_within_tolerance_passes():
    w2 = W2.copy()
    w2[1, 2] = np.nextafter(w2[1, 2], np.float32(np.inf))
    result = compare_models(_model(), _model(w2=w2), [_feed()])
    assert result.passed
    assert result.outputs[1].max_abs > 0


def test_tolerance_options_are_applied():
    w2 = W2.copy()
    w2[1, 2] += 1e-3
    assert not compare_models(_model(), _model(w2=w2), [_feed()]).passed
    assert compare_models(_model(), _model(w2=w2), [_feed()], atol=1.0).passed
    assert compare_models(_model(), _model(w2=w2), [_feed()], atol=0, rtol=1.0).passed


@pytest.mark.parametrize("candidate_outputs", [("y2", "y1"), ("y1",), ("y1", "y2", "x2")])
def test_output_names_or_order_mismatch_fails(candidate_outputs):
    extra = [helper.make_node("Neg", ["x"], ["x2"])]
    cand = _model(outputs=candidate_outputs, extra_nodes=extra,
                  out_types={"x2": (np.float32, [2, 4])})
    result = compare_models(_model(), cand, [_feed()])
    assert not result.passed
    assert "outputs differ" in result.reason


def test_dtype_mismatch_fails():
    cand = make_model([helper.make_node("MatMul", ["x", "W1"], ["m"]),
                       helper.make_node("Cast", ["m"], ["y1"], to=TensorProto.DOUBLE),
                       helper.make_node("MatMul", ["x", "W2"], ["y2"])],
                      [("x", np.float32, [2, 4])],
                      [("y1", np.float64, [2, 3]), ("y2", np.float32, [2, 5])], {"W1": W1, "W2": W2})
    for lossy in (False, True):
        result = compare_models(_model(), cand, [_feed()], lossy=lossy)
        assert not result.passed
        assert "'y1'" in result.reason and "float64" in result.reason


def test_shape_mismatch_fails():
    cand = make_model([helper.make_node("MatMul", ["x", "W1"], ["m"]),
                       helper.make_node("Reshape", ["m", "s"], ["y1"]),
                       helper.make_node("MatMul", ["x", "W2"], ["y2"])],
                      [("x", np.float32, [2, 4])],
                      [("y1", np.float32, [3, 2]), ("y2", np.float32, [2, 5])],
                      {"W1": W1, "W2": W2, "s": np.array([3, 2], np.int64)})
    for lossy in (False, True):
        result = compare_models(_model(), cand, [_feed()], lossy=lossy)
        assert not result.passed and "[3, 2]" in result.reason


def test_lossy_mode_judges_by_cosine():
    scaled = _model(w1=W1 * 1.5, w2=W2 * 1.5)  # same direction: cosine 1, large absolute error
    assert not compare_models(_model(), scaled, [_feed()]).passed
    lossy = compare_models(_model(), scaled, [_feed()], lossy=True)
    assert lossy.passed and lossy.mode == "lossy"
    assert all(m.cosine == pytest.approx(1.0) for m in lossy.outputs)

    noisy = _model(w2=W2 + np.random.default_rng(5).normal(size=W2.shape).astype(np.float32))
    result = compare_models(_model(), noisy, [_feed()], lossy=True)
    feed = _feed()
    r = run_ort(_model(), feed)["y2"].ravel().astype(np.float64)
    c = run_ort(noisy, feed)["y2"].ravel().astype(np.float64)
    cosine = r @ c / np.linalg.norm(r) / np.linalg.norm(c)
    assert cosine < 0.99
    assert result.outputs[1].cosine == pytest.approx(cosine)
    assert not result.passed and "'y2'" in result.reason and "cosine" in result.reason
    assert compare_models(_model(), noisy, [_feed()], lossy=True, max_drift=cosine - 1e-6).passed


def _add_model(w) -> onnx.ModelProto:
    return make_model([helper.make_node("Add", ["x", "W"], ["y"])], [("x", np.float32, [4])],
                      [("y", np.float32, [4])], {"W": np.asarray(w, np.float32)})


def test_nan_in_the_same_places_passes_and_in_other_places_fails():
    ref = _add_model([np.nan, 1, 2, np.inf])
    feed = [{"x": np.arange(4, dtype=np.float32)}]
    assert compare_models(ref, _add_model([np.nan, 1, 2, np.inf]), feed).passed
    moved = compare_models(ref, _add_model([0, np.nan, 2, np.inf]), feed)
    assert not moved.passed and "NaN" in moved.reason
    assert not compare_models(ref, _add_model([np.nan, 1, 2, 5]), feed).passed  # inf vs finite
    assert not compare_models(ref, _add_model([np.nan, 1, 2, -np.inf]), feed).passed
    assert compare_models(ref, _add_model([np.nan, 1, 2, np.inf]), feed, lossy=True).passed
    assert not compare_models(ref, _add_model([0, np.nan, 2, np.inf]), feed, lossy=True).passed


def test_lossy_mode_fails_when_infinities_differ():
    ref = _add_model([1, 2, 3, np.inf])
    feed = [{"x": np.arange(4, dtype=np.float32)}]
    assert not compare_models(ref, _add_model([1, 2, 3, -np.inf]), feed, lossy=True).passed


def _gated_model(gate: float) -> onnx.ModelProto:
    """y = x + Relu(x - gate): equal to x + 0 unless some x exceeds ``gate``."""
    nodes = [helper.make_node("Sub", ["x", "g"], ["d"]), helper.make_node("Relu", ["d"], ["r"]),
             helper.make_node("Add", ["x", "r"], ["y"])]
    return make_model(nodes, [("x", np.float32, [8])], [("y", np.float32, [8])],
                      {"g": np.array(gate, np.float32)})


def test_multiple_feeds_keep_the_worst_case():
    ref, cand = _gated_model(100.0), _gated_model(3.0)
    small = {"x": np.linspace(-1, 1, 8).astype(np.float32)}
    large = {"x": np.linspace(0, 7, 8).astype(np.float32)}
    assert compare_models(ref, cand, [small]).passed
    expected = float(np.abs(run_ort(cand, large)["y"] - run_ort(ref, large)["y"]).max())
    assert expected > 1
    for feeds in ([small, large], [large, small]):
        result = compare_models(ref, cand, feeds)
        assert result.feeds == 2
        assert not result.passed and "'y'" in result.reason
        assert result.outputs[0].max_abs == pytest.approx(expected)


def test_feed_missing_an_input_is_an_input_error():
    with pytest.raises(InputError, match="x"):
        compare_models(_model(), _model(), [{"z": np.zeros(1, np.float32)}])


def test_unloadable_candidate_fails_validation():
    bad = _model()
    bad.graph.node[0].op_type = "NoSuchOp"
    result = compare_models(_model(), bad, [_feed()])
    assert not result.passed and "candidate model" in result.reason


def test_unloadable_reference_is_an_input_error():
    bad = _model()
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InputError, match="reference"):
        compare_models(bad, _model(), [_feed()])


def test_constant_outputs_are_warned_about_and_relative_error_ignores_zeros():
    """Agreeing on an all-zero output shows nothing: say so; and a relative error against an
    exact zero is not a number worth reporting."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["y"]), helper.make_node("Add", ["x", "one"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feed = {"x": np.array([0.0, 1.0, 2.0, 3.0], np.float32)}
    result = compare_models(model, model, [feed])
    assert result.passed
    assert len(result.warnings) == 1 and "'y' is constant" in result.warnings[0]
    shifted = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    shifted.graph.initializer[1].float_data[0] = 1.001
    z = compare_models(model, shifted, [{"x": np.array([-1.0, 1.0, 2.0, 3.0], np.float32)}],
                       lossy=True).outputs[1]
    assert z.max_rel == pytest.approx(0.001 / 2, rel=1e-3)  # the exact zero at x=-1 is skipped


def test_a_one_value_output_on_one_feed_is_warned_about_under_cosine():
    """One value against one value: its cosine is 1 whenever the signs agree (a probability off
    by 10x passes), so a lossy cosine check over one feed says it cannot judge that output;
    with two feeds the values form a vector and the check can fail."""
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["p"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    scaled = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Mul", ["s", "ten"], ["p"])], "g", list(graph.input), list(graph.output),
        [helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])]),
        opset_imports=[helper.make_opsetid("", 13)])
    one = [{"x": np.array([0.1, 0.2, 0.3, 0.4], np.float32)}]
    result = compare_models(model, scaled, one, lossy=True)
    assert result.passed and any("'p' has one value" in w for w in result.warnings)
    two = one + [{"x": np.array([-0.5, 0.2, 0.3, 0.4], np.float32)}]
    assert not any("one value" in w for w in compare_models(model, model, two,
                                                             lossy=True).warnings)


def test_models_over_the_protobuf_limit_run_from_external_data(monkeypatch):
    """A model that cannot be serialized in one message (over 2 GiB; simulated) is written to a
    temporary folder with external data and loaded from there, not refused."""
    from onnxopt import io
    monkeypatch.setattr(io, "serialize", lambda model: None)
    weight = np.random.default_rng(0).normal(size=(4, 512)).astype(np.float32)  # over 1 KiB
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [("x", np.float32, [2, 4])], [("y", np.float32, [2, 512])], {"W": weight})
    feed = {"x": np.ones((2, 4), np.float32)}
    result = compare_models(model, model, [feed])
    assert result.passed and result.outputs[0].max_abs == 0.0
    other = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [("x", np.float32, [2, 4])], [("y", np.float32, [2, 512])], {"W": -weight})
    assert not compare_models(model, other, [feed]).passed


# --- random outputs: the original disagrees with itself ------------------------------------------

def _random_model(op: str, front: bool) -> onnx.ModelProto:
    """Output ``r`` computed by the random ``op`` (from ``x``, through an Identity when
    ``front``: removing it is the harmless rewrite), output ``z`` = x * x, deterministic."""
    src = "x"
    nodes, inits = [], {}
    if front:
        nodes.append(helper.make_node("Identity", ["x"], ["xi"]))
        src = "xi"
    r_type = np.float32
    if op == "Dropout":
        inits = {"ratio": np.array(0.5, np.float32), "training": np.array(True)}
        nodes.append(helper.make_node("Dropout", [src, "ratio", "training"], ["r"]))
    elif op == "Bernoulli":
        nodes += [helper.make_node("Sigmoid", [src], ["p"]),
                  helper.make_node("Bernoulli", ["p"], ["r"])]
    elif op == "Multinomial":
        nodes.append(helper.make_node("Multinomial", [src], ["r"], sample_size=64))
        r_type = np.int32
    elif op in ("RandomNormal", "RandomUniform"):
        nodes += [helper.make_node(op, [], ["noise"], shape=[4, 64]),
                  helper.make_node("Add", [src, "noise"], ["r"])]
    else:  # RandomNormalLike, RandomUniformLike
        nodes.append(helper.make_node(op, [src], ["r"]))
    nodes.append(helper.make_node("Mul", ["x", "x"], ["z"]))
    return make_model(nodes, [("x", np.float32, [4, 64])],
                      [("r", r_type, [4, 64]), ("z", np.float32, [4, 64])], inits)


RANDOM_OPS = ["RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
              "Multinomial", "Bernoulli", "Dropout"]


@pytest.mark.parametrize("op", RANDOM_OPS)
def test_random_outputs_are_listed_as_not_compared_and_the_rest_is_compared(op):
    original, candidate = _random_model(op, front=True), _random_model(op, front=False)
    feed = {"x": np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)}
    first, second = run_ort(original, feed)["r"], run_ort(candidate, feed)["r"]
    assert not np.array_equal(first, second)  # what failed validation before
    result = compare_models(original, candidate, [feed])
    assert result.passed, result.reason
    assert result.not_compared == ["r"] and result.original_miscomputed == []
    assert any("'r' is random" in w for w in result.warnings)
    by_name = {m.name: m for m in result.outputs}
    assert by_name["r"].reason.startswith("values not compared")
    assert by_name["z"].passed and by_name["z"].max_abs == 0 and by_name["z"].reason == ""
    assert result.to_dict()["not_compared"] == ["r"]


def test_random_outputs_still_have_their_dtype_and_shape_and_the_others_their_values_compared():
    original = _random_model("RandomNormalLike", front=True)
    wrong_z = _random_model("RandomNormalLike", front=False)
    wrong_z.graph.node[-1].op_type = "Add"
    feed = {"x": np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)}
    assert not np.allclose(run_ort(original, feed)["z"], run_ort(wrong_z, feed)["z"])
    result = compare_models(original, wrong_z, [feed])
    assert not result.passed and "'z'" in result.reason and result.not_compared == ["r"]
    wrong_dtype = _random_model("RandomNormalLike", front=False)
    wrong_dtype.graph.node[0].attribute.append(helper.make_attribute("dtype", TensorProto.DOUBLE))
    wrong_dtype.graph.output[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    result = compare_models(original, wrong_dtype, [feed])
    assert not result.passed and "'r'" in result.reason and "float64" in result.reason
    assert result.not_compared == []


def test_random_outputs_pass_optimize_on_the_cli_and_the_api(tmp_path):
    from onnxopt import optimize
    from onnxopt.cli import main

    original = _random_model("Dropout", front=True)
    _, report = optimize(original)
    assert report.validation.passed and report.validation.not_compared == ["r"]
    assert not report.rolled_back and any("'r' is random" in w for w in report.warnings)
    path, out = tmp_path / "random.onnx", tmp_path / "random.opt.onnx"
    path.write_bytes(original.SerializeToString())
    assert main(["optimize", str(path), "-o", str(out), "--quiet",
                 "--report", str(tmp_path / "report.json")]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["validation"]["not_compared"] == ["r"] and out.exists()
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Dropout", "Mul"]


# --- tolerances respect the output dtype's precision ---------------------------------------------

def _float16_sum(folded: bool) -> onnx.ModelProto:
    """y = (x + a) + b in float16, or x + (a + b) with a + b folded (exact in the reals)."""
    a, b = np.float16(0.3), np.float16(0.7)
    nodes = ([helper.make_node("Add", ["x", "ab"], ["y"])] if folded else
             [helper.make_node("Add", ["x", "a"], ["xa"]), helper.make_node("Add", ["xa", "b"], ["y"])])
    inits = {"ab": np.array(a + b, np.float16)} if folded else {
        "a": np.array(a, np.float16), "b": np.array(b, np.float16)}
    return make_model(nodes, [("x", np.float16, [256])], [("y", np.float16, [256])], inits)


def test_float16_outputs_may_differ_by_a_few_units_in_the_last_place():
    feed = {"x": np.random.default_rng(0).uniform(2, 4, size=256).astype(np.float16)}
    ref = run_ort(_float16_sum(False), feed)["y"]
    cand = run_ort(_float16_sum(True), feed)["y"]
    ulp = np.spacing(np.abs(ref).max())  # float16 spacing at the outputs' magnitude
    diff = np.abs(ref.astype(np.float64) - cand).max()
    assert 0 < diff <= ulp  # one float16 step: the rounding of the intermediate sum moved
    assert diff > 1e-5 + 1e-4 * (ref.max() - ref.min())  # beyond the float32-minded default
    result = compare_models(_float16_sum(False), _float16_sum(True), [feed])
    assert result.passed, result.reason
    assert result.outputs[0].tolerance == pytest.approx(4 * float(ulp))
    broken = _float16_sum(True)
    broken.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(
        np.array(np.float16(1.0) + np.float16(0.05), np.float16), "ab"))
    result = compare_models(_float16_sum(False), broken, [feed])
    assert not result.passed and "tolerance" in result.reason


def test_float32_tolerance_is_atol_plus_rtol_of_the_range():
    feed = _feed()
    result = compare_models(_model(), _model(), [feed])
    y1 = run_ort(_model(), feed)["y1"]
    assert result.outputs[0].tolerance == pytest.approx(1e-5 + 1e-4 * float(y1.max() - y1.min()))


# --- onnxruntime computes the original wrongly ---------------------------------------------------

def _if_twice(copy: bool) -> onnx.ModelProto:
    """An If whose branches return one tensor as both outputs (onnxruntime 1.32 gives zeros for
    the first), or, with ``copy``, the tensor and an Identity copy of it."""
    def branch(op, name):
        nodes = [helper.make_node(op, ["x", "x"], ["a"])]
        second = "a"
        if copy:
            nodes.append(helper.make_node("Identity", ["a"], ["a2"]))
            second = "a2"
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(n, 1, [2])
                                                   for n in ("a", second)])
    nodes = [helper.make_node("If", ["c"], ["y1", "y2"], then_branch=branch("Add", "then"),
                              else_branch=branch("Mul", "else"))]
    return make_model(nodes, [("c", np.bool_, []), ("x", np.float32, [2])],
                      [("y1", np.float32, [2]), ("y2", np.float32, [2])])


def _if_feed():
    return {"c": np.array(True), "x": np.array([1.5, 2.0], np.float32)}


@pytest.fixture
def miscomputing_runtime(monkeypatch):
    """onnxruntime computing output 'y1' of the reference model wrongly (1 too much), the same
    way on every run."""
    module = importlib.import_module("onnxopt.validate")
    real = module.run_model

    def run(session, feed, what, hint=""):
        outs = real(session, feed, what, hint)
        return [o + 1 if what == "reference model" and i == 0 else o for i, o in enumerate(outs)]

    monkeypatch.setattr(module, "run_model", run)


def test_an_original_onnxruntime_computes_wrongly_is_told_apart_and_passes(miscomputing_runtime):
    result = compare_models(_model(), _model(), [_feed()])
    assert result.passed, result.reason
    assert result.original_miscomputed == ["y1"] and result.not_compared == []
    assert result.outputs[0].reason.startswith("onnxruntime computes the original wrongly")
    assert any("onnxruntime computes the original wrongly" in w for w in result.warnings)
    assert result.to_dict()["original_miscomputed"] == ["y1"]


def test_a_candidate_the_reference_implementation_disagrees_with_is_broken(miscomputing_runtime):
    w1 = W1.copy()
    w1[0, 0] += 1e-2
    result = compare_models(_model(), _model(w1=w1), [_feed()])
    assert not result.passed and "'y1'" in result.reason and result.original_miscomputed == []


def test_an_if_returning_one_tensor_twice_onnxruntime_miscomputes_passes():
    """onnxruntime 1.32 returns memory it never wrote as the first output of such an If: zeros,
    or whatever the buffer held; the candidate (an Identity copy for the second output) is
    computed right, and is accepted whatever onnxruntime made of the original."""
    from onnx.reference import ReferenceEvaluator

    feed = _if_feed()
    original, fixed = _if_twice(False), _if_twice(True)
    spec = ReferenceEvaluator(original).run(None, feed)
    np.testing.assert_allclose(run_ort(fixed, feed)["y1"], spec[0])
    result = compare_models(original, fixed, [feed])
    assert result.passed, result.reason
    assert result.original_miscomputed in ([], ["y1"]) and result.not_compared == []
    # a candidate that disagrees with the reference implementation too is broken
    wrong = _if_twice(True)
    for branch in wrong.graph.node[0].attribute:
        branch.g.node[0].op_type = "Pow"  # x ** x: neither x + x nor what a buffer held
    result = compare_models(original, wrong, [feed])
    assert not result.passed and result.original_miscomputed == [] and "'y1'" in result.reason


def test_the_cross_check_is_skipped_with_a_warning_for_large_models(monkeypatch,
                                                                  miscomputing_runtime):
    monkeypatch.setattr(importlib.import_module("onnxopt.validate"), "REFERENCE_MAX_NODES", 1)
    result = compare_models(_model(), _model(), [_feed()])
    assert not result.passed and result.original_miscomputed == []
    assert any("not cross-checked" in w and "2 nodes (at most 1" in w for w in result.warnings)


# --- lossy results judged also as users run them (onnxruntime's graph optimizations on) --------

def _optimized_sessions_run(monkeypatch, model: onnx.ModelProto) -> list:
    """Make the validation's sessions with graph optimizations on run ``model`` instead of the
    candidate (a stand-in for a fusion that changes what the candidate computes); returns the
    list of models the optimized sessions were asked for."""
    module = importlib.import_module("onnxopt.validate")
    real, asked = module.make_session, []

    def make_session(candidate, what, optimized=False):
        if optimized:
            asked.append(candidate)
            return real(model, what, optimized=True)
        return real(candidate, what)

    monkeypatch.setattr(module, "make_session", make_session)
    return asked


def _cosine(model_a: onnx.ModelProto, model_b: onnx.ModelProto, feed: dict, name: str) -> float:
    a = run_ort(model_a, feed)[name].ravel().astype(np.float64)
    b = run_ort(model_b, feed)[name].ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_lossy_result_is_judged_by_the_worse_session(monkeypatch):
    candidate = _model(w2=W2 + 0.01)
    fused = _model(w2=W2 + np.random.default_rng(5).normal(size=W2.shape).astype(np.float32))
    asked = _optimized_sessions_run(monkeypatch, fused)
    feeds = [_feed(), _feed(seed=2)]
    plain = min(_cosine(_model(), candidate, f, "y2") for f in feeds)
    worse = min(_cosine(_model(), fused, f, "y2") for f in feeds)
    threshold = (plain + worse) / 2
    assert worse < threshold < plain
    result = compare_models(_model(), candidate, feeds, lossy=True, max_drift=threshold)
    assert len(asked) == 1 and result.sessions == ["unoptimized", "optimized"]
    assert not result.passed and "'y2'" in result.reason
    assert "graph optimizations on" in result.reason and f"{plain:.6f}" in result.reason
    y1, y2 = result.outputs
    assert y2.worse_session == "optimized" and y2.cosine == pytest.approx(worse)
    assert y2.by_session["unoptimized"]["cosine"] == pytest.approx(plain)
    assert y2.by_session["optimized"]["cosine"] == pytest.approx(worse)
    assert y1.passed and y1.worse_session == "neither"
    json.dumps(result.to_dict())
    # the worse session is the unoptimized one when it is the candidate as written that drifts
    monkeypatch.undo()
    asked = _optimized_sessions_run(monkeypatch, candidate)
    result = compare_models(_model(), fused, feeds, lossy=True, max_drift=threshold)
    assert not result.passed and result.outputs[1].worse_session == "unoptimized"
    assert "graph optimizations" not in result.reason
    assert compare_models(_model(), candidate, feeds, lossy=True, max_drift=worse - 1e-6).passed


def test_a_lossless_result_is_judged_as_written_only(monkeypatch):
    """onnxruntime's fusions move the original's rounding as much as a lossless tolerance: a
    lossless candidate runs in the unoptimized session only (validate's module docstring)."""
    asked = _optimized_sessions_run(monkeypatch, _model(w2=W2 + 1.0))
    result = compare_models(_model(), _model(), [_feed()])
    assert result.passed and asked == [] and result.sessions == ["unoptimized"]
    assert all(m.worse_session is None and m.by_session == {} for m in result.outputs)


def test_a_candidate_onnxruntime_cannot_load_optimized_fails(monkeypatch):
    module = importlib.import_module("onnxopt.validate")
    real = module.make_session

    def make_session(candidate, what, optimized=False):
        if optimized:
            raise InputError(f"{what}: onnxruntime cannot load the model: fusion failed")
        return real(candidate, what)

    monkeypatch.setattr(module, "make_session", make_session)
    result = compare_models(_model(), _model(), [_feed()], lossy=True)
    assert not result.passed
    assert result.reason.startswith("candidate model (onnxruntime graph optimizations on)")
    assert result.sessions == ["unoptimized", "optimized"]


def _qdq_conv(reference: onnx.ModelProto, feed: dict) -> onnx.ModelProto:
    """``reference`` (Conv -> Sigmoid, uint8-range input) with QDQ around the Conv as static
    quantization writes it: uint8 activations, int8 per-channel weights on the full 8-bit grid
    (no ``reduce_range``), the output quantized over its range on ``feed``. onnxruntime fuses
    it into QLinearConv when graph optimizations are on."""
    w = onnx.numpy_helper.to_array(reference.graph.initializer[0])
    w_scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.rint(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    conv = make_model([helper.make_node("Conv", ["x", "W"], ["h"], pads=[1, 1, 1, 1])],
                      [("x", np.float32, [1, 32, 8, 8])], [("h", np.float32, [1, 16, 8, 8])],
                      {"W": w})
    h = run_ort(conv, feed)["h"]
    h_scale = np.float32((h.max() - min(h.min(), 0)) / 255)
    h_zero = np.uint8(np.clip(np.rint(-min(h.min(), 0) / h_scale), 0, 255))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wd"], axis=0),
             helper.make_node("Conv", ["xd", "Wd"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["h", "hs", "hz"], ["hq"]),
             helper.make_node("DequantizeLinear", ["hq", "hs", "hz"], ["hd"]),
             helper.make_node("Sigmoid", ["hd"], ["y"])]
    return make_model(nodes, [("x", np.float32, [1, 32, 8, 8])],
                      [("y", np.float32, [1, 16, 8, 8])],
                      {"xs": np.float32(1 / 255), "xz": np.uint8(0), "Wq": w_q, "Ws": w_scale,
                       "Wz": np.zeros(16, np.int8), "hs": h_scale, "hz": h_zero})


def test_a_qdq_model_is_judged_as_onnxruntime_fuses_it():
    """QLinearConv's x86 u8s8 kernels without VNNI saturate int16 pair sums with 8-bit weights
    (what validation missed when it ran the QDQ pairs unfused only); wherever the fused kernel
    computes otherwise, the verdict follows the worse of the two sessions."""
    rng = np.random.default_rng(0)
    w = rng.uniform(-1, 1, size=(16, 32, 3, 3)).astype(np.float32)
    reference = make_model([helper.make_node("Conv", ["x", "W"], ["h"], pads=[1, 1, 1, 1]),
                            helper.make_node("Sigmoid", ["h"], ["y"])],
                           [("x", np.float32, [1, 32, 8, 8])], [("y", np.float32, [1, 16, 8, 8])],
                           {"W": w})
    feed = {"x": rng.uniform(0, 1, size=(1, 32, 8, 8)).astype(np.float32)}
    candidate = _qdq_conv(reference, feed)
    ref = run_ort(reference, feed)["y"].ravel().astype(np.float64)
    cosines = {}
    for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        sess = ort.InferenceSession(candidate.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        c = sess.run(None, feed)[0].ravel().astype(np.float64)
        cosines[level] = float(ref @ c / np.linalg.norm(ref) / np.linalg.norm(c))
    plain, fused = cosines["ORT_DISABLE_ALL"], cosines["ORT_ENABLE_ALL"]
    threshold = (plain + fused) / 2 if plain != fused else plain
    result = compare_models(reference, candidate, [feed], lossy=True, max_drift=threshold)
    assert result.outputs[0].cosine == pytest.approx(min(plain, fused))
    assert result.passed == (min(plain, fused) >= threshold)
    assert result.outputs[0].worse_session == (
        "optimized" if fused < plain else "unoptimized" if plain < fused else "neither")


def _masked_model(padding_offset: float) -> onnx.ModelProto:
    """``y[b, s, :] = x[b, s, :] @ W + padding_offset`` where ``attention_mask[b, s] == 0``,
    and a pooled output ``p = mean over s of y`` (not shaped like the mask)."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mf"], ["pad"]),
             helper.make_node("Mul", ["pad", "offset"], ["shift"]),
             helper.make_node("Unsqueeze", ["shift", "axis"], ["shift3"]),
             helper.make_node("Add", ["h", "shift3"], ["y"]),
             helper.make_node("ReduceMean", ["y"], ["p"], axes=[1], keepdims=0)]
    return make_model(
        nodes, [("x", np.float32, [2, 5, 8]), ("attention_mask", np.int64, [2, 5])],
        [("y", np.float32, [2, 5, 8]), ("p", np.float32, [2, 8])],
        {"W": rng.normal(size=(8, 8)).astype(np.float32), "one": np.float32(1.0),
         "offset": np.float32(padding_offset), "axis": np.array([-1], np.int64)})


def test_drift_mask_judges_only_the_kept_positions_of_outputs_shaped_like_it():
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int64)
    feed = {"x": np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32),
            "attention_mask": mask}
    reference, padded_differs = _masked_model(0.0), _masked_model(100.0)
    # p mixes padding in: only y is masked, so p still fails
    result = compare_models(reference, padded_differs, [feed], lossy=True, max_drift=0.99,
                            mask="attention_mask")
    assert not result.passed and result.reason.startswith("output 'p'"), result.reason
    y = next(o for o in result.outputs if o.name == "y")
    assert y.passed and y.cosine == pytest.approx(1.0) and y.max_abs == 0.0
    assert result.to_dict()["mask"] == "attention_mask"
    unmasked = compare_models(reference, padded_differs, [feed], lossy=True, max_drift=0.99)
    y = next(o for o in unmasked.outputs if o.name == "y")
    assert not y.passed and y.max_abs > 99
    # a lossless comparison keeps every position
    lossless = compare_models(reference, padded_differs, [feed], mask="attention_mask")
    assert not lossless.passed and lossless.mask is None


def test_a_drift_mask_that_is_not_an_input_is_a_usage_error():
    import onnxopt
    from onnxopt.errors import UsageError

    with pytest.raises(UsageError, match="drift mask 'mask' is not an input of the model "
                                         r"\(inputs: x, attention_mask\)"):
        onnxopt.optimize(_masked_model(0.0), drift_mask="mask")
    with pytest.raises(UsageError, match="drift mask 'mask'"):
        onnxopt.validate(_masked_model(0.0), _masked_model(0.0), drift_mask="mask", lossy=True)
