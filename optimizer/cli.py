"""The ``onnxopt`` command: parse arguments, call the Python API, print tables.

Exit codes: 0 success, 1 validation failed, 2 bad input or usage, 3 internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort

from onnxopt import __version__, api, io, progress
from onnxopt.errors import (SYNTHESIZED_INPUTS_HINT, InputError, OnnxoptError, OnnxoptWarning,
                            PassError, UsageError, ValidationFailed)
from onnxopt.graph import ModelStats, model_stats
from onnxopt.inputs import parse_input_shapes
from onnxopt.metrics import (describe_setting, format_comparison, format_threshold,
                             setting_criteria)
from onnxopt.pipeline import LINKED_OPTIONS, QUANTIZE_MODES
from onnxopt.report import (Report, format_stats, human_bytes, latency_text, pass_summary,
                            percent_change)
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_MAX_DRIFT, DEFAULT_RTOL

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# rich's console, tables and progress and the HTML report are imported where used: a --quiet
# run, as in an export pipeline or CI, needs none of them (they are a tenth of its start-up).


class _Out:
    """Where a command prints: a rich Console (tables, colours), or plain ``print`` for a
    --quiet run whose output is not a terminal (rich is then never imported)."""

    def __init__(self, rich: bool, stderr: bool = False) -> None:
        self.console: Console | None = None
        if rich:
            from rich.console import Console

            self.console = Console(highlight=False, stderr=stderr)
            if not self.console.is_terminal:  # piped or captured: no width to respect
                self.console.width = max(self.console.width, 160)
            # rich's default exits with status 1, which is "validation failed" here
            self.console.on_broken_pipe = self._reader_gone

    def _reader_gone(self) -> None:
        """stdout's reader went away (``| head``): what is left to print goes nowhere, and the
        command still finishes its work and returns its own exit code."""
        if self.console is not None:
            self.console.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())

    def line(self, text: str, head: str = "", style: str = "") -> None:
        """Print ``head`` (in ``style``) then ``text``; neither is read as rich markup, so
        names and messages with brackets print as they are."""
        if self.console is None:
            self.raw(head + text)
            return
        from rich.text import Text

        self.console.print(Text(head, style=style) + Text(text))

    def raw(self, text: str) -> None:
        """Print ``text`` as it is, never wrapped or styled (a JSON line)."""
        try:
            print(text, flush=True)
        except BrokenPipeError:
            self._reader_gone()

    def show(self, renderable) -> None:
        """Print a rich renderable (a table); only for runs that are not --quiet."""
        self.console.print(renderable)


def _table(**options) -> Table:
    from rich.table import Table

    return Table(**options)


def _escape(text: str) -> str:
    """``text`` for a rich table cell (brackets are not markup)."""
    from rich.markup import escape

    return escape(text)


def _write_html(report: Report, path: str) -> None:
    from onnxopt.html_report import write_html

    write_html(report, path)


def _size_table(before: ModelStats, after: ModelStats, seconds: float | None,
                compressed: dict | None = None) -> Table:
    table = _table(title="Model before and after", show_lines=False)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    ops = sorted(set(before.op_counts) | set(after.op_counts))
    for op in ops:
        b, a = before.op_counts.get(op, 0), after.op_counts.get(op, 0)
        table.add_row(_escape(op), str(b), str(a), f"{a - b:+d}" if a != b else "")
    table.add_section()

    def row(label, b, a, fmt=str):
        table.add_row(label, fmt(b), fmt(a), percent_change(b, a))

    row("nodes (main graph)", before.nodes, after.nodes)
    row("nodes (with subgraphs)", before.nodes_total, after.nodes_total)
    row("parameters", before.parameters, after.parameters, lambda v: f"{v:,}")
    row("parameter bytes", before.parameter_bytes, after.parameter_bytes, human_bytes)
    row("file size", before.file_bytes, after.file_bytes, human_bytes)
    if compressed and compressed.get("before") is not None and compressed.get("after") is not None:
        row(f"compressed file (zlib {compressed['level']})", compressed["before"],
            compressed["after"], human_bytes)
    if seconds is not None:
        table.add_row("time", "", f"{seconds:.2f} s", "")
    return table


def _pass_table(report: Report, verbose: bool) -> tuple[Table | None, str]:
    """The passes that changed the model, or have refusals or warnings to show (every pass run
    when ``verbose``; None when there is none to show), and a line counting the passes left out
    ("" when none is)."""
    shown = {r.name for r in report.passes
             if verbose or r.modified or r.warnings or r.stats.get("refused")}
    rows = [row for row in pass_summary(report.passes) if row[0] in shown]
    hidden = len({r.name for r in report.passes} - shown)
    note = (f"{hidden}{' other' if rows else ''} pass{'es' if hidden != 1 else ''} changed "
            f"nothing{' and refused nothing' if rows else ''} (--verbose lists "
            f"{'them' if hidden != 1 else 'it'})" if hidden else "")
    if not rows:
        return None, note
    table = _table(title="Passes")
    table.add_column("pass", overflow="fold")
    table.add_column("runs", justify="right")
    table.add_column("statistics")
    table.add_column("time", justify="right")
    for name, runs, stats, secs in rows:
        table.add_row(name, str(runs), _escape(format_stats(stats)), f"{secs * 1000:.0f} ms")
    return table, note


def _search_table(name: str, search: dict) -> Table:
    """The path of a strength search (``onnxopt.strength``): one row per setting tried."""
    path = search.get("path", [])
    metrics = [k for k in dict.fromkeys(k for row in path for k in row)
               if k not in ("setting", "within", "size_bytes", "compressed_bytes", "proposals")]
    ratio = search.get("latency_ratio")
    upgraded = search.get("per_layer", {})
    table = _table(title=f"Strength search of {name} ({search.get('option')}): chose "
                         f"{search.get('chosen')}"
                         + (f", {len(upgraded)} group(s) one or more settings stronger"
                            if upgraded else "")
                         + (f"; latency x{ratio:.3f} (noisy)" if ratio is not None else "")
                         + ("" if search.get("met_budget", True) else "; no setting met the budget"))
    # the weights' bytes with each setting's values compressed: zeros and shared values only
    # pay off compressed (the dense size is the same at every setting)
    for col in ("setting", *metrics, "within", "weights, zlib 1"):
        table.add_column(_escape(col), justify="right")
    for row in sorted(path, key=lambda r: search.get("ladder", []).index(r["setting"])
                      if r["setting"] in search.get("ladder", []) else 0):
        chosen = row["setting"] == search.get("chosen")
        table.add_row(f"{row['setting']}" + (" *" if chosen else ""),
                      *("-" if row.get(m) is None else f"{row[m]:.6g}" for m in metrics), "yes" if row["within"] else "no",
                      human_bytes(row.get("compressed_bytes", 0)))
    return table


#: The validation table's metric columns: ``OutputMetrics`` attribute -> (header, format), in
#: the order they are shown; ``_METRIC_PRIORITY``: the order in which they stay on a narrow
#: terminal (after the criteria of a lossy validation).
_METRIC_COLUMNS = {"max_abs": ("max abs", ".3g"), "max_rel": ("max rel", ".3g"),
                   "mean_abs": ("mean abs", ".3g"), "cosine": ("cosine", ".6f"),
                   "snr_db": ("SNR dB", ".1f"), "rel_l2": ("rel L2", ".3g"),
                   "argmax": ("argmax", ".4f"), "top_k": ("top-5", ".4f")}
_METRIC_PRIORITY = ["max_abs", "cosine", "snr_db", "argmax", "top_k", "max_rel", "rel_l2",
                    "mean_abs"]
#: The widest the output, shape and ok columns get; longer text folds onto more lines.
_NAME_WIDTH, _SHAPE_WIDTH, _OK_WIDTH = 48, 28, 16


def _validation_table(report: Report, width: int) -> Table:
    """Every output's metrics, as many as fit in ``width`` characters (the most telling ones
    first, ``_METRIC_PRIORITY``; the caption names those left out). A lossy validation's criteria
    come first, headed by their thresholds; a value failing its criterion is red, and the ok
    column names the criteria failed."""
    from rich.text import Text

    v = report.validation
    criteria = {c.metric.field or c.name: c for c in
                (setting_criteria(v.max_drift) if v.mode == "lossy" else [])}
    keys = list(criteria) + [k for k in _METRIC_COLUMNS if k not in criteria and (
        k not in ("argmax", "top_k") or any(getattr(m, k) is not None for m in v.outputs))]
    keys += [k for k in dict.fromkeys(k for m in v.outputs for k in m.extra) if k not in keys]
    heads = [_METRIC_COLUMNS.get(k, (k,))[0] + (
        f"\n{'>=' if c.metric.higher_is_better else '<='} {format_threshold(c.threshold)}"
        if (c := criteria.get(k)) else "") for k in keys]
    rows = [_validation_row(m, keys, criteria) for m in v.outputs]
    apart, keep = _fitting(keys, heads, rows, width, len(criteria))
    left_out = [heads[i].split("\n")[0] for i in range(len(keys)) if i not in keep]
    table = _table(title=f"Validation ({v.mode}, {v.feeds} feed{'s' if v.feeds != 1 else ''})",
                   caption=f"not shown at this width: {', '.join(left_out)} (see --report)"
                   if left_out else None)
    # _fitting makes the columns fit unless the criteria alone are too wide; then rich narrows
    # the widest wrapping columns first: names and shapes fold, numbers are never cut
    table.add_column("output" if apart else "output\nshape", overflow="fold",
                     max_width=_NAME_WIDTH)
    if apart:
        table.add_column("shape", overflow="fold", max_width=_SHAPE_WIDTH)
    for i in keep:
        table.add_column(_escape(heads[i]), justify="right", no_wrap=True)
    table.add_column("ok", justify="right", max_width=_OK_WIDTH)
    for name, shape, cells, ok in rows:
        table.add_row(*((Text(name), Text(shape)) if apart else
                        (Text(name) + Text(f"\n{shape}", style="dim"),)),
                      *(cells[i] for i in keep), Text(ok))
    return table


def _validation_row(m, keys: list[str], criteria: dict) -> list:
    """``[name, shape, cells, ok]`` of one output (``OutputMetrics``) in the validation table:
    the cells of the metrics ``keys`` (``OutputMetrics`` attributes or ``extra`` keys), those
    of ``criteria`` (by key) with the digits telling them from their thresholds, a failing one
    in red; the ok column names the criteria failed."""
    from rich.text import Text

    cells, failed = [], []
    for k in keys:
        x = getattr(m, k) if k in _METRIC_COLUMNS else m.extra.get(k)
        fmt, c = _METRIC_COLUMNS.get(k, ("", ".4g"))[1], criteria.get(k)
        if x is None or c is None:
            cells.append("-" if x is None else format(x, fmt))
            continue
        shown = format_comparison(x, c.threshold, fmt)[0]
        if c.meets(x):
            cells.append(shown)
            continue
        failed.append(c.name if x != c.metric.failure else "")
        cells.append(Text(shown, style="bold red"))
    # an output that could not be compared (a changed shape) fails every criterion: say why
    ok = "yes" if m.passed else f"NO: {', '.join(failed)}" if failed and all(failed) \
        else f"NO: {m.reason}"
    return [m.name, f"{m.dtype}{m.shape}", cells, ok]


def _fitting(keys: list[str], heads: list[str], rows: list, width: int,
             required: int) -> tuple[bool, list[int]]:
    """How the validation table fits in ``width`` characters: whether the shapes have a column
    of their own (else they go under the names), and the indices (in order) of the metric
    columns shown: the first ``required`` (the criteria), at least one, then as many more as fit
    in ``_METRIC_PRIORITY`` order. ``rows``: ``[name, shape, cells, ok]`` per output. A metric
    column needs its longest header line or cell, the others their longest text up to their
    maximum width (they wrap); each three characters more for padding and rule."""
    need = [3 + max(len(line) for text in [heads[i]] + [str(r[2][i]) for r in rows]
                    for line in text.split("\n")) for i in range(len(keys))]
    order = list(range(required)) + sorted(
        range(required, len(keys)), key=lambda i: _METRIC_PRIORITY.index(keys[i])
        if keys[i] in _METRIC_PRIORITY else len(_METRIC_PRIORITY))
    keep = order[:max(required, 1)]

    def room(*columns: tuple[int, list[str]]) -> int:
        return width - 1 - sum(need[i] for i in keep) - sum(
            3 + min(cap, max(map(len, texts))) for cap, texts in columns)

    def more(left: int) -> list[int]:
        taken = []
        for i in order[len(keep):]:
            if need[i] > left:
                break
            taken.append(i)
            left -= need[i]
        return taken

    names = (_NAME_WIDTH, ["output"] + [r[0] for r in rows])
    shapes = (_SHAPE_WIDTH, ["shape"] + [r[1] for r in rows])
    oks = (_OK_WIDTH, ["ok"] + [r[3] for r in rows])
    # the shapes in a column of their own if that shows as many metrics as under the names
    apart, together = room(names, shapes, oks), room((_NAME_WIDTH, names[1] + shapes[1]), oks)
    if apart >= 0 and len(more(apart)) >= len(more(together)):
        return True, sorted(keep + more(apart))
    return False, sorted(keep + more(together))


def _layerwise_tables(report: Report) -> list:
    """The first diverging tensor (or a line saying none did) and, lossy, the error ranking."""
    lw = report.layerwise
    title = (f"Layerwise ({lw.mode}): {lw.compared} tensors compared, "
             f"{len(lw.unmatched['candidate'])} of the candidate unmatched, "
             f"{len(lw.skipped)} skipped")
    if lw.reason:
        return [f"[yellow]{title}[/]: not compared: {_escape(lw.reason)}"]
    d = lw.first_divergence
    if d is None:
        shown = [f"[green]{title}[/]: no shared tensor diverges"]
    else:
        m = d.metrics
        table = _table(title=f"{title}: first divergence")
        for col in ("tensor", "reference node", "candidate node", "shape", "max abs", "cosine",
                    "SNR dB", "reason"):
            table.add_column(col, justify="right" if col in ("max abs", "cosine", "SNR dB")
                             else "left", overflow="fold")
        table.add_row(_escape(d.tensor),
                      _escape(f"{d.reference_node.name} ({d.reference_node.op})"),
                      _escape(f"{d.candidate_node.name} ({d.candidate_node.op})"),
                      _escape(f"{m.dtype}{m.shape}"), f"{m.max_abs:.3g}", f"{m.cosine:.6f}",
                      f"{m.snr_db:.1f}", _escape(m.reason))
        shown = [table]
    if lw.ranking:
        ranking = _table(title="Nodes adding the most error (SNR drop from worst input to output)")
        for col in ("node", "op", "tensor", "input SNR dB", "output SNR dB", "added dB"):
            ranking.add_column(col, justify="right" if "dB" in col else "left", overflow="fold")
        for r in lw.ranking:
            ranking.add_row(_escape(r.node.name), _escape(r.node.op), _escape(r.tensor),
                            f"{r.input_snr_db:.1f}",
                            f"{r.output_snr_db:.1f}", f"{r.added_db:.1f}")
        shown.append(ranking)
    return shown


def _print_input_warnings(report: Report, out: _Out) -> None:
    for warning in report.inputs.get("warnings", []) + report.warnings:
        out.line(warning, "warning: ", "yellow")


def _print_verdict(report: Report, out: _Out) -> None:
    v = report.validation
    if v is None:
        out.line(" (--no-validate)", "not validated", "yellow")
    elif v.passed:
        crit = (describe_setting(v.max_drift) if v.mode == "lossy"
                else f"atol {v.atol:g} + rtol {v.rtol:g} of range")
        if v.mask is not None:
            crit += f", where {v.mask} != 0"
        out.line(f" ({crit})", "validation passed", "green")
        if report.latency and report.latency.get("latency_ratio") is not None:
            out.line(latency_text(report.latency), "latency: ")
    else:
        out.line(f": {v.reason}", "validation FAILED", "red")


def _common_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="PATH",
                   help=".npz whose keys are input names, or a folder of .npz files (one feed each)")
    p.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                   help="shape for synthesized input NAME, e.g. x:1x3x224x224 (or x:1,3,224,224 "
                        "or x:[1,3,224,224]; repeatable); "
                        "dynamic dims default to 1")
    p.add_argument("--seed", type=int, help="seed for synthesized inputs (default 0)")
    p.add_argument("--atol", type=float,
                   help=f"absolute tolerance of lossless validation (default {DEFAULT_ATOL})")
    p.add_argument("--rtol", type=float,
                   help=f"tolerance relative to each output's range (default {DEFAULT_RTOL})")
    p.add_argument("--max-drift", metavar="CRITERIA",
                   help="what every output must keep after lossy passes: a minimum cosine "
                        f"similarity (default {DEFAULT_MAX_DRIFT}), or METRIC=VALUE,... all "
                        "required, e.g. cosine=0.999,max-abs=0.05; metrics: cosine, snr (dB), "
                        "max-abs, rel-l2, argmax, top-5 (agreement over the last axis); the drift "
                        "budget keeps float what breaks it, its choice checked on the real model "
                        "in onnxruntime")
    p.add_argument("--metric", metavar="NAME",
                   help="the metric a bare --max-drift number means (default cosine)")
    p.add_argument("--drift-mask", metavar="INPUT",
                   help="judge --max-drift only where this input is non-zero, e.g. "
                        "attention_mask: padding tokens left out of outputs shaped like it")
    p.add_argument("--report", metavar="FILE", help="write the report; the extension picks the "
                   "format: .json (JSON), .html or .htm (a self-contained HTML page)")
    p.add_argument("--quiet", action="store_true",
                   help="print only warnings and the verdict line (no tables, no progress)")
    p.add_argument("--verbose", action="store_true",
                   help="print tracebacks of internal errors; onnxruntime's default logger "
                        "shows warnings; optimize lists the passes that changed nothing")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other usage error of the
    command (``onnxopt: error: ...``, exit 2); ``--help`` shows the usage."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(UsageError.exit_code, f"onnxopt: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxopt", description="Optimize ONNX models and prove they compute the same thing.")
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="optimize a model and validate the result")
    p.add_argument("model", nargs="+", help="input .onnx model; several models or folders (their "
                   "*.onnx) are a batch, optimized in parallel, see --jobs")
    p.add_argument("-o", "--output", required=True,
                   help="output .onnx path (never the input); for a batch, the output folder "
                        "(the inputs' names, and their folder structure with --recursive)")
    b = p.add_argument_group("batch (several models, a folder, or --recursive) and executors")
    b.add_argument("--recursive", action="store_true",
                   help="also optimize the .onnx files of the folders' subfolders")
    b.add_argument("--jobs", type=int, metavar="N",
                   help="models optimized at once (default: the number of CPUs; models larger "
                        "than a quarter of the available memory run alone)")
    b.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="worker processes on this machine, or Ray tasks (pip install "
                        "'onnxopt[ray]'): a batch's models, and the candidate evaluations of a "
                        "strength search ('auto'), also for one model")
    b.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop a batch's model after this long (it fails alone, exit code 124)")
    b.add_argument("--ray-address", metavar="ADDRESS",
                   help="the Ray cluster to use (default $RAY_ADDRESS, else a local one)")
    b.add_argument("--summary", metavar="FILE.jsonl",
                   help="write the JSON line of each model there instead of stdout")
    p.add_argument("--passes", help="comma-separated passes to run instead of the default "
                                    "lossless pipeline (see `onnxopt passes`)")
    p.add_argument("--skip", action="append", default=[], metavar="PASS",
                   help="leave out a pass (repeatable, or comma-separated)")
    g = p.add_argument_group(
        "pruning and clustering (lossy; a strength of 'auto' is searched for the strongest "
        "setting within --max-drift)")
    g.add_argument("--prune-threshold", type=float, metavar="T",
                   help="set weight values with |w| < T to zero")
    g.add_argument("--prune-relative", type=float, metavar="R",
                   help="set weight values below R times a per-tensor scale to zero")
    g.add_argument("--prune-sparsity", type=_or_auto(float), metavar="S|auto",
                   help="fraction of each weight's values set to zero (see --prune-scope)")
    g.add_argument("--prune-scope", choices=("tensor", "row", "global"),
                   help="where --prune-sparsity is counted: per tensor, per output row, or "
                        "across all weights")
    g.add_argument("--prune-pattern", metavar="N:M",
                   help="semi-structured sparsity: N values kept in every M consecutive "
                        "input weights of each output (e.g. 2:4)")
    g.add_argument("--prune-importance", choices=("magnitude", "activation"),
                   help="what ranks the values: |w|, or |w| x the input feature's norm over "
                        "the calibration data (Wanda)")
    g.add_argument("--prune-reconstruct", action="store_true", default=None,
                   help="refit each pruned layer's remaining weights by least squares to the "
                        "original layer's outputs on calibration data (SparseGPT-style)")
    g.add_argument("--prune-allocation", choices=("uniform", "sensitivity"),
                   help="sparsity per layer: the same everywhere, or by measured sensitivity")
    g.add_argument("--sparse-storage", action="store_true", default=None,
                   help="store large sparse initializers as ONNX sparse tensors")
    g.add_argument("--prune-channels", type=_or_auto(float), metavar="FLOPS|auto",
                   help="remove whole channels: the fraction of the weighted ops' FLOPs to cut")
    g.add_argument("--cluster-weights", type=_or_auto(int), metavar="K|auto",
                   help="k-means clustering of each large weight into K <= 256 shared values")
    g.add_argument("--cluster-per-channel", action="store_true", default=None,
                   help="one codebook per output channel instead of per tensor")
    g.add_argument("--cluster-method", choices=("kmeans", "gptvq"),
                   help="assignment to the codebook: nearest value (kmeans, default) or "
                        "Hessian-compensated from calibration data (gptvq)")
    g.add_argument("--cluster-codebook-dtype", choices=("float32", "float16"),
                   help="dtype the codebooks are stored in (float16: Cast back at load)")
    g.add_argument("--cluster-wide", type=int, metavar="K",
                   help="mixed strength: the tensors whose clustering harms the measured drift "
                        "most get K clusters while --cluster-size-budget holds")
    g.add_argument("--cluster-size-budget", type=float, metavar="FRACTION",
                   help="with --cluster-wide: initializer bytes after clustering at most this "
                        "fraction of their bytes before")
    p.add_argument("--quantize", choices=sorted(QUANTIZE_MODES),
                   help="quantization mode (lossy): " + "; ".join(
                       f"{mode}: {', '.join(passes)}" for mode, passes in QUANTIZE_MODES.items()))
    p.add_argument("--quantize-exclude", action="append", metavar="OPS_OR_NODES",
                   help="op types or node names the quantization leaves in float "
                        "(comma-separated, repeatable)")
    p.add_argument("--quantize-ops", action="append", metavar="OPS",
                   help="the only op types quantized (comma-separated, repeatable)")
    p.add_argument("--no-validate", action="store_true", help="skip validation on onnxruntime")
    p.add_argument("--layerwise", action="store_true",
                   help="also compare intermediate tensors with the original (first divergence, "
                        "per-layer drift in the HTML report; with lossy passes, the nodes adding "
                        "the most error)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 1) when a pass had to be rolled back to pass validation")
    p.add_argument("--keep-invalid", action="store_true",
                   help="write the output even when validation fails (exit code stays 1)")
    p.add_argument("--verify-each", action="store_true",
                   help="run the ONNX checker and an onnxruntime load after every pass")
    p.add_argument("--external-data", action="store_true",
                   help="store tensors in OUTPUT.data beside the model (automatic over 2 GiB)")
    p.add_argument("--max-iterations", type=int,
                   help="bound on rounds of the lossless passes (default 10)")
    p.add_argument("--fold-size-limit", type=int, metavar="BYTES",
                   help="largest tensor constant folding may create (default 1048576; sugar for "
                        "fold_constants' size_limit)")
    p.add_argument("--config", metavar="FILE.toml",
                   help="the pipeline (passes, per-pass options) and validation settings in a "
                        "TOML file; flags given on the command line win over it")
    p.add_argument("--calibration-data", "--calibration", dest="calibration", metavar="PATH",
                   help="feeds for activation statistics: an .npz (one feed) or a folder of "
                        ".npz (one feed per file, read one at a time); default: --inputs")
    _common_input_args(p)

    p = sub.add_parser("validate", help="compare a candidate model with its reference")
    p.add_argument("reference", help="the .onnx model whose outputs are the reference (the "
                                     "original)")
    p.add_argument("candidate", help="the .onnx model compared with it (e.g. the optimized one)")
    p.add_argument("--lossy", action="store_true",
                   help="judge by --max-drift (cosine similarity, or the criteria given) "
                        "instead of --atol/--rtol")
    p.add_argument("--layerwise", action="store_true",
                   help="also compare intermediate tensors: name the first that diverges and, "
                        "with --lossy, the nodes adding the most error")
    _common_input_args(p)

    p = sub.add_parser("inspect", help="show versions, inputs, outputs, ops and parameters")
    p.add_argument("model", help="input .onnx model")

    sub.add_parser("passes", help="list the registered passes")
    return parser


def _or_auto(kind: type):
    """An argparse type: a number of ``kind`` (float or int), or ``auto`` (the strength
    search)."""
    def parse(text: str):
        if text.strip().lower() == "auto":
            return "auto"
        try:
            return kind(text)
        except ValueError:
            wanted = "a number" if kind is float else "an integer"
            raise argparse.ArgumentTypeError(f"expected {wanted} or 'auto', got {text!r}") from None
    return parse


def _sugar(args) -> dict:
    """The option-sugar flags given (``--prune-sparsity`` ...) as keywords of
    ``onnxopt.optimize`` (``onnxopt.pipeline.OPTION_SUGAR``: the flags' ``args`` names)."""
    from onnxopt.pipeline import OPTION_SUGAR

    return {k: getattr(args, k) for k in OPTION_SUGAR if getattr(args, k, None) is not None}


def _check_auto(args) -> None:
    """Raise UsageError when a strength flag says ``auto`` but --no-validate is given: the
    search measures each candidate's drift on the validation inputs."""
    auto = [f"--{k.replace('_', '-')}" for k, v in _sugar(args).items() if v == "auto"]
    if auto and args.no_validate:
        more = "" if args.max_drift is not None else " and give --max-drift"
        raise UsageError(f"{' '.join(auto)} auto searches the strongest setting whose drift, "
                         f"measured by validation, is within --max-drift: drop --no-validate"
                         f"{more}")


def _split(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


_REPORT_WRITERS = {".json": Report.write_json, ".html": _write_html, ".htm": _write_html}


def _report_writer(path: str | None):
    """The function ``write(report)`` writing a report to ``path`` in the format its extension
    picks (None without a path); it raises UsageError naming ``path`` when the file system
    refuses the write.

    Raises:
        UsageError: an extension other than .json, .html or .htm.
    """
    if path is None:
        return None
    suffix = Path(path).suffix.lower()
    if suffix not in _REPORT_WRITERS:
        raise UsageError(f"{path}: unknown report format '{suffix}'; use .json, .html or .htm")

    def write(report: Report) -> None:
        try:
            _REPORT_WRITERS[suffix](report, path)
        except OSError as err:  # named by its temporary file otherwise
            raise UsageError(f"{path}: cannot write the report ({err.strerror or err})") from None
    return write


def _print_report_path(args, out: _Out) -> None:
    if args.report and not args.quiet:
        out.line(f"wrote report {args.report}")


#: How onnxopt.validate and onnxopt.budget name the original model in their errors when
#: onnxruntime cannot load or run it (the ``what`` of ``make_session`` and ``run_model``).
_ORIGINAL_MODEL = ("reference model:", "original model:")


def _original_model_hint(err: InputError, args) -> InputError:
    """``err`` with the ways out added when it says onnxruntime cannot load or run the original
    model, so validation cannot run: real inputs when they were synthesized and the model failed
    on them, and --no-validate; any other error as it is."""
    message = " ".join(str(err).split())
    if not message.startswith(_ORIGINAL_MODEL):
        return err
    if args.inputs is None and "failed to run" in message and \
            SYNTHESIZED_INPUTS_HINT not in message:
        message += f" ({SYNTHESIZED_INPUTS_HINT})"
    if args.inputs is not None and "failed to run" in message:  # the feeds, most likely
        return InputError(f"{message}; check that --inputs {args.inputs} holds feeds for this "
                          f"model (names, shapes, dtypes)")
    return InputError(f"{message}; --no-validate writes the optimized model without validation")


@contextlib.contextmanager
def _progress(description: str, quiet: bool):
    """A transient spinner, the elapsed time and what runs now (``onnxopt.progress``: the pass,
    the drift budget's evaluations, validation runs, bytes written) with ``description``, on
    stderr, when stderr is a terminal and not ``quiet``."""
    if quiet or not sys.stderr.isatty():
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # the elapsed time before the text: on a narrow terminal the text is what gets cut
    columns = (SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    from rich.console import Console

    with Progress(*columns, console=Console(stderr=True), transient=True) as shown:
        task = shown.add_task(description, total=None)

        def listener(step: str, done: int | None, total: int | None) -> None:
            """What runs now (``onnxopt.progress``), with bytes for the steps that count them."""
            amount = f" {human_bytes(done)} of {human_bytes(total)}" if total else ""
            shown.update(task, description=f"{step}{amount} -- {description}")

        with progress.listening(listener):
            yield


def _refuse_overwriting(inputs: list[str], outputs: list[str | None]) -> None:
    """Raise UsageError when an output path names an input file (also through links)."""
    for out in filter(None, outputs):
        for inp in inputs:
            p, q = Path(out), Path(inp)
            if p.exists() and q.exists() and (p.resolve() == q.resolve() or p.samefile(q)):
                raise UsageError(f"{out}: refusing to overwrite the input {inp}")


def _check_output_path(path: str | None, what: str) -> None:
    """Raise UsageError unless ``path`` can be written as a file (checked before any work).

    The folder (or its nearest existing ancestor, where the missing folders would be made) is
    probed by creating and removing a file in it: permission bits do not tell for root, a
    read-only mount or an immutable folder."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{path}: is a directory; the {what} needs a file name")
    parent = p.parent if str(p.parent) else Path(".")
    ancestor = next(a for a in (parent, *parent.parents) if a.exists())
    if not ancestor.is_dir():
        raise UsageError(f"{path}: {ancestor} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=io.staging_prefix(p), suffix=".tmp", dir=ancestor)
    except OSError as err:
        raise UsageError(f"{path}: cannot write to the folder {ancestor} "
                         f"({err.strerror or err})") from None
    os.close(fd)
    os.remove(probe)


def _optimize_options(args) -> dict:
    """The keywords of ``onnxopt.optimize`` that the optimize command's flags give (all but
    the model and ``output``)."""
    return dict(
        passes=_split([args.passes]) if args.passes else None, skip=_split(args.skip) or None,
        config=args.config, quantize=args.quantize,
        quantize_exclude=_split(args.quantize_exclude) if args.quantize_exclude else None,
        quantize_ops=_split(args.quantize_ops) if args.quantize_ops else None,
        validate=False if args.no_validate else None, inputs=args.inputs,
        calibration=args.calibration,
        input_shapes=parse_input_shapes(args.input_shape) if args.input_shape else None,
        seed=args.seed, atol=args.atol, rtol=args.rtol, max_drift=args.max_drift,
        metric=args.metric, drift_mask=args.drift_mask, verify_each=args.verify_each or None,
        fold_size_limit=args.fold_size_limit, max_iterations=args.max_iterations,
        raise_on_failure=False, strict=args.strict or None, layerwise=args.layerwise or None,
        external_data=True if args.external_data else None, keep_invalid=args.keep_invalid,
        **_sugar(args))


def _cmd_optimize_many(args, out: _Out) -> int:
    """A batch (``onnxopt.batch``): one JSON line per model, in input order, in --summary or on
    stdout when it is not a terminal; then the summary table, on stderr when the lines are on
    stdout. The exit code is
    the most severe model's (``batch.EXIT_SEVERITY``: 3, then 1, then 2)."""
    from onnxopt import batch

    if args.report:
        raise UsageError("--report writes one model's report; a batch writes each model's as a "
                         "JSON line (on stdout, or in --summary FILE.jsonl)")
    _check_auto(args)
    _check_output_path(args.summary, "summary")
    if Path(args.output).suffix == ".onnx" and not Path(args.output).is_dir():
        raise UsageError(f"{args.output}: a batch writes into a folder, and this names a model "
                         "file; give the output folder")
    results = batch.optimize_many(args.model, args.output, jobs=args.jobs,
                                  executor=args.executor, ray_address=args.ray_address,
                                  recursive=args.recursive, timeout=args.timeout,
                                  **_optimize_options(args))
    codes, rows = [], []
    with (open(args.summary, "w", encoding="utf-8") if args.summary
          else contextlib.nullcontext(None)) as summary:
        for result in results:
            line = json.dumps(result.to_dict())
            if summary is not None:
                summary.write(line + "\n")
                summary.flush()
            elif not sys.stdout.isatty():  # for a program reading them; a person gets the table
                out.raw(line)
            codes.append(result.exit_code)
            rows.append(batch.summary_row(result))
    if not args.quiet:
        (out if summary is not None else _Out(rich=True, stderr=True)).show(
            batch.summary_table(rows))
    return batch.worst_exit_code(codes)


def _cmd_optimize(args, out: _Out) -> int:
    if len(args.model) > 1 or args.recursive or Path(args.model[0]).is_dir():
        return _cmd_optimize_many(args, out)
    args.model = args.model[0]
    if args.timeout is not None:
        raise UsageError("--timeout limits each model of a batch (several models or a folder); "
                         "one model runs in this process, which it cannot stop")
    if args.output.endswith(("/", os.sep)) or Path(args.output).is_dir():
        raise UsageError(f"{args.output}: is a folder; give the output model's file name "
                         "(several input models are written into a folder)")
    targets = [args.output, f"{args.output}.data", args.report]
    _refuse_overwriting(list(map(str, io.protected_files(args.model, targets))), targets)
    _check_output_path(args.output, "optimized model")
    _check_output_path(args.report, "report")
    if args.report and Path(args.report).resolve() == Path(args.output).resolve():
        raise UsageError(f"{args.report}: the report and the model output are the same file")
    write_report = _report_writer(args.report)
    _check_auto(args)
    with _progress(f"optimizing {Path(args.model).name}", args.quiet):
        try:
            _, report = api.optimize(args.model, output=args.output, executor=args.executor,
                                     ray_address=args.ray_address, **_optimize_options(args))
        except InputError as err:
            raise _original_model_hint(err, args) from None
    passed = (report.validation is None or report.validation.passed) and \
        not (report.strict and report.rolled_back)
    if write_report:  # before anything is printed: a reader that goes away stops nothing
        write_report(report)
    if not args.quiet:
        out.show(_size_table(report.before, report.after, report.seconds, report.compressed))
        passes, left_out = _pass_table(report, args.verbose)
        if passes is not None:
            out.show(passes)
        if left_out:
            out.line(left_out)
        for record in report.passes:
            if isinstance(record.stats.get("search"), dict):
                out.show(_search_table(record.name, record.stats["search"]))
        if report.opset_upgrade:
            out.line(f" {report.opset_upgrade['from']} -> {report.opset_upgrade['to']} (for the "
                     "passes that need it; validated against the original)", "opset upgraded",
                     "cyan")
        if report.validation is not None:
            out.show(_validation_table(report, out.console.width))
        for shown in _layerwise_tables(report) if report.layerwise else []:
            out.show(shown)
    if not args.quiet or not passed:  # with --strict a rollback is the failure: say which
        for rb in report.rolled_back:
            out.line(f" pass {rb['pass']}: {rb['reason']}", "rolled back", "yellow")
    _print_input_warnings(report, out)
    _print_verdict(report, out)
    _print_report_path(args, out)
    if not passed:
        if not args.quiet:
            fate = "written anyway (--keep-invalid)" if args.keep_invalid else "not written"
            out.line(f"output {fate}: {args.output}")
        return ValidationFailed.exit_code
    if not args.quiet:
        out.line(f"wrote {args.output}")
    return 0


def _cmd_validate(args, out: _Out) -> int:
    _refuse_overwriting([args.reference, args.candidate], [args.report])
    _check_output_path(args.report, "report")
    write_report = _report_writer(args.report)
    with _progress(f"validating {args.candidate} against {args.reference}", args.quiet):
        report = api.validate(args.reference, args.candidate, inputs=args.inputs,
                              input_shapes=parse_input_shapes(args.input_shape),
                              **{k: v for k, v in (("seed", args.seed), ("atol", args.atol),
                                                   ("rtol", args.rtol),
                                                   ("max_drift", args.max_drift),
                                                   ("metric", args.metric),
                                                   ("drift_mask", args.drift_mask))
                                 if v is not None},
                              lossy=args.lossy, layerwise=args.layerwise)
    if write_report:  # before anything is printed: a reader that goes away stops nothing
        write_report(report)
    if not args.quiet:
        out.show(_validation_table(report, out.console.width))
        for shown in _layerwise_tables(report) if report.layerwise else []:
            out.show(shown)
    _print_input_warnings(report, out)
    _print_verdict(report, out)
    if not report.validation.passed and not args.lossy:
        out.line("hint: a candidate made by a lossy step (quantized, pruned) is judged with "
                 "--lossy --max-drift CRITERIA")
    _print_report_path(args, out)
    return 0 if report.validation.passed else ValidationFailed.exit_code


def _cmd_inspect(args, out: _Out) -> int:
    model = io.load_model(args.model, lazy=True)  # external data stays in its files
    stats = model_stats(model)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    out.line(f": IR version {model.ir_version}; opsets: {opsets}; "
             f"producer: {model.producer_name or '-'} {model.producer_version}", args.model, "bold")
    io_table = _table(title="Inputs and outputs")
    for col in ("", "name", "dtype", "shape"):
        io_table.add_column(col, overflow="fold")
    for kind, values in (("input", stats.inputs), ("output", stats.outputs)):
        for v in values:
            shape = "?" if v["shape"] is None else "[" + ", ".join(
                "?" if d is None else str(d) for d in v["shape"]) + "]"
            io_table.add_row(kind, _escape(v["name"]), str(v["dtype"]), _escape(shape))
    out.show(io_table)
    ops = _table(title="Ops (main graph)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in sorted(stats.op_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        ops.add_row(_escape(op), str(n))
    out.show(ops)
    out.line(f"nodes: {stats.nodes} in the main graph, {stats.nodes_total} with "
             f"{stats.subgraphs} subgraph(s); parameters: {stats.parameters:,} "
             f"({human_bytes(stats.parameter_bytes)}); file: "
             f"{human_bytes(Path(args.model).stat().st_size)}"
             + "".join(f" + {human_bytes(f.stat().st_size)} of external data in {f.name}"
                       for f in io.external_data_files(args.model) if f.is_file()))
    return 0


def _passes_in_order() -> dict[str, str]:
    """Every registered pass, ``{name: what runs it}``, in the order a run would: the default
    lossless pipeline (``onnxopt.passes.LOSSLESS_PIPELINE``), the passes of the --quantize modes
    (``QUANTIZE_MODES``, in the modes' order), the passes of the pruning and clustering flags
    (``OPTION_SUGAR``), then the rest (``--passes`` only) as registered."""
    from onnxopt.pass_manager import REGISTRY
    from onnxopt.passes import LOSSLESS_PIPELINE
    from onnxopt.pipeline import OPTION_SUGAR, STRENGTH_OPTIONS

    order = {name: "default pipeline" for name in LOSSLESS_PIPELINE}
    for mode, passes in QUANTIZE_MODES.items():
        for name in passes:
            order[name] = (f"{order[name]}, {mode}" if name in order
                           else f"--quantize {mode}")
    for flag, (name, option) in OPTION_SUGAR.items():
        if option in STRENGTH_OPTIONS.get(name, ()):
            shown = f"--{flag.replace('_', '-')}"
            order[name] = f"{order[name]}, {shown}" if name in order else shown
    return {**order, **{name: "--passes" for name in REGISTRY if name not in order}}


def _cmd_passes(args, out: _Out) -> int:
    import dataclasses

    from onnxopt.pass_manager import REGISTRY

    table = _table(title="Passes, in the order a run takes them")
    table.add_column("name", overflow="fold")
    table.add_column("kind")
    table.add_column("run by")
    table.add_column("options")
    table.add_column("description")
    for name, run_by in _passes_in_order().items():
        cls = REGISTRY[name]
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        for mode, passes in QUANTIZE_MODES.items():  # what --quantize MODE sets instead
            if passes.get(name):
                opts += f"; --quantize {mode} sets " + ", ".join(
                    f"{k}={v!r}" for k, v in passes[name].items())
        if name == "quantize_static":  # onnxopt.api.RETRY_SLOWER
            opts += ("; latency_guided unset: a result taking more than "
                     f"{api.RETRY_SLOWER}x the float model's time is decided again with it "
                     "(setting it, true or false, is final)")
        for linked in LINKED_OPTIONS.get(name, ()):
            opts += (f"; {', '.join(linked)} are linked: giving one drops a mode's values "
                     f"for the others, which keep the defaults above")
        table.add_row(name, "lossless" if cls.lossless else "lossy", _escape(run_by),
                      _escape(opts), cls.description)
    out.show(table)
    out.line("Options are set in a --config file ([pipeline.options.<pass>] tables) or, in "
             "Python, with optimize(..., options={pass: {option: value}}); each pass's module "
             "docstring (passes/<pass>.py in the source) says what they mean.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``onnxopt`` console script; returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a one-line usage error (_Parser)
        return done.code if isinstance(done.code, int) else UsageError.exit_code
    verbose = getattr(args, "verbose", False)
    # the API's warnings, in API terms: the CLI prints the same ones in its own
    warnings.filterwarnings("ignore", category=OnnxoptWarning)
    # 2: warnings; 4 (fatal only) is onnxopt.validate's default
    ort.set_default_logger_severity(2 if verbose else 4)
    out = _Out(rich=not (getattr(args, "quiet", False) and not sys.stdout.isatty()))
    commands = {"optimize": _cmd_optimize, "validate": _cmd_validate, "inspect": _cmd_inspect,
                "passes": _cmd_passes}
    previous = _raise_on_termination()
    try:
        return commands[args.command](args, out)
    except OnnxoptError as e:
        if verbose and e.exit_code == PassError.exit_code:
            traceback.print_exc()
        message = " ".join(str(e).split())
        print(f"onnxopt: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as stop:  # Ctrl-C, or _Terminated
        signum = getattr(stop, "signum", signal.SIGINT)
        print("onnxopt: interrupted" if signum == signal.SIGINT else
              f"onnxopt: terminated ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except OSError as e:  # the file system refused a read or write (full disk, permissions)
        where = f"{e.filename}: " if e.filename else ""
        print(f"onnxopt: error: {where}{e.strerror or e}", file=sys.stderr)
        return UsageError.exit_code
    except Exception as e:  # a bug in onnxopt, not the user's: exit 3, not Python's 1
        if verbose:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"onnxopt: internal error: {type(e).__name__}: {message}"
              f"{'' if verbose else ' (--verbose prints the traceback)'}", file=sys.stderr)
        return PassError.exit_code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``timeout``, a container's stop, a closed terminal), raised in the
    main thread: the run unwinds as on Ctrl-C -- a result staged beside the output and
    temporary files are removed -- and exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: The signals that stop a run (:func:`_stop`); the parent of :func:`_in_child` passes them on.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Set in :func:`_in_child`'s child: the first stop signal is answered, the others ignored.
_ONE_STOP = False


def _stop(signum, frame):
    """Raise :class:`_Terminated` (KeyboardInterrupt for SIGINT) to unwind the run; in a child
    of :func:`_in_child`, ignore the stop signals from then on (one Ctrl-C arrives twice)."""
    if _ONE_STOP:
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated(signum)


def _raise_on_termination() -> dict:
    """Make SIGTERM and SIGHUP raise :class:`_Terminated`; returns the previous handlers (none
    changed outside the main thread, where Python cannot set them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, _stop) for signum in (signal.SIGTERM, signal.SIGHUP)}


#: Signals that mean native code crashed (onnxruntime segfaults on some models), not a stop.
_CRASH_SIGNALS = tuple(getattr(signal, name) for name in
                       ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT")
                       if hasattr(signal, name))


def _flush() -> None:
    """Flush stdout and stderr; a reader that went away (``| head``) has what it wanted."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()


def _in_child(run, argv: list[str]) -> int:
    """Run ``run()`` (:func:`main`) in a forked child process and return its exit code.

    onnxruntime runs in the process that optimizes, and a model that crashes it (a
    segmentation fault in native code, not an exception) would end the run with no message.
    The parent only waits: when the child dies of a crash signal it prints one line, removes
    what the child staged beside its outputs (``io.remove_stale_staging``) and returns 3 (as a
    batch's crashed worker); a child stopped by another signal gives ``128 + signal``. SIGTERM
    and SIGHUP sent to the parent (``timeout``) are passed on to the child, which cleans up as
    usual; so is SIGINT (Ctrl-C reaches both: the child answers the first stop signal only).
    """
    _flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        _die_with(parent)
        global _ONE_STOP
        _ONE_STOP = True  # Ctrl-C reaches it twice: from the terminal and passed on
        signal.signal(signal.SIGINT, _stop)
        code = PassError.exit_code
        try:
            code = run()
        finally:
            _flush()
            os._exit(code)

    def forward(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in _STOP_SIGNALS}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    signum = os.WTERMSIG(status)
    name = signal.Signals(signum).name
    with contextlib.suppress(SystemExit, Exception):  # what it was writing: staged beside it
        args = _parser().parse_args(argv)
        for target in [getattr(args, "output", None), getattr(args, "report", None)]:
            if target and not Path(target).is_dir():
                io.remove_stale_staging(target)
    if signum in _CRASH_SIGNALS:
        print(f"onnxopt: internal error: the run crashed in native code ({name}), most likely "
              f"onnxruntime on this model; nothing was written (ONNXOPT_IN_PROCESS=1 runs it "
              f"in this process, for a debugger)", file=sys.stderr)
        return PassError.exit_code
    print(f"onnxopt: terminated ({name})", file=sys.stderr)
    return 128 + signum


def _die_with(parent: int) -> None:
    """Have the kernel end this process (SIGKILL) when ``parent`` ends (Linux ``prctl``
    ``PR_SET_PDEATHSIG``): a parent killed with SIGKILL, which it cannot pass on, must not
    leave its child running on (and writing its output later). Elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(128 + int(signal.SIGKILL))


def console_main() -> None:
    """The ``onnxopt`` console script: :func:`main` in a child process (:func:`_in_child`;
    in this one where ``os.fork`` is missing or ``ONNXOPT_IN_PROCESS`` is set), then the
    process ends without finalizing the interpreter. Every file is written and closed by then
    (``io.save_model`` syncs); tearing down onnxruntime and the loaded modules would cost a
    tenth of a second, a fifth of a small model's run."""
    isolate = hasattr(os, "fork") and not os.environ.get("ONNXOPT_IN_PROCESS")
    code = _in_child(main, sys.argv[1:]) if isolate else main()
    _flush()
    os._exit(code)


if __name__ == "__main__":
    console_main()
