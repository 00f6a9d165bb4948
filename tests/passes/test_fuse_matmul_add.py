"""Tests of passes/fuse_matmul_add.py: MatMul of 2-D operands followed by Add of a bias that
broadcasts unidirectionally to (M, N) becomes one Gemm computing what the original computes on
onnxruntime; batched MatMul, biases that broadcast the product up, and the other refusals are
refused and counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_pass, assert_same_outputs, make_branch, make_model, ops, run_once, run_passes
from helpers import zoo_files as _zoo_files
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.passes import LOSSLESS_PIPELINE

K, N = 5, 4


def matmul_add_model(a_shape=(3, K), b_shape=(K, N), c_shape=(N,), dtype=np.float32,
                     bias_left=False, opset=17, b_const=True, y_shape=None, extra_nodes=(),
                     extra_outputs=()):
    """a → MatMul(a, B) → t → Add(t, C) → y, with B and C drawn with a fixed seed."""
    rng = np.random.default_rng(0)
    inits = {"C": rng.normal(size=c_shape).astype(dtype)}
    inputs = [("a", dtype, list(a_shape))]
    if b_const:
        inits["B"] = rng.normal(size=b_shape).astype(dtype)
    else:
        inputs.append(("B", dtype, list(b_shape)))
    add_inputs = ["C", "t"] if bias_left else ["t", "C"]
    nodes = [helper.make_node("MatMul", ["a", "B"], ["t"], name="mm"),
             helper.make_node("Add", add_inputs, ["y"]), *extra_nodes]
    if y_shape is None:
        y_shape = np.broadcast_shapes(tuple(a_shape[:-1]) + (b_shape[-1],), tuple(c_shape))
    outputs = [("y", dtype, list(y_shape)),
               *extra_outputs]
    return make_model(nodes, inputs, outputs, inits, opset=opset)


FUSED = {
    "bias [N]": dict(),
    "bias [1,N]": dict(c_shape=(1, N)),
    "bias [M,N]": dict(c_shape=(3, N)),
    "bias [M,1]": dict(c_shape=(3, 1)),
    "bias [1,1]": dict(c_shape=(1, 1)),
    "bias [1]": dict(c_shape=(1,)),
    "bias scalar": dict(c_shape=()),
    "bias on the left": dict(bias_left=True),
    "float64": dict(dtype=np.float64),
    "float16": dict(dtype=np.float16),
    "dynamic M, bias [N]": dict(a_shape=("m", K), y_shape=("m", N)),
    "B is a graph input": dict(b_const=False),
    "opset 9": dict(opset=9),
}


@pytest.mark.parametrize("kwargs", FUSED.values(), ids=FUSED.keys())
def test_fused_outputs_equal(kwargs):
    model = matmul_add_model(**kwargs)
    fused, result = run_once(model, "fuse_matmul_add")
    assert result.modified and result.stats == {"rewritten": 1}
    assert ops(fused) == ["Gemm"]
    node = fused.graph.node[0]
    assert list(node.input) == ["a", "B", "C"] and list(node.output) == ["y"]
    assert not node.attribute  # alpha = beta = 1, no transposition
    tol = 1e-2 if kwargs.get("dtype") == np.float16 else 1e-5
    assert_same_outputs(model, fused, rtol=tol, atol=tol)


def _refused(model, reason, a_shape=None):
    """The pass changes nothing and counts ``reason``; ``a_shape`` is the feed's shape for a
    dynamic or unknown input shape."""
    out, result = run_once(model, "fuse_matmul_add")
    assert not result.modified
    assert result.stats == {"rewritten": 0, "refused": {reason: 1}}
    assert ops(out) == ops(model)
    feeds = None if a_shape is None else \
        [{"a": np.random.default_rng(0).normal(size=a_shape).astype(np.float32)}]
    assert_same_outputs(model, out, feeds)


REFUSALS = {
    # the regression cases: Gemm would compute a 2-D product, the Add broadcasts it up
    "5-D MatMul, bias [1,1,1,1,N]": (dict(a_shape=(2, 1, 2, 3, K), c_shape=(1, 1, 1, 1, N)),
                                     "operands are not both 2-D"),
    "3-D x 2-D MatMul, bias [N]": (dict(a_shape=(2, 3, K)), "operands are not both 2-D"),
    "2-D x 3-D MatMul": (dict(b_shape=(2, K, N), y_shape=(2, 3, N)), "operands are not both 2-D"),
    "1-D A (vector-matrix product)": (dict(a_shape=(K,)), "operands are not both 2-D"),
    "bias [3,M,N] adds a dimension": (dict(c_shape=(2, 3, N)),
                                      "Add broadcasts the product to a higher rank"),
    "bias [1,1,N] adds a dimension": (dict(c_shape=(1, 1, N)),
                                      "Add broadcasts the product to a higher rank"),
    "bias [2M,1] with M=1 grows M": (dict(a_shape=(1, K), c_shape=(6, 1)),
                                     "Add broadcasts the product to a larger shape"),
    "bias [M,N] with a dynamic M": (dict(a_shape=("m", K), c_shape=(3, N), y_shape=(3, N)),
                                    "bias dim may not match a dynamic dim of the product"),
    "A rank unknown": (dict(a_shape=None), "operand rank unknown"),
    "int32": (dict(dtype=np.int32), "dtype is not float16, float or double"),
}


@pytest.mark.parametrize("kwargs,reason", REFUSALS.values(), ids=REFUSALS.keys())
def test_refused(kwargs, reason):
    if kwargs.get("a_shape", ()) is None:
        model = matmul_add_model()
        model.graph.input[0].type.tensor_type.ClearField("shape")
        model.graph.output[0].type.tensor_type.ClearField("shape")
        _refused(model, reason, a_shape=(3, K))
    else:
        model = matmul_add_model(**kwargs)
        a_shape = tuple(3 if isinstance(d, str) else d for d in kwargs.get("a_shape", ()))
        _refused(model, reason, a_shape=a_shape or None)


def test_refused_before_opset_7():
    """Gemm-6 broadcasts C only with broadcast=1 (onnxruntime has no opset-6 Add to compare):
    the pass manager does not run the pass."""
    model = matmul_add_model(c_shape=(3, N), opset=6)
    out, result = run_once(model, "fuse_matmul_add")
    assert not result.modified and result.stats == {"refused": {"opset 6 < 7": 1}}
    assert ops(out) == ops(model)


# ----------------------------------------------------------------- a bias that is not constant

def tensor_bias_model(c_shape=(3, N), a_shape=(3, K), declared=None):
    """a → MatMul(a, B) → t → Add(t, Relu(c)) → y, with ``c`` a graph input declared with
    ``declared`` (default ``c_shape``; ``"unknown"``: no shape at all): the bias is computed."""
    declared = c_shape if declared is None else declared
    b = np.random.default_rng(0).normal(size=(a_shape[-1], N)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["a", "B"], ["t"], name="mm"),
             helper.make_node("Relu", ["c"], ["rc"]),
             helper.make_node("Add", ["t", "rc"], ["y"])]
    y_shape = np.broadcast_shapes(tuple(a_shape[:-1]) + (N,), tuple(c_shape))
    c_declared = list(c_shape if declared == "unknown" else declared)
    model = make_model(nodes, [("a", np.float32, list(a_shape)), ("c", np.float32, c_declared)],
                       [("y", np.float32, list(y_shape))], {"B": b})
    if declared == "unknown":
        model.graph.input[1].type.tensor_type.ClearField("shape")
    return model


def _feed(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


TENSOR_FUSED = {
    "[M,N]": (3, N), "[N]": (N,), "[1,N]": (1, N), "[M,1]": (3, 1), "scalar": (),
}


@pytest.mark.parametrize("c_shape", TENSOR_FUSED.values(), ids=TENSOR_FUSED.keys())
def test_tensor_bias_fused(c_shape):
    """``C`` computed by another node (shape from shape inference) is Gemm's C."""
    model = tensor_bias_model(c_shape)
    fused, result = run_once(model, "fuse_matmul_add")
    assert result.stats == {"rewritten": 1}
    assert ops(fused) == ["Relu", "Gemm"]
    assert list(fused.graph.node[1].input) == ["a", "B", "rc"]
    assert_same_outputs(model, fused)


