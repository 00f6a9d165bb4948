"""Benchmark onnxopt against peer ONNX optimizers on every fetched zoo model.

    pip install onnxsim onnxslim onnxoptimizer        # or: pip install -r tools/bench_peers.txt
    python tools/benchmark.py [--models NAME ...] [--tools onnxopt,onnxslim,...] [--repeat 3]
                              [--timeout 300] [--json results.json] [--output-dir DIR]
                              [--latency-budget 10] [--threads 1]

The peers are benchmark-only: they are never dependencies of onnxopt, and a peer that is not
installed shows as "n/a". Each tool runs as a whole process, so interpreter start and imports are
inside the measured wall time; the median over ``--repeat`` runs is reported. The commands:

* onnxopt:       ``onnxopt optimize IN -o OUT --inputs NPZ --quiet`` (its validation on).
* onnxopt-unchecked: the same without validation (``--no-validate``): the cost of the safety
                 net (validation and, when it fails, rollback) is onnxopt / onnxopt-unchecked.
* onnxsim:       ``onnxsim IN OUT`` (no check: its ``check_n`` defaults to 0, and its default
                 ``certify`` needs z3-solver, which it does not depend on).
* onnxslim:      ``onnxslim IN OUT`` (no check: ``--model-check`` is off by default).
* onnxoptimizer: ``python -m onnxoptimizer IN OUT`` (its fuse-and-elimination passes, no check).
* ort-basic:     onnxruntime saving its ORT_ENABLE_BASIC graph (``optimized_model_filepath``,
                 initializers of 1 KiB or more in ``OUT.data``).

A non-zero exit or a missing output is "crash", except onnxopt's exit 1, which means its own
validation refused the result and is shown as "refused"; a run over ``--timeout`` seconds is
"timeout". Every produced model gets node counts (main graph, and total with subgraphs) and a
drift verdict computed here, not by the tool: the original and the output run on onnxruntime CPU
with ``models/zoo/<name>.inputs.npz``; "pass" when output names, shapes and dtypes match and every
output is allclose (atol 1e-4, rtol 1e-3), "fail" otherwise (also when the output cannot run), and
"load error" when onnxruntime cannot load it.

Inference latency of the outputs: the original and every output that passed the drift check
run in onnxruntime CPU sessions with the default graph optimizations (``ORT_ENABLE_ALL``),
``--threads`` intra-op threads, on the model's stored inputs. The runs are interleaved (one run
of each model per round, in an order shuffled per round, after two warm-up runs each), so a
change in machine load falls on all of them alike and no model keeps a slot the rhythm of the
load favours; rounds go on until ``--latency-budget`` seconds are spent (at least 5,
at most 200), and the fastest run per model is reported as a ratio to the original's (the
median is in the JSON; on a shared machine it measures the wait for a core more than the model).

Two markdown tables go to stdout, progress to stderr. The first: per tool, nodes, wall time and
drift verdict. The second: per model, the nodes onnxopt leaves against every peer's, onnxopt's
latency as a ratio to the original, and per peer onnxopt's latency over that peer output's
(above 1: the peer's output runs faster). Below them: the median over models of onnxopt time /
onnxslim time, the models where onnxopt leaves more nodes (total) than a drift-passing peer, and
those where a peer's output runs more than ``LATENCY_NOISE`` faster, each with the difference in
op counts between onnxopt's output and that peer's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import zoo  # noqa: E402  (needs the repo root on sys.path when run as a script)

ATOL, RTOL = 1e-4, 1e-3
DEFAULT_TIMEOUT = 300.0
#: Latency differences below this fraction are within the noise of a shared 2-core machine.
LATENCY_NOISE = 0.05
WARMUP_RUNS, MIN_ROUNDS, MAX_ROUNDS = 2, 5, 200
# The initializers go to OUT.data beside the output: otherwise the output of a model with
# external data refers to the input's data file by a path relative to the output's folder.
ORT_BASIC_SCRIPT = (
    "import os, sys, onnxruntime as ort\n"
    "options = ort.SessionOptions()\n"
    "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
    "options.optimized_model_filepath = sys.argv[2]\n"
    "options.add_session_config_entry('session.optimized_model_external_initializers_file_name',"
    " os.path.basename(sys.argv[2]) + '.data')\n"
    "ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])\n"
)


@dataclass(frozen=True)
class Tool:
    """One optimizer as a command line: ``argv(IN, OUT, NPZ)``.

    ``module`` is the Python module whose presence makes the tool available, ``distribution``
    the pip name whose version is reported, ``refusal_codes`` the exit codes that mean the tool
    checked its own output and declined to write it (not a crash).
    """

    name: str
    label: str
    module: str
    distribution: str
    argv: tuple[str, ...]
    refusal_codes: tuple[int, ...] = ()

    def command(self, source: Path, output: Path, inputs: Path) -> list[str]:
        values = {"IN": str(source), "OUT": str(output), "NPZ": str(inputs)}
        return [values.get(part, part) for part in self.argv]

    def version(self) -> str | None:
        """The installed version, or None when the tool cannot run here."""
        if importlib.util.find_spec(self.module) is None or _executable(self.argv[0]) is None:
            return None
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"


TOOLS = (
    Tool("onnxopt", "onnxopt", "onnxopt", "onnxopt",
         ("onnxopt", "optimize", "IN", "-o", "OUT", "--inputs", "NPZ", "--quiet"),
         refusal_codes=(1,)),
    Tool("onnxopt-unchecked", "onnxopt --no-validate", "onnxopt", "onnxopt",
         ("onnxopt", "optimize", "IN", "-o", "OUT", "--no-validate", "--quiet")),
    Tool("onnxsim", "onnxsim", "onnxsim", "onnxsim", ("onnxsim", "IN", "OUT")),
    Tool("onnxslim", "onnxslim", "onnxslim", "onnxslim", ("onnxslim", "IN", "OUT")),
    Tool("onnxoptimizer", "onnxoptimizer", "onnxoptimizer", "onnxoptimizer",
         ("python", "-m", "onnxoptimizer", "IN", "OUT")),
    Tool("ort-basic", "ORT basic", "onnxruntime", "onnxruntime",
         ("python", "-c", ORT_BASIC_SCRIPT, "IN", "OUT")),
)
TOOLS_BY_NAME = {tool.name: tool for tool in TOOLS}


def _executable(name: str) -> str | None:
    """``python`` is this interpreter; other names are looked up beside it first, then on PATH."""
    if name == "python":
        return sys.executable
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@dataclass
class Drift:
    """Our comparison of a tool's output with the original on onnxruntime CPU."""

    verdict: str  # "pass" | "fail" | "load error"
    max_abs_error: float | None = None
    detail: str = ""


