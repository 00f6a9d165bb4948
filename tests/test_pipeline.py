"""Tests of optimizer/pipeline.py: pipelines from names, configured passes and TOML files; the
flags are sugar for pass options; mistakes are one-line usage errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import make_model
from onnxopt import optimize
from onnxopt.errors import UsageError
from onnxopt.pass_manager import get_pass
from onnxopt.passes import LOSSLESS_PIPELINE
from onnxopt.pipeline import QUANTIZE_MODES, build_pipeline, load_config


def _model():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    w[0, 0] = 1e-4
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("MatMul", ["xi", "W"], ["y"])]
    return make_model(nodes, [("x", np.float32, [2, 4])], [("y", np.float32, [2, 3])], {"W": w})


def test_default_expands_and_sugar_adds_configured_passes():
    pipeline = build_pipeline(None, prune_threshold=1e-3, quantize="int8-weight")
    names = [p.name for p in pipeline.passes]
    assert names == LOSSLESS_PIPELINE + ["prune", *QUANTIZE_MODES["int8-weight"]]
    prune = next(p for p in pipeline.passes if p.name == "prune")
    assert prune.options.threshold == 1e-3
    assert [p.name for p in pipeline.lossy] == ["prune", *QUANTIZE_MODES["int8-weight"]]


def test_configured_pass_objects_and_options_by_name():
    pipeline = build_pipeline(["default", get_pass("prune", threshold=0.5)],
                              skip=["cse"], options={"fold_constants": {"size_limit": 64}})
    by_name = {p.name: p for p in pipeline.passes}
    assert "cse" not in by_name and by_name["prune"].options.threshold == 0.5
    assert by_name["fold_constants"].options.size_limit == 64


@pytest.mark.parametrize("kwargs,message", [
    ({"passes": ["nope"]}, "unknown pass 'nope'"),
    ({"options": {"fold_constants": {"bogus": 1}}}, "pass 'fold_constants' has no option bogus"),
    ({"options": {"prune": {"threshold": 1.0}}}, "does not run: prune"),
    ({"prune_threshold": -1.0}, "must be positive"),
    ({"prune_threshold": "0.1"}, "option threshold must be float or None, got '0.1'"),
    ({"options": {"fold_constants": {"size_limit": 1.5}}}, "size_limit must be int or None, got 1.5"),
    ({"quantize": "int3"}, "unknown quantization mode"),
    ({"max_iterations": 0}, "at least 1"),
    ({"max_iterations": "3"}, "must be an integer"),
    ({"options": [("prune", {})]}, "options must map pass names"),
    ({"passes": ["default", get_pass("prune", threshold=0.1)], "prune_threshold": 0.5},
     "configured twice: prune"),
    ({"passes": [get_pass("prune", threshold=0.1), get_pass("prune", threshold=0.2)]},
     "configured twice: prune"),
    ({"passes": ["default", get_pass("prune", threshold=0.1)],
      "options": {"prune": {"threshold": 0.2}}}, "configured twice: prune"),
    ({"prune_threshold": 0.1, "skip": ["prune"]}, "both asked for and skipped: prune"),
    ({"quantize": "int8-weight", "skip": ["quantize_weights"]}, "both asked for and skipped"),
])
def test_mistakes_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        build_pipeline(kwargs.pop("passes", None), **kwargs)


def test_config_file_gives_the_pipeline_and_validation(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[pipeline]\npasses = ["default", "prune"]\nskip = ["cse"]\n\n'
                      '[pipeline.options.prune]\nthreshold = 1e-3\n\n'
                      '[validation]\nmax_drift = 0.95\nseed = 3\n')
    settings = load_config(config)
    assert settings["passes"] == ["default", "prune"] and settings["max_drift"] == 0.95
    _, report = optimize(_model(), config=config)
    ran = {r.name for r in report.passes}
    assert "prune" in ran and "cse" not in ran
    prune = next(r for r in report.passes if r.name == "prune")
    assert prune.stats["values_pruned"] == 1
    assert report.validation.max_drift == 0.95 and report.inputs["seed"] == 3
    # a keyword given explicitly wins over the file
    _, report = optimize(_model(), config=config, max_drift=0.9)
    assert report.validation.max_drift == 0.9


@pytest.mark.parametrize("text,message", [
    ("[pipline]\n", "unknown table"),
    ("[pipeline]\npases = []\n", "unknown key"),
    ("[validation]\nmax_drif = 1\n", "unknown key"),
    ("[pipeline\n", "invalid TOML"),
    ("pipeline = 3\n", "pipeline must be a table"),
    ("[pipeline]\nmax_iterations = 2.5\n", r"\[pipeline\] max_iterations must be an integer"),
    ("[pipeline]\npasses = \"default\"\n", "passes must be an array"),
    ("[pipeline]\npasses = [1]\n", "array of pass names"),
    ("[pipeline.options]\nprune = 3\n", r"\[pipeline.options.prune\] must be a table"),
    ("[pipeline.options.prune]\nthreshhold = 1\n", "bad.toml: pass 'prune' has no option"),
    ("[pipeline.options.prune]\nthreshold = -1\n", "bad.toml: pass 'prune': option threshold"),
    ("[validation]\nmax_drift = \"high\"\n", "max_drift .high.: expected a number"),
    ("[validation]\nvalidate = \"no\"\n", "validate must be true or false"),
    ("[validation]\nseed = \"zero\"\n", "seed must be an integer"),
    ("[validation]\ninputs = 5\n", "inputs must be a string"),
    ("[validation]\ninput_shapes = \"x:1x3\"\n", "input_shapes must be a table"),
    ("[validation.input_shapes]\nx = [1, -3]\n", "arrays of dims"),
])
def test_bad_config_files_are_usage_errors(tmp_path, text, message):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_config(config)


def test_config_paths_are_relative_to_the_file_and_skip_adds_up(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    model = _model()
    np.savez(folder / "feeds.npz", x=np.ones((2, 4), np.float32))
    (folder / "run.toml").write_text('[pipeline]\nskip = ["cse"]\n'
                                     '[validation]\ninputs = "feeds.npz"\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    _, report = optimize(model, config=folder / "run.toml", skip=["fold_constants"])
    assert report.inputs["source"] == str(folder / "feeds.npz")
    ran = {r.name for r in report.passes}
    assert not ran & {"cse", "fold_constants"}


def test_cli_config_and_flags_agree(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(_model(), model_path)
    config = tmp_path / "run.toml"
    config.write_text('[pipeline]\npasses = ["default", "prune"]\n'
                      '[pipeline.options.prune]\nthreshold = 1e-3\n')
    outputs = []
    for args in (["--config", str(config)], ["--prune-threshold", "1e-3"]):
        out = tmp_path / f"out{len(outputs)}.onnx"
        subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(model_path), "-o",
                        str(out), "--quiet", *args], check=True)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline]\noptions = 3\n")
    run = subprocess.run([sys.executable, "-m", "onnxopt.cli", "optimize", str(model_path), "-o",
                          str(tmp_path / "x.onnx"), "--config", str(bad)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "[pipeline] options must be a table, got 3" in run.stderr


def test_import_does_not_depend_on_the_working_folder(tmp_path):
    """A training repository's own optimizer.py or passes.py does not shadow onnxopt."""
    for name in ("optimizer.py", "passes.py"):
        (tmp_path / name).write_text("raise ImportError('the user\\'s own module')\n")
    code = ("from onnxopt import optimize, validate; from onnxopt.pass_manager import get_pass; "
            "get_pass('cse'); print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def test_quantize_exclude_and_ops_reach_every_pass_of_the_mode_from_api_cli_and_config(tmp_path):
    from onnx import helper

    from helpers import make_model, random_feed
    from onnxopt.cli import main

    w = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                        helper.make_node("Relu", ["h"], ["y"])],
                       [("x", np.float32, [2, 8])], [("y", np.float32, [2, 8])], {"W": w})
    feed = random_feed(model)

    def refused(report):
        return next(r for r in report.passes if r.name == "quantize_weights").stats["refused"]

    _, report = optimize(model, passes=[], quantize="int8-weight", quantize_exclude=["mm"],
                         inputs=feed)
    assert "excluded by the user" in refused(report)
    _, report = optimize(model, passes=[], quantize="int8-weight", quantize_ops=["Relu"],
                         inputs=feed)
    assert "op type not selected (ops)" in refused(report)
    config = tmp_path / "run.toml"
    config.write_text('[pipeline]\npasses = []\nquantize = "int8-weight"\n'
                      'quantize_exclude = ["MatMul"]\n')
    _, report = optimize(model, config=config, inputs=feed)
    assert "excluded by the user" in refused(report)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "r.json"
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet", "--passes",
                 "", "--quantize", "int8-weight", "--quantize-exclude", "Conv,mm",
                 "--report", str(out)]) == 0
    stats = next(p for p in __import__("json").loads(out.read_text())["passes"]
                 if p["name"] == "quantize_weights")["stats"]
    assert "excluded by the user" in stats["refused"]
    with pytest.raises(UsageError, match="need a quantization mode"):
        optimize(model, quantize_ops=["MatMul"])


