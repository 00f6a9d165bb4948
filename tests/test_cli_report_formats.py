"""Tests of optimizer/cli.py's report formats (--report .json/.html/.htm), --quiet, the progress
display (only on a terminal) and --verbose."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from helpers import make_model
from onnx import helper
from rich.console import Console

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


def test_pass_table_shows_the_passes_that_changed_something_unless_verbose(model_path, tmp_path,
                                                                            capsys):
    from onnxopt.passes import LOSSLESS_PIPELINE

    report = tmp_path / "r.json"
    argv = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--report", str(report)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    records = json.loads(report.read_text())["passes"]
    changed = {r["name"] for r in records if r["modified"]}
    idle = set(LOSSLESS_PIPELINE) - changed
    assert changed == {"remove_identity"} and len(idle) > 1  # the model: Identity then Relu
    assert "remove_identity" in shown and not any(f"│ {name} " in shown for name in idle)
    assert f"{len(idle)} other passes changed nothing and refused nothing (--verbose lists them)" \
        in shown
    assert main(argv + ["--verbose"]) == 0
    shown = capsys.readouterr().out
    assert all(f"│ {name} " in shown for name in LOSSLESS_PIPELINE)
    assert "changed nothing" not in shown


def test_changes_that_round_to_zero_print_without_a_sign():
    from onnxopt.cli import _size_table
    from onnxopt.graph import ModelStats
    from onnxopt.html_report import _headline
    from onnxopt.report import Report, percent_change

    assert [percent_change(1000, 1000 - 1e-4), percent_change(1000, 1000 + 1e-4)] == ["0.0%"] * 2
    assert [percent_change(7, 7), percent_change(0, 5), percent_change(200, 100)] == \
        ["", "", "-50.0%"]

    def stats(file_bytes: int) -> ModelStats:
        return ModelStats(3, 3, {"Relu": 3}, 0, 10, 40, file_bytes)

    before, after = stats(100_000), stats(99_999)
    console = Console(width=120, record=True)
    console.print(_size_table(before, after, None))
    table = console.export_text()
    assert "-0.0" not in table and "0.0%" in table  # the file size changed, by 0.001 %
    headline = _headline(Report("0", "optimize", "m.onnx", before, after))
    assert "-0.0" not in headline and headline.count("(") == 1  # no change: no percentage


def test_comparisons_print_with_the_digits_that_make_them_true():
    from onnxopt.metrics import describe_setting, format_comparison

    assert format_comparison(0.9999997, 1.0, ".6f") == ("0.9999997", "1")
    assert format_comparison(0.5, 0.999, ".6f") == ("0.500000", "0.999")
    assert format_comparison(1.00004e-5, 1.00001e-5, ".3g", ".3g") == ("1.00004e-05",
                                                                      "1.00001e-05")
    assert describe_setting(0.9999999) == "cosine >= 0.9999999"


def _pair(tmp_path: Path, name: str, noise: float) -> tuple[Path, Path, Path]:
    """A MatMul model whose output is ``name``, the same with the weight perturbed by relative
    ``noise``, and an .npz feed for both."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 10)).astype(np.float32)
    paths = []
    for i, weight in enumerate((w, w * (1 + noise * rng.normal(size=w.shape)).astype(np.float32))):
        model = make_model([helper.make_node("MatMul", ["x", "W"], [name])],
                           [("x", np.float32, [4, 16])], [(name, np.float32, [4, 10])],
                           {"W": weight.astype(np.float32)})
        paths.append(tmp_path / f"m{i}.onnx")
        paths[-1].write_bytes(model.SerializeToString())
    feed = tmp_path / "feed.npz"
    np.savez(feed, x=rng.normal(size=(4, 16)).astype(np.float32))
    return paths[0], paths[1], feed


def _outputs(path: Path, feed: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, dict(np.load(feed)))[0].astype(np.float64)


def test_a_failed_threshold_prints_a_value_visibly_below_it(tmp_path, capsys):
    reference, candidate, feed = _pair(tmp_path, "y", 1e-3)
    r, c = _outputs(reference, feed).ravel(), _outputs(candidate, feed).ravel()
    cosine = float(r @ c / np.linalg.norm(r) / np.linalg.norm(c))
    assert f"{cosine:.6f}" == "1.000000" and cosine < 0.9999999  # six decimals would say 1
    code = main(["validate", str(reference), str(candidate), "--lossy", "--inputs", str(feed),
                 "--max-drift", "0.9999999"])
    verdict = capsys.readouterr().out.splitlines()[-1]
    assert code == 1 and verdict.startswith("validation FAILED")
    shown, limit = verdict.split("cosine similarity ")[1].split(" < max drift ")
    assert float(shown) < float(limit) == 0.9999999
    assert abs(float(shown) - cosine) <= 5e-8  # seven significant digits


_LONG = "p2o.fill_constant_batch_size_like.0.tmp_0"


@pytest.mark.parametrize("lossy", [False, True])
def test_tables_keep_long_output_names_whole_at_80_columns(tmp_path, lossy):
    from onnxopt.cli import _validation_table

    reference, candidate, feed = _pair(tmp_path, _LONG, 1e-2)
    report = api.validate(reference, candidate, inputs=str(feed), lossy=lossy)
    console = Console(width=80, record=True)
    console.print(_validation_table(report, 80))
    text = console.export_text()
    assert _LONG in text and "float32[4, 10]" in text and "…" not in text
    assert max(map(len, text.splitlines())) <= 80
    assert "not shown at this width" in text  # the columns that did not fit are named
    console = Console(width=200, record=True)
    console.print(_validation_table(report, 200))
    text = console.export_text()
    assert "not shown" not in text and "mean abs" in text


def test_lossy_table_shows_every_criterion_its_threshold_and_which_failed(tmp_path, capsys):
    reference, candidate, feed = _pair(tmp_path, "y", 1e-2)
    max_abs = float(np.abs(_outputs(reference, feed) - _outputs(candidate, feed)).max())
    limit = float(f"{max_abs / 2:.2g}")
    code = main(["validate", str(reference), str(candidate), "--lossy", "--inputs", str(feed),
                 "--max-drift", f"cosine=0.9,max-abs={limit:g},argmax=0.5"])
    shown = capsys.readouterr().out
    assert code == 1
    header = next(line for line in shown.splitlines() if "<=" in line)
    assert ">= 0.9" in header and f"<= {limit:g}" in header and ">= 0.5" in header
    row = next(line for line in shown.splitlines() if line.startswith("│ y "))
    assert f"{max_abs:.3g}" in row and row.rstrip("│ ").endswith("NO: max-abs")
