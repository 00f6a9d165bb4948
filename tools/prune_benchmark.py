"""Benchmark pruning, clustering and the strength search (issue 10's targets), side by side.

    python tools/prune_benchmark.py --out DIR [--models NAME ...]
                                    [--sections sparsity,cluster,structured,search] [--quick]

Sections (each row that cannot run -- a pass or option not there yet, a peer failing -- is a row
saying so, never a crash of the run):

* ``sparsity`` (models with MatMul weights, MiniLM by default): the MatMul weights pruned to 30 %,
  50 %, 70 % and 2:4 by
  - numpy references computed here: magnitude ``|w|`` and Wanda ``|w_kn| ||x_k||_2`` (Sun et al.
    2023, "A Simple and Effective Pruning Approach for Large Language Models", section 3),
    both compared per output row (per column ``n`` of ``W [K, N]``; N:M groups along ``K``), and
    SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
    Pruned in One-Shot", algorithm 1: the mask chosen per block of 128 input rows by
    ``w^2 / [H^-1]_kk^2``, the pruning error spread over the rows not yet visited with the
    Cholesky factor of the damped inverse Hessian ``H = 2 X^T X + λ I``), every layer
    calibrated on the original model's inputs (one-shot, not sequential);
  - onnxsim's pruning (``apply_magnitude_pruning``, ``apply_wanda_pruning``,
    ``apply_sparsegpt_pruning``, calibration feeds given), a peer of ``tools/bench_peers.txt``;
  - onnxopt's ``prune`` pass through the API (magnitude, activation importance, + reconstruct,
    + sensitivity allocation) with the drift budget off (``validate=False``): the raw quality at
    that strength; MiniLM's statistics over the real tokens (``drift_mask``, :func:`masked`),
    as every onnxopt row of every section.
  Quality on the evaluation feeds; size and zlib-compressed size (level 6) of each file (dense
  kernels: pruning alone buys no latency in onnxruntime, so none is timed).
* ``cluster``: ``cluster_weights`` at 256 and 16 clusters, and at 16 with per-channel codebooks
  and the GPTVQ assignment, with float16 codebooks, and with the tensors of most measured drift
  at 256 under a size budget (``CLUSTER_ROWS``; that row runs the drift budget on the
  calibration feeds to measure, ``CLUSTER_MEASURED``; and onnxsim's 4-bit k-means, which
  folds the codebook back into float32): quality, file size and compressed size as % of fp32,
  latency ratio.
* ``structured``: ``prune_channels`` (after the lossless passes, activation importance and
  reconstruction, MiniLM's statistics over real tokens) at FLOP cuts of its ladder, and at
  0.2 / 0.4 offered to the drift budget at cosine 0.99 (measured on the calibration feeds):
  FLOPs removed (the pass's statistics), quality, latency ratio to the original.
* ``search``: ``prune`` sparsity ``"auto"`` and ``cluster_weights`` clusters ``"auto"`` under
  ``max_drift`` cosine 0.99 (the budget measured on the calibration feeds): the setting chosen
  and the drift on the evaluation feeds.

Measuring (``tools/quant_benchmark.py``'s helpers): onnxruntime CPU, 2 intra-op threads, the
variants of one model timed in turn (interleaved) with the original; accuracy against the
original's outputs on ``models/data/<model>/evaluation`` with the model's task metric
(``tools/tasks.py``), calibration on ``models/data/<model>/calibration`` only.

Writes ``DIR/prune_benchmark.md`` (also printed) and ``DIR/prune_benchmark.json``; the models
stay in ``DIR/<model>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.quant_benchmark import (TASKS, Task, ZOO, _one_line, _progress,  # noqa: E402
                                   data_sets, evaluate, file_bytes, run, session,
                                   time_interleaved)
from tools.quant_peers import load_feeds  # noqa: E402

import onnxopt  # noqa: E402
import onnxopt.passes  # noqa: E402,F401  (registers every pass)
from onnxopt.analyses.activations import collect  # noqa: E402
from onnxopt.pass_manager import REGISTRY  # noqa: E402

SECTIONS = ("sparsity", "cluster", "structured", "search")
DEFAULT_MODELS = ("minilm_l6", "ch_PP-OCRv4_rec_infer", "ch_PP-OCRv4_det_infer",
                  "ch_ppocr_mobile_v2.0_cls_infer")
#: Strengths of the sparsity table: a fraction of zeros per output row, or an N:M pattern.
SPARSITIES = {"30 %": 0.3, "50 %": 0.5, "70 %": 0.7, "2:4": "2:4"}
#: onnxopt's prune rows: options added to the strength's (a later row extends the earlier one).
ONNXOPT_PRUNE = {"magnitude": {"scope": "row", "importance": "magnitude"},
                 "activation": {"importance": "activation"},
                 "+ reconstruct": {"reconstruct": True},
                 "+ sensitivity allocation": {"allocation": "sensitivity"}}
STRUCTURED_FLOPS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
#: prune_channels' options beside the FLOP cut: channels ranked by their calibration activations
#: (magnitude ranking loses far more: rec CER 0.12 against 0.01 at 5 %), next layer refit.
STRUCTURED_OPTIONS = {"importance": "activation", "reconstruct": True}
#: FLOP cuts offered to the drift budget at ``SEARCH_DRIFT`` (the points whose drift meets it).
STRUCTURED_BUDGETED = (0.2, 0.4)
SEARCH_DRIFT = {"cosine": 0.99}
#: cluster_weights' rows: setting -> options (the defaults, then the 4-bit recipe with one
#: codebook per output and the Hessian-compensated assignment on the calibration feeds).
CLUSTER_ROWS = {"K=256": {"clusters": 256}, "K=16": {"clusters": 16},
                "K=16 per-channel gptvq": {"clusters": 16, "per_channel": True,
                                           "method": "gptvq"},
                "K=16 per-channel gptvq, fp16 codebooks": {
                    "clusters": 16, "per_channel": True, "method": "gptvq",
                    "codebook_dtype": "float16"},
                "K=16 per-channel gptvq, fp16 codebooks, K=256 by measured drift, "
                "size 0.148": {
                    "clusters": 16, "per_channel": True, "method": "gptvq",
                    "codebook_dtype": "float16", "wide_clusters": 256, "size_budget": 0.148}}
#: The mixed-strength row measures each tensor's drift with the drift budget (on the calibration
#: feeds, over real tokens): a budget loose enough to accept every proposal, used to measure.
CLUSTER_MEASURED = {"validate": True, "max_drift": {"cosine": 0.5}}
SPARSEGPT_BLOCK = 128
SPARSEGPT_DAMP = 0.01
ZLIB_LEVEL = 6


@dataclass
class Row:
    """One variant of one model, as measured."""

    section: str
    model: str
    method: str
    setting: str
    status: str = "ok"  # "ok" | "n/a" | "failed"
    detail: str = ""
    seconds: float | None = None
    metric: float | None = None
    min_cosine: float | None = None
    sparsity: float | None = None  # zeros among the model's MatMul weights
    size_pct: float | None = None
    zlib_pct: float | None = None
    latency_ratio: float | None = None
    flops_removed: float | None = None
    chosen: str = ""
    stats: dict = field(default_factory=dict)


class Bench:
    """One model's data, reference outputs and the variants measured against them."""

    def __init__(self, name: str, out: Path, quick: bool) -> None:
        self.name, self.source = name, ZOO / f"{name}.onnx"
        self.task = TASKS.get(name, Task("other", "cosine"))
        self.calibration, self.evaluation, self.data = data_sets(name)
        self.out = out / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = onnx.load(str(self.source))
        self.reference_session = session(self.source)
        inputs = [i.name for i in self.reference_session.get_inputs()]
        self.feeds = load_feeds(self.evaluation, inputs)
        self.calibration_feeds = load_feeds(self.calibration, inputs)
        if quick:
            self.feeds, self.calibration_feeds = self.feeds[:4], self.calibration_feeds[:8]
        self.reference = [run(self.reference_session, f) for f in self.feeds]
        self.fp32_bytes = file_bytes(self.source)
        self.fp32_zlib = len(zlib.compress(self.source.read_bytes(), ZLIB_LEVEL))
        self.weights = matmul_weights(self.model)

    def measure(self, row: Row, path: Path) -> None:
        """Fill ``row``'s quality, sparsity and sizes from the model at ``path``."""
        try:
            outputs = [run(session(path), f) for f in self.feeds]
            row.metric, row.min_cosine, _ = evaluate(self.reference, outputs, self.feeds,
                                                     self.task.metric)
        except Exception as exc:  # onnxruntime raises several unrelated types for a bad model
            row.status, row.detail = "failed", f"run: {_one_line(exc)}"
            return
        model = onnx.load(str(path))
        row.sparsity = weight_sparsity(model, [w for _, w in matmul_weights(model)])
        row.size_pct = 100.0 * file_bytes(path) / self.fp32_bytes
        row.zlib_pct = 100.0 * len(zlib.compress(path.read_bytes(), ZLIB_LEVEL)) / self.fp32_zlib

    def path(self, label: str) -> Path:
        """Where the variant ``label`` is saved."""
        return self.out / (label.replace(" ", "_").replace(":", "-").replace("/", "_")
                           .replace("+", "p").replace("%", "pct") + ".onnx")

    def save(self, model: onnx.ModelProto, label: str) -> Path:
        path = self.path(label)
        onnx.save(model, str(path))
        return path

    def latency(self, rows: list[Row], paths: dict[int, Path], repeat: int) -> None:
        """Time the original and every row's model in turn; fill the rows' latency ratios."""
        sessions = {"fp32": self.reference_session}
        for i, path in paths.items():
            sessions[str(i)] = session(path)
        found = time_interleaved(sessions, self.feeds[0], repeat)
        for i in paths:
            rows[i].latency_ratio = found[str(i)] / found["fp32"]