def test_tensor_bias_graph_input_with_default():
    """An initializer also listed as a graph input (a caller may override it) is no constant,
    but its declared shape is its type: it is Gemm's C all the same."""
    model = matmul_add_model()
    model.graph.input.append(helper.make_tensor_value_info("C", TensorProto.FLOAT, [N]))
    fused, result = run_once(model, "fuse_matmul_add")
    assert result.stats == {"rewritten": 1} and ops(fused) == ["Gemm"]
    c = np.random.default_rng(5).normal(size=N).astype(np.float32)
    a = np.random.default_rng(6).normal(size=(3, K)).astype(np.float32)
    assert_same_outputs(model, fused, [{"a": a}, {"a": a, "C": c}])


def lstm_gates_model(h_first=False, bias_left=False):
    """The gate pre-activations of an LSTM cell as keras/paddle exporters write them out:
    ``Add(MatMul(x[1, K], W[K, 4H]), MatMul(h[1, H], R[H, 4H]))``; ``h_first`` puts the
    recurrent MatMul first in the node order."""
    rng = np.random.default_rng(2)
    hidden = 3
    inits = {"W": rng.normal(size=(K, 4 * hidden)).astype(np.float32),
             "R": rng.normal(size=(hidden, 4 * hidden)).astype(np.float32)}
    mm_x = helper.make_node("MatMul", ["x", "W"], ["xw"])
    mm_h = helper.make_node("MatMul", ["h", "R"], ["hr"])
    add = helper.make_node("Add", ["hr", "xw"] if bias_left else ["xw", "hr"], ["y"])
    return make_model([mm_h, mm_x, add] if h_first else [mm_x, mm_h, add],
                      [("x", np.float32, [1, K]), ("h", np.float32, [1, hidden])],
                      [("y", np.float32, [1, 4 * hidden])], inits)


