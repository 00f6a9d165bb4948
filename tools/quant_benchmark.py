"""Benchmark quantization of the real models by onnxopt's modes and by its peers, side by side.

One run quantizes with onnxopt's ``--quantize`` modes and the peers' toolkits, and measures every
result here (not in the tools).

    python tools/quant_benchmark.py [--models NAME ...] [--modes int8-weight,...|none]
                                    [--peers ort:dynamic-channel,...|all|none] [--repeat 20]
                                    [--out DIR] [--reuse] [--timeout 1800] [--memory-limit 16]

Rows (recipes in ``tools/quant_peers.py``): onnxopt's modes (``onnxopt.optimize(model,
quantize=MODE, inputs=<calibration set>, calibration=<calibration set>)``, plus ``int8-static``
at ``max_drift=0.999`` on transformers), onnxruntime's ``quantize_dynamic``, ``quantize_static``
and ``MatMulNBitsQuantizer``, NNCF, AMD Quark and Intel Neural Compressor. The peers run in their
own venvs (``tools/quant_peers.txt``); every recipe is a subprocess with a time and memory limit,
and a recipe that fails, times out or is missing is a row saying so, never a crash of this run.

Per model, every produced file and the fp32 original are measured in this process:

* size: the file (with external data) as a percentage of the fp32 file;
* latency: onnxruntime CPU, ``intra_op_num_threads=2``, on the first evaluation feed; the
  variants are timed in turn (interleaved) for ``--repeat`` rounds, each timing the mean of
  enough runs to last ~0.1 s; the median over rounds divided by fp32's median of the same run;
* accuracy on the evaluation feeds, against the fp32 outputs (``tools/tasks.py``): masked cosine
  of ``last_hidden_state`` (MiniLM), CER of the greedy CTC decodes (OCR recognizers), argmax
  agreement (classifiers), IoU of the probability maps thresholded at 0.3 (DB detectors), and for
  every model the smallest cosine and the largest absolute error over its outputs.

Data: ``models/data/<model>/{calibration,evaluation}/*.npz`` (``tools/calibration_data.py``);
quantizers (onnxopt's budget and validation included) see only the calibration set. A model
without that data falls back to its zoo sample feed ``models/zoo/<model>.inputs.npz`` for both,
and its table says so: such figures measure nothing held out.

Writes ``DIR/quant_benchmark.md`` (README-ready tables; also printed) and
``DIR/quant_benchmark.json``; the quantized models stay in ``DIR/<model>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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

from tools import tasks  # noqa: E402  (needs the repo root on sys.path when run as a script)
from tools.quant_peers import (ONNXOPT_MODES, RECIPES, VENVS, Recipe,  # noqa: E402
                               feed_files, load_feeds)

REPO_ROOT = Path(__file__).resolve().parent.parent
ZOO = REPO_ROOT / "models" / "zoo"
DATA = REPO_ROOT / "models" / "data"
THREADS = 2
SECONDS_PER_TIMING = 0.1


@dataclass(frozen=True)
class Task:
    """How a model is judged: its family (which recipes apply) and its task metric."""

    family: str  # "transformer" | "cnn" | "other"
    metric: str  # "masked-cosine" | "cer" | "argmax" | "iou" | "cosine"


TASKS = {
    "minilm_l6": Task("transformer", "masked-cosine"),
    "ch_PP-OCRv4_rec_infer": Task("cnn", "cer"),
    "ch_ppocr_mobile_v2.0_cls_infer": Task("cnn", "argmax"),
    "ch_PP-OCRv4_det_infer": Task("cnn", "iou"),
    "silero_vad_16k_op15": Task("other", "cosine"),
    "silero_vad": Task("other", "cosine"),
    "PP-OCRv6_rec_small": Task("cnn", "cer"),
    "PP-OCRv6_det_small": Task("cnn", "iou"),
    "magika": Task("other", "argmax"),
}
DEFAULT_MODELS = ("minilm_l6", "ch_PP-OCRv4_rec_infer", "ch_ppocr_mobile_v2.0_cls_infer",
                  "ch_PP-OCRv4_det_infer", "silero_vad_16k_op15", "silero_vad")
METRIC_LABELS = {"masked-cosine": "cosine (non-padding)", "cer": "CER vs fp32",
                 "argmax": "argmax agreement", "iou": "IoU (map > 0.3)", "cosine": "min cosine"}


@dataclass
class Row:
    """One recipe on one model, as measured."""

    recipe: str
    label: str
    status: str  # "ok" | "failed" | "timeout" | "n/a" | "load error" | "run error"
    detail: str = ""
    notes: list[str] = field(default_factory=list)
    quantize_seconds: float | None = None
    bytes: int | None = None
    size_pct: float | None = None
    latency_ms: float | None = None
    latency_ratio: float | None = None
    metric: float | None = None
    min_cosine: float | None = None
    max_abs: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ModelResult:
    model: str
    family: str
    metric: str
    data: str
    calibration_feeds: int
    evaluation_feeds: int
    latency_feed: dict
    fp32_bytes: int
    fp32_latency_ms: float | None
    rows: list[Row]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def data_sets(model: str) -> tuple[Path, Path, str]:
    """(calibration, evaluation, description): the data folders, or the zoo sample feed."""
    folder = DATA / model
    calibration, evaluation = folder / "calibration", folder / "evaluation"
    if feed_files_exist(calibration) and feed_files_exist(evaluation):
        return calibration, evaluation, f"models/data/{model} (calibration and evaluation apart)"
    sample = ZOO / f"{model}.inputs.npz"
    return sample, sample, (f"PLACEHOLDER: models/zoo/{model}.inputs.npz for both calibration "
                            "and evaluation (no models/data yet; nothing held out)")


def feed_files_exist(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.npz"))


def file_bytes(path: Path) -> int:
    """The model file plus the external data files it names (in its folder)."""
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer
                 for entry in tensor.external_data if entry.key == "location"}
    return total + sum((path.parent / name).stat().st_size for name in locations
                       if (path.parent / name).is_file())


def has_matmul_weights(path: Path) -> bool:
    """Whether some MatMul multiplies by an initializer (what int4 weight-only quantizes)."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return any(n.op_type == "MatMul" and any(i in weights for i in n.input)
               for n in model.graph.node)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feed: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    inputs = {i.name: feed[i.name] for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, inputs)))


