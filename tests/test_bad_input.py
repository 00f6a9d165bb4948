"""Bad input and odd models (issue 11): each is refused with one line naming the problem and exit 2,
writes no output and leaves the input as it was -- through the CLI (``main([...])``, or a child
process where a signal is needed) and, where it applies, the Python API (``onnxopt.optimize``)."""

from __future__ import annotations

import errno
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import make_model
from onnxopt import optimize
from onnxopt.cli import main
from onnxopt.errors import SYNTHESIZED_INPUTS_HINT, InputError, ModelLoadError

F32 = np.float32


def _valid_model() -> onnx.ModelProto:
    """x[2, 64] @ W[64, 32] (8 KiB of weight: stored as external data when asked) -> Identity."""
    w = np.random.default_rng(0).normal(size=(64, 32)).astype(F32)
    return make_model([helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
                       helper.make_node("Identity", ["m"], ["y"], name="id")],
                      [("x", F32, [2, 64])], [("y", F32, [2, 32])], {"W": w})


def _write(folder: Path, model: onnx.ModelProto) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "in.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit 2 and exactly one ``onnxopt: error:`` line; return it."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("onnxopt: error: "), err
    assert err.count("\n") == 1, err
    return err.strip()


class _Untouched:
    """The files of a folder before a run: afterwards the same files hold the same bytes, and
    nothing was added (no output, no temporary file)."""

    def __init__(self, *folders: Path):
        self.folders = folders
        self.before = self._snapshot()

    def _snapshot(self) -> dict[Path, bytes | None]:
        return {p: (p.read_bytes() if p.is_file() else None)
                for f in self.folders for p in sorted(f.rglob("*"))}

    def check(self) -> None:
        assert self._snapshot() == self.before


def _optimize_refused(model: str | Path, out: Path, capsys, *extra: str) -> str:
    """Both ``onnxopt optimize MODEL -o OUT`` and ``onnxopt.optimize(MODEL, output=OUT)`` are
    refused with nothing written beside ``out`` or ``model``; returns the CLI's error line
    (the API's message is the same without the ``onnxopt: error:`` head)."""
    folders = {Path(model).parent, out.parent}
    untouched = _Untouched(*folders)
    line = _refused(["optimize", str(model), "-o", str(out), *extra], capsys)
    untouched.check()
    if not extra:
        with pytest.raises(InputError) as raised:
            optimize(str(model), output=str(out))
        assert " ".join(str(raised.value).split()) in line
        untouched.check()
    return line


# ------------------------------------------------------------------ unreadable model files

def _truncated(path: Path) -> None:
    data = _valid_model().SerializeToString()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind, make, expected", [
    ("empty", lambda p: p.write_bytes(b""), "not a valid ONNX model"),
    ("text", lambda p: p.write_text("graph { node { op_type: 'Relu' } }\n"),
     "not a valid ONNX model"),
    ("truncated", _truncated, "not a valid ONNX model"),
    ("missing", lambda p: None, "no such file"),
])
def test_unreadable_model_file_is_refused(tmp_path, capsys, kind, make, expected):
    path = tmp_path / "in" / f"{kind}.onnx"
    path.parent.mkdir()
    make(path)
    line = _optimize_refused(path, tmp_path / "out" / "o.onnx", capsys)
    assert str(path) in line and expected in line
    assert not (tmp_path / "out").exists()


def test_a_directory_as_input_is_named_as_a_directory(tmp_path, capsys):
    """The API names the folder; the CLI takes a folder as a batch (onnxopt.batch), and says
    it holds no model."""
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    untouched = _Untouched(tmp_path)
    line = _refused(["optimize", str(folder), "-o", str(tmp_path / "out")], capsys)
    assert str(folder) in line and "no such file" not in line
    assert "no .onnx files in this folder" in line
    with pytest.raises(InputError, match="is a folder, not an ONNX model file"):
        optimize(str(folder), output=str(tmp_path / "o.onnx"))
    untouched.check()


