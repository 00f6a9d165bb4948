"""The drift budget: lossy passes propose, the budget decides, against the original model.

A lossy pass (pruning, quantization) does not change the graph itself: it returns
:class:`Proposal` objects, of two kinds:

* a **weight** proposal -- "initializer ``t`` would compute as ``value``, and ``apply()`` makes it
  so" (a pruned array, or a DequantizeLinear subgraph whose float result is ``value``);
* a **simulated** proposal -- "activation ``x`` would be replaced, for ``readers``, by what
  ``simulate(graph, x)`` computes" (QuantizeLinear -> DequantizeLinear, Cast to float16 and back),
  and ``apply()`` makes the real edit.

Proposals sharing a ``group`` (a node's weight and its input activations, for per-node mixed
precision) are accepted or left out together; a proposal without one is its own group, named by
its tensor. The pass manager hands them to :meth:`DriftBudget.decide`, which accepts the
strongest set of groups that keeps every output of the model within the budget *of the original
model*, applies it (in the order the proposals were given), and reports what stayed in float and
why. Because every decision compares with the original's outputs, computed once, the drift of
successive lossy passes never compounds: a later pass only gets what earlier ones left.

The budget is a list of criteria (``onnxopt.metrics``: ``cosine >= 0.999``, ``max-abs <= 0.05``,
...), each tightened to a target by a margin (:meth:`onnxopt.metrics.DriftMetric.target`: the
fraction of the allowed error kept in reserve, so that the validated result passes on the same
feeds). A set of groups is *within budget* when every criterion's target holds on every output
and feed. For groups ``G``:

1. apply all of ``G``; if within budget, accept all (one evaluation);
2. otherwise find a 1-minimal set ``K`` of groups to leave float -- every group of ``K`` is
   needed: putting any one back breaks the budget. Up to :data:`RANKED_MAX_GROUPS` groups, by
   sensitivity ranking (:func:`ranked_kept`): rank the groups by what leaving each one float
   gains with all others applied, bisect for the shortest prefix of the ranking that, left
   float, brings the rest within budget, then put back what is not needed (when every
   proposal is a weight proposal, the largest groups first: the goal is size; so does delta
   debugging). Above, by delta
   debugging (Zeller and Hildebrandt, 2002, "Simplifying and Isolating Failure-Inducing Input",
   TSE; :func:`minimal_kept`), cheaper when few of many groups must stay float. Harm often
   shows only in combination (a weight whose error a later layer amplifies: on slanet_en no
   weight costs more than 3e-5 of cosine alone, all together 0.56), which is why the ranking
   measures each group against all the others applied, not alone;
3. each kept group's *sensitivity* -- every criterion's value with the accepted set plus that
   group, the reason it stays out -- is measured (by the ranking's last check, or once more
   after delta debugging).

This is the sensitivity-ranked mixed-precision fallback of accuracy-aware quantizers (NNCF's
accuracy control, onnxruntime.quantization's ``nodes_to_exclude``), chosen here by measurement;
cost ``|G| + log2 |G| + |K| + 2`` model runs per feed by ranking, about ``2 |K| log2 |G| + |K|``
by delta debugging, when ``K`` is not empty; one when it is
(a run stops at the first feed on which a worst-feed criterion fails). The evaluation session
runs with onnxruntime's graph optimizations on, but its gates keep QuantizeLinear and
DequantizeLinear apart from the nodes they surround, so no integer kernel is fused: a simulated
proposal is measured in float. Hence step

4. when a simulated proposal is accepted and the caller gives a ``trial`` (the pass manager
   does), the accepted set is applied for real, exported and scored as validation scores it
   (:meth:`DriftBudget.score_model`: optimizations off and on, the worse), then undone; when that
   fails, more groups stay float, found on real models (:meth:`DriftBudget.decide`).

Groups the feeds cannot measure are left out before any of this: a group all of whose
proposals act inside If branches that none of the budget's feeds takes (simulated proposals in
such a branch, weights read only there) would show no harm and be accepted unmeasured --
silero-vad validated at 16 kHz would have its 8 kHz branch changed unseen. They stay as they
are (``Decision.unexercised``; the warning asks for feeds that take those branches). Nodes of
Loop and Scan bodies are not judged this way (whether a body ran is not observed): their groups
are decided as the main graph's.

Evaluating a mix needs no new session per mix. Weight proposals: the proposed initializers
become graph inputs of one session, fed original or proposed values. A quantized weight that
gives its :class:`Dequantized` form is fed as its codes instead (one byte per element, not
four): ``If(gate)`` computes it by DequantizeLinear, or passes the original through, so an
evaluation of a large model never holds a float copy of every accepted weight (the 1 B decoder:
1 GiB of codes, not 4 GiB of floats). Simulated proposals: for each, ``simulate`` appends its
nodes to the live graph, a ``Where(gate, simulated, x)`` (an ``If`` below opset 9) picks the
simulated or the float value by a boolean scalar graph input per group, and ``readers`` read the
``Where``; the model is exported, and every edit is undone (nodes, graph inputs, consumer lists,
the name authority), so the graph is exactly as before.
"""

from __future__ import annotations

import collections
import functools
import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import external, io, progress
from onnxopt.errors import InputError
from onnxopt.graph import (branch_labels, branch_scopes, edits_undone, export_graph,
                           graph_protos, iter_graphs, opset_version)
from onnxopt.metrics import (METRICS, CosineMetric, Criterion, DriftMetric, Tally, describe,
                             get_metric, kept_positions, parse_criteria)
from onnxopt.names import NameAuthority, fresh_name
from onnxopt.opset import default_opset

__all__ = ["Proposal", "Decision", "DriftBudget", "DriftMetric", "CosineMetric", "METRICS",
           "get_metric", "ranked_kept", "minimal_kept", "accept_all", "lossy_warnings"]