def evaluate(reference: list[dict], candidate: list[dict], feeds: list[dict],
             metric: str) -> tuple[float | None, float, float]:
    """(task metric, smallest cosine over outputs, largest abs error) of ``candidate``'s outputs
    against ``reference``'s, pooled over the evaluation feeds."""
    names = list(reference[0])
    min_cos, max_abs = 1.0, 0.0
    for name in names:
        a = np.concatenate([r[name].astype(np.float64).ravel() for r in reference])
        b = np.concatenate([c[name].astype(np.float64).ravel() for c in candidate])
        if a.shape != b.shape:
            raise ValueError(f"output '{name}' has {b.size} values, fp32 {a.size}")
        norms = np.linalg.norm(a) * np.linalg.norm(b)
        cos = float(a @ b / norms) if norms else float(not a.any() and not b.any())
        min_cos = min(min_cos, cos)
        finite = np.isfinite(a) & np.isfinite(b)
        if finite.any():
            max_abs = max(max_abs, float(np.max(np.abs(a - b)[finite])))
    first = names[0]
    if metric == "masked-cosine":
        key = "last_hidden_state" if "last_hidden_state" in names else first
        kept_ref = np.concatenate([r[key][f["attention_mask"].astype(bool)]
                                   for r, f in zip(reference, feeds)])
        kept_cand = np.concatenate([c[key][f["attention_mask"].astype(bool)]
                                    for c, f in zip(candidate, feeds)])
        value = tasks.masked_cosine(kept_ref, kept_cand, np.ones(kept_ref.shape[:-1], bool))
    elif metric == "cer":
        refs = [seq for r in reference for seq in tasks.ctc_greedy_decode(r[first])]
        hyps = [seq for c in candidate for seq in tasks.ctc_greedy_decode(c[first])]
        value = tasks.character_error_rate(refs, hyps)
    elif metric == "argmax":
        value = tasks.argmax_agreement(
            np.concatenate([r[first].reshape(-1, r[first].shape[-1]) for r in reference]),
            np.concatenate([c[first].reshape(-1, c[first].shape[-1]) for c in candidate]))
    elif metric == "iou":
        value = tasks.detection_iou(np.concatenate([r[first].ravel() for r in reference]),
                                    np.concatenate([c[first].ravel() for c in candidate]))
    else:
        value = min_cos
    return value, min_cos, max_abs


