"""Tests of optimizer/analyses/types.py's TensorTypes: dtypes and shapes from ONNX shape inference in the main
graph and in If/Loop bodies, keyed by tensor object (sibling branches reusing a name keep their own
results), declared value_info and subgraph shapes never believed, loop-carried shapes unknown,
large initializers kept out of the inference model, sequences and optionals told from tensors;
symbolic dims and the refinements (a Reshape's -1 whose symbols cancel, position embeddings,
Range, Expand to a Where-computed target) checked against onnxruntime's shapes at batch 0 and
other lengths."""

from __future__ import annotations

import numpy as np
import pytest
import onnx
import onnx_graphsurgeon as gs
from helpers import make_branch, make_model, run_ort
from onnx import TensorProto as TP
from onnx import helper

import onnxopt
from onnxopt.graph import import_graph, iter_graphs
from onnxopt.analyses import infer_tensor_types, TensorTypes
from onnxopt.analyses.types import _InferenceModel

F, I64 = np.float32, np.int64


def _tensors(graph: gs.Graph, scope: str) -> dict[str, gs.Tensor]:
    """The tensors produced in the (sub)graph named ``scope``, by name."""
    (g,) = [g for g in iter_graphs(graph) if g.name == scope]
    return {t.name: t for n in g.nodes for t in n.outputs}


def _if_model(then_nodes, then_out, else_nodes, else_out, inits=None, declared=(7,)):
    """``If(cond)`` over ``x: float[2, 3]``; the branch outputs are declared with the wrong shape
    ``declared``."""
    then = make_branch(then_nodes, [(then_out, F, list(declared))], inits or {}, name="then")
    other = make_branch(else_nodes, [(else_out, F, list(declared))], name="else")
    return make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                      [("x", F, [2, 3]), ("cond", np.bool_, [])], [("y", F, list(declared))],
                      check=False)


def test_if_branch_tensors_get_inferred_types_not_declared_ones():
    model = _if_model([helper.make_node("Relu", ["x"], ["r"]),
                       helper.make_node("Cast", ["r"], ["c"], to=TP.DOUBLE),
                       helper.make_node("Unsqueeze", ["r", "axes"], ["t"])], "t",
                      [helper.make_node("Neg", ["x"], ["e"])], "e",
                      {"axes": np.array([0], I64)})
    graph = import_graph(model)
    types = TensorTypes(graph, model)
    then = _tensors(graph, "then")
    assert types.shape(then["r"]) == (2, 3) and types.dtype(then["r"]) == np.float32
    assert types.dtype(then["c"]) == np.float64
    assert types.shape(then["t"]) == (1, 2, 3)  # the branch output declares [7]
    assert types.static_shape(_tensors(graph, "else")["e"]) == (2, 3)
    assert types.rank(then["t"]) == 3


def test_sibling_branches_reusing_a_name_keep_their_own_results():
    """Without import_graph's renaming both branches have a tensor ``t``, of different shapes."""
    model = _if_model([helper.make_node("Unsqueeze", ["x", "axes"], ["t"])], "t",
                      [helper.make_node("Neg", ["x"], ["t"])], "t", {"axes": np.array([0], I64)})
    graph = gs.import_onnx(model)
    types = TensorTypes(graph, model)
    then_t, else_t = _tensors(graph, "then")["t"], _tensors(graph, "else")["t"]
    assert then_t is not else_t
    assert types.shape(then_t) == (1, 2, 3) and types.shape(else_t) == (2, 3)


