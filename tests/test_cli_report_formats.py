"""Tests of optimizer/cli.py's report formats (--report .json/.html/.htm), --quiet, the progress
display (only on a terminal) and --verbose."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import make_model
from onnx import helper

from onnxopt import api
from onnxopt.cli import main


@pytest.fixture
def model_path(tmp_path) -> Path:
    nodes = [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Relu", ["xi"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [2, 3])], [("y", np.float32, [2, 3])])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("name", ["r.html", "r.HTM"])
def test_html_report_for_optimize_and_validate(model_path, tmp_path, name):
    report, out = tmp_path / name, tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--quiet", "--report",
                 str(report)]) == 0
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "onnxopt optimize" in page and "<svg" in page
    assert main(["validate", str(model_path), str(out), "--quiet", "--report", str(report)]) == 0
    assert "onnxopt validate" in report.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", "out.onnx", name])


def test_json_report_stays_json(model_path, tmp_path):
    report = tmp_path / "r.json"
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet",
                 "--report", str(report)]) == 0
    assert json.loads(report.read_text())["verdict"] == "passed"


def test_unknown_report_extension_is_refused_before_running(model_path, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setattr(api, "optimize", lambda *a, **k: pytest.fail("optimize ran"))
    code = main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--report",
                 str(tmp_path / "r.txt")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxopt: error:") and "r.txt" in err and err.count("\n") == 1


def test_quiet_prints_only_the_verdict_line(model_path, tmp_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [captured.out.strip()]
    assert captured.out.startswith("validation passed") and captured.err == ""
    assert main(["validate", str(model_path), str(tmp_path / "o.onnx"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("validation passed")


def test_no_progress_when_stderr_is_not_a_terminal(model_path, tmp_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "validation passed" in captured.out


def test_progress_on_a_terminal_names_the_passes_unless_quiet(model_path, tmp_path,
                                                              monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx")]) == 0
    assert "optimizing" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0
    assert quiet.getvalue() == ""


def test_internal_errors_exit_3_with_a_traceback_only_when_verbose(model_path, tmp_path,
                                                                   capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "optimize", crash)
    argv = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx")]
    assert main(argv + ["--verbose"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "boom" in err
    assert main(argv) == 3  # last: also restores the quiet onnxruntime logger
    err = capsys.readouterr().err
    assert err.startswith("onnxopt: internal error: RuntimeError: boom") and "Traceback" not in err