def reused(recipe: Recipe, output: Path) -> Row | None:
    """The row of an earlier run's ``output`` (``--reuse``), when it produced the model."""
    sidecar = Path(f"{output}.json")
    if not (output.is_file() and sidecar.is_file()):
        return None
    info = json.loads(sidecar.read_text())
    if "error" in info:
        return None
    notes = info.pop("notes", [])
    return Row(recipe.name, recipe.label, "ok", notes=notes + ["reused from an earlier run"],
               quantize_seconds=info.pop("quantize_seconds", None), extra=info)


def run_recipe(recipe: Recipe, model: Path, output: Path, calibration: Path, family: str,
               timeout: float, memory_gb: float) -> Row:
    """Run ``recipe`` in its venv's interpreter; the row's status says how it ended."""
    row = Row(recipe.name, recipe.label, "ok")
    python = Path(sys.executable) if recipe.venv == "main" else VENVS[recipe.venv]
    if not python.is_file():
        row.status, row.detail = "n/a", f"venv '{recipe.venv}' not installed ({python})"
        return row
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    sidecar = Path(f"{output}.json")
    sidecar.unlink(missing_ok=True)
    argv = [str(python), str(REPO_ROOT / "tools" / "quant_peers.py"), recipe.name,
            "--model", str(model), "--output", str(output), "--calibration", str(calibration),
            "--family", family]
    limit = int(memory_gb * 2**30)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    started = time.perf_counter()
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                cwd=output.parent, env=env, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        row.status, row.detail = "timeout", f"over {timeout:g} s"
        return row
    row.quantize_seconds = time.perf_counter() - started
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    row.notes = info.pop("notes", [])
    info.pop("traceback", None)
    error = info.pop("error", None)
    row.extra = info
    if result.returncode != 0 or not output.is_file():
        row.status = "failed"
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        if error is None and result.returncode < 0:
            error = f"killed by signal {-result.returncode}"
        if error is None:
            error = f"exit {result.returncode}: {tail[-1] if tail else 'no output'}"
        if "MemoryError" in error or "bad_alloc" in error:
            error += f" (memory limit {memory_gb:g} GB)"
        row.detail = _one_line(error)
    elif sidecar.is_file():
        sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()),
                                       "quantize_seconds": row.quantize_seconds}))
    return row


