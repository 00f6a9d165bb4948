"""Batch mode: optimize many models, in worker processes on this machine or as Ray tasks.

    for result in optimize_many(["a.onnx", "zoo/"], "out/", jobs=2):
        print(result.model, result.exit_code, result.report["verdict"] if result.report else
              result.error["message"])

Every model is one job, ``onnxopt.optimize(path, output=..., **optimize_kwargs)`` run by
:func:`optimize_one` in a worker process: a model that fails (bad file, failed validation, a
crash of onnxruntime that kills its worker) fails alone, and the others finish. Results come back
in the order of the inputs, whatever order the jobs finish in, so a batch's output is the same
with one worker, several, or a Ray cluster.

Inputs and outputs (:func:`plan`): a file ``A.onnx`` is written to ``<output_dir>/A.onnx``; a folder
contributes its ``*.onnx`` files (with ``recursive``, those of its subfolders too), each written
to ``<output_dir>/<its path relative to the folder>``, so the folder structure is kept. Two inputs
that would be written to the same output, or an output that would overwrite an input or an
input's external data, are refused before any work. Paths are made absolute before they are
sent to a worker, so reports name the same files whichever executor ran them.

Executors:

* ``"local"``: a :class:`concurrent.futures.ProcessPoolExecutor` of ``jobs`` processes started
  with ``spawn`` (onnxruntime's thread pools do not survive ``fork``). Workers are reused across
  models. When a worker dies (killed, out of memory, a native crash), the pool is restarted and
  the models it was running are run again one at a time: the one that kills its worker alone is
  reported as an internal error (exit 3), the others get their ordinary results.
* ``"ray"``: the same jobs as Ray tasks (one CPU each, no retries: a failure is the model's
  result), on the cluster at ``ray_address`` or ``$RAY_ADDRESS``, or the one this process is
  connected to, or a local one listening on loopback only, without dashboard, shut down at the
  end (``onnxopt.ray_cluster``). Ray is an optional extra (``pip install 'onnxopt[ray]'``). On a
  cluster of several machines the models and the output folder must be on a file system every
  node sees, under the same absolute paths.

A strength search (``"auto"``, ``onnxopt.strength``) runs inside its model's job, with the
batch's executor: on Ray its candidate evaluations are Ray tasks of their own (the job's CPU is
lent to them while it waits), locally they run in the job's worker.

Timeout: with ``timeout``, a job still running that many seconds after it was handed to its
worker is stopped and fails alone: exit code :data:`TIMEOUT_EXIT_CODE`, and an error naming the
limit. A Ray task is cancelled (its worker process is ended). A worker process of the local pool
cannot be stopped alone: the pool's processes are ended, and the other jobs they were running
start again from the beginning (their results are those of a full run; only their ``seconds``
count the restart).

Threads: worker processes start with ``OMP_NUM_THREADS=1`` unless it is set, as Ray does for
its one-CPU tasks: numpy's BLAS then runs one thread per worker (``jobs`` workers on as many cores
do not oversubscribe them), and both executors sum in the same order, so the validation metrics
in their reports agree to the last bit (with BLAS threads per core, a cosine of 1.0 came out as
0.9999999999999999 under Ray). onnxruntime's sessions choose their own threads as usual. On a
Ray cluster of other machines, a different core count may still change metrics in the last
bits.

Memory rule: a job's *size* is its model file plus its external data files. The scheduler keeps
the sizes of the jobs running at once within a budget, by default a quarter of the memory
available when the batch starts (``MemAvailable`` of ``/proc/meminfo``): onnxopt holds a model
about four times at its peak (the original, the working graph, the serialized result and the
validation sessions). A model larger than the budget runs alone, with no other job beside it; the
others run up to ``jobs`` at a time while their sizes sum to at most the budget. Jobs start in
input order (a job that does not fit waits for running ones to finish; later ones do not
overtake it).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import time
import traceback
import warnings
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from onnxopt import io, ray_cluster
from onnxopt.api import optimize
from onnxopt.errors import OnnxoptError, OnnxoptWarning, PassError, UsageError, ValidationFailed
from onnxopt.report import human_bytes, percent_change

__all__ = ["ModelResult", "optimize_many", "optimize_one", "plan", "memory_budget",
           "worst_exit_code", "summary_row", "summary_table", "without_timings", "cpu_count",
           "EXIT_SEVERITY", "TIMEOUT_EXIT_CODE", "TIMING_KEYS"]

#: The exit code of a model stopped by the batch's ``timeout`` (that of coreutils' ``timeout``).
TIMEOUT_EXIT_CODE = 124

#: Exit codes from least to most severe: the exit code of a batch is its most severe model's. An
#: internal error (3) is a bug in onnxopt and is never hidden; a model over the time limit (124)
#: was not judged; a failed validation (1) means a readable model could not be optimized safely;
#: a bad input or usage (2) is the user's to fix.
EXIT_SEVERITY = (0, 2, 1, TIMEOUT_EXIT_CODE, 3)

#: Keywords of ``onnxopt.optimize`` that the batch sets per model itself.
_RESERVED = ("output", "on_pass")


@dataclass
class ModelResult:
    """What one model's job gave.

    Attributes:
        model: the input path (absolute).
        output: the file written (absolute), or None when nothing was (an error, or a failed
            validation without ``keep_invalid``).
        report: ``Report.to_dict()`` of the run (see ``onnxopt.report``), or None when it raised
            before there was one.
        error: ``{"type", "message", "exit_code"}`` when the job raised (and ``"traceback"``
            for an internal error), else None.
        exit_code: what the CLI would exit with for this model alone: 0 passed (or not
            validated), 1 validation failed (also a rollback with ``strict``), 2 bad input or
            usage, 3 internal error.
        seconds: wall time of the job in its worker (without waiting in the queue).
        warnings: the messages of the :class:`~onnxopt.errors.OnnxoptWarning` the run emitted
            in its worker; :func:`optimize_many` emits them again in the caller's process,
            prefixed with the model's path.
    """

    model: str
    output: str | None
    report: dict | None
    error: dict | None
    exit_code: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def optimize_one(model: str, output: str, options: dict) -> ModelResult:
    """Optimize ``model`` to ``output`` with ``onnxopt.optimize(model, output=output,
    **options)``, catching every error into the result (the job of one model in a worker).

    ``raise_on_failure`` defaults to False: a failed validation is the result's exit code 1 (with
    ``raise_on_failure=True`` the :class:`ValidationFailed` is caught, with its report)."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OnnxoptWarning)
        report, code, error = _optimize_caught(model, output, options)
    return ModelResult(model, report.output if report is not None else None,
                       report.to_dict() if report is not None else None, error, code,
                       time.perf_counter() - start,
                       [str(w.message) for w in caught if issubclass(w.category, OnnxoptWarning)])