def test_loop_carried_values_have_no_shape_outer_values_keep_theirs():
    """``v`` starts as [3] (and the body input declares [3]) but shrinks each iteration."""
    body = helper.make_graph(
        [helper.make_node("Neg", ["v"], ["w"]),
         helper.make_node("Slice", ["w", "one", "big"], ["v_next"]),
         helper.make_node("Identity", ["cond"], ["cond_out"]),
         helper.make_node("Add", ["i", "i"], ["ii"]),
         helper.make_node("Relu", ["x"], ["outer"])],
        "body", [helper.make_tensor_value_info("i", TP.INT64, []),
                 helper.make_tensor_value_info("cond", TP.BOOL, []),
                 helper.make_tensor_value_info("v", TP.FLOAT, [3])],
        [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
         helper.make_tensor_value_info("v_next", TP.FLOAT, [3]),
         helper.make_tensor_value_info("outer", TP.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(np.array([1], I64), "one"),
         onnx.numpy_helper.from_array(np.array([2**62], I64), "big")])
    model = make_model([helper.make_node("Loop", ["m", "", "v0"], ["y", "scans"], body=body)],
                       [("x", F, [2, 3]), ("m", I64, []), ("v0", F, [3])],
                       [("y", F, [3]), ("scans", F, [2, 2, 3])], check=False)
    graph = import_graph(model)
    types = TensorTypes(graph, model)
    (loop_body,) = [g for g in iter_graphs(graph) if g.name == "body"]
    produced = _tensors(graph, "body")
    for t in loop_body.inputs:
        assert types.shape(t) is None
    assert [types.dtype(t) for t in loop_body.inputs] == [np.int64, np.bool_, np.float32]
    assert types.shape(produced["w"]) is None and types.dtype(produced["w"]) == np.float32
    assert types.rank(produced["v_next"]) is None
    assert types.shape(produced["outer"]) == (2, 3)


def test_large_initializers_are_typed_inputs_of_the_inference_model():
    w = np.ones((3, 2048), F)
    model = _if_model([helper.make_node("MatMul", ["x", "W"], ["t"])], "t",
                      [helper.make_node("Neg", ["x"], ["e"])], "e", {"W": w})
    graph = import_graph(model)
    built = _InferenceModel(graph, model).model
    assert all(init.name != "W" for g in [built.graph] + [a.g for a in built.graph.node[0].attribute]
               for init in g.initializer)
    assert "W" in [i.name for i in built.graph.input]
    assert TensorTypes(graph, model).shape(_tensors(graph, "then")["t"]) == (2, 2048)


def test_tensors_made_after_inference_are_unknown_initializers_always_known():
    model = _if_model([helper.make_node("Relu", ["x"], ["t"])], "t",
                      [helper.make_node("Neg", ["x"], ["e"])], "e")
    graph = import_graph(model)
    types = TensorTypes(graph, model)
    assert types.shape(_tensors(graph, "then")["t"]) == (2, 3)
    assert types.shape(gs.Variable("late", F, (2, 3))) is None
    assert types.shape(gs.Constant("k", np.zeros((4, 1), I64))) == (4, 1)
    assert types.dtype(gs.Constant("k", np.zeros((4, 1), I64))) == np.int64


def test_infer_tensor_types_is_the_main_graph_by_name():
    model = _if_model([helper.make_node("Relu", ["x"], ["t"])], "t",
                      [helper.make_node("Neg", ["x"], ["e"])], "e")
    graph = import_graph(model)
    types = infer_tensor_types(graph, model)
    assert types["x"] == (np.dtype(F), (2, 3)) and types["cond"] == (np.dtype(np.bool_), ())
    assert "t" not in types and "e" not in types
    assert types["y"] == (np.dtype(F), (2, 3))  # declared [7]


def test_kind_tells_tensors_from_sequences_and_optionals_in_every_scope():
    """Values that are not tensors have a kind and no dtype or shape; a custom op's output has
    no kind (inference does not know the op)."""
    then = make_branch([helper.make_node("SequenceConstruct", ["x", "x"], ["branch_seq"]),
                        helper.make_node("SequenceAt", ["branch_seq", "i"], ["then_y"])],
                       [("then_y", F, [2, 3])], name="then")
    other = make_branch([helper.make_node("Neg", ["x"], ["else_y"])], [("else_y", F, [2, 3])],
                        name="else")
    model = make_model(
        [helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
         helper.make_node("SequenceAt", ["seq", "i"], ["at"]),
         helper.make_node("Optional", ["x"], ["opt"]),
         helper.make_node("OptionalGetElement", ["opt"], ["got"]),
         helper.make_node("Foo", ["x"], ["custom"], domain="test.custom"),
         helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [("x", F, [2, 3]), ("cond", np.bool_, [])],
        [("at", F, None), ("got", F, None), ("custom", F, None), ("y", F, None)],
        {"i": np.array(1, I64)}, opset=18, check=False)
    model.opset_import.append(helper.make_opsetid("test.custom", 1))
    graph = import_graph(model)
    types = TensorTypes(graph, model)
    out = {t.name: t for n in graph.nodes for t in n.outputs}
    assert types.kind(out["seq"]) == "sequence" and types.kind(out["opt"]) == "optional"
    assert types.dtype(out["seq"]) is None and types.shape(out["opt"]) is None
    assert types.kind(out["at"]) == types.kind(out["got"]) == "tensor"
    assert types.shape(out["got"]) == (2, 3) and types.dtype(out["at"]) == np.float32
    assert types.kind(graph.inputs[0]) == "tensor"
    assert types.kind(gs.Constant("k", np.zeros(2, F))) == "tensor"
    assert types.kind(out["custom"]) is None
    branch = _tensors(graph, "then")
    assert types.kind(branch["branch_seq"]) == "sequence" and types.kind(branch["then_y"]) == "tensor"


def _pool(x, y, **attrs):
    return helper.make_node("MaxPool", [x], [y], kernel_shape=[2, 2], strides=[2, 2], **attrs)


_SAME = {"auto_pad": "SAME_UPPER"}
_WEIGHTS = {"W": np.ones((4, 3, 1, 1), F), "K": np.ones((7, 5), F), "W1d": np.ones((4, 3, 1), F),
            "WT": np.ones((3, 2, 2, 2), F), "up": np.array([1, 1, 2, 2], F),
            "sizes": np.array([2, 3, 8, 8], I64), "s": np.array([-1], I64),
            "e": np.array([-100], I64), "a1": np.array([1], I64), "neg": np.array([-1], I64)}


_DISPUTED_CASES = {
    "pool: batch and channels": ([_pool("x", "y", **_SAME)], ("N", 3, None, None)),
    "ceil_mode pool": ([_pool("x", "y", ceil_mode=1)], ("N", 3, None, None)),
    "conv channels from the weight": (
        [helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2])],
        ("N", 4, None, None)),
    "conv transpose": ([helper.make_node("ConvTranspose", ["x", "WT"], ["y"], group=3)],
                       ("N", 6, None, None)),
    "a valid conv after a disputed pool": (
        [_pool("x", "p", **_SAME), helper.make_node("Conv", ["p", "W"], ["y"])],
        ("N", 4, None, None)),
    "transpose carries the certain dims": (
        [_pool("x", "p", **_SAME), helper.make_node("Transpose", ["p"], ["y"], perm=[0, 2, 3, 1])],
        ("N", None, None, 3)),
    "flatten of unknown spatial dims": (
        [_pool("x", "p", **_SAME), helper.make_node("Flatten", ["p"], ["y"], axis=1)],
        ("N", None)),
    "matmul ends in the weight's dim": (
        [_pool("x", "p", **_SAME), helper.make_node("MatMul", ["p", "K"], ["y"])],
        ("N", 3, None, 5)),
    "elementwise broadcast with a static dim": (
        [_pool("x", "p", **_SAME), helper.make_node("Add", ["p", "K"], ["y"])],
        ("N", 3, 7, 5)),
    "squeeze without axes: no rank": (  # inferred [1, 3, 1, 1] would give [3]
        [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[6, 6], strides=[6, 6], **_SAME),
         helper.make_node("ReduceMax", ["p"], ["r"], axes=[0]),
         helper.make_node("Squeeze", ["r"], ["y"])], None),
    "resize: the scaled axes": (
        [helper.make_node("Resize", ["x", "", "up"], ["y"])], ("N", 3, None, None)),
    "resize to sizes": ([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"])],
                        (None, None, None, None)),
    "reversed slice: the sliced axis": (
        [helper.make_node("Slice", ["x", "s", "e", "a1", "neg"], ["y"])], ("N", None, 6, 6)),
    "no kernel_shape, weight not constant: no shape": (
        [helper.make_node("Conv", ["x", "Wx"], ["y"], auto_pad="SAME_UPPER")], None),
}