def time_interleaved(sessions: dict[str, ort.InferenceSession], feed: dict,
                     repeat: int) -> dict[str, float]:
    """Median milliseconds per run of each session, timed in turn for ``repeat`` rounds."""
    inner = {}
    for name, sess in sessions.items():
        run(sess, feed)  # warm-up: first-run allocations and kernel selection
        started = time.perf_counter()
        run(sess, feed)
        once = max(time.perf_counter() - started, 1e-5)
        inner[name] = max(1, min(50, round(SECONDS_PER_TIMING / once)))
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for round_ in range(repeat):
        rotated = order[round_ % len(order):] + order[:round_ % len(order)]
        for name in rotated:
            sess = sessions[name]
            started = time.perf_counter()
            for _ in range(inner[name]):
                run(sess, feed)
            samples[name].append((time.perf_counter() - started) / inner[name] * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def recipe_applies(recipe: Recipe, family: str, matmul_weights: bool) -> str:
    """"" when ``recipe`` applies to a model of ``family``, else the reason it does not."""
    if family not in recipe.families:
        return f"not for {family} models"
    if recipe.int4 and not matmul_weights:
        return "no MatMul with an initializer weight (what int4 weight-only quantizes)"
    return ""


def benchmark_model(name: str, recipes: list[Recipe], out: Path, repeat: int, timeout: float,
                    memory_gb: float, reuse: bool = False) -> ModelResult:
    task = TASKS.get(name, Task("other", "cosine"))
    source = ZOO / f"{name}.onnx"
    calibration, evaluation, description = data_sets(name)
    model_out = out / name
    model_out.mkdir(parents=True, exist_ok=True)
    fp32_bytes = file_bytes(source)
    matmul = has_matmul_weights(source)
    reference_session = session(source)
    inputs = [i.name for i in reference_session.get_inputs()]
    feeds = load_feeds(evaluation, inputs)
    reference = [run(reference_session, feed) for feed in feeds]
    rows = []
    for recipe in recipes:
        reason = recipe_applies(recipe, task.family, matmul)
        if reason:
            rows.append(Row(recipe.name, recipe.label, "n/a", reason))
            continue
        _progress(f"{name}: {recipe.name} ...")
        output = model_out / (recipe.name.replace(":", "_").replace("@", "_at_") + ".onnx")
        row = (reuse and reused(recipe, output)) or run_recipe(
            recipe, source, output, calibration, task.family, timeout, memory_gb)
        if row.status == "ok":
            row.bytes = file_bytes(output)
            row.size_pct = 100.0 * row.bytes / fp32_bytes
        _progress(f"  {row.status} {row.detail} ({row.quantize_seconds or 0:.0f} s)")
        rows.append(row)
    sessions = {"fp32": reference_session}
    for row in rows:
        if row.status != "ok":
            continue
        output = model_out / (row.recipe.replace(":", "_").replace("@", "_at_") + ".onnx")
        try:
            sessions[row.recipe] = session(output)
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad model
            row.status, row.detail = "load error", _one_line(exc)
            continue
        try:
            outputs = [run(sessions[row.recipe], feed) for feed in feeds]
            row.metric, row.min_cosine, row.max_abs = evaluate(reference, outputs, feeds,
                                                                task.metric)
        except Exception as exc:
            row.status, row.detail = "run error", _one_line(exc)
            del sessions[row.recipe]
    _progress(f"{name}: timing {len(sessions)} models x {repeat} interleaved rounds")
    latency = time_interleaved(sessions, feeds[0], repeat)
    for row in rows:
        if row.recipe in latency:
            row.latency_ms = latency[row.recipe]
            row.latency_ratio = latency[row.recipe] / latency["fp32"]
    shapes = {k: list(v.shape) for k, v in feeds[0].items()}
    return ModelResult(name, task.family, task.metric, description,
                       len(feed_files(calibration)), len(feeds), shapes, fp32_bytes,
                       latency["fp32"], rows)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _metric_cell(result: ModelResult, row: Row) -> str:
    if row.metric is None:
        return "–"
    return f"{row.metric:.4f}" if result.metric != "cer" else f"{row.metric:.3f}"


def _float_nodes(row: Row) -> str:
    """What onnxopt's drift budget left in float, when its statistics say so."""
    found = []
    for name, stats in (row.extra.get("passes") or {}).items():
        kept = ((stats or {}).get("drift_budget") or {}).get("kept") if isinstance(
            stats, dict) else None
        if kept:
            shown = ", ".join(str(k) for k in kept[:8]) + (", ..." if len(kept) > 8 else "")
            found.append(f"{name} left {len(kept)} float: {shown}")
    return "; ".join(found)


def markdown(results: list[ModelResult], repeat: int) -> str:
    lines = []
    for result in results:
        lines += [f"### {result.model}", "",
                  f"fp32 {result.fp32_bytes / 1e6:.1f} MB, {_fmt(result.fp32_latency_ms, '.2f')} ms"
                  f" per run on {result.latency_feed}; data: {result.data}; "
                  f"{result.calibration_feeds} calibration / {result.evaluation_feeds} evaluation"
                  " feeds.", "",
                  f"| tool, mode | size | latency | {METRIC_LABELS[result.metric]} "
                  + ("" if result.metric == "cosine" else "| min cosine ")  # the same value
                  + "| max abs | quantize s | notes |",
                  "|---|---|---|---|---|---|---|" + ("" if result.metric == "cosine" else "---|")]
        for row in result.rows:
            notes = "; ".join(row.notes + ([_float_nodes(row)] if _float_nodes(row) else []))
            if row.status != "ok":
                notes = f"**{row.status}**: {row.detail}" + (f"; {notes}" if notes else "")
            lines.append(
                f"| {row.label} | {_fmt(row.size_pct, '.0f')}{'' if row.size_pct is None else ' %'}"
                f" | {_fmt(row.latency_ratio, '.2f')}{'' if row.latency_ratio is None else 'x'}"
                f" | {_metric_cell(result, row)}"
                + ("" if result.metric == "cosine" else f" | {_fmt(row.min_cosine, '.4f')}")
                + f" | {_fmt(row.max_abs, '.3g')} | {_fmt(row.quantize_seconds, '.0f')}"
                f" | {notes.replace('|', '/')} |")
        lines.append("")
    lines.append(f"Latency: onnxruntime {ort.__version__} CPU, {THREADS} intra-op threads, median "
                 f"of {repeat} interleaved rounds, as a ratio to fp32 in the same run. Accuracy "
                 "on the evaluation feeds against fp32's outputs; quantizers saw only the "
                 "calibration feeds.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    parser.add_argument("--modes", default=",".join(ONNXOPT_MODES)
                        + ",int8-static@0.999,int8-static-uint8",
                        help="onnxopt modes, comma-separated, or 'none' (default: all)")
    parser.add_argument("--peers", default="all",
                        help="peer recipes, comma-separated, 'all' or 'none'; known: "
                             + ",".join(n for n in RECIPES if not n.startswith("onnxopt:")))
    parser.add_argument("--repeat", type=int, default=20,
                        help="interleaved timing rounds; the median is reported (default 20)")
    parser.add_argument("--out", type=Path,
                        default=Path(tempfile.gettempdir()) / "onnxopt-quant-bench",
                        help="folder for the models, quant_benchmark.md and .json (default "
                             "outside the repository: the models take ~1 GB)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds per recipe before it is killed (default 1800)")
    parser.add_argument("--reuse", action="store_true",
                        help="measure the models an earlier run left in --out instead of "
                             "quantizing again (failed recipes run again)")
    parser.add_argument("--memory-limit", type=float, default=16.0,
                        help="GB of address space per recipe process (default 16)")
    args = parser.parse_args(argv)
    names = [] if args.modes == "none" else [f"onnxopt:{m}" for m in args.modes.split(",")]
    if args.peers == "all":
        names += [n for n in RECIPES if not n.startswith("onnxopt:")]
    elif args.peers != "none":
        names += args.peers.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {', '.join(RECIPES)}")
    missing = [m for m in args.models if not (ZOO / f"{m}.onnx").is_file()]
    if missing:
        parser.error(f"not fetched (tools/fetch_models.py): {missing}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.recipes = [RECIPES[n] for n in names]
    return args


def versions() -> dict[str, str]:
    found = {"onnxruntime (measuring)": ort.__version__, "python": platform.python_version()}
    script = ("import importlib.metadata as m\nfor d in %r:\n    try: print(d, m.version(d))\n"
              "    except m.PackageNotFoundError: pass\n")
    wanted = {"main": ("onnxopt", "onnx"), "peers": ("onnxruntime", "onnx", "nncf", "amd-quark",
                                                     "torch"),
              "inc": ("onnx-neural-compressor", "onnxruntime")}
    for venv, dists in wanted.items():
        python = Path(sys.executable) if venv == "main" else VENVS[venv]
        if not python.is_file():
            continue
        done = subprocess.run([str(python), "-c", script % (dists,)], capture_output=True,
                              text=True)
        for line in done.stdout.splitlines():
            dist, version = line.split()
            found[f"{dist} ({venv})"] = version
    return found


def write(results: list[ModelResult], args: argparse.Namespace, found: dict[str, str],
          seconds: float) -> str:
    """Write the markdown and JSON files (after every model, so an interrupted run keeps its
    finished models) and return the markdown."""
    table = markdown(results, args.repeat)
    table += "\nVersions: " + ", ".join(f"{k} {v}" for k, v in found.items())
    table += ("\nLoad average at the end (1, 5, 15 min): "
              + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs\n")
    (args.out / "quant_benchmark.md").write_text(table)
    payload = {"repeat": args.repeat, "threads": THREADS, "versions": found, "seconds": seconds,
               "load_average": os.getloadavg(), "results": [asdict(r) for r in results]}
    (args.out / "quant_benchmark.json").write_text(json.dumps(payload, indent=2, default=str)
                                                   + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    found = versions()
    results = []
    for name in args.models:
        results.append(benchmark_model(name, args.recipes, args.out.resolve(), args.repeat,
                                       args.timeout, args.memory_limit, args.reuse))
        table = write(results, args, found, time.perf_counter() - started)
    print(table)
    _progress(f"done in {time.perf_counter() - started:.0f} s; wrote "
              f"{args.out}/quant_benchmark.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
