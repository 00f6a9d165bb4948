"""The README's table of onnxopt on every fetched real model, in each mode.

    python tools/zoo_table.py [--modes default,prune,int8-weight] [--models NAME ...]

Runs ``onnxopt.optimize`` in-process on each model of ``models/zoo`` with its stored inputs:
the default (lossless) pipeline, ``--prune-threshold 1e-3``, and each ``--quantize`` mode
(``int8-weight``, ``int8-dynamic``, ``int8-static``, ``int4-weight``, ``float16``; calibration
from ``models/data/<model>/calibration`` when ``tools/calibration_data.py`` built it, else the
stored inputs), ``prune-auto`` / ``cluster-auto`` / ``channels-auto`` (``--prune-sparsity
auto`` / ``--cluster-weights auto`` / ``--prune-channels auto`` searched against ``--max-drift
0.99``), and prints a markdown table: main-graph nodes (and with subgraphs where they differ), file size (external data files included), the worst output cosine similarity, the
verdict and the wall time of the call (validation included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxopt  # noqa: E402
from onnxopt.pipeline import QUANTIZE_MODES  # noqa: E402
from onnxopt.report import human_bytes  # noqa: E402
from tools import zoo  # noqa: E402

MODES = {"default": {}, "prune": {"prune_threshold": 1e-3},
         **{mode: {"quantize": mode} for mode in QUANTIZE_MODES},
         # the strength searched against the drift the user accepts (issue 10)
         "prune-auto": {"prune_sparsity": "auto", "max_drift": 0.99},
         "cluster-auto": {"cluster_weights": "auto", "max_drift": 0.99},
         "channels-auto": {"prune_channels": "auto", "max_drift": 0.99}}
#: Modes whose passes read activation statistics: they get the model's calibration set when
#: ``tools/calibration_data.py`` built one (the others need none).
CALIBRATED = {mode for mode in MODES if mode not in ("default", "prune")}
DATA = Path(__file__).resolve().parent.parent / "models" / "data"


def _nodes(main: int, total: int) -> str:
    return str(main) if main == total else f"{main}/{total}"


def row(model: zoo.ZooModel, mode: str) -> str:
    start = time.perf_counter()
    calibration = DATA / model.name / "calibration"
    extra = {"calibration": str(calibration)} if mode in CALIBRATED and calibration.is_dir() \
        else {}
    _, report = onnxopt.optimize(str(model.onnx_path), inputs=str(model.inputs_path),
                                 raise_on_failure=False, **MODES[mode], **extra)
    seconds = time.perf_counter() - start
    b, a, v = report.before, report.after, report.validation
    cosine = min((o.cosine for o in v.outputs), default=1.0)
    verdict = report.verdict
    if report.rolled_back:
        verdict += f" (rolled back: {', '.join(r['pass'] for r in report.rolled_back)})"
    return (f"| {model.name} | {mode} | {_nodes(b.nodes, b.nodes_total)} → "
            f"{_nodes(a.nodes, a.nodes_total)} | {human_bytes(b.file_bytes)} → "
            f"{human_bytes(a.file_bytes)} | {cosine:.6f} | {verdict} | {seconds:.2f} s |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="default,prune,int8-weight")
    parser.add_argument("--models", nargs="+")
    args = parser.parse_args(argv)
    models = [m for m in zoo.zoo_models() if not args.models or m.name in args.models]
    print("| model | mode | nodes | file size | worst cosine | verdict | time |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        for mode in args.modes.split(","):
            print(row(model, mode), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
