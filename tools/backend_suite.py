"""The ONNX backend test suite as onnxopt's regression net.

Every case of the operator test suite that ships with the ``onnx`` package is a model with inputs
and expected outputs:

* ``node``: the ~1,900 operator cases of ``onnx.backend.test.case.node.collect_testcases``;
* ``simple``, ``pytorch-converted``, ``pytorch-operator``: ``model.onnx`` plus
  ``test_data_set_*/{input,output}_*.pb`` under ``onnx/backend/test/data/<kind>``;
* ``light``: the small stand-ins of the ``real`` models (``data/light/light_<name>.onnx``), fed the
  dummy inputs onnx's runner makes for them (``Runner.generate_dummy_data``, not random) and
  compared with ``light_<name>_output_0.pb``.

A case is checked the way ``onnx.backend.test.runner`` checks it: outputs compared with
``Runner.assert_similar_outputs`` at the case's own ``rtol``/``atol`` (1e-3/1e-7 unless the case
or its ``data.json`` says otherwise); sequences are compared element by element. Models run on
onnxruntime CPU with its graph optimizations off (``onnxopt.validate.make_session``), so each
model runs as written.

For each case: if onnxruntime does not pass the original, the case says nothing about onnxopt
(``ort-fails``). Otherwise ``onnxopt.optimize`` runs the default pipeline, validating with the
case's inputs (so a pass that breaks the model is rolled back, as for a user);
the optimized model must keep the graph's input and output names in order, must pass the same
check, and ``optimize`` must not change the model it was given. ``optimize`` raising an
``InputError`` is reported as ``rejected`` (the model itself is unusable), any other exception is a
failure. A failure can be blamed on a pass by :func:`blame`: the pipeline is re-run with no pass
(import and export only), then with each pass alone and, if no pass fails alone, with each pass
left out.

CLI::

    python tools/backend_suite.py [--jobs N] [--sample K] [--filter REGEX] [--no-blame]

prints a summary and exits 1 when any case fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.backend.test.runner import Runner

if __package__ in (None, ""):  # run as a script: make ``tools`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import onnxopt
from onnxopt.errors import InputError
from onnxopt.validate import make_session, run_model

DATA_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODEL_KINDS = ("simple", "pytorch-converted", "pytorch-operator")
DEFAULT_RTOL, DEFAULT_ATOL = 1e-3, 1e-7

#: Outcomes of :func:`evaluate`; only ``failed`` makes the suite fail.
PASSED, FAILED, REJECTED, ORT_FAILS = "passed", "failed", "rejected", "ort-fails"


@dataclass
class Case:
    """One backend test case.

    Attributes:
        name: ``test_<...>`` for node cases, ``<kind>/test_<...>`` for the others.
        kind: ``node``, ``simple``, ``pytorch-converted``, ``pytorch-operator`` or ``light``.
        model: the model under test.
        data_sets: (feed by graph input name, expected outputs in graph output order) pairs;
            a value is an array, a list of arrays (sequence) or None (empty optional).
        rtol, atol: the tolerances of ``Runner.assert_similar_outputs``.
    """

    name: str
    kind: str
    model: onnx.ModelProto
    data_sets: list[tuple[dict[str, Any], list[Any]]]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL


@dataclass
class CaseResult:
    """The outcome of one case: ``status`` is one of PASSED, FAILED, REJECTED, ORT_FAILS;
    ``reason`` says why for every status but PASSED; ``blamed`` names what :func:`blame` found."""

    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    blamed: list[str] = field(default_factory=list)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(err).__name__}: {' | '.join(lines[:4])}" if lines else type(err).__name__


def _to_value(value: Any) -> Any:
    """A test-case value (array, TensorProto, list of them or None) as onnxruntime takes it."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [_to_value(v) for v in value]
    if isinstance(value, np.generic):  # a numpy scalar stands for a 0-d tensor
        return np.asarray(value)
    return value


def _load_value(path: str, type_proto: onnx.TypeProto) -> Any:
    """A ``*.pb`` file read as the graph's declared type says (as ``Runner._load_proto`` does)."""
    data = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if type_proto.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    proto = onnx.TensorProto()
    proto.ParseFromString(data)
    return numpy_helper.to_array(proto)


