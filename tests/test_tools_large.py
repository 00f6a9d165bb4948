"""Tests of the large-model tools at small sizes: tools/gen_chain.py and tools/gen_llama.py (tiny
preset) write models that onnxruntime loads by path and runs, and tools/large_benchmark.py
measures a variant and parses GNU time's report. The llama test needs torch and transformers
(optional) and is skipped without them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tools import gen_chain, large_benchmark

# Captured from `/usr/bin/time -v -o FILE python3 -c "import sys; sys.exit(3)"` (GNU time 1.9).
TIME_V_EXIT_3 = """Command exited with non-zero status 3
\tCommand being timed: "python3 -c import sys; sys.exit(3)"
\tUser time (seconds): 0.09
\tSystem time (seconds): 0.02
\tPercent of CPU this job got: 40%
\tElapsed (wall clock) time (h:mm:ss or m:ss): 0:00.29
\tAverage shared text size (kbytes): 0
\tAverage unshared data size (kbytes): 0
\tAverage stack size (kbytes): 0
\tAverage total size (kbytes): 0
\tMaximum resident set size (kbytes): 13448
\tAverage resident set size (kbytes): 0
\tMajor (requiring I/O) page faults: 2
\tMinor (reclaiming a frame) page faults: 9392
\tVoluntary context switches: 109
\tInvoluntary context switches: 38
\tSwaps: 0
\tFile system inputs: 128
\tFile system outputs: 0
\tSocket messages sent: 0
\tSocket messages received: 0
\tSignals delivered: 0
\tPage size (bytes): 4096
\tExit status: 3
"""

needs_time = pytest.mark.skipif(not os.path.exists("/usr/bin/time"), reason="no GNU time")


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_gen_chain_matches_its_weights(tmp_path):
    path = gen_chain.generate(tmp_path / "chain.onnx", layers=3, dim=16)
    assert (tmp_path / "chain.onnx.data").is_file()
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    (got,) = _session(path).run(None, {"x": x})
    expected = x
    for i in range(3):
        expected = np.maximum(expected @ weights[f"W{i}"] + weights[f"b{i}"], 0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_gen_llama_tiny_runs_and_matches_torch(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tools import gen_llama

    path, diffs = gen_llama.generate(tmp_path / "tiny.onnx", "tiny")
    assert max(diffs) < 1e-4, diffs
    model = onnx.load(str(path), load_external_data=False)
    layers = gen_llama.PRESETS["tiny"]["num_hidden_layers"]
    assert [i.name for i in model.graph.input] == gen_llama.input_names(layers)
    assert [o.name for o in model.graph.output] == gen_llama.output_names(layers)
    past = model.graph.input[3].type.tensor_type.shape.dim
    assert [past[0].dim_param, past[2].dim_param] == ["batch", "past_sequence"]
    locations = {e.value for t in model.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"tiny.onnx.data"}
    feed = dict(np.load(tmp_path / "tiny.inputs.npz"))
    assert feed["past_key_values.0.key"].shape[2] == gen_llama.PAST
    logits = _session(path).run(["logits"], feed)[0]
    assert logits.shape == (*feed["input_ids"].shape, gen_llama.PRESETS["tiny"]["vocab_size"])


def test_parse_time_v_exit_code_and_signal():
    report = large_benchmark.parse_time_v(TIME_V_EXIT_3)
    assert report == large_benchmark.TimeReport(0.29, 13448 * 1024, 3)
    killed = TIME_V_EXIT_3.replace("Command exited with non-zero status 3",
                                   "Command terminated by signal 9").replace(
        "(h:mm:ss or m:ss): 0:00.29", "(h:mm:ss or m:ss): 1:02:03.50").replace(
        "Exit status: 3", "Exit status: 0")
    assert large_benchmark.parse_time_v(killed) == large_benchmark.TimeReport(
        3723.5, 13448 * 1024, -9)
    with pytest.raises(ValueError, match="not a /usr/bin/time -v report"):
        large_benchmark.parse_time_v("Command being timed: x\n")


def test_tree_rss_counts_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); "
                              "time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # started: its RSS no longer grows
        total, count = large_benchmark.tree_rss(os.getpid())
        assert count >= 1
        assert total >= large_benchmark._rss(child.pid) > 0
    finally:
        child.kill()
        child.wait()


@needs_time
def test_run_variant_measures_and_cleans_up(tmp_path):
    path = gen_chain.generate(tmp_path / "chain.onnx", layers=2, dim=64)
    run = large_benchmark.run_variant("chain", "load-save", path, timeout=60,
                                      max_rss=2**34, nice=0)
    assert run.exit_code == 0, run.note
    assert run.seconds > 0 and run.max_rss_bytes > 0 and run.processes == 1
    # The kernel syncs its per-thread RSS counters lazily, so a VmRSS sample can pass ru_maxrss
    # by a few pages.
    assert 0 < run.tree_rss_bytes <= run.max_rss_bytes * 1.01
    assert run.output_bytes > 2 * 64 * 64 * np.dtype(np.float32).itemsize  # both weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chain.onnx", "chain.onnx.data"]


@needs_time
def test_run_variant_kills_over_memory_limit(tmp_path):
    path = gen_chain.generate(tmp_path / "chain.onnx", layers=2, dim=64)
    run = large_benchmark.run_variant("chain", "load-save", path, timeout=60, max_rss=1, nice=0)
    assert run.exit_code == -9
    assert run.note.startswith("killed: over memory limit")


def test_onnxopt_command_passes_the_inputs_file(tmp_path):
    model = tmp_path / "m.onnx"
    out = tmp_path / "out" / "m.onnx"
    argv = large_benchmark.command("onnxopt-int4", model, out)
    assert "--inputs" not in argv and argv[-2:] == ["--quantize", "int4-weight"]
    (tmp_path / "m.inputs.npz").write_bytes(b"")
    argv = large_benchmark.command("onnxopt", model, out)
    assert argv[argv.index("--inputs") + 1] == str(tmp_path / "m.inputs.npz")
    assert shutil.which(argv[0]) or os.path.isfile(argv[0])


def test_memory_skip_scales_an_earlier_models_ratio():
    gib = large_benchmark.GIB
    runs = [large_benchmark.Run("small", "onnxsim", [], max_rss_bytes=6 * gib)]
    sizes = {"small": 3 * gib}
    assert large_benchmark.memory_skip(runs, sizes, "onnxsim", 8 * gib, 17 * gib) == ""
    assert large_benchmark.memory_skip(runs, sizes, "onnxsim", 8 * gib, 15 * gib).startswith(
        "skipped: 2.00x the model on small predicts 16.0 GiB")
    assert large_benchmark.memory_skip(runs, sizes, "copy", 8 * gib, 1) == ""
