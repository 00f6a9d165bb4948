"""Tests of optimizer/cli.py through ``main([...])`` (and once through the ``onnxopt`` console
script): exit codes 0/1/2, one-line errors without traceback, outputs and JSON reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_same_outputs, make_model, ops
from onnxopt.cli import main
from onnxopt.pass_manager import REGISTRY, Pass, PassResult
from onnxopt.report import SCHEMA_VERSION


def _model(scale: float = 1.0) -> onnx.ModelProto:
    """Identity, a foldable Add of two initializers, two equal Relus (CSE), a dead branch."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("Add", ["A", "B"], ["ab"]),
             helper.make_node("MatMul", ["xi", "ab"], ["m"]),
             helper.make_node("Relu", ["m"], ["r1"]),
             helper.make_node("Relu", ["m"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["y"]),
             helper.make_node("Neg", ["x"], ["dead"])]
    return make_model(nodes, [("x", np.float32, ["batch", 4])], [("y", np.float32, ["batch", 3])],
                      {"A": rng.normal(size=(4, 3)).astype(np.float32) * scale,
                       "B": rng.normal(size=(4, 3)).astype(np.float32)})


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(_model().SerializeToString())
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("onnxopt: error: "), err
    return err


def test_optimize_writes_a_smaller_equivalent_model(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "validation passed" in stdout and f"wrote {out}" in stdout.replace("\n", "")
    optimized = onnx.load(str(out))
    onnx.checker.check_model(optimized, full_check=True)
    assert sorted(ops(optimized)) == ["Add", "MatMul", "Relu"]
    assert_same_outputs(_model(), optimized)


def test_optimize_report_has_the_documented_keys(model_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "reports" / "r.json"
    assert main(["optimize", str(model_path), "-o", str(out), "--report", str(report),
                 "--quiet", "--input-shape", "x:5x4", "--seed", "7"]) == 0
    data = json.loads(report.read_text())
    assert set(data) == {"schema_version", "tool", "tool_version", "command", "model", "output",
                         "before", "after", "passes", "inputs", "validation", "rolled_back", "warnings",
                         "seconds", "verdict"}
    assert data["schema_version"] == SCHEMA_VERSION and data["tool"] == "onnxopt"
    assert data["command"] == "optimize" and data["verdict"] == "passed"
    assert data["model"] == str(model_path) and data["output"] == str(out)
    stats_keys = {"nodes", "nodes_total", "op_counts", "subgraphs", "parameters",
                  "parameter_bytes", "file_bytes", "inputs", "outputs"}
    assert set(data["before"]) == set(data["after"]) == stats_keys
    assert data["before"]["nodes"] == 7 and data["after"]["nodes"] == 3  # MatMul, Relu, Add
    assert data["before"]["file_bytes"] == model_path.stat().st_size
    assert data["after"]["file_bytes"] == out.stat().st_size
    assert data["passes"] and all(set(p) == {"name", "iteration", "modified", "stats", "seconds"}
                                  for p in data["passes"])
    assert data["inputs"] == {"source": "synthesized", "seed": 7,
                              "feeds": [{"x": {"shape": [5, 4], "dtype": "float32"}}]}
    v = data["validation"]
    assert set(v) == {"passed", "mode", "atol", "rtol", "max_drift", "feeds", "reason", "outputs",
                      "warnings", "not_compared", "original_miscomputed", "sessions", "mask"}
    assert v["passed"] is True and v["mode"] == "lossless" and v["sessions"] == ["unoptimized"]
    assert set(v["outputs"][0]) == {"name", "dtype", "shape", "candidate_dtype", "candidate_shape",
                                    "max_abs", "max_rel", "mean_abs", "cosine", "snr_db",
                                    "rel_l2", "argmax", "top_k", "extra", "tolerance", "passed",
                                    "reason", "worse_session", "by_session"}
    assert v["outputs"][0]["argmax"] is None  # agreement is measured in lossy validations
    assert isinstance(data["seconds"], float)
    assert [f.name for f in report.parent.iterdir()] == ["r.json"]


def test_optimize_with_inputs_file(model_path, tmp_path):
    np.savez(tmp_path / "feed.npz", x=np.ones((3, 4), np.float32))
    report = tmp_path / "r.json"
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet",
                 "--inputs", str(tmp_path / "feed.npz"), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["inputs"]["source"] == str(tmp_path / "feed.npz")
    assert data["inputs"]["feeds"] == [{"x": {"shape": [3, 4], "dtype": "float32"}}]


def test_optimize_passes_and_skip_select_the_pipeline(model_path, tmp_path):
    report = tmp_path / "r.json"
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet",
                 "--passes", "remove_identity,cse", "--skip", "cse", "--report", str(report)]) == 0
    assert {p["name"] for p in json.loads(report.read_text())["passes"]} == {"remove_identity"}
    assert sorted(ops(onnx.load(str(tmp_path / "o.onnx")))) == [
        "Add", "Add", "MatMul", "Neg", "Relu", "Relu"]