@pytest.mark.parametrize("nodes,expected", _DISPUTED_CASES.values(), ids=_DISPUTED_CASES)
def test_disputed_nodes_keep_the_rank_and_the_certain_dims(nodes, expected):
    """Only the dims ONNX inference may compute differently from onnxruntime are unknown, and
    those computed from them; ``N`` is a declared symbol (unknown), 6x6 spatial dims would be
    3x3 if believed."""
    model = make_model(nodes, [("x", F, ["N", 3, 6, 6]), ("Wx", F, [4, 3, 1, 1])], [("y", F, None)],
                       _WEIGHTS, check=False)
    graph = import_graph(model)
    (y,) = [t for n in graph.nodes for t in n.outputs if t.name == "y"]
    expected = None if expected is None else tuple(None if d == "N" else d for d in expected)
    assert TensorTypes(graph, model).shape(y) == expected


def test_disputed_node_in_a_branch_keeps_the_certain_dims():
    model = _if_model([helper.make_node("Unsqueeze", ["x", "axes"], ["u"]),
                       helper.make_node("Unsqueeze", ["u", "axes"], ["u4"]),
                       helper.make_node("MaxPool", ["u4"], ["t"], kernel_shape=[1, 2],
                                        auto_pad="SAME_UPPER")], "t",
                      [helper.make_node("Neg", ["x"], ["e"])], "e", {"axes": np.array([0], I64)})
    graph = import_graph(model)
    assert TensorTypes(graph, model).shape(_tensors(graph, "then")["t"]) == (1, 1, None, None)