#: Why a pass's group stays unchanged when it is :attr:`Proposal.unexercised`.
UNEXERCISED = "no validation feed takes its If branch (the drift budget cannot measure it)"

#: First opset of DequantizeLinear with ``axis`` (per-axis) and with ``block_size`` (blocked).
_PER_AXIS_OPSET, _BLOCKED_OPSET = 13, 21


@dataclass
class Dequantized:
    """A quantized weight proposal's value in the form ONNX DequantizeLinear computes it
    (operator spec, opsets 13 and 21): ``(codes - zero_point) * scale``, the scale and zero
    point broadcast per tensor, per ``axis`` or per block of ``block_size`` along ``axis``;
    divided by ``row_divisor`` per row when given (an input-channel scale folded into the
    weight, AWQ). Equals the proposal's float ``value`` (up to the rounding of that division).

    Attributes:
        codes: int8 or uint8 array of the weight's shape (or its
            ``onnxopt.external.SpilledValues``, mapped while a run reads it).
        scale: float32: a scalar, ``[C]`` along ``axis``, or ``[ceil(K / block_size), ...]``.
        zero_point: the codes' dtype, the scale's shape; None: zero.
        axis: the quantization axis; None: per tensor.
        block_size: rows per block along ``axis`` (0: not blocked).
        row_divisor: float32 ``[K]`` for a ``[K, N]`` weight, or None.
    """

    codes: object
    scale: np.ndarray
    zero_point: np.ndarray | None = None
    axis: int | None = None
    block_size: int = 0
    row_divisor: np.ndarray | None = None

    def min_opset(self) -> int:
        """The first opset whose DequantizeLinear computes this form."""
        return _BLOCKED_OPSET if self.block_size else _PER_AXIS_OPSET if self.axis is not None \
            else 10

    def feeds(self) -> list[np.ndarray]:
        """The arrays the evaluation model's DequantizeLinear reads: codes, scale, zero point
        (when given), row divisor as ``[K, 1]`` (when given)."""
        arrays = [external.unspill(self.codes), np.asarray(self.scale, np.float32)]
        if self.zero_point is not None:
            arrays.append(np.asarray(self.zero_point, arrays[0].dtype))
        if self.row_divisor is not None:
            arrays.append(np.asarray(self.row_divisor, np.float32)[:, None])
        return arrays


@dataclass
class Proposal:
    """A lossy replacement a pass proposes (see the module docstring).

    Attributes:
        tensor: a weight proposal's initializer (a ``gs.Constant``, float, any shape), or a
            simulated proposal's activation (a ``gs.Variable`` of ``scope``).
        value: a weight proposal's values the model computes with in its place (same shape and
            dtype as ``tensor``): the pruned array, or the dequantized values of a quantized
            weight, or a function computing them when asked (:meth:`array`: a large model's
            passes keep only the quantized weights, not a dequantized copy of each); None for a
            simulated proposal.
        apply: makes the change in the graph (called only when the budget accepts it).
        source: the proposing pass's name (set by the pass manager).
        group: proposals of one group are accepted or left out together; None: its own group,
            named by the tensor.
        simulate: a simulated proposal's ``fn(graph, x) -> gs.Variable``, which appends to
            ``graph`` the nodes computing what the changed model computes in place of ``x``
            (``tensor``) and returns their output.
        readers: ``(node, input index)`` pairs of ``scope`` that read the simulated value;
            None: every reader of ``x`` in ``scope``.
        scope: the graph holding a simulated proposal's activation and readers: a subgraph (an
            If branch, a Loop or Scan body) of the main graph; None: the main graph.
        dequantized: a quantized weight proposal's :class:`Dequantized` form (equal to
            ``value``), which evaluations feed instead of the float values.
        unexercised: set by :meth:`DriftBudget.decide` when the proposal's group acts only in
            If branches none of the budget's feeds takes (left unchanged: see the module
            docstring); a pass's ``summarize`` gives those groups that reason.
    """

    tensor: gs.Tensor
    value: np.ndarray | None
    apply: Callable[[], None]
    source: str = ""
    group: str | None = None
    simulate: Callable[[gs.Graph, gs.Variable], gs.Variable] | None = None
    readers: list[tuple[gs.Node, int]] | None = None
    dequantized: Dequantized | None = None
    scope: gs.Graph | None = None
    unexercised: bool = False

    @property
    def name(self) -> str:
        return self.tensor.name

    def array(self) -> np.ndarray | None:
        """``value``, computed now when the pass gave a function."""
        return self.value() if callable(self.value) else self.value

    @property
    def key(self) -> str:
        """The group the budget decides this proposal with."""
        return self.group if self.group is not None else self.tensor.name