def test_no_validate_reports_not_validated(model_path, tmp_path):
    report = tmp_path / "r.json"
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--no-validate",
                 "--quiet", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["validation"] is None and data["verdict"] == "not validated"


class _CorruptValues(Pass):
    """Test-only lossless pass that changes a weight: validation must catch it."""

    name = "test_corrupt_values"
    description = "adds 1 to every initializer"

    def run(self, graph, ctx):
        for t in graph.tensors().values():
            if hasattr(t, "values") and t.dtype == np.float32:
                t.values = np.asarray(t.values) + 1
        return PassResult(True)


class _CorruptValuesLossy(_CorruptValues):
    """The same corruption declared lossy: it is judged, never rolled back."""

    name = "test_corrupt_values_lossy"
    lossless = False


@pytest.mark.parametrize("keep_invalid", [False, True])
def test_failed_validation_exits_1_and_writes_nothing(model_path, tmp_path, monkeypatch, capsys,
                                                      keep_invalid):
    monkeypatch.setitem(REGISTRY, _CorruptValuesLossy.name, _CorruptValuesLossy)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = ["optimize", str(model_path), "-o", str(out), "--passes", _CorruptValuesLossy.name,
            "--report", str(report), "--max-drift", "0.999999"]
    assert main(argv + (["--keep-invalid"] if keep_invalid else [])) == 1
    assert out.exists() == keep_invalid
    assert "validation FAILED" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["verdict"] == "failed" and data["validation"]["passed"] is False
    assert "'y'" in data["validation"]["reason"]


@pytest.mark.parametrize("strict", [False, True])
def test_broken_lossless_pass_is_rolled_back_and_named(model_path, tmp_path, monkeypatch,
                                                       capsys, strict):
    monkeypatch.setitem(REGISTRY, _CorruptValues.name, _CorruptValues)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = ["optimize", str(model_path), "-o", str(out), "--passes",
            f"remove_identity,{_CorruptValues.name}", "--report", str(report)]
    assert main(argv + (["--strict"] if strict else [])) == (1 if strict else 0)
    assert out.exists() != strict
    assert f"rolled back pass {_CorruptValues.name}" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert [r["pass"] for r in data["rolled_back"]] == [_CorruptValues.name]
    assert "'y'" in data["rolled_back"][0]["reason"]
    assert data["validation"]["passed"] is True
    assert _CorruptValues.name not in {p["name"] for p in data["passes"]}


def test_validate_same_model_exits_0_different_models_exit_1(model_path, tmp_path, capsys):
    other = tmp_path / "other.onnx"
    other.write_bytes(_model(scale=2.0).SerializeToString())
    assert main(["validate", str(model_path), str(model_path), "--quiet"]) == 0
    report = tmp_path / "r.json"
    assert main(["validate", str(model_path), str(other), "--report", str(report)]) == 1
    assert "validation FAILED" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["command"] == "validate" and data["verdict"] == "failed"
    assert data["output"] == str(other)
    # the lossy criterion accepts a different model only if the cosine is high enough
    assert main(["validate", str(model_path), str(other), "--lossy", "--max-drift", "0.9999",
                 "--quiet"]) == 1