def test_the_second_decision_replaces_only_the_mode_defaults_the_user_did_not_set():
    """int8-static's second decision (``SECOND_DECISION``): nearest rounding and uint8 MatMul
    weights in place of the mode's GPTQ and mixed grids; an option set the user gave any key
    of stays the user's."""
    def second(**kwargs):
        pipeline = build_pipeline([], quantize="int8-static", **kwargs)
        swapped = {p.name: p for p in pipeline.second_decision().passes}
        return pipeline, swapped["quantize_static"].options

    pipeline, options = second()
    first = {p.name: p for p in pipeline.passes}["quantize_static"].options
    assert (first.rounding, first.uint8_weights, first.uint8_fraction,
            first.matmul_reduce_range) == ("gptq", False, None, False)
    assert (options.rounding, options.uint8_weights, options.uint8_fraction,
            options.matmul_reduce_range) == ("nearest", True, None, None)
    assert options.calibration == first.calibration == "percentile"
    assert pipeline.second_changes() == [
        "quantize_static: matmul_reduce_range=None, uint8_weights=True, rounding='nearest'"]
    _, options = second(options={"quantize_static": {"rounding": "gptq"}})
    assert (options.rounding, options.uint8_weights) == ("gptq", True)
    _, options = second(options={"quantize_static": {"uint8_fraction": 0.2}})
    assert (options.rounding, options.uint8_weights, options.uint8_fraction) == (
        "nearest", False, 0.2)
    pipeline, _ = second(options={"quantize_static": {"uint8_fraction": 0.2,
                                                      "rounding": "gptq"}})
    assert pipeline.second == [] and pipeline.second_changes() == []
    assert build_pipeline([], quantize="int8-weight").second == []
    # left out with the pass it replaces
    assert build_pipeline([], quantize="int8-static").without("quantize_static").second == []


