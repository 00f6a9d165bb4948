"""A result validated from its file (``onnxopt.api.STAGE_BYTES``, ``onnxopt.io.stage_model``),
tried as a hostile user would (issue 11): it must write the same bytes, report and model as a
result validated in memory, and leave nothing behind -- no temporary folder, no output folder,
no output -- when the run fails or is interrupted (by a signal in a child process, or an
exception in this one). Every test stages tiny models (``STAGE_BYTES`` 0), never 256 MiB ones."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import make_model
from onnxopt import UsageError, batch, io, optimize
from onnxopt.cli import main
from onnxopt.pass_manager import REGISTRY
from test_cli import _CorruptValues, _CorruptValuesLossy  # adds 1 to the weights: lossless / lossy

VALIDATE = sys.modules["onnxopt.validate"]  # the package's ``validate`` is the function
API = sys.modules["onnxopt.api"]


def _model() -> onnx.ModelProto:
    """y = Relu(Identity(x) @ A) @ B, weights of 4 KiB and more (written as external data)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Identity", ["x"], ["xi"]),
             helper.make_node("MatMul", ["xi", "A"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "B"], ["y"])]
    return make_model(nodes, [("x", np.float32, [2, 32])], [("y", np.float32, [2, 32])],
                      {"A": rng.normal(size=(32, 32)).astype(np.float32),
                       "B": rng.normal(size=(32, 32)).astype(np.float32)})


@pytest.fixture(autouse=True)
def _test_passes(monkeypatch):
    for cls in (_CorruptValues, _CorruptValuesLossy):
        monkeypatch.setitem(REGISTRY, cls.name, cls)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _without_times(value):
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k not in ("seconds", "output")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


RUNS = {
    "default": {},
    "external data": dict(external_data=True),
    "int8-weight": dict(quantize="int8-weight"),
    "rollback": dict(passes=["remove_identity", _CorruptValues.name]),
    "rollback, external data": dict(passes=["remove_identity", _CorruptValues.name],
                                    external_data=True),
    "lossy failure, keep invalid": dict(passes=["remove_identity", _CorruptValuesLossy.name],
                                        keep_invalid=True),
    "lossy failure, keep invalid, external data": dict(
        passes=["remove_identity", _CorruptValuesLossy.name], keep_invalid=True, external_data=True),
    "layerwise": dict(layerwise=True),
}


def _both_ways(tmp_path, monkeypatch, options):
    """``optimize`` of the same model and options, validated in memory then staged: per way,
    the returned model, the report and the files written."""
    src = tmp_path / "in.onnx"
    src.write_bytes(_model().SerializeToString())
    runs = {}
    for way, stage_bytes in (("in memory", 1 << 62), ("staged", 0)):
        monkeypatch.setattr(API, "STAGE_BYTES", stage_bytes)
        out = tmp_path / way / "o.onnx"
        model, report = optimize(str(src), output=str(out), raise_on_failure=False, **options)
        runs[way] = model, report, _files(out.parent) if out.parent.exists() else None
    return runs


@pytest.mark.parametrize("options", RUNS.values(), ids=RUNS.keys())
def test_a_staged_run_writes_and_reports_what_an_in_memory_run_does(tmp_path, monkeypatch,
                                                                    options):
    runs = _both_ways(tmp_path, monkeypatch, options)
    (_, mem_report, mem_files), (_, staged_report, staged_files) = runs.values()
    assert staged_files == mem_files and staged_files  # written byte for byte the same
    assert _without_times(dataclasses.asdict(staged_report)) == \
        _without_times(dataclasses.asdict(mem_report))
    for way, (_, report, files) in runs.items():
        assert report.output == str(tmp_path / way / "o.onnx")
        assert report.after.file_bytes == sum(map(len, files.values()))


@pytest.mark.parametrize("options", [RUNS[k] for k in ("default", "external data", "rollback")],
                         ids=["default", "external data", "rollback"])
def test_a_staged_run_returns_the_model_an_in_memory_run_returns(tmp_path, monkeypatch,
                                                                  options):
    """Was a bug with external data: the staged run returns the model loaded back from its
    file, whose tensors have ``data_location`` DEFAULT set (onnx's loader sets it), the
    in-memory run its own proto, without the field: equal values, different serializations."""
    runs = _both_ways(tmp_path, monkeypatch, options)
    (mem_model, _, _), (staged_model, _, _) = runs.values()
    assert staged_model.SerializeToString() == mem_model.SerializeToString()