@dataclass
class Run:
    """One tool on one model: status, median wall time, and what its output looks like."""

    tool: str
    status: str  # "ok" | "crash" | "refused" | "timeout" | "n/a"
    seconds: list[float] = field(default_factory=list)
    median_seconds: float | None = None
    nodes: int | None = None
    total_nodes: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    drift: Drift | None = None
    latency_ms: float | None = None  # fastest interleaved run (measure_latency)
    latency_median_ms: float | None = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "ok" and self.drift is not None and self.drift.verdict == "pass"


@dataclass
class ModelResult:
    model: str
    nodes: int
    total_nodes: int
    runs: dict[str, Run]
    ops: dict[str, int] = field(default_factory=dict)
    latency_ms: float | None = None  # fastest interleaved run (measure_latency)
    latency_median_ms: float | None = None
    latency_rounds: int = 0


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            found.extend(attribute.graphs)
    return found


def count_nodes(graph: onnx.GraphProto) -> tuple[int, int]:
    """(nodes of ``graph``, nodes of ``graph`` plus every nested subgraph, e.g. If/Loop bodies)."""
    total = len(graph.node)
    for node in graph.node:
        total += sum(count_nodes(subgraph)[1] for subgraph in _subgraphs(node))
    return len(graph.node), total


def count_ops(graph: onnx.GraphProto) -> Counter:
    """Nodes per op type (``domain::op`` outside the default domain), subgraphs included."""
    counts = Counter(f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx")
                     else node.op_type for node in graph.node)
    for node in graph.node:
        for subgraph in _subgraphs(node):
            counts += count_ops(subgraph)
    return counts


