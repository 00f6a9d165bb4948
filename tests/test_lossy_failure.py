"""A lossy run that fails validation even after the drift budget's second decision
(optimizer/api.py ``optimize``): it ends failed, naming its lossy passes and their drift, without
rolling back lossless passes by trial -- unless the lossless passes alone fail too."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, run_ort
from onnxopt import optimize
from onnxopt.cli import main
from onnxopt.errors import ValidationFailed
from onnxopt.pass_manager import REGISTRY, Pass, PassResult
from test_rollback import _DropRelu, two_culprits  # noqa: F401 (a fixture)


def _model():
    """y = Relu(Identity(x) @ A) @ B."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("MatMul", ["xi", "A"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "B"], ["y"])]
    return make_model(nodes, [("x", np.float32, ["batch", 8])], [("y", np.float32, ["batch", 4])],
                      {"A": rng.normal(size=(8, 8)).astype(np.float32),
                       "B": rng.normal(size=(8, 4)).astype(np.float32)})


FEEDS = [{"x": np.random.default_rng(s).normal(size=(n, 8)).astype(np.float32)}
         for s, n in ((1, 3), (2, 5))]


class _Hidden(Pass):
    """Proposes adding noise of scale 0.001 to both weights and applies noise of scale 0.8: a
    lossy pass whose estimate (a quantizer's simulation that cannot see kernel saturation) is
    kinder than what it does, however much the budget keeps in reserve."""

    name = "test_hidden_drift"
    description = "test only"
    lossless = False

    def run(self, graph, ctx):
        from onnxopt.budget import Proposal

        out = []
        for name in ("A", "B"):
            w = graph.tensors()[name]
            noise = np.random.default_rng(len(name)).normal(size=w.shape).astype(np.float32)

            def apply(w=w, noise=noise):
                w.values = np.asarray(w.values) + 0.8 * noise
            out.append(Proposal(w, np.asarray(w.values) + 0.001 * noise, apply))
        return PassResult(False, proposals=out)


class _Small(Pass):
    """A lossy pass changing A a little without asking the budget (which, deciding on a graph a
    broken lossless pass already put beyond the criteria, would accept nothing)."""

    name = "test_small_drift"
    description = "test only"
    lossless = False

    def run(self, graph, ctx):
        w = graph.tensors()["A"]
        w.values = np.asarray(w.values) * np.float32(1.001)
        return PassResult(True)


@pytest.fixture
def runs(two_culprits, monkeypatch):
    """Every pipeline ``optimize`` runs (see ``_ran``), with the stand-in passes registered."""
    for cls in (_Hidden, _Small):
        monkeypatch.setitem(REGISTRY, cls.name, cls)
    return two_culprits


def _ran(runs) -> list[list[str]]:
    """The pass names of each pipeline run."""
    return [[p.name for p in pipeline.passes] for pipeline in runs]


def _cosine(model, feed) -> float:
    r = run_ort(_model(), feed)["y"].ravel().astype(np.float64)
    c = run_ort(model, feed)["y"].ravel().astype(np.float64)
    return float(r @ c / np.linalg.norm(r) / np.linalg.norm(c))


def test_a_lossy_failure_names_the_lossy_pass_and_its_drift_and_rolls_nothing_back(runs,
                                                                                     tmp_path):
    out = tmp_path / "out.onnx"
    model, report = optimize(_model(), passes=["remove_identity", _Hidden.name], inputs=FEEDS,
                             max_drift=0.99, output=out, raise_on_failure=False)
    v = report.validation
    assert not v.passed and v.mode == "lossy" and report.rolled_back == []
    assert v.reason.startswith(f"lossy pass {_Hidden.name}: drift beyond the criteria even after "
                               "the drift budget's second decision (the lossless passes alone "
                               "validate): output 'y': cosine similarity ")
    # the drift named is the returned model's (the second decision's), measured anew here
    assert f"{min(_cosine(model, f) for f in FEEDS):.6f}" in v.reason
    assert any(f"{_Hidden.name} cannot be kept within the criteria" in w
               for w in report.warnings)
    # the first run, the second decision, the lossless passes alone: no trial rollback
    assert _ran(runs) == [["remove_identity", _Hidden.name]] * 2 + [["remove_identity"]]
    assert not out.exists()
    with pytest.raises(ValidationFailed, match=f"lossy pass {_Hidden.name}: drift"):
        optimize(_model(), passes=["remove_identity", _Hidden.name], inputs=FEEDS,
                 max_drift=0.99, output=out)
    assert not out.exists()
    optimize(_model(), passes=["remove_identity", _Hidden.name], inputs=FEEDS, max_drift=0.99,
             output=out, raise_on_failure=False, keep_invalid=True)
    assert out.exists()


def test_the_cli_exits_1_with_the_lossy_verdict(runs, tmp_path, capsys):
    path, feeds, out, rep = (tmp_path / "m.onnx", tmp_path / "feeds", tmp_path / "out.onnx",
                             tmp_path / "r.json")
    path.write_bytes(_model().SerializeToString())
    feeds.mkdir()
    for k, feed in enumerate(FEEDS):
        np.savez(feeds / f"{k}.npz", **feed)
    assert main(["optimize", str(path), "-o", str(out), "--inputs", str(feeds),
                 "--passes", f"remove_identity,{_Hidden.name}", "--report", str(rep)]) == 1
    assert f"validation FAILED: lossy pass {_Hidden.name}: drift" in capsys.readouterr().out
    assert not out.exists()
    data = json.loads(rep.read_text())
    assert data["rolled_back"] == [] and data["validation"]["passed"] is False


def test_a_broken_lossless_pass_in_a_lossy_run_is_found_without_the_lossy_passes(runs):
    model, report = optimize(_model(), passes=[_DropRelu.name, _Small.name], inputs=FEEDS,
                             max_drift=0.99)
    assert report.validation.passed and report.validation.mode == "lossy"
    (entry,) = report.rolled_back
    # named with its own failure: judged losslessly, on the run without the lossy pass
    assert entry["pass"] == _DropRelu.name and "> tolerance" in entry["reason"]
    assert entry["first_divergence"]["tensor"] == "r"
    assert "Relu" in [n.op_type for n in model.graph.node]
    assert min(_cosine(model, f) for f in FEEDS) >= 0.99
    # first run, second decision, lossless passes alone, without the culprit, the repaired run
    assert _ran(runs) == [[_DropRelu.name, _Small.name]] * 2 + [[_DropRelu.name], [],
                                                           [_Small.name]]


def test_without_lossless_changes_the_lossless_passes_are_not_run_alone(runs):
    _, report = optimize(_model(), passes=[_Hidden.name], inputs=FEEDS, max_drift=0.99,
                         raise_on_failure=False)
    assert "(no lossless pass changed the model)" in report.validation.reason
    assert _ran(runs) == [[_Hidden.name]] * 2
