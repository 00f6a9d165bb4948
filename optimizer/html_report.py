"""The report of a run as one self-contained HTML page (inline CSS and SVG; no script, no assets).

Sections, top to bottom: the header (tool version, command, model, verdict, run time, a speed
mode's latency against the original), the run's warnings, the model
before and after (nodes per op type, totals, parameters, file size, and after pruning or
clustering the compressed file size), the passes (runs, summed
statistics, time; an opset upgrade), the validation (per output: max abs, max rel, mean abs
error, cosine similarity, SNR in dB, relative L2 error; lossy: argmax and top-5 agreement and the
criteria's other metrics), the rolled-back passes, and a drift chart:

* when the layer-wise comparison (``report.layerwise``, see ``onnxopt.layerwise``) lists its
  compared tensors with their metrics (``compared: [{tensor, metrics...}]``), one point per
  tensor in the order given (topological): its SNR in dB, or its max abs error when no SNR is
  finite; the first divergence is marked;
* otherwise one horizontal bar per output: its SNR in dB, labelled with the cosine similarity.

A pass whose strength was searched (``stats.search``, see ``onnxopt.strength``) gets a section
of its own: the path of the search as a table (setting, each criterion's worst value, within the
budget or not, sizes) and a line chart of the first criterion against the setting, in ladder
order, with the budget's target as a dashed line and the chosen setting marked.

A layer-wise comparison also gets its own section: the first diverging tensor with the node
producing it in each model, and (lossy) the nodes adding the most error.

An infinite SNR (identical values) is drawn at the top of the scale and labelled "∞". Every text
from the model or the report is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import math
import os
from typing import Any

from onnxopt.metrics import describe_setting
from onnxopt.report import (
    Report,
    format_stats,
    human_bytes,
    latency_text,
    pass_summary,
    percent_change,
    write_text_atomically,
)

_METRICS = ("max_abs", "max_rel", "mean_abs", "cosine", "snr_db", "rel_l2")
_HEADS = {"max_abs": "max abs", "max_rel": "max rel", "mean_abs": "mean abs", "cosine": "cosine",
          "snr_db": "SNR dB", "rel_l2": "rel L2", "argmax": "argmax", "top_k": "top-5"}

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0 auto; max-width: 1100px; padding: 24px 32px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h3 { font-size: 15px; margin: 16px 0 6px; }
h2 { font-size: 17px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
.sub { font-size: 16px; margin: 2px 0 12px; }
.verdict { display: inline-block; padding: 2px 10px; border-radius: 12px; font-weight: 600;
           color: #fff; vertical-align: middle; font-size: 13px; margin-left: 8px; }
.v-passed { background: #1a7f37; } .v-failed { background: #cf222e; }
.v-not-validated { background: #9a6700; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0; }
dl.meta dt { color: #57606a; } dl.meta dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; margin: 4px 0; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eaeef2; text-align: left;
         vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; border-bottom: 1px solid #d0d7de; }
td.n, th.n { text-align: right; white-space: nowrap; }
tr.total td { border-top: 2px solid #d0d7de; font-weight: 600; }
tr.bad td { background: #ffebe9; }
.down { color: #1a7f37; } .up { color: #cf222e; } .muted { color: #57606a; }
td.stats { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; }
.cols { display: flex; gap: 40px; flex-wrap: wrap; align-items: flex-start; }
svg { max-width: 100%; height: auto; font-family: inherit; }
svg text { font-size: 12px; fill: #1f2328; }
svg .axis { stroke: #8c959f; } svg .grid { stroke: #eaeef2; }
svg .line { fill: none; stroke: #0969da; stroke-width: 1.5; }
svg .pt { fill: #0969da; } svg .pt.exact { fill: #1a7f37; } svg .pt.bad { fill: #cf222e; }
svg .marker { stroke: #cf222e; stroke-dasharray: 4 3; }
p.bad { color: #cf222e; }
footer { margin-top: 40px; color: #57606a; font-size: 12px; }
"""


def write_html(report: Report, path: str | os.PathLike) -> None:
    """Write ``report`` as a self-contained HTML page to ``path`` atomically (temporary file in
    the same folder, then rename)."""
    write_text_atomically(path, render_html(report))