@pytest.mark.parametrize("h_first", [False, True])
@pytest.mark.parametrize("bias_left", [False, True])
def test_lstm_gates_one_gemm_in_node_order(h_first, bias_left):
    """The first MatMul in node order becomes the Gemm, reading the other's output: the Gemm
    takes the Add's place, so the nodes stay sorted without export's toposort."""
    from onnx_graphsurgeon import export_onnx

    from helpers import is_topologically_sorted
    from onnxopt.graph import import_graph

    model = lstm_gates_model(h_first, bias_left)
    graph = import_graph(model)
    result = run_pass(graph, "fuse_matmul_add", model)
    assert result.stats == {"rewritten": 1}
    assert [n.op for n in graph.nodes] == ["MatMul", "Gemm"]
    assert is_topologically_sorted(export_onnx(graph, do_type_check=False).graph)
    fused, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert sorted(ops(fused)) == ["Gemm", "MatMul"]
    assert_same_outputs(model, fused)


TENSOR_REFUSED = {
    "C with a dynamic dim": (dict(c_shape=(3, N), declared=("n", N)), "bias shape unknown"),
    "C rank unknown": (dict(c_shape=(3, N), declared="unknown"), "bias shape unknown"),
    "C [2,M,N] adds a dimension": (dict(c_shape=(2, 3, N)),
                                   "Add broadcasts the product to a higher rank"),
    "C [M,N] with M=1 grows M": (dict(c_shape=(3, N), a_shape=(1, K)),
                                 "Add broadcasts the product to a larger shape"),
    "3-D A": (dict(c_shape=(N,), a_shape=(2, 3, K)), "operands are not both 2-D"),
}


@pytest.mark.parametrize("kwargs,reason", TENSOR_REFUSED.values(), ids=TENSOR_REFUSED.keys())
def test_tensor_bias_refused(kwargs, reason):
    model = tensor_bias_model(**kwargs)
    out, result = run_once(model, "fuse_matmul_add")
    assert result.stats == {"rewritten": 0, "refused": {reason: 1}}
    assert ops(out) == ops(model)
    shapes = {"a": kwargs.get("a_shape", (3, K)), "c": kwargs["c_shape"]}
    assert_same_outputs(model, out, [_feed(shapes)])


