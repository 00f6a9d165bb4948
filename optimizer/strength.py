"""Strength chosen by evaluation: search a lossy pass's strength against the drift budget.

A lossy pass with a strength (``Pass.strength``, the option's name, and ``Pass.ladder``, its
candidate values weakest first: sparsity 0.1 ... 0.9, cluster count 256 ... 4) whose strength
option is ``"auto"`` is run by :func:`search_strength` instead of once:

1. **Bisection of the ladder.** For a candidate value ``s`` the pass runs as a new instance with
   ``dataclasses.replace(options, strength=s)`` on the unchanged graph, and all its proposals
   are scored applied together (:meth:`onnxopt.budget.DriftBudget.evaluate`: every criterion's
   worst value over outputs and feeds, against the original model). Drift is *assumed monotone*
   in the ladder (a stronger setting never drifts less), so bisection finds the strongest value
   meeting the budget in ``ceil(log2(len(ladder) + 1))`` settings. When the assumption fails the
   value found still meets the budget; a stronger one further up may have been missed.
2. **Per-layer strengths.** Layers differ in sensitivity, so the next stronger value is offered
   tensor by tensor (group by group): the budget's ordinary decision
   (:meth:`~onnxopt.budget.DriftBudget.decide`) runs on the stronger setting's proposals with the
   chosen setting's as the *fallback*, so a group whose stronger proposal harms stays at the
   chosen value (not dense) and the others move up. This repeats :data:`UPGRADE_STEPS` times,
   each time offering the next value only to the groups that moved up. A stronger group is
   offered only when it replaces whole groups of the fallback (a structural edit touching a
   weight and the next layer's input must change together). A pass whose proposals change
   shapes when applied (removed channels: each setting's ``apply`` slices tensors that groups of
   other settings also cut) declares ``per_layer_strengths = False``; it is not offered per-layer
   strengths, the chosen setting is decided as usual, and ``per_layer_note`` says why.
   When no setting meets the budget, the weakest one is decided as usual (the harmful groups stay
   as they were).

The pass's own statistics are its ``summarize`` at the chosen setting, given every accepted
proposal (of whichever setting: a pass derives per-tensor figures from the accepted proposals'
values), with the ``per_tensor`` entries of upgraded tensors from their setting's summary and the
totals that sum or size-average those entries recomputed (:func:`_summary`).

The path is recorded under the pass's ``search`` statistic: for each setting tried, its value,
every criterion's worst value (for a setting outside the budget, the worst up to the first feed
on which it failed: scoring stops there), whether it is within budget, the model size (initializer bytes
with the proposals' values) and the zlib-compressed size of those initializers (level 1; a fast
estimate of what zeros and shared values buy), and the proposals' count; then the chosen value,
the per-layer upgrades (``per_layer``: group -> setting; ``upgrade_steps``: groups offered and
moved per round; ``per_layer_note`` when the pass is not offered any), and the latency of the result against the model before the pass
measured in onnxruntime (interleaved runs on the first validation feed: noisy on a shared
machine). Points tried are not timed: until applied, a candidate has the original's shapes
(a pruned channel is zeroed, not removed), so its latency is the original's by construction.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import zlib
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.budget import Decision, Proposal
from onnxopt.errors import UsageError

if TYPE_CHECKING:
    from onnxopt.pass_manager import Pass, PassContext, PassResult

#: Rounds of per-layer upgrades after the bisection (each offers the next stronger value).
UPGRADE_STEPS = 2
#: Timed runs of each model (interleaved) for the latency ratio.
LATENCY_RUNS = 5


@dataclasses.dataclass
class SearchOutcome:
    """What :func:`search_strength` did: the statistics of the pass (with ``search``), the
    budget's final decision, and whether the graph changed."""

    stats: dict[str, Any]
    decision: Decision
    modified: bool
    warnings: list[str]


