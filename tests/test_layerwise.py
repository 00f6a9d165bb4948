"""Tests of optimizer/layerwise.py: which intermediate tensor diverges first, which nodes add the
most error, the rollback report naming the first diverging tensor, and ``validate --layerwise``."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from helpers import make_branch, make_model, run_ort
from onnxopt.cli import main
from onnxopt.layerwise import compare_layerwise
from onnxopt.pass_manager import REGISTRY, Pass, PassResult
from onnxopt.validate import output_metrics
from tools import zoo

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(4, 5)).astype(np.float32)
W2 = RNG.normal(size=(5, 3)).astype(np.float32)
B = RNG.normal(size=(3,)).astype(np.float32)
FEED = {"x": RNG.normal(size=(2, 4)).astype(np.float32)}


def _mlp(w1=W1, w2=W2, hidden="h", activated="r", outputs=("y",)) -> onnx.ModelProto:
    """x -> MatMul(W1) -> ``hidden`` -> Relu -> ``activated`` -> MatMul(W2) -> m -> Add(B) -> y."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], [hidden], name="mm1"),
             helper.make_node("Relu", [hidden], [activated], name="relu"),
             helper.make_node("MatMul", [activated, "W2"], ["m"], name="mm2"),
             helper.make_node("Add", ["m", "B"], ["y"], name="add")]
    shapes = {"y": [2, 3], "m": [2, 3], activated: [2, 5], hidden: [2, 5]}
    return make_model(nodes, [("x", np.float32, [2, 4])],
                      [(o, np.float32, shapes[o]) for o in outputs],
                      {"W1": w1, "W2": w2, "B": B})


def _bumped(w: np.ndarray, index=(0, 0), by: float = 1.0) -> np.ndarray:
    w = w.copy()
    w[index] += by
    return w


def test_identical_models_compare_every_tensor_and_do_not_diverge():
    result = compare_layerwise(_mlp(), _mlp(), [FEED])
    assert result.compared == 4 and result.reason == ""
    assert result.first_divergence is None
    assert result.unmatched == {"candidate": [], "reference": []} and result.skipped == []
    assert result.ranking == []  # lossless: no ranking


def test_changed_weight_names_its_consumer_in_both_models():
    result = compare_layerwise(_mlp(), _mlp(w2=_bumped(W2)), [FEED])
    d = result.first_divergence
    assert d.tensor == "m"
    assert (d.reference_node.name, d.reference_node.op) == ("mm2", "MatMul")
    assert (d.candidate_node.name, d.candidate_node.op) == ("mm2", "MatMul")
    ref = run_ort(_mlp(outputs=("m",)), FEED)["m"]
    cand = run_ort(_mlp(w2=_bumped(W2), outputs=("m",)), FEED)["m"]
    assert d.metrics.max_abs == pytest.approx(np.abs(cand.astype(np.float64) - ref).max())
    assert not d.metrics.passed and "tolerance" in d.metrics.reason
    data = json.loads(json.dumps(result.to_dict()))
    assert data["first_divergence"]["tensor"] == "m"
    assert data["first_divergence"]["candidate_node"] == {"name": "mm2", "op": "MatMul"}


def test_drift_within_tolerance_is_not_a_divergence():
    w2 = W2.copy()
    w2[0, 0] = np.nextafter(w2[0, 0], np.float32(np.inf))
    assert compare_layerwise(_mlp(), _mlp(w2=w2), [FEED]).first_divergence is None


def test_renamed_tensor_is_unmatched_and_the_next_matched_one_diverges():
    result = compare_layerwise(_mlp(), _mlp(w1=_bumped(W1), hidden="h_renamed"), [FEED])
    assert result.unmatched == {"candidate": ["h_renamed"], "reference": ["h"]}
    assert result.compared == 3
    assert result.first_divergence.tensor == "r"
    assert result.first_divergence.candidate_node.op == "Relu"


