"""Benchmark batch mode on the whole fetched zoo: ``--jobs 1`` against ``--jobs 2`` against Ray.

    python tools/batch_benchmark.py [--models NAME ...] [--ray-cpus 2] [--json FILE]

Every fetched zoo model (``tools/zoo.py``: ``models/zoo/<name>.onnx`` with its validation inputs
``<name>.inputs.npz``) is optimized and validated by ``onnxopt.optimize_many`` three times, each
into a fresh temporary folder:

* ``local, jobs 1``: one worker process;
* ``local, jobs 2``: two worker processes;
* ``ray, N local workers``: Ray tasks on a local cluster of ``--ray-cpus`` CPUs started here
  (loopback, no dashboard); the cluster's start is timed apart and left out of the wall time.

The wall time of a run covers the whole iteration over the results, starting the worker
processes (``spawn``: an interpreter and onnxopt's imports each) included. The markdown table
gives each run's wall time, its ratio to ``jobs 1``, the sum of the models' own times in their
workers (the work done), the models passed / failed, and whether every output file is
byte-identical to the ``jobs 1`` run's, with the same report but for timings (the executors
must not change results; the models that differ are named). Passes edited while it runs (a
shared working tree) also make results differ. The machine's
other load counts: on a shared machine, run it more than once before trusting a ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import zoo  # noqa: E402  (needs the repo root on sys.path when run as a script)

from onnxopt import optimize_many  # noqa: E402
from onnxopt.batch import ModelResult, without_timings  # noqa: E402


def _run(label: str, models: list[zoo.ZooModel], out_dir: Path, **kwargs) -> dict:
    """Optimize ``models`` into ``out_dir`` with ``optimize_many(**kwargs)``: wall time, the
    results, the output files' bytes."""
    inputs = {m.onnx_path.resolve(): str(m.inputs_path) for m in models}
    print(f"{label}: {len(models)} models ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    results: list[ModelResult] = list(optimize_many(
        [m.onnx_path for m in models], out_dir, model_options=lambda p: {"inputs": inputs[p]},
        **kwargs))
    wall = time.perf_counter() - start
    outputs = {p.relative_to(out_dir).as_posix(): p.read_bytes()
               for p in sorted(out_dir.rglob("*")) if p.is_file()}
    print(f"{label}: {wall:.1f} s", file=sys.stderr, flush=True)
    return {"label": label, "wall": wall, "results": results, "outputs": outputs}


def _differing(run: dict, base: dict) -> list[str]:
    """The models whose output file or report (without timings and output paths: each run has
    its own folder) differ between ``run`` and ``base``."""
    def report(r: ModelResult):
        return without_timings({**r.report, "output": None}) if r.report else r.error

    names = [Path(r.model).stem for r in base["results"]]
    return [name for name, a, b in zip(names, base["results"], run["results"])
            if report(a) != report(b) or run["outputs"].get(f"{name}.onnx") !=
            base["outputs"].get(f"{name}.onnx")]


def _table(runs: list[dict], ray_start: float | None) -> str:
    base = runs[0]
    lines = ["| run | wall time | ratio to jobs 1 | sum of model times | passed / failed | "
             "outputs and reports identical to jobs 1 |",
             "|---|---:|---:|---:|---:|---|"]
    for run in runs:
        results = run["results"]
        passed = sum(r.exit_code == 0 for r in results)
        differing = _differing(run, base)
        lines.append(f"| {run['label']} | {run['wall']:.1f} s | {run['wall'] / base['wall']:.2f} "
                     f"| {sum(r.seconds for r in results):.1f} s | {passed} / "
                     f"{len(results) - passed} | "
                     f"{'NO: ' + ', '.join(differing) if differing else 'yes'} |")
    failed = {Path(r.model).stem: r.exit_code for r in base["results"] if r.exit_code}
    notes = [f"{len(base['results'])} zoo models, {os.cpu_count()} CPUs"]
    if ray_start is not None:
        notes.append(f"Ray's local cluster took {ray_start:.1f} s to start (not in its wall time)")
    if failed:
        notes.append("failed (exit code): " + ", ".join(f"{k} ({v})" for k, v in failed.items()))
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + ".\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", metavar="NAME",
                        help="only these zoo models (default: every fetched one)")
    parser.add_argument("--ray-cpus", type=int, default=2,
                        help="CPUs of the local Ray cluster (default 2)")
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray run")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    models = [m for m in zoo.zoo_models() if not args.models or m.name in args.models]
    if not models:
        print("no zoo models fetched: run tools/fetch_models.py", file=sys.stderr)
        return 2
    runs, ray_start = [], None
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        for jobs in (1, 2):
            runs.append(_run(f"local, jobs {jobs}", models, Path(tmp) / f"jobs{jobs}",
                             jobs=jobs))
        if not args.no_ray:
            import ray

            start = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING",
                     log_to_driver=False)
            ray_start = time.perf_counter() - start
            try:
                runs.append(_run(f"ray, {args.ray_cpus} local workers", models,
                                 Path(tmp) / "ray", executor="ray"))
            finally:
                ray.shutdown()
    table = _table(runs, ray_start)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "ray_start_seconds": ray_start,
            "runs": [{"label": r["label"], "wall_seconds": r["wall"],
                      "differing_from_jobs_1": _differing(r, runs[0]),
                      "models": [{"model": Path(x.model).stem, "exit_code": x.exit_code,
                                  "seconds": x.seconds} for x in r["results"]]}
                     for r in runs]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