def test_output_paths_of_the_wrong_kind_are_refused(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(_valid_model().SerializeToString())
    line = _refused(["optimize", str(model), "-o", str(tmp_path / "newdir") + "/"], capsys)
    assert "is a folder" in line and not (tmp_path / "newdir").exists()
    line = _refused(["optimize", str(model), str(model), "-o", str(tmp_path / "x.onnx")], capsys)
    assert "names a model file" in line and not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------ external data

def _with_external_data(folder: Path) -> tuple[Path, Path]:
    """The valid model saved by onnx with W in ``w.bin``; returns (model path, data path)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "in.onnx"
    onnx.save_model(_valid_model(), str(path), save_as_external_data=True, location="w.bin",
                    size_threshold=1024)
    return path, folder / "w.bin"


def _point_w_to(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    (w,) = [t for t in model.graph.initializer if t.name == "W"]
    for entry in w.external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


def test_model_with_external_data_is_accepted(tmp_path):
    """The baseline of the refusals below: the same files, intact, optimize fine."""
    path, _ = _with_external_data(tmp_path / "in")
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet"]) == 0


def test_missing_external_data_file_is_refused(tmp_path, capsys):
    path, data = _with_external_data(tmp_path / "in")
    data.unlink()
    line = _optimize_refused(path, tmp_path / "out.onnx", capsys)
    assert "w.bin" in line and "'W'" in line


def test_short_external_data_file_is_refused_naming_the_tensor(tmp_path, capsys):
    """The data file ends before offset + length of W."""
    path, data = _with_external_data(tmp_path / "in")
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4)
    line = _optimize_refused(path, tmp_path / "out.onnx", capsys)
    assert "'W'" in line and "w.bin" in line


@pytest.mark.parametrize("location", ["/etc/hostname", "../secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, capsys, location):
    path, data = _with_external_data(tmp_path / "in")
    (tmp_path / "secret.bin").write_bytes(data.read_bytes())
    _point_w_to(path, location)
    line = _optimize_refused(path, tmp_path / "out" / "o.onnx", capsys)
    assert "'W'" in line and location in line


def test_output_equal_to_the_input_is_refused(tmp_path, capsys):
    path = _write(tmp_path, _valid_model())
    untouched = _Untouched(tmp_path)
    line = _refused(["optimize", str(path), "-o", str(path)], capsys)
    assert "refusing to overwrite" in line and str(path) in line
    untouched.check()


# ------------------------------------------------------------------ output that cannot be written

@pytest.fixture
def unwritable(tmp_path, monkeypatch) -> Path:
    """A folder no file can be created in: read-only by its mode and, since the mode does not
    bind root, by making ``tempfile``'s file and folder creation there fail as the OS does."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    for name in ("mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, _refusing_in(folder, getattr(tempfile, name)))
    yield folder
    folder.chmod(0o755)


def _refusing_in(folder: Path, real):
    """``real`` (``tempfile.mkstemp`` or ``mkdtemp``), failing in ``folder`` as the OS does."""
    def make(*args, **kwargs):
        dir = inspect.signature(real).bind(*args, **kwargs).arguments.get("dir")
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied",
                                  os.path.join(dir, ".hidden.tmp"))
        return real(*args, **kwargs)
    return make


def test_an_unwritable_output_folder_is_named_with_the_reason(tmp_path, capsys, monkeypatch,
                                                              unwritable):
    path = _write(tmp_path / "in", _valid_model())
    out = unwritable / "o.onnx"
    with monkeypatch.context() as patched:  # the CLI refuses before any work
        patched.setattr("onnxopt.api.optimize", lambda *a, **k: pytest.fail("work started"))
        line = _refused(["optimize", str(path), "-o", str(out)], capsys)
    assert str(out) in line and "Permission denied" in line and ".tmp" not in line
    with pytest.raises(InputError) as raised:  # the API, when it comes to writing
        optimize(str(path), output=str(out))
    message = str(raised.value)
    assert str(out) in message and "Permission denied" in message and ".tmp" not in message
    assert list(unwritable.iterdir()) == []