@dataclass
class Decision:
    """What :meth:`DriftBudget.decide` accepted, with its measurements.

    ``kept`` are the proposals left out (their tensors stay as they were), ``kept_groups`` their
    groups, most harmful first; ``target``, ``score_all`` and ``score_final`` map each criterion's
    metric name to its target and to its worst value with every group applied and with the
    accepted ones; ``sensitivity`` maps each kept group to every criterion's value if it were
    applied with the accepted ones (why it stays out). ``kernel_kept`` are the kept groups the
    check on the real model added (see :meth:`DriftBudget.decide`'s ``trial``), most harmful
    first, and ``score_kernels`` each criterion's worst value on that model with the accepted
    groups (None: not checked), ``kernel_checks`` the number of real models that check scored,
    ``kernel_error`` the first reason onnxruntime could not load or run one (scored as failing).
    ``unexercised`` are the kept groups no feed could measure (in If branches none takes; see
    the module docstring), at the end of ``kept_groups``; ``unexercised_branches`` names those
    branches (outermost only).
    """

    accepted: list[Proposal]
    kept: list[Proposal]
    target: dict[str, float]
    score_all: dict[str, float]
    score_final: dict[str, float]
    evaluations: int
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    kept_groups: list[str] = field(default_factory=list)
    kernel_kept: list[str] = field(default_factory=list)
    score_kernels: dict[str, float] | None = None
    kernel_checks: int = 0
    kernel_error: str | None = None
    unexercised: list[str] = field(default_factory=list)
    unexercised_branches: list[str] = field(default_factory=list)

    def report(self, source: str | None = None) -> dict:
        """The JSON-serializable record, for the proposals of ``source`` (None: all):
        ``target``, ``<metric>_all`` and ``<metric>_final`` per criterion, ``evaluations``,
        ``kept`` (the groups left out), ``sensitivity`` (``{group: {metric: value}}``) and, when
        the decision was checked on the real model, ``<metric>_kernels``, ``kernel_kept`` (the
        groups of ``kept`` that check left out) and ``kernel_checks``; ``unexercised`` (the
        groups of ``kept`` no feed could measure) when there are any."""
        mine = {p.key for p in self.kept if source is None or p.source == source}
        kept = [g for g in self.kept_groups if g in mine]
        record = {"target": dict(self.target), "evaluations": self.evaluations}
        for name in self.target:
            record[f"{name}_all"] = self.score_all[name]
            record[f"{name}_final"] = self.score_final[name]
        record["kept"] = kept
        record["sensitivity"] = {g: self.sensitivity[g] for g in kept if g in self.sensitivity}
        if self.unexercised:
            record["unexercised"] = [g for g in self.unexercised if g in mine]
            if record["unexercised"]:
                record["unexercised_branches"] = list(self.unexercised_branches)
        if self.kernel_checks:
            for name in self.target:
                record[f"{name}_kernels"] = (self.score_kernels or {}).get(name)
            record["kernel_kept"] = [g for g in self.kernel_kept if g in mine]
            record["kernel_checks"] = self.kernel_checks
            if self.kernel_error:
                record["kernel_error"] = self.kernel_error
        return record


