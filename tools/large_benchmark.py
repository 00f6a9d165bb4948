"""Large-model benchmark: onnxopt against copying, ``onnx.load`` + ``onnx.save`` and onnxsim.

    python tools/large_benchmark.py --dir /work/big [--models chain3g,chain8g,llama1b]
                                    [--variants copy,onnxsim,...] [--timeout 3600]
                                    [--json results.json]

Models live in ``--dir`` (default ``$ONNXOPT_BIG_DIR``) and are generated there when missing, by
the generators in ``tools/`` (they are never committed):

* ``chain3g``: ``chain3g.onnx`` = ``gen_chain.py --layers 48 --dim 4096`` (3.0 GiB).
* ``chain8g``: ``chain8g.onnx`` = ``gen_chain.py --gib 8`` (128 layers, 8.0 GiB).
* ``llama1b``: ``llama1b/llama1b.onnx`` = ``gen_llama.py --preset 1b`` (4.1 GiB, with
  ``llama1b.inputs.npz``, which onnxopt gets as ``--inputs``; the chains' inputs are synthesized).

Variants (each a whole process, so interpreter start and imports are inside its time):

* ``copy``: ``cp MODEL MODEL.data OUTDIR/``.
* ``load-save``: ``onnx.load`` then ``onnx.save`` with all tensors in one external data file.
* ``onnxsim``: ``onnxsim MODEL OUT`` (its defaults: no check run; output tensors go to external
  data above its 100 MB threshold).
* ``onnxopt``: ``onnxopt optimize MODEL -o OUT`` (default lossless pipeline, with validation).
* ``onnxopt-no-validate``: the same with ``--no-validate``.
* ``onnxopt-int8``, ``onnxopt-int4``: ``--quantize int8-weight`` / ``--quantize int4-weight``
  (with validation); by default only on the decoder.

Measurement: each variant runs as ``nice -n NICE /usr/bin/time -v -o FILE COMMAND``; its seconds
and peak RSS are GNU time's "Elapsed (wall clock) time" and "Maximum resident set size" (the
largest single process: the kernel's ``ru_maxrss``, file-backed pages of memory-mapped weights
included). GNU time does not sum a process tree, so the tree is also sampled every
``SAMPLE_SECONDS`` from ``/proc`` (sum of VmRSS of every descendant, which counts pages shared
between processes once per process): the "tree" column, and "procs", the most processes seen at
once. The data file is read once before a model's first variant, so every variant starts with it
in the page cache; outputs go to a temporary folder beside the model, removed (then ``sync``)
after each variant, so times exclude the write-back of the previous variant's output.

Guards: a variant is skipped when its peak RSS / size on a model measured earlier in the run,
scaled to this model, goes over ``--max-rss`` GiB (default: available memory at start minus
2 GiB; the default model order puts chain3g before chain8g); one whose tree RSS goes over it
anyway is killed and reported "killed: over memory limit"; one over ``--timeout`` seconds is
killed and reported "timeout"; a variant is skipped when free disk is below the model's size plus
10 %.

Output: a markdown table on stdout (seconds, peak RSS GiB, tree GiB, procs, RSS / model size on
disk, time / onnxsim's, time / copy's, output size, output main-graph nodes, exit code, the last
stderr line on failure; outputs are not re-checked here, onnxopt validates its own),
the issue-11 targets below it, progress on stderr, and everything as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SECONDS = 0.2
GIB = 2**30
CHUNK = 64 * 2**20

LOAD_SAVE = (
    "import sys, onnx\n"
    "from pathlib import Path\n"
    "model = onnx.load(sys.argv[1])\n"
    "onnx.save(model, sys.argv[2], save_as_external_data=True, all_tensors_to_one_file=True,\n"
    "          location=Path(sys.argv[2]).name + '.data')\n")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: its path inside ``--dir`` and the generator's arguments (a script in
    ``tools/`` then its options, ``-o PATH`` is appended)."""
    path: str
    generator: tuple[str, ...]
    decoder: bool = False


MODELS: dict[str, ModelSpec] = {
    "chain3g": ModelSpec("chain3g.onnx", ("gen_chain.py", "--layers", "48", "--dim", "4096")),
    "chain8g": ModelSpec("chain8g.onnx", ("gen_chain.py", "--gib", "8")),
    "llama1b": ModelSpec("llama1b/llama1b.onnx", ("gen_llama.py", "--preset", "1b"), True),
}

