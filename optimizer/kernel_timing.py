"""Kernel time of small models on onnxruntime CPU, from its per-node profiler.

What a latency-guided pass needs to compare two forms of the same computation (a weighted op in
float and in QDQ form, ``passes/quantize_static.py``) on this machine: each model runs in a
session with onnxruntime's graph optimizations on (``ORT_ENABLE_ALL``, so fused kernels such as
QLinearConv and the NCHWc float Conv are what runs, with their layout conversions) and
``SessionOptions.enable_profiling``; the profiler records every kernel's duration
(``"cat": "Node"`` events named ``<node>_kernel_time``, microseconds). A model's figure is the
sum over its kernels of each kernel's shortest duration in ``rounds`` runs (after ``WARMUP`` runs:
first-run allocation and pre-packing) -- session and Python overhead are left out, as they are
the same for any form of a computation. The shortest, not the median: other processes only ever
make a kernel slower, so the minimum is the estimate load disturbs least (Python's ``timeit``
documentation: "the lowest value gives a lower bound for how fast your machine can run the given
code snippet; higher values in the result vector are typically not caused by variability in
Python's speed, but by other processes interfering with your timing accuracy"); taken per
kernel, a burst of load during one run spoils that run's time of a few kernels, not the run.
Measured here at load 6-10 on 2 cores, the median of run totals ranked two placements of the
PP-OCRv4 rec sites differently in two runs (29.3 vs 34.6 ms, then 51.0 vs 50.5 ms). The
models are run in turn, round by round (interleaved), so a burst of load hits every model
alike.

Source: onnxruntime's profiler (``onnxruntime/core/common/profiler.cc``; the JSON is Chrome's
trace event format).
"""

from __future__ import annotations

import collections
import json
import os
import tempfile

import numpy as np
import onnx

#: Runs of each model before timing starts.
WARMUP = 3


def kernel_times(models: dict[str, onnx.ModelProto], feeds: dict[str, dict[str, np.ndarray]],
                 rounds: int, threads: int = 0,
                 skip: frozenset[str] = frozenset()) -> dict[str, float]:
    """Summed shortest kernel times (microseconds) of each model (module docstring).

    Args:
        models: name -> model.
        feeds: name -> its feed (``{input name: array}``).
        rounds: timed runs of each model (after :data:`WARMUP` untimed ones), interleaved.
        threads: intra-op threads (0: onnxruntime's choice, one per physical core).
        skip: op types of the optimized model whose kernels are not counted (e.g. the layout
            conversions onnxruntime inserts, ``ReorderInput``).

    Raises:
        InputError: onnxruntime cannot load or run one of the models.
    """
    # only when timing: a pass module must not need onnxruntime to import
    from onnxopt.validate import make_session, run_model, session_options

    with tempfile.TemporaryDirectory(prefix="onnxopt-timing-") as folder:
        sessions = {}
        for name, model in models.items():
            opts = session_options(threads=threads, optimized=True, timed=True)
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(folder, f"model{len(sessions)}")
            sessions[name] = make_session(model, f"timing model '{name}'", options=opts)
        for _ in range(WARMUP + rounds):
            for name, session in sessions.items():
                run_model(session, feeds[name], f"timing model '{name}'")
        return {name: _kernel_sum(session.end_profiling(), WARMUP, skip)
                for name, session in sessions.items()}


def _kernel_sum(path: str, warmup: int, skip: frozenset[str]) -> float:
    """The sum over the kernels in the profile at ``path`` (kernels of the op types ``skip``
    left out) of each one's shortest duration in the runs after ``warmup`` (each node runs once
    per run, so its k-th event belongs to run k)."""
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    per_node: dict[str, list[int]] = collections.defaultdict(list)
    for e in events:
        if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                and e.get("args", {}).get("op_name") not in skip):
            per_node[e["name"]].append(int(e["dur"]))
    return float(sum(min(d[warmup:]) for d in per_node.values() if len(d) > warmup))


def tensor_shapes(model: onnx.ModelProto, names: list[str],
                  feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors ``names`` of ``model`` when it runs on ``feed`` (one run, graph
    optimizations off, the tensors exposed as extra outputs).

    Raises:
        InputError: onnxruntime cannot load or run the model.
    """
    from onnxopt.validate import make_session, run_model

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n)
                              for n in names if n not in declared)
    session = make_session(probe, "model (shapes of the tensors to time)")
    values = run_model(session, feed, "model (shapes of the tensors to time)")
    position = {o.name: i for i, o in enumerate(session.get_outputs())}
    return {n: tuple(np.shape(values[position[n]])) for n in names}
