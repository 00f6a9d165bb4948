"""Benchmark onnxopt against peer ONNX optimizers on every fetched zoo model.

    pip install onnxsim onnxslim onnxoptimizer        # or: pip install -r tools/bench_peers.txt
    python tools/benchmark.py [--models NAME ...] [--tools onnxopt,onnxslim,...] [--repeat 3]
                              [--timeout 300] [--json results.json] [--output-dir DIR]

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
* ort-basic:     onnxruntime saving its ORT_ENABLE_BASIC graph (``optimized_model_filepath``).

A non-zero exit or a missing output is "crash", except onnxopt's exit 1, which means its own
validation refused the result and is shown as "refused"; a run over ``--timeout`` seconds is
"timeout". Every produced model gets node counts (main graph, and total with subgraphs) and a
drift verdict computed here, not by the tool: the original and the output run on onnxruntime CPU
with ``models/zoo/<name>.inputs.npz``; "pass" when output names, shapes and dtypes match and every
output is allclose (atol 1e-4, rtol 1e-3), "fail" otherwise (also when the output cannot run), and
"load error" when onnxruntime cannot load it.

The markdown table goes to stdout, progress to stderr. Below it: the median over models of
onnxopt time / onnxslim time, and the models where onnxopt leaves more nodes (total) than the
best peer whose output passed the drift check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import zoo  # noqa: E402  (needs the repo root on sys.path when run as a script)

ATOL, RTOL = 1e-4, 1e-3
DEFAULT_TIMEOUT = 300.0
ORT_BASIC_SCRIPT = (
    "import sys, onnxruntime as ort\n"
    "options = ort.SessionOptions()\n"
    "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
    "options.optimized_model_filepath = sys.argv[2]\n"
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
    drift: Drift | None = None
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


def count_nodes(graph: onnx.GraphProto) -> tuple[int, int]:
    """(nodes of ``graph``, nodes of ``graph`` plus every nested subgraph, e.g. If/Loop bodies)."""
    total = len(graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
            if attribute.type == onnx.AttributeProto.GRAPHS:
                subgraphs = list(attribute.graphs)
            total += sum(count_nodes(subgraph)[1] for subgraph in subgraphs)
    return len(graph.node), total


def model_node_counts(path: Path) -> tuple[int, int]:
    return count_nodes(onnx.load(str(path), load_external_data=False).graph)


def session_for(path: Path) -> ort.InferenceSession:
    """A CPU session on ``path``; warnings (e.g. unused initializers) would drown the progress."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
                    output_dir: Path, repeat: int, timeout: float) -> ModelResult:
    nodes, total = model_node_counts(model.onnx_path)
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
            run.nodes, run.total_nodes = model_node_counts(output)
            run.drift = compare(reference, output, feeds)
        runs[tool.name] = run
        _progress(f"  {_cell(run)}" + (f"  [{run.detail}]" if run.detail else ""))
    return ModelResult(model.name, nodes, total, runs)


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
    if any(tool.module == "optimizer" for tool in tools):
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
                                   args.timeout) for model in models]
    print(markdown_table(results, tools))
    print()
    print(f"Cells: nodes (main/total with subgraphs when they differ) · median wall time of "
          f"{args.repeat} runs · drift verdict (atol {ATOL:g}, rtol {RTOL:g}).")
    for line in summary(results, tools):
        print(line)
    print("Versions: " + ", ".join(f"{name} {version or 'n/a'}"
                                   for name, version in available.items()))
    if args.json:
        payload = {"repeat": args.repeat, "timeout": args.timeout, "atol": ATOL, "rtol": RTOL,
                   "versions": available, "python": sys.version.split()[0],
                   "results": [asdict(result) for result in results]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