@pytest.mark.parametrize("options", [
    dict(passes=["remove_identity", _CorruptValuesLossy.name]),
    dict(passes=["remove_identity", _CorruptValues.name], strict=True)], ids=["lossy failure", "strict"])
def test_a_staged_run_that_writes_nothing_makes_no_output_folder(tmp_path, monkeypatch,
                                                                 options):
    """Was a bug: the staged file is written (making the output's missing folders) before
    validation; when nothing is written, the staged folder is removed but the output folder
    it made stays, empty. An in-memory run of the same options makes no folder."""
    monkeypatch.setattr(API, "STAGE_BYTES", 0)
    out = tmp_path / "new" / "deeper" / "o.onnx"
    _, report = optimize(_model(), output=str(out), raise_on_failure=False, **options)
    assert report.output is None
    assert _tree(tmp_path) == []


def test_a_staged_run_never_overwrites_the_input_or_its_data(tmp_path, monkeypatch):
    monkeypatch.setattr(API, "STAGE_BYTES", 0)
    src = tmp_path / "in.onnx"
    src.write_bytes(_model().SerializeToString())
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        optimize(str(src), output=str(src))
    # an input whose external data has the name of the output's data file
    other = tmp_path / "x.onnx"
    onnx.save(_model(), str(other), save_as_external_data=True, location="o.onnx.data",
              size_threshold=0)
    before = _files(tmp_path)
    for kwargs in ({}, dict(external_data=True), dict(quantize="int8-weight")):
        with pytest.raises(UsageError, match="refusing to overwrite the input"):
            optimize(str(other), output=str(tmp_path / "o.onnx"), **kwargs)
    assert _files(tmp_path) == before