def _dynamic_quantize_lstm_model(direction: str, tail=(), outputs=None):
    """``com.microsoft::DynamicQuantizeLSTM`` over ``x[T, N, 4]``, hidden size 5, then ``tail``."""
    dirs, hidden = (2 if direction == "bidirectional" else 1), 5
    rng = np.random.default_rng(0)
    inits = {"W": rng.integers(-50, 50, (dirs, 4, 4 * hidden)).astype(np.int8),
             "R": rng.integers(-50, 50, (dirs, hidden, 4 * hidden)).astype(np.int8),
             "ws": np.full(dirs, 0.01, F), "rs": np.full(dirs, 0.02, F),
             "z": np.zeros(dirs, np.int8), "axis": np.array([3], I64)}
    lstm = helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "", "", "", "", "", "ws", "z",
                                                    "rs", "z"], ["y", "y_h", "y_c"],
                            domain="com.microsoft", hidden_size=hidden, direction=direction)
    model = make_model([lstm] + list(tail), [("x", F, ["T", "N", 4])],
                       outputs or [("y", F, None), ("y_h", F, None), ("y_c", F, None)], inits,
                       check=False)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


@pytest.mark.parametrize("direction,dirs", [("forward", 1), ("bidirectional", 2)])
def test_dynamic_quantize_lstm_has_the_shapes_of_lstm(direction, dirs):
    model = _dynamic_quantize_lstm_model(direction, [
        helper.make_node("Transpose", ["y"], ["t"], perm=[0, 2, 1, 3]),
        helper.make_node("Flatten", ["y_h"], ["f"], axis=2)])
    graph = import_graph(model)
    types = TensorTypes(graph, model)
    out = {t.name: t for n in graph.nodes for t in n.outputs}
    assert types.shape(out["y"]) == (None, dirs, None, 5)
    assert types.shape(out["y_h"]) == types.shape(out["y_c"]) == (dirs, None, 5)
    assert types.dtype(out["y"]) == np.float32
    assert types.shape(out["t"]) == (None, None, dirs, 5)  # downstream inferred too
    assert types.shape(out["f"]) == (None, 5)


