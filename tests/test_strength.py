"""Tests of optimizer/strength.py (the strength search) through the pass manager, with a test-only
lossy pass whose drift grows with its strength: the search picks the strongest rung meeting the
budget, moves the tolerant layers one rung up and keeps the harmful one at the chosen rung, and
records its path. Expected values come from onnxruntime runs of the changed model."""

from __future__ import annotations

import importlib.util
import json
import time
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


def test_a_search_whose_timing_fails_says_so_and_still_decides(monkeypatch):
    """The result is timed in a child process (onnxruntime's default session can crash on a
    model validation runs); a timing that fails is a note, not the end of the run."""
    import sys

    # the module, not onnxopt.validate: the package exports a function of that name
    monkeypatch.setattr(sys.modules["onnxopt.validate"], "latency_ratio_apart",
                        lambda *a, **k: "onnxruntime crashed timing it (SIGSEGV)")
    *_, record = _search()
    search = record.stats["search"]
    assert "latency_ratio" not in search
    assert search["latency_note"] == "not timed: onnxruntime crashed timing it (SIGSEGV)"


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
    # round_to 1: 16 channels would otherwise go 8 at a time (more than 0.999 affords)
    out, report = onnxopt.optimize(model, inputs=feeds, max_drift=0.999, prune_channels="auto",
                                   options={"prune_channels": {"round_to": 1}},
                                   raise_on_failure=False)
    search = [p for p in report.passes if p.name == "prune_channels"][-1].stats["search"]
    assert search["per_layer"] == {} and "per_layer_note" in search
    assert report.verdict == "passed"
    dims = {i.name: list(i.dims) for i in out.graph.initializer}
    assert dims["W1"][0] == dims["W2"][1] and dims["W2"][0] == dims["W3"][1]
    assert dims["W1"][0] < 16  # something was pruned: the search did run
    session(out).run(None, feeds[0])


class _Verdicts:
    """A stand-in for the strength search's evaluations: ``width`` in flight, each scored in a
    thread after a delay that makes later submissions finish first; a setting is within budget
    up to ``last_within`` (index), and scoring ``failing`` raises an InputError."""

    def __init__(self, width: int, last_within: int, failing: int | None = None) -> None:
        import concurrent.futures as cf
        self.width, self.last_within, self.failing = width, last_within, failing
        self.pool = cf.ThreadPoolExecutor(8)
        self.submitted: list[int] = []
        self.cancelled: list[int] = []
        self.futures: dict = {}

    def submit(self, proposals):
        from onnxopt.errors import InputError

        (i,) = proposals
        self.submitted.append(i)

        def score():
            time.sleep(0.02 * (self.width - len(self.submitted) % self.width))
            if i == self.failing:
                raise InputError(f"setting {i}: onnxruntime cannot run it")
            return {"cosine": 1.0 - i / 100}, i <= self.last_within

        future = self.pool.submit(score)
        self.futures[future] = i
        return future

    def wait(self, futures):
        import concurrent.futures as cf
        cf.wait(futures, return_when=cf.FIRST_COMPLETED)

    def cancel(self, future):
        self.cancelled.append(self.futures[future])


def _bisect_with(width: int, ladder_size: int, last_within: int, failing: int | None = None):
    from onnxopt.strength import _bisect

    class Sizes:
        def of(self, proposals):
            return {"size_bytes": 0}

    runs: dict = {}

    def run_at(i):
        runs[i] = (None, PassResult(False, proposals=[i]))
        return runs[i]

    verdicts = _Verdicts(width, last_within, failing)
    ladder = tuple(range(ladder_size))
    return _bisect(ladder, run_at, runs, Sizes(), verdicts), verdicts, runs


