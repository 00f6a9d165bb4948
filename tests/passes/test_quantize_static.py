"""Tests of passes/quantize_static.py: static QDQ quantization with calibrated activations,
compared with onnxruntime on the original model, and checked for onnxruntime's fused integer
kernels in its optimized graph (``SessionOptions.optimized_model_filepath``)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import session
from onnxopt.graph import export_graph, import_graph
from onnxopt.pass_manager import PassContext, PassManager, verify_model
from onnxopt.passes.quantize_static import QuantizeStatic

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo"
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k)
                               for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return onnx.shape_inference.infer_shapes(model)


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _session(model, optimize=True, path=None):
    return session(model, optimize, path)


def _quantize(model, feeds, **options):
    graph = import_graph(model)
    record = PassManager([]).run_pass(QuantizeStatic(**options), graph,
                                      PassContext(template=model, calibration=feeds))
    out = export_graph(graph.cleanup().toposort(), model)
    verify_model(out, "quantize_static")
    return out, record.stats


def _fused_ops(model, tmp_path):
    path = tmp_path / "optimized.onnx"
    _session(model, path=path)
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _feeds(shape, n=8, name="x"):
    return [{name: RNG.normal(size=shape).astype(np.float32)} for _ in range(n)]


def _conv_pool_matmul():
    """Conv(+bias) -> Relu -> MaxPool -> Transpose -> Reshape -> MatMul."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "W2"], ["y"])]
    inits = {"W": RNG.normal(size=(16, 3, 3, 3)).astype(np.float32),
             "B": RNG.normal(size=16).astype(np.float32),
             "W2": RNG.normal(size=(16 * 4 * 4, 10)).astype(np.float32) / 16,
             "shape": np.array([1, -1], np.int64)}
    return _model(nodes, [_f("x", [1, 3, 8, 8])], [_f("y", [1, 10])], inits)


def test_conv_matmul_fuse_into_integer_kernels_and_stay_accurate(tmp_path):
    model = _conv_pool_matmul()
    feeds = _feeds((1, 3, 8, 8), 16)
    out, stats = _quantize(model, feeds, calibration="minmax")
    assert stats["nodes_quantized"] == 2 and stats["bias_quantized"] == 1
    fused = _fused_ops(out, tmp_path)
    assert fused["QLinearConv"] == 1 and fused["MatMulIntegerToFloat"] == 1
    assert fused["Conv"] == fused["MatMul"] == fused["DequantizeLinear"] == 0
    ref, quant, qdq = _session(model), _session(out), _session(out, optimize=False)
    for feed in feeds[:4]:
        a, b, c = ref.run(None, feed)[0], quant.run(None, feed)[0], qdq.run(None, feed)[0]
        assert _cosine(a, b) > 0.999
        # the fused kernels compute what the QDQ graph says (no int16 saturation: reduce_range)
        assert np.abs(b - c).max() <= 1e-4 * np.abs(c).max()


def test_qdq_is_propagated_through_reshape_transpose_maxpool():
    out, _ = _quantize(_conv_pool_matmul(), _feeds((1, 3, 8, 8)), calibration="minmax")
    producers = {o: n for n in out.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    scales = {}
    for n in out.graph.node:
        if n.op_type in ("MaxPool", "Transpose", "Reshape", "Relu", "MatMul"):
            dq = producers[n.input[0]]
            assert dq.op_type == "DequantizeLinear", n.op_type
            scales[n.op_type] = (float(inits[dq.input[1]]), int(inits[dq.input[2]]))
    # one scale and zero point along the scale-preserving path
    assert len({scales[k] for k in ("MaxPool", "Transpose", "Reshape", "MatMul")}) == 1


def test_gemm_bias_is_int32_with_input_times_weight_scale():
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1)]
    W = RNG.normal(size=(6, 32)).astype(np.float32)
    model = _model(nodes, [_f("x", [4, 32])], [_f("y", [4, 6])],
                   {"W": W, "B": RNG.normal(size=6).astype(np.float32)})
    feeds = _feeds((4, 32))
    out, stats = _quantize(model, feeds)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    by_out = {o: n for n in out.graph.node for o in n.output}
    gemm = next(n for n in out.graph.node if n.op_type == "Gemm")
    bias_dq, w_dq, x_dq = (by_out[gemm.input[i]] for i in (2, 1, 0))
    assert inits[bias_dq.input[0]].dtype == np.int32
    np.testing.assert_allclose(inits[bias_dq.input[1]],
                               inits[x_dq.input[1]] * inits[w_dq.input[1]], rtol=1e-6)
    ref, quant = _session(model), _session(out)
    assert min(_cosine(ref.run(None, f)[0], quant.run(None, f)[0]) for f in feeds) > 0.999