def model_node_counts(path: Path) -> tuple[int, int, dict[str, int]]:
    """(main-graph nodes, nodes with subgraphs, nodes per op type) of the model at ``path``."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return (*count_nodes(graph), dict(count_ops(graph)))


def session_for(path: Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on ``path`` with onnxruntime's default graph optimizations; ``threads``
    intra-op threads (0: onnxruntime's default). Warnings (e.g. unused initializers) would
    drown the progress, so only errors are logged."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], budget: float,
                    threads: int) -> tuple[dict[str, tuple[float, float]], int]:
    """(fastest, median) milliseconds per run of each model in ``paths`` (keyed by any label),
    and the number of rounds.

    Runs are interleaved: each round runs every model once, in an order shuffled per round
    (fixed seed), so load on the machine falls on all of them alike, whatever its rhythm;
    rounds go on until ``budget`` seconds of runs are spent (``MIN_ROUNDS`` to ``MAX_ROUNDS``),
    after ``WARMUP_RUNS`` untimed runs each. A model onnxruntime cannot load or run is left out
    of the result. On a machine shared with other work, the median carries the time the
    process waited for a core (a 1.7 ms run had a median of 25 ms at load 10 on 2 cores); the
    fastest run does not, and is what the tables compare.
    """
    runners = {}
    for label, path in paths.items():
        try:
            session = session_for(path, threads)
            feed = {i.name: feeds[i.name] for i in session.get_inputs()}
            for _ in range(WARMUP_RUNS):
                session.run(None, feed)
        except Exception as exc:  # onnxruntime raises several unrelated types
            _progress(f"  latency: {label} left out: {_one_line(exc)}")
            continue
        runners[label] = (session, feed)
    times: dict[str, list[float]] = {label: [] for label in runners}
    order, shuffle = list(runners), random.Random(0).shuffle
    spent, rounds = 0.0, 0
    while runners and rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or spent < budget):
        shuffle(order)
        for label in order:
            session, feed = runners[label]
            started = time.perf_counter()
            session.run(None, feed)
            elapsed = time.perf_counter() - started
            times[label].append(elapsed)
            spent += elapsed
        rounds += 1
    return {label: (min(values) * 1e3, statistics.median(values) * 1e3)
            for label, values in times.items()}, rounds


def run_on_ort(session: ort.InferenceSession,
               feeds: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """Output names and values of ``session``, fed the inputs it declares.

    Raises whatever onnxruntime raises; a declared input missing from ``feeds`` is a KeyError.
    """
    feed = {declared.name: feeds[declared.name] for declared in session.get_inputs()}
    names = [output.name for output in session.get_outputs()]
    return names, session.run(names, feed)


def compare(reference: tuple[list[str], list[np.ndarray]], candidate: Path,
            feeds: dict[str, np.ndarray]) -> Drift:
    """The drift verdict of ``candidate`` against the original's ``reference`` outputs."""
    try:
        session = session_for(candidate)
    except Exception as exc:  # onnxruntime raises several unrelated types for a bad model
        return Drift("load error", detail=_one_line(exc))
    try:
        names, values = run_on_ort(session, feeds)
    except Exception as exc:
        return Drift("fail", detail=f"run: {_one_line(exc)}")
    reference_names, reference_values = reference
    if names != reference_names:
        return Drift("fail", detail=f"outputs {names} != original {reference_names}")
    worst, problems = 0.0, []
    for name, expected, actual in zip(names, reference_values, values, strict=True):
        expected, actual = np.asarray(expected), np.asarray(actual)
        if expected.shape != actual.shape or expected.dtype != actual.dtype:
            problems.append(f"{name}: {actual.dtype}{list(actual.shape)} != "
                            f"{expected.dtype}{list(expected.shape)}")
            continue
        if expected.size == 0:
            continue
        expected64, actual64 = expected.astype(np.float64), actual.astype(np.float64)
        finite = np.isfinite(expected64) & np.isfinite(actual64)
        if finite.any():
            worst = max(worst, float(np.max(np.abs(expected64 - actual64)[finite])))
        if not np.allclose(actual64, expected64, atol=ATOL, rtol=RTOL, equal_nan=True):
            problems.append(f"{name}: not allclose")
    verdict = "fail" if problems else "pass"
    return Drift(verdict, max_abs_error=worst, detail="; ".join(problems))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def time_tool(tool: Tool, model: zoo.ZooModel, output: Path, repeat: int,
              timeout: float) -> Run:
    """Run ``tool`` ``repeat`` times as a subprocess; the first failure ends the repetitions."""
    argv = tool.command(model.onnx_path, output, model.inputs_path)
    argv[0] = _executable(argv[0])
    run = Run(tool.name, "ok")
    for _ in range(repeat):
        output.unlink(missing_ok=True)
        started = time.perf_counter()
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                    cwd=zoo.REPO_ROOT)
        except subprocess.TimeoutExpired:
            run.status, run.detail = "timeout", f"over {timeout:g} s"
            break
        elapsed = time.perf_counter() - started
        if result.returncode != 0 or not output.is_file():
            lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
            run.status = "refused" if result.returncode in tool.refusal_codes else "crash"
            run.detail = f"exit {result.returncode}: {lines[-1][:300] if lines else 'no output'}"
            break
        run.seconds.append(elapsed)
    if run.status == "ok":
        run.median_seconds = statistics.median(run.seconds)
    return run


