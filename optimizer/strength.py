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

**Candidate evaluations on Ray.** With the Ray executor (:func:`use_executor`: ``onnxopt
optimize --executor ray``, ``onnxopt.optimize(executor="ray")``, and each model's job of a batch
on Ray), the bisection's scores are Ray tasks, several at once: a *speculative bisection*. The
points of the bisection's decision tree below the current interval are taken breadth first
(the next point, then the two points that may follow it, ...) and kept in flight, up to the
cluster's CPUs and :data:`CANDIDATE_COPIES` copies of the model's weights each within
``onnxopt.batch.memory_budget()``. The pass still runs in this process, one setting at a time
(proposals are closures over the live graph); what a task gets is self-contained: the graph
before the pass serialized once per search and shared by every task (the Ray object store),
and the candidate's proposed values (``{initializer: array}``). The task imports the graph again,
makes the proposals anew (``export_graph`` of the imported graph is the same model byte for
byte) and scores them with the run's drift budget, references included, by
:meth:`~onnxopt.budget.DriftBudget.evaluate`: the code of the local run, on the same model, with
the same numpy BLAS thread settings (:func:`_blas_env`; the cosine's dot products sum in an
order that depends on them), so the scores are the local run's to the last bit. The decisions
are then replayed in the sequential order: a point's verdict is read only when the sequential
bisection would visit it, the path records exactly the points it would visit, and a point that
falls out of the interval is cancelled, its result unread (an error too: it is raised only when
its point is visited). The chosen setting, the path, the per-layer upgrades (the budget's
decisions, run here as before) and the output are those of the local run. Proposals that
simulate (a gated subgraph, not a value) and models whose graph cannot be serialized in one
protobuf (over 2 GiB without external data) are scored in this process. A local Ray cluster
started for a search (no ``RAY_ADDRESS``, Ray not initialized) lives for that search, on
loopback only (``onnxopt.ray_cluster``). On a cluster of several machines, every node needs
onnxopt and the model's external data files under the same path, and a node with another CPU
count may score differently in the last bits (the BLAS threads follow this process's).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import copy
import dataclasses
import os
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import external, io, ray_cluster
from onnxopt.budget import Decision, Proposal
from onnxopt.errors import OnnxoptError, UsageError
from onnxopt.graph import export_graph, import_graph, iter_graphs

if TYPE_CHECKING:
    from onnxopt.pass_manager import Pass, PassContext, PassResult

#: Rounds of per-layer upgrades after the bisection (each offers the next stronger value).
UPGRADE_STEPS = 2
#: Copies of the model's weights one candidate evaluation on Ray holds (its proposed values in
#: the object store, the task's imported graph, its session's): with the cluster's CPUs, this
#: bounds the evaluations in flight to ``memory_budget() // (CANDIDATE_COPIES * weights)``.
CANDIDATE_COPIES = 3

#: The executor of this context's strength searches: ``(kind, Ray address)``, see
#: :func:`use_executor`.
_EXECUTOR: contextvars.ContextVar[tuple[str, str | None]] = contextvars.ContextVar(
    "onnxopt_strength_executor", default=("local", None))


def use_executor(executor: str = "local", ray_address: str | None = None) -> None:
    """Make the strength searches of the current context score their candidates in this process
    (``"local"``) or as Ray tasks (``"ray"``, on the cluster at ``ray_address``, else
    ``$RAY_ADDRESS``, else the one this process is connected to, else a local one started for
    each search), see the module docstring. The API runs each call in a context of its own.

    Raises:
        UsageError: an unknown executor; Ray is not installed; a Ray address for the local
            executor.
    """
    ray_cluster.check_executor(executor, ray_address)
    _EXECUTOR.set((executor, ray_address))


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

    def run_at(i: int) -> tuple["Pass", "PassResult"]:
        if i not in runs:
            inst = type(p)(dataclasses.replace(p.options, **{p.strength: ladder[i]}))
            result = execute(inst, graph, ctx)
            for proposal in result.proposals:
                proposal.source = p.name
            runs[i] = (inst, result)
        return runs[i]

    kind, address = _EXECUTOR.get()
    if kind == "ray":
        with ray_cluster.connected(address) as ray:
            low, high, path = _bisect(ladder, run_at, runs, sizes,
                                      _OnRay(ray, graph, ctx, sizes))
    else:
        low, high, path = _bisect(ladder, run_at, runs, sizes, _InProcess(graph, ctx))
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


def _bisect(ladder: tuple, run_at, runs: dict, sizes: "_Sizes", evaluations
            ) -> tuple[int, int, list[dict[str, Any]]]:
    """Bisect ``ladder`` for the strongest setting within budget (``ladder[low]``; -1: none;
    ``ladder[high]`` is not), scoring candidates with ``evaluations`` (``width`` in flight,
    ``submit(proposals) -> Future of (scores, within)``, ``wait(futures)`` until one is done,
    ``cancel(future)``); return ``low``, ``high`` and the path (see the module docstring: the
    decisions are the sequential bisection's, whatever ``width``)."""
    path: list[dict[str, Any]] = []
    scored: dict[int, cf.Future] = {}
    flight: dict[int, cf.Future] = {}
    rows: dict[int, dict[str, Any]] = {}

    def submit(i: int) -> None:
        try:
            _, result = run_at(i)
        except OnnxoptError as err:  # raised when (and if) the bisection visits this point
            scored[i] = cf.Future()
            scored[i].set_exception(err)
            return
        rows[i] = {**sizes.of(result.proposals), "proposals": len(result.proposals)}
        flight[i] = evaluations.submit(result.proposals)

    low, high = -1, len(ladder)
    try:
        while high - low > 1:
            mid = (low + high) // 2
            if mid not in scored and mid not in flight:
                submit(mid)
            for i in _bisection_points(low, high):
                if len(flight) >= evaluations.width:
                    break
                if i not in scored and i not in flight:
                    submit(i)
            while mid not in scored:
                evaluations.wait(list(flight.values()))
                for i in [i for i, f in flight.items() if f.done()]:
                    scored[i] = flight.pop(i)
            scores, ok = scored[mid].result()
            path.append({"setting": ladder[mid], **{k: float(v) for k, v in scores.items()},
                         "within": bool(ok), **rows[mid]})
            if ok:
                low = mid
            else:
                high = mid
            for i in [i for i in flight if not low < i < high]:
                evaluations.cancel(flight.pop(i))
            for i in [i for i in runs if i < low or i > high + 1]:
                del runs[i]  # proposals hold whole weight arrays: keep what may still be needed
    finally:
        for future in flight.values():
            evaluations.cancel(future)
    return low, high, path


def _bisection_points(low: int, high: int) -> Iterator[int]:
    """The points the bisection of the open interval ``(low, high)`` may visit, breadth first:
    its next point, then the next points of both halves, and so on."""
    queue = deque([(low, high)])
    while queue:
        lo, hi = queue.popleft()
        if hi - lo > 1:
            mid = (lo + hi) // 2
            yield mid
            queue.extend([(lo, mid), (mid, hi)])


class _InProcess:
    """Candidates scored here, one at a time, when submitted (the local executor)."""

    width = 1

    def __init__(self, graph: gs.Graph, ctx: "PassContext") -> None:
        self.graph, self.ctx = graph, ctx

    def submit(self, proposals: list[Proposal]) -> cf.Future:
        future: cf.Future = cf.Future()
        try:
            future.set_result(self.ctx.budget.evaluate(self.graph, self.ctx.template,
                                                       proposals))
        except OnnxoptError as err:
            future.set_exception(err)
        return future

    def wait(self, futures: list[cf.Future]) -> None:
        cf.wait(futures, return_when=cf.FIRST_COMPLETED)

    def cancel(self, future: cf.Future) -> None:
        pass


class _OnRay:
    """Candidates scored as Ray tasks (:func:`_evaluate_candidate`), see the module docstring.

    Args:
        ray: the connected ``ray`` module (``onnxopt.ray_cluster.connected``).
        sizes: the graph's initializers (their bytes bound the evaluations in flight).
    """

    def __init__(self, ray, graph: gs.Graph, ctx: "PassContext", sizes: "_Sizes") -> None:
        from onnxopt.batch import memory_budget

        self._ray, self._here = ray, _InProcess(graph, ctx)
        base = io.serialize(export_graph(graph, ctx.template))
        self._refs: dict[cf.Future, Any] = {}
        if base is None:  # over the protobuf limit in one piece: scored here
            self.width, self._base = 1, None
            return
        ctx.budget.references()  # computed once, here, and shipped with the budget
        budget = copy.copy(ctx.budget)
        budget.original = None  # the references stand for it
        self._budget, self._base = ray.put(budget), ray.put(base)
        folder = external.current_folder()
        self._folder = None if folder is None else str(folder)
        weights = max(1, sum(t.values.nbytes for t in sizes.constants.values()))
        memory = memory_budget()
        self.width = max(1, min(int(ray.cluster_resources().get("CPU", 1)),
                                memory // (CANDIDATE_COPIES * weights) if memory else 1 << 30))
        self._task = ray.remote(num_cpus=1, runtime_env={"env_vars": _blas_env()})(
            _evaluate_candidate)

    def submit(self, proposals: list[Proposal]) -> cf.Future:
        if self._base is None or any(q.simulate is not None for q in proposals):
            return self._here.submit(proposals)
        values: dict[str, np.ndarray] = {}
        for q in proposals:  # one value per initializer: the first proposal's (the budget's)
            if q.name not in values:
                values[q.name] = q.array()
        future: cf.Future = cf.Future()
        self._refs[future] = self._task.remote(self._budget, self._base, self._folder, values)
        return future

    def wait(self, futures: list[cf.Future]) -> None:
        """Until one of ``futures`` is done, in ``ray.wait``: a task waiting there (a batch's
        model job on Ray) lends its CPU to the evaluations it waits for."""
        if any(f.done() for f in futures):
            return
        ready, _ = self._ray.wait([self._refs[f] for f in futures], num_returns=1)
        for future in [f for f in futures if self._refs[f] in ready]:
            ref = self._refs.pop(future)
            try:
                outcome = self._ray.get(ref)
            except Exception as err:  # noqa: BLE001 -- the task's failure is this candidate's
                outcome = err
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def cancel(self, future: cf.Future) -> None:
        ref = self._refs.pop(future, None)
        if ref is not None:
            self._ray.cancel(ref)


def _blas_env() -> dict[str, str]:
    """This process's BLAS thread settings, for the evaluation tasks' workers (Ray starts a
    one-CPU task's worker with ``OMP_NUM_THREADS=1``; numpy's OpenBLAS here uses one thread per
    CPU unless told otherwise)."""
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS") if k in os.environ}
    from onnxopt.batch import cpu_count

    env.setdefault("OMP_NUM_THREADS", str(cpu_count()))
    return env


def _evaluate_candidate(budget, base: bytes, folder: str | None,
                        values: dict[str, np.ndarray]):
    """A Ray task: ``budget.evaluate`` of the graph serialized in ``base`` with its
    initializers ``values`` proposed (``(scores, within)``), or the OnnxoptError it raised
    (returned, so that the caller raises it with its own message). ``folder``: the run's
    external-data folder."""
    def score():
        external.use_folder(folder)
        model = onnx.ModelProto.FromString(base)
        graph = import_graph(model)
        tensors = {t.name: t for g in iter_graphs(graph) for t in g.tensors().values()}
        proposals = [Proposal(tensors[name], value, _never_applied)
                     for name, value in values.items()]
        try:
            return budget.evaluate(graph, model, proposals)
        except OnnxoptError as err:
            return err

    return contextvars.copy_context().run(score)


def _never_applied() -> None:
    raise AssertionError("a candidate scored on Ray is never applied there")


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
    """The result's latency against the model before the pass (``ctx.template``):
    :func:`onnxopt.validate.latency_ratio_apart` on the first feed, in a child process (the
    default session it times can crash where validation's does not). A model with external
    data, or over the protobuf limit, is not timed; then, or when the timing fails,
    ``latency_note`` says why and there is no ``latency_ratio``."""
    if not ctx.feeds or ctx.template is None:
        return {}
    from onnxopt import external, io
    from onnxopt.graph import export_graph
    from onnxopt.validate import latency_ratio_apart

    models = (ctx.template, export_graph(graph, ctx.template))
    data = [None if external.has_external_data(m) else io.serialize(m) for m in models]
    if None in data:
        return {"latency_note": "not timed: external data, or over the protobuf limit"}
    measured = latency_ratio_apart(*data, ctx.feeds[0], what=("model before the pass",
                                                               "model after the pass"))
    return measured if isinstance(measured, dict) else {"latency_note": f"not timed: {measured}"}