def test_a_user_option_of_a_linked_set_drops_the_modes_defaults_for_the_rest():
    """``uint8_weights = true`` alone with ``int8-static`` means every MatMul weight uint8 (the
    mode's ``uint8_fraction`` needs ``uint8_weights = false`` and is not applied); ``false``
    alone means every MatMul weight 7-bit int8."""
    def first(given):
        pipeline = build_pipeline([], quantize="int8-static",
                                  options={"quantize_static": given})
        return {p.name: p for p in pipeline.passes}["quantize_static"].options

    options = first({"uint8_weights": True})
    assert (options.uint8_weights, options.uint8_fraction, options.rounding) == (
        True, None, "gptq")
    options = first({"uint8_weights": False})
    assert (options.uint8_weights, options.uint8_fraction) == (False, None)
    options = first({"uint8_fraction": 0.5})
    assert (options.uint8_weights, options.uint8_fraction) == (False, 0.5)
    assert options.matmul_reduce_range is None  # the mixed grids mix 7-bit and uint8 weights
    assert first({}).matmul_reduce_range is False


def test_int8_dynamic_takes_the_full_grid_and_its_second_decision_seven_bits():
    pipeline = build_pipeline([], quantize="int8-dynamic")
    first = {p.name: p for p in pipeline.passes}["quantize_dynamic"].options
    second = {p.name: p for p in pipeline.second_decision().passes}["quantize_dynamic"].options
    assert (first.reduce_range, first.rounding) == (False, "gptq")
    assert (second.reduce_range, second.rounding) == (True, "nearest")
