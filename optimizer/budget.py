"""The drift budget: lossy passes propose, the budget decides, against the original model.

A lossy pass (pruning, quantization) does not change the graph itself: it returns
:class:`Proposal` objects -- "initializer ``t`` would compute as ``value``, and ``apply()`` makes it
so" (a pruned array, or a DequantizeLinear subgraph whose float result is ``value``). The pass
manager hands them to :meth:`DriftBudget.decide`, which accepts the strongest set that keeps every
output of the model within the budget *of the original model*, applies it, and reports what stayed
in float and why. Because every decision compares with the original's outputs, computed once, the
drift of successive lossy passes never compounds: a later pass only gets what earlier ones left.

Decision, for proposals ``P`` with the metric ``m`` (higher is better) and target
``τ = max_drift + margin · (1 − max_drift)`` (a margin over the validation criterion, so that
the validated result passes on the same feeds):

1. apply all of ``P``; if ``m ≥ τ`` on every output and feed, accept all (one evaluation);
2. otherwise find a 1-minimal set ``K`` of proposals to leave out -- every proposal of ``K`` is
   needed: putting any one back breaks the budget -- by delta debugging (Zeller and Hildebrandt,
   2002, "Simplifying and Isolating Failure-Inducing Input", TSE): starting from leaving all out,
   ever smaller groups are put back while ``m ≥ τ`` holds. Groups, not single proposals, are
   tried first because harm often shows only in combination (a weight whose error a later layer
   amplifies): on slanet_en no weight costs more than 3e-5 of cosine alone, all together 0.56;
3. measure each kept proposal's *sensitivity*: ``m`` with the accepted set plus that one
   proposal -- what applying it too would cost, the reason it stays out (``|K|`` evaluations).

This is the mixed-precision fallback of accuracy-aware quantizers (NNCF's accuracy control,
onnxruntime.quantization's ``nodes_to_exclude``), chosen here by measurement; cost about
``2 |K| log2 |P| + |K|`` model runs per feed when ``K`` is not empty, one when it is.

Evaluating a mix needs no new session per mix: the proposed initializers become graph inputs of
one session and each evaluation feeds original or proposed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, graph_protos


@dataclass
class Proposal:
    """A lossy replacement a pass proposes.

    Attributes:
        tensor: the initializer whose value changes (float; any shape).
        value: what the model computes with in its place (same shape and dtype as ``tensor``):
            the pruned array, or the dequantized values of a quantized weight.
        apply: makes the change in the graph (called only when the budget accepts it).
        source: the proposing pass's name (set by the pass manager).
    """

    tensor: gs.Constant
    value: np.ndarray
    apply: Callable[[], None]
    source: str = ""

    @property
    def name(self) -> str:
        return self.tensor.name


class DriftMetric:
    """How close a candidate output is to the reference: higher is better, 1.0 is identical."""

    name = ""
    #: What the user's threshold means, for messages ("cosine similarity").
    description = ""

    def score(self, reference, candidate) -> float:  # pragma: no cover - interface
        """The score of one output on one feed (arrays, or lists of arrays for sequences)."""
        raise NotImplementedError


class CosineMetric(DriftMetric):
    """Cosine similarity of the flattened outputs (``onnxopt.validate.output_metrics``), judged
    as validation judges a lossy result: an output whose dtype, shape or sequence layout changed,
    whose strings differ, or whose NaNs or infinities moved scores -1 (fails any budget)."""

    name = "cosine"
    description = "cosine similarity"

    def score(self, reference, candidate) -> float:
        from onnxopt.validate import flatten_sequence, layout, output_metrics

        if (isinstance(reference, list) or isinstance(candidate, list)) \
                and layout(reference) != layout(candidate):
            return -1.0
        r, c = flatten_sequence(reference), flatten_sequence(candidate)
        if r.dtype != c.dtype or r.shape != c.shape:
            return -1.0
        if r.dtype.kind in "OSU":
            return 1.0 if np.array_equal(r, c) else -1.0
        with np.errstate(all="ignore"):
            m = output_metrics(r, c)
        return -1.0 if m["nan_mismatch"] else m["cosine"]


#: Metrics by name; ``optimize(metric=...)`` and ``metric`` in a config file pick one.
METRICS: dict[str, DriftMetric] = {m.name: m for m in (CosineMetric(),)}


def get_metric(metric: str | DriftMetric) -> DriftMetric:
    """The metric ``metric`` names (or ``metric`` itself).

    Raises:
        UsageError: no metric has that name.
    """
    if isinstance(metric, DriftMetric):
        return metric
    if metric not in METRICS:
        raise UsageError(f"unknown drift metric '{metric}'; known: {', '.join(METRICS)}")
    return METRICS[metric]


@dataclass
class Decision:
    """What :meth:`DriftBudget.decide` accepted, with its measurements.

    ``kept`` are the proposals left out (their tensors stay as they were), most harmful first;
    ``sensitivity`` the score each kept proposal would give if applied with the accepted ones
    (why it stays out).
    """

    accepted: list[Proposal]
    kept: list[Proposal]
    target: float
    score_all: float
    score_final: float
    evaluations: int
    sensitivity: dict[str, float] = field(default_factory=dict)

    def report(self, source: str | None = None) -> dict:
        """The JSON-serializable record, for the proposals of ``source`` (None: all)."""
        kept = [p for p in self.kept if source is None or p.source == source]
        return {"target": self.target, "cosine_all": self.score_all,
                "cosine_final": self.score_final, "evaluations": self.evaluations,
                "kept": [p.name for p in kept],
                "sensitivity": {p.name: self.sensitivity[p.name] for p in kept
                                if p.name in self.sensitivity}}


class DriftBudget:
    """The one drift budget of a run.

    Args:
        original: the original model (or its serialization); its outputs on ``feeds`` are the
            reference, computed once.
        feeds: the feeds the budget is measured on (``{input name: array}`` each).
        max_drift: the threshold of ``metric`` every output must keep (validation's criterion).
        metric: a :class:`DriftMetric` or its name (default cosine similarity).
        margin: fraction of ``1 - max_drift`` kept in reserve (see the module docstring).
    """

    def __init__(self, original: onnx.ModelProto | bytes, feeds: list[dict], max_drift: float,
                 metric: str | DriftMetric = "cosine", margin: float = 0.1) -> None:
        self.original, self.feeds, self.max_drift = original, list(feeds), max_drift
        self.metric = get_metric(metric)
        self.target = max_drift + margin * (1.0 - max_drift)
        self._references: list[list[np.ndarray]] | None = None

    def references(self) -> list[list[np.ndarray]]:
        """The original model's outputs on every feed (computed on first use).

        Raises:
            InputError: onnxruntime cannot load or run the original.
        """
        if self._references is None:
            from onnxopt.validate import make_session, run_model

            session = make_session(self.original, "original model")
            self._references = [run_model(session, f, "original model") for f in self.feeds]
        return self._references

    def decide(self, graph: gs.Graph, template: onnx.ModelProto,
               proposals: list[Proposal]) -> Decision:
        """Choose the proposals to accept (see the module docstring) and apply them.

        Raises:
            InputError: onnxruntime cannot run the model on the feeds.
        """
        from onnxopt.validate import make_session

        by_name: dict[str, Proposal] = {}
        for p in proposals:
            by_name.setdefault(p.name, p)
        proposals = list(by_name.values())
        originals = {p.name: np.asarray(p.tensor.values) for p in proposals}
        model = export_graph(graph, template)
        for g in graph_protos(model.graph):
            moved = [init for init in g.initializer if init.name in originals]
            for init in moved:
                g.initializer.remove(init)
                model.graph.input.append(onnx.helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)))
        session = make_session(model, "model with lossy proposals")
        inputs = [i.name for i in session.get_inputs()]
        references = self.references()
        evaluations = 0

        def score(applied: set[str]) -> float:
            nonlocal evaluations
            evaluations += 1
            weights = {n: by_name[n].value if n in applied else v for n, v in originals.items()}
            worst = 1.0
            for feed, ref in zip(self.feeds, references):
                values = {**feed, **weights}
                out = session.run(None, {n: values[n] for n in inputs})
                for r, c in zip(ref, out):
                    worst = min(worst, self.metric.score(r, c))
                    if worst == -1.0:
                        return worst
            return worst

        names = list(by_name)
        score_all = score(set(names))
        kept: list[str] = []
        sensitivity: dict[str, float] = {}
        score_final = score_all
        if score_all < self.target:
            kept = minimal_kept(names, lambda keep: score(set(names) - set(keep)) >= self.target)
            accepted = set(names) - set(kept)
            sensitivity = {n: score(accepted | {n}) for n in kept}
            kept.sort(key=lambda n: sensitivity[n])  # most harmful first
            score_final = score(accepted)
        accepted = [by_name[n] for n in names if n not in kept]
        for p in accepted:
            p.apply()
        return Decision(accepted, [by_name[n] for n in kept], self.target, score_all,
                        score_final, evaluations, sensitivity)


def minimal_kept(names: list[str], within_budget: Callable[[list[str]], bool]) -> list[str]:
    """A 1-minimal sublist ``K`` of ``names`` with ``within_budget(K)`` true, by ddmin: remove
    chunks of ``K`` (halves, then quarters, ...) while the predicate holds. If even
    ``within_budget(names)`` is false, ``names`` is returned (nothing can be applied)."""
    kept, granularity = list(names), 2
    if not within_budget(kept):
        return kept
    while kept:
        size = -(-len(kept) // granularity)
        chunks = [kept[i:i + size] for i in range(0, len(kept), size)]
        for chunk in chunks:
            trial = [n for n in kept if n not in chunk]
            if within_budget(trial):
                kept, granularity = trial, max(granularity - 1, 2)
                break
        else:
            if granularity >= len(kept):
                break
            granularity = min(len(kept), granularity * 2)
    return kept


def accept_all(proposals: list[Proposal]) -> list[Proposal]:
    """Apply every proposal (a run without feeds has no budget); return them."""
    for p in proposals:
        p.apply()
    return proposals


def lossy_warnings(pass_name: str, modified: bool, decision: dict | None, max_drift: float,
                   refused: dict | None = None, metric: str = "cosine similarity") -> list[str]:
    """What a lossy pass tells the user when it did less than asked: the tensors the drift
    budget left unchanged (``decision["kept"]``, see :meth:`Decision.report`), and when nothing
    changed at all, the ``refused`` reasons."""
    kept = decision["kept"] if decision else []
    warnings = []
    if kept:
        shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
        warnings.append(f"{pass_name} left {len(kept)} tensor(s) unchanged to keep every "
                        f"output's {metric} >= {max_drift}: {shown}")
    if not modified:
        why = ", ".join(f"{k}: {v}" for k, v in (refused or {}).items())
        warnings.insert(0, f"{pass_name} changed nothing" + (f" ({why})" if why else ""))
    return warnings