def test_a_bias_beyond_int32_saturates_with_its_sign():
    """New user's find: clipped in float32, INT32_MAX rounds up to 2**31 and the cast wraps it
    to -2**31, flipping a saturated positive bias (the latency-guided site timing models)."""
    from onnxopt.passes.quantize_static import INT32_MAX, _int32_bias

    codes, _ = _int32_bias(np.float32([1e4, -1e4, 3.0]), np.float32(1.0),
                           np.float32([1e-9, 1e-9, 1.0]))
    assert codes.tolist() == [INT32_MAX, -INT32_MAX, 3]


def test_bias_overflow_raises_the_weight_scale_and_stays_accurate():
    """Near-zero weights with a bias like [5, -4.5]: s_x . s_w is so small that the bias would
    not fit in int32; the weight scale of those channels is raised instead."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"])]
    W = (RNG.normal(size=(2, 16, 1, 1)) * 1e-9).astype(np.float32)
    model = _model(nodes, [_f("x", [1, 16, 5, 5])], [_f("y", [1, 2, 5, 5])],
                   {"W": W, "B": np.array([5.0, -4.5], np.float32)})
    feeds = _feeds((1, 16, 5, 5))
    out, stats = _quantize(model, feeds)
    assert stats["bias_scale_raised"] == 2
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    biases = [v for v in inits.values() if v.dtype == np.int32 and v.any()]
    assert biases and np.abs(biases[0]).max() <= 2**31 - 1
    for f in feeds:
        np.testing.assert_allclose(_session(out).run(None, f)[0],
                                   _session(model).run(None, f)[0], atol=1e-3)


def _masked_attention():
    """x @ Wq -> + mask (-inf on padding) -> Softmax -> @ Wv: the mask path stays float."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["h"]),
             helper.make_node("Add", ["h", "mask"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "Wv"], ["y"])]
    inits = {"Wq": RNG.normal(size=(16, 16)).astype(np.float32),
             "Wv": RNG.normal(size=(16, 8)).astype(np.float32)}
    return _model(nodes, [_f("x", [64, 16]), _f("mask", [64, 16])], [_f("y", [64, 8])], inits)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse", "minmax"])
def test_infinite_attention_mask_is_left_float(method):
    model = _masked_attention()
    mask = np.zeros((64, 16), np.float32)
    mask[:, 12:] = -np.inf
    feeds = [{"x": RNG.normal(size=(64, 16)).astype(np.float32), "mask": mask} for _ in range(8)]
    out, stats = _quantize(model, feeds, calibration=method)
    assert stats["nodes_quantized"] == 2
    quantized = {n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "p"}  # never the mask, h or s
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    assert all(np.isfinite(v).all() for v in inits.values())
    ref, quant = _session(model), _session(out)
    # entropy (TensorRT's KL) clips the softmax output at 0.25 of its range: a property of the
    # method (most of the mass sits near 0), which the drift budget judges on real models
    floor = 0.85 if method == "entropy" else 0.99
    for f in feeds:
        a, b = ref.run(None, f)[0], quant.run(None, f)[0]
        assert np.isfinite(b).all() and _cosine(a, b) > floor


def test_activation_x_activation_and_graph_outputs_stay_float():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    model = _model(nodes, [_f("a", [4, 8]), _f("b", [8, 4])], [_f("y", [4, 4])], {})
    feeds = [{"a": RNG.normal(size=(4, 8)).astype(np.float32),
              "b": RNG.normal(size=(8, 4)).astype(np.float32)}]
    graph = import_graph(model)
    result = QuantizeStatic().run(graph, _ctx(graph, model, feeds))
    assert result.proposals == [] and result.stats["refused"] == {"activation x activation": 1}


def _ctx(graph, model, feeds):
    from onnxopt.analyses import AnalysisManager
    ctx = PassContext(template=model, calibration=feeds)
    ctx.analyses = AnalysisManager(graph, ctx)
    return ctx


def test_one_proposal_group_per_node_weight_and_simulated_activation():
    model = _conv_pool_matmul()
    graph = import_graph(model)
    result = QuantizeStatic().run(graph, _ctx(graph, model, _feeds((1, 3, 8, 8))))
    groups = collections.defaultdict(list)
    for p in result.proposals:
        groups[p.group].append(p)
    assert len(groups) == 2
    for ps in groups.values():
        weights = [p for p in ps if p.value is not None]
        simulated = [p for p in ps if p.value is None]
        assert simulated and all(p.simulate for p in simulated)
        # the Conv's group holds its weight and bias, the MatMul's its weight
        assert sorted(p.tensor.name for p in weights) in (["B", "W"], ["W2"])


