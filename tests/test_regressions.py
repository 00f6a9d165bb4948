"""Regressions found by trying to break onnxopt: each model once came out wrong, invalid, or with
the wrong exit code. Every check compares with onnxruntime on the original model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

import onnxopt
from onnxopt.cli import main


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = oh.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _vi(name, dtype, shape):
    return oh.make_tensor_value_info(name, dtype, shape)


def _assert_same(model, feed, **kwargs):
    optimized, report = onnxopt.optimize(model, inputs=feed, **kwargs)
    assert report.validation.passed and not report.rolled_back
    for a, b in zip(_run(model, feed), _run(optimized, feed), strict=True):
        np.testing.assert_array_equal(a, b)
    return optimized


def test_shape_after_slice_with_negative_step_is_not_folded():
    """ONNX inference says a reversed Slice to INT_MAX is empty; onnxruntime gives 1 element."""
    inits = [nh.from_array(np.array([0]), "s"), nh.from_array(np.array([2**31 - 1]), "e"),
             nh.from_array(np.array([0]), "a"), nh.from_array(np.array([-2]), "p"),
             nh.from_array(np.array([1e5], np.float32), "big")]
    nodes = [oh.make_node("Slice", ["x", "s", "e", "a", "p"], ["sl"]),
             oh.make_node("Shape", ["sl"], ["shp"]),
             oh.make_node("Cast", ["shp"], ["n"], to=TP.FLOAT),
             oh.make_node("Add", ["x", "n"], ["xn"]),
             oh.make_node("Concat", ["xn", "big"], ["y"], axis=0)]
    model = _model(nodes, [_vi("x", TP.FLOAT, [3])], [_vi("y", TP.FLOAT, [4])], inits)
    optimized = _assert_same(model, {"x": np.array([0.1, 0.2, 0.3], np.float32)})
    assert "Shape" in {n.op_type for n in optimized.graph.node}


@pytest.mark.parametrize("pool", [
    oh.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                 ceil_mode=1),
    oh.make_node("Resize", ["x", "", "scales"], ["p"], mode="nearest"),
])
def test_shape_after_disputed_shape_inference_is_not_folded(pool):
    """After ceil_mode pooling and Resize, onnx 1.23's inferred size differs from onnxruntime's."""
    inits = [nh.from_array(np.array([1, 1, 0.7, 0.7], np.float32), "scales")]
    nodes = [pool, oh.make_node("Shape", ["p"], ["s"]),
             oh.make_node("Cast", ["s"], ["y"], to=TP.INT64)]
    model = _model(nodes, [_vi("x", TP.FLOAT, [1, 1, 10, 10])], [_vi("y", TP.INT64, [4])], inits)
    _assert_same(model, {"x": np.random.default_rng(0).random((1, 1, 10, 10), np.float32)})


def test_integer_outputs_must_be_equal_in_lossless_mode():
    """A range-relative tolerance must not let an index be off by one."""
    nodes = [oh.make_node("Add", ["x", "one"], ["y"])]
    model = _model(nodes, [_vi("x", TP.INT64, [3])], [_vi("y", TP.INT64, [3])],
                   [nh.from_array(np.array(1, np.int64), "one")])
    wrong = _model(nodes, [_vi("x", TP.INT64, [3])], [_vi("y", TP.INT64, [3])],
                   [nh.from_array(np.array(2, np.int64), "one")])
    feed = {"x": np.array([0, 10_000, 20_000], np.int64)}
    result = onnxopt.api.compare_models(model, wrong, [feed])
    assert not result.passed


def test_shape_cast_round_trip_closed_in_a_branch_is_left_alone():
    then = oh.make_graph([oh.make_node("Cast", ["s32"], ["s64"], to=TP.INT64)], "then", [],
                         [_vi("s64", TP.INT64, None)])
    other = oh.make_graph([oh.make_node("Identity", ["s"], ["e2"])], "else", [],
                          [_vi("e2", TP.INT64, None)])
    nodes = [oh.make_node("Shape", ["x"], ["s"]),
             oh.make_node("Cast", ["s"], ["s32"], to=TP.INT32),
             oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    model = _model(nodes, [_vi("x", TP.FLOAT, ["N", 3]), _vi("c", TP.BOOL, [])],
                   [_vi("y", TP.INT64, None)])
    _assert_same(model, {"x": np.ones((2, 3), np.float32), "c": np.array(True)})


@pytest.fixture
def external_model(tmp_path):
    """A model whose 4 KiB weight lives in weights.bin beside it."""
    w = np.arange(1024, dtype=np.float32)
    model = _model([oh.make_node("Add", ["x", "w"], ["y"])], [_vi("x", TP.FLOAT, [1024])],
                   [_vi("y", TP.FLOAT, [1024])], [nh.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    return path


def test_input_external_data_is_never_overwritten(external_model, tmp_path, capsys):
    data = external_model.parent / "weights.bin"
    before = data.read_bytes()
    assert main(["optimize", str(external_model), "-o", str(data), "--no-validate"]) == 2
    # an output whose own data file would be the input's data file
    named = tmp_path / "out.onnx.data"
    data.rename(named)
    model = onnx.load(str(external_model), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = named.name
    onnx.save_model(model, str(external_model))
    assert main(["optimize", str(external_model), "-o", str(tmp_path / "out.onnx"),
                 "--external-data", "--prune-threshold", "100", "--no-validate"]) == 2
    assert named.read_bytes() == before
    assert capsys.readouterr().err.count("refusing to overwrite") == 2


def test_external_data_output_can_be_written_twice(external_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["optimize", str(external_model), "-o", "out.onnx", "--external-data",
                     "--quiet"]) == 0
    loaded = onnx.load("out.onnx")
    assert nh.to_array(loaded.graph.initializer[0]).tolist() == list(range(1024))


@pytest.mark.parametrize("arg", ["-o", "--report"])
def test_output_paths_that_cannot_be_files_exit_2_before_any_work(external_model, tmp_path,
                                                                 arg, capsys):
    (tmp_path / "adir").mkdir()
    argv = ["optimize", str(external_model), "-o", str(tmp_path / "o.onnx")]
    argv += [arg, str(tmp_path / "adir")] if arg == "--report" else []
    if arg == "-o":
        argv[3] = str(tmp_path / "adir")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "directory" in err or "is a folder" in err
    assert not (tmp_path / "o.onnx").exists()


def test_a_pass_producing_invalid_onnx_is_rolled_back(monkeypatch):
    """The safety net also runs the ONNX checker: a lossless pass whose output the checker
    rejects is left out and named."""
    from onnxopt.pass_manager import REGISTRY, Pass, PassResult

    class Duplicate(Pass):
        name = "test_duplicate_output"
        description = "gives two nodes the same output (invalid SSA)"

        def run(self, graph, ctx):
            node = graph.nodes[0]
            import onnx_graphsurgeon as gs
            graph.nodes.append(gs.Node("Identity", inputs=[node.inputs[0]],
                                       outputs=[node.outputs[0]]))
            return PassResult(True)

    monkeypatch.setitem(REGISTRY, Duplicate.name, Duplicate)
    model = _model([oh.make_node("Neg", ["x"], ["y"])], [_vi("x", TP.FLOAT, [2])],
                   [_vi("y", TP.FLOAT, [2])])
    optimized, report = onnxopt.optimize(
        model, passes=["remove_identity", Duplicate.name],
        inputs={"x": np.array([1.0, 2.0], np.float32)})
    assert report.validation.passed
    assert [r["pass"] for r in report.rolled_back] == [Duplicate.name]
    onnx.checker.check_model(optimized)


@pytest.mark.parametrize("node,inits", [
    (oh.make_node("Reshape", ["x", "t"], ["r"]), [nh.from_array(np.array([-1], np.int64), "t")]),
    (oh.make_node("Flatten", ["x"], ["r"], axis=2), []),
])
def test_declared_minus_one_dims_are_dynamic_for_shape_inference(node, inits):
    """Exporters write dynamic dims as -1; ONNX inference would multiply them ((-1)(-1) = 1) and
    a Shape of the result would be folded to a constant that is wrong for other inputs."""
    model = _model([node, oh.make_node("Shape", ["r"], ["y"])], [_vi("x", TP.FLOAT, [-1, -1])],
                   [_vi("y", TP.INT64, None)], inits)
    optimized, _ = onnxopt.optimize(model)
    for shape in [(1, 1), (2, 3), (4, 5)]:
        x = np.zeros(shape, np.float32)
        np.testing.assert_array_equal(_run(model, {"x": x})[0], _run(optimized, {"x": x})[0])


def _dilated_same_pool_model(tail, outputs, inits=()):
    """``p = MaxPool(x[N, 2, 5, 5])``, SAME_UPPER with dilations 2: onnx 1.23 infers
    ``[N, 2, 5, 5]``, onnxruntime 1.32 computes ``[N, 2, 4, 4]``."""
    pool = oh.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], dilations=[2, 2],
                        auto_pad="SAME_UPPER")
    return _model([pool] + tail, [_vi("x", TP.FLOAT, ["N", 2, 5, 5])], outputs, inits)


def test_spatial_dims_after_disputed_pooling_are_not_folded_channels_are():
    """Shape(p)[2] and Shape(Flatten(p)) depend on the disputed spatial dims and stay computed;
    Shape(p)[1], the channels, is certain and folds."""
    inits = [nh.from_array(np.array([2]), "two"), nh.from_array(np.array([1]), "one")]
    tail = [oh.make_node("Shape", ["p"], ["s"]),
            oh.make_node("Gather", ["s", "two"], ["h"], axis=0),
            oh.make_node("Gather", ["s", "one"], ["c"], axis=0),
            oh.make_node("Flatten", ["p"], ["f"], axis=1),
            oh.make_node("Shape", ["f"], ["fs"]),
            oh.make_node("Concat", ["h", "c", "fs"], ["y"], axis=0)]
    model = _dilated_same_pool_model(tail, [_vi("y", TP.INT64, [4])], inits)
    for n in (1, 3):
        feed = {"x": np.random.default_rng(n).random((n, 2, 5, 5), np.float32)}
        optimized = _assert_same(model, feed)
    assert [n.op_type for n in optimized.graph.node].count("Gather") == 1


def test_flatten_after_disputed_pooling_keeps_its_rank_for_gemm():
    """mtcnn's ONet (keras2onnx): ``MatMul(Flatten(p), W) + b`` after a SAME MaxPool is a Gemm;
    Flatten(axis=1) of ``[N, 2, ?, ?]`` is ``[N, ?]``, so the operand's rank is known."""
    inits = [nh.from_array(np.ones((18, 3), np.float32), "w"),
             nh.from_array(np.arange(3, dtype=np.float32), "b")]
    nodes = [oh.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                          auto_pad="SAME_UPPER"),
             oh.make_node("Flatten", ["p"], ["f"], axis=1),
             oh.make_node("MatMul", ["f", "w"], ["m"]),
             oh.make_node("Add", ["m", "b"], ["y"])]
    model = _model(nodes, [_vi("x", TP.FLOAT, ["N", 2, 6, 6])], [_vi("y", TP.FLOAT, ["N", 3])],
                   inits)
    for n in (1, 4):
        feed = {"x": np.random.default_rng(n).random((n, 2, 6, 6), np.float32)}
        optimized = _assert_same(model, feed)
    assert [n.op_type for n in optimized.graph.node] == ["MaxPool", "Flatten", "Gemm"]


