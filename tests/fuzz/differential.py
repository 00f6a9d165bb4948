"""The differential property: ``onnxopt.optimize`` keeps what a model computes, or refuses it.

For a generated :class:`strategies.Case`, the original model runs on onnxruntime CPU (graph
optimizations off, as ``onnxopt.validate`` runs models) on every feed of
:func:`strategies.feeds`; a feed the original cannot run on (a symbolic dim at 0 that a Reshape's
-1 cannot absorb, say) is dropped, and a case whose original cannot be loaded or run at all says
nothing about onnxopt (``skipped``). The default pipeline then runs with validation off and on
(validation on synthesized inputs, as a user's first run does); each result must have the
original's output names in order, and on every feed the same dtypes, shapes and values: exact
for integers and booleans, within onnxopt's own lossless tolerance for floats
(``onnxopt.validate.lossless_tolerance``: ``atol + rtol * (max - min)`` of the reference, or a few
units in the last place of its dtype at its largest value; NaN and infinities in the same
places). A run may
instead refuse the model with an ``InputError`` (exit 2). Anything else fails: another
exception (a validation failure included), a result onnxruntime cannot load, or a changed input
model. A pass validation rolled back is noted (``Outcome.notes``), not failed: the result is
right, only an optimization was lost.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

import onnxopt
from onnxopt.errors import InputError
from onnxopt.metrics import output_metrics
from onnxopt.validate import DEFAULT_ATOL, DEFAULT_RTOL, lossless_tolerance

from strategies import Case, feeds

OK, SKIPPED, REFUSED, FAILED = "ok", "skipped", "refused", "failed"


@dataclass
class Outcome:
    """``status``: OK, SKIPPED (onnxruntime cannot run the original), REFUSED (InputError in
    every mode) or FAILED; ``reason``: one line, naming the mode (``validate=...``) and the
    output or exception; ``notes``: passes validation rolled back (the result still matched:
    a lost optimization, not a wrong model -- onnxruntime's float16 kernels round differently
    inside an If branch than outside, say)."""

    status: str
    reason: str = ""
    notes: list[str] = field(default_factory=list)


def session(data: bytes) -> ort.InferenceSession:
    """A one-thread onnxruntime CPU session with graph optimizations off (tiny models: threads
    cost more than they give, and CI has two cores)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def tolerance(reference: np.ndarray, candidate: np.ndarray) -> float:
    """onnxopt's own lossless tolerance for ``reference`` (``onnxopt.validate.lossless_tolerance``
    at the default ``atol``/``rtol``: 0 for integers and booleans, the larger of ``atol + rtol *
    range`` and a few units in the last place of the largest value for floats)."""
    return lossless_tolerance(reference.dtype, output_metrics(reference, candidate),
                              DEFAULT_ATOL, DEFAULT_RTOL)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]
            ) -> str | None:
    """Why ``candidate`` differs from ``reference`` (outputs in order), or None."""
    for name, r, c in zip(names, reference, candidate, strict=True):
        if r.dtype != c.dtype or r.shape != c.shape:
            return f"output '{name}': reference {r.dtype}{list(r.shape)}, candidate " \
                   f"{c.dtype}{list(c.shape)}"
        if r.dtype.kind != "f":
            if not np.array_equal(r, c):
                return f"output '{name}': values differ"
            continue
        rf, cf = r.astype(np.float64), c.astype(np.float64)
        if not np.array_equal(np.isnan(rf), np.isnan(cf)) or not np.array_equal(
                rf[np.isinf(rf)], cf[np.isinf(rf)]) or np.isinf(cf[~np.isinf(rf)]).any():
            return f"output '{name}': NaN or infinities in different places"
        finite = np.isfinite(rf)
        err = float(np.abs(rf[finite] - cf[finite]).max()) if finite.any() else 0.0
        tol = tolerance(r, c)
        if err > tol:
            return f"output '{name}': max abs error {err:.3g} > tolerance {tol:.3g}"
    return None


def check(case: Case, modes: tuple[bool, ...] = (False, True)) -> Outcome:
    """Run the property on ``case`` for each validation mode in ``modes``."""
    original = case.model.SerializeToString()
    try:
        ref = session(original)
        names = [o.name for o in ref.get_outputs()]
        runs = []
        for feed in feeds(case):
            try:
                runs.append((feed, ref.run(None, feed)))
            except Exception:  # noqa: BLE001 -- any onnxruntime failure drops the feed
                continue
    except Exception as err:  # noqa: BLE001 -- onnxruntime rejects the original
        return Outcome(SKIPPED, f"onnxruntime cannot load the original: {_first_line(err)}")
    if not runs:
        return Outcome(SKIPPED, "onnxruntime cannot run the original on any feed")
    refused, notes = [], []
    results: dict[bytes, str | None] = {}  # optimized bytes -> why they fail, or None
    for validate in modes:
        where = f"validate={validate}"
        try:
            with warnings.catch_warnings():  # the report's warnings: not what is checked here
                warnings.simplefilter("ignore")
                optimized, report = onnxopt.optimize(case.model, validate=validate)
        except InputError as err:
            refused.append(f"{where}: {_first_line(err)}")
            continue
        except Exception as err:  # noqa: BLE001 -- every other exception is a failure
            return Outcome(FAILED, f"{where}: {type(err).__name__}: {_first_line(err)}", notes)
        if case.model.SerializeToString() != original:
            return Outcome(FAILED, f"{where}: optimize changed the input model")
        notes += [f"{where}: pass '{back['pass']}' rolled back: {back['reason']}"
                  for back in report.rolled_back]
        data = optimized.SerializeToString()
        if data not in results:
            results[data] = _differs(data, names, runs)
        if results[data] is not None:
            return Outcome(FAILED, f"{where}: {results[data]}", notes)
    if refused and len(refused) == len(modes):
        return Outcome(REFUSED, "; ".join(refused), notes)
    return Outcome(OK, "; ".join(refused), notes)


def _differs(data: bytes, names: list[str], runs: list[tuple[dict, list]]) -> str | None:
    """Why the optimized model ``data`` does not compute what the original did on ``runs``
    (``(feed, reference outputs)``), or None."""
    try:
        sess = session(data)
    except Exception as err:  # noqa: BLE001
        return f"onnxruntime cannot load the result: {_first_line(err)}"
    got = [o.name for o in sess.get_outputs()]
    if got != names:
        return f"outputs {got} instead of {names}"
    for feed, reference in runs:
        try:
            candidate = sess.run(None, feed)
        except Exception as err:  # noqa: BLE001
            return f"onnxruntime cannot run the result on {_shapes(feed)}: {_first_line(err)}"
        why = compare(reference, candidate, names)
        if why is not None:
            return f"{why} on {_shapes(feed)}"
    return None


def _shapes(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def describe(model: onnx.ModelProto) -> str:
    """The model as ONNX text (``onnx.printer``), for failure messages."""
    return onnx.printer.to_text(model)
