"""Tests of optimizer/opset.py and of the API's opset upgrade for passes that declare
``upgrade_opset``: the converted model computes what the original does (checked on onnxruntime
against the original), the report records the upgrade, and a conversion that fails refuses the
pass with the reason instead of crashing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, random_feed
from onnxopt import optimize
from onnxopt.opset import OpsetUpgradeError, default_opset, upgrade
from onnxopt.pass_manager import Pass, PassResult
from onnxopt.validate import compare_models

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"


def _opset11():
    """Clip with min/max inputs (opset 11 form), Softmax over axis 1 (its meaning changed at
    13), ReduceSum with an axes attribute (an input from 13): every one needs an adapter."""
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
             helper.make_node("Softmax", ["c"], ["s"], axis=1),
             helper.make_node("ReduceSum", ["s"], ["y"], axes=[2], keepdims=0)]
    return make_model(nodes, [("x", np.float32, [2, 3, 4])], [("y", np.float32, [2, 3])],
                      {"lo": np.array(-1, np.float32), "hi": np.array(1, np.float32)}, opset=11)


def test_upgrade_keeps_outputs_and_leaves_the_model_alone():
    model = _opset11()
    before = model.SerializeToString()
    converted = upgrade(model, 13)
    assert default_opset(converted) == 13 and model.SerializeToString() == before
    feeds = [random_feed(model, seed) for seed in range(2)]
    assert compare_models(model, converted, feeds).passed
    assert {n.op_type for n in converted.graph.node} >= {"Clip", "Softmax", "ReduceSum"}


def test_a_conversion_that_fails_is_one_line_error_naming_the_opsets():
    with pytest.raises(OpsetUpgradeError, match=r"cannot convert opset 11 to 99: ") as err:
        upgrade(_opset11(), 99)
    assert "\n" not in str(err.value)


class _Needs13(Pass):
    """Counts the graph's nodes; applies from opset 13 and asks for an upgrade to it."""

    name = "test_needs_13"
    description = "test only"
    min_opset = 13
    upgrade_opset = 13

    def run(self, graph, ctx):
        return PassResult(False, {"nodes": len(graph.nodes)})


class _Needs99(_Needs13):
    name = "test_needs_99"
    min_opset = 99
    upgrade_opset = 99


def test_optimize_upgrades_the_model_for_a_pass_and_validates_against_the_original():
    model = _opset11()
    feed = random_feed(model)
    optimized, report = optimize(model, passes=[_Needs13()], inputs=feed)
    assert report.opset_upgrade == {"from": 11, "to": 13}
    assert default_opset(optimized) == 13 and default_opset(model) == 11
    record = next(r for r in report.passes if r.name == "test_needs_13")
    assert "refused" not in record.stats and record.stats["nodes"] >= 3  # + Constant axes
    assert report.validation.passed
    assert report.to_dict()["opset_upgrade"] == {"from": 11, "to": 13}


def test_a_failed_upgrade_refuses_the_pass_with_the_reason():
    model = _opset11()
    optimized, report = optimize(model, passes=[_Needs99()], inputs=random_feed(model))
    assert report.opset_upgrade is None and default_opset(optimized) == 11
    (refusal,) = next(r for r in report.passes if r.name == "test_needs_99").stats["refused"]
    assert refusal.startswith("opset 11 < 99; cannot convert opset 11 to 99")
    assert "opset_upgrade" not in report.to_dict()


def test_no_upgrade_when_every_pass_applies():
    model = _opset11()
    _, report = optimize(model, inputs=random_feed(model))
    assert report.opset_upgrade is None


@pytest.mark.zoo
def test_pp_ocr_rec_upgrades_from_12_to_13_with_the_same_outputs():
    path, inputs = ZOO / "ch_PP-OCRv4_rec_infer.onnx", ZOO / "ch_PP-OCRv4_rec_infer.inputs.npz"
    if not path.exists() or not inputs.exists():
        pytest.skip(f"{path} is absent")
    import onnx

    from onnxopt.inputs import load_feed

    model = onnx.load(path)
    assert default_opset(model) == 12
    converted = upgrade(model, 13)
    assert default_opset(converted) == 13
    result = compare_models(model, converted, [load_feed(inputs)])
    assert result.passed, result.reason