def _node_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():  # the case generators overflow and divide by zero on purpose
        warnings.simplefilter("ignore")
        tests = collect_testcases("")
    cases = []
    for t in tests:
        names = [i.name for i in t.model.graph.input]
        data_sets = [(dict(zip(names, map(_to_value, inputs))), [_to_value(o) for o in outputs])
                     for inputs, outputs in t.data_sets]
        cases.append(Case(t.name, "node", t.model, data_sets, t.rtol, t.atol))
    return cases


def _tolerances(case_dir: Path) -> tuple[float, float]:
    data_json = case_dir / "data.json"
    if not data_json.is_file():
        return DEFAULT_RTOL, DEFAULT_ATOL
    data = json.loads(data_json.read_text())
    return data.get("rtol", DEFAULT_RTOL), data.get("atol", DEFAULT_ATOL)


def _dir_case(kind: str, case_dir: Path) -> Case:
    model = onnx.load(str(case_dir / "model.onnx"))
    graph_inputs, graph_outputs = model.graph.input, model.graph.output
    data_sets = []
    for set_dir in sorted(glob.glob(str(case_dir / "test_data_set*"))):
        n_in = len(glob.glob(os.path.join(set_dir, "input_*.pb")))
        n_out = len(glob.glob(os.path.join(set_dir, "output_*.pb")))
        feed = {graph_inputs[i].name: _load_value(os.path.join(set_dir, f"input_{i}.pb"),
                                                  graph_inputs[i].type) for i in range(n_in)}
        expected = [_load_value(os.path.join(set_dir, f"output_{i}.pb"), graph_outputs[i].type)
                    for i in range(n_out)]
        data_sets.append((feed, expected))
    rtol, atol = _tolerances(case_dir)
    return Case(f"{kind}/{case_dir.name}", kind, model, data_sets, rtol, atol)


def _light_case(real_dir: Path) -> Case | None:
    """The ``real`` case whose ``data.json`` points into ``data/light``, as the runner runs it."""
    url = json.loads((real_dir / "data.json").read_text()).get("url", "")
    if not url.startswith("onnx/backend/test/data/light/"):
        return None
    path = DATA_DIR / "light" / Path(url).name
    expected_path = path.with_name(f"{path.stem}_output_0.pb")
    if not (path.is_file() and expected_path.is_file()):
        return None
    model = onnx.load(str(path))
    initializers = {init.name for init in model.graph.initializer}
    feed = {x.name: Runner.generate_dummy_data(x, seed=0, name=path.stem, random=False)
            for x in model.graph.input if x.name not in initializers}
    expected = [_load_value(str(expected_path), model.graph.output[0].type)]
    rtol, atol = _tolerances(real_dir)
    return Case(f"light/{real_dir.name}", "light", model, [(feed, expected)], rtol, atol)


def load_cases(name_filter: str | None = None) -> list[Case]:
    """Every backend test case of the installed onnx, sorted by name; ``name_filter`` is a regular
    expression searched for in case names."""
    cases = _node_cases()
    for kind in MODEL_KINDS:
        for case_dir in sorted((DATA_DIR / kind).iterdir()):
            if (case_dir / "model.onnx").is_file():
                cases.append(_dir_case(kind, case_dir))
    for real_dir in sorted((DATA_DIR / "real").iterdir()):
        if (real_dir / "data.json").is_file():
            light = _light_case(real_dir)
            if light is not None:
                cases.append(light)
    if name_filter:
        pattern = re.compile(name_filter)
        cases = [c for c in cases if pattern.search(c.name)]
    return sorted(cases, key=lambda c: c.name)


def in_sample(name: str, modulus: int) -> bool:
    """Whether case ``name`` belongs to the deterministic 1-in-``modulus`` sample (by crc32)."""
    return zlib.crc32(name.encode()) % modulus == 0


def _flatten(values: list) -> list:
    """Sequence values spliced into the list, each after a marker array holding its length.

    ``Runner.assert_similar_outputs`` recurses into sequences passing single arrays where it
    expects lists (``len()`` of a 0-d array raises), so sequences are compared flat instead.
    """
    flat = []
    for value in values:
        if isinstance(value, (list, tuple)):
            flat.append(np.array([len(value)], dtype=np.int64))
            flat.extend(value)
        else:
            flat.append(value)
    return flat