class DriftBudget:
    """The one drift budget of a run.

    Args:
        original: the original model (or its serialization); its outputs on ``feeds`` are the
            reference, computed once.
        feeds: the feeds the budget is measured on (``{input name: array}`` each).
        max_drift: the criteria every output must keep (validation's): a number (a threshold of
            ``metric``), a string ``"cosine=0.999,max-abs=0.05"``, a mapping or criteria (see
            ``onnxopt.metrics.parse_criteria``).
        metric: the metric a bare number means (a name, a :class:`DriftMetric` or a callable;
            default cosine similarity).
        margin: fraction of each criterion's allowed error kept in reserve (see the module
            docstring).
        references: the original's outputs on each feed, when already computed (see
            :meth:`references`).
        mask: an input whose non-zero positions are the ones compared
            (``onnxopt.metrics.kept_positions``; None: every position).

    Raises:
        UsageError: invalid criteria.
    """

    def __init__(self, original: onnx.ModelProto | bytes, feeds: list[dict], max_drift,
                 metric: str | DriftMetric | Callable = "cosine", margin: float = 0.1,
                 references: list[list[np.ndarray]] | None = None,
                 mask: str | None = None) -> None:
        self.original, self.feeds, self.mask = original, list(feeds), mask
        self.criteria: list[Criterion] = parse_criteria(max_drift, metric)
        self.targets = {c.name: c.metric.target(c.threshold, margin) for c in self.criteria}
        self._references = references
        #: The feed the last failing measurement failed on (:meth:`_measure`'s probe).
        self._suspect: int | None = None

    def tightened(self, margin: float) -> "DriftBudget":
        """The same budget with ``margin`` of the allowed error in reserve (the original's
        outputs are not computed again)."""
        other = DriftBudget(self.original, self.feeds, self.criteria, margin=margin,
                            mask=self.mask)
        other._references = self._references
        return other

    def describe(self) -> str:
        """The criteria for messages (``cosine >= 0.99, max-abs <= 0.05``)."""
        return describe(self.criteria)

    def within(self, scores: dict[str, float], pooled: bool = True) -> bool:
        """Whether ``scores`` (metric name -> worst value) meet every criterion's target
        (without ``pooled``: of the criteria that are not pooled over feeds, or that failed)."""
        return all(c.metric.meets(scores[c.name], self.targets[c.name]) for c in self.criteria
                   if pooled or not c.metric.pooled or scores[c.name] == c.metric.failure)

    def _worst(self, tallies: dict[tuple[str, int], "Tally"]) -> dict[str, float]:
        """Each criterion's worst value over the outputs."""
        worst: dict[str, float] = {}
        for (name, _), tally in tallies.items():
            worst[name] = tally.value if name not in worst else tally.metric.worst(
                worst[name], tally.value)
        return worst

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

    def _scorer(self, graph: gs.Graph, template: onnx.ModelProto, proposals: list[Proposal],
                fallback: list[Proposal] = ()) -> tuple[Callable, list[Proposal], list[str],
                                                        Callable[[], int]]:
        """The evaluation machinery of a set of proposals (see the module docstring).

        Returns ``(score, chosen, groups, evaluations)``: ``score(applied, feeds=None)`` gives
        each criterion's worst value with the groups ``applied`` (names) and the others at their
        base value -- the ``fallback`` proposal's value for its tensor, else the current one;
        ``chosen`` are the proposals decided (one per initializer: the first), ``groups`` their
        group names in order, ``evaluations()`` the number of scores so far.
        """
        from onnxopt.validate import make_session

        weights: dict[str, Proposal] = {}
        chosen: list[Proposal] = []
        for p in proposals:
            if p.simulate is None:
                if p.name in weights:
                    continue  # one value per initializer: the first proposal's
                weights[p.name] = p
            chosen.append(p)
        groups = list(dict.fromkeys(p.key for p in chosen))
        base = {p.name: p for p in fallback if p.simulate is None}
        # every value is made for each run and dropped after it: an external weight is mapped
        # afresh (onnxopt.external.peek), a lazy proposal computed, so that a large model holds
        # one set of weights at a time, not the originals and every proposal's values at once
        originals = {n: base[n].array if n in base else functools.partial(external.peek, p.tensor)
                     for n, p in weights.items()}
        # A fallback tensor no proposal replaces is fed its fallback value as well.
        extra = {n: v for n, v in base.items() if n not in originals}
        model, gates = _evaluation_model(graph, template,
                                         [p for p in chosen if p.simulate is not None])
        opset = default_opset(model)
        forms = {n: p.dequantized for n, p in weights.items()
                 if n not in base and p.dequantized is not None
                 and p.dequantized.min_opset() <= opset}
        for g in graph_protos(model.graph):
            moved = [init for init in g.initializer
                     if init.name in originals or init.name in extra]
            names = {init.name for init in moved}
            for listed in [i for i in model.graph.input if i.name in names]:
                model.graph.input.remove(listed)  # IR < 4 lists initializers as inputs too
            for init in moved:
                g.initializer.remove(init)
                if init.name in forms and init.data_type == onnx.TensorProto.FLOAT:
                    continue  # fed by _dequantized_inputs below
                forms.pop(init.name, None)
                model.graph.input.append(onnx.helper.make_tensor_value_info(
                    init.name, init.data_type, list(init.dims)))
            if g is not model.graph:
                _outputs_copied(g, names, model)
        fed = _dequantized_inputs(model, forms)
        session = make_session(model, "model with lossy proposals", optimized=True)
        inputs = [i.name for i in session.get_inputs()]
        count = 0

        def score(applied: set[str], feeds: int | None = None) -> dict[str, float]:
            nonlocal count
            count += 1
            progress.report(f"drift budget: evaluation {count} ({len(applied)} of "
                            f"{len(groups)} groups applied)")
            values = {n: weights[n].array() if weights[n].key in applied else original()
                      for n, original in originals.items() if n not in fed}
            for n, (gate, original, names) in fed.items():
                on = weights[n].key in applied
                values[gate] = np.array(on)
                values[original] = _EMPTY[np.float32] if on else originals[n]()
                arrays = forms[n].feeds()
                values.update({name: a if on else _EMPTY[a.dtype.type]
                               for name, a in zip(names, arrays)})
            values.update({n: p.array() for n, p in extra.items()})
            values.update({gate: np.array(key in applied) for key, gate in gates.items()})
            return self._measure(lambda feed: session.run(
                None, {n: values[n] if n in values else feed[n] for n in inputs}), feeds)

        return score, chosen, groups, lambda: count

    def _measure(self, run: Callable[[dict], list], feeds: int | None = None
                 ) -> dict[str, float]:
        """Each criterion's worst value over the outputs ``run(feed)`` computes on the first
        ``feeds`` feeds (None: all), against the original's; stops at the first feed on which
        a worst-feed criterion fails (the other feeds cannot help).

        With every feed asked for, the feed that failed last is run alone first (a probe): a
        set that fails there fails on all feeds too, and is known after one run instead of a
        run of every feed before it -- PP-OCRv4 rec's hardest feed is its 35th of 40, and most
        of the ranking's and bisection's sets fail; a set that passes the probe is measured on
        every feed in order, so a result within budget is exactly what it was without the
        probe (one run more). Only which failing value is reported can change."""
        if feeds is None and self._suspect is not None:
            probe: dict[tuple[str, int], Tally] = {}
            self._add(probe, self._suspect, run)
            if not self.within(self._worst(probe), pooled=False):
                return self._worst(probe)
        tallies: dict[tuple[str, int], Tally] = {}
        for k in range(len(self.feeds))[:feeds]:
            self._add(tallies, k, run)
            if not self.within(self._worst(tallies), pooled=False):
                if feeds is None:
                    self._suspect = k
                break
        return self._worst(tallies)

    def _add(self, tallies: dict[tuple[str, int], "Tally"], k: int,
             run: Callable[[dict], list]) -> None:
        """Count feed ``k``'s outputs ``run(feed)`` in ``tallies`` (per criterion and output)."""
        feed = self.feeds[k]
        for i, (r, c) in enumerate(zip(self.references()[k], run(feed))):
            r, c = kept_positions(r, c, feed.get(self.mask))
            for crit in self.criteria:
                tally = tallies.setdefault((crit.name, i), Tally(crit.metric))
                tally.add(crit.metric.score(r, c), r, c)

    def score_model(self, model: onnx.ModelProto) -> dict[str, float]:
        """Each criterion's worst value over outputs and feeds of ``model`` as onnxruntime
        runs it, with its graph optimizations off and on -- per criterion the worse of the two
        sessions, as validation (``onnxopt.validate.compare_models``) judges a lossy result.
        With them on, QuantizeLinear/DequantizeLinear pairs around a node become onnxruntime's
        integer kernel (QLinearConv, QLinearMatMul, ...), which rounds where a float
        simulation does not (exact int32 accumulation, one requantization): see
        :meth:`decide`'s ``trial``.

        Raises:
            InputError: onnxruntime cannot load or run ``model``.
        """
        from onnxopt.validate import make_session, run_model

        what = "model with the accepted proposals"
        data = io.serialize(model)  # None over the protobuf limit: make_session spills it
        worst: dict[str, float] | None = None
        for optimized in (False, True):
            session = make_session(data if data is not None else model, what,
                                   optimized=optimized)
            measured = self._measure(lambda feed: run_model(session, feed, what))
            worst = measured if worst is None else {
                c.name: c.metric.worst(worst[c.name], measured[c.name]) for c in self.criteria}
            if not self.within(worst):
                break
        return worst

    def evaluate(self, graph: gs.Graph, template: onnx.ModelProto,
                 proposals: list[Proposal]) -> tuple[dict[str, float], bool]:
        """Each criterion's worst value over outputs and feeds with every proposal applied (the
        graph is left as it was), and whether that is within budget (the targets, margin
        included). Used by the strength search (``onnxopt.pass_manager``) to score a setting.

        Raises:
            InputError: onnxruntime cannot run the model on the feeds.
        """
        score, _, groups, _ = self._scorer(graph, template, proposals)
        scores = score(set(groups))
        return scores, self.within(scores)

    def harm_alone(self, graph: gs.Graph, template: onnx.ModelProto, proposals: list[Proposal],
                   feeds: int | None = None) -> dict[str, float]:
        """Per group, how much the first criterion worsens (in its own units, positive: worse)
        when that group alone is applied, against no proposal applied, on the first ``feeds``
        feeds (None: all), in one onnxruntime session; the graph is left as it was. A pass
        ranking its proposals by measured harm (leave-one-in sensitivity, HAWQ: Dong et al.
        2019) calls it.

        Raises:
            InputError: onnxruntime cannot run the model on the feeds.
        """
        score, _, groups, _ = self._scorer(graph, template, proposals)
        first = self.criteria[0]
        sign = 1.0 if first.metric.higher_is_better else -1.0
        base = score(set(), feeds)[first.name]
        return {g: sign * (base - score({g}, feeds)[first.name]) for g in groups}

    def decide(self, graph: gs.Graph, template: onnx.ModelProto,
               proposals: list[Proposal], fallback: list[Proposal] = (),
               apply: bool = True,
               trial: Callable[[list[Proposal]], onnx.ModelProto] | None = None) -> Decision:
        """Choose the groups of proposals to accept (see the module docstring) and apply their
        proposals, in the order given. The graph is otherwise left as it was.

        Args:
            fallback: weight proposals standing for the state of a group left out (instead of
                the current value): the strength search's weaker setting, so that a tensor whose
                stronger proposal harms stays at the weaker one. Accepted proposals replace the
                fallback of their tensors; the returned ``accepted`` lists the fallback proposals
                still in force after them (a fallback group is in force only when none of its
                tensors is replaced; the caller offers only groups that replace whole fallback
                groups). Fallback proposals are applied too.
            apply: False leaves the graph alone (the caller applies ``accepted``).
            trial: ``trial(accepted) -> model``: the model with ``accepted`` applied for real
                (the graph left as it was; the pass manager's ``onnxopt.graph.edits_undone``).
                When given and a simulated proposal is accepted, the decision is checked on
                that model as validation will run it (:meth:`score_model`: onnxruntime's
                integer kernels, which the float simulation only approximates -- slanet_en's
                decoder loop turns a few requantization ties into different steps: cosine
                0.9999 simulated, 0.9487 with the kernels). When it fails, the accepted groups
                are ranked by what leaving each float gains (simulated, as in
                :func:`ranked_kept`), the shortest prefix of the ranking that, left float,
                brings the real model within budget is found by bisection, then made 1-minimal
                by delta debugging on real models (:func:`minimal_kept`; about ``log2 |A| +
                2 |K| log2 |P|`` real models for ``A`` accepted groups, a prefix ``P`` and ``K``
                found, each scored in two sessions; a model onnxruntime cannot load or run
                fails the check); those groups are kept too (``Decision.kernel_kept``).

        Raises:
            InputError: onnxruntime cannot run the model on the feeds.
        """
        idle, idle_branches = self.unexercised(graph, template, proposals)
        unmeasured = [p for p in proposals if p.key in idle]
        for p in unmeasured:
            p.unexercised = True
        proposals = [p for p in proposals if p.key not in idle]
        score, chosen, groups, evaluations = self._scorer(graph, template, proposals, fallback)
        score_all = score(set(groups))
        kept: list[str] = []
        sensitivity: dict[str, dict[str, float]] = {}
        score_final = score_all
        first = self.criteria[0]
        sign = 1.0 if first.metric.higher_is_better else -1.0

        def gain(g: str, applied: list[str]) -> float:
            """What leaving ``g`` float gains, with ``applied`` applied (ranking feeds)."""
            return sign * score(set(applied) - {g}, RANKING_FEEDS)[first.name]

        if not self.within(score_all):
            def without(leave_out: set[str]) -> tuple[bool, dict[str, float]]:
                measured = score(set(groups) - leave_out)
                return self.within(measured), measured

            if len(groups) <= RANKED_MAX_GROUPS:
                kept, sensitivity = ranked_kept(groups, lambda g: gain(g, groups), without,
                                                _group_sizes(chosen))
            else:
                size = _group_sizes(chosen)
                order = sorted(groups, key=lambda g: -size(g)) if size else groups
                kept = minimal_kept(order, lambda keep: without(set(keep))[0])
                accepted_groups = set(groups) - set(kept)
                sensitivity = {g: score(accepted_groups | {g}) for g in kept}
            # most harmful first (nothing is measured when even leaving all float fails)
            kept.sort(key=lambda g: sign * sensitivity.get(g, {}).get(first.name, 0.0))
            score_final = score(set(groups) - set(kept))

        def accepted_with(left_float: set[str]) -> list[Proposal]:
            mine = [p for p in chosen if p.key not in left_float]
            replaced = {p.name for p in mine}
            dropped = {p.key for p in fallback if p.name in replaced}
            return [p for p in fallback if p.key not in dropped] + mine

        kernel_kept: list[str] = []
        score_kernels = None
        measured: dict[frozenset, dict[str, float]] = {}
        errors: list[str] = []

        def real(left_float) -> dict[str, float]:
            """The real model's scores with ``left_float`` float too (each set scored once; a
            model onnxruntime cannot load or run scores the criteria's failure values)."""
            key = frozenset(left_float)
            if key not in measured:
                progress.report(f"drift budget: check {len(measured) + 1} of the real model "
                                f"({len(key)} more groups float)")
                try:
                    measured[key] = self.score_model(trial(accepted_with(set(kept) | key)))
                except InputError as err:
                    errors.append(str(err))
                    measured[key] = {c.name: c.metric.failure for c in self.criteria}
            return measured[key]

        if trial is not None and any(p.simulate is not None and p.key not in kept
                                     for p in chosen):
            score_kernels = real(())
            if not self.within(score_kernels):
                applied = [g for g in groups if g not in kept]
                gains = {g: gain(g, applied) for g in applied}
                ranking = sorted(applied, key=lambda g: -gains[g])
                kernel_kept = ranking[:shortest_prefix(
                    len(ranking), lambda k: self.within(real(ranking[:k])))]
                if self.within(real(kernel_kept)):
                    # then 1-minimal on real models, by delta debugging: a group that breaks
                    # only with the kernels gains nothing simulated and ranks last, so the
                    # prefix can be long where few of it are needed
                    kernel_kept = minimal_kept(kernel_kept,
                                               lambda keep: self.within(real(keep)))
                score_kernels = real(kernel_kept)
                kept = kept + kernel_kept
                score_final = score(set(groups) - set(kept))
        accepted = accepted_with(set(kept))
        for p in accepted if apply else ():
            p.apply()
        return Decision(accepted, [p for p in chosen if p.key in kept] + unmeasured,
                        dict(self.targets), score_all, score_final, evaluations(), sensitivity,
                        kept + idle, kernel_kept, score_kernels, len(measured),
                        errors[0] if errors else None, idle, idle_branches)

    def unexercised(self, graph: gs.Graph, template: onnx.ModelProto,
                    proposals: list[Proposal]) -> tuple[list[str], list[str]]:
        """The groups of ``proposals`` (in order) that no feed of the budget can measure, and
        the branches they act in (``onnxopt.graph.branch_labels``, for messages): every
        proposal of the group acts only inside If branches that none of the feeds takes (a
        simulated proposal's ``scope``, the graphs of a weight's readers); see the module
        docstring. Costs one instrumented run over the feeds when any proposal acts in an If
        branch (``onnxopt.analyses.activations.branches_run``).

        Raises:
            InputError: onnxruntime cannot load or run the instrumented model.
        """
        from onnxopt.analyses.activations import branches_run

        owner: dict[int, gs.Graph | None] = {}
        for g, _, in_branches in branch_scopes(graph):
            for node in g.nodes:  # None: the main graph, or a Loop/Scan body (not judged)
                owner[id(node)] = g if in_branches and g is not graph else None
        branches = {id(g): g for g in owner.values() if g is not None}

        def places(p: Proposal) -> list[gs.Graph | None]:
            if p.simulate is not None:
                return [p.scope if p.scope is not None and id(p.scope) in branches else None]
            return [owner.get(id(n)) for n in p.tensor.outputs] or [None]

        where = {id(p): places(p) for p in proposals}
        used = {id(g): g for ps in where.values() for g in ps if g is not None}
        if not used:
            return [], []
        ran = branches_run(graph, template, used.values(), self.feeds)
        idle = {p.key for p in proposals}
        for p in proposals:
            if any(g is None or id(g) in ran for g in where[id(p)]):
                idle.discard(p.key)
        untaken = {id(g): g for p in proposals if p.key in idle for g in where[id(p)]}
        return ([k for k in dict.fromkeys(p.key for p in proposals) if k in idle],
                branch_labels(graph, untaken.values()))


