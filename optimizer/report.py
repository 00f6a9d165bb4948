"""The report of a run: model statistics before and after, passes, validation; JSON and tables.

JSON schema (``schema_version`` 1), keys of the top-level object:

* ``schema_version`` (int), ``tool`` ("onnxopt"), ``tool_version`` (str), ``command`` (str);
* ``model`` (str: path or "<memory>"), ``output`` (str or null);
* ``before`` / ``after``: ``{nodes, nodes_total, op_counts, subgraphs, parameters,
  parameter_bytes, file_bytes, inputs, outputs}`` (``after`` null for ``validate``);
* ``passes``: list of ``{name, iteration, modified, stats, seconds}``;
* ``inputs``: ``{source: "synthesized"|path, seed, feeds: [{name: {shape, dtype}}]}``;
* ``validation``: null when skipped, else ``{passed, mode, atol, rtol, max_drift, feeds, reason,
  outputs: [{name, dtype, shape, candidate_dtype, candidate_shape, max_abs, max_rel, mean_abs,
  cosine, snr_db, tolerance, passed, reason}]}``;
* ``rolled_back``: list of ``{pass, reason}``: passes left out because the result with them failed
  validation (``reason`` is that failure);
* ``seconds`` (float: wall time of the run), ``verdict``: "passed", "failed" or "not validated".
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.graph import ModelStats
from optimizer.pass_manager import PassRecord
from optimizer.validate import ValidationResult

SCHEMA_VERSION = 1


@dataclass
class Report:
    """Everything one ``optimize`` or ``validate`` run measured."""

    tool_version: str
    command: str
    model: str
    before: ModelStats
    after: ModelStats | None = None
    output: str | None = None
    passes: list[PassRecord] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)
    validation: ValidationResult | None = None
    rolled_back: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        if self.validation is None:
            return "not validated"
        return "passed" if self.validation.passed else "failed"

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION, "tool": "onnxopt", "tool_version": self.tool_version,
            "command": self.command, "model": self.model, "output": self.output,
            "before": self.before.to_dict(),
            "after": self.after.to_dict() if self.after else None,
            "passes": [p.to_dict() for p in self.passes], "inputs": self.inputs,
            "validation": self.validation.to_dict() if self.validation else None,
            "rolled_back": self.rolled_back,
            "seconds": round(self.seconds, 4), "verdict": self.verdict,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def pass_summary(records: list[PassRecord]) -> list[tuple[str, int, dict, float]]:
    """Per pass name: times run, summed numeric statistics, total seconds (first-run order)."""
    rows: dict[str, list] = {}
    for r in records:
        row = rows.setdefault(r.name, [0, {}, 0.0])
        row[0] += 1
        row[2] += r.seconds
        for k, v in r.stats.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[1][k] = row[1].get(k, 0) + v
            else:
                row[1][k] = v
    return [(name, n, stats, secs) for name, (n, stats, secs) in rows.items()]
