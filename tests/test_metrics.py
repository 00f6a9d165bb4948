"""Tests of optimizer/metrics.py: every metric's definition (against numpy written from the
docstring), the judgement of outputs that cannot be compared, the criteria forms
(number, string, mapping, callable), and their use by lossy validation, the API, the config
file and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from onnx import helper

from helpers import make_model, random_feed
from onnxopt import optimize
from onnxopt.cli import main
from onnxopt.errors import UsageError
from onnxopt.metrics import (METRICS, Criterion, as_setting, describe, get_metric,
                             parse_criteria)
from onnxopt.validate import compare_models

RNG = np.random.default_rng(0)
REF = RNG.normal(size=(4, 3, 10)).astype(np.float32)
CAND = (REF + 0.05 * RNG.normal(size=REF.shape)).astype(np.float32)


def test_each_metric_follows_its_definition():
    r, c = REF.astype(np.float64).ravel(), CAND.astype(np.float64).ravel()
    assert get_metric("cosine").score(REF, CAND) == pytest.approx(
        r @ c / np.linalg.norm(r) / np.linalg.norm(c))
    assert get_metric("snr").score(REF, CAND) == pytest.approx(
        10 * np.log10((r ** 2).sum() / ((c - r) ** 2).sum()))
    assert get_metric("max-abs").score(REF, CAND) == pytest.approx(np.abs(c - r).max())
    assert get_metric("rel-l2").score(REF, CAND) == pytest.approx(
        np.linalg.norm(c - r) / np.linalg.norm(r))
    assert get_metric("argmax").score(REF, CAND) == pytest.approx(
        np.mean(REF.argmax(-1) == CAND.argmax(-1)))
    top = lambda a, k: [set(np.argsort(-row, kind="stable")[:k]) for row in a.reshape(-1, 10)]
    expected = np.mean([len(x & y) / 5 for x, y in zip(top(REF, 5), top(CAND, 5))])
    assert get_metric("top-k").score(REF, CAND) == pytest.approx(expected)
    assert get_metric("top-2").score(REF, CAND) == pytest.approx(
        np.mean([len(x & y) / 2 for x, y in zip(top(REF, 2), top(CAND, 2))]))
    for m in METRICS.values():  # identical outputs score the best value
        assert m.score(REF, REF.copy()) == (m.best if m.name != "snr" else math.inf)


def test_agreement_of_a_swapped_top_class():
    ref = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]], np.float32)
    cand = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], np.float32)
    assert get_metric("argmax").score(ref, cand) == 0.5
    assert get_metric("top-2").score(ref, cand) == 1.0  # the same two classes, in other order
    third = np.array([[0.7, 0.1, 0.2], [0.5, 0.3, 0.2]], np.float32)
    assert get_metric("top-2").score(ref, third) == 0.75  # {1, 2} vs {0, 2}: one of two
    assert get_metric("top-1").score(ref, cand) == get_metric("argmax").score(ref, cand)
    assert get_metric("argmax").score(np.float32(3), np.float32(4)) == 1.0  # one position


@pytest.mark.parametrize("name", [*METRICS, "top-3"])
def test_every_metric_fails_outputs_that_cannot_be_compared(name):
    m = get_metric(name)
    ragged = [np.ones(2, np.float32), np.ones(3, np.float32)]
    cases = [(np.ones(3, np.float32), np.ones(4, np.float32)),
             (np.ones(3, np.float32), np.ones(3, np.float64)),
             (np.array([1.0, 2.0]), np.array([1.0, np.inf])),
             (np.array([1.0, np.nan]), np.array([1.0, 2.0])),
             (np.array(["a", "b"]), np.array(["a", "c"])),
             (ragged, ragged[::-1])]
    for ref, cand in cases:
        value = m.score(ref, cand)
        assert value == m.failure and not m.meets(value, 0.0 if m.higher_is_better else 1e30)
    assert m.meets(m.score(ragged, [v.copy() for v in ragged]), 0.5 if m.name != "max-abs"
                   else 0.0)


def test_criteria_forms():
    cos = get_metric("cosine")
    assert parse_criteria(0.99) == [Criterion(cos, 0.99)]
    assert parse_criteria("0.99") == [Criterion(cos, 0.99)]
    assert parse_criteria(20, metric="snr") == [Criterion(get_metric("snr"), 20.0)]
    both = parse_criteria("cosine=0.999, max_abs=0.05")
    assert [(c.name, c.threshold) for c in both] == [("cosine", 0.999), ("max-abs", 0.05)]
    assert parse_criteria({"cosine": 0.999, "max-abs": 0.05}) == both
    assert describe(both) == "cosine >= 0.999, max-abs <= 0.05"
    assert as_setting(both) == {"cosine": 0.999, "max-abs": 0.05}
    assert as_setting(parse_criteria(0.9)) == 0.9

    def mean_abs_agreement(r, c):
        return 1.0 - float(np.abs(r - c).mean())

    (mine,) = parse_criteria({mean_abs_agreement: 0.9})
    assert mine.name == "mean_abs_agreement" and mine.metric.target(0.9, 0.1) == 0.9


@pytest.mark.parametrize("spec,message", [
    ("cosine=0.99,l2=1", "unknown drift metric 'l2'"),
    ("cosine=0.99,cosine=0.9", "cosine given twice"),
    ("cosine=1.5", r"must be in \[-1, 1\]"),
    ("max-abs=-1", "must be >= 0"),
    ("argmax=2", r"must be in \[0, 1\]"),
    ("cosine=high", "expected a number or METRIC=VALUE"),
    (float("nan"), "cosine similarity"),
    (True, "must be a number, a string or a table"),
    ({}, "must be a number, a string or a table"),
])
def test_bad_criteria_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_criteria(spec)


def _model():
    """y = x @ W: a quantized W shifts outputs by about 1e-2, well within cosine 0.99."""
    w = RNG.normal(size=(16, 8)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                      [("x", np.float32, [4, 16])], [("y", np.float32, [4, 8])], {"W": w}), w


def _shifted(w, delta):
    model, _ = _model()
    model.graph.initializer[0].CopyFrom(
        __import__("onnx").numpy_helper.from_array((w + delta).astype(np.float32), "W"))
    return model


def test_lossy_validation_checks_every_criterion_and_shows_every_metric():
    model, w = _model()
    candidate = _shifted(w, 0.05 * np.sign(w))
    model.graph.initializer[0].CopyFrom(__import__("onnx").numpy_helper.from_array(w, "W"))
    feed = random_feed(model)
    loose = compare_models(model, candidate, [feed], lossy=True, max_drift=0.9)
    assert loose.passed and loose.max_drift == 0.9
    (out,) = loose.outputs
    assert out.argmax is not None and out.top_k is not None and out.rel_l2 > 0
    strict = compare_models(model, candidate, [feed], lossy=True,
                            max_drift="cosine=0.9,max-abs=1e-3,top-3=0.5")
    assert not strict.passed and "max abs error" in strict.reason and "> max drift 0.001" \
        in strict.reason
    assert strict.max_drift == {"cosine": 0.9, "max-abs": 1e-3, "top-3": 0.5}
    assert set(strict.outputs[0].extra) == {"top-3"}
    assert strict.to_dict()["outputs"][0]["extra"]["top-3"] <= 1.0
    lossless = compare_models(model, model, [feed])
    assert lossless.outputs[0].argmax is None


def test_the_api_takes_a_callable_metric_and_the_budget_uses_it():
    model, w = _model()
    calls = []

    def never(r, c):
        calls.append(r.shape)
        return -1.0

    _, report = optimize(model, passes=[], quantize="int8-weight", inputs=random_feed(model),
                         max_drift={never: 0.0}, raise_on_failure=False)
    stats = next(r for r in report.passes if r.name == "quantize_weights").stats
    assert stats["drift_budget"]["kept"] == ["W"] and calls  # nothing can meet it
    # W stayed float: nothing lossy happened, so the result is validated losslessly
    assert report.validation.passed and report.validation.mode == "lossless"
    assert report.validation.max_drift == {"never": 0.0}


def test_config_max_drift_as_a_table(tmp_path):
    model, _ = _model()
    config = tmp_path / "run.toml"
    config.write_text('[validation.max_drift]\ncosine = 0.999\nmax-abs = 0.5\n')
    _, report = optimize(model, config=config, quantize="int8-weight",
                         inputs=random_feed(model))
    assert report.validation.max_drift == {"cosine": 0.999, "max-abs": 0.5}
    config.write_text('[validation]\nmax_drift = "cosine=0.999,snr=30"\n')
    _, report = optimize(model, config=config, quantize="int8-weight",
                         inputs=random_feed(model))
    assert report.validation.max_drift == {"cosine": 0.999, "snr": 30.0}
    budget = next(r for r in report.passes if r.name == "quantize_weights").stats["drift_budget"]
    assert set(budget["target"]) == {"cosine", "snr"} and "snr_final" in budget


def test_cli_max_drift_with_several_metrics(tmp_path, capsys):
    model, _ = _model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "feed.npz", **random_feed(model))
    code = main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--quantize",
                 "int8-weight", "--inputs", str(tmp_path / "feed.npz"),
                 "--max-drift", "cosine=0.999,max-abs=0.5,argmax=0.5",
                 "--report", str(tmp_path / "r.json")])
    shown = capsys.readouterr().out
    assert code == 0
    for column in ("cosine", "SNR dB", "rel L2", "argmax", "top-5", "max abs"):
        assert column in shown
    assert "validation passed (cosine >= 0.999, max-abs <= 0.5, argmax >= 0.5)" in shown
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["validation"]["max_drift"] == {"cosine": 0.999, "max-abs": 0.5, "argmax": 0.5}
    code = main(["optimize", str(path), "-o", str(tmp_path / "o2.onnx"), "--quantize",
                 "int8-weight", "--inputs", str(tmp_path / "feed.npz"), "--quiet",
                 "--max-drift", "max-abs=1e-9"])
    assert code == 0  # the budget keeps W float: nothing to fail
    assert main(["optimize", str(path), "-o", str(tmp_path / "o3.onnx"), "--max-drift",
                 "cosine=2"]) == 2


def test_agreement_is_pooled_over_feeds_and_the_other_metrics_take_the_worst_feed():
    """y = x (reference) against y = x * [0.5, 1]: of four one-row feeds, one flips its argmax."""
    reference = make_model([helper.make_node("Identity", ["x"], ["y"])],
                           [("x", np.float32, [1, 2])], [("y", np.float32, [1, 2])])
    candidate = make_model([helper.make_node("Mul", ["x", "s"], ["y"])],
                           [("x", np.float32, [1, 2])], [("y", np.float32, [1, 2])],
                           {"s": np.array([0.5, 1], np.float32)})
    feeds = [{"x": np.array([[1, v]], np.float32)} for v in (0.8, 0.1, 0.2, 0.3)]
    passed = compare_models(reference, candidate, feeds, lossy=True, max_drift="argmax=0.75")
    assert passed.passed and passed.outputs[0].argmax == 0.75
    failed = compare_models(reference, candidate, feeds, lossy=True, max_drift="argmax=0.8")
    assert not failed.passed and "argmax agreement 0.75 < max drift 0.8" in failed.reason
    cosines = [get_metric("cosine").score(f["x"], f["x"] * np.float32([0.5, 1])) for f in feeds]
    assert passed.outputs[0].cosine == pytest.approx(min(cosines))


def test_cosine_of_a_one_value_output_is_pooled_over_the_feeds():
    """Per feed, the cosine of one value is 1 whenever the signs agree; over the feeds' values a
    candidate that ignores its input is far from the reference."""
    from onnx import TensorProto, helper

    from onnxopt.metrics import METRICS, Tally
    from onnxopt.validate import compare_models

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    ref = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"])], "r", [x], [y], [axes]),
        opset_imports=[helper.make_opsetid("", 13)])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    cand = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["one"], ["y"])], "c", [x], [y], [one]),
        opset_imports=[helper.make_opsetid("", 13)])
    feeds = [{"x": np.full(4, v, np.float32)} for v in (0.025, 1.25, 2.5)]
    result = compare_models(ref, cand, feeds, lossy=True, max_drift=0.99)
    rs, cs = np.array([0.1, 5.0, 10.0]), np.ones(3)
    expected = rs @ cs / np.linalg.norm(rs) / np.linalg.norm(cs)
    assert result.outputs[0].cosine == pytest.approx(expected, rel=1e-5)
    assert not result.passed
    tally = Tally(METRICS["cosine"])
    for r in rs:
        tally.add(1.0, np.array([r]), np.array([1.0]))
    assert tally.value == pytest.approx(expected, rel=1e-6)


def test_cosine_alone_equals_the_full_statistics():
    """``cosine_similarity`` and ``mismatch`` give exactly what ``output_metrics`` gives (the
    drift budget's decisions must not move): NaN, infinities, zeros, three float dtypes."""
    from onnxopt.metrics import cosine_similarity, mismatch, output_metrics

    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(0, 40))
        r = rng.normal(size=n) * 10.0 ** rng.integers(-3, 4)
        c = r + rng.normal(size=n) * 10.0 ** rng.integers(-6, 2)
        for a in (r, c):
            if n and rng.random() < 0.3:
                a[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf, 0.0])
        if rng.random() < 0.1:
            c = np.zeros(n)
        dtype = (np.float16, np.float32, np.float64)[int(rng.integers(0, 3))]
        r, c = r.astype(dtype), c.astype(dtype)
        with np.errstate(all="ignore"):
            full = output_metrics(r, c)
        alone = cosine_similarity(r, c)
        assert alone == full["cosine"] or (np.isnan(alone) and np.isnan(full["cosine"]))
        assert (mismatch(r, c) is not None) == full["nan_mismatch"]
