"""Tests of optimizer/batch.py (``onnxopt.optimize_many``) and the CLI's batch mode: results in
input order, a bad model failing alone with its exit code, outputs and reports identical with one
worker, two, and Ray tasks on a local cluster; the memory rule of the scheduler."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_same_outputs, make_model
from test_cli import _CorruptValuesLossy, _model  # a lossy pass failing validation; a model
from onnxopt import UsageError, optimize_many
from onnxopt.errors import OnnxoptWarning
from onnxopt.batch import (EXIT_SEVERITY, ModelResult, _in_order, _Job, plan, without_timings,
                           worst_exit_code)
from onnxopt.cli import main
from onnxopt.pass_manager import Pass

# the small models' synthesized inputs draw warnings that are not what these tests are about
pytestmark = pytest.mark.filterwarnings("ignore::onnxopt.errors.OnnxoptWarning")


def _transpose_model(shape: tuple[int, int] = (2, 5)) -> onnx.ModelProto:
    """Two inverse Transposes around a Sigmoid, and a Mul by one."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Transpose", ["t"], ["u"], perm=[1, 0]),
             helper.make_node("Sigmoid", ["u"], ["s"]),
             helper.make_node("Mul", ["s", "one"], ["y"])]
    return make_model(nodes, [("x", np.float32, list(shape))], [("y", np.float32, list(shape))],
                      {"one": np.ones((1,), np.float32)})


#: name -> model of the batch folder; ``sub/`` is only seen with ``recursive``. ``wide.onnx``'s
#: output is large enough for numpy's BLAS to use several threads when allowed, so its
#: validation metrics show a difference in threads between executors.
MODELS = {"a.onnx": lambda: _model(1.0), "b.onnx": _transpose_model,
          "sub/c.onnx": lambda: _model(2.0), "wide.onnx": lambda: _transpose_model((64, 1024))}


@pytest.fixture
def batch_dir(tmp_path) -> Path:
    """A folder of the MODELS and a broken file ``broken.onnx`` (not a protobuf)."""
    folder = tmp_path / "models"
    for name, build in MODELS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(build(), str(folder / name))
    (folder / "broken.onnx").write_bytes(b"this is not an ONNX model")
    return folder


def _comparable(result: ModelResult, out_dir: Path) -> dict:
    """The result as a dict without timings, its output paths relative to ``out_dir``."""
    text = json.dumps(without_timings(result.to_dict()))
    return json.loads(text.replace(json.dumps(str(out_dir))[1:-1] + "/", "<out>/"))


def _check_batch(results: list[ModelResult], folder: Path, out_dir: Path) -> None:
    """Input order, the broken model failing alone (exit 2), the others written, validated and
    computing what the originals compute on onnxruntime."""
    names = sorted(["broken.onnx", *MODELS])
    assert [os.path.relpath(r.model, folder) for r in results] == names
    for r in results:
        name = os.path.relpath(r.model, folder)
        if name == "broken.onnx":
            assert (r.exit_code, r.output, r.report) == (2, None, None)
            assert r.error["type"] == "ModelLoadError" and "broken.onnx" in r.error["message"]
            continue
        assert r.exit_code == 0 and r.error is None, r.error
        assert r.output == str(out_dir / name) and r.report["verdict"] == "passed"
        optimized = onnx.load(r.output)
        assert r.report["after"]["nodes"] == len(optimized.graph.node)
        assert r.report["after"]["nodes"] < r.report["before"]["nodes"]
        assert_same_outputs(onnx.load(str(folder / name)), optimized)


def _outputs(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*"))
            if p.is_file()}


def test_jobs_1_and_2_give_the_same_outputs_and_reports(batch_dir, tmp_path):
    runs = {}
    for jobs in (1, 2):
        out_dir = tmp_path / f"out{jobs}"
        results = list(optimize_many([batch_dir], out_dir, jobs=jobs, recursive=True))
        _check_batch(results, batch_dir, out_dir)
        runs[jobs] = ([_comparable(r, out_dir) for r in results], _outputs(out_dir))
    assert sorted(runs[1][1]) == sorted(MODELS)  # the folder structure is kept
    assert runs[1] == runs[2]