def check_model(model: onnx.ModelProto, case: Case, what: str) -> str | None:
    """Run ``model`` on every data set of ``case``; None if it matches the expected outputs, else
    the reason (one line)."""
    try:
        session = make_session(model, what)
        for feed, expected in case.data_sets:
            outputs = run_model(session, feed, what)
            Runner.assert_similar_outputs(_flatten(expected), _flatten(outputs),
                                          rtol=case.rtol, atol=case.atol)
    except Exception as err:  # noqa: BLE001 -- onnxruntime and numpy raise many types
        return _one_line(err)
    return None


def _names(values) -> list[str]:
    return [v.name for v in values]


def _input_names(model: onnx.ModelProto) -> list[str]:
    """The graph inputs a caller can feed: before IR version 4 every initializer is listed as an
    input too, and onnxruntime does not let those be fed."""
    if model.ir_version >= 4:
        return _names(model.graph.input)
    weights = {init.name for init in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in weights]


def _first_change(before: onnx.ModelProto, after: onnx.ModelProto) -> str:
    """Where ``after`` first differs from ``before``, for a failure message."""
    for i, (a, b) in enumerate(zip(before.graph.node, after.graph.node)):
        if a != b:
            attrs = [x.name for x, y in zip(a.attribute, b.attribute) if x != y]
            return f"node {i} {a.op_type} '{a.name}', attribute(s) {attrs}"
    return "outside the main graph's nodes"


def _where(err: BaseException) -> str:
    """The innermost frame of ``err``'s traceback, as ``file.py:line``."""
    frames = traceback.extract_tb(err.__traceback__)
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def check_optimized(case: Case, passes: Sequence[str] | None = None) -> tuple[str, str]:
    """Optimize ``case.model`` with ``passes`` (default pipeline when None) and check the result:
    ``optimize`` leaves its argument alone, graph input and output names keep their order, and the
    outputs match. Every problem found is in the reason, separated by ``; ``.

    Returns:
        (status, reason): PASSED, FAILED or REJECTED, with a one-line reason unless PASSED.
    """
    given = onnx.ModelProto()
    given.CopyFrom(case.model)  # optimize gets a copy, so case.model is intact for the next run
    try:
        # The case's own inputs are the validation feeds, so that a pass whose result fails on
        # onnxruntime is rolled back as it would be for a user (sequence inputs: no validation).
        feeds = [feed for feed, _ in case.data_sets
                 if all(isinstance(v, np.ndarray) for v in feed.values())]
        optimized, _ = onnxopt.optimize(given, passes=passes, validate=bool(feeds),
                                          inputs=feeds or None, raise_on_failure=False)
    except InputError as err:
        return REJECTED, f"optimize rejected the model: {_one_line(err)}"
    except Exception as err:  # noqa: BLE001 -- any other exception is an onnxopt bug
        return FAILED, f"optimize raised {_one_line(err)}{_where(err)}"
    problems = []
    if given != case.model:
        problems.append(f"optimize modified the model it was given "
                        f"({_first_change(case.model, given)})")
    for what, before, after in (
            ("outputs", _names(case.model.graph.output), _names(optimized.graph.output)),
            ("inputs", _input_names(case.model), _input_names(optimized))):
        if before != after:
            problems.append(f"graph {what} changed from {before} to {after}")
    reason = check_model(optimized, case, "optimized model")
    if reason:
        problems.append(reason)
    return (FAILED, "; ".join(problems)) if problems else (PASSED, "")


def evaluate(case: Case) -> CaseResult:
    """Check ``case`` on onnxruntime as it is, then after the default pipeline."""
    start = time.perf_counter()
    reason = check_model(case.model, case, "original model")
    if reason:
        return CaseResult(case.name, ORT_FAILS, reason, time.perf_counter() - start)
    status, reason = check_optimized(case)
    return CaseResult(case.name, status, reason, time.perf_counter() - start)