def render_html(report: Report) -> str:
    """The HTML page of ``report`` (see the module docstring)."""
    sections = [_header(report), _warnings_section(report), _model_section(report),
                _passes_section(report), _validation_section(report),
                _rolled_back_section(report),
                _layerwise_section(report), _chart_section(report), _search_section(report)]
    title = f"onnxopt {report.command}: {os.path.basename(report.model)} — {report.verdict}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(s for s in sections if s)
            + f"\n<footer>onnxopt {_e(report.tool_version)} — report written "
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M:%S %Z}</footer>\n"
            "</body>\n</html>\n")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    """A metric as a float (JSON's "inf"/"-inf" strings included), None when absent."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: Any, spec: str) -> str:
    v = _num(value)
    if v is None:
        return "–"
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return format(v, spec)


def _fmt_metric(key: str, value: Any) -> str:
    return _fmt(value, {"cosine": ".6f", "snr_db": ".1f", "argmax": ".4f",
                        "top_k": ".4f"}.get(key, ".3g"))


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return obj


def _flat(entry: Any) -> dict:
    """A layer-wise entry as one flat dict: a nested ``metrics`` dict is merged in."""
    entry = _as_dict(entry)
    if not isinstance(entry, dict):
        return {"tensor": entry}
    flat = {k: v for k, v in entry.items() if k != "metrics"}
    if isinstance(entry.get("metrics"), dict):
        flat.update(entry["metrics"])
    return flat


def _describe(entry: Any) -> str:
    """One line for a tensor or pass entry: its name, then the metrics it carries."""
    entry = _as_dict(entry)
    if not isinstance(entry, dict):
        return str(entry)
    flat = _flat(entry)
    name = str(next((flat[k] for k in ("tensor", "name", "output") if k in flat), ""))
    node = flat.get("candidate_node") or flat.get("node")
    if isinstance(node, dict):
        name += f" from {node.get('op', '?')} node '{node.get('name', '')}'"
    details = [f"{label} {_fmt_metric(k, flat[k])}"
               for k, label in (("max_abs", "max abs"), ("cosine", "cosine"), ("snr_db", "SNR dB"))
               if k in flat]
    if flat.get("reason"):
        details.append(str(flat["reason"]))
    return f"{name} ({'; '.join(details)})" if details else str(name or flat)


def _layerwise(report: Report) -> dict | None:
    """``report.layerwise`` as a dict (None without one); a list ``compared`` becomes a list of
    flat entries."""
    lw = _as_dict(getattr(report, "layerwise", None))
    if not isinstance(lw, dict):
        return None
    if isinstance(lw.get("tensors"), list):  # onnxopt.layerwise: a count and the tensors
        lw = dict(lw, compared=lw["tensors"])
    if isinstance(lw.get("compared"), list):
        lw = dict(lw, compared=[_flat(e) for e in lw["compared"]])
    return lw


def _table(head: list[str], rows: list[str], numeric: set[int] = frozenset()) -> str:
    ths = "".join(f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                  for i, h in enumerate(head))
    return f"<table>\n<thead><tr>{ths}</tr></thead>\n<tbody>\n" + "\n".join(rows) + \
        "\n</tbody>\n</table>"


def _row(cells: list[str], numeric: set[int] = frozenset(), cls: str = "",
         cell_cls: dict[int, str] | None = None) -> str:
    """A table row of already-escaped cell contents; ``numeric`` columns are right-aligned."""
    classes = {i: "n" for i in numeric} | (cell_cls or {})
    tds = "".join(f'<td class="{classes[i]}">{c}</td>' if i in classes else f"<td>{c}</td>"
                  for i, c in enumerate(cells))
    return f'<tr class="{cls}">{tds}</tr>' if cls else f"<tr>{tds}</tr>"


def _header(report: Report) -> str:
    verdict = report.verdict
    badge = f'<span class="verdict v-{verdict.replace(" ", "-")}">{_e(verdict)}</span>'
    meta = [("model", report.model)]
    if report.command == "validate":
        meta = [("reference", report.model), ("candidate", report.output or "–")]
    elif report.output:
        meta.append(("output", report.output))
    inputs = report.inputs or {}
    if inputs:
        feeds = len(inputs.get("feeds") or [])
        source = inputs.get("source", "–")
        if inputs.get("seed") is not None:
            source = f"{source} (seed {inputs['seed']})"
        meta.append(("inputs", f"{source}, {feeds} feed{'s' if feeds != 1 else ''}"))
    v = report.validation
    if v is not None:
        crit = (f"{describe_setting(v.max_drift)} per output" if v.mode == "lossy"
                else f"max abs ≤ {v.atol:g} + {v.rtol:g} × range per output")
        meta.append(("validation", f"{v.mode}: {crit}"))
        if v.reason:
            meta.append(("reason", v.reason))
    if report.rolled_back:
        meta.append(("rolled back", ", ".join(str(rb.get("pass")) for rb in report.rolled_back)))
    latency = getattr(report, "latency", None)
    if latency and latency.get("latency_ratio") is not None:
        meta.append(("latency", latency_text(latency, times="×", arrow="→")))
    meta += [("run time", f"{report.seconds:.2f} s"), ("tool", f"onnxopt {report.tool_version}")]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(val)}</dd>" for k, val in meta)
    return (f"<header>\n<h1>onnxopt {_e(report.command)} {badge}</h1>\n"
            f'<p class="sub">{_e(_headline(report))}</p>\n<dl class="meta">{items}</dl>\n'
            "</header>")


def _warnings_section(report: Report) -> str:
    """The run's warnings (about its inputs first), as the CLI prints them; "" when none."""
    warnings = [*(report.inputs or {}).get("warnings", []), *report.warnings]
    if not warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f"<section>\n<h2>Warnings</h2>\n<ul>{items}</ul>\n</section>"


