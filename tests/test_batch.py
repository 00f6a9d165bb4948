"""Tests of optimizer/batch.py (``onnxopt.optimize_many``) and the CLI's batch mode: results in
input order, a bad model failing alone with its exit code, outputs and reports identical with one
worker, two, and Ray tasks on a local cluster; the memory rule of the scheduler."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib.util
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_same_outputs, make_model
from test_cli import _CorruptValuesLossy, _model  # a lossy pass failing validation; a model
from onnxopt import UsageError, io, optimize_many
from onnxopt.errors import OnnxoptWarning
from onnxopt.batch import (EXIT_SEVERITY, TIMEOUT_EXIT_CODE, ModelResult, _in_order, _Job, plan,
                           without_timings, worst_exit_code)
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


class _Hang(Pass):
    """Test-only pass that does not return in any time a test waits."""

    name = "test_batch_hang"
    description = "sleeps"

    def run(self, graph, ctx):
        time.sleep(600)


def test_a_model_over_the_timeout_fails_alone_with_its_exit_code(batch_dir, tmp_path):
    """Worker processes: the hanging model's pool is ended at the limit; the models beside it
    run again and pass; the batch's exit code is the timeout's."""
    out_dir = tmp_path / "out"
    start = time.monotonic()
    results = {os.path.relpath(r.model, batch_dir): r for r in optimize_many(
        [batch_dir / "a.onnx", batch_dir / "b.onnx", batch_dir / "sub" / "c.onnx"], out_dir,
        jobs=2, timeout=20,
        model_options=lambda path: {"passes": [_Hang()]} if path.name == "a.onnx" else {})}
    assert time.monotonic() - start < 120
    hung = results["a.onnx"]
    assert (hung.exit_code, hung.output, hung.error["type"]) == (TIMEOUT_EXIT_CODE, None,
                                                                 "Timeout")
    assert hung.error["message"] == ("stopped after 20 s (the batch's time limit for one model; "
                                     "see --timeout)")
    for name in ("b.onnx", "sub/c.onnx"):
        assert results[name].exit_code == 0 and results[name].report["verdict"] == "passed"
    assert sorted(p.name for p in out_dir.rglob("*.onnx")) == ["b.onnx", "c.onnx"]
    assert worst_exit_code(r.exit_code for r in results.values()) == TIMEOUT_EXIT_CODE


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


def test_timeout_of_one_model_is_a_usage_error(batch_dir, tmp_path, capsys):
    assert main(["optimize", str(batch_dir / "a.onnx"), "-o", str(tmp_path / "a.onnx"),
                 "--timeout", "5"]) == 2
    assert "--timeout limits each model of a batch" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()


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
                            ({"timeout": 0}, r"timeout \(--timeout\) must be a number of seconds above 0"),
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
    assert EXIT_SEVERITY == (0, 2, 1, TIMEOUT_EXIT_CODE, 3) and TIMEOUT_EXIT_CODE == 124
    assert worst_exit_code([0, 2, 0]) == 2
    assert worst_exit_code([2, 1, 0]) == 1
    assert worst_exit_code([1, 124, 2]) == 124
    assert worst_exit_code([1, 3, 124]) == 3
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
        staged = None
        if job.options.get("stage"):  # as a large result: staged beside the output meanwhile
            staged = io.stage_model(onnx.ModelProto(), job.output)
        time.sleep(job.options["sleep"])
        with self.lock:
            self.running.discard(job.model)
        if staged is not None:
            staged.commit()
        return ModelResult(job.model, job.output, None, None, 0, job.options["sleep"])

    def died(self, err: BaseException) -> bool:
        return False

    def stop(self, future: cf.Future) -> bool:
        """As the local pool: every running job is stopped (the threads sleep on, unread)."""
        self.stops += 1
        with self.lock:
            self.running.clear()
        return True

    stops = 0


def test_a_job_over_the_timeout_fails_alone_and_the_others_it_stopped_run_again(tmp_path):
    # limit 0.3 s: "slow" is over it; "a" starts at 0.15 s (after "x"), is still running when
    # "slow" is stopped (with every running job, as in the local pool), and runs again
    sleeps = {"slow": 5.0, "x": 0.15, "a": 0.25, "b": 0.05}
    work = [_Job(name, str(tmp_path / name), 1, {"sleep": sleep, "stage": True})
            for name, sleep in sleeps.items()]
    runner = _ThreadRunner(slots=2)
    submitted = []
    submit = runner.submit
    runner.submit = lambda job: submitted.append(job.model) or submit(job)
    start = time.monotonic()
    results = list(_in_order(work, runner, budget=None, timeout=0.3))
    assert time.monotonic() - start < 3  # nothing waited for the slow job
    assert [r.model for r in results] == list(sleeps)
    slow = results[0]
    assert (slow.exit_code, slow.output, slow.report) == (TIMEOUT_EXIT_CODE, None, None)
    assert slow.error["type"] == "Timeout" and "after 0.3 s" in slow.error["message"]
    assert [r.exit_code for r in results[1:]] == [0, 0, 0]
    assert runner.stops == 1 and submitted.count("a") == 2 and submitted.count("slow") == 1
    # what the stopped jobs staged is removed (their processes are killed: nothing else would)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "x"]


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


def _listening(pids: set[int]) -> list[str]:
    """The addresses of the TCP sockets the processes ``pids`` listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    address = fields[1].split(":")[0]
                    raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1]
                                   for i in range(0, len(address), 8))
                    found.append(socket.inet_ntop(family, raw))
    return found