def benchmark_model(model: zoo.ZooModel, tools: list[Tool], available: dict[str, str | None],
                    output_dir: Path, repeat: int, timeout: float, latency_budget: float,
                    threads: int) -> ModelResult:
    nodes, total, ops = model_node_counts(model.onnx_path)
    feeds = model.load_inputs()
    reference = run_on_ort(session_for(model.onnx_path), feeds)
    runs = {}
    for tool in tools:
        if available[tool.name] is None:
            runs[tool.name] = Run(tool.name, "n/a", detail="not installed")
            continue
        _progress(f"{model.name}: {tool.name} x{repeat}")
        output = output_dir / tool.name / f"{model.name}.onnx"
        output.parent.mkdir(parents=True, exist_ok=True)
        run = time_tool(tool, model, output, repeat, timeout)
        if run.status == "ok":
            run.nodes, run.total_nodes, run.ops = model_node_counts(output)
            run.drift = compare(reference, output, feeds)
        runs[tool.name] = run
        _progress(f"  {_cell(run)}" + (f"  [{run.detail}]" if run.detail else ""))
    result = ModelResult(model.name, nodes, total, runs, ops)
    if latency_budget > 0:
        # one output per distinct tool command: onnxopt-unchecked writes what onnxopt writes
        paths = {"original": model.onnx_path}
        paths.update({name: output_dir / name / f"{model.name}.onnx" for name, run in runs.items()
                      if run.passed and name != "onnxopt-unchecked"})
        _progress(f"{model.name}: latency of {', '.join(paths)}")
        latency, result.latency_rounds = measure_latency(paths, feeds, latency_budget, threads)
        result.latency_ms, result.latency_median_ms = latency.get("original", (None, None))
        for name, run in runs.items():
            run.latency_ms, run.latency_median_ms = latency.get(name, (None, None))
        _progress(f"  {result.latency_rounds} rounds, fastest/median: " + ", ".join(
            f"{label} {fastest:.2f}/{median:.2f} ms"
            for label, (fastest, median) in latency.items()))
    return result


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _nodes(main: int, total: int) -> str:
    return str(main) if main == total else f"{main}/{total}"


def _cell(run: Run) -> str:
    if run.status != "ok":
        return run.status
    verdict = run.drift.verdict
    if verdict == "fail" and run.drift.max_abs_error is not None:
        verdict += f" ({run.drift.max_abs_error:.1e})"
    return f"{_nodes(run.nodes, run.total_nodes)} · {run.median_seconds:.2f} s · {verdict}"


def markdown_table(results: list[ModelResult], tools: list[Tool]) -> str:
    header = ["model", "original nodes"] + [tool.label for tool in tools]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        cells = [result.model, _nodes(result.nodes, result.total_nodes)]
        cells += [_cell(result.runs[tool.name]) for tool in tools]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PEER_LABELS = {"onnxsim": "onnxsim", "onnxslim": "onnxslim", "onnxoptimizer": "onnxoptimizer",
               "ort-basic": "ORT basic"}


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "—" if numerator is None or denominator is None else f"{numerator / denominator:.2f}"


def _failure(run: Run) -> str:
    """Why ``run`` has no output worth timing: its status, or its drift verdict."""
    return run.status if run.status != "ok" else run.drift.verdict


def _peers(result: ModelResult) -> list[Run]:
    return [run for name, run in result.runs.items() if name in PEER_LABELS]