def matmul_weights(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(activation, weight)`` names of the MatMuls multiplying an activation by a 2-D
    initializer ``[K, N]`` (``Y = X W``)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return [(n.input[0], n.input[1]) for n in model.graph.node
            if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
            and n.input[0] not in shapes]


def weight_sparsity(model: onnx.ModelProto, names: list[str]) -> float | None:
    """Fraction of zeros among the initializers ``names`` of ``model``."""
    found = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name in names]
    total = sum(a.size for a in found)
    return sum(int(np.count_nonzero(a == 0)) for a in found) / total if total else None


# ---- numpy reference criteria (the "peer" columns of issue 10's table) -----------------------

def keep_mask(score: np.ndarray, strength: float | str) -> np.ndarray:
    """True where ``score [K, N]`` keeps its weight: per column ``n`` the ``1 - s`` highest
    along ``K``, or with ``"N:M"`` the ``N`` highest of each group of ``M`` consecutive rows."""
    k, n = score.shape
    if isinstance(strength, str):
        keep, group = (int(x) for x in strength.split(":"))
        grouped = score[:k - k % group].reshape(-1, group, n)
        order = np.argsort(np.argsort(-grouped, axis=1), axis=1)
        mask = np.ones_like(score, bool)
        mask[:k - k % group] = (order < keep).reshape(-1, n)
        return mask
    drop = int(round(k * strength))
    mask = np.ones_like(score, bool)
    np.put_along_axis(mask, np.argsort(score, axis=0)[:drop], False, axis=0)
    return mask


