"""Tests of the rollback in optimizer/api.py's ``optimize``: when the result fails validation,
lossless passes are left out -- one at a time, then sets of them -- until it validates."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import onnxopt.api
from helpers import assert_same_outputs, make_model, run_ort
from onnxopt import optimize
from onnxopt.pass_manager import REGISTRY, Pass, PassResult


def _model():
    """y = Relu(Identity(x) @ W) + b: removing the Identity is harmless, the Relu is not."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("MatMul", ["xi", "W"], ["m"]),
             helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Add", ["r", "b"], ["y"])]
    return make_model(nodes, [("x", np.float32, [2, 4])], [("y", np.float32, [2, 3])],
                      {"W": rng.normal(size=(4, 3)).astype(np.float32),
                       "b": rng.normal(size=3).astype(np.float32)})


class _DropRelu(Pass):
    """Turns every Relu into an Identity (wrong for negative values): what two passes of a
    pipeline may both do, so that leaving out either one alone changes nothing."""
    name = "test_rollback_drop_relu"
    description = "test only"

    def run(self, graph, ctx):
        relus = [n for n in graph.nodes if n.op == "Relu"]
        for n in relus:
            n.op = "Identity"
        return PassResult(bool(relus))


class _DropReluToo(_DropRelu):
    name = "test_rollback_drop_relu_too"


@pytest.fixture
def two_culprits(monkeypatch):
    for cls in (_DropRelu, _DropReluToo):
        monkeypatch.setitem(REGISTRY, cls.name, cls)
    runs = []
    real = onnxopt.api._run_pipeline

    def counted(*args, **kwargs):
        runs.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxopt.api, "_run_pipeline", counted)
    return runs


@pytest.mark.parametrize("passes", [
    ["remove_identity", _DropRelu.name, _DropReluToo.name],
    # remove_identity, last, changes the model in every attempt: left out with the set as it
    # grows, then put back
    [_DropRelu.name, _DropReluToo.name, "remove_identity"]])
def test_a_culprit_shared_by_two_passes_is_found_and_both_are_named(two_culprits, passes):
    feed = {"x": np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)}
    broken = _model()
    broken.graph.node[2].op_type = "Identity"
    assert not np.allclose(run_ort(_model(), feed)["y"], run_ort(broken, feed)["y"])
    model, report = optimize(_model(), passes=passes, inputs=feed)
    assert report.validation.passed
    assert sorted(r["pass"] for r in report.rolled_back) == sorted([_DropRelu.name,
                                                                  _DropReluToo.name])
    assert all("'y'" in r["reason"] for r in report.rolled_back)
    # the harmless rewrite stays: the Identity is gone, the Relu is back
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Relu", "Add"]
    assert_same_outputs(_model(), model)
    # the first run, then at most k + 2L (k = 2 passes changed the model in the first run)
    assert len(two_culprits) <= 1 + 2 + 2 * len(passes)