def test_tensor_bias_loop_carried_refused():
    """Inside a Loop body a loop-carried value has no static shape (it may change from one
    iteration to the next): ``MatMul(x, W) + h`` with ``h`` carried is refused, while the same
    sum with an outer-scope ``C`` of known shape fuses."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(K, N)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "h_in"], ["h_out"]),
         helper.make_node("MatMul", ["x", "W"], ["xw2"]),
         helper.make_node("Add", ["c", "xw2"], ["z"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [3, N])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [3, N]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, N])])
    model = make_model([helper.make_node("Loop", ["n", "", "h0"], ["h", "zs"], body=body)],
                       [("n", np.int64, []), ("x", np.float32, [3, K]),
                        ("h0", np.float32, [3, N]), ("c", np.float32, [N])],
                       [("h", np.float32, [3, N]), ("zs", np.float32, ["n", 3, N])], {"W": w})
    out, result = run_once(model, "fuse_matmul_add")
    assert result.stats == {"rewritten": 1, "refused": {"bias shape unknown": 1}}
    (body_out,) = [a.g for a in out.graph.node[0].attribute if a.name == "body"]
    assert sorted(ops(body_out)) == ["Add", "Gemm", "Identity", "MatMul"]
    feed = {"n": np.array(3, np.int64), **_feed({"x": (3, K), "h0": (3, N), "c": (N,)})}
    assert_same_outputs(model, out, [feed])


def test_refused_matmul_output_read_elsewhere():
    model = matmul_add_model(extra_outputs=[("t", np.float32, [3, N])])
    _refused(model, "MatMul output is a graph output")
    model = matmul_add_model(extra_nodes=[helper.make_node("Relu", ["t"], ["r"])],
                             extra_outputs=[("r", np.float32, [3, N])])
    _refused(model, "MatMul output has other consumers")


def test_refused_dtypes_differ():
    """An invalid model on purpose (float32 product + float64 bias): the pass must not guess."""
    model = matmul_add_model()
    model.graph.initializer[0].CopyFrom(helper.make_tensor("C", TensorProto.DOUBLE, [N],
                                                           np.ones(N).tolist()))
    out, result = run_once(model, "fuse_matmul_add")
    assert result.stats == {"rewritten": 0, "refused": {"bias dtype differs from the product's": 1}}
    assert ops(out) == ["MatMul", "Add"]


def test_inside_if_branches():
    """Ranks in subgraphs: of branch constants (then), of an outer-scope input (else)."""
    rng = np.random.default_rng(1)
    consts = {"A_in": rng.normal(size=(3, K)).astype(np.float32),
              "B_in": rng.normal(size=(K, N)).astype(np.float32),
              "C_in": rng.normal(size=(N,)).astype(np.float32)}
    then_graph = make_branch([helper.make_node("MatMul", ["A_in", "B_in"], ["ti"]),
                              helper.make_node("Add", ["ti", "C_in"], ["yt"])],
                             [("yt", np.float32, [3, N])], consts, name="then")
    else_graph = make_branch([helper.make_node("MatMul", ["a", "B_out"], ["te"]),
                              helper.make_node("Add", ["te", "C_out"], ["ye"])],
                             [("ye", np.float32, [3, N])], name="else")
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_graph,
                                         else_branch=else_graph)],
                       [("cond", np.bool_, []), ("a", np.float32, [3, K])],
                       [("y", np.float32, [3, N])],
                       {"B_out": consts["B_in"], "C_out": consts["C_in"]})
    out, result = run_once(model, "fuse_matmul_add")
    assert result.stats == {"rewritten": 2}
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert ops(branches["then_branch"]) == ops(branches["else_branch"]) == ["Gemm"]
    a = rng.normal(size=(3, K)).astype(np.float32)
    assert_same_outputs(model, out, [{"cond": np.array(c), "a": a} for c in (True, False)])


def test_stats_are_json_serializable():
    _, result = run_once(matmul_add_model(a_shape=(2, 3, K)), "fuse_matmul_add")
    assert json.loads(json.dumps(result.stats)) == result.stats


@pytest.mark.zoo
@pytest.mark.parametrize("name,gemms", [("ch_ppocr_mobile_v2.0_cls_infer", 1), ("magika", 1)])
def test_real_model(name, gemms):
    """PP-OCR cls: the classifier head ``MatMul([-1, 200], [200, 2]) + [2]`` (the input declares
    dim -1); magika: the 2-D head fuses, the 3-D ``MatMul + [1, 1, 64]`` embedding is refused."""
    onnx_file, npz_file = _zoo_files(name)
    without = [p for p in LOSSLESS_PIPELINE if p != "fuse_matmul_add"]
    _, base = optimize(onnx_file, passes=without, inputs=npz_file)
    _, report = optimize(onnx_file, passes=without + ["fuse_matmul_add"], inputs=npz_file)
    assert report.validation.passed
    assert report.after.op_counts.get("Gemm", 0) == base.after.op_counts.get("Gemm", 0) + gemms
    assert report.after.nodes == base.after.nodes - gemms