def test_a_shape_difference_is_a_divergence():
    shape6 = np.array([6], np.int64)
    ref = make_model([helper.make_node("Reshape", ["x", "s"], ["a"], name="flatten"),
                      helper.make_node("ReduceSum", ["a"], ["y"], keepdims=0, name="sum")],
                     [("x", np.float32, [2, 3])], [("y", np.float32, [])], {"s": shape6})
    cand = make_model([helper.make_node("Identity", ["x"], ["a"], name="same"),
                       helper.make_node("ReduceSum", ["a"], ["y"], keepdims=0, name="sum")],
                      [("x", np.float32, [2, 3])], [("y", np.float32, [])])
    feed = {"x": RNG.normal(size=(2, 3)).astype(np.float32)}
    result = compare_layerwise(ref, cand, [feed])
    d = result.first_divergence
    assert d.tensor == "a" and d.reference_node.op == "Reshape" and d.candidate_node.op == "Identity"
    assert d.metrics.shape == [6] and d.metrics.candidate_shape == [2, 3]
    assert result.compared == 2  # y itself agrees


def test_lossy_criterion_is_the_cosine():
    w2 = _bumped(W2, by=0.05)
    assert compare_layerwise(_mlp(), _mlp(w2=w2), [FEED]).first_divergence.tensor == "m"
    assert compare_layerwise(_mlp(), _mlp(w2=w2), [FEED], lossy=True,
                             max_drift=0.9).first_divergence is None
    assert compare_layerwise(_mlp(), _mlp(w2=w2), [FEED], lossy=True,
                             max_drift=0.9999999).first_divergence.tensor == "m"


def test_ranking_charges_each_node_the_snr_it_loses():
    w1, w2 = _bumped(W1, by=0.01), _bumped(W2, (1, 1), by=0.3)
    result = compare_layerwise(_mlp(), _mlp(w1=w1, w2=w2), [FEED], lossy=True, max_drift=0.0)
    got = {r.node.name: r for r in result.ranking}
    outs = ("h", "r", "m", "y")
    ref, cand = run_ort(_mlp(outputs=outs), FEED), run_ort(_mlp(w1=w1, w2=w2, outputs=outs), FEED)
    snr = {t: output_metrics(ref[t], cand[t])["snr_db"] for t in outs}
    # mm1 reads the exact input: all of its error is added
    assert got["mm1"].input_snr_db == math.inf and got["mm1"].added_db == math.inf
    assert got["mm1"].output_snr_db == pytest.approx(snr["h"])
    assert got["mm2"].added_db == pytest.approx(snr["r"] - snr["m"])
    assert result.ranking[0].node.name == "mm1" and result.ranking[1].node.name == "mm2"
    assert all(r.added_db > 0 for r in result.ranking)
    assert result.to_dict()["ranking"][0]["added_db"] == "inf"


def test_ranking_charges_unmatched_tensors_to_the_next_matched_node():
    w1, w2 = _bumped(W1, by=0.01), _bumped(W2, (1, 1), by=0.3)
    result = compare_layerwise(_mlp(), _mlp(w1=w1, w2=w2, activated="r_renamed"), [FEED],
                               lossy=True, max_drift=0.0)
    got = {r.node.name: r for r in result.ranking}
    ref = run_ort(_mlp(outputs=("h", "m")), FEED)
    cand = run_ort(_mlp(w1=w1, w2=w2, outputs=("h", "m")), FEED)
    snr = {t: output_metrics(ref[t], cand[t])["snr_db"] for t in ("h", "m")}
    # the Relu's output is unmatched: it carries the SNR of h into mm2
    assert "relu" not in got
    assert got["mm2"].input_snr_db == pytest.approx(snr["h"])
    assert got["mm2"].added_db == pytest.approx(snr["h"] - snr["m"])


def test_constant_nodes_are_parameters_not_compared():
    reference = _mlp()
    w2 = next(i for i in reference.graph.initializer if i.name == "W2")
    reference.graph.node.insert(0, helper.make_node("Constant", [], ["W2"], value=w2))
    reference.graph.initializer.remove(w2)
    result = compare_layerwise(reference, _mlp(), [FEED])
    assert result.compared == 4 and result.unmatched == {"candidate": [], "reference": []}
    assert result.first_divergence is None