def _optimize_caught(model: str, output: str, options: dict):
    """``(report or None, exit code, error dict or None)`` of one ``optimize`` run."""
    report = error = None
    try:
        _, report = optimize(model, output=output, **{"raise_on_failure": False, **options})
        failed = (report.validation is not None and not report.validation.passed) or \
            (report.strict and bool(report.rolled_back))
        code = ValidationFailed.exit_code if failed else 0
    except OnnxoptError as err:
        report, code = getattr(err, "report", None), err.exit_code
        error = {"type": type(err).__name__, "message": " ".join(str(err).split()),
                 "exit_code": code}
    except Exception as err:  # noqa: BLE001 -- a bug in onnxopt fails this model, not the batch
        code = PassError.exit_code
        error = {"type": type(err).__name__,
                 "message": " ".join(str(err).split()) or type(err).__name__, "exit_code": code,
                 "traceback": traceback.format_exc()}
    return report, code, error


def worst_exit_code(codes) -> int:
    """The most severe of ``codes`` by :data:`EXIT_SEVERITY` (0 for none); a code outside it
    (130, interrupted) counts as most severe."""
    rank = {c: i for i, c in enumerate(EXIT_SEVERITY)}
    return max(codes, key=lambda c: rank.get(c, len(rank)), default=0)