def test_per_tensor_weights_option(tmp_path):
    out, stats = _quantize(_conv_pool_matmul(), _feeds((1, 3, 8, 8)), per_channel=False)
    assert stats["scheme"] == "QDQ, per-tensor 7-bit int8 weights"
    _, stats = _quantize(_conv_pool_matmul(), _feeds((1, 3, 8, 8)), matmul_reduce_range=False)
    assert stats["scheme"] == "QDQ, per-channel int8 weights, 8-bit MatMul/Gemm, 7-bit Conv"
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits \
                and inits[n.input[0]].dtype == np.int8:
            assert inits[n.input[1]].ndim == 0


def test_uint8_weights_use_the_full_grid_without_saturation(tmp_path):
    """uint8 MatMul weights (zero point 128) fuse into MatMulIntegerToFloat, the fused u8u8
    kernel computes exactly what the QDQ graph says, and the 8-bit grid beats 7-bit weights
    against onnxruntime's float result on the original model."""
    k, n = 256, 128
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Add", ["m", "B"], ["y"])]
    # a symbolic batch: with static shapes onnxruntime turns MatMul -> Add into Reshape -> Gemm
    model = _model(nodes, [_f("x", ["batch", 16, k])], [_f("y", ["batch", 16, n])],
                   {"W": RNG.normal(size=(k, n)).astype(np.float32),
                    "B": RNG.normal(size=n).astype(np.float32)})
    feeds = [{"x": (3 * RNG.normal(size=(4, 16, k))).astype(np.float32)} for _ in range(8)]
    out, stats = _quantize(model, feeds, uint8_weights=True, calibration="minmax")
    assert "uint8 MatMul weights" in stats["scheme"]
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear"
              and inits.get(n.input[0], np.zeros(0)).ndim == 2)
    assert inits[dq.input[0]].dtype == np.uint8 and np.all(inits[dq.input[2]] == 128)
    assert _fused_ops(out, tmp_path)["MatMulIntegerToFloat"] == 1
    seven_bit, _ = _quantize(model, feeds, calibration="minmax")
    ref, fused, qdq = _session(model), _session(out), _session(out, optimize=False)
    reduced = _session(seven_bit)
    err8 = err7 = 0.0
    for feed in feeds:
        a, b, c = ref.run(None, feed)[0], fused.run(None, feed)[0], qdq.run(None, feed)[0]
        assert np.abs(b - c).max() <= 1e-4 * np.abs(c).max()
        err8 += float(np.square(b - a).sum())
        err7 += float(np.square(reduced.run(None, feed)[0] - a).sum())
    assert err8 < 0.7 * err7  # a weight step half as large (the activation rounding stays)


def test_options_are_checked():
    from onnxopt.errors import UsageError
    for bad in ({"calibration": "kl"}, {"percentile": 10.0}, {"activation_type": "int16"}):
        with pytest.raises(UsageError):
            QuantizeStatic(**bad)


@pytest.mark.zoo
def test_minilm_matmuls_fuse_and_stay_close(tmp_path):
    path = ZOO / "minilm_l6.onnx"
    if not path.exists():
        pytest.skip("minilm_l6 not fetched")
    model = onnx.load(str(path))
    feed = dict(np.load(ZOO / "minilm_l6.inputs.npz"))
    out, stats = _quantize(model, [feed])
    assert stats["nodes_quantized"] >= 36  # every weighted MatMul of the encoder
    assert _fused_ops(out, tmp_path)["MatMulIntegerToFloat"] >= 36
    a, b = _session(model).run(None, feed)[0], _session(out).run(None, feed)[0]
    assert _cosine(a, b) > 0.98


def test_gemm_output_is_quantized_so_it_fuses_into_qgemm(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], transB=1),
             helper.make_node("Tanh", ["g"], ["y"])]
    model = _model(nodes, [_f("x", [4, 64])], [_f("y", [4, 32])],
                   {"W": RNG.normal(size=(32, 64)).astype(np.float32) / 8,
                    "B": RNG.normal(size=32).astype(np.float32)})
    feeds = _feeds((4, 64))
    out, _ = _quantize(model, feeds)
    fused = _fused_ops(out, tmp_path)
    assert fused["QGemm"] == 1 and fused["Gemm"] == 0
    ref, quant = _session(model), _session(out)
    assert min(_cosine(ref.run(None, f)[0], quant.run(None, f)[0]) for f in feeds) > 0.999