def _headline(report: Report) -> str:
    """Nodes (subgraphs included) and file size before and after, in one line (the model path
    without an after)."""
    before, after = report.before, report.after
    if after is None:
        return report.model
    if report.command == "validate":
        return (f"reference {before.nodes_total} nodes, {human_bytes(before.file_bytes)}; "
                f"candidate {after.nodes_total} nodes, {human_bytes(after.file_bytes)}")

    def change(b: int, a: int) -> str:
        text = percent_change(b, a)
        return f" ({text})" if text else ""

    return (f"{before.nodes_total} → {after.nodes_total} nodes"
            f"{change(before.nodes_total, after.nodes_total)}, "
            f"{human_bytes(before.file_bytes)} → {human_bytes(after.file_bytes)}"
            f"{change(before.file_bytes, after.file_bytes)}")


def _change(before: float, after: float, relative: bool) -> str:
    if before == after:
        return ""
    cls = "down" if after < before else "up"
    if relative:
        text = percent_change(before, after)
    else:
        text = f"{after - before:+d}"
    return f'<span class="{cls}">{_e(text)}</span>'


def _model_section(report: Report) -> str:
    before, after = report.before, report.after
    if after is None:
        return ""
    labels = ("reference", "candidate") if report.command == "validate" else ("before", "after")
    num = {1, 2, 3}
    ops = [_row([_e(op), str(b), str(a), _change(b, a, relative=False)], num)
           for op in sorted(set(before.op_counts) | set(after.op_counts))
           for b, a in [(before.op_counts.get(op, 0), after.op_counts.get(op, 0))]]
    totals = [("nodes (main graph)", before.nodes, after.nodes, str),
              ("nodes (with subgraphs)", before.nodes_total, after.nodes_total, str),
              ("parameters", before.parameters, after.parameters, lambda n: f"{n:,}"),
              ("parameter bytes", before.parameter_bytes, after.parameter_bytes, human_bytes),
              ("file size", before.file_bytes, after.file_bytes, human_bytes)]
    packed = getattr(report, "compressed", None)
    if packed and packed.get("before") is not None and packed.get("after") is not None:
        totals.append((f"compressed file (zlib {packed['level']})", packed["before"],
                       packed["after"], human_bytes))
    totals = [_row([_e(label), _e(fmt(b)), _e(fmt(a)), _change(b, a, relative=True)], num)
              for label, b, a, fmt in totals]
    title = "Model" if report.command == "validate" else "Model before and after"
    return (f'<section>\n<h2>{title}</h2>\n<div class="cols">\n'
            + _table(["totals", *labels, "change"], totals, num) + "\n"
            + _table(["op type (main graph)", *labels, "change"], ops, num)
            + "\n</div>\n</section>")