def _outputs_copied(g: onnx.GraphProto, names: set[str], model: onnx.ModelProto) -> None:
    """Let the subgraph ``g`` return the outer-scope values ``names`` (its initializers, now
    main-graph inputs) through an ``Identity`` each: onnxruntime refuses a subgraph output that
    is an outer-scope value returned directly. Subgraph outputs bind by position, so the copy
    takes a fresh name."""
    returned = [o for o in g.output if o.name in names]
    if not returned:
        return
    fresh = NameAuthority({n for sub in graph_protos(model.graph) for n in itertools.chain(
        (i.name for i in sub.input), (i.name for i in sub.initializer),
        (o.name for o in sub.output), (o for node in sub.node for o in node.output))}).fresh
    for out in returned:
        copy = fresh(f"{out.name}_budget_returned")
        g.node.append(onnx.helper.make_node("Identity", [out.name], [copy],
                                            name=fresh(f"{out.name}_budget_Identity")))
        out.name = copy


#: The value fed to an evaluation model's input that the run does not read (the branch of
#: ``If`` not taken).
_EMPTY = {t: np.empty((0,), t) for t in (np.float32, np.int8, np.uint8)}


def _dequantized_inputs(model: onnx.ModelProto, forms: dict[str, Dequantized]
                        ) -> dict[str, tuple[str, str, list[str]]]:
    """Replace each weight ``name`` of ``forms`` (removed from the initializers) by
    ``If(gate)``: DequantizeLinear of fed codes, scale and zero point (divided by a fed row
    divisor), or the original fed as a float input; both branches' inputs are graph inputs of
    undeclared shape, the branch not taken fed empty (:data:`_EMPTY`).

    Returns ``{name: (gate input, original input, [codes, scale, zero point?, divisor?
    inputs])}``.
    """
    fresh = NameAuthority({n for g in graph_protos(model.graph) for n in itertools.chain(
        (i.name for i in g.input), (i.name for i in g.initializer),
        (o for node in g.node for o in node.output))}).fresh

    fed: dict[str, tuple[str, str, list[str]]] = {}
    nodes = []
    for name, form in forms.items():
        gate, original = fresh(f"{name}_budget_gate"), fresh(f"{name}_budget_original")
        parts = ["codes", "scale"] + ["zero_point"] * (form.zero_point is not None)
        names = [fresh(f"{name}_budget_{part}") for part in parts]
        codes_type = getattr(form.codes, "data_type", None) or \
            onnx.helper.np_dtype_to_tensor_dtype(np.dtype(form.codes.dtype))
        types = [codes_type, onnx.TensorProto.FLOAT, codes_type][:len(names)]
        attrs = {} if form.axis is None else {"axis": form.axis}
        if form.block_size:
            attrs["block_size"] = form.block_size
        dq = fresh(f"{name}_budget_dequantized")
        then = [onnx.helper.make_node("DequantizeLinear", names, [dq], **attrs)]
        if form.row_divisor is not None:
            names.append(fresh(f"{name}_budget_divisor"))
            types.append(onnx.TensorProto.FLOAT)
            then.append(onnx.helper.make_node("Div", [dq, names[-1]],
                                              [dq := fresh(f"{name}_budget_divided")]))
        passed = fresh(f"{name}_budget_passed")
        branch = [onnx.helper.make_graph(body, f"{name}_{which}", [], [
            onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)])
            for body, out, which in ((then, dq, "dequantized"), (
                [onnx.helper.make_node("Identity", [original], [passed])], passed, "original"))]
        nodes.append(onnx.helper.make_node("If", [gate], [name], then_branch=branch[0],
                                           else_branch=branch[1]))
        model.graph.input.extend(
            [onnx.helper.make_tensor_value_info(gate, onnx.TensorProto.BOOL, []),
             onnx.helper.make_tensor_value_info(original, onnx.TensorProto.FLOAT, None)]
            + [onnx.helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)])
        fed[name] = (gate, original, names)
    if nodes:  # first: they read graph inputs only (repeated fields take no slice assignment)
        rest = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes + rest)
    return fed