@pytest.mark.parametrize("accepted", [("conv1", "conv2"), ("conv1",)])
def test_a_conv_output_read_by_a_residual_add_still_fuses(accepted, tmp_path):
    """Conv1's output feeds Conv2 and a residual Add: its QDQ must reach both readers (one
    QuantizeLinear after Conv1), else onnxruntime runs Conv1 in float with its weight
    dequantized on every run -- also when the drift budget keeps Conv2 float (only Conv1's
    proposal group accepted)."""
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Conv", ["c1", "W2", "B2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Add", ["c1", "c2"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    inits = {"W1": RNG.normal(size=(8, 3, 3, 3)).astype(np.float32) / 4,
             "B1": RNG.normal(size=8).astype(np.float32),
             "W2": RNG.normal(size=(8, 8, 3, 3)).astype(np.float32) / 8,
             "B2": RNG.normal(size=8).astype(np.float32)}
    model = _model(nodes, [_f("x", [1, 3, 8, 8])], [_f("y", [1, 8, 8, 8])], inits)
    feeds = _feeds((1, 3, 8, 8), 16)
    graph = import_graph(model)
    result = QuantizeStatic(calibration="minmax").run(graph, _ctx(graph, model, feeds))
    assert {p.group for p in result.proposals} == {"conv1", "conv2"}
    for p in result.proposals:
        if p.group in accepted:
            p.apply()
    out = export_graph(graph.cleanup().toposort(), model)
    fused = _fused_ops(out, tmp_path)
    assert fused["QLinearConv"] == len(accepted) and fused["Conv"] == 2 - len(accepted)
    ref, quant = _session(model), _session(out)
    assert min(_cosine(ref.run(None, f)[0], quant.run(None, f)[0]) for f in feeds) > 0.999


def test_calibration_without_finite_values_is_refused_not_guessed():
    """All-NaN calibration feeds give no range: a clear UsageError (exit 2), never QDQ with a
    guessed scale of 1.0; a tensor that only some feeds leave non-finite is calibrated."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxopt import UsageError, optimize

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        [numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    good = [{"x": rng.normal(size=(4, 32)).astype(np.float32)} for _ in range(2)]
    nan = [{"x": np.full((4, 32), np.nan, np.float32)}]
    with pytest.raises(UsageError, match="no finite value"):
        optimize(model, quantize="int8-static", inputs=good, calibration=nan)
    _, report = optimize(model, quantize="int8-static", inputs=good, calibration=good + nan)
    stats = next(r.stats for r in report.passes if r.name == "quantize_static")
    assert stats["nodes_quantized"] == 1 and report.validation.passed


def _biased_layer(op):
    """A MatMul -> Add(b) or a Conv(b) whose input has a mean of 2 per channel, and a coarse
    per-tensor weight grid (one outlier weight): quantizing the weight shifts the output mean."""
    rng = np.random.default_rng(5)  # its own: the module's RNG state depends on test order
    w = rng.normal(size=(8, 32)).astype(np.float32) * 0.1
    w[0, 0] = 4.0
    b = rng.normal(size=8).astype(np.float32)
    if op == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                 helper.make_node("Add", ["h", "b"], ["y"], name="add")]
        return _model(nodes, [_f("x", [16, 32])], [_f("y", [16, 8])], {"W": w.T, "b": b}), \
            (16, 32), -1
    # no padding: the correction assumes every kernel tap reads the input's mean
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv")]
    w3 = np.repeat(w[:, :, None, None], 3, axis=2).repeat(3, axis=3) / 9
    return _model(nodes, [_f("x", [1, 32, 8, 8])], [_f("y", [1, 8, 6, 6])],
                  {"W": w3, "b": b}), (1, 32, 8, 8), 1


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
def test_bias_correction_removes_the_output_mean_shift(op):
    """Nagel et al. 2019, section 4.2: b' = b - (W' - W) E[x]. On held-out feeds of the same
    distribution the mean output error per channel shrinks to what activation rounding leaves;
    the drift budget sees the corrected bias (it is in the node's proposal group)."""
    model, shape, axis = _biased_layer(op)
    rng = np.random.default_rng(3)  # its own: the module's RNG state depends on test order

    def feeds(n):
        return [{"x": (2.0 + 0.5 * rng.normal(size=shape)).astype(np.float32)}
                for _ in range(n)]

    calibration, evaluation = feeds(16), feeds(16)
    ref = _session(model, optimize=False)
    reduce = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    shifts = {}
    for correct in (False, True):
        out, stats = _quantize(model, calibration, per_channel=False, calibration="minmax",
                               bias_correction=correct)
        quant = _session(out, optimize=False)
        errors = [quant.run(None, f)[0] - ref.run(None, f)[0] for f in evaluation]
        shifts[correct] = np.abs(np.mean(errors, axis=0).mean(axis=reduce)).max()
        if correct:
            assert stats["bias_correction"] == {"corrected": 1, "not corrected": {}}
    assert shifts[True] < 0.05 * shifts[False], shifts

    graph = import_graph(model)
    result = QuantizeStatic(per_channel=False, bias_correction=True).run(
        graph, _ctx(graph, model, calibration))
    assert "b" in [p.tensor.name for p in result.proposals if p.value is not None]


def test_proposed_values_are_what_the_saved_model_computes():
    """Every initializer apply replaces is proposed with the value the saved model computes in
    its place -- the weight's and the int32 bias's DequantizeLinear outputs -- so that the drift
    budget measures the saved model, not a neighbour of it (a bias rounded differently flips
    roundings of the next QuantizeLinear; the budget then fits its choice to the wrong model)."""
    model = _conv_pool_matmul()
    feeds = _feeds((1, 3, 8, 8))
    graph = import_graph(model)
    proposed = {p.tensor.name: p.value for p in
                QuantizeStatic().run(graph, _ctx(graph, model, feeds)).proposals
                if p.value is not None}
    assert set(proposed) == {"W", "B", "W2"}
    out, _ = _quantize(model, feeds)
    readers = {n.op_type: n for n in out.graph.node if n.op_type in ("Conv", "MatMul")}
    wanted = {"W": readers["Conv"].input[1], "B": readers["Conv"].input[2],
              "W2": readers["MatMul"].input[1]}
    probe = onnx.ModelProto()
    probe.CopyFrom(out)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in wanted.values())
    computed = dict(zip(wanted, _session(probe, optimize=False).run(None, feeds[0])))
    for name, value in proposed.items():
        np.testing.assert_array_equal(computed[name], value, err_msg=name)