def sparsegpt(w: np.ndarray, gram: np.ndarray, strength: float | str) -> np.ndarray:
    """SparseGPT (module docstring) of ``w [K, N]`` given ``gram = X^T X [K, K]``: unstructured
    masks share one threshold per block of input rows (the reference implementation's rule),
    N:M masks are chosen per group as the block reaches it."""
    k, n = w.shape
    h = 2.0 * gram.astype(np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += SPARSEGPT_DAMP * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    work = w.astype(np.float64)
    work[dead] = 0.0
    group = int(strength.split(":")[1]) if isinstance(strength, str) else None
    for start in range(0, k, SPARSEGPT_BLOCK):
        stop = min(start + SPARSEGPT_BLOCK, k)
        block_score = work[start:stop] ** 2 / np.diag(u)[start:stop, None] ** 2
        if group is None:
            cut = np.sort(block_score.ravel())[int(block_score.size * strength)]
            mask = block_score >= cut
        errors = np.zeros((stop - start, n))
        for i in range(start, stop):
            if group is not None and (i - start) % group == 0:
                part = work[i:i + group] ** 2 / np.diag(u)[i:i + group, None] ** 2
                mask_group = keep_mask(part, strength) if part.shape[0] == group else \
                    np.ones_like(part, bool)
            keep = mask_group[(i - start) % group] if group is not None else mask[i - start]
            pruned = work[i] * keep
            errors[i - start] = (work[i] - pruned) / u[i, i]
            work[i + 1:stop] -= np.outer(u[i, i + 1:stop], errors[i - start])
            work[i] = pruned
        work[stop:] -= u[start:stop, stop:].T @ errors
    return work.astype(w.dtype)


def numpy_pruned(bench: Bench, method: str, strength: float | str, stats) -> onnx.ModelProto:
    """``bench``'s model with its MatMul weights pruned by ``method`` (magnitude, wanda,
    sparsegpt) at ``strength``; ``stats`` are the original model's input statistics."""
    model = onnx.ModelProto()
    model.CopyFrom(bench.model)
    by_name = {t.name: t for t in model.graph.initializer}
    for activation, name in bench.weights:
        w = numpy_helper.to_array(by_name[name])
        if method == "sparsegpt":
            new = sparsegpt(w, stats[activation].gram, strength)
        else:
            score = np.abs(w.astype(np.float64))
            if method == "wanda":
                score = score * stats[activation].channel_norm[:, None]
            new = w * keep_mask(score, strength)
        by_name[name].CopyFrom(numpy_helper.from_array(new.astype(w.dtype), name))
    return model


# ---- onnxopt and onnxsim rows ------------------------------------------------------------------

def missing(pass_name: str, options: dict) -> str:
    """Why onnxopt cannot run ``pass_name`` with ``options`` yet ("" when it can)."""
    cls = REGISTRY.get(pass_name)
    if cls is None:
        return f"n/a (pass '{pass_name}' missing)"
    names = {f.name for f in dataclasses.fields(cls.Options)}
    absent = sorted(set(options) - names)
    if absent:
        return f"n/a (option missing: {', '.join(absent)})"
    refused = cls.Options(**options).check()
    return f"n/a ({refused})" if refused else ""


def onnxopt_row(bench: Bench, row: Row, pass_name: str, options: dict, lossless: bool = False,
                **keywords) -> Path | None:
    """Run ``onnxopt.optimize`` with ``pass_name`` and ``options`` (after the lossless pipeline
    with ``lossless``), save and measure the result in ``row``; the path of the model, or None
    when it did not run."""
    reason = missing(pass_name, options)
    if reason:
        row.status, row.detail = "n/a", reason
        return None
    keywords.setdefault("validate", False)
    started = time.perf_counter()
    try:
        model, report = onnxopt.optimize(
            str(bench.source), passes=["default", pass_name] if lossless else [pass_name],
            options={pass_name: options},
            calibration=bench.calibration_feeds, raise_on_failure=False, **keywords)
    except Exception as exc:  # a pass being written may raise anything; the row says what
        row.status, row.detail = "failed", f"{type(exc).__name__}: {_one_line(exc)}"
        _progress(traceback.format_exc(limit=3))
        return None
    row.seconds = time.perf_counter() - started
    for record in report.passes:
        if record.name == pass_name:
            row.stats = record.stats
    if report.validation is not None and not report.validation.passed:
        row.detail = f"validation: {_one_line(report.validation.reason, 150)}"
    path = bench.save(model, f"{row.section}_{row.method}_{row.setting}")
    bench.measure(row, path)
    return path


def _onnxsim_child(function: str, source: str, kwargs: dict, path: str) -> None:
    import onnxsim
    onnx.save(getattr(onnxsim, function)(source, **kwargs), path)


def onnxsim_row(bench: Bench, row: Row, function: str, timeout: float, **kwargs) -> Path | None:
    """Run onnxsim's ``function`` (a pruning or k-means entry point) on the model in a child
    process killed after ``timeout`` seconds."""
    path = bench.path(f"{row.section}_{row.method}_{row.setting}")
    path.unlink(missing_ok=True)
    child = multiprocessing.get_context("spawn").Process(
        target=_onnxsim_child, args=(function, str(bench.source), kwargs, str(path)))
    started = time.perf_counter()
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        row.status, row.detail = "failed", f"timeout: over {timeout:g} s"
        return None
    row.seconds = time.perf_counter() - started
    if child.exitcode != 0 or not path.is_file():
        row.status, row.detail = "failed", f"onnxsim.{function} exited {child.exitcode}"
        return None
    bench.measure(row, path)
    return path


def strength_options(strength: float | str) -> dict:
    return {"pattern": strength} if isinstance(strength, str) else {"sparsity": strength}


def nm(strength: float | str) -> dict:
    """onnxsim's keywords for ``strength``."""
    if isinstance(strength, str):
        n, m = (int(x) for x in strength.split(":"))
        return {"n": n, "m": m}
    return {"sparsity": strength}


# ---- sections ----------------------------------------------------------------------------------

def section_sparsity(bench: Bench, strengths: list[str], families: list[str],
                     timeout: float) -> Iterator[Row]:
    if not bench.weights:
        yield Row("sparsity", bench.name, "-", "-", "n/a", "no MatMul with a 2-D weight")
        return
    stats = None
    if "numpy" in families:
        activations = {a: -1 for a, _ in bench.weights}
        started = time.perf_counter()
        stats = collect(bench.model, activations, iter(bench.calibration_feeds),
                        grams=list(activations), histograms=False)
        _progress(f"{bench.name}: input statistics of {len(activations)} MatMul inputs in "
                  f"{time.perf_counter() - started:.0f} s")
    for label in strengths:
        strength = SPARSITIES[label]
        for method in ("magnitude", "wanda", "sparsegpt") if "numpy" in families else ():
            row = Row("sparsity", bench.name, f"numpy {method}", label)
            _progress(f"{bench.name}: {row.method} {label}")
            started = time.perf_counter()
            model = numpy_pruned(bench, method, strength, stats)
            row.seconds = time.perf_counter() - started
            bench.measure(row, bench.save(model, f"sparsity_{row.method}_{label}"))
            yield row
        for method, function in (("magnitude", "apply_magnitude_pruning"),
                                 ("wanda", "apply_wanda_pruning"),
                                 ("sparsegpt", "apply_sparsegpt_pruning")
                                 ) if "onnxsim" in families else ():
            row = Row("sparsity", bench.name, f"onnxsim {method}", label)
            _progress(f"{bench.name}: {row.method} {label}")
            data = {} if method == "magnitude" else {"calibration_data": bench.calibration_feeds}
            onnxsim_row(bench, row, function, timeout, **data, **nm(strength))
            yield row
        options = strength_options(strength)
        for method, extra in ONNXOPT_PRUNE.items() if "onnxopt" in families else ():
            options = {**options, **extra}
            row = Row("sparsity", bench.name, f"onnxopt {method}", label)
            _progress(f"{bench.name}: {row.method} {label} {options}")
            onnxopt_row(bench, row, "prune", options, **masked(bench))
            yield row


def masked(bench: Bench) -> dict:
    """``drift_mask`` for a model with an ``attention_mask`` input (MiniLM): its calibration
    statistics (Wanda norms, Gram matrices, cluster weighting) then leave the padding out, as
    the masked cosine that judges it does; empty for any other model."""
    return {"drift_mask": "attention_mask"} if "attention_mask" in bench.feeds[0] else {}


def section_cluster(bench: Bench, repeat: int, timeout: float) -> list[Row]:
    rows, paths = [], {}
    for setting, options in CLUSTER_ROWS.items():
        row = Row("cluster", bench.name, "onnxopt cluster_weights", setting)
        _progress(f"{bench.name}: {row.method} {row.setting}")
        measured = {**CLUSTER_MEASURED, "inputs": bench.calibration_feeds} \
            if "wide_clusters" in options else {}
        path = onnxopt_row(bench, row, "cluster_weights", options, **measured, **masked(bench))
        if path is not None and row.status == "ok":
            paths[len(rows)] = path
        rows.append(row)
    row = Row("cluster", bench.name, "onnxsim k-means (float32 codebook folded back)", "K=16")
    path = onnxsim_row(bench, row, "quantize_weight_only_kmeans", timeout)
    if path is not None and row.status == "ok":
        paths[len(rows)] = path
    rows.append(row)
    if paths:
        bench.latency(rows, paths, repeat)
    return rows


def flops_removed(stats: dict) -> float | None:
    """The fraction of FLOPs removed, from ``prune_channels``' statistics (whichever of its
    keys says it)."""
    for key in ("flops_removed", "flops_removed_fraction", "flops_fraction_removed"):
        if isinstance(stats.get(key), (int, float)):
            return float(stats[key])
    before, after = stats.get("flops_before"), stats.get("flops_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
        return 1.0 - after / before
    flops = stats.get("flops")
    return flops_removed(flops) if isinstance(flops, dict) else None


def section_structured(bench: Bench, repeat: int, quick: bool) -> list[Row]:
    rows, paths = [], {}
    # the drift budget keeps the layers whose removal costs too much (on the calibration feeds,
    # like the search rows); measured, as every row, on the evaluation feeds
    budgeted = {"validate": True, "inputs": bench.calibration_feeds, "max_drift": SEARCH_DRIFT}
    settings = [(f"flops={f:g}", f, {}) for f in ((0.1, 0.3) if quick else STRUCTURED_FLOPS)]
    settings += [(f"flops={f:g}, max_drift cosine {SEARCH_DRIFT['cosine']}", f, budgeted)
                 for f in (() if quick else STRUCTURED_BUDGETED)]
    for setting, flops, extra in settings:
        row = Row("structured", bench.name, "onnxopt prune_channels", setting)
        _progress(f"{bench.name}: {row.method} {row.setting}")
        # after the lossless pipeline, as the CLI runs it (prune_channels works on the fused
        # graph: constant Reshape shapes, folded BatchNormalizations); statistics of the real
        # tokens alone where the outputs are judged on them (MiniLM)
        path = onnxopt_row(bench, row, "prune_channels", {"flops": flops, **STRUCTURED_OPTIONS},
                           lossless=True, **extra, **masked(bench))
        row.flops_removed = flops_removed(row.stats)
        if path is not None and row.status == "ok":
            paths[len(rows)] = path
        rows.append(row)
        if row.status == "n/a":
            break  # nothing the pass can remove in this model: no other setting either
    if paths:
        bench.latency(rows, paths, repeat)
    return rows


def chosen_setting(stats: dict, option: str) -> str:
    """What the strength search chose, from the pass's statistics (its ``search`` record)."""
    search = stats.get("search") or stats.get("strength_search") or {}
    if isinstance(search, dict):
        for key in ("chosen", "setting", "value", option):
            if key in search:
                return str(search[key])
    if option in stats:
        return str(stats[option])
    return json.dumps(search, default=str)[:120] if search else "?"


def section_search(bench: Bench) -> Iterator[Row]:
    for pass_name, option in (("prune", "sparsity"), ("cluster_weights", "clusters")):
        row = Row("search", bench.name, f"onnxopt {pass_name}",
                  f"{option}=auto, max_drift cosine {SEARCH_DRIFT['cosine']}")
        _progress(f"{bench.name}: {row.method} {row.setting}")
        onnxopt_row(bench, row, pass_name, {option: "auto"}, validate=True,
                    inputs=bench.calibration_feeds, max_drift=SEARCH_DRIFT)
        row.chosen = chosen_setting(row.stats, option) if row.stats else ""
        yield row


# ---- output ------------------------------------------------------------------------------------

def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def _cell(row: Row, metric: str) -> str:
    if row.status != "ok":
        return row.detail if row.status == "n/a" else f"failed: {row.detail[:80]}"
    value = _fmt(row.metric, ".3f" if metric == "cer" else ".4f")
    return value + (f" ({row.sparsity:.0%})" if row.sparsity is not None else "")


def sparsity_table(rows: list[Row], metric: str) -> list[str]:
    """Strengths down, methods across: the metric with the measured MatMul sparsity."""
    methods = list(dict.fromkeys(r.method for r in rows))
    settings = list(dict.fromkeys(r.setting for r in rows))
    cell = {(r.method, r.setting): r for r in rows}
    lines = ["| sparsity | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for s in settings:
        lines.append(f"| {s} | " + " | ".join(
            _cell(cell[m, s], metric).replace("|", "/") if (m, s) in cell else "–"
            for m in methods) + " |")
    lines += ["", "| method | sparsity | file % fp32 | zlib % of fp32's zlib | seconds |",
              "|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.setting} | {_fmt(r.size_pct, '.1f')} | {_fmt(r.zlib_pct, '.1f')}"
              f" | {_fmt(r.seconds, '.0f')} |" for r in rows if r.status == "ok"]
    return lines


def rows_table(rows: list[Row], metric: str) -> list[str]:
    lines = ["| method | setting | chosen | " + metric + " | min cosine | sparsity | FLOPs removed"
             " | file % | zlib % | latency | seconds | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = r.detail if r.status == "ok" else f"**{r.status}**: {r.detail}"
        lines.append(
            f"| {r.method} | {r.setting} | {r.chosen} | "
            f"{_fmt(r.metric, '.3f' if metric == 'CER vs fp32' else '.4f')}"
            f" | {_fmt(r.min_cosine, '.4f')} | {_fmt(r.sparsity, '.1%')}"
            f" | {_fmt(r.flops_removed, '.1%')} | {_fmt(r.size_pct, '.1f')}"
            f" | {_fmt(r.zlib_pct, '.1f')} | {_fmt(r.latency_ratio, '.2f', 'x')}"
            f" | {_fmt(r.seconds, '.0f')} | {notes.replace('|', '/')[:200]} |")
    return lines


def markdown(benches: dict[str, Bench], rows: list[Row], repeat: int) -> str:
    from tools.quant_benchmark import METRIC_LABELS
    lines = []
    for name, bench in benches.items():
        label = METRIC_LABELS[bench.task.metric]
        mine = [r for r in rows if r.model == name]
        lines += [f"### {name}", "", f"fp32 {bench.fp32_bytes / 1e6:.1f} MB (zlib "
                  f"{bench.fp32_zlib / 1e6:.1f} MB); data: {bench.data}; "
                  f"{len(bench.calibration_feeds)} calibration / {len(bench.feeds)} evaluation "
                  "feeds.", ""]
        for section in SECTIONS:
            part = [r for r in mine if r.section == section]
            if not part:
                continue
            lines += [f"#### {section}", ""]
            lines += (sparsity_table(part, bench.task.metric) if section == "sparsity"
                      else rows_table(part, label))
            lines.append("")
    lines.append("Sparsity cells: the model's task metric on the evaluation feeds against the "
                 "original's outputs, with the measured fraction of zeros among its MatMul "
                 "weights in parentheses; numpy rows are this tool's references, onnxsim rows "
                 "onnxsim's own pruning (onnxsim.pruning). Latency: onnxruntime CPU, 2 intra-op "
                 f"threads, median of {repeat} interleaved rounds, ratio to the original in the "
                 "same run. onnxopt's fixed-strength rows run with validate=False (no drift "
                 "budget); search rows with the budget measured on the calibration feeds.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for models and results")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--sparsity-models", nargs="+", default=["minilm_l6"], metavar="NAME",
                        help="models of the sparsity, cluster and search sections "
                             "(default minilm_l6)")
    parser.add_argument("--sparsities", default=",".join(SPARSITIES),
                        help="strengths of the sparsity section, comma-separated, of "
                             + ",".join(SPARSITIES).replace("%", "%%") + " (default all)")
    parser.add_argument("--families", default="numpy,onnxsim,onnxopt",
                        help="rows of the sparsity section: numpy, onnxsim, onnxopt (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer strengths and feeds (a smoke run, not a measurement)")
    parser.add_argument("--repeat", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--peer-timeout", type=float, default=300.0,
                        help="seconds per onnxsim call before it is killed (default 300)")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    absent = [m for m in {*args.models, *args.sparsity_models} if not (ZOO / f"{m}.onnx").is_file()]
    if absent:
        parser.error(f"not fetched (tools/fetch_models.py): {absent}")
    args.families = args.families.split(",")
    args.sparsities = [f"{s} %" if s.isdigit() else s for s in args.sparsities.split(",")]
    if set(args.sparsities) - set(SPARSITIES):
        parser.error(f"unknown sparsities {args.sparsities}; known: {', '.join(SPARSITIES)}")
    if args.quick:
        args.repeat = min(args.repeat, 3)
        args.sparsities = [s for s in args.sparsities if s in ("50 %", "2:4")]
    return args


def write(args: argparse.Namespace, benches: dict[str, Bench], rows: list[Row],
          seconds: float) -> None:
    (args.out / "prune_benchmark.md").write_text(markdown(benches, rows, args.repeat) + "\n")
    payload = {"argv": sys.argv, "seconds": seconds, "load_average": os.getloadavg(),
               "repeat": args.repeat, "rows": [asdict(r) for r in rows]}
    (args.out / "prune_benchmark.json").write_text(json.dumps(payload, indent=2, default=str)
                                                   + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    benches: dict[str, Bench] = {}
    rows: list[Row] = []
    for name in dict.fromkeys([*args.sparsity_models, *args.models]):
        wanted = [s for s in args.sections
                  if (s == "structured" and name in args.models)
                  or (s != "structured" and name in args.sparsity_models)]
        if not wanted:
            continue
        bench = benches[name] = Bench(name, args.out.resolve(), args.quick)
        for section in wanted:
            if section == "sparsity":
                found = section_sparsity(bench, args.sparsities, args.families,
                                         args.peer_timeout)
            elif section == "cluster":
                found = section_cluster(bench, args.repeat, args.peer_timeout)
            elif section == "structured":
                found = section_structured(bench, args.repeat, args.quick)
            else:
                found = section_search(bench)
            for row in found:  # written after every row: an interrupted run keeps its rows
                rows.append(row)
                write(args, benches, rows, time.perf_counter() - started)
    print(markdown(benches, rows, args.repeat))
    _progress(f"done in {time.perf_counter() - started:.0f} s; wrote {args.out}/"
              "prune_benchmark.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