def test_cli_report_of_a_staged_run_names_the_files_on_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(API, "STAGE_BYTES", 0)
    src = tmp_path / "in.onnx"
    src.write_bytes(_model().SerializeToString())
    out, report = tmp_path / "out" / "o.onnx", tmp_path / "out" / "r.json"
    assert main(["optimize", str(src), "-o", str(out), "--external-data", "--layerwise",
                 "--quiet", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["output"] == str(out) and data["verdict"] == "passed" and data["layerwise"]
    assert sorted(_files(out.parent)) == ["o.onnx", "o.onnx.data", "r.json"]
    assert data["after"]["file_bytes"] == out.stat().st_size + Path(f"{out}.data").stat().st_size


def test_an_exception_out_of_a_staged_validation_has_removed_the_staged_folder(
        tmp_path, monkeypatch):
    """Was a bug: the staged folder is removed only when the run's frame is collected; a
    caller that keeps the exception (a notebook's ``sys.last_traceback``, a logger, a retry
    loop) keeps the staged model -- the size of the result, 256 MiB or more -- on disk."""
    monkeypatch.setattr(API, "STAGE_BYTES", 0)
    real, staged = VALIDATE.make_session, []

    def interrupted(model, what, **kwargs):
        """Interrupts onnxruntime's loading of the staged file (only: the reference runs
        first, from memory, before anything is staged)."""
        if isinstance(model, os.PathLike):
            staged.append(Path(model))
            raise KeyboardInterrupt
        return real(model, what, **kwargs)

    monkeypatch.setattr(VALIDATE, "make_session", interrupted)
    with pytest.raises(KeyboardInterrupt) as kept:  # held, as a notebook holds the last one
        optimize(_model(), output=str(tmp_path / "o.onnx"))
    assert staged and staged[0].parent.parent == tmp_path
    assert _tree(tmp_path) == [], kept


def test_an_interruption_after_a_staged_validation_writes_no_output(tmp_path, monkeypatch):
    """Was a bug: a staged result that passes is put in place at once, before the layer-wise
    comparison, the compressed sizes and the report; Ctrl-C (or an error) there ends the run
    with exit 130 (or 3) and no report, but the output is written. A run validated in memory
    writes nothing then."""
    monkeypatch.setattr(API, "STAGE_BYTES", 0)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(API, "compare_layerwise", interrupted)
    with pytest.raises(KeyboardInterrupt):
        optimize(_model(), output=str(tmp_path / "o.onnx"), layerwise=True)
    assert _tree(tmp_path) == []


def test_a_commit_with_external_data_is_all_or_nothing(tmp_path, monkeypatch):
    """Was a bug: the commit renames the data file over the old output's, then the model;
    when the second rename fails (or the process dies between the two), the old output's model
    refers to the new data file. Found with staging; ``io.save_model`` commits the same way."""
    out = tmp_path / "o.onnx"
    old = _model()
    for t in old.graph.initializer:
        t.raw_data = (2 * onnx.numpy_helper.to_array(t)).tobytes()
    io.save_model(old, out, external_data=True)
    before = _files(tmp_path)
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(UsageError):
        io.save_model(_model(), out, external_data=True)
    assert _files(tmp_path) == before


def test_an_output_name_of_250_characters_is_written(tmp_path, monkeypatch):
    """Was a bug: the staged folder is named ``.<name>.<8 characters>.tmp``, 14 characters
    longer than the output's name; past 241 characters it exceeds the file system's 255 and the
    run ends 'cannot write to the folder ... (File name too long)', blaming the folder."""
    monkeypatch.setattr(API, "STAGE_BYTES", 0)
    out = tmp_path / ("a" * 245 + ".onnx")
    src = tmp_path / "in.onnx"
    src.write_bytes(_model().SerializeToString())
    assert main(["optimize", str(src), "-o", str(out), "--quiet"]) == 0
    assert out.is_file()


def test_a_batch_takes_no_model_from_a_staged_folder(tmp_path):
    """Was a bug: a staged folder left by a killed run (SIGKILL, the OOM killer, a batch's
    --timeout) is a hidden folder holding ``<name>.onnx``; a recursive batch over the folder
    optimizes it as an input model."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.onnx").write_bytes(_model().SerializeToString())
    stale = tmp_path / "in" / ".m.onnx.abcd1234.tmp"
    stale.mkdir()
    (stale / "m.onnx").write_bytes(_model().SerializeToString())
    planned = batch.plan([tmp_path / "in"], tmp_path / "out", recursive=True)
    assert [m.name for m, _, _ in planned] == ["m.onnx"]
    assert stale not in planned[0][0].parents


# ------------------------------------------------------------------ signals, in a child process

_DRIVER = textwrap.dedent('''
    """`onnxopt` staging every result; says "validate" when onnxruntime is about to load the
    staged file, then waits for a signal."""
    import os, signal, sys, time

    # a parent may ignore these (a background job, nohup): a user's terminal does not
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    from onnxopt import cli
    api, validate = sys.modules["onnxopt.api"], sys.modules["onnxopt.validate"]
    api.STAGE_BYTES = 0
    real = validate.make_session


    def waiting(model, what, **kwargs):
        if isinstance(model, os.PathLike) and what.startswith("candidate"):
            print("validate", flush=True)
            time.sleep(120)
        return real(model, what, **kwargs)


    validate.make_session = waiting
    sys.argv = ["onnxopt", *sys.argv[1:]]
    cli.console_main()
''')


def _interrupt_staged_validation(tmp_path: Path, sig: int) -> tuple[int, str, Path]:
    """Run the CLI in a child, send ``sig`` while onnxruntime validates the staged result;
    the exit code, stderr and the output path."""
    src = tmp_path / "in.onnx"
    src.write_bytes(_model().SerializeToString())
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    child = subprocess.Popen([sys.executable, str(driver), "optimize", str(src), "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "validate"
        assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]
        child.send_signal(sig)
        code = child.wait(timeout=60)
    finally:
        child.kill()
    return code, child.stderr.read(), out


def test_ctrl_c_during_a_staged_validation_leaves_nothing(tmp_path):
    code, stderr, out = _interrupt_staged_validation(tmp_path, signal.SIGINT)
    assert code == 130 and stderr == "onnxopt: interrupted\n"
    assert _tree(out.parent) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_terminated_staged_validation_leaves_nothing(tmp_path, sig):
    """Was a bug: SIGTERM (``kill``, coreutils ``timeout``, a container stop, a job
    scheduler) and SIGHUP (a closed terminal) end the process at once: the staged folder, as
    large as the result, stays beside the output. Before staging, the same signal during
    validation left nothing (no file existed until the write at the end)."""
    code, _, out = _interrupt_staged_validation(tmp_path, sig)
    assert code != 0
    assert _tree(out.parent) == []


def test_after_a_killed_staged_validation_the_next_run_writes_the_output(tmp_path,
                                                                         monkeypatch):
    code, _, out = _interrupt_staged_validation(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL
    stale = [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1  # SIGKILL cannot be handled: the staged folder stays
    monkeypatch.setattr(API, "STAGE_BYTES", 0)
    assert main(["optimize", str(tmp_path / "in.onnx"), "-o", str(out), "--quiet"]) == 0
    assert onnx.load(str(out)).SerializeToString() == out.read_bytes() != b""