def blame(case: Case) -> list[str]:
    """What breaks ``case``: ``"import/export"`` if the pipeline with no pass already fails it, and
    every pass of the default pipeline that, run alone, fails it for another reason. When no pass
    fails alone, the passes without which the pipeline passes, as ``"a+b (together)"``."""
    from onnxopt.passes import LOSSLESS_PIPELINE

    status, base_reason = check_optimized(case, passes=[])
    culprits = ["import/export"] if status == FAILED else []
    for name in LOSSLESS_PIPELINE:
        status, reason = check_optimized(case, passes=[name])
        if status == FAILED and reason != base_reason:
            culprits.append(name)
    if culprits:
        return culprits
    needed = [name for name in LOSSLESS_PIPELINE
              if check_optimized(case, [p for p in LOSSLESS_PIPELINE if p != name])[0] != FAILED]
    return [f"{'+'.join(needed) or 'no single pass'} (together)"]


# Worker processes are forked after the cases are loaded and find them here, by index.
_CASES: list[Case] = []
_BLAME = True


def _run_index(index: int) -> tuple[int, CaseResult]:
    result = evaluate(_CASES[index])
    if _BLAME and result.status == FAILED:
        result.blamed = blame(_CASES[index])
    return index, result


def run_suite(cases: list[Case], jobs: int = 1, blame_failures: bool = True,
              progress=None) -> list[CaseResult]:
    """:func:`evaluate` every case (in ``jobs`` forked worker processes when > 1) and, unless
    ``blame_failures`` is False, :func:`blame` every failure; results in the order of ``cases``.
    ``progress(done, total)`` is called as results come in."""
    global _CASES, _BLAME
    _CASES, _BLAME = cases, blame_failures
    results: list[CaseResult | None] = [None] * len(cases)
    if jobs <= 1:
        finished = map(_run_index, range(len(cases)))
        pool = None
    else:
        pool = multiprocessing.get_context("fork").Pool(jobs)
        finished = pool.imap_unordered(_run_index, range(len(cases)), chunksize=4)
    try:
        for done, (index, result) in enumerate(finished, 1):
            results[index] = result
            if progress:
                progress(done, len(cases))
    finally:
        if pool is not None:
            pool.terminate()
    return results


def summarize(results: list[CaseResult], seconds: float) -> str:
    """The report the CLI prints: counts, then every failure and rejection with its reason."""
    by = {s: [r for r in results if r.status == s] for s in (PASSED, FAILED, REJECTED, ORT_FAILS)}
    ort_ok = len(results) - len(by[ORT_FAILS])
    lines = [f"cases: {len(results)} in {seconds:.0f} s",
             f"onnxruntime passes as-is: {ort_ok} (fails {len(by[ORT_FAILS])}: skipped)",
             f"optimized passes: {len(by[PASSED])} of {ort_ok}",
             f"optimized fails: {len(by[FAILED])}",
             f"rejected by optimize (InputError): {len(by[REJECTED])}"]
    for title, status in (("FAILURES", FAILED), ("REJECTED", REJECTED)):
        if by[status]:
            lines.append(f"\n{title}")
        for r in by[status]:
            blamed = f" [{', '.join(r.blamed)}]" if r.blamed else ""
            lines.append(f"  {r.name}{blamed}: {r.reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--sample", type=int, metavar="K",
                        help="only the cases whose crc32(name) %% K == 0 (about 1 in K)")
    parser.add_argument("--filter", metavar="REGEX", help="only the cases whose name matches")
    parser.add_argument("--no-blame", action="store_true",
                        help="do not re-run failures pass by pass to find the responsible pass")
    parser.add_argument("--show-ort-failures", action="store_true",
                        help="also list the cases onnxruntime itself fails, with the reason")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cases = load_cases(args.filter)
    if args.sample:
        cases = [c for c in cases if in_sample(c.name, args.sample)]
    print(f"{len(cases)} cases, {args.jobs} job(s)", file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"  {done}/{total}", file=sys.stderr)

    results = run_suite(cases, jobs=args.jobs, blame_failures=not args.no_blame,
                        progress=progress)
    print(summarize(results, time.perf_counter() - start))
    if args.show_ort_failures:
        print("\nONNXRUNTIME FAILS (skipped)")
        for r in results:
            if r.status == ORT_FAILS:
                print(f"  {r.name}: {r.reason}")
    return 1 if any(r.status == FAILED for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