def nodes_latency_table(results: list[ModelResult], tools: list[Tool]) -> str:
    """Per model: onnxopt's total nodes and latency / original; per peer, its total nodes and
    onnxopt's latency / that peer output's ("—": the output failed or was not timed)."""
    peers = [tool.name for tool in tools if tool.name in PEER_LABELS]
    header = (["model", "original nodes · latency", "onnxopt nodes · latency / original"]
              + [f"{PEER_LABELS[name]} nodes · onnxopt latency / its" for name in peers])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        ours = result.runs.get("onnxopt")
        original = (f"{result.total_nodes} · {result.latency_ms:.2f} ms"
                    if result.latency_ms is not None else str(result.total_nodes))
        cells = [result.model, original]
        cells.append(f"{ours.total_nodes} · {_ratio(ours.latency_ms, result.latency_ms)}"
                     if ours is not None and ours.passed else (_failure(ours) if ours else "n/a"))
        for name in peers:
            run = result.runs[name]
            if not run.passed:
                cells.append(_failure(run))
                continue
            mark = "**" if ours is not None and ours.passed and run.total_nodes < ours.total_nodes \
                else ""
            cells.append(f"{mark}{run.total_nodes}{mark} · "
                         f"{_ratio(ours.latency_ms if ours else None, run.latency_ms)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def op_diff(ours: dict[str, int], theirs: dict[str, int]) -> str:
    """``Reshape +3, Unsqueeze -1``: ops onnxopt's output has more (+) or fewer (-) of."""
    keys = sorted(set(ours) | set(theirs), key=lambda op: (-abs(ours.get(op, 0)
                                                                - theirs.get(op, 0)), op))
    parts = [f"{op} {ours.get(op, 0) - theirs.get(op, 0):+d}" for op in keys
             if ours.get(op, 0) != theirs.get(op, 0)]
    return ", ".join(parts) or "same ops"


def gaps(results: list[ModelResult]) -> list[str]:
    """One line per (model, peer) where the peer's drift-passing output has fewer total nodes
    than onnxopt's, or runs more than ``LATENCY_NOISE`` faster, with the op-count difference."""
    lines = []
    for result in results:
        ours = result.runs.get("onnxopt")
        if ours is None or not ours.passed:
            continue
        for peer in _peers(result):
            if not peer.passed:
                continue
            reasons = []
            if peer.total_nodes < ours.total_nodes:
                reasons.append(f"{ours.total_nodes} vs {peer.total_nodes} nodes")
            if (ours.latency_ms is not None and peer.latency_ms is not None
                    and ours.latency_ms > peer.latency_ms * (1 + LATENCY_NOISE)):
                reasons.append(f"latency {ours.latency_ms / peer.latency_ms:.2f}x the peer's")
            if reasons:
                lines.append(f"- {result.model} vs {peer.tool}: {'; '.join(reasons)} "
                             f"(onnxopt minus {peer.tool}: {op_diff(ours.ops, peer.ops)})")
    return lines


def summary(results: list[ModelResult], tools: list[Tool]) -> list[str]:
    """The time-ratio line and the models where onnxopt is above the best passing peer."""
    names = {tool.name for tool in tools}
    lines = []
    if {"onnxopt", "onnxslim"} <= names:
        ratios = [r.runs["onnxopt"].median_seconds / r.runs["onnxslim"].median_seconds
                  for r in results
                  if r.runs["onnxopt"].status == "ok" and r.runs["onnxslim"].status == "ok"]
        lines.append(f"Median over {len(ratios)} models of onnxopt time / onnxslim time: "
                     + (f"{statistics.median(ratios):.2f}" if ratios else "n/a"))
    if {"onnxopt", "onnxopt-unchecked"} <= names:
        ratios = [r.runs["onnxopt"].median_seconds / r.runs["onnxopt-unchecked"].median_seconds
                  for r in results if r.runs["onnxopt"].status == "ok"
                  and r.runs["onnxopt-unchecked"].status == "ok"]
        lines.append(f"Median over {len(ratios)} models of onnxopt time / onnxopt --no-validate "
                     "time (cost of the safety net): "
                     + (f"{statistics.median(ratios):.2f}" if ratios else "n/a"))
    if "onnxopt" in names and len(names - {"onnxopt-unchecked"}) > 1:
        above = []
        for result in results:
            ours = result.runs["onnxopt"]
            peers = [run for name, run in result.runs.items()
                     if not name.startswith("onnxopt") and run.passed]
            if not peers:
                continue
            best = min(peers, key=lambda run: run.total_nodes)
            if ours.status != "ok":
                above.append(f"{result.model} (onnxopt {ours.status}; {best.tool} "
                             f"{best.total_nodes})")
            elif ours.total_nodes > best.total_nodes:
                above.append(f"{result.model} ({ours.total_nodes} vs {best.tool} "
                             f"{best.total_nodes})")
        lines.append("onnxopt above the best drift-passing peer (total nodes): "
                     + (", ".join(above) if above else "none"))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="only these zoo models (default: every fetched one)")
    parser.add_argument("--tools", default=",".join(TOOLS_BY_NAME),
                        help=f"comma-separated subset of {','.join(TOOLS_BY_NAME)}")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per tool and model; the median is reported (default 3)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds per process before it is killed "
                             f"(default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    parser.add_argument("--output-dir", type=Path,
                        help="keep the optimized models here (default: a temp dir, removed)")
    parser.add_argument("--latency-budget", type=float, default=10.0, metavar="SECONDS",
                        help="seconds of interleaved inference runs per model (0: no latency; "
                             "default 10)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads for the latency runs (0: its default; "
                             "default 1)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.tools.split(",")) - set(TOOLS_BY_NAME))
    if unknown:
        parser.error(f"unknown tools {unknown}; choose from {','.join(TOOLS_BY_NAME)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def select_models(names: list[str] | None) -> list[zoo.ZooModel]:
    """The fetched zoo models, or those named; raises ZooError on a name that is not fetched."""
    fetched = zoo.zoo_models()
    if not names:
        return fetched
    by_name = {model.name: model for model in fetched}
    missing = sorted(set(names) - set(by_name))
    if missing:
        raise zoo.ZooError(f"not fetched (tools/fetch_models.py): {missing}")
    return [by_name[name] for name in names]


def precompile(packages: tuple[str, ...] = ("onnxopt", "onnxopt.passes")) -> None:
    """Compile onnxopt's modules to bytecode, as ``pip install`` does for every wheel (the peers'
    included): a source checkout installed in editable mode, run with PYTHONDONTWRITEBYTECODE
    set, would otherwise compile them again in every timed run (about 0.15 s)."""
    import compileall

    for name in packages:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(folder, quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = [TOOLS_BY_NAME[name] for name in args.tools.split(",")]
    if any(tool.module == "onnxopt" for tool in tools):
        precompile()
    try:
        models = select_models(args.models)
    except zoo.ZooError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    available = {tool.name: tool.version() for tool in tools}
    _progress("versions: " + ", ".join(f"{name} {version or 'n/a'}"
                                       for name, version in available.items()))
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as scratch:
        output_dir = args.output_dir or Path(scratch)
        results = [benchmark_model(model, tools, available, output_dir, args.repeat,
                                   args.timeout, args.latency_budget, args.threads)
                   for model in models]
    print(markdown_table(results, tools))
    print()
    print(f"Cells: nodes (main/total with subgraphs when they differ) · median wall time of "
          f"{args.repeat} runs · drift verdict (atol {ATOL:g}, rtol {RTOL:g}).")
    for line in summary(results, tools):
        print(line)
    if args.latency_budget > 0:
        print()
        print(nodes_latency_table(results, tools))
        print()
        print(f"Cells: total nodes (subgraphs included; bold where fewer than onnxopt's) · "
              f"latency ratio of the fastest of the interleaved runs (onnxruntime "
              f"{ort.__version__}, default optimizations, CPU, {args.threads} intra-op "
              f"thread(s), {args.latency_budget:g} s of runs per model).")
        print(f"Where a peer leaves fewer nodes or its output runs more than "
              f"{LATENCY_NOISE:.0%} faster:")
        for line in gaps(results) or ["- none"]:
            print(line)
    print("Versions: " + ", ".join(f"{name} {version or 'n/a'}"
                                   for name, version in available.items()))
    if args.json:
        payload = {"repeat": args.repeat, "timeout": args.timeout, "atol": ATOL, "rtol": RTOL,
                   "latency_budget": args.latency_budget, "threads": args.threads,
                   "versions": available, "python": sys.version.split()[0],
                   "results": [asdict(result) for result in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