def _descendants() -> set[int]:
    """This process and every process below it."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    family, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in family} - family
        family |= more
        grew = bool(more)
    return family


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'onnxopt[ray]')")
def test_ray_executor_gives_the_local_outputs(batch_dir, tmp_path):
    """Ray tasks on the local cluster onnxopt starts (this machine's CPUs, loopback only, no
    dashboard) give the same outputs and reports as local worker processes; a model's strength
    search inside its Ray task scores its candidates as Ray tasks of its own (two such models
    at once hold every CPU of the cluster: they lend them to their evaluations while waiting)."""
    from test_strength import _wide_model
    from onnxopt import ray_cluster

    model, feeds = _wide_model()
    searched = {}
    for name in ("pruned.onnx", "pruned2.onnx"):
        onnx.save(model, str(batch_dir / name))
        searched[batch_dir / name] = {"inputs": feeds, "max_drift": "cosine=0.99",
                                      "prune_sparsity": "auto"}
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    local = list(optimize_many([batch_dir], local_dir, jobs=2, recursive=True,
                               model_options=lambda path: searched.get(path, {})))
    with ray_cluster.connected():
        remote = list(optimize_many([batch_dir], ray_dir, executor="ray", recursive=True,
                                    model_options=lambda path: searched.get(path, {})))
        addresses = _listening(_descendants())
    assert addresses and set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1"}, addresses
    assert [_comparable(r, ray_dir) for r in remote] == [_comparable(r, local_dir) for r in local]
    assert _outputs(ray_dir) == _outputs(local_dir)
    pruned = [r for r in remote if Path(r.model).name.startswith("pruned")]
    assert [r.exit_code for r in pruned] == [0, 0] and pruned[0].report["verdict"] == "passed"
    prune = [p for p in pruned[0].report["passes"] if p["name"] == "prune"][-1]["stats"]
    assert prune["search"]["met_budget"] and len(prune["search"]["path"]) >= 3
    _check_batch([r for r in remote if r not in pruned], batch_dir, ray_dir)


def test_jobs_still_running_when_the_batch_is_left_are_stopped_and_their_staging_removed(
        tmp_path):
    """Ctrl-C, SIGTERM or a consumer that stops: the jobs still running are ended (their
    workers killed) and what they staged beside their outputs removed -- before, they ran on
    after onnxopt's exit and wrote their outputs later."""
    from onnxopt import batch, io

    class Runner:
        slots = 2

        def __init__(self):
            self.stopped = []

        def submit(self, job):
            future = cf.Future()
            if job.model == "a":
                future.set_result("result a")
            return future  # "b" never ends by itself

        def died(self, err):
            return False

        def stop(self, future):
            self.stopped.append(future)
            return True

    out_b = tmp_path / "b.onnx"
    staged = tmp_path / f"{io.staging_prefix(out_b)}xyz.tmp"
    staged.mkdir()
    work = [batch._Job("a", str(tmp_path / "a.onnx"), 1, {}),
            batch._Job("b", str(out_b), 1, {})]
    runner = Runner()
    results = batch._in_order(work, runner, None)
    assert next(results) == "result a"
    results.close()  # as an exception at the consumer's end would
    assert len(runner.stopped) == 1 and not staged.exists()
