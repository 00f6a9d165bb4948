"""The report of a run: model statistics before and after, passes, validation; JSON and tables.

JSON schema (``schema_version`` 1), keys of the top-level object:

* ``schema_version`` (int), ``tool`` ("onnxopt"), ``tool_version`` (str), ``command`` (str);
* ``model`` (str: path or "<memory>"), ``output`` (str or null);
* ``before`` / ``after``: ``{nodes, nodes_total, op_counts, subgraphs, parameters,
  parameter_bytes, file_bytes, inputs, outputs}`` (``after`` null for ``validate``);
* ``passes``: list of ``{name, iteration, modified, stats, seconds}``; a pass whose strength was
  searched (``"auto"``) has ``stats.search``: ``{option, ladder, chosen, met_budget,
  monotone_assumed, path: [{setting, <metric>..., within, size_bytes, compressed_bytes,
  proposals}], per_layer: {group: setting}, upgrade_steps: [{setting, offered, moved,
  evaluations}], latency_ratio, latency_ms,
  latency_note}`` (see ``onnxopt.strength``);
* ``opset_upgrade`` (only when the model was converted for a pass, ``onnxopt.opset``):
  ``{from, to}`` default-domain opsets;
* ``compressed`` (only when a pruning or clustering pass changed the model): ``{level, before,
  after}``: the zlib-compressed size (that level, gzip's default 6) of the input and output
  files (external data included; the serialized model when no file was written), since zeros
  and shared values only pay off under compression;
* ``latency`` (only when ``quantize_static`` or ``quantize_dynamic`` changed the model and it
  validated, or the latency-guided decision that replaced such a result left it float):
  ``{latency_ratio, latency_ms: {before, after}, latency_note}``: the result's median time per
  run against the original's, interleaved onnxruntime runs on the first validation feed
  (noisy); a ratio above 1.2 is also a warning. A ``quantize_static`` result that took more
  than 1.25x the time of the lossless passes' float result is decided once more with
  ``latency_guided`` (``onnxopt.api.RETRY_SLOWER``), and ``retry`` says how: ``{versus_float,
  sites_float, quantized, versus_first, kept}`` (the first result's time over the float
  model's, the sites the timings left float, whether any site stayed quantized, the second
  result's time over the first's or null, whether the second was written);
* ``inputs``: ``{source: "synthesized"|path, seed, feeds: [{name: {shape, dtype}}]}``;
* ``validation``: null when skipped, else ``{passed, mode, atol, rtol, max_drift, feeds, reason,
  warnings,
  outputs: [{name, dtype, shape, candidate_dtype, candidate_shape, max_abs, max_rel, mean_abs,
  cosine, snr_db, rel_l2, argmax, top_k, extra, tolerance, passed, reason}]}``; ``max_drift`` is
  the cosine threshold, or ``{metric: threshold}`` for other or several criteria; ``argmax`` and
  ``top_k`` (top-5 agreement) are null in a lossless validation; ``extra`` holds ``{metric:
  value}`` of criteria without a key of their own (``onnxopt.metrics``);
* ``rolled_back``: list of ``{pass, reason, first_divergence}``: passes left out because the
  result with them failed validation (``reason`` is that failure; ``first_divergence`` the first
  tensor of that failing result that diverged, as in ``layerwise``, or null);
* ``layerwise`` (only from ``validate --layerwise``): ``{mode, feeds, compared, unmatched:
  {candidate: [tensor], reference: [tensor]}, skipped: [{tensor, reason}], first_divergence,
  ranking, reason}``; ``first_divergence`` is null or ``{tensor, reference_node: {name, op},
  candidate_node: {name, op}, metrics}`` (``metrics`` as a ``validation`` output, without
  ``name``); ``ranking`` (lossy only, at most 10) is ``[{node: {name, op}, tensor, input_snr_db,
  output_snr_db, added_db}]``, most added error first; ``reason`` is non-empty when the
  comparison could not run (see ``onnxopt.layerwise``);
* ``warnings``: list of strings: outputs that are constant on the validation inputs (agreement
  then shows little), lossy passes that changed nothing or left tensors unchanged to stay within
  ``--max-drift``;
* ``seconds`` (float: wall time of the run), ``verdict``: "passed", "failed" or "not validated".
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt import io
from onnxopt.graph import ModelStats
from onnxopt.layerwise import LayerwiseResult
from onnxopt.pass_manager import PassRecord
from onnxopt.validate import ValidationResult

SCHEMA_VERSION = 1


def latency_text(latency: dict, times: str = "x", arrow: str = "->") -> str:
    """``report.latency`` in words: ``0.52x the original's (10 -> 5.2 ms per run; note)``."""
    ms = latency["latency_ms"]
    return (f"{latency['latency_ratio']:.2f}{times} the original's ({ms['before']:.3g} {arrow} "
            f"{ms['after']:.3g} ms per run; {latency['latency_note']})")


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
    warnings: list[str] = field(default_factory=list)
    layerwise: LayerwiseResult | None = None
    seconds: float = 0.0
    #: Whether a rolled-back pass fails the run (``strict``, from the keywords or a config).
    strict: bool = False
    #: ``{"from": 11, "to": 13}`` when the model was converted for a pass (``onnxopt.opset``).
    opset_upgrade: dict | None = None
    #: ``{"level": 6, "before": bytes, "after": bytes}``: zlib-compressed file sizes, measured
    #: after a pruning or clustering pass changed the model (zeros pay off only compressed).
    compressed: dict | None = None
    #: ``{"latency_ratio", "latency_ms": {"before", "after"}, "latency_note"}``: the result
    #: timed against the original when a pass whose goal is speed changed it
    #: (``onnxopt.api.SPEED_PASSES``; ``onnxopt.validate.latency_ratio``).
    latency: dict | None = None

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
            "passes": [p.to_dict() for p in self.passes],
            **({"opset_upgrade": self.opset_upgrade} if self.opset_upgrade else {}),
            **({"compressed": self.compressed} if self.compressed else {}),
            **({"latency": self.latency} if self.latency else {}),
            "inputs": self.inputs,
            "validation": self.validation.to_dict() if self.validation else None,
            "rolled_back": self.rolled_back, "warnings": self.warnings,
            **({"layerwise": self.layerwise.to_dict()} if self.layerwise else {}),
            "seconds": round(self.seconds, 4), "verdict": self.verdict,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON atomically (temporary file in the same folder, then rename)."""
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2) + "\n")


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and a
    rename, so that ``path`` is never seen half-written; creates missing folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=io.staging_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def human_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB or GiB (two decimals above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def percent_change(before: float, after: float) -> str:
    """The change from ``before`` to ``after`` in percent of ``before``, one decimal, signed
    (``+12.5%``, ``-3.0%``); ``0.0%`` when it rounds to zero (never ``-0.0%``); empty when the
    two are equal or ``before`` is 0."""
    if before == after or not before:
        return ""
    text = f"{(after - before) / before:+.1%}"
    return "0.0%" if float(text[:-1]) == 0 else text


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


def format_stats(stats: dict) -> str:
    """``key=value, ...`` of a pass's statistics, leaving out lists and dicts (details) but for
    the number of refusals (``refused``, the reasons are in the JSON report); floats with four
    significant digits."""
    shown = {k: v for k, v in stats.items() if not isinstance(v, (list, dict))}
    if isinstance(stats.get("refused"), dict) and stats["refused"]:
        shown["refused"] = sum(v for v in stats["refused"].values() if isinstance(v, int))
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in shown.items())
