"""Tests of optimizer/strength.py (the strength search) through the pass manager, with a test-only
lossy pass whose drift grows with its strength: the search picks the strongest rung meeting the
budget, moves the tolerant layers one rung up and keeps the harmful one at the chosen rung, and
records its path. Expected values come from onnxruntime runs of the changed model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, random_feed, session, with_initializers
from onnxopt.budget import DriftBudget, Proposal
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, import_graph
from onnxopt.metrics import output_metrics
from onnxopt.pass_manager import Pass, PassContext, PassManager, PassResult

RNG = np.random.default_rng(1)
WEIGHTS = {n: RNG.normal(size=(8, 8)).astype(np.float32) for n in ("A", "B", "C")}
NOISE = {n: RNG.normal(size=(8, 8)).astype(np.float32) for n in ("A", "B", "C")}


@dataclass(frozen=True)
class NoiseOptions:
    level: float | str | None = None


class Noise(Pass):
    """Proposes ``W + level * scale[W] * noise[W]`` for each weight: drift grows with level;
    ``C`` (scale 6) is the sensitive layer."""

    name = "test_noise"
    description = "test only"
    Options = NoiseOptions
    lossless = False
    weights = "original"
    strength = "level"
    ladder = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
    scale = {"A": 1.0, "B": 1.0, "C": 6.0}
    levels_seen: list = []

    def run(self, graph, ctx):
        level = self.options.level
        assert level != "auto"
        Noise.levels_seen.append(level)
        proposals = []
        for t in graph.tensors().values():
            if t.name in WEIGHTS:
                proposals.append(_propose(t, noisy(t.name, level)))
        return PassResult(False, {"level": level}, proposals=proposals)


def noisy(name, level):
    return WEIGHTS[name] + np.float32(level * Noise.scale[name]) * NOISE[name]


def _propose(t, value):
    def apply():
        t.values = value
    return Proposal(t, value, apply)


def _model():
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h1"]),
             helper.make_node("MatMul", ["h1", "B"], ["h2"]),
             helper.make_node("MatMul", ["h2", "C"], ["y"])]
    return make_model(nodes, [("x", np.float32, [16, 8])], [("y", np.float32, [16, 8])],
                      dict(WEIGHTS))


def _feeds(model):
    return [random_feed(model, seed) for seed in range(3)]


def _cosine(model, feeds, values):
    """Worst cosine over the feeds of ``model`` with initializers replaced by ``values``,
    run in onnxruntime."""
    ref, cand = session(model), session(with_initializers(model, values))
    return min(output_metrics(ref.run(None, f)[0], cand.run(None, f)[0])["cosine"]
               for f in feeds)


def _search(max_drift=0.99):
    model = _model()
    feeds = _feeds(model)
    graph = import_graph(model)
    budget = DriftBudget(model, feeds, max_drift)
    ctx = PassContext(template=model, feeds=feeds, budget=budget)
    records = PassManager([], [Noise(level="auto")]).run(graph, ctx)
    return model, feeds, graph, budget, records[-1]


def test_the_search_picks_the_strongest_rung_whose_all_applied_drift_meets_the_budget():
    Noise.levels_seen = []
    model, feeds, graph, budget, record = _search()
    target = budget.targets["cosine"]
    meets = [_cosine(model, feeds, {n: noisy(n, s) for n in WEIGHTS}) >= target
             for s in Noise.ladder]
    assert meets[0] and not meets[-1]  # the test needs a crossing inside the ladder
    expected = max(i for i, ok in enumerate(meets) if ok)
    search = record.stats["search"]
    assert search["chosen"] == Noise.ladder[expected]
    # bisection: at most ceil(log2(8)) = 3 settings scored, each scored once
    settings = [row["setting"] for row in search["path"]]
    assert len(settings) <= 3 and len(set(settings)) == len(settings)
    assert "auto" not in Noise.levels_seen
    for row in search["path"]:
        measured = _cosine(model, feeds, {n: noisy(n, row["setting"]) for n in WEIGHTS})
        assert row["within"] == (measured >= target)
        if row["within"]:
            assert row["cosine"] == pytest.approx(measured, abs=1e-5)
        else:  # scoring stops at the first feed that fails: the worst value so far
            assert measured - 1e-5 <= row["cosine"] < target
        assert row["size_bytes"] == 3 * 8 * 8 * 4 and row["compressed_bytes"] > 0


def test_tolerant_layers_move_up_and_the_sensitive_one_stays_at_the_chosen_rung():
    model, feeds, graph, budget, record = _search()
    search = record.stats["search"]
    chosen = Noise.ladder.index(search["chosen"])
    values = {t.name: np.asarray(t.values) for t in graph.tensors().values()
              if t.name in WEIGHTS}
    np.testing.assert_array_equal(values["C"], noisy("C", Noise.ladder[chosen]))
    assert "C" not in search["per_layer"]
    assert search["per_layer"], "nothing moved up: the test does not exercise the upgrade"
    for name, setting in search["per_layer"].items():
        assert Noise.ladder.index(setting) > chosen
        np.testing.assert_array_equal(values[name], noisy(name, setting))
    # the result, measured afresh, meets the budget
    assert _cosine(model, feeds, values) >= budget.targets["cosine"]
    assert record.stats["drift_budget"]["kept"] == []


def test_the_search_path_is_json_serializable_and_reports_latency():
    *_, record = _search()
    data = json.loads(json.dumps(record.to_dict()))
    search = data["stats"]["search"]
    assert search["option"] == "level" and search["monotone_assumed"] is True
    assert search["latency_ratio"] > 0 and "noisy" in search["latency_note"]


def test_when_no_rung_meets_the_budget_the_weakest_is_decided_per_tensor():
    model, feeds, graph, budget, record = _search(max_drift=0.99999999)
    search = record.stats["search"]
    assert search["chosen"] == Noise.ladder[0] and not search["met_budget"]
    assert any("no level" in w for w in record.warnings)


def test_auto_without_a_budget_is_a_usage_error_naming_max_drift():
    model = _model()
    with pytest.raises(UsageError, match="--max-drift"):
        PassManager([], [Noise(level="auto")]).run(import_graph(model),
                                                   PassContext(template=model))


def test_auto_is_accepted_only_for_the_strength_option():
    @dataclass(frozen=True)
    class Opts:
        level: float | None = None
        other: float | None = None

    class Strict(Pass):
        name, description, Options, lossless, strength = "t", "t", Opts, False, "level"

    assert Strict(level="auto").options.level == "auto"
    with pytest.raises(UsageError, match="option other must be float or None"):
        Strict(other="auto")


def test_the_fallback_keeps_a_harmful_tensor_at_its_weaker_value():
    """DriftBudget.decide with a fallback: the harmful stronger proposal stays at the fallback
    value (not the original), the harmless one replaces its fallback."""
    model = _model()
    feeds = _feeds(model)
    graph = import_graph(model)
    t = {x.name: x for x in graph.tensors().values() if x.name in WEIGHTS}
    budget = DriftBudget(model, feeds, 0.99)
    weak = [_propose(t[n], noisy(n, 0.01)) for n in ("A", "C")]
    strong = [_propose(t["A"], noisy("A", 0.02)), _propose(t["C"], -WEIGHTS["C"])]
    decision = budget.decide(graph, model, strong, fallback=weak)
    np.testing.assert_array_equal(t["A"].values, noisy("A", 0.02))
    np.testing.assert_array_equal(t["C"].values, noisy("C", 0.01))
    assert decision.kept_groups == ["C"]
    assert {(p.name, id(p)) for p in decision.accepted} == {("A", id(strong[0])),
                                                           ("C", id(weak[1]))}


def test_evaluate_scores_all_proposals_applied_and_leaves_the_graph_alone():
    model = _model()
    feeds = _feeds(model)
    graph = import_graph(model)
    t = {x.name: x for x in graph.tensors().values() if x.name in WEIGHTS}
    budget = DriftBudget(model, feeds, 0.99)
    scores, within = budget.evaluate(graph, model, [_propose(t["C"], -WEIGHTS["C"])])
    assert scores["cosine"] == pytest.approx(-1.0, abs=1e-5) and not within
    np.testing.assert_array_equal(t["C"].values, WEIGHTS["C"])
    assert export_graph(graph, model).graph.initializer[0].name in WEIGHTS


def test_statistics_of_mixed_settings_merge_per_tensor_entries_and_recount_totals():
    """A tensor taken at a stronger setting gets that setting's per-tensor entry; totals that
    were sums (zeros) or size-weighted means (sparsity) of the entries are recomputed."""
    from onnxopt.strength import _summary

    class Counting:
        def __init__(self, zeros):
            self.zeros = zeros

        def summarize(self, result, accepted):
            names = {p.name for p in accepted}
            entries = {n: {"size": 10, "zeros": self.zeros if n in names else 0, "zeros_before": 1,
                           "sparsity": (self.zeros if n in names else 0) / 10}
                       for n in ("A", "B")}
            zeros = sum(e["zeros"] for e in entries.values())
            return {"zeros": zeros, "zeros_before": 2, "pruned": zeros - 2,
                    "sparsity": sum(e["zeros"] for e in entries.values()) / 20,
                    "accepted": len(accepted), "per_tensor": entries}

    graph = import_graph(_model())
    t = {x.name: x for x in graph.tensors().values() if x.name in WEIGHTS}
    weak = PassResult(False, proposals=[_propose(t["A"], WEIGHTS["A"]),
                                        _propose(t["B"], WEIGHTS["B"])])
    strong = PassResult(False, proposals=[_propose(t["B"], WEIGHTS["B"])])
    accepted = [weak.proposals[0], strong.proposals[0]]
    stats = _summary(Counting(3), weak, accepted, [((Counting(5), strong), 0.5)])
    assert stats["per_tensor"]["A"]["zeros"] == 3 and stats["per_tensor"]["B"]["zeros"] == 5
    assert stats["per_tensor"]["B"]["setting"] == 0.5
    assert stats["zeros"] == 8 and stats["sparsity"] == pytest.approx(0.4)
    assert stats["zeros_before"] == 2 and stats["pruned"] == 6
    assert stats["accepted"] == 2


class ShapeChanging(Noise):
    """:class:`Noise` declaring that its proposals change shapes when applied."""

    name = "test_noise_shapes"
    per_layer_strengths = False


def test_a_pass_declaring_no_per_layer_strengths_stays_at_the_chosen_rung():
    model = _model()
    feeds = _feeds(model)
    graph = import_graph(model)
    ctx = PassContext(template=model, feeds=feeds, budget=DriftBudget(model, feeds, 0.99))
    record = PassManager([], [ShapeChanging(level="auto")]).run(graph, ctx)[-1]
    search = record.stats["search"]
    # the same search lets Noise's tolerant layers move up (the test above): here none moves
    assert search["per_layer"] == {} and search["upgrade_steps"] == []
    assert search["per_layer_note"].startswith("not offered")
    for t in graph.tensors().values():
        if t.name in WEIGHTS:
            np.testing.assert_array_equal(t.values, noisy(t.name, search["chosen"]))


def test_prune_channels_auto_gives_a_valid_model_of_one_setting():
    """Conv -> Relu -> Conv -> Relu -> Conv: the two layers' groups both cut W2 (input and output
    channels). Mixing their groups from two settings (per-layer strengths) wrote one setting's
    full-size W2 over the other's cut one: an invalid model. The search keeps one setting."""
    import onnxopt

    rng = np.random.default_rng(2)

    def w(*shape):
        return rng.normal(size=shape).astype(np.float32)

    w1, w2 = w(16, 3, 1, 1), w(16, 16, 1, 1)
    w2[rng.choice(16, 6, replace=False)] *= 1e-2
    w1[rng.choice(16, 3, replace=False)] *= 0.05
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["c1"]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W2"], ["c2"]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "W3", "b3"], ["y"])]
    model = make_model(nodes, [("x", np.float32, ["N", 3, 8, 8])], [("y", np.float32, ["N", 4, 8, 8])],
                       {"W1": w1, "b1": np.full(16, 0.1, np.float32), "W2": w2,
                        "W3": w(4, 16, 1, 1), "b3": w(4)})
    feeds = [{"x": w(2, 3, 8, 8)} for _ in range(3)]
    out, report = onnxopt.optimize(model, inputs=feeds, max_drift=0.999, prune_channels="auto",
                                   raise_on_failure=False)
    search = [p for p in report.passes if p.name == "prune_channels"][-1].stats["search"]
    assert search["per_layer"] == {} and "per_layer_note" in search
    assert report.verdict == "passed"
    dims = {i.name: list(i.dims) for i in out.graph.initializer}
    assert dims["W1"][0] == dims["W2"][1] and dims["W2"][0] == dims["W3"][1]
    assert dims["W1"][0] < 16  # something was pruned: the search did run
    session(out).run(None, feeds[0])