def test_subgraph_and_non_tensor_values_are_skipped():
    then = make_branch([helper.make_node("Neg", ["x"], ["inner_then"]),
                        helper.make_node("Abs", ["inner_then"], ["then_out"])],
                       [("then_out", np.float32, [2, 3])], name="then")
    other = make_branch([helper.make_node("Relu", ["x"], ["else_out"])],
                        [("else_out", np.float32, [2, 3])], name="else")
    nodes = [helper.make_node("If", ["c"], ["branch"], then_branch=then, else_branch=other),
             helper.make_node("SequenceConstruct", ["x", "branch"], ["seq"]),
             helper.make_node("SequenceAt", ["seq", "i"], ["y"], name="at")]
    model = make_model(nodes, [("x", np.float32, [2, 3]), ("c", TensorProto.BOOL, [])],
                       [("y", np.float32, [2, 3])], {"i": np.array(1, np.int64)})
    feed = {"x": RNG.normal(size=(2, 3)).astype(np.float32), "c": np.array(True)}
    result = compare_layerwise(model, model, [feed])
    # the If branches' tensors (both branches; the one not taken compares two empty tensors),
    # then the If's output and y
    assert [t["tensor"] for t in result.tensors] == ["else_out", "inner_then", "then_out",
                                                     "branch", "y"]
    assert result.compared == 5 and result.first_divergence is None
    reasons = {s["tensor"]: s["reason"] for s in result.skipped}
    assert reasons == {"seq": "not a tensor (sequence)"}


def test_the_first_divergence_inside_an_if_branch_is_found():
    """A corrupted weight inside the branch the feed takes: the first divergence is the branch
    tensor it writes (named by its own name and producer), before the If's output."""
    def model(w):
        then = make_branch([helper.make_node("MatMul", ["x", "w"], ["mm"], name="branch_mm"),
                            helper.make_node("Relu", ["mm"], ["then_out"])],
                           [("then_out", np.float32, [2, 3])], {"w": w}, name="then")
        other = make_branch([helper.make_node("Neg", ["x"], ["else_out"])],
                            [("else_out", np.float32, [2, 3])], name="else")
        nodes = [helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
                 helper.make_node("Abs", ["b"], ["y"])]
        return make_model(nodes, [("x", np.float32, [2, 3]), ("c", TensorProto.BOOL, [])],
                          [("y", np.float32, [2, 3])])
    w = np.eye(3, dtype=np.float32)
    bad = w.copy()
    bad[0, 0] = -3.0
    feed = {"x": RNG.normal(size=(2, 3)).astype(np.float32), "c": np.array(True)}
    result = compare_layerwise(model(w), model(bad), [feed])
    assert result.first_divergence.tensor == "mm"
    assert result.first_divergence.candidate_node.name == "branch_mm"


def test_candidate_that_does_not_run_gives_a_reason():
    broken = _mlp()
    broken.graph.node[2].op_type = "NoSuchOp"
    result = compare_layerwise(_mlp(), broken, [FEED])
    assert result.first_divergence is None and result.compared == 0
    assert "candidate model" in result.reason


class _CorruptOneWeight(Pass):
    """Test-only lossless pass: adds 1.0 to one element of the first Conv (or MatMul) weight, once
    (the corrupted weight gets a new name, so the next round finds nothing to do)."""

    name = "test_corrupt_one_weight"
    description = "adds 1.0 to one weight of the first Conv or MatMul"

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs

        node = next(n for n in graph.nodes if n.op in ("Conv", "MatMul"))
        weight = node.inputs[1]
        if weight.name.endswith("_corrupted"):
            return PassResult(False)
        values = np.array(weight.values)
        values.flat[0] += 1.0
        node.inputs[1] = gs.Constant(f"{weight.name}_corrupted", values)
        return PassResult(True)


@pytest.fixture
def corrupt_pass(monkeypatch):
    monkeypatch.setitem(REGISTRY, _CorruptOneWeight.name, _CorruptOneWeight)
    return _CorruptOneWeight.name


def test_rollback_names_the_first_diverging_tensor(corrupt_pass):
    _, report = onnxopt.optimize(_mlp(), passes=["remove_identity", corrupt_pass],
                                   inputs=FEED)
    assert report.validation.passed
    (entry,) = report.rolled_back
    assert entry["pass"] == corrupt_pass
    assert entry["first_divergence"]["tensor"] == "h"
    assert entry["first_divergence"]["reference_node"] == {"name": "mm1", "op": "MatMul"}
    assert entry["first_divergence"]["candidate_node"] == {"name": "mm1", "op": "MatMul"}
    json.dumps(report.to_dict())


# ----------------------------------------------------------------------------- real models