def test_passes_shows_the_linked_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per pass: no wrapped cells
    assert main(["passes"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "are linked" in line]
    assert len(lines) == 1 and "quantize_static" in lines[0]
    assert "uint8_weights, uint8_fraction, matmul_reduce_range are linked" in lines[0]


def test_inspect_and_passes(model_path, capsys):
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "MatMul" in out and "IR version 8" in out
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    from onnxopt.passes import LOSSLESS_PIPELINE
    for name in LOSSLESS_PIPELINE:
        assert name in out


@pytest.mark.parametrize("argv", [
    ["optimize", "{missing}", "-o", "{out}"],
    ["inspect", "{missing}"],
    ["validate", "{model}", "{missing}"],
    ["optimize", "{model}", "-o", "{out}", "--input-shape", "x:2xx4"],
    ["optimize", "{model}", "-o", "{out}", "--input-shape", "nope:2x4"],
    ["validate", "{model}", "{model}", "--input-shape", "x"],
    ["optimize", "{model}", "-o", "{out}", "--passes", "cse,no_such_pass"],
    ["optimize", "{model}", "-o", "{out}", "--skip", "no_such_pass"],
    ["optimize", "{model}", "-o", "{out}", "--prune-threshold", "-1"],
    ["optimize", "{model}", "-o", "{out}", "--inputs", "{missing}"],
    ["optimize", "{garbage}", "-o", "{out}"],
])
def test_usage_errors_exit_2_with_one_error_line(model_path, tmp_path, capsys, argv):
    (tmp_path / "garbage.onnx").write_bytes(b"garbage")
    names = {"missing": str(tmp_path / "m.onnx"), "out": str(tmp_path / "o.onnx"),
             "model": str(model_path), "garbage": str(tmp_path / "garbage.onnx")}
    assert main([a.format(**names) for a in argv]) == 2
    _error_line(capsys)
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_the_input_is_refused_and_the_input_untouched(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    mtime = model_path.stat().st_mtime_ns
    os.symlink(model_path, tmp_path / "link.onnx")
    (tmp_path / "sub").mkdir()
    spellings = [str(model_path), str(tmp_path / "sub" / ".." / "model.onnx"),
                 str(tmp_path / "link.onnx")]
    for spelling in spellings:
        assert main(["optimize", str(model_path), "-o", spelling]) == 2
        assert "refusing to overwrite" in _error_line(capsys)
    os.link(model_path, tmp_path / "hard.onnx")
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "hard.onnx"), "--quiet"]) == 2
    assert "refusing to overwrite" in _error_line(capsys)
    assert model_path.read_bytes() == before and model_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.onnx", "link.onnx", "model.onnx",
                                                          "sub"]


def test_long_error_message_stays_on_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    missing = tmp_path / ("a_rather_long_model_name_" * 4 + ".onnx")
    assert main(["inspect", str(missing)]) == 2
    err = _error_line(capsys)
    assert err.count("\n") == 1 and err.endswith("no such file\n"), repr(err)