def _fp16_conv(first: list, second: list, inits: dict) -> onnx.ModelProto:
    """A float16 model of the given nodes reading x [1, 1, 2, 2] and writing y."""
    return _model(first + second, [_vi("x", TP.FLOAT16, [1, 1, 2, 2])],
                  [_vi("y", TP.FLOAT16, [1, 1, 2, 2])],
                  [nh.from_array(np.asarray(v, np.float16), k) for k, v in inits.items()])


@pytest.mark.parametrize("case", ["input_scale", "output_scale", "batchnorm"])
def test_a_fold_that_overflows_the_weight_dtype_is_refused(case):
    """Folding a scale of 300 into a float16 weight of 300 gives 90000 > 65504 = inf: the fused
    model would answer inf for every x, the original only for large x. On the validation feed
    (x = 1) both overflow; on x = 1e-3 the original gives 90."""
    w = {"W": np.full((1, 1, 1, 1), 300)}
    if case == "input_scale":
        model = _fp16_conv([oh.make_node("Mul", ["x", "s"], ["xs"])],
                           [oh.make_node("Conv", ["xs", "W"], ["y"])], {**w, "s": [300]})
    elif case == "output_scale":
        model = _fp16_conv([oh.make_node("Conv", ["x", "W"], ["c"])],
                           [oh.make_node("Mul", ["c", "s"], ["y"])], {**w, "s": [[[300]]]})
    else:
        model = _fp16_conv([oh.make_node("Conv", ["x", "W"], ["c"])],
                           [oh.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
                           {**w, "g": [300], "b": [0], "m": [0], "v": [1]})
    optimized, report = onnxopt.optimize(
        model, inputs={"x": np.ones((1, 1, 2, 2), np.float16)}, raise_on_failure=False)
    options = ort.SessionOptions()  # onnxruntime's own Conv fusions make the same overflow
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"]).run(None, small)[0]

    small = {"x": np.full((1, 1, 2, 2), 1e-3, np.float16)}
    assert np.isfinite(run(model)).all()
    np.testing.assert_allclose(run(optimized), run(model), rtol=1e-3)


@pytest.mark.parametrize("stored", ["in memory", "external"])
def test_bfloat16_float8_and_4bit_initializers(tmp_path, stored):
    """onnx-graphsurgeon gives bfloat16 and float8 constants an ONNX type number as dtype (sizes
    and dedup keys crashed on it), and writes loaded 4-bit values one byte each (a fold of an
    Identity of an int4 weight crashed the export)."""
    from onnx.reference import ReferenceEvaluator
    import ml_dtypes

    rng = np.random.default_rng(0)
    types = {"bf16": (ml_dtypes.bfloat16, TP.BFLOAT16), "f8": (ml_dtypes.float8_e4m3fn,
                                                             TP.FLOAT8E4M3FN),
             "f8uz": (ml_dtypes.float8_e4m3fnuz, TP.FLOAT8E4M3FNUZ),
             "i4": (ml_dtypes.int4, TP.INT4), "u4": (ml_dtypes.uint4, TP.UINT4)}
    inits, nodes, outputs = [], [], []
    for name, (dtype, onnx_type) in types.items():
        for suffix, shape in (("m", (3, 5)), ("s", ())):
            n = f"{name}_{suffix}"
            inits.append(nh.from_array(np.asarray(rng.random(shape) * 5, dtype=dtype), n))
            nodes.append(oh.make_node("Identity", [n], [f"{n}_out"]))
            outputs.append(_vi(f"{n}_out", onnx_type, list(shape)))
    model = _model(nodes + [oh.make_node("Identity", ["x"], ["y"])], [_vi("x", TP.FLOAT, [2])],
                   outputs + [_vi("y", TP.FLOAT, [2])], inits, opset=21)
    model.ir_version = 10
    source = model
    if stored == "external":
        source = tmp_path / "m.onnx"
        onnx.save_model(model, str(source), save_as_external_data=True, size_threshold=0)
        model = onnx.load(str(source))
    optimized, _ = onnxopt.optimize(source, validate=False, output=tmp_path / "o" / "o.onnx")
    feed = {"x": np.ones(2, np.float32)}
    expected = ReferenceEvaluator(model).run(None, feed)
    got = ReferenceEvaluator(onnx.load(str(tmp_path / "o" / "o.onnx"))).run(None, feed)
    for a, b in zip(expected, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
