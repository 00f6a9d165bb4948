"""Tests of optimizer/pass_manager.py: fixed-point iteration and its bound, records, the lossy
passes' clean-up rounds, verify_each, and the registry. Test-only passes are given to PassManager
as instances; nothing is added to the global REGISTRY."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from helpers import make_model
from onnxopt.errors import PassError, UsageError
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import (REGISTRY, Pass, PassContext, PassManager, PassResult,
                                    get_pass, verify_model)


def _model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
             helper.make_node("Abs", ["b"], ["y"])]
    return make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])])


class AlwaysModified(Pass):
    name = "test_always_modified"
    description = "claims a change every time"

    def run(self, graph, ctx):
        return PassResult(True, {"calls": 1})


class ModifiesNTimes(Pass):
    """Claims a change on its first ``n`` runs."""

    name = "test_n_times"
    description = "changes n times"

    def __init__(self, n):
        self.left = n

    def run(self, graph, ctx):
        self.left -= 1
        return PassResult(self.left >= 0)


class Never(Pass):
    name = "test_never"
    description = "never changes anything"

    def run(self, graph, ctx):
        return PassResult(False)


class Corrupt(Pass):
    """Makes a node read a tensor nothing produces (an invalid graph)."""

    name = "test_corrupt"
    description = "breaks the graph"
    lossless = False

    def run(self, graph, ctx):
        graph.nodes[1].inputs[0] = gs.Variable("nowhere", dtype=np.float32, shape=[3])
        return PassResult(True)


class RemoveOneNode(Pass):
    """Bypasses the Neg node once (a lossy pass, for the clean-up round)."""

    name = "test_remove_neg"
    description = "drops Neg"
    lossless = False

    def run(self, graph, ctx):
        neg = [n for n in graph.nodes if n.op == "Neg"]
        if not neg:
            return PassResult(False)
        neg[0].op = "Identity"
        return PassResult(True)


def _run(manager, model=None):
    model = model or _model()
    graph = import_graph(model)
    return manager.run(graph, PassContext(template=model)), graph


def test_pass_that_always_claims_a_change_stops_at_max_iterations():
    records, _ = _run(PassManager([AlwaysModified()], max_iterations=4))
    assert [r.iteration for r in records] == [0, 1, 2, 3]
    assert all(r.name == "test_always_modified" and r.modified for r in records)
    assert records[0].stats == {"calls": 1}
    assert all(r.seconds >= 0 for r in records)


def test_fixed_point_stops_after_the_first_round_without_change():
    records, _ = _run(PassManager([ModifiesNTimes(2), Never()], max_iterations=10))
    assert [(r.name, r.iteration, r.modified) for r in records] == [
        ("test_n_times", 0, True), ("test_never", 0, False),
        ("test_n_times", 1, True), ("test_never", 1, False),
        ("test_n_times", 2, False), ("test_never", 2, False)]


def test_records_are_passed_to_on_pass_and_serializable():
    seen = []
    manager = PassManager([ModifiesNTimes(1)], on_pass=seen.append)
    records, _ = _run(manager)
    assert seen == records == manager.records
    assert set(records[0].to_dict()) == {"name", "iteration", "modified", "stats", "seconds"}


def test_once_passes_run_once_then_a_clean_up_round():
    remove = get_pass("remove_identity")
    records, graph = _run(PassManager([remove], [RemoveOneNode()]))
    names = [(r.name, r.iteration, r.modified) for r in records]
    assert names == [("remove_identity", 0, False), ("test_remove_neg", 1, True),
                     ("remove_identity", 2, True), ("remove_identity", 3, False)]
    assert [n.op for n in graph.nodes] == ["Relu", "Abs"]


def test_verify_each_raises_pass_error_naming_the_pass():
    with pytest.raises(PassError, match="test_corrupt"):
        _run(PassManager([], [Corrupt()], verify_each=True))


def test_without_verify_each_the_corruption_is_not_checked():
    records, _ = _run(PassManager([], [Corrupt()], verify_each=False))
    assert records[-1].name == "test_corrupt"


def test_verify_each_accepts_valid_passes():
    model = _model()
    records, graph = _run(PassManager([get_pass(n) for n in ("remove_identity", "cse")],
                                      [RemoveOneNode()], verify_each=True), model)
    verify_model(export_graph(graph, model), "end")


def test_verify_model_reports_onnxruntime_rejection():
    # valid for the checker but not loadable: an op onnxruntime does not implement in that domain
    model = _model()
    model.graph.node[1].domain = "com.example"
    model.opset_import.add(domain="com.example", version=1)
    with pytest.raises(PassError, match="after pass 'p'"):
        verify_model(model, "p")


def test_unknown_pass_name_is_a_usage_error():
    with pytest.raises(UsageError, match="no_such_pass"):
        get_pass("no_such_pass")


def test_registry_holds_the_lossless_pipeline():
    from onnxopt.passes import LOSSLESS_PIPELINE

    for name in LOSSLESS_PIPELINE:
        p = get_pass(name)
        assert p.name == name and p.lossless and p.description
    assert not any(name.startswith("test_") for name in REGISTRY)


class _Scale(Pass):
    """Proposes the weight ``W`` times ``factor``, recording the value it saw."""

    lossless = False
    description = "test only"
    seen: list = []

    def __init__(self, name, factor, weights="fused", requires=frozenset()):
        self.name, self.factor, self.weights, self.requires = name, factor, weights, requires

    def run(self, graph, ctx):
        from onnxopt.budget import Proposal

        w = next(t for t in graph.tensors().values() if t.name == "W")
        _Scale.seen.append((self.name, float(np.asarray(w.values).ravel()[0])))
        value = np.asarray(w.values) * self.factor

        def apply():
            w.values = value
        return PassResult(False, proposals=[Proposal(w, value, apply)])


def _weighted():
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("MatMul", ["xi", "W"], ["y"])]
    return make_model(nodes, [("x", np.float32, [1, 2])], [("y", np.float32, [1, 2])],
                      {"W": np.ones((2, 2), np.float32)})


def test_lossy_stages_run_in_order_each_seeing_what_the_previous_kept():
    """prune -> reconstruct -> quantize: an "original"-weights pass before the lossless rounds,
    then the "fused"-weights passes in the order given, each on the result of the previous."""
    _Scale.seen = []
    model = _weighted()
    graph = import_graph(model)
    records = PassManager([get_pass("remove_identity")],
                          [_Scale("second", 3.0), _Scale("first", 2.0, "original"),
                           _Scale("third", 5.0)]).run(graph, PassContext(template=model))
    assert _Scale.seen == [("first", 1.0), ("second", 2.0), ("third", 6.0)]
    names = [r.name for r in records]
    assert names.index("first") < names.index("remove_identity") < names.index("second")
    assert all(r.stats["accepted"] == 1 for r in records if r.name in ("first", "second",
                                                                       "third"))


def test_a_pass_that_needs_calibration_data_without_any_is_a_usage_error():
    model = _weighted()
    with pytest.raises(UsageError, match="needs calibration data"):
        PassManager([], [_Scale("calibrated", 2.0, requires=frozenset({"calibration"}))]).run(
            import_graph(model), PassContext(template=model))


class _Perturb(Pass):
    """Proposes ``tensor`` plus ``delta`` (a lossy change of known harm)."""

    lossless = False
    description = "test only"

    def __init__(self, name, tensor, delta, joins_next=False):
        self.name, self.tensor, self.delta, self.joins_next = name, tensor, delta, joins_next

    def run(self, graph, ctx):
        from onnxopt.budget import Proposal

        w = next(t for t in graph.tensors().values() if t.name == self.tensor)
        value = np.asarray(w.values) + np.float32(self.delta)

        def apply():
            w.values = value
        return PassResult(False, proposals=[Proposal(w, value, apply)])


def _two_weights():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("MatMul", ["h", "B"], ["y"])]
    return make_model(nodes, [("x", np.float32, [4, 2])], [("y", np.float32, [4, 2])],
                      {"A": np.eye(2, dtype=np.float32), "B": np.eye(2, dtype=np.float32)})


@pytest.mark.parametrize("joined", [False, True])
def test_joined_passes_share_one_decision(joined):
    """A pass with ``joins_next`` is decided with the next: the budget then accepts the cheap
    proposal of the second pass instead of spending the drift on the first's costly one."""
    from onnxopt.budget import DriftBudget

    model = _two_weights()
    graph = import_graph(model)
    feeds = [{"x": np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)}]
    budget = DriftBudget(model, feeds, 0.99)
    # Alone, either change fits the target 0.991 (cosine 0.9922 and 0.9996); together they do
    # not (0.9891).
    first, second = _Perturb("first", "A", 0.22, joined), _Perturb("second", "B", 0.04)
    records = PassManager([], [first, second]).run(
        graph, PassContext(template=model, feeds=feeds, budget=budget))
    accepted = {r.name: r.stats["accepted"] for r in records}
    assert accepted == ({"first": 0, "second": 1} if joined else {"first": 1, "second": 0})