def test_console_script(model_path, tmp_path):
    exe = Path(sys.executable).with_name("onnxopt")
    if not exe.exists():
        exe = shutil.which("onnxopt")
    out = tmp_path / "out.onnx"
    env = dict(os.environ, COLUMNS="200")
    ok = subprocess.run([str(exe), "optimize", str(model_path), "-o", str(out), "--quiet"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and ok.stderr == ""
    bad = subprocess.run([str(exe), "inspect", str(tmp_path / "none.onnx")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("onnxopt: error:") and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the console script forks where it can")
def test_a_crash_in_native_code_gets_one_line_exit_3_and_nothing_left(tmp_path, capfd):
    """The console script runs in a child process: a crash there (onnxruntime 1.32 segfaults on
    some models) ends with one line and exit code 3,
    and what the child staged beside its output is removed."""
    import signal

    from onnxopt import io
    from onnxopt.cli import _in_child

    out = tmp_path / "out.onnx"

    def crash() -> int:
        import faulthandler
        faulthandler.disable()  # pytest's dump of the crash would only clutter its output
        (tmp_path / f"{io.staging_prefix(out)}abc.tmp").mkdir()  # as a StagedModel does
        os.kill(os.getpid(), signal.SIGSEGV)
        return 0

    assert _in_child(crash, ["optimize", "in.onnx", "-o", str(out)]) == 3
    err = capfd.readouterr().err
    assert err.startswith("onnxopt: internal error: the run crashed in native code (SIGSEGV)")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    assert _in_child(lambda: 2, ["inspect", "x.onnx"]) == 2  # an exit code passes through


def test_inputs_the_original_cannot_run_on_point_at_the_inputs(tmp_path, capsys):
    """Feeds the original fails on (another model's, say): the message names --inputs."""
    model = make_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                       [("x", np.float32, ["N", 3])], [("y", np.float32, [6])],
                       {"shape": np.array([6], np.int64)})
    src, feeds = tmp_path / "m.onnx", tmp_path / "other.npz"
    onnx.save(model, src)
    np.savez(feeds, x=np.zeros((3, 3), np.float32))  # 9 values cannot become 6
    code = main(["optimize", str(src), "-o", str(tmp_path / "out.onnx"), "--inputs", str(feeds)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"check that --inputs {feeds} holds feeds for this model" in err
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_option_writes_out_data_and_reloads(model_path, tmp_path):
    from onnxopt.io import load_model

    w = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)  # 4 KiB: stored outside
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [("x", np.float32, [2, 64])],
                       [("y", np.float32, [2, 16])], {"W": w})
    src, out = tmp_path / "big.onnx", tmp_path / "ext" / "out.onnx"
    src.write_bytes(model.SerializeToString())
    assert main(["optimize", str(src), "-o", str(out), "--external-data", "--quiet"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert out.stat().st_size < 1024
    assert_same_outputs(model, load_model(out))


def test_report_path_equal_to_the_input_model_is_refused(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    code = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet",
                 "--report", str(model_path)])
    assert model_path.read_bytes() == before
    assert code == 2


@pytest.mark.parametrize("quiet", [False, True])
def test_messages_with_brackets_print_verbatim(tmp_path, capsys, quiet):
    """Names and reasons are text, not rich markup (a quiet run prints them without rich)."""
    def model(scale):
        return make_model([helper.make_node("Mul", ["x", "s"], ["y[red]"])],
                          [("x", np.float32, [2])], [("y[red]", np.float32, [2])],
                          {"s": np.full(2, scale, np.float32)})
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    ref.write_bytes(model(1.0).SerializeToString())
    cand.write_bytes(model(2.0).SerializeToString())
    assert main(["validate", str(ref), str(cand)] + (["--quiet"] if quiet else [])) == 1
    assert "validation FAILED: output 'y[red]'" in capsys.readouterr().out


@pytest.mark.parametrize("quiet", [False, True])
def test_a_reader_that_goes_away_stops_nothing(model_path, tmp_path, quiet):
    """stdout closed by its reader (``| head``): the run still writes its output and report and
    exits 0 (rich's own handling would exit 1, the code of a failed validation)."""
    exe = Path(sys.executable).with_name("onnxopt")
    if not exe.exists():
        exe = shutil.which("onnxopt")
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    argv = [str(exe), "optimize", str(model_path), "-o", str(out), "--report", str(report)]
    process = subprocess.Popen(argv + (["--quiet"] if quiet else []), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    assert process.wait(timeout=120) == 0, process.stderr.read()
    assert out.is_file() and json.loads(report.read_text())["verdict"] == "passed"


def test_op_names_with_brackets_print_verbatim_in_tables(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("[/oops]", ["x"], ["y"], domain="my[dom]")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("my[dom]", 1)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert main(["inspect", str(path)]) == 0
    assert "my[dom].[/oops]" in capsys.readouterr().out



def test_passes_are_listed_in_the_order_a_run_takes_them(capsys):
    from onnxopt.passes import LOSSLESS_PIPELINE
    from onnxopt.pipeline import QUANTIZE_MODES

    assert main(["passes"]) == 0
    rows = [line.split("│") for line in capsys.readouterr().out.splitlines()
            if line.startswith("│")]
    listed = [cells[1].strip() for cells in rows if cells[1].strip()]  # first line of each row
    assert sorted(listed) == sorted(REGISTRY)
    assert listed[:len(LOSSLESS_PIPELINE)] == LOSSLESS_PIPELINE
    quantizing = list(dict.fromkeys(p for passes in QUANTIZE_MODES.values() for p in passes))
    assert listed[len(LOSSLESS_PIPELINE):][:len(quantizing)] == quantizing
    run_by = {cells[1].strip(): cells[3].strip() for cells in rows if cells[1].strip()}
    assert all(run_by[name] == "default pipeline" for name in LOSSLESS_PIPELINE)
    assert run_by["quantize_static"] == "--quantize int8-static"
    assert run_by["prune"].startswith("--prune-threshold")