def _passes_section(report: Report) -> str:
    if report.command != "optimize":
        return ""
    summary = pass_summary(report.passes)
    if not summary:
        return "<section>\n<h2>Passes</h2>\n<p class=\"muted\">No pass ran.</p>\n</section>"
    rows = [_row([_e(name), str(runs), _e(format_stats(stats)) or '<span class="muted">–</span>',
                  f"{secs * 1000:.0f} ms"], {1, 3}, cell_cls={2: "stats"})
            for name, runs, stats, secs in summary]
    total = sum(secs for *_, secs in summary)
    rows.append(_row(["total", str(len(report.passes)), "", f"{total * 1000:.0f} ms"], {1, 3},
                     cls="total"))
    upgrade = report.opset_upgrade
    note = (f"<p>Opset upgraded {upgrade['from']} → {upgrade['to']} for the passes that need it "
            "(validated against the original).</p>\n" if upgrade else "")
    return ("<section>\n<h2>Passes</h2>\n" + note
            + _table(["pass", "runs", "statistics", "time"], rows, {1, 3}) + "\n</section>")


def _validation_section(report: Report) -> str:
    v = report.validation
    if v is None:
        return ("<section>\n<h2>Validation</h2>\n<p class=\"muted\">Not validated "
                "(--no-validate).</p>\n</section>")
    keys = list(_METRICS)
    if any(m.argmax is not None for m in v.outputs):  # measured in lossy validations
        keys += ["argmax", "top_k"]
    extra = list(dict.fromkeys(k for m in v.outputs for k in m.extra))
    num = set(range(2, 2 + len(keys) + len(extra)))
    rows = []
    for m in v.outputs:
        shape = f"{m.dtype}{m.shape}"
        if (m.candidate_dtype, m.candidate_shape) != (m.dtype, m.shape):
            shape += f" → {m.candidate_dtype}{m.candidate_shape}"
        ok = "yes" if m.passed else f"NO: {m.reason}"
        rows.append(_row([_e(m.name), _e(shape)] + [_fmt_metric(k, getattr(m, k)) for k in keys]
                         + [_fmt(m.extra.get(k), ".4g") for k in extra] + [_e(ok)],
                         num, cls="" if m.passed else "bad"))
    feeds = f"{v.feeds} feed{'s' if v.feeds != 1 else ''}"
    head = ["output", "dtype and shape"] + [_HEADS[k] for k in keys] + extra + ["ok"]
    body = _table(head, rows, num) if rows else f'<p class="muted">{_e(v.reason)}</p>'
    return (f"<section>\n<h2>Validation ({_e(v.mode)}, {feeds}, worst case over feeds)</h2>\n"
            f"{body}\n</section>")


def _rolled_back_section(report: Report) -> str:
    if not report.rolled_back:
        return ""
    rows = []
    for rb in report.rolled_back:
        first = rb.get("first_divergence")
        rows.append(_row([_e(rb.get("pass", "")), _e(rb.get("reason", "")),
                          _e(_describe(first)) if first is not None else "–"]))
    return ("<section>\n<h2>Rolled-back passes</h2>\n<p class=\"muted\">Left out because the "
            "result with them failed validation.</p>\n"
            + _table(["pass", "failure it caused", "first divergence"], rows) + "\n</section>")


def _layerwise_section(report: Report) -> str:
    lw = _layerwise(report)
    if lw is None:
        return ""
    compared = lw.get("compared")
    count = len(compared) if isinstance(compared, list) else compared
    unmatched = lw.get("unmatched") or {}
    summary = (f"{lw.get('mode', '')} comparison of intermediate tensors: {count} compared, "
               f"{len(unmatched.get('candidate') or [])} of the candidate unmatched, "
               f"{len(lw.get('skipped') or [])} skipped.")
    parts = [f"<p>{_e(summary)}</p>"]
    if lw.get("reason"):
        parts.append(f'<p class="bad">Not compared: {_e(lw["reason"])}</p>')
    first = lw.get("first_divergence")
    if first:
        d = _flat(first)
        nodes = [_as_dict(d.get(k)) or {} for k in ("reference_node", "candidate_node")]
        num = {3, 4, 5}
        row = _row([_e(d.get("tensor", ""))]
                   + [_e(f"{n.get('op', '?')} {n.get('name', '')}") for n in nodes]
                   + [_fmt_metric(k, d.get(k)) for k in ("max_abs", "cosine", "snr_db")]
                   + [_e(d.get("reason", ""))], num, cls="bad")
        parts.append("<h3>First divergence</h3>\n" + _table(
            ["tensor", "reference node", "candidate node", "max abs", "cosine", "SNR dB",
             "reason"], [row], num))
    elif not lw.get("reason"):
        parts.append("<p>No shared tensor diverges.</p>")
    ranking = [_flat(r) for r in lw.get("ranking") or []]
    if ranking:
        num = {3, 4, 5}
        rows = [_row([_e((_as_dict(r.get("node")) or {}).get("name", "")),
                      _e((_as_dict(r.get("node")) or {}).get("op", "")), _e(r.get("tensor", ""))]
                     + [_fmt(r.get(k), ".1f")
                        for k in ("input_snr_db", "output_snr_db", "added_db")], num)
                for r in ranking]
        parts.append("<h3>Nodes adding the most error</h3>\n<p class=\"muted\">SNR drop from "
                     "the worst input to the output, in dB.</p>\n" + _table(
                         ["node", "op", "tensor", "input SNR dB", "output SNR dB", "added dB"],
                         rows, num))
    return "<section>\n<h2>Layer by layer</h2>\n" + "\n".join(parts) + "\n</section>"