def _correlated_inputs(k, rows, seed):
    """Calibration-like rows with correlated features of unequal scale (a random mixing of
    independent normals), as layer inputs are: the case where GPTQ's compensation helps."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(k, k)) / np.sqrt(k) + np.eye(k)
    return (rng.normal(size=(rows, k)) * rng.uniform(0.2, 3.0, k)) @ mixing


def test_gptq_symmetric_beats_rounding_to_nearest_on_the_output():
    """GPTQ with the per-channel scales fixed lowers the calibration output error
    ||X (W - W')||^2 of a 7-bit grid well below round-to-nearest's, on the same grid; with an
    uncorrelated diagonal Hessian there is nothing to compensate and it is round-to-nearest."""
    from onnxopt.passes._quant import gptq_symmetric, quantize_symmetric
    from onnxopt.passes.quantize_int4 import output_error

    k, n = 96, 40
    x = _correlated_inputs(k, 4000, 1)
    w = RNG.normal(size=(k, n)).astype(np.float32)
    q, scale = quantize_symmetric(w, 1, 63)
    codes = gptq_symmetric(w, x.T @ x, scale, 63)
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 63
    rtn, gptq = (output_error(w, c * scale.astype(np.float64), x.T @ x) for c in (q, codes))
    assert gptq < 0.6 * rtn, (gptq, rtn)
    # per tensor (a scalar scale) works the same way
    qt, st = quantize_symmetric(w, None, 127)
    ct = gptq_symmetric(w, x.T @ x, st, 127)
    assert output_error(w, ct * float(st), x.T @ x) < output_error(w, qt * float(st), x.T @ x)
    diagonal = np.diag(np.square(x).sum(axis=0))
    assert np.array_equal(gptq_symmetric(w, diagonal, scale, 63), q)


@pytest.mark.parametrize("layout", ["MatMul", "Gemm transB", "Conv 1x1"])
def test_gptq_rounding_lowers_the_error_of_the_fused_model(layout, tmp_path):
    """``rounding = "gptq"`` on a layer with correlated inputs: the saved model still fuses
    into onnxruntime's integer kernel and its output error against the float model, on
    held-out feeds, is lower than with round-to-nearest; the statistics say which nodes GPTQ
    rounded."""
    k, n = 128, 64
    w = RNG.normal(size=(k, n)).astype(np.float32) / 8
    if layout == "MatMul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
                 helper.make_node("Add", ["m", "B"], ["y"])]
        model = _model(nodes, [_f("x", ["batch", 16, k])], [_f("y", ["batch", 16, n])],
                       {"W": w, "B": RNG.normal(size=n).astype(np.float32)})
        shape, fused_op = (4, 16, k), "MatMulIntegerToFloat"
    elif layout == "Gemm transB":
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], name="mm", transB=1),
                 helper.make_node("Tanh", ["g"], ["y"])]
        model = _model(nodes, [_f("x", [64, k])], [_f("y", [64, n])],
                       {"W": w.T.copy(), "B": RNG.normal(size=n).astype(np.float32)})
        shape, fused_op = (64, k), "QGemm"
    else:  # a pointwise Conv: [n, k, 1, 1], its input's channels correlated
        nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="mm"),
                 helper.make_node("Tanh", ["c"], ["y"])]
        model = _model(nodes, [_f("x", ["batch", k, 4, 4])], [_f("y", ["batch", n, 4, 4])],
                       {"W": w.T.copy()[:, :, None, None],
                        "B": RNG.normal(size=n).astype(np.float32)})
        shape, fused_op = (1, 4, 4, k), "QLinearConv"
    x = _correlated_inputs(k, 48 * int(np.prod(shape[:-1])), 2).astype(np.float32)
    batches = x.reshape(48, *shape)
    if layout == "Conv 1x1":
        batches = np.ascontiguousarray(batches.transpose(0, 1, 4, 2, 3))  # channels second
    calibration = [{"x": b} for b in batches[:16]]
    evaluation = [{"x": b} for b in batches[16:]]
    ref = _session(model)
    errors = {}
    for rounding in ("nearest", "gptq"):
        out, stats = _quantize(model, calibration, rounding=rounding, calibration="minmax",
                               bias_correction=False, gptq_convs=layout == "Conv 1x1")
        assert _fused_ops(out, tmp_path)[fused_op] == 1
        if rounding == "gptq":
            assert stats["rounding"] == {"method": "gptq", "gptq": 1, "nearest": {}}
        else:
            assert stats["rounding"] == "nearest"
        quant = _session(out)
        errors[rounding] = sum(float(np.square(quant.run(None, f)[0] - ref.run(None, f)[0]).sum())
                               for f in evaluation)
    assert errors["gptq"] < 0.9 * errors["nearest"], errors


def test_gptq_rounding_leaves_convs_other_than_1x1_to_nearest():
    model = _conv_pool_matmul()
    _, stats = _quantize(model, _feeds((1, 3, 8, 8), n=4), rounding="gptq")
    assert stats["rounding"]["nearest"] == {"Conv weight (gptq_convs off)": 1}
    assert stats["rounding"]["gptq"] >= 1  # the MatMul
    _, stats = _quantize(model, _feeds((1, 3, 8, 8), n=4), rounding="gptq", gptq_convs=True)
    assert stats["rounding"]["nearest"] == {"Conv weight (not 1x1)": 1}


def test_rounding_options_are_checked():
    from onnxopt.errors import UsageError
    for bad in ({"rounding": "obq"}, {"damp": 0.0}, {"damp": 2.0}):
        with pytest.raises(UsageError):
            QuantizeStatic(**bad)


def _padded_matmul():
    """A MatMul reading x [2, t, 16] beside a "mask" input [2, t], and two feeds whose padding
    positions (mask 0) hold 500.0, far outside the real values."""
    k, n = 16, 8
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT)]
    model = _model(nodes, [_f("x", [2, "t", k]),
                           helper.make_tensor_value_info("mask", TensorProto.INT64, [2, "t"])],
                   [_f("y", [2, "t", n]), _f("mf", [2, "t"])],
                   {"W": RNG.normal(size=(k, n)).astype(np.float32)})
    feeds = []
    for t in (5, 7):
        mask = (np.arange(t)[None, :] < np.array([[t], [2]])).astype(np.int64)
        x = RNG.normal(size=(2, t, k)).astype(np.float32)
        x[mask == 0] = 500.0
        feeds.append({"x": x, "mask": mask})
    return model, feeds


def _input_scale(model):
    """The scale of the first QuantizeLinear of ``model`` (float)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[next(n for n in model.graph.node
                            if n.op_type == "QuantizeLinear").input[1]])