def test_shape_of_dynamic_quantize_lstm_output_folds():
    """Shape(Y)[3] is ``hidden_size``: folded, and the outputs are the original's."""
    model = _dynamic_quantize_lstm_model("forward", [
        helper.make_node("Shape", ["y"], ["s"]),
        helper.make_node("Gather", ["s", "axis"], ["h"], axis=0)], [("h", I64, [1])])
    optimized, report = onnxopt.optimize(model, inputs={"x": np.ones((3, 2, 4), F)})
    assert report.validation.passed
    assert [n.op_type for n in optimized.graph.node] == ["Constant"]
    x = np.random.default_rng(1).random((6, 3, 4), np.float32)
    assert run_ort(optimized, {"x": x})["h"].tolist() == run_ort(model, {"x": x})["h"].tolist() \
        == [5]


def _claims_hold(model: onnx.ModelProto, feeds) -> dict[str, tuple]:
    """Every dim :class:`TensorTypes` claims for a tensor of ``model`` -- an int, or a symbol that
    names one size wherever it appears -- checked against the shapes onnxruntime computes for
    each feed (the tensors made outputs); a feed the model fails on claims nothing. Returns the
    symbolic shapes by tensor name."""
    graph = import_graph(model)
    types = TensorTypes(graph, model)
    claims = {name: (types.symbolic_shape(t), types.dtype(t))
              for name, t in graph.tensors().items()
              if not isinstance(t, gs.Constant) and types.symbolic_shape(t) is not None}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
        for name, (_, dtype) in claims.items() if name not in known)
    checked = 0
    for feed in feeds:
        try:
            got = run_ort(exposed, feed)
        except Exception:  # noqa: BLE001 -- the model fails on this input: nothing to check
            continue
        checked += 1
        values: dict[str, int] = {}
        for name, (shape, _) in claims.items():
            assert len(got[name].shape) == len(shape), name
            for dim, actual in zip(shape, got[name].shape):
                assert dim is None or (dim == actual if isinstance(dim, int)
                                       else values.setdefault(dim, actual) == actual), name
    assert checked
    return {name: shape for name, (shape, _) in claims.items()}


def _x_feeds(*shapes):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=s).astype(F)} for s in shapes]


@pytest.mark.parametrize("allowzero", [0, 1])
def test_minus_one_resolved_when_the_symbols_cancel(allowzero):
    """``x[s, 10, 12]`` to ``[Shape(x)[0], -1, 3, 4]``: the -1 is 10 (s cancels), for batch 0 too
    (allowzero 1: onnxruntime divides the non-zero dims; allowzero 0: it fails there), and
    ``Shape(y)[1]`` is then static."""
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s0"], start=0, end=1),
         helper.make_node("Concat", ["s0", "rest"], ["target"], axis=0),
         helper.make_node("Reshape", ["x", "target"], ["y"], allowzero=allowzero),
         helper.make_node("Relu", ["y"], ["r"])],
        [("x", F, ["s", 10, 12])], [("r", F, None)],
        {"rest": np.array([-1, 3, 4], I64)}, opset=17, check=False)
    shapes = _claims_hold(model, _x_feeds((3, 10, 12), (0, 10, 12), (1, 10, 12)))
    assert shapes["y"] == shapes["r"] == ("s", 10, 3, 4)


@pytest.mark.parametrize("x_shape,target", [
    (["s", "t", 12], [-1, 3, 4]),      # -1 = t: not a number
    (["s", 10, 12], [-1, 7, 4]),       # 120 / 28: not an integer
])
def test_minus_one_left_unknown(x_shape, target):
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s0"], start=0, end=1),
         helper.make_node("Concat", ["s0", "rest"], ["target"], axis=0),
         helper.make_node("Reshape", ["x", "target"], ["y"])],
        [("x", F, x_shape)], [("y", F, None)], {"rest": np.array(target, I64)}, opset=17,
        check=False)
    graph = import_graph(model)
    y = {t.name: t for n in graph.nodes for t in n.outputs}["y"]
    assert TensorTypes(graph, model).shape(y)[1] is None