ONNXOPT_OPTIONS: dict[str, tuple[str, ...]] = {
    "onnxopt": (),
    "onnxopt-no-validate": ("--no-validate",),
    "onnxopt-int8": ("--quantize", "int8-weight"),
    "onnxopt-int4": ("--quantize", "int4-weight"),
}
VARIANTS = ("copy", "load-save", "onnxsim", *ONNXOPT_OPTIONS)
DECODER_ONLY = ("onnxopt-int8", "onnxopt-int4")


@dataclass
class Run:
    """One variant on one model. ``exit_code`` is negative for a signal, None when not run."""
    model: str
    variant: str
    command: list[str]
    seconds: float | None = None
    max_rss_bytes: int | None = None
    tree_rss_bytes: int | None = None
    processes: int | None = None
    output_bytes: int | None = None
    output_nodes: int | None = None
    exit_code: int | None = None
    note: str = ""


@dataclass(frozen=True)
class TimeReport:
    """What ``/usr/bin/time -v`` reported: wall seconds, peak RSS in bytes, exit code (-N for
    "Command terminated by signal N")."""
    seconds: float
    max_rss_bytes: int
    exit_code: int


def parse_time_v(text: str) -> TimeReport:
    """Parse GNU time's ``-v`` report.

    Raises:
        ValueError: the wall-clock or maximum-resident-set line is missing.
    """
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if wall is None or rss is None:
        raise ValueError("not a /usr/bin/time -v report: no wall-clock or maximum resident set "
                         "size line")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    killed = re.search(r"Command terminated by signal (\d+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    code = -int(killed.group(1)) if killed else int(status.group(1)) if status else 0
    return TimeReport(seconds, int(rss.group(1)) * 1024, code)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from ``/proc/*/stat`` (processes that vanish are skipped)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def _rss(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else 0


def tree_rss(root: int) -> tuple[int, int]:
    """Sum of VmRSS over the descendants of ``root`` (``root`` itself excluded: it is the
    measuring ``time``), and their number."""
    tree = _children()
    pending, total, count = list(tree.get(root, [])), 0, 0
    while pending:
        pid = pending.pop()
        total += _rss(pid)
        count += 1
        pending.extend(tree.get(pid, []))
    return total, count


def _kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (a variant started in its own session)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class TreeSampler(threading.Thread):
    """Samples ``tree_rss(root)`` until stopped; kills the process group of ``root`` when the sum
    exceeds ``limit`` bytes (``over_limit`` is then set)."""

    def __init__(self, root: int, limit: int):
        super().__init__(daemon=True)
        self.root, self.limit = root, limit
        self.peak = self.processes = 0
        self.over_limit = False
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            total, count = tree_rss(self.root)
            self.peak, self.processes = max(self.peak, total), max(self.processes, count)
            if total > self.limit and not self.over_limit:
                self.over_limit = True
                _kill_group(self.root)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _executable(name: str) -> str:
    """``name`` from this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else shutil.which(name) or name


def command(variant: str, model: Path, output: Path) -> list[str]:
    """The argv of ``variant`` reading ``model`` and writing ``output`` (for ``copy``: into
    ``output``'s folder)."""
    if variant == "copy":
        return ["cp", str(model), f"{model}.data", str(output.parent)]
    if variant == "load-save":
        return [sys.executable, "-c", LOAD_SAVE, str(model), str(output)]
    if variant == "onnxsim":
        return [_executable("onnxsim"), str(model), str(output)]
    inputs = model.with_name(model.name.removesuffix(".onnx") + ".inputs.npz")
    return [_executable("onnxopt"), "optimize", str(model), "-o", str(output),
            *(("--inputs", str(inputs)) if inputs.is_file() else ()),
            *ONNXOPT_OPTIONS[variant]]


def model_size(model: Path) -> int:
    """Bytes on disk of ``model`` and its ``.data`` file."""
    data = Path(f"{model}.data")
    return model.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def node_count(model: Path) -> int:
    """Nodes in the main graph of ``model`` (read without its external data)."""
    return len(onnx.load(str(model), load_external_data=False).graph.node)


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else ""


def run_variant(name: str, variant: str, model: Path, timeout: float, max_rss: int,
                nice: int) -> Run:
    """Run ``variant`` on ``model`` in a temporary folder beside it (removed afterwards)."""
    size = model_size(model)
    work = Path(tempfile.mkdtemp(prefix=f".bench-{variant}-", dir=model.parent))
    output = work / "out" / model.name
    output.parent.mkdir()
    run = Run(name, variant, command(variant, model, output))
    try:
        free = shutil.disk_usage(work).free
        if free < size * 1.1:
            run.note = f"skipped: {free / GIB:.1f} GiB free disk, the output may need " \
                       f"{size * 1.1 / GIB:.1f}"
            return run
        report_file, stderr_file = work / "time.txt", work / "stderr.txt"
        argv = ["nice", "-n", str(nice), "/usr/bin/time", "-v", "-o", str(report_file),
                *run.command]
        with open(stderr_file, "wb") as stderr:
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr,
                                       cwd=REPO_ROOT, start_new_session=True)
        sampler = TreeSampler(process.pid, max_rss)
        sampler.start()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.wait()
            run.note = f"timeout: over {timeout:g} s"
        sampler.stop()
        run.tree_rss_bytes, run.processes = sampler.peak, sampler.processes
        if sampler.over_limit:
            run.note = f"killed: over memory limit ({max_rss / GIB:.1f} GiB)"
        try:
            report = parse_time_v(report_file.read_text())
        except (OSError, ValueError):
            run.exit_code = process.returncode
        else:
            run.seconds, run.max_rss_bytes = report.seconds, report.max_rss_bytes
            run.exit_code = report.exit_code
        if run.exit_code != 0 and not run.note:
            run.note = _last_line(stderr_file)
        run.output_bytes = sum(p.stat().st_size for p in output.parent.iterdir())
        if output.is_file():
            run.output_nodes = node_count(output)
        return run
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()


def ensure_model(name: str, directory: Path, nice: int) -> Path:
    """The path of model ``name`` in ``directory``, generating it first when missing.

    Raises:
        RuntimeError: the generator failed.
    """
    spec = MODELS[name]
    path = directory / spec.path
    if path.is_file() and Path(f"{path}.data").is_file():
        return path
    argv = ["nice", "-n", str(nice), sys.executable, str(REPO_ROOT / "tools" / spec.generator[0]),
            *spec.generator[1:], "-o", str(path)]
    _progress(f"[{name}] generating: {' '.join(argv)}")
    started = time.perf_counter()
    if subprocess.run(argv, cwd=REPO_ROOT, stdout=sys.stderr).returncode != 0:
        raise RuntimeError(f"{name}: generator failed: {' '.join(argv)}")
    _progress(f"[{name}] generated in {time.perf_counter() - started:.0f} s")
    return path


def warm(path: Path) -> float:
    """Read ``path`` once (into the page cache); returns the seconds it took."""
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as source:
        while source.read(CHUNK):
            pass
    return time.perf_counter() - started


def memory_skip(runs: list[Run], sizes: dict[str, int], variant: str, size: int,
                limit: int) -> str:
    """Why ``variant`` should not run on a model of ``size`` bytes: the largest peak RSS / size
    it had on a model already measured, scaled to ``size``, goes over ``limit`` bytes; "" when
    it fits or was not measured yet."""
    done = [(r.max_rss_bytes / sizes[r.model], r.model) for r in runs
            if r.variant == variant and r.max_rss_bytes is not None]
    if not done:
        return ""
    ratio, model = max(done)
    if ratio * size <= limit:
        return ""
    return (f"skipped: {ratio:.2f}x the model on {model} predicts {ratio * size / GIB:.1f} GiB, "
            f"over the {limit / GIB:.1f} GiB limit")


def _available_memory() -> int:
    found = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return int(found.group(1)) * 1024 if found else 0


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "n/a"


def _seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "n/a"


def _gib(value: int | None) -> str:
    return f"{value / GIB:.2f}" if value is not None else "n/a"


def markdown(runs: list[Run], sizes: dict[str, int], nodes: dict[str, int]) -> str:
    """The results table; ratios are to the same model's copy and onnxsim runs (n/a when
    those did not complete). ``sizes``: bytes on disk, ``nodes``: main-graph nodes, per model."""
    base = {(r.model, r.variant): r.seconds for r in runs if r.exit_code == 0}
    lines = ["| model (GiB on disk, nodes) | variant | seconds | peak RSS GiB | tree GiB | procs "
             "| RSS / size | time / onnxsim | time / copy | output GiB | output nodes | exit "
             "| note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        rss_ratio = _ratio(r.max_rss_bytes, sizes[r.model])
        lines.append(
            f"| {r.model} ({sizes[r.model] / GIB:.2f}, {nodes[r.model]}) | {r.variant} "
            f"| {_seconds(r.seconds)} "
            f"| {_gib(r.max_rss_bytes)} | {_gib(r.tree_rss_bytes)} | {r.processes or 'n/a'} "
            f"| {rss_ratio} | {_ratio(r.seconds, base.get((r.model, 'onnxsim')))} "
            f"| {_ratio(r.seconds, base.get((r.model, 'copy')))} | {_gib(r.output_bytes)} "
            f"| {r.output_nodes if r.output_nodes is not None else 'n/a'} "
            f"| {r.exit_code if r.exit_code is not None else 'n/a'} "
            f"| {r.note.replace('|', '/')} |")
    return "\n".join(lines)


# Issue 11's targets: (model, variant, what, bound); ``what`` is "rss" (peak RSS / size on disk),
# another variant (time / its time on the same model) or "exit" (the run completes).
TARGETS = (
    ("chain3g", "onnxopt", "onnxsim", 0.25),
    ("chain3g", "onnxopt", "rss", 1.2),
    ("chain3g", "onnxopt-no-validate", "copy", 3.0),
    ("llama1b", "onnxopt", "rss", 1.2),
    ("llama1b", "onnxopt-int8", "rss", 1.2),
    ("llama1b", "onnxopt-int4", "rss", 1.2),
    ("chain8g", "onnxopt", "exit", 0),
)


def targets(runs: list[Run], sizes: dict[str, int]) -> list[str]:
    """One line per target whose run was made: the figure and "met" or "NOT met" (a run that
    did not complete never meets its target), or "not measured" when the run it is compared
    with did not complete."""
    made = {(r.model, r.variant) for r in runs}
    done = {(r.model, r.variant): r for r in runs if r.exit_code == 0}
    lines = []
    for model, variant, what, bound in TARGETS:
        if (model, variant) not in made:
            continue
        run, label = done.get((model, variant)), f"{model} {variant}"
        if run is None:
            lines.append(f"- {label}: did not complete, NOT met")
            continue
        if what == "exit":
            lines.append(f"- {label}: completes, met")
            continue
        if what == "rss":
            value, label = run.max_rss_bytes / sizes[model], f"{label} peak RSS / size"
        elif (model, what) in done:
            value, label = run.seconds / done[model, what].seconds, f"{label} time / {what}"
        else:
            lines.append(f"- {label} time / {what}: not measured ({what} did not complete)")
            continue
        verdict = "met" if value <= bound else "NOT met"
        lines.append(f"- {label}: {value:.2f} (target <= {bound:g}) {verdict}")
    return lines


def _split(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)}; known: "
                                         f"{', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=os.environ.get("ONNXOPT_BIG_DIR"),
                        help="where the models are (generated when missing); default "
                             "$ONNXOPT_BIG_DIR")
    parser.add_argument("--models", default="chain3g,chain8g,llama1b",
                        type=lambda t: _split(t, tuple(MODELS), "model"))
    parser.add_argument("--variants", type=lambda t: _split(t, VARIANTS, "variant"),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all but "
                             f"{', '.join(DECODER_ONLY)} on the chains)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    parser.add_argument("--max-rss", type=float,
                        help="GiB: kill a variant whose process tree goes over this (default: "
                             "available memory at start minus 2)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the variants")
    parser.add_argument("--json", type=Path, help="write the runs and model sizes here")
    args = parser.parse_args(argv)
    if args.dir is None:
        parser.error("give --dir (or set ONNXOPT_BIG_DIR): the folder of the large models")
    max_rss = int(args.max_rss * GIB if args.max_rss else _available_memory() - 2 * GIB)
    runs: list[Run] = []
    sizes: dict[str, int] = {}
    nodes: dict[str, int] = {}
    for name in args.models:
        path = ensure_model(name, args.dir, args.nice)
        sizes[name], nodes[name] = model_size(path), node_count(path)
        seconds = warm(Path(f"{path}.data"))
        _progress(f"[{name}] {sizes[name] / GIB:.2f} GiB; data file read in {seconds:.1f} s")
        variants = args.variants or [v for v in VARIANTS
                                     if MODELS[name].decoder or v not in DECODER_ONLY]
        for variant in variants:
            _progress(f"[{name}] {variant} ...")
            skip = memory_skip(runs, sizes, variant, sizes[name], max_rss)
            run = (Run(name, variant, [], note=skip) if skip else
                   run_variant(name, variant, path, args.timeout, max_rss, args.nice))
            runs.append(run)
            _progress(f"[{name}] {variant}: {_seconds(run.seconds)} s, peak RSS "
                      f"{_gib(run.max_rss_bytes)} GiB, tree {_gib(run.tree_rss_bytes)} GiB, "
                      f"exit {run.exit_code}"
                      + (f" ({run.note})" if run.note else ""))
    print(markdown(runs, sizes, nodes))
    print()
    print("\n".join(targets(runs, sizes)))
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "nodes": nodes,
                                         "max_rss_limit": max_rss,
                                         "runs": [asdict(r) for r in runs]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