def test_ranges_leave_out_the_positions_the_drift_mask_marks_zero():
    """Under ``--drift-mask`` the calibrated range of an activation covers the real positions
    only: padding rows with huge values do not widen the QuantizeLinear scale (statistics name
    the mask); without the mask they do."""
    from onnxopt.budget import DriftBudget

    model, feeds = _padded_matmul()
    scales = {}
    for masked in (False, True):
        graph = import_graph(model)
        budget = DriftBudget(model, feeds, 0.5, mask="mask" if masked else None)
        ctx = PassContext(template=model, calibration=feeds, feeds=feeds, budget=budget)
        record = PassManager([]).run_pass(QuantizeStatic(calibration="minmax"), graph, ctx)
        scales[masked] = _input_scale(export_graph(graph.cleanup().toposort(), model))
        assert record.stats["calibration"].get("rows") == ("mask" if masked else None)
    assert scales[False] > 500 / 255 > 10 * scales[True], scales


def test_gptq_codes_belong_to_their_own_weight_when_group_names_collide():
    """A MatMul named "y2" and an unnamed MatMul whose output is "y2" share a proposal group;
    with weights of equal per-channel scales (rows permuted) each still gets the GPTQ codes of
    its own weight and input (review finding: the codes were cached by group)."""
    from onnxopt.passes._quant import gptq_symmetric, quantize_symmetric

    rng = np.random.default_rng(7)
    k, n = 32, 16
    w1 = rng.normal(size=(k, n)).astype(np.float32)
    w2 = w1[rng.permutation(k)].copy()
    nodes = [helper.make_node("MatMul", ["x1", "W1"], ["y1"], name="y2"),
             helper.make_node("MatMul", ["x2", "W2"], ["y2"])]
    model = _model(nodes, [_f("x1", [64, k]), _f("x2", [64, k])],
                   [_f("y1", [64, n]), _f("y2", [64, n])], {"W1": w1, "W2": w2})
    mixes = [rng.normal(size=(k, k)) + np.eye(k) for _ in range(2)]
    feeds = [{"x1": (rng.normal(size=(64, k)) @ mixes[0]).astype(np.float32),
              "x2": (rng.normal(size=(64, k)) @ mixes[1]).astype(np.float32)} for _ in range(8)]
    out, _ = _quantize(model, feeds, rounding="gptq", calibration="minmax",
                       bias_correction=False)
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    dq = {node.output[0]: node for node in out.graph.node if node.op_type == "DequantizeLinear"}
    for name, x, w in (("y1", "x1", w1), ("y2", "x2", w2)):
        mm = next(node for node in out.graph.node
                  if node.op_type == "MatMul" and node.output[0] == name)
        rows = np.concatenate([f[x] for f in feeds]).astype(np.float64)
        _, scale = quantize_symmetric(w, 1, 63)
        np.testing.assert_array_equal(inits[dq[mm.input[1]].input[0]],
                                      gptq_symmetric(w, rows.T @ rows, scale, 63))