def _chart_section(report: Report) -> str:
    lw = _layerwise(report)
    if lw is not None and isinstance(lw.get("compared"), list) and lw["compared"]:
        body = _layer_chart(lw)
        title = "Drift per layer"
    elif report.validation is not None and report.validation.outputs:
        body = _output_bars(report)
        title = "Drift per output"
    else:
        return ""
    return f"<section>\n<h2>{title}</h2>\n{body}\n</section>"


def _step(span: float, count: int) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) cutting ``span`` in about ``count``."""
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _scale(values: list[float | None]) -> tuple[float, float, list[float]]:
    """Bottom, top and ticks of a value axis from 0 (or the lowest value) to a round number above
    the largest finite value, leaving room above it for infinite values, which are drawn at the
    top (0 to 100 when nothing is finite)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = min([0.0, *finite]), max([0.0, *finite])
    if any(v == math.inf for v in values):
        high = high * 1.15 if high > 0 else 100.0
    if high <= low:
        high = low + 1.0
    step = _step(high - low, 5)
    bottom, top = math.floor(low / step) * step, math.ceil(high / step) * step
    return bottom, top, [bottom + i * step for i in range(round((top - bottom) / step) + 1)]


def _svg_open(width: int, height: int, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{_e(label)}">')


def _layer_chart(lw: dict) -> str:
    """Points, in the order given, of each compared tensor's SNR dB (or max abs error)."""
    compared = lw["compared"]
    snr = [_num(e.get("snr_db")) for e in compared]
    use_snr = any(s is not None and math.isfinite(s) for s in snr) or all(s is not None for s in snr)
    key, label = ("snr_db", "SNR dB") if use_snr else ("max_abs", "max abs error")
    values = [_num(e.get(key)) for e in compared]
    bottom, top, ticks = _scale(values)
    width, height, left, right, upper, lower = 1000, 320, 64, 16, 16, 44
    plot_w, plot_h = width - left - right, height - upper - lower
    n = len(compared)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    def y(v: float) -> float:
        return upper + plot_h * (1 - (v - bottom) / (top - bottom))

    parts = [_svg_open(width, height, f"{label} per tensor")]
    for t in ticks:
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(t):.1f}" '
                     f'y2="{y(t):.1f}"/><text x="{left - 6}" y="{y(t) + 4:.1f}" '
                     f'text-anchor="end">{_e(_fmt(t, ".3g"))}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{upper}" y2="{upper + plot_h}"/>'
                 f'<line class="axis" x1="{left}" x2="{width - right}" y1="{upper + plot_h}" '
                 f'y2="{upper + plot_h}"/>')
    parts.append(f'<text x="14" y="{upper + plot_h / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {upper + plot_h / 2:.0f})">{_e(label)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 f'compared tensors in topological order ({n})</text>')
    for i in range(0, n, max(1, math.ceil(_step(n, 10)))):
        parts.append(f'<text x="{x(i):.1f}" y="{upper + plot_h + 16}" '
                     f'text-anchor="middle">{i}</text>')
    first = _describe(lw.get("first_divergence")) if lw.get("first_divergence") else ""
    first_name = _flat(lw["first_divergence"]).get("tensor") if first else None
    points, line = [], []
    for i, (entry, v) in enumerate(zip(compared, values)):
        if v is None or math.isnan(v):
            continue
        exact = v == math.inf
        plotted = min(max(v, bottom), top)
        cls = "pt exact" if exact else "pt"
        if first_name is not None and entry.get("tensor") == first_name:
            first_name, cls = None, "pt bad"  # mark the first occurrence only
            parts.append(f'<line class="marker" x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{upper}" '
                         f'y2="{upper + plot_h}"/>')
        line.append(f"{x(i):.1f},{y(plotted):.1f}")
        points.append(f'<circle class="{cls}" cx="{x(i):.1f}" cy="{y(plotted):.1f}" r="3">'
                      f'<title>{_e(entry.get("tensor", i))}: {_e(label)} '
                      f'{_e(_fmt_metric(key, v))}</title></circle>')
    parts.append(f'<polyline class="line" points="{" ".join(line)}"/>')
    parts += points
    parts.append("</svg>")
    notes = []
    if use_snr and math.inf in values:
        notes.append("Green points at the top are identical to the reference (SNR ∞).")
    if first:
        notes.append(f"First divergence (dashed line): {first}.")
    legend = f'<p class="muted">{_e(" ".join(notes))}</p>' if notes else ""
    return "\n".join(parts) + "\n" + legend


def _search_section(report: Report) -> str:
    """The strength searches of the run: table and chart per searched pass."""
    parts = []
    for record in report.passes:
        search = record.stats.get("search") if isinstance(record.stats, dict) else None
        if not isinstance(search, dict) or not search.get("path"):
            continue
        ladder = list(search.get("ladder") or [])
        path = sorted(search["path"], key=lambda r: ladder.index(r["setting"])
                      if r["setting"] in ladder else len(ladder))
        metrics = [k for k in dict.fromkeys(k for row in path for k in row)
                   if k not in ("setting", "within", "size_bytes", "compressed_bytes",
                                "proposals")]
        rows = [_row([_e(row["setting"]) + (" (chosen)" if row["setting"] == search.get("chosen")
                                             else "")]
                     + [_fmt(row.get(m), ".6g") for m in metrics]
                     + ["yes" if row.get("within") else "no",
                        human_bytes(row.get("compressed_bytes", 0))],
                     set(range(1, len(metrics) + 3)), cls="" if row.get("within") else "bad")
                for row in path]
        table = _table(["setting", *metrics, "within", "weights, zlib 1"], rows,
                       set(range(1, len(metrics) + 3)))
        target = None
        budget = record.stats.get("drift_budget")
        if metrics and isinstance(budget, dict) and isinstance(budget.get("target"), dict):
            target = _num(budget["target"].get(metrics[0]))
        chart = _search_chart(path, metrics[0], target, search.get("chosen")) if metrics else ""
        notes = [f"Chose {search.get('option')} = {search.get('chosen')}"
                 + ("" if search.get("met_budget", True) else " (no setting met the budget)")
                 + "; drift assumed monotone in the setting (bisection)."]
        if search.get("per_layer"):
            notes.append(f"{len(search['per_layer'])} group(s) moved to a stronger setting "
                         "(per-layer strengths).")
        if search.get("latency_ratio") is not None:
            notes.append(f"Latency after / before: {search['latency_ratio']:.3f} "
                         f"({search.get('latency_note', 'noisy')}).")
        parts.append(f"<h3>{_e(record.name)}</h3>\n<p>{_e(' '.join(notes))}</p>\n{table}\n"
                     f"{chart}")
    if not parts:
        return ""
    return "<section>\n<h2>Strength search</h2>\n" + "\n".join(parts) + "\n</section>"


def _search_chart(path: list[dict], metric: str, target: float | None, chosen: Any) -> str:
    """A line chart of ``metric`` against the settings of ``path`` (in order, evenly spaced)."""
    values = [_num(row.get(metric)) for row in path]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    low, high = min(finite + ([target] if target is not None else [])), max(
        finite + ([target] if target is not None else []))
    if high <= low:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.1
    low, high = low - pad, high + pad
    width, height, left, right, upper, lower = 640, 260, 72, 16, 16, 44
    plot_w, plot_h = width - left - right, height - upper - lower
    n = len(path)

    def x(i: int) -> float:
        return left + plot_w * (i + 0.5) / n

    def y(v: float) -> float:
        return upper + plot_h * (1 - (v - low) / (high - low))

    parts = [_svg_open(width, height, f"{metric} per setting")]
    for t in (low + (high - low) * k / 4 for k in range(5)):
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(t):.1f}" '
                     f'y2="{y(t):.1f}"/><text x="{left - 6}" y="{y(t) + 4:.1f}" '
                     f'text-anchor="end">{_e(_fmt(t, ".4g"))}</text>')
    parts.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{upper}" y2="{upper + plot_h}"/>'
                 f'<line class="axis" x1="{left}" x2="{width - right}" y1="{upper + plot_h}" '
                 f'y2="{upper + plot_h}"/>')
    parts.append(f'<text x="14" y="{upper + plot_h / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {upper + plot_h / 2:.0f})">{_e(metric)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
                 'setting (weakest first)</text>')
    if target is not None:
        parts.append(f'<line class="marker" x1="{left}" x2="{width - right}" '
                     f'y1="{y(target):.1f}" y2="{y(target):.1f}"><title>target '
                     f'{_e(_fmt(target, ".6g"))}</title></line>')
    line, points = [], []
    for i, (row, v) in enumerate(zip(path, values)):
        parts.append(f'<text x="{x(i):.1f}" y="{upper + plot_h + 16}" text-anchor="middle">'
                     f'{_e(row["setting"])}</text>')
        if v is None or not math.isfinite(v):
            continue
        cls = "pt" + ("" if row.get("within") else " bad") + (
            " exact" if row["setting"] == chosen else "")
        line.append(f"{x(i):.1f},{y(v):.1f}")
        points.append(f'<circle class="{cls}" cx="{x(i):.1f}" cy="{y(v):.1f}" '
                      f'r="{5 if row["setting"] == chosen else 3}"><title>{_e(row["setting"])}: '
                      f'{_e(metric)} {_e(_fmt(v, ".6g"))}</title></circle>')
    parts.append(f'<polyline class="line" points="{" ".join(line)}"/>')
    parts += points
    parts.append("</svg>")
    return "\n".join(parts) + ('\n<p class="muted">Dashed: the budget\'s target; red: '
                               'outside the budget; large green: the chosen setting.</p>')


