"""The pipelines on every fetched real model (tools/fetch_models.py), validated on onnxruntime.

Models not on disk are skipped, unless ONNXOPT_REQUIRE_ZOO=1 (set by .ci/run), which turns a
missing model into a failure so CI cannot pass by skipping everything.
"""

from __future__ import annotations

import os

import onnx
import pytest

import onnxopt
from tools import zoo

ENTRIES = zoo.load_manifest()
REQUIRE = os.environ.get("ONNXOPT_REQUIRE_ZOO") == "1"

MODES = {
    "default": {},
    "prune": {"prune_threshold": 1e-3},
    "quantize": {"quantize": "int8-weight"},
}


def _paths(entry):
    onnx_path = zoo.model_path(zoo.DEFAULT_DEST, entry["name"])
    inputs_path = zoo.inputs_path(zoo.DEFAULT_DEST, entry["name"])
    if not (onnx_path.exists() and inputs_path.exists()):
        if REQUIRE:
            pytest.fail(f"{entry['name']} is not fetched: run tools/fetch_models.py --with-minilm")
        pytest.skip(f"{entry['name']} not fetched (tools/fetch_models.py)")
    return onnx_path, inputs_path


@pytest.mark.zoo
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_pipeline_on_real_model(entry, mode):
    """Validates, never adds nodes (but DequantizeLinear), keeps the interface, and is
    deterministic."""
    onnx_path, inputs_path = _paths(entry)
    model, report = onnxopt.optimize(str(onnx_path), inputs=str(inputs_path), **MODES[mode])
    assert report.validation.passed, report.validation.reason
    assert report.validation.mode == ("lossless" if mode == "default" else "lossy")
    # int8 weights are read through one DequantizeLinear each (and a Mul below opset 13)
    added = 0
    if mode == "quantize":
        added = sum(report.after.op_counts.get(op, 0) - report.before.op_counts.get(op, 0)
                    for op in ("DequantizeLinear", "Mul"))
    assert report.after.nodes - max(added, 0) <= report.before.nodes
    if mode != "quantize":  # DequantizeLinear nodes inside If branches may outnumber the savings
        assert report.after.nodes_total <= report.before.nodes_total
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(str(onnx_path))
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    if mode == "quantize":
        stats = next(r.stats for r in report.passes if r.name == "quantize_weights")
        assert stats["tensors_quantized"] > 0
        # int8 data plus per-channel scales: about 4x fewer bytes for the weights quantized
        assert stats["bytes_after"] * 3.5 < stats["bytes_before"]
        assert report.after.file_bytes < report.before.file_bytes
    if mode == "prune":
        stats = next(r.stats for r in report.passes if r.name == "prune")
        assert stats
    # Names come from the model's own name authority (onnxopt.names), so a second run in the
    # same process -- after every other test's runs -- writes the same bytes.
    again, _ = onnxopt.optimize(str(onnx_path), inputs=str(inputs_path), **MODES[mode])
    assert again.SerializeToString() == model.SerializeToString()


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["silero_vad", "ch_PP-OCRv4_det_infer", "minilm_l6"])
def test_two_processes_give_identical_files(name, tmp_path):
    """The command line, run twice in fresh processes, writes byte-identical models."""
    import subprocess
    import sys

    onnx_path, inputs_path = _paths(next(e for e in ENTRIES if e["name"] == name))
    outputs = []
    for k in range(2):
        out = tmp_path / f"{k}.onnx"
        subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(onnx_path), "-o",
                        str(out), "--inputs", str(inputs_path), "--quantize", "int8-weight",
                        "--quiet"], check=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