@pytest.mark.parametrize("command", ["optimize", "validate"])
def test_an_unwritable_report_folder_is_refused_before_any_work(tmp_path, capsys, unwritable,
                                                                command):
    path = _write(tmp_path / "in", _valid_model())
    report = unwritable / "r.json"
    argv = (["optimize", str(path), "-o", str(tmp_path / "o.onnx")] if command == "optimize"
            else ["validate", str(path), str(path)])
    line = _refused(argv + ["--report", str(report)], capsys)
    assert str(report) in line and "Permission denied" in line and ".tmp" not in line
    assert not (tmp_path / "o.onnx").exists() and list(unwritable.iterdir()) == []


# ------------------------------------------------------------------ onnxruntime fails the original

def _bfloat16_abs() -> onnx.ModelProto:
    """Valid ONNX that onnxruntime's CPU provider has no kernel for (Abs on bfloat16)."""
    return make_model([helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16),
                       helper.make_node("Abs", ["b"], ["a"]),
                       helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT)],
                      [("x", F32, [4])], [("y", F32, [4])])


def test_an_original_onnxruntime_cannot_load_points_to_no_validate(tmp_path, capsys):
    path = _write(tmp_path / "in", _bfloat16_abs())
    out = tmp_path / "out" / "o.onnx"
    line = _optimize_refused(path, out, capsys)
    assert "onnxruntime cannot load" in line and "Abs" in line and "--no-validate" in line
    assert main(["optimize", str(path), "-o", str(out), "--no-validate", "--quiet"]) == 0
    assert out.is_file()


def _scatter_model() -> onnx.ModelProto:
    """x @ W, then ScatterElements with an index input: synthesized indices fall outside the
    two rows (onnxruntime refuses them), real ones in range run."""
    w = np.random.default_rng(1).normal(size=(64, 32)).astype(F32)
    return make_model([helper.make_node("MatMul", ["x", "W"], ["h"]),
                       helper.make_node("ScatterElements", ["h", "idx", "upd"], ["y"], axis=0)],
                      [("x", F32, [2, 64]), ("idx", np.int64, [1, 32]), ("upd", F32, [1, 32])],
                      [("y", F32, [2, 32])], {"W": w})


@pytest.mark.parametrize("mode", [[], ["--quantize", "int8-weight"], ["--prune-threshold", "0.01"]])
def test_synthesized_indices_out_of_range_exit_2_with_the_same_hint_in_every_mode(
        tmp_path, capsys, mode):
    path = _write(tmp_path / "in", _scatter_model())
    line = _optimize_refused(path, tmp_path / "out" / "o.onnx", capsys, *mode)
    assert "ScatterElements" in line and "out of data bounds" in line
    assert SYNTHESIZED_INPUTS_HINT in line and "--no-validate" in line
    # with real inputs in range, the same mode validates
    feed = {"x": np.ones((2, 64), F32), "idx": np.zeros((1, 32), np.int64),
            "upd": np.ones((1, 32), F32)}
    np.savez(tmp_path / "feed.npz", **feed)
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet",
                 "--inputs", str(tmp_path / "feed.npz"), *mode]) == 0


# ------------------------------------------------------------------ custom-domain ops