def _output_bars(report: Report) -> str:
    """One horizontal bar per output: its SNR dB; identical outputs reach the end (∞)."""
    outputs = report.validation.outputs
    snrs = [_num(m.snr_db) for m in outputs]
    _, top, ticks = _scale([max(s, 0.0) if s is not None else None for s in snrs])
    width, row_h, label_w, value_w, upper = 1000, 30, 220, 260, 24
    bar_w = width - label_w - value_w
    height = upper + row_h * len(outputs) + 26

    def x(v: float) -> float:
        return label_w + bar_w * min(max(v, 0.0), top) / top

    parts = [_svg_open(width, height, "SNR dB per output")]
    for t in ticks:
        parts.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{upper - 6}" '
                     f'y2="{height - 26}"/><text x="{x(t):.1f}" y="{height - 10}" '
                     f'text-anchor="middle">{_e(_fmt(t, ".3g"))}</text>')
    parts.append(f'<text x="{label_w + bar_w / 2:.0f}" y="14" text-anchor="middle">'
                 f'SNR dB (worst feed; longer is closer to the reference)</text>')
    for i, (m, s) in enumerate(zip(outputs, snrs)):
        top_y = upper + i * row_h
        name = m.name if len(m.name) <= 30 else m.name[:29] + "…"
        parts.append(f'<text x="{label_w - 8}" y="{top_y + row_h / 2 + 4:.0f}" '
                     f'text-anchor="end"><title>{_e(m.name)}</title>{_e(name)}</text>')
        s = -math.inf if s is None or math.isnan(s) else s
        cls = "pt" + (" exact" if s == math.inf else "") + ("" if m.passed else " bad")
        parts.append(f'<rect class="{cls}" x="{label_w}" y="{top_y + 5}" '
                     f'width="{max(x(s) - label_w, 1.0):.1f}" height="{row_h - 10}">'
                     f'<title>{_e(m.name)}: SNR {_e(_fmt(s, ".1f"))} dB, cosine '
                     f'{_e(_fmt(m.cosine, ".6f"))}</title></rect>')
        value = ("identical (SNR ∞)" if s == math.inf
                 else f"{_fmt(s, '.1f')} dB, cosine {_fmt(m.cosine, '.6f')}")
        parts.append(f'<text x="{x(s) + 6:.1f}" y="{top_y + row_h / 2 + 4:.0f}">'
                     f'{_e(value)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
