"""The latency of a result whose quantization aims at speed (``onnxopt.api.SPEED_PASSES``):
``report.latency`` measured against the original, and a warning when the result is more than
``SLOWER`` times as slow (a small model's QuantizeLinear/DequantizeLinear can cost more than
its integer kernels save). The timing itself is noisy: the warning's rule is tested with
``latency_ratio`` replaced, the measurement on a real run only for its form."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import onnx
from onnx import helper

import onnxopt.api
from helpers import make_model
from onnxopt import optimize
from onnxopt.errors import OnnxoptWarning

pytestmark = pytest.mark.latency_retry  # the retry on (tests/conftest.py), timings replaced


def _model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="out")]
    return make_model(nodes, [("x", np.float32, ["batch", 64])],
                      [("y", np.float32, ["batch", 32])],
                      {"W1": rng.normal(size=(64, 64)).astype(np.float32),
                       "W2": rng.normal(size=(64, 32)).astype(np.float32)})


FEEDS = [{"x": np.random.default_rng(k).normal(size=(8, 64)).astype(np.float32)}
         for k in range(4)]


def test_a_speed_mode_result_is_timed_against_the_original():
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9)
    latency = report.latency
    assert latency["latency_ratio"] > 0 and latency["latency_ms"]["before"] > 0
    assert latency["latency_ratio"] == pytest.approx(
        latency["latency_ms"]["after"] / latency["latency_ms"]["before"])
    assert "interleaved" in latency["latency_note"]
    assert report.to_dict()["latency"] == latency
    _, report = optimize(_model(), quantize="int8-weight", inputs=FEEDS, max_drift=0.9)
    assert report.latency is None and "latency" not in report.to_dict()  # a size mode


@pytest.mark.parametrize("ratio, warned", [(3.0, True), (1.1, False)])
def test_a_result_slower_than_the_original_is_a_warning(monkeypatch, ratio, warned):
    def measured(before, after, feed, what=()):  # latency_ratio_apart's stand-in
        return {"latency_ratio": ratio, "latency_ms": {"before": 0.2, "after": 0.2 * ratio},
                "latency_note": "stand-in"}

    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", measured)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OnnxoptWarning)
        _, report = optimize(_model(), quantize="int8-dynamic", inputs=FEEDS,
                             calibration=FEEDS, max_drift=0.9)
    slower = [w for w in report.warnings if "as slow" in w]
    assert bool(slower) == warned
    if warned:
        assert slower[0].startswith("quantize_dynamic made the model 3.00x as slow")
        assert "--quantize-exclude" in slower[0] and "int8-weight mode" in slower[0]
        assert any("as slow" in str(w.message) for w in caught
                   if issubclass(w.category, OnnxoptWarning))


def test_a_model_that_crashes_onnxruntime_when_timed_leaves_the_run_alone(tmp_path):
    """Breaker's case: a float16 Transpose of the leading axis read by a MatMul with a constant
    runs unoptimized (validation) but segfaults onnxruntime 1.32's default session, which
    timing uses: the timing runs in a child process, so the run ends as validated, with a
    warning. (Where onnxruntime does not crash on this CPU, the result is simply timed.)"""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Cast", ["t"], ["t32"], to=1),
             helper.make_node("MatMul", ["t32", "W"], ["y"])]
    model = make_model(nodes, [("x", np.float16, [4, 3, 64])], [("y", np.float32, [3, 4, 32])],
                       {"W": np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)})
    feeds = [{"x": np.random.default_rng(k).normal(size=(4, 3, 64)).astype(np.float16)}
             for k in range(3)]
    _, report = optimize(model, quantize="int8-dynamic", inputs=feeds, calibration=feeds,
                         max_drift=0.9)
    assert report.validation.passed
    crashed = [w for w in report.warnings if "not timed" in w]
    assert (report.latency is None) == bool(crashed)
    if crashed:
        assert "onnxruntime crashed timing it in its default session (SIGSEGV)" in crashed[0]


def test_the_timing_child_reports_a_failure_instead_of_raising():
    from onnxopt.validate import latency_ratio_apart

    good = _model().SerializeToString()
    assert latency_ratio_apart(good, b"not a model", FEEDS[0]).startswith("timing failed: ")
    assert latency_ratio_apart(good, good, FEEDS[0])["latency_ratio"] > 0


def _stand_in(ratios: dict[str, float], seen: list):
    """latency_ratio_apart's stand-in: the ratio for the pair's second model (``what[1]``),
    each call recorded in ``seen``."""
    def measured(before, after, feed, what=()):
        seen.append(what[1])
        ratio = ratios[what[1]]
        return {"latency_ratio": ratio, "latency_ms": {"before": 1.0, "after": ratio},
                "latency_note": "stand-in"}

    return measured


def _static_record(report):
    return next(r for r in report.passes if r.name == "quantize_static")


def _placed(float_sites: int | None):
    """quantize_static's latency placement stand-in: the first ``float_sites`` sites float
    (None: every one)."""
    def place(self, graph, template, sites, feed, stats, dtype, unranged, refused):
        left = len(sites) if float_sites is None else float_sites
        refused["kept float: faster than integer"] += left
        self._latency = {"stand-in": True}
        return sites[left:]

    return place


@pytest.mark.parametrize("versus, kept", [(0.5, True), (0.97, False), (1.5, False)])
def test_a_static_result_slower_than_the_original_is_decided_again_by_latency(
        monkeypatch, versus, kept):
    """int8-static's result timed more than RETRY_SLOWER times as slow as its float result is
    quantized once more with latency_guided (each site timed in integer and float form), and
    the latency-guided result is kept when it is faster by KEEP_FASTER (a tie keeps the
    first, the smaller): dtln_model_2 ran 2.8-3.9x as slow as the original."""
    from onnxopt.passes.quantize_static import QuantizeStatic

    monkeypatch.setattr(QuantizeStatic, "_place_by_latency", _placed(1))
    seen: list[str] = []
    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", _stand_in(
        {"optimized model": 1.0, "the quantized result": 3.0,
         "the latency-guided result": versus}, seen))
    first, first_report = optimize(_model(), quantize="int8-static", inputs=FEEDS,
                                   calibration=FEEDS, max_drift=0.9,
                                   options={"quantize_static": {"latency_guided": False}})
    assert first_report.latency["latency_ratio"] == 1.0 and seen == ["optimized model"]
    seen.clear()
    result, report = optimize(_model(), quantize="int8-static", inputs=FEEDS,
                              calibration=FEEDS, max_drift=0.9)
    retried = [w for w in report.warnings if "decided again with latency_guided" in w]
    assert retried and retried[0].startswith(
        "quantize_static's result took 3.00x the time of the float model (the lossless passes "
        "alone) on this machine: decided again with latency_guided")
    assert report.validation.passed
    if kept:  # timed against the first result, then against the original for the report
        assert seen == ["optimized model", "the quantized result",
                        "the latency-guided result", "optimized model"]
        assert retried[0].endswith("1 left float): it took 0.50x the first result's time, "
                                   "written instead")
        assert report.latency["retry"] == {"versus_float": 3.0, "sites_float": 1,
                                           "quantized": True, "versus_first": 0.5,
                                           "kept": True}
        assert _static_record(report).stats["latency"] == {"stand-in": True}
    else:
        assert seen == ["optimized model", "the quantized result",
                        "the latency-guided result"]
        assert retried[0].endswith(f"it took {versus:.2f}x the first result's time, the "
                                   "first result kept")
        assert report.latency["retry"]["kept"] is False
        assert _static_record(report).stats["latency"] == "off"
        assert result.SerializeToString() == first.SerializeToString()



@pytest.mark.parametrize("ratio, options, timings", [
    (1.05, None, ["optimized model", "the quantized result"]),  # within the timing's noise
    # the user's choice stands
    (3.0, {"quantize_static": {"latency_guided": False}}, ["optimized model"]),
])
def test_no_latency_retry_within_noise_or_against_the_users_choice(monkeypatch, ratio, options,
                                                                   timings):
    seen: list[str] = []
    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", _stand_in(
        {"optimized model": ratio, "the quantized result": ratio}, seen))
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9, options=options)
    assert seen == timings
    assert not [w for w in report.warnings if "decided again with latency_guided" in w]
    assert report.latency["latency_ratio"] == ratio and "retry" not in report.latency
    if options:  # slower, but no advice to set what the user set
        slower = [w for w in report.warnings if "made the model 3.00x as slow" in w]
        assert slower and "latency_guided" not in slower[0]


def test_a_result_slower_after_the_retry_names_no_lever_already_tried(monkeypatch):
    from onnxopt.passes.quantize_static import QuantizeStatic

    monkeypatch.setattr(QuantizeStatic, "_place_by_latency", _placed(1))
    seen: list[str] = []
    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", _stand_in(
        {"optimized model": 3.0, "the quantized result": 3.0,
         "the latency-guided result": 1.5}, seen))
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9)
    slower = [w for w in report.warnings if "made the model 3.00x as slow" in w]
    assert slower and "latency_guided = true" not in slower[0]  # tried already


def test_a_latency_guided_decision_that_changes_nothing_is_not_timed_again(monkeypatch):
    from onnxopt.passes.quantize_static import QuantizeStatic

    monkeypatch.setattr(QuantizeStatic, "_place_by_latency",  # every site integer
                        lambda self, graph, template, sites, *a: sites)
    seen: list[str] = []
    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", _stand_in(
        {"optimized model": 3.0, "the quantized result": 3.0}, seen))
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9)
    assert seen == ["optimized model", "the quantized result"]
    retried = [w for w in report.warnings if "decided again with latency_guided" in w]
    assert retried and retried[0].endswith("the same decision, the first result kept")
    assert report.latency["retry"]["versus_first"] is None


def _forced(monkeypatch, guided=0.5, quantized=3.0, seen=None):
    """Timings that make int8-static's result 3x its float result's time."""
    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", _stand_in(
        {"optimized model": 1.0, "the quantized result": quantized,
         "the latency-guided result": guided}, [] if seen is None else seen))


def _ops(model) -> set[str]:
    return {n.op_type for n in model.graph.node}


def test_a_decision_leaving_every_site_float_drops_smooth_quant_too(monkeypatch):
    """Breaker's case (the angle classifier): with every site float, smooth_quant's factors
    would only add a Mul and drift; the result is the float model, validated exactly."""
    from onnxopt.passes.quantize_static import QuantizeStatic

    monkeypatch.setattr(QuantizeStatic, "_place_by_latency", _placed(None))
    seen: list[str] = []
    _forced(monkeypatch, quantized=4.0, seen=seen)
    result, report = optimize(_model(), quantize="int8-static", inputs=FEEDS,
                              calibration=FEEDS, max_drift=0.9)
    retried = [w for w in report.warnings if "decided again with latency_guided" in w]
    # the float model is what the first result was timed against: not timed again (breaker)
    assert seen == ["optimized model", "the quantized result", "optimized model"]
    assert ("2 left float; none quantized, so smooth_quant left out too): it took 0.25x the "
            "first result's time, written instead. The written model computes in FLOAT: no "
            "quantized site") in retried[0]
    assert "latency_guided = false" in retried[0]
    assert _ops(result) == {"MatMul", "Relu"}  # no QuantizeLinear, no smoothing Mul
    assert report.validation.passed and report.validation.mode == "lossless"
    assert report.latency["latency_ratio"] == 1.0  # timed again, against the original


def test_the_retry_leaves_out_what_was_rolled_back(monkeypatch):
    """Breaker's case: a lossless pass rolled back for the first result must not come back in
    the float result the decision is timed against, nor in the latency-guided run."""
    from onnxopt.pass_manager import REGISTRY, PassResult
    from onnxopt.passes.quantize_static import QuantizeStatic

    class DropRelu(onnxopt.api.Pass):  # a broken lossless pass
        name, description = "test_drop_relu", "Relu -> Identity (wrong)"

        def run(self, graph, ctx):
            relus = [n for n in graph.nodes if n.op == "Relu"]
            for n in relus:
                n.op = "Identity"
            return PassResult(bool(relus))

    monkeypatch.setitem(REGISTRY, DropRelu.name, DropRelu)
    monkeypatch.setattr(QuantizeStatic, "_place_by_latency", _placed(None))
    _forced(monkeypatch)
    result, report = optimize(_model(), passes=["default", DropRelu.name],
                              quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                              max_drift=0.9)
    assert [r["pass"] for r in report.rolled_back] == [DropRelu.name]
    retried = [w for w in report.warnings if "decided again with latency_guided" in w]
    assert retried[0].endswith("written instead. The written model computes in FLOAT: no "
                               "quantized site ran faster than float on this machine. For an "
                               "int8 file anyway set quantize_static's option latency_guided "
                               "= false; the int8-weight mode shrinks the file without "
                               "changing kernels")
    assert "Relu" in _ops(result) and report.validation.passed
    assert DropRelu.name not in {r.name for r in report.passes}


def test_a_configured_quantize_static_pass_is_the_users_choice(monkeypatch):
    from onnxopt.pass_manager import get_pass

    seen: list[str] = []
    _forced(monkeypatch, seen=seen)
    _, report = optimize(_model(), passes=["default", get_pass("quantize_static")],
                         inputs=FEEDS, calibration=FEEDS, max_drift=0.9)
    assert seen == ["optimized model"]


def test_a_retry_that_raises_leaves_the_first_result(monkeypatch, tmp_path):
    from onnxopt.errors import InputError
    from onnxopt.passes.quantize_static import QuantizeStatic

    def fails(self, *args):
        raise InputError("onnxruntime cannot run a timing model\nsecond line")

    monkeypatch.setattr(QuantizeStatic, "_place_by_latency", fails)
    _forced(monkeypatch)
    out = tmp_path / "out.onnx"
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9, output=str(out))
    assert out.exists() and report.validation.passed and "QuantizeLinear" in _ops(
        onnx.load(str(out)))
    assert ("quantize_static's latency-guided decision failed (InputError: onnxruntime cannot "
            "run a timing model): the first result kept") in report.warnings


@pytest.mark.parametrize("timing, note", [
    ("onnxruntime crashed timing it (SIGSEGV)",
     "quantize_static's result was not timed against the lossless passes' float result: "
     "onnxruntime crashed timing it (SIGSEGV)"),
    (None, "quantize_static's result was not timed against the lossless passes' float "
           "result: no time"),
])
def test_a_float_comparison_that_fails_is_said(monkeypatch, timing, note):
    def measured(before, after, feed, what=()):
        if what[1] == "the quantized result":
            return timing if timing is not None else {
                "latency_ratio": None, "latency_ms": {"before": 0.0, "after": 1.0},
                "latency_note": "stand-in"}
        return {"latency_ratio": 1.0, "latency_ms": {"before": 1.0, "after": 1.0},
                "latency_note": "stand-in"}

    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", measured)
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9)
    assert note in report.warnings


def test_a_guided_result_without_a_time_keeps_the_first(monkeypatch):
    from onnxopt.passes.quantize_static import QuantizeStatic

    monkeypatch.setattr(QuantizeStatic, "_place_by_latency", _placed(1))

    def measured(before, after, feed, what=()):
        ratio = {"the quantized result": 3.0, "the latency-guided result": None}.get(what[1], 1.0)
        return {"latency_ratio": ratio, "latency_ms": {"before": 0.0, "after": 1.0},
                "latency_note": "stand-in"}

    monkeypatch.setattr(onnxopt.api, "latency_ratio_apart", measured)
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9)
    retried = [w for w in report.warnings if "decided again with latency_guided" in w]
    assert retried[0].endswith("1 left float): it was not timed, the first result kept")


def test_an_all_float_decision_says_the_embedding_tables_stay_int8(monkeypatch):
    """Breaker's case: quantize_embeddings stays in the pipeline (a weight-only, gathered
    dequantization); the warning must not call the model float without saying so."""
    from onnxopt.passes.quantize_static import QuantizeStatic

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W1"], ["h"], name="proj"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="out")]
    model = make_model(nodes, [("ids", np.int64, ["batch", 8])],
                       [("y", np.float32, ["batch", 8, 32])],
                       {"E": rng.normal(size=(300, 64)).astype(np.float32),
                        "W1": rng.normal(size=(64, 64)).astype(np.float32),
                        "W2": rng.normal(size=(64, 32)).astype(np.float32)})
    feeds = [{"ids": np.random.default_rng(k).integers(0, 300, (4, 8))} for k in range(4)]
    monkeypatch.setattr(QuantizeStatic, "_place_by_latency", _placed(None))
    _forced(monkeypatch)
    _, report = optimize(model, quantize="int8-static", inputs=feeds, calibration=feeds,
                         max_drift=0.9)
    retried = [w for w in report.warnings if "decided again with latency_guided" in w]
    assert any(r.modified and r.name == "quantize_embeddings" for r in report.passes)
    assert ("The written model computes in FLOAT (its embedding tables stay int8)"
            in retried[0])


def test_a_config_files_latency_guided_stays_with_options_given_in_python(monkeypatch,
                                                                        tmp_path):
    """Breaker's case: options= replaced the config's pass options wholesale, so the config's
    latency_guided = false was lost (and the retry ran); they merge option by option."""
    config = tmp_path / "c.toml"
    config.write_text("[pipeline.options.quantize_static]\nlatency_guided = false\n"
                      "percentile = 99.9\n")
    seen: list[str] = []
    _forced(monkeypatch, seen=seen)
    _, report = optimize(_model(), quantize="int8-static", inputs=FEEDS, calibration=FEEDS,
                         max_drift=0.9, config=str(config),
                         options={"quantize_static": {"percentile": 99.0},
                                  "smooth_quant": {"alpha": 0.5}})
    assert seen == ["optimized model"]  # the config's latency_guided: final