class _KillWorker(Pass):
    """Test-only pass that ends its process at once, as a crash in native code would."""

    name = "test_batch_kill_worker"
    description = "ends the process"

    def run(self, graph, ctx):
        os._exit(70)


def test_failures_stay_with_their_model(batch_dir, tmp_path):
    """A failed validation (exit 1) and a worker that dies (exit 3, the pool restarted) are
    their models' results; the other models are optimized as usual."""
    special = {batch_dir / "a.onnx": {"passes": ["default", _CorruptValuesLossy()]},
               batch_dir / "b.onnx": {"passes": [_KillWorker()]}}
    out_dir = tmp_path / "out"
    # the workers' warnings come again in this process, named by the model
    with pytest.warns(OnnxoptWarning, match=r"a\.onnx: the drift budget's estimate missed"):
        results = {os.path.relpath(r.model, batch_dir): r for r in optimize_many(
            [batch_dir], out_dir, jobs=2, recursive=True,
            model_options=lambda path: special.get(path, {}))}
    failed = results["a.onnx"]
    assert (failed.exit_code, failed.output, failed.error) == (1, None, None)
    assert failed.report["verdict"] == "failed" and not (out_dir / "a.onnx").exists()
    died = results["b.onnx"]
    assert (died.exit_code, died.output, died.error["type"]) == (3, None, "BrokenProcessPool")
    assert results["sub/c.onnx"].exit_code == 0 and results["broken.onnx"].exit_code == 2
    assert_same_outputs(_model(2.0), onnx.load(str(out_dir / "sub" / "c.onnx")))
    assert worst_exit_code(r.exit_code for r in results.values()) == 3