def memory_budget() -> int | None:
    """A quarter of the memory available now, in bytes (``MemAvailable`` of /proc/meminfo, else
    the free physical pages); None when neither is known (no limit). See the module docstring."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class _Job:
    model: str
    output: str
    size: int
    options: dict


def plan(models: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
         recursive: bool = False) -> list[tuple[Path, Path, list[Path]]]:
    """The batch's ``(model, output, external data files)`` triples, in input order (a folder's
    files sorted by path), with absolute paths; see the module docstring.

    Raises:
        UsageError: no inputs; an input that does not exist, is neither a folder nor a file; a
            folder without .onnx files; two inputs with the same output; an output that is an
            input or an input's external data file (or its ``.data``); ``output_dir`` is a file.
    """
    out_dir = Path(os.path.abspath(output_dir))
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{output_dir}: the output of several models must be a folder")
    if not models:
        raise UsageError("no models to optimize")
    pairs: list[tuple[Path, Path]] = []
    for given in models:
        path = Path(os.path.abspath(given))
        if path.is_dir():
            found = sorted(path.rglob("*.onnx") if recursive else path.glob("*.onnx"))
            # a previous run's outputs in an output folder inside the input folder are not
            # inputs (the output folder being the input folder is refused below), nor is what
            # hides below the folder: a killed run's staged result (``.<name>.XXXX.tmp/``),
            # version control's and editors' folders
            inside = path in out_dir.parents
            found = [f for f in found if f.is_file() and not (inside and out_dir in f.parents)
                     and not any(part.startswith(".") for part in f.relative_to(path).parts)]
            if not found:
                raise UsageError(f"{given}: no .onnx files in this folder"
                                 + ("" if recursive else " (--recursive searches subfolders)"))
            pairs += [(f, out_dir / f.relative_to(path)) for f in found]
        elif path.is_file():
            pairs.append((path, out_dir / path.name))
        else:
            raise UsageError(f"{given}: no such file or folder")
    seen: dict[Path, Path] = {}
    for model, output in pairs:
        if output in seen:
            raise UsageError(f"{model} and {seen[output]} would both be written to {output}")
        seen[output] = model
    planned = [(m, o, io.external_data_files(m)) for m, o in pairs]
    inputs = {f.resolve(): m for m, _, data in planned for f in (m, *data)}
    for model, output, _ in planned:
        for target in (output, Path(f"{output}.data")):
            if target.resolve() in inputs:
                raise UsageError(f"{target}: refusing to overwrite the input "
                                 f"{inputs[target.resolve()]} (output of {model})")
    return planned


def optimize_many(models: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                  jobs: int | None = None, executor: str = "local",
                  ray_address: str | None = None, recursive: bool = False,
                  model_options: Callable[[Path], dict] | None = None,
                  memory: int | None = None, timeout: float | None = None,
                  **optimize_kwargs) -> Iterator[ModelResult]:
    """Optimize every model of ``models`` into ``output_dir``, one job per model (see the module
    docstring); the inputs are checked now, the jobs run as the iterator is consumed.

    Args:
        models: .onnx files and folders (their ``*.onnx``; with ``recursive``, also in
            subfolders).
        output_dir: the folder the results are written to (created as needed).
        jobs: models run at once: worker processes (``"local"``; default: the CPUs this process
            may use) or Ray tasks in flight (``"ray"``; default: the cluster's CPUs).
        executor: ``"local"`` or ``"ray"``; also where each model's strength search scores its
            candidates (``onnxopt.optimize(executor=)``).
        ray_address: the Ray cluster to connect to (default ``$RAY_ADDRESS``, else a local one).
        model_options: ``fn(model path) -> dict`` of keywords for that model over
            ``optimize_kwargs`` (e.g. its own ``inputs``), called here, not in the workers.
        memory: the memory budget in bytes (default :func:`memory_budget`).
        timeout: seconds a model's job may run (None: no limit); see the module docstring.
        optimize_kwargs: keywords of ``onnxopt.optimize`` for every model (not ``output``,
            ``on_pass``; ``raise_on_failure`` defaults to False).

    Returns:
        An iterator of one :class:`ModelResult` per model, in input order. Leaving it early
        stops the workers (the models still running are abandoned). With the local executor, a
        script calling this needs the ``if __name__ == "__main__":`` guard: the workers are
        spawned, and import the script's module again.

    Raises:
        UsageError: see :func:`plan`; an unknown executor, ``jobs`` below 1, ``timeout`` not
            above 0, a reserved keyword; ray not installed; ``ray_address`` without
            ``executor="ray"``.
    """
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise UsageError(f"jobs must be a positive integer, got {jobs!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout > 0):
        raise UsageError(f"timeout (--timeout) must be a number of seconds above 0, got {timeout!r}")
    reserved = [k for k in _RESERVED if k in optimize_kwargs]
    if reserved:
        raise UsageError(f"optimize_many sets {', '.join(reserved)} itself for each model")
    ray_cluster.check_executor(executor, ray_address)
    planned = plan(models, output_dir, recursive)
    work = [_Job(str(m), str(o), io.stored_bytes(m, data),
                 {**optimize_kwargs, **(model_options(m) if model_options else {}),
                  "executor": executor})
            for m, o, data in planned]
    for job in work:
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)
    budget = memory if memory is not None else memory_budget()
    return _run(work, executor, jobs, ray_address, budget, timeout)


def _run(work: list[_Job], executor: str, jobs: int | None, ray_address: str | None,
         budget: int | None, timeout: float | None) -> Iterator[ModelResult]:
    """The jobs' results in order; the executor starts with the first result asked for."""
    runner = _RayRunner(ray_address, jobs) if executor == "ray" else _LocalRunner(jobs, len(work))
    with runner:
        for result in _in_order(work, runner, budget, timeout):
            for message in result.warnings:
                warnings.warn(f"{result.model}: {message}", OnnxoptWarning, stacklevel=2)
            yield result


def cpu_count() -> int:
    """The CPUs this process may use (``os.process_cpu_count``, Python 3.13; before it, the
    affinity mask, else every CPU)."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class _LocalRunner:
    """Worker processes on this machine (``spawn``), restarted when one dies."""

    def __init__(self, jobs: int | None, count: int) -> None:
        self.slots = max(1, min(jobs or cpu_count(), count))
        self._pool: cf.ProcessPoolExecutor | None = None

    def __enter__(self) -> "_LocalRunner":
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            # an early exit (an exception, a consumer that stopped) does not wait for the rest
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)

    def submit(self, job: _Job) -> cf.Future:
        for _ in range(2):  # a pool broken since the last job is replaced once
            if self._pool is None:
                self._pool = cf.ProcessPoolExecutor(
                    self.slots, mp_context=multiprocessing.get_context("spawn"))
            try:
                with _one_blas_thread():  # the pool starts a worker within submit, if needed
                    return self._pool.submit(optimize_one, job.model, job.output, job.options)
            except cf.process.BrokenProcessPool:
                self._drop_pool()
        raise cf.process.BrokenProcessPool("worker processes cannot be started")

    def died(self, err: BaseException) -> bool:
        """Whether ``err`` (a job's) says its worker died; a broken pool is replaced at the next
        submission."""
        if not isinstance(err, cf.process.BrokenProcessPool):
            return False
        if self._pool is not None and self._pool._broken:  # noqa: SLF001 -- no public flag
            self._drop_pool()
        return True

    def stop(self, future: cf.Future) -> bool:
        """End the job of ``future`` (over its time limit): a pool's worker cannot be ended
        alone, so its processes are all ended (the pool is replaced at the next submission);
        True: the other running jobs were stopped too."""
        if self._pool is not None:
            for process in list(self._pool._processes.values()):  # noqa: SLF001 -- no public
                process.kill()
            self._drop_pool(wait=True)  # its (killed) workers joined: queues closed, no leak
        return True

    def _drop_pool(self, wait: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
        self._pool = None


@contextlib.contextmanager
def _one_blas_thread():
    """Within the block, ``OMP_NUM_THREADS`` is 1 unless the user set it (for the worker
    processes started there; see the module docstring)."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


class _RayRunner:
    """Ray tasks, on a cluster of ``onnxopt.ray_cluster.connected(address)``."""

    def __init__(self, address: str | None, jobs: int | None) -> None:
        self._connection = contextlib.ExitStack()
        self._ray = ray = self._connection.enter_context(ray_cluster.connected(address))
        self.slots = jobs or max(1, int(ray.cluster_resources().get("CPU", 1)))
        # one CPU each, no retries: a task that fails or whose worker dies is the model's result
        self._task = ray.remote(num_cpus=1, max_retries=0)(optimize_one)
        self._refs: dict[cf.Future, Any] = {}

    def __enter__(self) -> "_RayRunner":
        return self

    def __exit__(self, *exc) -> None:
        self._connection.close()

    def submit(self, job: _Job) -> cf.Future:
        ref = self._task.remote(job.model, job.output, job.options)
        future = ref.future()
        self._refs[future] = ref
        return future

    def died(self, err: BaseException) -> bool:
        return False  # Ray isolates tasks: the error is the model's own

    def stop(self, future: cf.Future) -> bool:
        """End the task of ``future`` (its worker process); the others run on."""
        self._ray.cancel(self._refs.pop(future), force=True)
        return False


def _in_order(work: list[_Job], runner, budget: int | None,
              timeout: float | None = None) -> Iterator[ModelResult]:
    """Run ``work`` through ``runner`` (``slots``, ``submit(job) -> Future``, ``died(err)``,
    ``stop(future) -> whether every running job was stopped``) under the memory rule and the
    ``timeout`` of the module docstring; yield the results in the order of ``work``."""
    alone = {i for i, job in enumerate(work) if budget is not None and job.size > budget}
    pending = deque(range(len(work)))
    running: dict[cf.Future, int] = {}
    deadline: dict[cf.Future, float] = {}
    done: dict[int, ModelResult] = {}

    def fits(i: int) -> bool:
        if not running:
            return True
        if i in alone or any(r in alone for r in running.values()) or \
                len(running) >= runner.slots:
            return False
        return budget is None or sum(work[r].size for r in running.values()) + \
            work[i].size <= budget

    try:  # Ctrl-C, SIGTERM, a consumer that stopped: no job may run on
        emitted = 0
        while emitted < len(work):
            while pending and fits(pending[0]):
                i = pending.popleft()
                future = runner.submit(work[i])
                running[future] = i
                if timeout is not None:
                    deadline[future] = time.monotonic() + timeout
            wait = max(0.0, min(deadline.values()) - time.monotonic()) if deadline else None
            finished, _ = cf.wait(running, timeout=wait, return_when=cf.FIRST_COMPLETED)
            retry, stopped = [], []
            for future in finished:
                deadline.pop(future, None)
                i = running.pop(future)
                err = future.exception()
                if err is None:
                    done[i] = future.result()
                elif runner.died(err) and i not in alone:
                    # every job of a dead pool fails with it: each runs again by itself, and
                    # the one that kills its worker alone is the culprit
                    alone.add(i)
                    retry.append(i)
                else:
                    done[i] = _died(work[i], err)
                    stopped.append(i)
            for future in [f for f, end in deadline.items() if end <= time.monotonic()]:
                if future not in running:  # ended with another job's (local pool)
                    continue
                i = running.pop(future)
                del deadline[future]
                done[i] = _timed_out(work[i], timeout)
                stopped.append(i)
                if runner.stop(future):  # the others are run again, as they were
                    retry += running.values()
                    running.clear()
                    deadline.clear()
            for i in stopped + retry:  # killed mid-run: what they staged beside the output
                io.remove_stale_staging(work[i].output)
            pending.extendleft(sorted(retry, reverse=True))
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
    except BaseException:
        for future in list(running):
            runner.stop(future)
        for i in running.values():  # what they staged beside their output
            io.remove_stale_staging(work[i].output)
        raise


def _timed_out(job: _Job, timeout: float) -> ModelResult:
    """The result of a job stopped at its time limit."""
    return ModelResult(job.model, None, None, {
        "type": "Timeout", "message": f"stopped after {timeout:g} s (the batch's time limit for "
        "one model; see --timeout)", "exit_code": TIMEOUT_EXIT_CODE}, TIMEOUT_EXIT_CODE,
        float(timeout))


def _died(job: _Job, err: BaseException) -> ModelResult:
    """The result of a job whose worker died or whose task failed outside ``optimize_one``."""
    if isinstance(err, cf.process.BrokenProcessPool):
        message = "the worker process died (killed, out of memory, or a crash in native code)"
    else:
        message = " ".join(str(err).split()) or type(err).__name__
    code = PassError.exit_code
    return ModelResult(job.model, None, None, {"type": type(err).__name__, "message": message,
                                               "exit_code": code}, code, 0.0)


#: Keys of a report (at any depth) that measure time: they differ between runs of one model.
TIMING_KEYS = ("seconds", "latency_ratio", "latency_ms", "versus_float", "versus_first")


def without_timings(value):
    """``value`` (a report dict, or any JSON value) without the :data:`TIMING_KEYS`, to compare
    two runs of one model."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def summary_row(result: ModelResult) -> dict[str, Any]:
    """One row of the batch's summary table: model, nodes, size, verdict (with the drift), time."""
    r = result.report
    row = {"model": _shown(result.model), "nodes": "-", "size": "-", "verdict": "",
           "time": f"{result.seconds:.2f} s"}
    if r is not None:
        if r.get("after"):
            row["nodes"] = f"{r['before']['nodes_total']} -> {r['after']['nodes_total']}"
            before, after = r["before"]["file_bytes"], r["after"]["file_bytes"]
            change = percent_change(before, after)
            row["size"] = (f"{human_bytes(before)} -> {human_bytes(after)}"
                           + (f" ({change})" if change else ""))
        row["verdict"] = r["verdict"] + _drift(r.get("validation"))
    if result.error is not None:
        row["verdict"] = f"error {result.exit_code}: {result.error['message']}"
    elif result.exit_code and result.output is None:
        row["verdict"] += " (not written)"
    return row


def summary_table(rows: list[dict[str, Any]]):
    """A rich Table of :func:`summary_row` rows (rich is imported here, for the CLI only)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(rows)} model{'s' if len(rows) != 1 else ''}")
    for column in ("model", "nodes", "size", "verdict", "time"):
        table.add_column(column, justify="right" if column in ("nodes", "size", "time")
                         else "left", overflow="fold")
    for row in rows:
        table.add_row(*(Text(row[c]) for c in ("model", "nodes", "size", "verdict", "time")))
    return table


def _shown(path: str) -> str:
    """``path`` relative to the current folder when it is inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _drift(validation: dict | None) -> str:
    """`` (max abs 3e-07)`` for a lossless validation, `` (cosine 0.9991)`` (the lowest over the
    outputs) for a lossy one; "" when there is no figure."""
    if not validation or not validation.get("outputs"):
        return ""
    key, pick, name, fmt = (("cosine", min, "cosine", ".6f") if validation["mode"] == "lossy"
                            else ("max_abs", max, "max abs", ".3g"))
    values = [o[key] for o in validation["outputs"] if o.get(key) is not None]
    return f" ({name} {format(pick(values), fmt)})" if values else ""