def _custom_model() -> onnx.ModelProto:
    """Two identical com.example MyOp nodes on x (not CSE material: the op is unknown), one on
    a constant (not foldable without the op), and an Identity a pass may remove."""
    nodes = [helper.make_node("Identity", ["x"], ["xi"], name="id"),
             helper.make_node("MyOp", ["xi"], ["a"], name="my1", domain="com.example", scale=2.0),
             helper.make_node("MyOp", ["xi"], ["b"], name="my2", domain="com.example", scale=2.0),
             helper.make_node("MyOp", ["c"], ["k"], name="my_const", domain="com.example"),
             helper.make_node("Add", ["a", "b"], ["s"], name="add"),
             helper.make_node("Add", ["s", "k"], ["y"], name="add_k")]
    graph = helper.make_graph(nodes, "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [onnx.numpy_helper.from_array(np.ones(4, F32), "c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    return model


def test_custom_domain_op_refuses_validation_and_names_the_op(tmp_path, capsys):
    path = _write(tmp_path / "in", _custom_model())
    line = _optimize_refused(path, tmp_path / "out" / "o.onnx", capsys)
    assert "validation cannot run" in line and "'MyOp'" in line and "'com.example'" in line
    assert "--no-validate" in line
    line = _refused(["validate", str(path), str(path)], capsys)
    assert "validation cannot run" in line and "'MyOp'" in line


def test_custom_domain_op_without_validation_is_left_alone_and_the_rest_optimized(tmp_path,
                                                                                  capsys):
    model = _custom_model()
    path = _write(tmp_path / "in", model)
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--no-validate"]) == 0
    assert "not validated" in capsys.readouterr().out
    optimized = onnx.load(str(out))
    custom = [n for n in optimized.graph.node if n.domain == "com.example"]
    original = {n.name: n for n in model.graph.node if n.domain == "com.example"}
    assert sorted(n.name for n in custom) == sorted(original)
    for node in custom:
        mine = original[node.name]
        assert node.op_type == mine.op_type and list(node.attribute) == list(mine.attribute)
        assert list(node.output) == list(mine.output)
    assert "Identity" not in [n.op_type for n in optimized.graph.node]  # the safe part ran
    assert {"com.example": 1} == {o.domain: o.version for o in optimized.opset_import
                                  if o.domain == "com.example"}
    _, report = optimize(str(path), validate=False)
    assert report.validation is None


# ------------------------------------------------------------------ versions newer than onnx knows

@pytest.mark.parametrize("what", ["opset", "ir"])
def test_a_version_newer_than_the_installed_onnx_is_refused(tmp_path, capsys, what):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F32, [2])],
                       [("y", F32, [2])])
    newer = (onnx.defs.onnx_opset_version() if what == "opset" else onnx.IR_VERSION) + 1
    if what == "opset":
        model.opset_import[0].version = newer
    else:
        model.ir_version = newer
    path = _write(tmp_path / "in", model)
    for extra in ([], ["--no-validate"]):
        line = _optimize_refused(path, tmp_path / "out" / "o.onnx", capsys, *extra)
        assert f"{'opset' if what == 'opset' else 'IR version'} {newer}" in line
        assert onnx.__version__ in line


# ------------------------------------------------------------------ graphs breaking the IR's rules

def _odd(kind: str) -> onnx.ModelProto:
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu")
    if kind == "cycle":
        nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="add"),
                 helper.make_node("Relu", ["a"], ["b"], name="loop_relu"),
                 helper.make_node("Neg", ["a"], ["y"], name="neg")]
        return make_model(nodes, [("x", F32, [2])], [("y", F32, [2])], check=False)
    if kind == "two writers":
        nodes = [helper.make_node("Relu", ["x"], ["t"], name="first"),
                 helper.make_node("Neg", ["x"], ["t"], name="second"),
                 helper.make_node("Abs", ["t"], ["y"], name="abs")]
        return make_model(nodes, [("x", F32, [2])], [("y", F32, [2])], check=False)
    assert kind == "input twice"  # (an output listed twice is valid: tests/test_subgraphs.py)
    return make_model([relu], [("x", F32, [2]), ("x", F32, [2])], [("y", F32, [2])], check=False)