def _zoo(name: str) -> tuple[str, str]:
    path, npz = zoo.model_path(zoo.DEFAULT_DEST, name), zoo.inputs_path(zoo.DEFAULT_DEST, name)
    if not (path.exists() and npz.exists()):
        if os.environ.get("ONNXOPT_REQUIRE_ZOO") == "1":
            pytest.fail(f"{name} is not fetched: run tools/fetch_models.py")
        pytest.skip(f"{name} not fetched (tools/fetch_models.py)")
    return str(path), str(npz)


CLS = "ch_ppocr_mobile_v2.0_cls_infer"


def _first_conv(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "Conv")


@pytest.mark.zoo
def test_rollback_on_real_model_names_the_corrupted_conv_output(corrupt_pass):
    path, npz = _zoo(CLS)
    _, report = onnxopt.optimize(path, passes=["remove_identity", corrupt_pass], inputs=npz)
    assert report.validation.passed
    (entry,) = report.rolled_back
    conv = _first_conv(onnx.load(path))
    assert entry["pass"] == corrupt_pass
    assert entry["first_divergence"]["tensor"] == conv.output[0]
    assert entry["first_divergence"]["reference_node"] == {"name": conv.name, "op": "Conv"}
    assert entry["first_divergence"]["candidate_node"] == {"name": conv.name, "op": "Conv"}


@pytest.mark.zoo
def test_validate_layerwise_finds_a_changed_weight_in_a_real_model(tmp_path, capsys):
    path, npz = _zoo(CLS)
    model = onnx.load(path)
    # a Conv in the middle of the network, its weight stored as a Constant node
    conv = [n for n in model.graph.node if n.op_type == "Conv"][6]
    holder = next(n for n in model.graph.node if n.op_type == "Constant"
                  and n.output[0] == conv.input[1])
    weight = numpy_helper.to_array(holder.attribute[0].t)
    holder.attribute[0].t.CopyFrom(numpy_helper.from_array(
        _bumped(weight, (0, 0, 0, 0)), holder.attribute[0].t.name))
    changed, report = tmp_path / "changed.onnx", tmp_path / "r.json"
    onnx.save(model, str(changed))
    assert main(["validate", path, str(changed), "--inputs", npz, "--layerwise",
                 "--report", str(report)]) == 1
    assert "first divergence" in capsys.readouterr().out
    lw = json.loads(report.read_text())["layerwise"]
    assert lw["first_divergence"]["tensor"] == conv.output[0]
    assert lw["first_divergence"]["reference_node"] == {"name": conv.name, "op": "Conv"}
    assert lw["first_divergence"]["candidate_node"] == {"name": conv.name, "op": "Conv"}
    assert lw["compared"] > 200 and lw["unmatched"] == {"candidate": [], "reference": []}
    # and the unchanged model has no divergence
    assert main(["validate", path, path, "--inputs", npz, "--layerwise", "--report",
                 str(report), "--quiet"]) == 0
    assert json.loads(report.read_text())["layerwise"]["first_divergence"] is None


@pytest.mark.zoo
def test_quantized_real_model_ranks_a_quantized_matmul_or_conv_first():
    path, npz = _zoo("magika")
    quantized, _ = onnxopt.optimize(path, inputs=npz, quantize="int8-weight")
    feeds = [dict(np.load(npz))]
    result = compare_layerwise(onnx.load(path), quantized, feeds, lossy=True)
    dequantized = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    dequantized |= {n.output[0] for n in quantized.graph.node  # per-channel scale after it
                    if n.op_type == "Mul" and set(n.input) & dequantized}
    by_name = {n.name: n for n in quantized.graph.node}
    top = [by_name[r.node.name] for r in result.ranking[:3]]
    assert any(n.op_type in ("MatMul", "Conv", "Gemm") and set(n.input) & dequantized
               for n in top), [(n.name, n.op_type) for n in top]
    assert len(result.ranking) == 10
    assert all(a.added_db >= b.added_db for a, b in zip(result.ranking, result.ranking[1:]))