def test_rounding_statistics_count_only_quantized_nodes():
    from onnxopt.budget import DriftBudget

    model = _conv_pool_matmul()
    feeds = _feeds((1, 3, 8, 8), n=4)
    budget = DriftBudget(model, feeds, 1.0 - 1e-12)  # nothing lossy fits
    ctx = PassContext(template=model, calibration=feeds, feeds=feeds, budget=budget)
    record = PassManager([]).run_pass(QuantizeStatic(rounding="gptq"), import_graph(model), ctx)
    assert record.stats["nodes_quantized"] == 0
    assert record.stats["rounding"] == {"method": "gptq", "gptq": 0, "nearest": {}}


def test_drift_mask_applies_to_calibration_without_validation():
    """``drift_mask`` with ``validate=False`` (``--no-validate``: no drift budget) leaves the
    padding out of the calibrated ranges as a validated run does (review finding: the mask was
    read from the budget only)."""
    import onnxopt

    model, feeds = _padded_matmul()

    common = dict(passes=["quantize_static"], calibration=feeds, drift_mask="mask",
                  options={"quantize_static": {"calibration": "minmax"}})
    validated, _ = onnxopt.optimize(model, inputs=feeds, max_drift=0.5, **common)
    unvalidated, _ = onnxopt.optimize(model, validate=False, **common)
    assert _input_scale(unvalidated) == _input_scale(validated) < 500 / 255 / 10


def _two_layers(on_grid: str):
    """x -> MatMul(A) -> MatMul(B) -> y, both weights [64, 64]; the weight named ``on_grid``
    has values on its 7-bit per-channel grid (7-bit rounding exact: uint8 gains nothing), the
    other is Gaussian."""
    k = 64
    weights = {n: RNG.normal(size=(k, k)).astype(np.float32) for n in ("A", "B")}
    w = weights[on_grid]
    step = np.abs(w).max(axis=0, keepdims=True) / 63
    weights[on_grid] = (np.rint(w / step) * step).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "B"], ["y"], name="second")]
    model = _model(nodes, [_f("x", ["batch", k])], [_f("y", ["batch", k])], weights)
    return model, _feeds((32, k), n=4)


def _weight_types(model):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0].split("_")[0]: inits[n.input[0]].dtype for n in model.graph.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).ndim == 2}


@pytest.mark.parametrize("on_grid, wide, rounding", [("A", "second", "nearest"),
                                                     ("B", "first", "gptq")])