def search_strength(p: "Pass", graph: gs.Graph, ctx: "PassContext",
                    execute: Callable[["Pass", gs.Graph, "PassContext"], "PassResult"]
                    ) -> SearchOutcome:
    """Search ``p``'s strength (its option ``p.strength`` is ``"auto"``), decide and apply the
    result, see the module docstring.

    Args:
        execute: runs a pass instance on the graph (the manager's, with its data checks).

    Raises:
        UsageError: the run has no drift budget (no validation inputs or ``--no-validate``), or
            the pass declares no ladder.
    """
    if ctx.budget is None:
        raise UsageError(f"pass '{p.name}': {p.strength}='auto' chooses the strength by the drift "
                         "it causes: give --max-drift and validation inputs (--inputs), not "
                         "--no-validate")
    ladder = tuple(p.ladder)
    if not ladder:
        raise UsageError(f"pass '{p.name}' has no ladder of {p.strength} values to search")
    runs: dict[int, tuple[Pass, PassResult]] = {}
    sizes = _Sizes(graph)
    path: list[dict[str, Any]] = []

    def run_at(i: int) -> tuple["Pass", "PassResult"]:
        if i not in runs:
            inst = type(p)(dataclasses.replace(p.options, **{p.strength: ladder[i]}))
            result = execute(inst, graph, ctx)
            for proposal in result.proposals:
                proposal.source = p.name
            runs[i] = (inst, result)
        return runs[i]

    def within(i: int) -> bool:
        _, result = run_at(i)
        scores, ok = ctx.budget.evaluate(graph, ctx.template, result.proposals)
        path.append({"setting": ladder[i], **{k: float(v) for k, v in scores.items()},
                     "within": bool(ok), **sizes.of(result.proposals),
                     "proposals": len(result.proposals)})
        return ok

    low, high = -1, len(ladder)  # ladder[low] meets the budget (-1: none), ladder[high] not
    while high - low > 1:
        mid = (low + high) // 2
        if within(mid):
            low = mid
        else:
            high = mid
        for i in [i for i in runs if i < low or i > high + 1]:
            del runs[i]  # proposals hold whole weight arrays: keep what may still be needed
    chosen = max(low, 0)
    inst, result = run_at(chosen)
    settings = {q.key: ladder[chosen] for q in result.proposals}
    steps: list[dict[str, Any]] = []
    per_layer_note = None
    if not getattr(p, "per_layer_strengths", True):
        per_layer_note = (f"not offered: {p.name}'s proposals change shapes when applied, so "
                          "groups of two settings cannot be mixed")
    if low < 0 or low == len(ladder) - 1 or per_layer_note is not None:
        decision = ctx.budget.decide(graph, ctx.template, result.proposals)
    else:
        decision = _upgrade(run_at, ladder, chosen, result.proposals, settings, steps, graph,
                            ctx)
    stats = _summary(inst, result, decision.accepted,
                     [(run_at(i), ladder[i]) for i in sorted(runs) if i != chosen])
    upgraded = {k: v for k, v in settings.items() if v != ladder[chosen]
                and any(a.key == k for a in decision.accepted)}
    search = {
        "option": p.strength, "ladder": list(ladder), "chosen": ladder[chosen],
        "met_budget": low >= 0, "monotone_assumed": True, "path": path,
        "per_layer": upgraded, "upgrade_steps": steps,
    }
    if per_layer_note is not None:
        search["per_layer_note"] = per_layer_note
    search.update(_latency(graph, ctx))
    stats["search"] = search
    stats["drift_budget"] = decision.report(p.name)
    if steps:  # what the last decision "kept" stays at the previous setting, not unchanged
        stats["drift_budget"]["kept"] = []
    warnings = list(result.warnings)
    if low < 0:
        warnings.append(f"{p.name}: no {p.strength} of {list(ladder)} keeps "
                        f"{ctx.budget.describe()} with every tensor changed; the weakest, "
                        f"{ladder[0]}, was decided per tensor")
    return SearchOutcome(stats, decision, result.modified or bool(decision.accepted), warnings)


def _upgrade(run_at, ladder: tuple, chosen: int, base: list[Proposal], settings: dict,
             steps: list, graph: gs.Graph, ctx: "PassContext") -> Decision:
    """Offer stronger values group by group over ``base`` (see the module docstring), apply
    the final decision and return it; ``settings`` maps each group to its value, ``steps``
    gets ``{setting, offered, moved, evaluations}`` per round."""
    fallback, candidates = list(base), None
    decision = None
    for step in range(1, UPGRADE_STEPS + 1):
        if chosen + step >= len(ladder):
            break
        _, stronger = run_at(chosen + step)
        offered = _whole_groups(stronger.proposals, fallback)
        if candidates is not None:
            offered = [q for q in offered if q.key in candidates]
        if not offered:
            break
        decision = ctx.budget.decide(graph, ctx.template, offered, fallback=fallback,
                                     apply=False)
        moved = [a for a in decision.accepted if any(a is q for q in offered)]
        for a in moved:
            settings[a.key] = ladder[chosen + step]
        steps.append({"setting": ladder[chosen + step],
                      "offered": len({q.key for q in offered}),
                      "moved": len({a.key for a in moved}),
                      "evaluations": decision.evaluations})
        fallback, candidates = decision.accepted, {a.key for a in moved}
        if not moved:
            break
    if decision is None:
        return ctx.budget.decide(graph, ctx.template, base)
    for a in decision.accepted:
        a.apply()
    return decision