#: First opset of Where; below, the gate picks by ``If``.
_WHERE_OPSET = 9


def _pick(graph: gs.Graph, gate: gs.Variable, simulated: gs.Tensor, x: gs.Tensor,
          picked: gs.Variable) -> gs.Node:
    """The node writing ``picked``: ``simulated`` where the boolean scalar ``gate`` is true,
    else ``x`` -- ``Where`` (opset 9 on), or ``If`` whose branches pass the outer values through
    (every opset)."""
    if opset_version(graph) >= _WHERE_OPSET:
        return gs.Node("Where", fresh_name(graph, "budget_where"),
                       inputs=[gate, simulated, x], outputs=[picked])
    branches = {}
    for key, source in (("then_branch", simulated), ("else_branch", x)):
        out = gs.Variable(fresh_name(graph, f"{picked.name}_{key}"), picked.dtype, picked.shape)
        branches[key] = gs.Graph(nodes=[gs.Node("Identity", fresh_name(graph, "budget_pass"),
                                                inputs=[source], outputs=[out])],
                                 outputs=[out], name=fresh_name(graph, key),
                                 opset=graph.opset)
    return gs.Node("If", fresh_name(graph, "budget_if"), attrs=branches, inputs=[gate],
                   outputs=[picked])


def _evaluation_model(graph: gs.Graph, template: onnx.ModelProto, simulated: list[Proposal]
                      ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """``graph`` exported with every simulated proposal gated (see the module docstring), and
    the gate input of each group; the graph is restored exactly before returning
    (``onnxopt.graph.edits_undone``).

    A proposal in a subgraph (``scope``) gets its simulation and ``Where`` in that subgraph,
    reading the gate -- a main-graph input -- from the outer scope; while ``simulate`` runs, the
    subgraph borrows the main graph's name authority, so that every new name is fresh in the
    whole model.
    """
    if not simulated:
        return export_graph(graph, template), {}
    from onnxopt.names import _ATTR

    # the readers a proposal reaches by default are those of the graph as given, not another
    # proposal's simulation nodes
    known = {id(n) for g in iter_graphs(graph) for n in g.nodes}
    gates: dict[str, gs.Variable] = {}
    with edits_undone(graph):
        for p in simulated:
            x, scope = p.tensor, p.scope if p.scope is not None else graph
            readers = p.readers if p.readers is not None else [
                (n, i) for n in list(x.outputs) if id(n) in known
                for i, t in enumerate(n.inputs) if t is x]
            if p.key not in gates:
                gates[p.key] = gs.Variable(fresh_name(graph, "budget_gate"), dtype=np.bool_,
                                           shape=[])
                graph.inputs.append(gates[p.key])
            if scope is not graph:
                setattr(scope, _ATTR, NameAuthority.of(graph))
            simulated_x = p.simulate(scope, x)
            picked = gs.Variable(fresh_name(graph, f"{x.name}_budget"), dtype=x.dtype,
                                 shape=x.shape)
            scope.nodes.append(_pick(graph, gates[p.key], simulated_x, x, picked))
            for node, index in readers:
                node.inputs[index] = picked
        return export_graph(graph, template), {k: g.name for k, g in gates.items()}


#: Up to this many groups, the kept set is found by ranking (:func:`ranked_kept`, ``|G|``
#: evaluations up front); above, by delta debugging (:func:`minimal_kept`, ``2 |K| log2 |G|``),
#: which is cheaper when few of many groups must stay float (slanet_en: 5 of 120 weights).
RANKED_MAX_GROUPS = 64
#: Feeds the ranking measures each group on (the order is what matters; the bisection and the
#: 1-minimal check that follow run every feed).
RANKING_FEEDS = 4


def ranked_kept(groups: list[str], gain: Callable[[str], float],
                within: Callable[[set[str]], tuple[bool, dict]],
                size: Callable[[str], int] | None = None) -> tuple[list[str], dict]:
    """The groups to leave float, by sensitivity ranking, and the cost of each.

    1. rank the groups by ``gain(g)`` -- the first criterion's value with every group applied but
       ``g`` (higher: leaving ``g`` float helps more), ``|G|`` evaluations (on the first
       :data:`RANKING_FEEDS` feeds, in :meth:`DriftBudget.decide`);
    2. find by bisection the shortest prefix of the ranking whose groups, left float, bring the
       rest within budget (``log2 |G|`` evaluations; the budget is close to monotone in the
       prefix, and step 3 repairs where it is not);
    3. make the set 1-minimal: put each kept group back, least gain first (with ``size``: the
       largest first, ties by least gain), when the budget still holds (``|K|`` evaluations);
       the value measured for a group that must stay float is its *sensitivity*: every
       criterion with the accepted set plus that group.

    Ranking first is the mixed-precision search of accuracy-aware quantizers (NNCF's accuracy
    control ranks layers by their contribution); putting back one at a time guarantees that every
    kept group is needed. Cost ``|G| + log2 |G| + |K|`` evaluations, against
    ``2 |K| log2 |G|`` for delta debugging, which is slower when many groups must stay float.

    Args:
        groups: the group names.
        gain: scalar to rank by (called once per group).
        within: ``within(leave_out) -> (holds, measured criteria)``.
        size: what accepting a group saves (its weights' elements), for a decision whose goal is
            size (weight-only proposals): groups put back early get the budget's headroom, and
            where the drift is a cliff -- slanet_en's decoder, whose greedy decode turns
            different after any of several perturbations -- which group takes it is decided by
            the order alone; None: least gain first.

    Returns:
        ``(kept, sensitivity)``: the groups left float, in ranking order, and their measured
        criteria. When even leaving every group float does not hold, all are kept.
    """
    ranking = sorted(groups, key=lambda g: -gain(g))
    holds, _ = within(set(ranking))
    if not holds:
        return ranking, {}
    kept = ranking[:shortest_prefix(len(ranking), lambda k: within(set(ranking[:k]))[0])]
    sensitivity: dict[str, dict] = {}
    order = list(reversed(kept))
    if size is not None:
        order.sort(key=lambda g: -size(g))  # stable: ties stay least gain first
    for g in order:
        trial = set(kept) - {g}
        holds, measured = within(trial)
        if holds:
            kept.remove(g)
        else:
            sensitivity[g] = measured
    return kept, sensitivity


def _group_sizes(chosen: list[Proposal]) -> Callable[[str], int] | None:
    """``size(group)``: the elements of a group's weights, when every proposal is a weight
    proposal (a decision whose goal is size: pruning, clustering, weight-only quantization);
    None when any is simulated (activations quantized or cast: the goal is speed too)."""
    if any(p.simulate is not None for p in chosen):
        return None
    sizes: dict[str, int] = collections.Counter()
    for p in chosen:
        sizes[p.key] += int(np.prod(p.tensor.shape or (), dtype=np.int64))
    return sizes.__getitem__


def shortest_prefix(n: int, holds: Callable[[int], bool]) -> int:
    """The smallest ``k`` in ``[1, n]`` with ``holds(k)``, by bisection (``holds(n)`` assumed;
    ``holds`` close to monotone, ``log2 n`` calls)."""
    low, high = 1, n
    while low < high:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid + 1
    return high


def minimal_kept(names: list[str], within_budget: Callable[[list[str]], bool]) -> list[str]:
    """A 1-minimal sublist ``K`` of ``names`` with ``within_budget(K)`` true, by ddmin: remove
    chunks of ``K`` (halves, then quarters, ...; the first in ``names``' order tried first, so
    they get the budget's headroom) while the predicate holds. If even
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


def _first(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names``, comma-separated, with ", ..." when there are more."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def lossy_warnings(pass_name: str, modified: bool, decision: dict | None, criteria: str,
                   refused: dict | None = None, branches: list[str] = ()) -> list[str]:
    """What a lossy pass tells the user when it did less than asked: the groups the drift
    budget left unchanged (``decision["kept"]``, see :meth:`Decision.report`) to keep
    ``criteria`` (:meth:`DriftBudget.describe`) or because no feed could measure them, the
    ``refused`` reasons that name If branches (nodes no calibration or validation feed
    reached; ``branches`` names them), and when nothing changed at all, every ``refused``
    reason."""
    unexercised = decision.get("unexercised", []) if decision else []
    kept = [g for g in decision["kept"] if g not in unexercised] if decision else []
    warnings = []
    if unexercised:
        labels = decision.get("unexercised_branches") or []
        which = f" ({_first(labels)})" if labels else ""
        warnings.append(f"{pass_name} left {len(unexercised)} tensor(s) or group(s) unchanged "
                        f"in If branches that no validation feed takes{which} (the drift budget "
                        f"cannot measure them; give --inputs that take them): "
                        f"{_first(unexercised)}")
    if kept:
        warnings.append(f"{pass_name} left {len(kept)} tensor(s) or group(s) unchanged to keep "
                        f"every output's {criteria}: {_first(kept)}")
    untaken = {k: v for k, v in (refused or {}).items() if "If branch" in k}
    if untaken and modified:  # a pass that changed nothing says all its reasons below
        why = ", ".join(f"{k}: {v}" for k, v in untaken.items())
        which = f" in {_first(branches)}" if branches else ""
        warnings.append(f"{pass_name} left nodes of If branches unchanged{which} ({why}); give "
                        f"--calibration-data and --inputs whose feeds take those branches")
    if not modified:
        why = ", ".join(f"{k}: {v}" for k, v in (refused or {}).items())
        warnings.insert(0, f"{pass_name} changed nothing" + (f" ({why})" if why else ""))
    return warnings