def test_uint8_fraction_gives_uint8_to_the_weight_the_7_bit_grid_harms(on_grid, wide, rounding):
    """``uint8_fraction`` 0.5 of two equal weights: the one whose 7-bit rounding costs drift
    (measured through the budget) gets uint8 weights, the one exactly on its 7-bit grid stays
    int8; the statistics give both gains."""
    from onnxopt.budget import DriftBudget

    model, feeds = _two_layers(on_grid)
    budget = DriftBudget(model, feeds, 0.9)
    graph = import_graph(model)
    ctx = PassContext(template=model, calibration=feeds, feeds=feeds, budget=budget)
    record = PassManager([]).run_pass(QuantizeStatic(uint8_fraction=0.5, calibration="minmax",
                                                     rounding=rounding), graph, ctx)
    out = export_graph(graph.cleanup().toposort(), model)
    mixed = record.stats["uint8_weights_mixed"]
    assert mixed["ranking"] == "measured" and mixed["uint8"] == [wide]
    assert mixed["elements_uint8"] == 64 * 64 and mixed["elements"] == 2 * 64 * 64
    assert mixed["gain"][wide] > 0 >= mixed["gain"][{"first": "second"}.get(wide, "first")]
    types = _weight_types(out)
    assert types == {"A": np.uint8 if wide == "first" else np.int8,
                     "B": np.uint8 if wide == "second" else np.int8}
    assert "uint8 for the MatMuls" in record.stats["scheme"]
    if rounding == "gptq":
        assert record.stats["rounding"]["gptq"] == 2


def test_uint8_fraction_without_a_budget_gives_every_matmul_uint8():
    """Nothing to measure with (no drift budget): the accurate grid everywhere, said so."""
    model, feeds = _two_layers("A")
    out, stats = _quantize(model, feeds, uint8_fraction=0.5, calibration="minmax")
    assert stats["uint8_weights_mixed"]["ranking"].startswith("none (no drift budget")
    assert _weight_types(out) == {"A": np.uint8, "B": np.uint8}


@pytest.mark.parametrize("bad", [{"uint8_fraction": 0.0}, {"uint8_fraction": 1.0},
                                 {"uint8_fraction": 0.3, "uint8_weights": True},
                                 {"uint8_fraction": 0.3, "matmul_reduce_range": False},
                                 {"uint8_fraction": 0.3, "reduce_range": False}])
def test_uint8_fraction_is_checked(bad):
    from onnxopt.errors import UsageError
    with pytest.raises(UsageError, match="uint8_fraction"):
        QuantizeStatic(**bad)
    # the 7-bit grid it mixes with: given, or by reduce_range
    QuantizeStatic(uint8_fraction=0.3, matmul_reduce_range=True, reduce_range=False)


def test_min_macs_leaves_float_the_nodes_too_small_to_gain():
    """A squeeze-and-excitation 1x1 Conv on a ``[N, C, 1, 1]`` input does C_out * C_in
    multiply-adds per run; with ``min_macs`` above that it stays float with the count, the
    large Conv is quantized; the default (0) quantizes both."""
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="big"),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Conv", ["g", "W2"], ["s"], name="se"),
             helper.make_node("Mul", ["c", "s"], ["y"])]
    inits = {"W": RNG.normal(size=(16, 3, 3, 3)).astype(np.float32),
             "B": RNG.normal(size=16).astype(np.float32),
             "W2": RNG.normal(size=(16, 16, 1, 1)).astype(np.float32) / 4}
    model = _model(nodes, [_f("x", [1, 3, 8, 8])], [_f("y", [1, 16, 8, 8])], inits)
    feeds = _feeds((1, 3, 8, 8))
    _, stats = _quantize(model, feeds, min_macs=1000)
    assert stats["nodes_float"] == {"se": "too small to gain (256 multiply-adds per run)"}
    assert stats["nodes_quantized"] == 1  # big: 64 positions x 432 = 27648 multiply-adds
    _, stats = _quantize(model, feeds)
    assert stats["nodes_quantized"] == 2
    assert "option min_macs" in QuantizeStatic.Options(min_macs=-1).check()


def test_matmul_reduce_range_gives_matmuls_the_full_grid_and_convs_keep_seven_bits():
    """``matmul_reduce_range = false`` (the int8-static mode's default): MatMul weights use
    codes up to 127, Conv weights stay within 63 (``reduce_range``)."""
    def codes(out):
        inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
        found = {}
        for n in out.graph.node:
            if n.op_type in ("Conv", "MatMul"):
                dq = next(m for m in out.graph.node if n.input[1] in m.output)
                found[n.op_type] = int(np.abs(inits[dq.input[0]].astype(np.int32)).max())
        return found

    model, feeds = _conv_pool_matmul(), _feeds((1, 3, 8, 8))
    out, _ = _quantize(model, feeds, calibration="minmax")
    assert codes(out) == {"Conv": 63, "MatMul": 63}
    out, _ = _quantize(model, feeds, calibration="minmax", matmul_reduce_range=False)
    assert codes(out) == {"Conv": 63, "MatMul": 127}
    out, _ = _quantize(model, feeds, calibration="minmax", reduce_range=False,
                       matmul_reduce_range=True)
    assert codes(out) == {"Conv": 127, "MatMul": 63}