def _summary(inst: "Pass", result: "PassResult", accepted: list[Proposal],
             others: list) -> dict[str, Any]:
    """The pass's statistics for a result mixing settings: its ``summarize`` at the chosen
    setting with every accepted proposal (a pass derives per-tensor figures from the accepted
    proposals' values), each ``per_tensor`` entry of a tensor taken at a stronger setting from
    that setting's own summary, and the totals recomputed from the merged entries: an integer
    that was the sum of an entry field, a float that was the ``size``-weighted mean of one
    (sparsity), and an integer that was the difference of two such sums (values pruned)."""
    stats = inst.summarize(result, list(accepted))
    per_tensor = stats.get("per_tensor")
    if not isinstance(per_tensor, dict):
        return stats
    old = [dict(e) for e in per_tensor.values() if isinstance(e, dict)]
    for (other, other_result), setting in others:
        mine = [a for a in accepted if any(a is q for q in other_result.proposals)]
        if not mine:
            continue
        theirs = other.summarize(other_result, mine).get("per_tensor", {})
        for a in mine:
            if a.name in theirs:
                per_tensor[a.name] = {**theirs[a.name], "setting": setting}
    new = [e for e in per_tensor.values() if isinstance(e, dict)]
    if len(old) != len(new):
        return stats
    sizes_old, sizes_new = [e.get("size") for e in old], [e.get("size") for e in new]
    before, recounted = dict(stats), []
    for key, value in list(stats.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not all(isinstance(e.get(key), (int, float)) for e in old + new):
            continue
        if isinstance(value, int) and value == sum(e[key] for e in old):
            stats[key] = sum(e[key] for e in new)
            recounted.append(key)
        elif isinstance(value, float) and all(isinstance(z, int) for z in sizes_old + sizes_new) \
                and sum(sizes_old) and abs(value - sum(e[key] * z for e, z in zip(old, sizes_old))
                                          / sum(sizes_old)) < 1e-9:
            stats[key] = sum(e[key] * z for e, z in zip(new, sizes_new)) / sum(sizes_new)
    for key, value in before.items():  # a difference of two recounted totals (values pruned)
        if isinstance(value, int) and not isinstance(value, bool) and key not in recounted:
            for a in recounted:
                for b in recounted:
                    if a != b and value == before[a] - before[b]:
                        stats[key] = stats[a] - stats[b]
    return stats


def _whole_groups(proposals: list[Proposal], fallback: list[Proposal]) -> list[Proposal]:
    """The weight proposals of ``proposals`` whose groups, each, replace every tensor of each
    fallback group they touch."""
    tensors: dict[str, set[str]] = {}
    for q in fallback:
        tensors.setdefault(q.key, set()).add(q.name)
    owner = {q.name: q.key for q in fallback}
    groups: dict[str, list[Proposal]] = {}
    for q in proposals:
        groups.setdefault(q.key, []).append(q)
    offered = []
    for members in groups.values():
        if any(q.simulate is not None for q in members):
            continue
        names = {q.name for q in members}
        touched = {owner[n] for n in names if n in owner}
        if all(tensors[k] <= names for k in touched):
            offered += members
    return offered


class _Sizes:
    """Initializer bytes of a candidate, raw and zlib-compressed (level 1), each unchanged
    initializer compressed once."""

    def __init__(self, graph: gs.Graph) -> None:
        self.constants = {t.name: t for t in graph.tensors().values()
                          if isinstance(t, gs.Constant) and isinstance(t.values, np.ndarray)}
        self._packed: dict[str, int] = {}

    @staticmethod
    def _pack(values: np.ndarray) -> int:
        return len(zlib.compress(np.ascontiguousarray(values).tobytes(), 1))

    def of(self, proposals: list[Proposal]) -> dict[str, int]:
        proposed = {q.name: q.array() for q in proposals if q.value is not None}
        raw = packed = 0
        for name, t in self.constants.items():
            values = proposed.get(name)
            if values is None:
                values = t.values
                if name not in self._packed:
                    self._packed[name] = self._pack(values)
                packed += self._packed[name]
            else:
                packed += self._pack(values)
            raw += values.nbytes
        return {"size_bytes": int(raw), "compressed_bytes": int(packed)}


def _latency(graph: gs.Graph, ctx: "PassContext") -> dict[str, Any]:
    """The result's latency against the model before the pass (``ctx.template``): the ratio of
    median times of :data:`LATENCY_RUNS` interleaved runs on the first feed."""
    if not ctx.feeds or ctx.template is None:
        return {}
    from onnxopt.graph import export_graph
    from onnxopt.validate import make_session

    sessions = [make_session(ctx.template, "model before the pass", optimized=True),
                make_session(export_graph(graph, ctx.template), "model after the pass",
                             optimized=True)]
    times: list[list[float]] = [[], []]
    for i in range(LATENCY_RUNS + 1):
        for k, session in enumerate(sessions):
            feed = {x.name: ctx.feeds[0][x.name] for x in session.get_inputs()}
            start = time.perf_counter()
            session.run(None, feed)
            if i:  # the first run warms up
                times[k].append(time.perf_counter() - start)
    before, after = (statistics.median(t) for t in times)
    return {"latency_ratio": after / before if before > 0 else None,
            "latency_ms": {"before": before * 1000, "after": after * 1000},
            "latency_note": f"median of {LATENCY_RUNS} interleaved onnxruntime runs on one "
                            "feed: noisy"}