@pytest.mark.parametrize("ladder_size", [1, 2, 7, 9])
def test_speculative_bisection_makes_the_decisions_of_the_sequential_one(ladder_size):
    """With several candidates in flight, finishing out of order, the bisection visits the
    points the one-at-a-time bisection visits, in its order, and ends on the same interval;
    points that fall out of the interval are cancelled, unread."""
    for last_within in range(-1, ladder_size):
        sequential, one, _ = _bisect_with(1, ladder_size, last_within)
        speculative, many, runs = _bisect_with(3, ladder_size, last_within)
        assert speculative == sequential
        (low, high, path) = sequential
        assert (low, high) == (last_within, last_within + 1)
        assert one.submitted == [row["setting"] for row in path] and one.cancelled == []
        assert set(many.submitted) >= set(one.submitted)
        assert all(not low < i < high for i in many.cancelled)
        assert all(low <= i <= high + 1 for i in runs)  # kept only what may still be needed
        if ladder_size > 2:
            assert len(many.submitted) > len(one.submitted)  # it did speculate


def test_an_error_of_a_point_the_bisection_never_visits_is_not_raised():
    from onnxopt.errors import InputError

    # 9 settings, all within: the bisection visits 4, 6, 7, 8; 1 and 2 are speculated on
    (low, high, path), verdicts, _ = _bisect_with(3, 9, 8, failing=1)
    assert (low, high) == (8, 9) and 1 in verdicts.submitted
    with pytest.raises(InputError, match="setting 4"):
        _bisect_with(3, 9, 8, failing=4)


def _wide_model():
    """Two MatMuls with a [256, 256] output: large enough that numpy's BLAS sums the cosine's dot
    product in several threads, so a thread count other than this process's shows in the last
    bits of the scores."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "B"], ["y"])]
    model = make_model(nodes, [("x", np.float32, ["N", 64])], [("y", np.float32, ["N", 256])],
                       {"A": rng.normal(size=(64, 64)).astype(np.float32),
                        "B": rng.normal(size=(64, 256)).astype(np.float32)})
    feeds = [{"x": rng.normal(size=(256, 64)).astype(np.float32)} for _ in range(3)]
    return model, feeds


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'onnxopt[ray]')")
def test_ray_candidate_evaluations_give_the_local_output_and_report(monkeypatch):
    """``prune_sparsity="auto"`` with the Ray executor (a local cluster started for the search,
    on loopback): candidates scored as Ray tasks, several in flight, give the local run's output
    byte for byte and its report (timings aside), the path's scores to the last bit."""
    import onnxopt
    from onnxopt import strength
    from onnxopt.batch import cpu_count, without_timings

    model, feeds = _wide_model()
    shipped = []
    submit = strength._OnRay.submit

    def counting(self, proposals):
        shipped.append(self.width)
        return submit(self, proposals)

    monkeypatch.setattr(strength._OnRay, "submit", counting)
    runs = {}
    for executor in ("local", "ray"):
        out, report = onnxopt.optimize(model, inputs=feeds, max_drift="cosine=0.99",
                                       prune_sparsity="auto", executor=executor)
        runs[executor] = (out.SerializeToString(), without_timings(report.to_dict()))
    assert runs["ray"][0] == runs["local"][0]
    assert runs["ray"][1] == runs["local"][1]
    search = [p for p in runs["ray"][1]["passes"] if p["name"] == "prune"][-1]["stats"]["search"]
    assert len(search["path"]) >= 3 and search["met_budget"]
    # speculative (more candidates than the path visits), several in flight on a multi-core
    # machine (the local cluster has this machine's CPUs)
    assert len(shipped) > len(search["path"]) and min(shipped) >= min(2, cpu_count())


def test_an_unknown_executor_is_a_usage_error_before_any_work():
    import onnxopt

    with pytest.raises(UsageError, match="unknown executor 'dask'"):
        onnxopt.optimize(_model(), executor="dask")
    with pytest.raises(UsageError, match="a Ray address is for the Ray executor"):
        onnxopt.optimize(_model(), ray_address="127.0.0.1:6379")