@pytest.mark.parametrize("kind, named", [
    ("cycle", ["cycle", "'add'", "'loop_relu'", "'a'", "'b'"]),
    ("two writers", ["'t'", "'first'", "'second'"]),
    ("input twice", ["input 'x'", "twice"]),
])
def test_a_graph_breaking_the_ir_rules_is_refused_naming_the_tensor(tmp_path, capsys, kind,
                                                                     named):
    path = _write(tmp_path / "in", _odd(kind))
    for extra in ([], ["--no-validate"]):
        line = _optimize_refused(path, tmp_path / "out" / "o.onnx", capsys, *extra)
        assert all(word in line for word in named), line
    line = _refused(["validate", str(path), str(path)], capsys)
    assert all(word in line for word in named), line
    with pytest.raises(ModelLoadError):
        optimize(_odd(kind), validate=False)


# ------------------------------------------------------------------ Ctrl-C

_DRIVER = textwrap.dedent('''
    """`onnxopt` with a hook that says on stdout when a phase starts, then waits for a signal."""
    import os, signal, sys, time

    from onnxopt import cli

    # a parent that ignores SIGINT (a Ray test of the same session, a background job) passes
    # that on; a user's Ctrl-C reaches an onnxopt that handles it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from onnxopt.pass_manager import REGISTRY, Pass, PassResult


    def wait(phase):
        print(phase, flush=True)
        time.sleep(120)


    class Slow(Pass):
        name = "test_slow"
        description = "waits"

        def run(self, graph, ctx):
            wait("pass")
            return PassResult(False)


    REGISTRY[Slow.name] = Slow
    phase, *argv = sys.argv[1:]
    if phase == "save":  # once the model's bytes are in the temporary file
        fsync = os.fsync
        os.fsync = lambda fd: (fsync(fd), wait("save"))
    sys.argv = ["onnxopt", *argv]
    cli.console_main()
''')


@pytest.mark.parametrize("phase", ["pass", "save"])
def test_ctrl_c_leaves_no_partial_output(tmp_path, phase):
    path = _write(tmp_path / "in", _valid_model())
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    untouched = _Untouched(tmp_path / "in", out.parent)
    passes = "test_slow" if phase == "pass" else "remove_identity"
    child = subprocess.Popen(
        [sys.executable, str(driver), phase, "optimize", str(path), "-o", str(out), "--passes",
         passes, "--report", str(out.parent / "r.json")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == phase
        if phase == "save":  # the temporary copy exists beside the target
            assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")]
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=60)
    finally:
        child.kill()
    assert code == 130
    assert child.stderr.read() == "onnxopt: interrupted\n"
    untouched.check()


# ------------------------------------------------------------------ rough edges (issue 12)

def test_report_path_is_printed(tmp_path, capsys):
    path = _write(tmp_path, _valid_model())
    report = tmp_path / "r.json"
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--report",
                 str(report)]) == 0
    assert f"wrote report {report}" in capsys.readouterr().out.replace("\n", "")
    assert main(["validate", str(path), str(tmp_path / "o.onnx"), "--report",
                 str(tmp_path / "v.html")]) == 0
    assert f"wrote report {tmp_path / 'v.html'}" in capsys.readouterr().out.replace("\n", "")
    assert (tmp_path / "v.html").is_file()


def test_validate_positional_arguments_have_help(capsys):
    assert main(["validate", "--help"]) == 0
    positional = capsys.readouterr().out.split("positional arguments:\n")[1].split("\n\n")[0]
    for name in ("reference", "candidate"):
        (line,) = [ln for ln in positional.splitlines() if ln.split()[0] == name]
        assert len(line.split()) > 1, positional


@pytest.mark.parametrize("spec", ["x:3,4", "x:[3,4]"])
def test_input_shape_takes_onnxsim_and_polygraphy_syntax(tmp_path, spec):
    path = _write(tmp_path, make_model([helper.make_node("Relu", ["x"], ["y"])],
                                       [("x", F32, ["batch", 4])], [("y", F32, ["batch", 4])]))
    report = tmp_path / "r.json"
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quiet",
                 "--input-shape", spec, "--report", str(report)]) == 0
    assert json.loads(report.read_text())["inputs"]["feeds"] == [
        {"x": {"shape": [3, 4], "dtype": "float32"}}]