def test_optimize_layerwise_lists_every_compared_tensor_for_the_chart():
    """``optimize(..., layerwise=True)`` compares the result with the original tensor by tensor;
    the per-tensor list is what the HTML report's per-layer chart plots."""
    from onnx import TensorProto, helper, numpy_helper
    import onnxopt

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    _, report = onnxopt.optimize(model, quantize="int8-weight", layerwise=True,
                                   inputs={"x": rng.standard_normal((4, 16)).astype(np.float32)})
    lw = report.layerwise
    assert lw is not None and lw.mode == "lossy"
    assert [t["tensor"] for t in lw.tensors] == ["h", "r", "y"]
    assert all(0 < t["snr_db"] < 80 for t in lw.tensors)  # quantization noise, measured
    assert lw.ranking and lw.ranking[0].node.op == "MatMul"


def test_sibling_branches_defining_one_name_are_not_compared():
    """ONNX lets the two branches of an If define the same name: which one a comparison would
    see is not defined, so it is skipped with the reason (not a crash), and the tensors after it
    are compared."""
    then = make_branch([helper.make_node("Sin", ["x"], ["h"]),
                        helper.make_node("Abs", ["h"], ["t_out"])],
                       [("t_out", np.float32, [2, 3])], name="then")
    other = make_branch([helper.make_node("Cos", ["x"], ["h"]),
                         helper.make_node("Neg", ["h"], ["e_out"])],
                        [("e_out", np.float32, [2, 3])], name="else")
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then,
                                         else_branch=other)],
                       [("x", np.float32, [2, 3]), ("c", TensorProto.BOOL, [])],
                       [("y", np.float32, [2, 3])])
    feeds = [{"x": RNG.normal(size=(2, 3)).astype(np.float32), "c": np.array(flag)}
             for flag in (True, False)]
    result = compare_layerwise(model, model, feeds)
    assert result.first_divergence is None and result.reason == ""
    assert {"tensor": "h", "reason": "defined in more than one graph (sibling If branches)"} \
        in result.skipped
    assert [t["tensor"] for t in result.tensors] == ["e_out", "t_out", "y"]


def test_a_one_value_branch_tensor_stays_pooled_over_the_feeds_that_take_its_branch():
    """A scalar inside a branch: a feed taking the other branch gives an empty value, which must
    not turn the pooled cosine (over the feeds' values) back into a per-feed one (1.0)."""
    def model(offset):
        then = make_branch([helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
                            helper.make_node("Add", ["m", "off"], ["s"]),
                            helper.make_node("Mul", ["x", "s"], ["t_out"])],
                           [("t_out", np.float32, [2, 3])],
                           {"off": np.array(offset, np.float32)}, name="then")
        other = make_branch([helper.make_node("Neg", ["x"], ["e_out"])],
                            [("e_out", np.float32, [2, 3])], name="else")
        return make_model([helper.make_node("If", ["c"], ["y"], then_branch=then,
                                            else_branch=other)],
                          [("x", np.float32, [2, 3]), ("c", TensorProto.BOOL, [])],
                          [("y", np.float32, [2, 3])])
    # means 0.5, 1.0, 1.5: each feed's s has the same sign in both models (cosine 1 alone), the
    # three together point elsewhere ((m) against (m + 4): cosine 0.96)
    feeds = [{"x": np.full((2, 3), 0.5 * (k + 1), np.float32), "c": np.array(k < 3)}
             for k in range(4)]
    result = compare_layerwise(model(0.0), model(4.0), feeds, lossy=True)
    assert result.first_divergence is not None and result.first_divergence.tensor == "s"


def test_a_model_tensor_named_like_an_exposed_branch_tensor_does_not_clash():
    then = make_branch([helper.make_node("Sin", ["x"], ["h"])], [("h", np.float32, [2, 3])],
                       name="then")
    other = make_branch([helper.make_node("Neg", ["x"], ["e"])], [("e", np.float32, [2, 3])],
                        name="else")
    nodes = [helper.make_node("Relu", ["x"], ["h@branch"]),
             helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other),
             helper.make_node("Add", ["b", "h@branch"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [2, 3]), ("c", TensorProto.BOOL, [])],
                       [("y", np.float32, [2, 3])])
    feed = {"x": RNG.normal(size=(2, 3)).astype(np.float32), "c": np.array(True)}
    result = compare_layerwise(model, model, [feed])
    assert result.reason == "" and result.first_divergence is None
    assert {t["tensor"] for t in result.tensors} == {"h@branch", "e", "h", "b", "y"}