def test_cli_batch_prints_json_lines_and_a_table(batch_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    first = batch_dir / "b.onnx"
    code = main(["optimize", str(first), str(batch_dir), "-o", str(out_dir), "--jobs", "2"])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    # b.onnx alone and again in its folder: both go to out/b.onnx, refused before any work
    assert (code, lines) == (2, []) and "would both be written" in captured.err
    assert not out_dir.exists()
    code = main(["optimize", str(batch_dir / "a.onnx"), str(batch_dir / "broken.onnx"),
                 str(first), "-o", str(out_dir), "--jobs", "2"])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 2  # the broken model's; the others passed
    assert [Path(line["model"]).name for line in lines] == ["a.onnx", "broken.onnx", "b.onnx"]
    assert [line["exit_code"] for line in lines] == [0, 2, 0]
    assert lines[0]["report"]["verdict"] == "passed"
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.onnx", "b.onnx"]
    table = captured.err  # the table goes to stderr when the JSON lines are on stdout
    assert "3 models" in table and "passed" in table and "error 2" in table

    summary = tmp_path / "summary.jsonl"
    assert main(["optimize", str(batch_dir), "--recursive", "-o", str(tmp_path / "out2"),
                 "--jobs", "1", "--summary", str(summary), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert [json.loads(line)["exit_code"] for line in summary.read_text().splitlines()] == \
        [0, 0, 2, 0, 0]  # a, b, broken, sub/c, wide


def test_plan_refuses_clashes_and_overwrites(batch_dir, tmp_path):
    with pytest.raises(UsageError, match="would both be written"):
        plan([batch_dir / "a.onnx", batch_dir / "sub" / ".." / "a.onnx"], tmp_path / "out")
    with pytest.raises(UsageError, match="refusing to overwrite the input"):
        plan([batch_dir], batch_dir)
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    onnx.save(_transpose_model(), str(tmp_path / "empty" / "deeper" / "m.onnx"))
    with pytest.raises(UsageError, match="no .onnx files.*--recursive"):
        plan([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(UsageError, match="no such file"):
        plan([tmp_path / "nothing.onnx"], tmp_path / "out")
    # an output folder inside the input folder: earlier outputs are not inputs
    (batch_dir / "optimized").mkdir()
    onnx.save(_transpose_model(), str(batch_dir / "optimized" / "old.onnx"))
    planned = plan([batch_dir], batch_dir / "optimized", recursive=True)
    assert [os.path.relpath(o, batch_dir) for _, o, _ in planned] == [
        "optimized/a.onnx", "optimized/b.onnx", "optimized/broken.onnx", "optimized/sub/c.onnx",
        "optimized/wide.onnx"]


def test_usage_errors_come_before_any_work(batch_dir, tmp_path):
    for kwargs, message in (({"executor": "dask"}, "unknown executor"),
                            ({"jobs": 0}, "positive integer"),
                            ({"output": "x.onnx"}, "sets output")):
        with pytest.raises(UsageError, match=message):
            optimize_many([batch_dir], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_ray_executor_without_ray_is_a_usage_error(batch_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'onnxopt\[ray\]'"):
        optimize_many([batch_dir], tmp_path / "out", executor="ray")


def test_exit_code_of_a_batch_is_the_most_severe():
    assert EXIT_SEVERITY == (0, 2, 1, 3)
    assert worst_exit_code([0, 2, 0]) == 2
    assert worst_exit_code([2, 1, 0]) == 1
    assert worst_exit_code([1, 3, 2]) == 3
    assert worst_exit_code([]) == 0


class _ThreadRunner:
    """A runner of fake jobs in threads: each job sleeps ``options["sleep"]`` seconds and
    records how many jobs, and which, run beside it."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.pool = cf.ThreadPoolExecutor(8)
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.beside: dict[str, set[str]] = {}

    def submit(self, job: _Job) -> cf.Future:
        return self.pool.submit(self._run, job)

    def _run(self, job: _Job) -> ModelResult:
        with self.lock:
            for other in self.running:
                self.beside.setdefault(other, set()).add(job.model)
            self.beside.setdefault(job.model, set()).update(self.running)
            self.running.add(job.model)
        time.sleep(job.options["sleep"])
        with self.lock:
            self.running.discard(job.model)
        return ModelResult(job.model, job.output, None, None, 0, job.options["sleep"])

    def died(self, err: BaseException) -> bool:
        return False


def test_scheduler_keeps_input_order_and_runs_large_models_alone():
    # sizes against a budget of 100: "big" is over it and runs alone; c and d (60 + 50) do not
    # fit together; the first jobs take longest, so they finish last
    sizes = {"a": 10, "b": 10, "big": 500, "c": 60, "d": 50, "e": 10}
    sleeps = {"a": 0.3, "b": 0.1, "big": 0.05, "c": 0.2, "d": 0.05, "e": 0.01}
    work = [_Job(name, f"out/{name}", size, {"sleep": sleeps[name]})
            for name, size in sizes.items()]
    runner = _ThreadRunner(slots=3)
    order = [r.model for r in _in_order(work, runner, budget=100)]
    assert order == list(sizes)
    assert runner.beside["big"] == set()
    assert "d" not in runner.beside["c"]
    assert runner.beside["a"] >= {"b"}  # small ones do run together
    assert max(len(v) for k, v in runner.beside.items() if k != "big") <= 2  # 3 slots


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'onnxopt[ray]')")
def test_ray_executor_gives_the_local_outputs(batch_dir, tmp_path):
    """Ray tasks on a local cluster started here (2 CPUs, no dashboard) give the same outputs
    and reports as local worker processes."""
    import ray

    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local = list(optimize_many([batch_dir], local_dir, jobs=2, recursive=True))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        remote = list(optimize_many([batch_dir], ray_dir, executor="ray", recursive=True))
    finally:
        ray.shutdown()
    _check_batch(remote, batch_dir, ray_dir)
    assert [_comparable(r, ray_dir) for r in remote] == [_comparable(r, local_dir) for r in local]
    assert _outputs(ray_dir) == _outputs(local_dir)
