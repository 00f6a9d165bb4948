"""Tests of optimizer/budget.py: lossy proposals are accepted as a set that keeps every output
within the budget measured against the original model, the most harmful stay out, and decisions
of successive lossy passes do not compound."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, random_feed
from onnxopt.budget import METRICS, Dequantized, DriftBudget, Proposal, get_metric
from onnxopt.graph import export_graph
from onnxopt.errors import UsageError
from onnxopt.graph import import_graph
from onnxopt.pass_manager import Pass, PassContext, PassManager, PassResult

RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(8, 8)).astype(np.float32)
W2 = RNG.normal(size=(8, 4)).astype(np.float32)


def _model():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"])]
    return make_model(nodes, [("x", np.float32, [16, 8])], [("y", np.float32, [16, 4])],
                      {"W1": W1, "W2": W2})


def _feeds(model, k=3):
    return [random_feed(model, seed) for seed in range(k)]


def _weights(graph):
    return {t.name: t for t in graph.tensors().values() if t.name in ("W1", "W2")}


def _propose(t, value):
    def apply():
        t.values = value
    return Proposal(t, value, apply)


def test_all_proposals_within_budget_are_accepted_in_one_evaluation():
    model = _model()
    graph = import_graph(model)
    w = _weights(graph)
    budget = DriftBudget(model, _feeds(model), 0.99)
    decision = budget.decide(graph, model, [_propose(w["W1"], W1 * 1.001),
                                            _propose(w["W2"], W2 * 0.999)])
    assert decision.evaluations == 1 and not decision.kept
    assert len(decision.accepted) == 2
    np.testing.assert_array_equal(w["W1"].values, W1 * 1.001)


def test_the_harmful_proposal_stays_out_and_is_reported_with_its_cost():
    model = _model()
    graph = import_graph(model)
    w = _weights(graph)
    harmful = -W2  # flips every output: cosine -1
    decision = DriftBudget(model, _feeds(model), 0.99).decide(
        graph, model, [_propose(w["W1"], W1 * 1.001), _propose(w["W2"], harmful)])
    assert [p.name for p in decision.kept] == ["W2"]
    assert [p.name for p in decision.accepted] == ["W1"]
    # why W2 stays out: applied with the accepted W1 it would flip the outputs
    assert list(decision.sensitivity) == ["W2"] and decision.sensitivity["W2"]["cosine"] < 0
    assert decision.score_final["cosine"] >= decision.target["cosine"] \
        > decision.score_all["cosine"]
    np.testing.assert_array_equal(w["W2"].values, W2)  # left as it was
    report = decision.report()
    assert report["kept"] == ["W2"] and report["sensitivity"]["W2"]["cosine"] < 0
    assert report["cosine_all"] < 0.99 <= report["cosine_final"]


def test_budget_is_measured_against_the_original_so_lossy_steps_do_not_compound():
    model = _model()
    feeds = _feeds(model)
    noise = np.random.default_rng(5).normal(size=W1.shape).astype(np.float32)
    # an earlier lossy step already spent most of the budget on W1
    graph = import_graph(model)
    w = _weights(graph)
    w["W1"].values = (W1 + 0.03 * noise * np.abs(W1).mean()).astype(np.float32)
    step = (W2 + 0.03 * np.random.default_rng(6).normal(size=W2.shape).astype(np.float32)
            * np.abs(W2).mean()).astype(np.float32)
    budget = DriftBudget(model, feeds, 0.999)
    # against the model as it is now, the second step alone would fit ...
    from onnxopt.graph import export_graph
    current = export_graph(import_graph(model), model)
    for init in current.graph.initializer:
        if init.name == "W1":
            init.CopyFrom(helper.make_tensor("W1", 1, W1.shape, w["W1"].values.ravel()))
    alone = DriftBudget(current, feeds, 0.999).decide(
        import_graph(current), current, [_propose(_weights(import_graph(current))["W2"], step)])
    assert not alone.kept
    # ... but against the original, the two together do not: the step stays out
    decision = budget.decide(graph, model, [_propose(w["W2"], step)])
    assert decision.score_all["cosine"] < budget.targets["cosine"]
    assert [p.name for p in decision.kept] == ["W2"]


def test_metrics_are_pluggable_and_unknown_ones_refused():
    assert get_metric("cosine") is METRICS["cosine"]
    assert get_metric("cosine").score(np.ones(3), np.ones(3)) == pytest.approx(1.0)
    with pytest.raises(UsageError, match="unknown drift metric 'l2'"):
        get_metric("l2")


def _run_pass(lossy_pass):
    """The pass manager's record of ``lossy_pass`` run alone on :func:`_model` with a budget
    of cosine 0.99, and the graph it left."""
    model = _model()
    graph = import_graph(model)
    ctx = PassContext(template=model, feeds=_feeds(model),
                      budget=DriftBudget(model, _feeds(model), 0.99))
    (record,) = PassManager([], [lossy_pass]).run(graph, ctx)[:1]
    return record, graph


class _Negate(Pass):
    """Proposes the negation of W2 and a tiny change of W1."""

    name = "test_negate"
    description = "test only"
    lossless = False

    def run(self, graph, ctx):
        w = _weights(graph)
        return PassResult(False, proposals=[_propose(w["W1"], W1 * 1.001),
                                            _propose(w["W2"], -W2)])


def test_the_pass_manager_hands_proposals_to_the_budget_and_reports_its_decision():
    record, graph = _run_pass(_Negate())
    assert record.modified
    assert record.stats["proposed"] == 2 and record.stats["accepted"] == 1
    assert record.stats["drift_budget"]["kept"] == ["W2"]
    assert any("left 1 tensor(s) or group(s) unchanged" in w for w in record.warnings)


def test_the_metric_judges_as_validation_does():
    m = get_metric("cosine")
    assert m.score(np.array(["a", "b"]), np.array(["a", "b"])) == 1.0
    assert m.score(np.array(["a", "b"]), np.array(["a", "c"])) == -1.0
    ragged = [np.ones(2, np.float32), np.ones(3, np.float32)]
    assert m.score(ragged, [v.copy() for v in ragged]) == pytest.approx(1.0)
    assert m.score(ragged, [np.ones(3, np.float32), np.ones(2, np.float32)]) == -1.0
    assert m.score(np.array([1.0, 2.0]), np.array([1.0, np.inf])) == -1.0
    assert m.score(np.ones(3, np.float32), np.ones(4, np.float32)) == -1.0


def test_a_proposal_that_makes_outputs_infinite_stays_out():
    """y = 1 / (x @ W): pruning every weight makes every output inf, which no cosine over the
    finite values shows; the budget must keep W."""
    from onnxopt import optimize

    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Reciprocal", ["h"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4, 8])], [("y", np.float32, [4, 4])],
                       {"W": W2})
    _, report = optimize(model, passes=[], prune_threshold=1e9, inputs=random_feed(model))
    assert report.validation.passed
    prune = next(r for r in report.passes if r.name == "prune")
    assert prune.stats["drift_budget"]["kept"] == ["W"] and not prune.modified
    assert any("left 1 tensor(s) or group(s) unchanged" in w for w in report.warnings)


# -- groups and simulated (activation) proposals ------------------------------------------------

def _tensor(graph, name):
    return graph.tensors()[name]


def _simulated(graph, name, op, group=None, readers=None, applied=None):
    """A simulated proposal on activation ``name``: ``op`` is "round" (a float16 round trip,
    harmless) or "negate" (harmful); ``apply`` records that it was called."""
    import onnx_graphsurgeon as gs

    from onnxopt.names import fresh_name

    def simulate(g, x):
        out = gs.Variable(fresh_name(g, f"{x.name}_sim_{op}"), dtype=x.dtype, shape=x.shape)
        if op == "negate":
            g.nodes.append(gs.Node("Neg", inputs=[x], outputs=[out]))
        else:
            half = gs.Variable(fresh_name(g, f"{x.name}_half"), dtype=np.float16, shape=x.shape)
            g.nodes.append(gs.Node("Cast", inputs=[x], outputs=[half], attrs={"to": 10}))
            g.nodes.append(gs.Node("Cast", inputs=[half], outputs=[out], attrs={"to": 1}))
        return out

    def apply():
        applied.append(name)

    return Proposal(_tensor(graph, name), None, apply, group=group, simulate=simulate,
                    readers=readers)


def _snapshot(graph, model):
    return export_graph(graph, model).SerializeToString(), {
        n: [id(c) for c in t.outputs] for n, t in graph.tensors().items()}


def test_a_weight_and_a_simulated_activation_of_one_group_are_decided_together():
    model = _model()
    graph = import_graph(model)
    w = _weights(graph)
    applied = []
    # group "n2": W2 negated (harmful) with the harmless float16 round trip of h: both stay out
    proposals = [_propose(w["W1"], W1 * 1.001),
                 _simulated(graph, "h", "round", group="n2", applied=applied),
                 Proposal(w["W2"], -W2, lambda: applied.append("W2"), group="n2")]
    decision = DriftBudget(model, _feeds(model), 0.99).decide(graph, model, proposals)
    assert decision.kept_groups == ["n2"] and applied == []
    assert [p.name for p in decision.kept] == ["h", "W2"]
    assert decision.report()["kept"] == ["n2"]
    assert set(decision.report()["sensitivity"]["n2"]) == {"cosine"}
    np.testing.assert_array_equal(w["W1"].values, W1 * 1.001)
    # the same group without the harmful weight is accepted, both proposals applied in order
    graph = import_graph(model)
    w = _weights(graph)
    applied = []
    proposals = [_simulated(graph, "h", "round", group="n2", applied=applied),
                 Proposal(w["W2"], W2 * 1.001, lambda: applied.append("W2"), group="n2")]
    decision = DriftBudget(model, _feeds(model), 0.99).decide(graph, model, proposals)
    assert not decision.kept and applied == ["h", "W2"] and decision.evaluations == 1


def test_a_harmful_simulated_proposal_stays_float_and_the_graph_is_restored_exactly():
    model = _model()
    graph = import_graph(model)
    before = _snapshot(graph, model)
    applied = []
    proposals = [_simulated(graph, "h", "negate", applied=applied)]
    budget = DriftBudget(model, _feeds(model), "cosine=0.99,max-abs=1e3")
    decision = budget.decide(graph, model, proposals)
    assert decision.kept_groups == ["h"] and applied == []
    assert decision.sensitivity["h"]["cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert set(decision.report()["target"]) == {"cosine", "max-abs"}
    assert _snapshot(graph, model) == before
    assert not [i for i in graph.inputs if "gate" in i.name]


def _if_model():
    """``y = If(c, then: (x @ W1) @ W2, else: x @ W2[:8])``: ``h`` lives in the then-branch."""
    from helpers import make_branch

    then = make_branch([helper.make_node("MatMul", ["x", "W1"], ["h"]),
                        helper.make_node("MatMul", ["h", "W2"], ["y_then"])],
                       [("y_then", np.float32, [16, 4])], name="then")
    other = make_branch([helper.make_node("MatMul", ["x", "W2"], ["y_else"])],
                        [("y_else", np.float32, [16, 4])], name="else")
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    return make_model(nodes, [("c", np.bool_, []), ("x", np.float32, [16, 8])],
                      [("y", np.float32, [16, 4])], {"W1": W1, "W2": W2})


@pytest.mark.parametrize("op, kept", [("negate", ["h"]), ("round", [])])
def test_a_simulated_activation_in_a_subgraph_is_measured_there(op, kept):
    """The budget simulates an activation of an If branch (``scope``) in that branch: a harmful
    one stays float, a harmless one is accepted; the graph and its subgraph are restored exactly
    and every name stays unique in the whole model."""
    model = _if_model()
    feeds = [{"c": np.array(True), "x": RNG.normal(size=(16, 8)).astype(np.float32)}
             for _ in range(2)]
    graph = import_graph(model)
    branch = graph.nodes[0].attrs["then_branch"]
    before = _snapshot(graph, model), export_graph(graph, model).SerializeToString()
    applied = []
    proposal = _simulated(branch, "h", op, applied=applied)
    proposal.scope = branch
    decision = DriftBudget(model, feeds, 0.99).decide(graph, model, [proposal])
    assert decision.kept_groups == kept and applied == ([] if kept else ["h"])
    if kept:
        assert decision.sensitivity["h"]["cosine"] == pytest.approx(-1.0, abs=1e-5)
    assert (_snapshot(graph, model), export_graph(graph, model).SerializeToString()) == before
    assert "_onnxopt_names" not in vars(branch)


def test_the_simulation_reaches_only_the_given_readers():
    """``y = h @ W2`` and ``z = h + 0``: negating h for the Add only leaves y intact."""
    import onnx_graphsurgeon as gs

    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"]),
             helper.make_node("Relu", ["h"], ["z"])]
    model = make_model(nodes, [("x", np.float32, [16, 8])],
                       [("y", np.float32, [16, 4]), ("z", np.float32, [16, 8])],
                       {"W1": W1, "W2": W2})
    feeds = _feeds(model)
    graph = import_graph(model)
    before = _snapshot(graph, model)
    relu = next(n for n in graph.nodes if n.op == "Relu")
    matmul = next(n for n in graph.nodes if n.op == "MatMul" and n.inputs[0].name == "h")
    applied = []
    only_relu = _simulated(graph, "h", "negate", readers=[(relu, 0)], applied=applied)
    only_matmul = _simulated(graph, "h", "negate", readers=[(matmul, 0)], applied=applied,
                             group="mm")
    # the max-abs criterion alone: z = relu(-h) differs from relu(h) wherever h != 0
    decision = DriftBudget(model, feeds, {"max-abs": 1e-6}).decide(
        graph, model, [only_relu, only_matmul])
    assert decision.kept_groups and _snapshot(graph, model) == before
    assert isinstance(graph, gs.Graph)
    cost = decision.sensitivity
    assert set(cost) == {"h", "mm"}
    assert all(c["max-abs"] > 1e-3 for c in cost.values())


def test_criteria_are_each_checked_and_targets_follow_the_metric_direction():
    model = _model()
    budget = DriftBudget(model, _feeds(model), "cosine=0.99,max-abs=0.5,snr=20,argmax=0.9")
    assert budget.targets["cosine"] == pytest.approx(0.991)
    assert budget.targets["max-abs"] == pytest.approx(0.45)
    assert budget.targets["snr"] == pytest.approx(20 - 10 * np.log10(0.9))
    assert budget.targets["argmax"] == pytest.approx(0.91)
    graph = import_graph(model)
    w = _weights(graph)
    # a 1 % scale keeps cosine at 1 but moves outputs by more than 0.45: max-abs refuses it
    big = W2 * 1.2
    decision = budget.decide(graph, model, [_propose(w["W2"], big)])
    assert decision.kept_groups == ["W2"]
    assert decision.score_all["cosine"] > 0.999 and decision.score_all["max-abs"] > 0.45


def _blocked(w: np.ndarray, block: int, divisor: np.ndarray):
    """``w * divisor`` (rows) as uint8 codes in blocks of ``block`` rows, and the float value
    the proposal stands for: ``DequantizeLinear(codes) / divisor``."""
    scaled = w * divisor[:, None]
    blocks = scaled.reshape(-1, block, w.shape[1])
    lo, hi = blocks.min(axis=1), blocks.max(axis=1)
    scale = ((hi - lo) / 15).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    codes = np.clip(np.rint(blocks / scale[:, None]) + zp[:, None], 0, 15).astype(np.uint8)
    codes = codes.reshape(w.shape)
    value = ((codes.astype(np.float32) - np.repeat(zp, block, 0)) * np.repeat(scale, block, 0)
             / divisor[:, None].astype(np.float32))
    return Dequantized(codes, scale, zp, axis=0, block_size=block, row_divisor=divisor), value


def test_quantized_proposals_are_fed_as_codes_and_score_as_their_float_values(monkeypatch):
    """An evaluation feeds a quantized weight's codes to DequantizeLinear inside If (not a float
    copy of every weight): the scores equal feeding the float values, for every mix."""
    from onnxopt import budget as budget_module

    model = _model()
    model.opset_import[0].version = 21
    divisor = np.linspace(0.5, 2.0, 8).astype(np.float32)
    form1, value1 = _blocked(W1, 4, divisor)
    scale2 = (np.abs(W2).max(axis=0) / 127).astype(np.float32)
    codes2 = np.rint(W2 / scale2).astype(np.int8)
    form2, value2 = Dequantized(codes2, scale2, axis=1), codes2.astype(np.float32) * scale2
    harmful = Dequantized(-codes2, scale2, axis=1)  # flips every output
    fed = []
    real = budget_module._dequantized_inputs
    monkeypatch.setattr(budget_module, "_dequantized_inputs",
                        lambda m, forms: fed.append(sorted(forms)) or real(m, forms))
    budget = DriftBudget(model, _feeds(model), 0.99)
    for forms in ((form1, form2), (form1, harmful)):
        scores = []
        for compact in (True, False):
            graph = import_graph(model)
            w = _weights(graph)
            values = (value1, value2 if forms[1] is form2 else -value2)
            proposals = [_propose(w[n], v) for n, v in zip(("W1", "W2"), values)]
            for p, form in zip(proposals, forms):
                p.dequantized = form if compact else None
            score, _, groups, _ = budget._scorer(graph, model, proposals)
            scores.append([score(set(applied)) for applied in
                           ([], groups[:1], groups[1:], groups)])
        for a, b in zip(*scores):
            assert a == pytest.approx(b, abs=1e-6)
        assert scores[0][3]["cosine"] < 0 if forms[1] is harmful else scores[0][3]["cosine"] > 0.95
    assert fed[0] == ["W1", "W2"] and fed[1] == []  # the form path ran, then the float path


def test_forms_the_opset_cannot_express_are_fed_as_floats(monkeypatch):
    """Blocked DequantizeLinear needs opset 21: below, the budget feeds the float values."""
    from onnxopt import budget as budget_module

    model = _model()  # the helpers' opset, below 21
    form1, value1 = _blocked(W1, 4, np.ones(8, np.float32))
    graph = import_graph(model)
    proposal = _propose(_weights(graph)["W1"], value1)
    proposal.dequantized = form1
    fed = []
    real = budget_module._dequantized_inputs
    monkeypatch.setattr(budget_module, "_dequantized_inputs",
                        lambda m, forms: fed.append(sorted(forms)) or real(m, forms))
    decision = DriftBudget(model, _feeds(model), 0.99).decide(graph, model, [proposal])
    assert fed == [[]] and decision.evaluations >= 1


def test_a_drift_mask_leaves_padding_positions_out_of_the_budget():
    """Rows of ``y`` [16, 4] where the mask is 0 are padding: a proposal that only harms them
    (the kept rows' inputs are 0, so both models give 0 there) is within the budget with the
    mask and outside it without."""
    model = _model()
    feed = random_feed(model, 0)
    mask = (np.arange(16) % 2).astype(np.int64)
    feed["x"][mask == 1] = 0.0
    feed["attention_mask"] = mask  # not a model input: the budget reads it from the feed
    graph = import_graph(model)
    flipped = [_propose(_weights(graph)["W2"], -W2)]
    masked = DriftBudget(model, [feed], 0.99, mask="attention_mask")
    scores, within = masked.evaluate(graph, model, flipped)
    assert within and scores["cosine"] == pytest.approx(1.0)
    assert masked.tightened(0.5).mask == "attention_mask"
    scores, within = DriftBudget(model, [feed], 0.99).evaluate(graph, model, flipped)
    assert not within and scores["cosine"] < -0.99


class _KernelMismatch(Pass):
    """Proposes two groups: ``sim`` simulates a harmless float16 round trip of ``h`` but applies
    a negation of it (like an integer kernel that rounds where the simulation does not, only
    much worse), and ``w1`` a tiny change of W1, applied as proposed. ``applied`` counts the
    apply calls (the pass's own state, which a trial must leave as it was)."""

    name = "test_kernel_mismatch"
    description = "test only"
    lossless = False

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs

        from onnxopt.names import fresh_name

        self.applied = 0
        h = _tensor(graph, "h")
        proposal = _simulated(graph, "h", "round", group="sim")

        def apply_negation():
            self.applied += 1
            out = gs.Variable(fresh_name(graph, "h_negated"), np.float32, h.shape)
            graph.nodes.append(gs.Node("Neg", inputs=[h], outputs=[out]))
            for reader in [n for n in h.outputs if n.op == "MatMul"]:
                reader.inputs[0] = out

        proposal.apply = apply_negation
        w = _weights(graph)
        tiny = Proposal(w["W1"], W1 * 1.001, lambda: setattr(w["W1"], "values", W1 * 1.001),
                        group="w1")
        return PassResult(False, proposals=[tiny, proposal])


def test_a_decision_the_real_model_breaks_keeps_the_groups_it_needs_float():
    """The simulation accepts both groups; the real model (the pass manager's trial: applied,
    exported, scored with onnxruntime's optimizations off and on, undone) fails, so the
    budget finds the group the real model needs float -- ``sim`` only -- and applies the
    other; every trial left the graph and the pass's state as they were."""
    mismatch = _KernelMismatch()
    record, graph = _run_pass(mismatch)
    budget = record.stats["drift_budget"]
    assert budget["cosine_all"] > 0.999  # the simulation sees no harm
    assert budget["kept"] == ["sim"] and budget["kernel_kept"] == ["sim"]
    assert budget["cosine_kernels"] > 0.999
    assert mismatch.applied == 0  # the trials' applications were undone with the pass's state
    assert not [n for n in graph.nodes if n.op == "Neg"]
    np.testing.assert_array_equal(_weights(graph)["W1"].values, W1 * 1.001)


def test_a_decision_the_real_model_confirms_is_applied_as_decided():
    """The same groups with an honest simulated proposal: one check of the real model, and
    the result is the one the simulation chose."""

    class Honest(_KernelMismatch):
        name = "test_honest"

        def run(self, graph, ctx):
            result = super().run(graph, ctx)
            result.proposals[1].apply = lambda: None  # the round trip's real effect: none
            return result

    record, graph = _run_pass(Honest())
    budget = record.stats["drift_budget"]
    assert budget["kept"] == [] and budget["kernel_kept"] == []
    assert budget["cosine_kernels"] > 0.999


class _Unrunnable(_KernelMismatch):
    """Applies ``sim`` as a node onnxruntime has no kernel for: the check's model cannot load."""

    name = "test_unrunnable"

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs

        result = super().run(graph, ctx)
        h = _tensor(graph, "h")

        def apply_unknown():
            out = gs.Variable("h_unknown", np.float32, h.shape)
            graph.nodes.append(gs.Node("NoSuchOp", domain="test.unknown", inputs=[h],
                                       outputs=[out]))
            for reader in [n for n in h.outputs if n.op == "MatMul"]:
                reader.inputs[0] = out

        result.proposals[1].apply = apply_unknown
        return result


def test_a_check_model_onnxruntime_cannot_run_fails_the_check_instead_of_the_run():
    record, graph = _run_pass(_Unrunnable())
    budget = record.stats["drift_budget"]
    assert budget["kernel_kept"] == ["sim"] and "onnxruntime cannot load" in budget["kernel_error"]
    assert not [n for n in graph.nodes if n.op == "NoSuchOp"]


class _Finishing(_KernelMismatch):
    """``sim`` applies nothing itself but leaves work for :meth:`finish`, which negates ``h``
    when ``sim`` was applied (like float16's Cast merging, done once the accepted set is
    known): the check must score the finished model."""

    name = "test_finishing"

    def run(self, graph, ctx):
        result = super().run(graph, ctx)
        self.pending = False
        result.proposals[1].apply = lambda: setattr(self, "pending", True)
        self._negate = _KernelMismatch.run.__get__(self)(graph, ctx).proposals[1].apply
        return result

    def finish(self, graph):
        if self.pending:
            self._negate()


def test_the_check_scores_the_model_as_the_pass_finishes_it():
    finishing = _Finishing()
    record, graph = _run_pass(finishing)
    assert record.stats["drift_budget"]["kernel_kept"] == ["sim"]
    assert finishing.pending is False and not [n for n in graph.nodes if n.op == "Neg"]


def test_simulated_proposals_below_opset_9_are_gated_without_where():
    """Where exists from opset 9: an opset-8 model's simulated activation is picked by If."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("MatMul", ["h", "W2"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [16, 8])], [("y", np.float32, [16, 4])],
                       {"W1": W1, "W2": W2}, opset=8)
    graph = import_graph(model)
    applied = []
    decision = DriftBudget(model, _feeds(model), 0.99).decide(
        graph, model, [_simulated(graph, "h", "negate", applied=applied),
                       _simulated(graph, "h", "round", group="ok", applied=applied)])
    assert decision.kept_groups == ["h"] and applied == ["h"]


def test_where_the_drift_is_a_cliff_a_size_decision_puts_the_largest_groups_back_first():
    """Two of the kept groups are each enough to break the budget with the other (a cliff, as
    slanet_en's decoder): without sizes the least-gain group is put back (quantized), with
    sizes the largest is -- the file is what a weight-only decision is for."""
    from onnxopt.budget import ranked_kept
    allowed = [{"a", "d"}, {"b", "d"}]

    def within(leave_out):
        applied = {"a", "b", "c", "d"} - set(leave_out)
        return len(applied) <= 1 or applied in allowed, {"cosine": float(len(applied))}

    gains = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}  # ranking a, b, c, d; prefix a, b, c
    kept, _ = ranked_kept(list(gains), gains.__getitem__, within)
    assert kept == ["a", "c"]  # b (less gain than a) put back first
    sizes = {"a": 1000, "b": 10, "c": 100, "d": 1}
    kept, sensitivity = ranked_kept(list(gains), gains.__getitem__, within, sizes.__getitem__)
    assert kept == ["b", "c"] and set(sensitivity) == {"b", "c"}  # a (largest) put back first


def test_delta_debugging_gives_the_headroom_to_the_first_names():
    from onnxopt.budget import minimal_kept
    assert minimal_kept(["big", "small"], lambda keep: len(keep) >= 1) == ["small"]
    assert minimal_kept(["small", "big"], lambda keep: len(keep) >= 1) == ["big"]


def test_group_sizes_are_given_for_weight_decisions_only():
    from onnxopt.budget import _group_sizes
    import onnx_graphsurgeon as gs
    w = [Proposal(gs.Constant(f"w{i}", np.zeros(shape, np.float32)), None, lambda: None,
                  group="g" if i < 2 else None) for i, shape in enumerate([(4, 5), (3,), (7,)])]
    size = _group_sizes(w)
    assert (size("g"), size("w2")) == (23, 7)
    simulated = Proposal(gs.Variable("x", np.float32, (2,)), None, lambda: None,
                         simulate=lambda g, x: x)
    assert _group_sizes(w + [simulated]) is None


def test_the_feed_that_failed_last_is_probed_first_and_passing_sets_measure_as_before():
    """``_measure`` runs the feed a set last failed on alone first: a failing set costs one run
    instead of a run per feed before it; a passing set is measured on every feed in order, to
    the same values as without the probe."""
    refs = [[np.array([1.0, 2.0, 3.0], np.float32) * (k + 1)] for k in range(6)]
    feeds = [{"k": np.array(k)} for k in range(6)]
    budget = DriftBudget(b"", feeds, 0.99, references=refs)
    runs = []

    def noisy(bad: set[int]):
        def run(feed):
            k = int(feed["k"])
            runs.append(k)
            out = refs[k][0].copy()
            if k in bad:
                out[0] = -out[0]  # cosine far below 0.99
            return [out]
        return run

    failed = budget._measure(noisy({5}))
    assert runs == [0, 1, 2, 3, 4, 5] and failed["cosine"] < 0.99
    runs.clear()
    assert budget._measure(noisy({5}))["cosine"] == failed["cosine"]
    assert runs == [5]  # the probe alone
    runs.clear()
    passing = budget._measure(noisy(set()))
    assert runs == [5, 0, 1, 2, 3, 4, 5]  # the probe, then every feed in order
    assert passing == DriftBudget(b"", feeds, 0.99, references=refs)._measure(noisy(set()))
    runs.clear()
    budget._measure(noisy({2}))  # another feed fails: it is the next probe
    assert runs == [5, 0, 1, 2]
    runs.clear()
    budget._measure(noisy({2}), feeds=3)  # the ranking's first feeds: no probe
    assert runs == [0, 1, 2]