def _embedding_model():
    """``ids[b, s]``: token embeddings plus position embeddings ``P[:, :s]`` (an 8-row table, so
    ``min(s, 8)`` rows), a ``Range(0, b, 1)``, and the sum reshaped to ``[b, s, -1, 2]``."""
    nodes = [
        helper.make_node("Shape", ["ids"], ["b1"], start=0, end=1),
        helper.make_node("Shape", ["ids"], ["s1"], start=1, end=2),
        helper.make_node("Slice", ["positions", "zero", "s1", "one"], ["pos"]),
        helper.make_node("Gather", ["table", "pos"], ["pe"]),
        helper.make_node("Gather", ["table", "ids"], ["te"]),
        helper.make_node("Add", ["te", "pe"], ["h"]),
        helper.make_node("Squeeze", ["b1", "zero"], ["b0"]),
        helper.make_node("Range", ["zero0", "b0", "one0"], ["rows"]),
        helper.make_node("Concat", ["b1", "s1", "minus1_2"], ["target"], axis=0),
        helper.make_node("Reshape", ["h", "target"], ["heads"])]
    inits = {"positions": np.arange(8, dtype=I64)[None], "table": np.ones((16, 4), F),
             "zero": np.array([0], I64), "one": np.array([1], I64), "zero0": np.array(0, I64),
             "one0": np.array(1, I64), "minus1_2": np.array([-1, 2], I64)}
    return make_model(nodes, [("ids", I64, ["b", "s"])],
                      [("heads", F, None), ("rows", I64, None)], inits, opset=17, check=False)


def test_position_embeddings_keep_the_sequence_dim():
    """``te[b, s, 4] + pe[1, min(s, 8), 4]`` is ``[b, s, 4]`` wherever it runs (``s > 8``
    fails), ``Range(0, b, 1)`` is ``[b]``, and the Reshape's -1 is 2."""
    rng = np.random.default_rng(0)
    feeds = [{"ids": rng.integers(0, 16, size=s).astype(I64)}
             for s in ((2, 3), (0, 5), (1, 8), (2, 1), (1, 0), (3, 9))]
    shapes = _claims_hold(_embedding_model(), feeds)
    assert shapes["pe"] == (1, shapes["pos"][1], 4)  # dim 0 kept by the Slice
    assert shapes["h"] == ("b", "s", 4)
    assert shapes["rows"] == ("b",)
    assert shapes["heads"] == ("b", "s", 2, 2)


def test_shape_value_of_shape_arithmetic():
    graph = import_graph(_embedding_model())
    types = TensorTypes(graph, _embedding_model())
    tensors = graph.tensors()
    assert types.shape_value(tensors["target"]) == ("b", "s", -1, 2)
    assert types.shape_value(tensors["b0"]) == ("b",)
    assert types.shape_value(tensors["h"]) is None  # not shape arithmetic


def test_expand_to_a_target_kept_by_where():
    """torch's ``mask.expand(b, -1, s, s)``: ``Where(Equal(t, -1), 1, t)`` of ``t = [b, -1, s,
    s]`` is ``[b, 1, s, s]`` (a dim is never -1), which ONNX's data propagation does not see;
    the Expand of ``mask[b, 1, 1, s]`` is then ``[b, 1, s, s]``."""
    nodes = [helper.make_node("Shape", ["ids"], ["b1"], start=0, end=1),
             helper.make_node("Shape", ["ids"], ["s1"], start=1, end=2),
             helper.make_node("Concat", ["b1", "minus1", "s1", "s1"], ["t"], axis=0),
             helper.make_node("Equal", ["t", "minus1"], ["e"]),
             helper.make_node("Where", ["e", "one", "t"], ["target"]),
             helper.make_node("Unsqueeze", ["ids", "axes"], ["mask"]),
             helper.make_node("Expand", ["mask", "target"], ["y"])]
    inits = {"minus1": np.array([-1], I64), "one": np.array([1], I64),
             "axes": np.array([1, 2], I64)}
    model = make_model(nodes, [("ids", I64, ["b", "s"])], [("y", I64, None)], inits, opset=17,
                       check=False)
    rng = np.random.default_rng(0)
    feeds = [{"ids": rng.integers(0, 5, size=s).astype(I64)} for s in ((2, 3), (0, 4), (3, 1))]
    assert _claims_hold(model, feeds)["y"] == ("b", 1, "s", "s")
