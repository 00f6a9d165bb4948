"""The README's table of onnxopt on every fetched real model, in each mode.

    python tools/zoo_table.py [--modes default,prune,quantize] [--models NAME ...]

Runs ``onnxopt.optimize`` in-process on each model of ``models/zoo`` with its stored inputs:
the default (lossless) pipeline, ``--prune-threshold 1e-3`` and ``--quantize int8-weight``, and
prints a markdown table: main-graph nodes (and with subgraphs where they differ), file size, the
worst output cosine similarity, the verdict and the wall time of the call (validation included).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxopt  # noqa: E402
from onnxopt.report import human_bytes  # noqa: E402
from tools import zoo  # noqa: E402

MODES = {"default": {}, "prune": {"prune_threshold": 1e-3},
         "quantize": {"quantize": "int8-weight"}}


def _nodes(main: int, total: int) -> str:
    return str(main) if main == total else f"{main}/{total}"


def row(model: zoo.ZooModel, mode: str) -> str:
    start = time.perf_counter()
    optimized, report = onnxopt.optimize(str(model.onnx_path), inputs=str(model.inputs_path),
                                           raise_on_failure=False, **MODES[mode])
    seconds = time.perf_counter() - start
    b, a, v = report.before, report.after, report.validation
    cosine = min((o.cosine for o in v.outputs), default=1.0)
    verdict = report.verdict
    if report.rolled_back:
        verdict += f" (rolled back: {', '.join(r['pass'] for r in report.rolled_back)})"
    return (f"| {model.name} | {mode} | {_nodes(b.nodes, b.nodes_total)} → "
            f"{_nodes(a.nodes, a.nodes_total)} | {human_bytes(b.file_bytes)} → "
            f"{human_bytes(optimized.ByteSize())} | {cosine:.6f} | {verdict} | {seconds:.2f} s |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
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
