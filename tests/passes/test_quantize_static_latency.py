"""Tests of quantize_static's latency-guided placement (``latency_guided``) and of the kernel
timing it reads (``onnxopt.kernel_timing``).

Which sites onnxruntime runs faster is a measurement on the machine, noisy under load: the
decisions are tested with timings injected in place of ``kernel_times``; what runs on onnxruntime
is tested for what does not depend on noise (the models timed compute the site, the placed model
computes the original within quantization error, the times are there and positive)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import kernel_timing
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager, verify_model
from onnxopt.passes.quantize_static import QuantizeStatic, float_faster, whole_model_choice

RNG = np.random.default_rng(0)


def _two_convs():
    """x -> Conv A (+bias) -> Relu -> Conv B (+bias) -> Relu -> y (B reads the Relu output r)."""
    nodes = [helper.make_node("Conv", ["x", "WA", "BA"], ["a"], pads=[1, 1, 1, 1], name="A"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "WB", "BB"], ["b"], name="B"),
             helper.make_node("Relu", ["b"], ["y"])]
    inits = {"WA": RNG.normal(size=(16, 8, 3, 3)).astype(np.float32),
             "BA": RNG.normal(size=16).astype(np.float32),
             "WB": RNG.normal(size=(8, 16, 1, 1)).astype(np.float32),
             "BB": RNG.normal(size=8).astype(np.float32)}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 12, 12])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _feeds(n=6):
    return [{"x": RNG.normal(size=(1, 8, 12, 12)).astype(np.float32)} for _ in range(n)]


def _quantize(model, feeds, **options):
    graph = import_graph(model)
    record = PassManager([]).run_pass(QuantizeStatic(latency_guided=True, **options), graph,
                                      PassContext(template=model, calibration=feeds))
    out = export_graph(graph.cleanup().toposort(), model)
    verify_model(out, "quantize_static")
    return out, record.stats


def _session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _injected(monkeypatch, alone, whole):
    """Replace ``kernel_times``: sites timed alone get ``alone[input][form]`` (input: the
    activation the site reads), candidate placements ``whole[name]``; returns the calls."""
    calls = []

    def fake(models, feeds, rounds, threads=0, skip=frozenset()):
        calls.append((sorted(map(str, models)), skip))
        return {k: (alone[k[0]][k[1]] if isinstance(k, tuple) else whole[k]) for k in models}

    monkeypatch.setattr(kernel_timing, "kernel_times", fake)
    return calls


def test_float_faster_keeps_ties_within_the_margin_integer():
    times = {"slower": (10.6, 10.0), "within": (10.4, 10.0), "faster": (8.0, 10.0),
             "equal": (10.0, 10.0)}
    assert float_faster(times, 0.05) == {"slower"}
    assert float_faster(times, 0.0) == {"slower", "within"}
    assert float_faster(times, 0.1) == set()


def test_a_site_slower_in_integer_form_stays_float_with_its_times(monkeypatch):
    model = _two_convs()
    calls = _injected(monkeypatch,
                      alone={"x": {"integer": 90.0, "float": 40.0},
                             "r": {"integer": 20.0, "float": 30.0}},
                      whole={"every site": 200.0, "measured": 150.0, "none": 170.0})
    out, stats = _quantize(model, _feeds())
    assert stats["nodes_quantized"] == 1
    assert stats["nodes_float"] == {"A": "float faster (40 us, integer 90 us)"}
    latency = stats["latency"]
    assert latency["float_faster"] == {"A": {"integer_us": 90.0, "float_us": 40.0}}
    assert latency["integer_kept"] == {"B": {"integer_us": 20.0, "float_us": 30.0}}
    assert latency["chosen"] == "measured" and latency["whole_model_us"]["none"] == 170.0
    # sites alone without layout conversions; whole models with everything they run
    assert calls[0][1] == frozenset({"ReorderInput", "ReorderOutput", "Transpose"})
    assert calls[1] == (["every site", "measured", "none"], frozenset())  # sorted
    # A keeps its float weight; B reads dequantized int8 codes
    readers = {n.name: n for n in out.graph.node}
    inits = {i.name for i in out.graph.initializer}
    assert readers["A"].input[1] == "WA" and "WA" in inits
    producers = {o: n for n in out.graph.node for o in n.output}
    assert producers[readers["B"].input[1]].op_type == "DequantizeLinear"


def test_the_whole_model_overrules_sites_faster_alone(monkeypatch):
    """Both sites are faster alone in integer form, but the whole model runs fastest in float
    (boundary Q/DQ and layout conversions): nothing is quantized, each site says why."""
    _injected(monkeypatch,
              alone={"x": {"integer": 30.0, "float": 40.0}, "r": {"integer": 20.0, "float": 30.0}},
              whole={"measured": 200.0, "none": 150.0})
    out, stats = _quantize(_two_convs(), _feeds())
    assert stats["nodes_quantized"] == 0 and stats["latency"]["chosen"] == "none"
    assert set(stats["nodes_float"]) == {"A", "B"}
    assert all(r.startswith("float faster in the whole model (150 us, 200 us")
               for r in stats["nodes_float"].values())
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in out.graph.node)


def test_whole_model_choice_keeps_the_measured_sites_unless_clearly_slower():
    times = {"measured": 104.0, "every site": 100.0, "none": 110.0}
    assert whole_model_choice(times, 0.05, "none") == "measured"
    assert whole_model_choice(times, 0.03, "none") == "every site"
    # within the margin of the float model, but slower: float
    assert whole_model_choice({"measured": 104.0, "none": 100.0}, 0.05, "none") == "none"
    assert whole_model_choice({"measured": 100.0, "none": 100.0}, 0.05, "none") == "measured"
    # step 1 kept no site: its placement is the float model
    assert whole_model_choice({"measured": 100.0, "every site": 99.0}, 0.05,
                              "measured") == "measured"


def test_the_whole_model_quantizes_every_site_when_clearly_faster(monkeypatch):
    _injected(monkeypatch,
              alone={"x": {"integer": 90.0, "float": 40.0}, "r": {"integer": 20.0, "float": 30.0}},
              whole={"measured": 120.0, "every site": 100.0, "none": 130.0})
    _, stats = _quantize(_two_convs(), _feeds(), latency_margin=0.05)
    assert stats["nodes_quantized"] == 2 and stats["latency"]["chosen"] == "every site"
    assert stats["nodes_float"] == {}


def test_placement_measured_on_onnxruntime_stays_accurate_and_reports_times():
    """The real measurement: whatever it decides on this machine, every site is quantized or
    float with a reason, the times are positive, and the model computes the original's output
    within quantization error (compared on onnxruntime)."""
    model, feeds = _two_convs(), _feeds()
    out, stats = _quantize(model, feeds, latency_rounds=3)
    latency = stats["latency"]
    measured = {**latency["float_faster"], **latency["integer_kept"]}
    assert set(measured) == {"A", "B"}
    assert all(t["integer_us"] > 0 and t["float_us"] > 0 for t in measured.values())
    assert latency["chosen"] in latency["whole_model_us"]
    assert stats["nodes_quantized"] + len(stats["nodes_float"]) == 2
    ref, quant = _session(model), _session(out)
    for feed in feeds[:3]:
        a, b = ref.run(None, feed)[0].ravel(), quant.run(None, feed)[0].ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.999


def test_the_timed_forms_compute_the_site(monkeypatch):
    """The integer and float models timed for a site compute its op: fed the same input, the
    integer form's output (dequantized) is the float form's within quantization error."""
    captured = {}

    def fake(models, feeds, rounds, threads=0, skip=frozenset()):
        captured.update({k: (models[k], feeds[k]) for k in models if isinstance(k, tuple)})
        return {k: 1.0 for k in models}

    monkeypatch.setattr(kernel_timing, "kernel_times", fake)
    _quantize(_two_convs(), _feeds())
    assert {k[1] for k in captured} == {"integer", "float"} and len(captured) == 4
    integer, _ = captured[("x", "integer")]
    flt, _ = captured[("x", "float")]
    x = _feeds(1)[0]["x"]
    a = _session(flt).run(None, {"x": x})[0]
    outputs = _session(integer).run(None, {"x": x})
    b = outputs[0]
    # A's output is quantized for its consumer (Relu -> B is chained): dequantize the codes
    q_out = [n for n in integer.graph.node if n.op_type == "QuantizeLinear"][-1]
    inits = {i.name: numpy_helper.to_array(i) for i in integer.graph.initializer}
    b = (b.astype(np.float32) - inits[q_out.input[2]].astype(np.float32)) * inits[q_out.input[1]]
    # Relu after A: only the non-negative part is on the quantized grid (range widened to 0)
    a = np.clip(a, float(np.min(b)), None)
    assert a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    # B's input is A's QLinearConv output, so B's integer form starts from its codes
    coded, _ = captured[("r", "integer")]
    assert coded.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8


def test_kernel_times_skips_the_op_types_asked():
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [64, 32])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [32, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    feed = {"x": RNG.normal(size=(64, 32)).astype(np.float32)}
    both = kernel_timing.kernel_times({"m": model}, {"m": feed}, 3)
    relu = kernel_timing.kernel_times({"m": model}, {"m": feed}, 3,
                                      skip=frozenset({"Transpose"}))
    none = kernel_timing.kernel_times({"m": model}, {"m": feed}, 3,
                                      skip=frozenset({"Transpose", "Relu"}))
    assert both["m"] > 0 and relu["m"] > 0 and none["m"] == 0.0


def test_latency_options_are_checked():
    for bad in ({"latency_margin": -0.1}, {"latency_margin": 1.0}, {"latency_rounds": 0}):
        with pytest.raises(UsageError):
            QuantizeStatic(**bad)


def test_the_int8_static_mode_does_not_measure_unless_a_config_file_turns_it_on(tmp_path):
    """Off in the mode: its placement depends on the machine's timings (two rec runs left
    different sites float), so the same command would not always write the same model."""
    from onnxopt.pipeline import build_pipeline, load_config

    def options(**kwargs):
        pipeline = build_pipeline(["default"], quantize="int8-static", **kwargs)
        return next(p for p in pipeline.passes if p.name == "quantize_static").options

    assert not options().latency_guided
    config = tmp_path / "run.toml"
    config.write_text('[pipeline]\nquantize = "int8-static"\n\n'
                      '[pipeline.options.quantize_static]\nlatency_guided = true\n'
                      'latency_margin = 0.2\n')
    settings = load_config(config)
    chosen = options(options=settings["options"])
    assert chosen.latency_guided and chosen.latency_margin == 0.2
