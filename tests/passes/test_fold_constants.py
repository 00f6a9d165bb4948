"""Tests of passes/fold_constants.py: what is folded (constant subexpressions, Shape/Size of static
shapes, multi-output nodes, subgraphs), what is not (random ops, QDQ, over-size results), and
generated graphs through the whole lossless pipeline, always compared with onnxruntime on the
original model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import (
    all_initializers,
    assert_same_outputs,
    initializers,
    make_branch,
    make_model,
    ops,
    random_feed,
    random_models,
    run_ort,
    run_passes,
    zoo_files,
)
from hypothesis import given, settings
from onnx import TensorProto, helper

from onnxopt import optimize
from onnxopt.pass_manager import get_pass
from onnxopt.passes import LOSSLESS_PIPELINE, fold_constants

FOLD = ["fold_constants", "eliminate_dead"]


def test_folds_a_chain_of_constant_ops():
    nodes = [helper.make_node("Add", ["A", "B"], ["ab"]),
             helper.make_node("Mul", ["ab", "C"], ["abc"]),
             helper.make_node("Cast", ["abc"], ["abc_d"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["abc_d"], ["k"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "k"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [2, 3])], [("y", np.float32, [2, 3])],
                       {"A": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "B": np.full(3, 0.5, np.float32), "C": np.array(-2.0, np.float32)})
    out, records = run_passes(model, FOLD)
    assert ops(out) == ["Add"]
    assert list(initializers(out)) == ["k"]
    assert sum(r.stats.get("by_kind", {}).get("folded", 0) for r in records) == 4
    assert_same_outputs(model, out)


def test_folds_shape_and_size_of_a_static_input():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Shape", ["x"], ["last"], start=-1),
             helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Reshape", ["x", "s"], ["same"]),
             helper.make_node("ConstantOfShape", ["s"], ["zeros"]),
             helper.make_node("Cast", ["zeros"], ["zf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["same", "zf"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [2, 3, 4])],
                       [("y", np.float32, [2, 3, 4]), ("last", np.int64, [1]),
                        ("n", np.int64, [])], opset=17)
    out, _ = run_passes(model, FOLD)
    assert "Shape" not in ops(out) and "ConstantOfShape" not in ops(out)
    # Shape(start=-1) and Size are graph outputs: they become Constant nodes
    assert sorted(ops(out)) == ["Add", "Constant", "Constant", "Reshape"]
    assert [o.name for o in out.graph.output] == ["y", "last", "n"]
    assert_same_outputs(model, out)


def test_shape_of_a_dynamic_input_is_not_folded():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Expand", ["x", "s"], ["y"])]
    model = make_model(nodes, [("x", np.float32, ["batch", 3])], [("y", np.float32, ["batch", 3])])
    out, _ = run_passes(model, FOLD)
    assert ops(out) == ["Shape", "Expand"]
    assert_same_outputs(model, out, [{"x": np.ones((5, 3), np.float32)}])


def _batch_feeds(model, batches=(1, 3)):
    """Feeds of every input with each of ``batches`` for its dynamic dims."""
    feeds = []
    for b in batches:
        feed = {}
        for i in model.graph.input:
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else b
                    for d in i.type.tensor_type.shape.dim]
            feed[i.name] = np.random.default_rng(b).random(dims).astype(np.float32)
        feeds.append(feed)
    return feeds


def test_static_dims_of_a_dynamic_shape_are_folded():
    """``state[2, batch, 128]``: dim 0 (Gather), dims 2: (Shape start) and the rank (Size of the
    Shape) are constants, dim 1 is not; a condition on dim 0 inlines its If (silero-vad)."""
    then_g = make_branch([helper.make_node("Neg", ["x"], ["t_out"])], [("t_out", np.float32, [2, "batch", 128])])
    else_g = make_branch([helper.make_node("Abs", ["x"], ["e_out"])], [("e_out", np.float32, [2, "batch", 128])])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Squeeze", ["d0", "i0"], ["d0s"]),
             helper.make_node("Equal", ["d0s", "two"], ["is2"]),
             helper.make_node("If", ["is2"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             helper.make_node("Shape", ["x"], ["tail"], start=-1),
             helper.make_node("Size", ["s"], ["rank"]),
             helper.make_node("Slice", ["s", "i0", "i1", "i0"], ["head"]),
             helper.make_node("Concat", ["head", "d1", "tail"], ["dims"], axis=0)]
    model = make_model(nodes, [("x", np.float32, [2, "batch", 128])],
                       [("y", np.float32, [2, "batch", 128]), ("dims", np.int64, [3]), ("rank", np.int64, [])],
                       {"i0": np.array([0], np.int64), "i1": np.array([1], np.int64),
                        "two": np.array(2, np.int64)})
    out, _ = run_passes(model, ["fold_constants", "inline_if", "eliminate_dead"])
    assert sorted(ops(out)) == ["Concat", "Constant", "Gather", "Neg", "Shape"]
    assert_same_outputs(model, out, _batch_feeds(model))


@pytest.mark.parametrize("dim", ["batch", -1])
def test_a_dynamic_dim_is_never_folded(dim):
    """A dim_param, and the -1 some exporters declare for a dynamic dim, are unknown."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Size", ["x"], ["n"])]
    model = make_model(nodes, [("x", np.float32, [dim, 3])],
                       [("d0", np.int64, [1]), ("n", np.int64, [])],
                       {"i0": np.array([0], np.int64)}, check=False)
    out, _ = run_passes(model, FOLD)
    assert sorted(ops(out)) == ["Gather", "Shape", "Size"]
    assert_same_outputs(model, out, _batch_feeds(model))


def test_reshape_shape_with_dims_of_its_data_becomes_constant():
    """``Reshape(x, [dim 0 of x, 12])`` -> ``Reshape(x, [0, 12])`` (0 copies the dim);
    ``Reshape(z, [dim 0 of x, 12])`` -> ``Reshape(z, [-1, 12])`` (the one unknown is inferred);
    two unknowns of another tensor stay computed."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Concat", ["d0", "twelve"], ["s2"], axis=0),
             helper.make_node("Reshape", ["x", "s2"], ["y"]),
             helper.make_node("Reshape", ["z", "s2"], ["y2"]),
             helper.make_node("Concat", ["d0", "d0", "six"], ["s3"], axis=0),
             helper.make_node("Reshape", ["w", "s3"], ["y3"])]
    model = make_model(nodes, [("x", np.float32, ["b", 3, 4]), ("z", np.float32, ["b", 12]),
                               ("w", np.float32, ["b", "b", 6])],
                       [("y", np.float32, ["b", 12]), ("y2", np.float32, ["b", 12]),
                        ("y3", np.float32, ["b", "b", 6])],
                       {"i0": np.array([0], np.int64), "twelve": np.array([12], np.int64),
                        "six": np.array([6], np.int64)})
    out, records = run_passes(model, FOLD)
    assert records[0].stats["by_kind"]["reshape target made constant"] == 2
    shapes = {n.output[0]: initializers(out).get(n.input[1]) for n in out.graph.node
              if n.op_type == "Reshape"}
    assert shapes["y"].tolist() == [0, 12] and shapes["y2"].tolist() == [-1, 12]
    assert shapes["y3"] is None
    assert_same_outputs(model, out, _batch_feeds(model))


def test_partial_values_pass_through_scalars():
    """``Gather(Shape(x), 0)`` with a scalar index is 0-d; the chain after it (Unsqueeze, Concat:
    PyTorch's ``x.reshape(x.size(0), -1)``) still folds to a constant Reshape target."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             helper.make_node("Unsqueeze", ["d0", "axes"], ["d0v"]),
             helper.make_node("Concat", ["d0v", "minus1"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [2, "n", 4])], [("y", np.float32, [2, None])],
                       {"i0": np.array(0, np.int64), "axes": np.array([0], np.int64),
                        "minus1": np.array([-1], np.int64)})
    out, _ = run_passes(model, FOLD)
    assert ops(out) == ["Reshape"]
    assert initializers(out)[out.graph.node[0].input[1]].tolist() == [2, -1]
    for n in (1, 3):
        feed = {"x": np.random.default_rng(n).normal(size=(2, n, 4)).astype(np.float32)}
        assert_same_outputs(model, out, [feed])


def test_folds_multi_output_nodes():
    nodes = [helper.make_node("Split", ["W", "sizes"], ["w0", "w1"], axis=0),
             helper.make_node("Add", ["x", "w0"], ["y0"]),
             helper.make_node("Mul", ["x", "w1"], ["y1"])]
    model = make_model(nodes, [("x", np.float32, [3])], [("y0", np.float32, [1, 3]),
                                                          ("y1", np.float32, [1, 3])],
                       {"W": np.arange(6, dtype=np.float32).reshape(2, 3),
                        "sizes": np.array([1, 1], np.int64)})
    out, _ = run_passes(model, FOLD)
    assert ops(out) == ["Add", "Mul"]
    assert_same_outputs(model, out)


def test_folds_inside_if_branches():
    then_g = make_branch([helper.make_node("Add", ["A", "B"], ["ab"]),
                          helper.make_node("Mul", ["x", "ab"], ["t_out"])],
                         [("t_out", np.float32, [3])],
                         {"A": np.ones(3, np.float32), "B": np.arange(3, dtype=np.float32)})
    else_g = make_branch([helper.make_node("Neg", ["C"], ["e_out"])], [("e_out", np.float32, [3])],
                         {"C": np.full(3, 7.0, np.float32)})
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [("x", np.float32, [3]), ("cond", np.bool_, [])], [("y", np.float32, [3])])
    out, _ = run_passes(model, FOLD)
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert ops(branches["then_branch"]) == ["Mul"]
    assert ops(branches["else_branch"]) == ["Constant"]  # the branch output keeps a node
    x = np.array([1, 2, 3], np.float32)
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])


def test_folds_shape_of_a_static_tensor_inside_an_if_branch():
    """The shape of ``Relu(x)`` computed in the branch is inferred there; the shape of ``x`` read
    from the outer scope too. The dynamic ``d`` keeps its Shape."""
    then_g = make_branch([helper.make_node("Relu", ["x"], ["r"]),
                          helper.make_node("Shape", ["r"], ["s"]),
                          helper.make_node("Shape", ["x"], ["s2"]),
                          helper.make_node("Shape", ["d"], ["sd"]),
                          helper.make_node("Concat", ["s", "s2", "sd"], ["t_out"], axis=0)],
                         [("t_out", np.int64, [5])])
    else_g = make_branch([helper.make_node("Shape", ["d"], ["e0"]),
                          helper.make_node("Concat", ["e0", "e0", "e0", "e0", "e0"], ["e_out"],
                                           axis=0)], [("e_out", np.int64, [5])])
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [("x", np.float32, [2, 3]), ("d", np.float32, ["n"]), ("cond", np.bool_, [])],
                       [("y", np.int64, [5])])
    out, _ = run_passes(model, FOLD)
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert ops(branches["then_branch"]) == ["Shape", "Concat"]
    assert ops(branches["else_branch"]) == ["Shape", "Concat"]
    feeds = [{"x": np.ones((2, 3), np.float32), "d": np.ones(n, np.float32), "cond": np.array(c)}
             for n in (1, 4) for c in (True, False)]
    assert_same_outputs(model, out, feeds)


@pytest.mark.parametrize("op, attrs", [("RandomUniformLike", {}), ("RandomNormalLike", {}),
                                       ("Bernoulli", {})])
def test_random_ops_with_constant_inputs_are_not_folded(op, attrs):
    nodes = [helper.make_node(op, ["P"], ["r"], **attrs), helper.make_node("Add", ["x", "r"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])],
                       {"P": np.full(3, 0.5, np.float32)})
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == [op, "Add"]


def test_random_op_without_inputs_is_not_folded():
    nodes = [helper.make_node("RandomUniform", [], ["r"], shape=[3], dtype=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "r"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [3])], [("y", np.float32, [3])])
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["RandomUniform", "Add"]


def test_dequantize_linear_of_constants_is_kept():
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [1, 4])], [("y", np.float32, [1, 2])],
                       {"q": np.arange(8, dtype=np.int8).reshape(4, 2),
                        "scale": np.array(0.1, np.float32), "zp": np.array(0, np.int8)})
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["DequantizeLinear", "MatMul"]
    assert_same_outputs(model, out)


def test_compressed_storage_marked_in_the_context_is_kept():
    """A node whose output is named in ``PassContext.storage`` (a weight's decompression that a
    lossy pass built) is refused even though every fold is tiny; its unmarked consumer chain
    and the same graph without the mark fold."""
    from onnxopt.pass_manager import PassContext

    nodes = [helper.make_node("Cast", ["idx"], ["i32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["book", "i32"], ["w"], axis=0),
             helper.make_node("Add", ["A", "B"], ["ab"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "ab"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [1, 4])], [("y", np.float32, [1, 2])],
                       {"idx": np.array([[0, 1], [1, 0], [2, 2], [0, 0]], np.uint8),
                        "book": np.array([-1.0, 0.5, 2.0], np.float32),
                        "A": np.ones(2, np.float32), "B": np.ones(2, np.float32)})
    ctx = PassContext(storage={"i32", "w"})
    out, records = run_passes(model, FOLD, ctx)
    assert ops(out) == ["Cast", "Gather", "MatMul", "Add"]  # Add(A, B) folded
    refused = [r.stats.get("refused", {}) for r in records if r.name == "fold_constants"]
    assert refused[0] == {"compressed storage": 1}  # Gather waits for Cast: one refusal
    assert_same_outputs(model, out)
    out, _ = run_passes(model, FOLD)
    assert ops(out) == ["MatMul", "Add"]


def _constant_of_shape_model(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["c"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])),
             helper.make_node("Add", ["x", "c"], ["y"])]
    return make_model(nodes, [("x", np.float32, [1, n])], [("y", np.float32, [n, n])],
                      {"s": np.array([n, n], np.int64)})


def test_constant_of_shape_over_the_size_limit_stays_a_node():
    model = _constant_of_shape_model(600)  # 600 * 600 * 4 bytes > 1 MiB
    out, records = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["ConstantOfShape", "Add"]
    assert out.ByteSize() < 4096
    assert any(r.stats.get("refused", {}).get("over the size limit") for r in records)
    assert_same_outputs(model, out)


def test_constant_of_shape_512x512_float_stays_a_node():
    model = _constant_of_shape_model(512)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["ConstantOfShape", "Add"]
    assert out.ByteSize() < 4096


def test_fold_size_limit_option_is_respected():
    model = _constant_of_shape_model(16)  # 1 KiB
    out, _ = run_passes(model, [get_pass("fold_constants", size_limit=512)])
    assert ops(out) == ["ConstantOfShape", "Add"]
    out, _ = run_passes(model, [get_pass("fold_constants", size_limit=2048)])
    assert ops(out) == ["Add"]
    assert_same_outputs(model, out)


def test_tile_inflating_a_weight_over_the_limit_stays_a_node():
    nodes = [helper.make_node("Tile", ["W", "reps"], ["t"]), helper.make_node("Add", ["x", "t"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [1024, 512])], [("y", np.float32, [1024, 512])],
                       {"W": np.ones((64, 512), np.float32), "reps": np.array([16, 1], np.int64)})
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["Tile", "Add"]


def _transpose_model(extra_use: bool) -> onnx.ModelProto:
    w = np.random.default_rng(0).normal(size=(512, 1024)).astype(np.float32)  # 2 MiB
    nodes = [helper.make_node("Transpose", ["W"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    outputs = [("y", np.float32, [1, 512])]
    if extra_use:
        nodes.append(helper.make_node("MatMul", ["z", "W"], ["y2"]))
        outputs.append(("y2", np.float32, [1, 1024]))
    inputs = [("x", np.float32, [1, 1024])] + ([("z", np.float32, [1, 512])] if extra_use else [])
    return make_model(nodes, inputs, outputs, {"W": w})


def test_transpose_of_a_large_weight_is_folded_and_only_the_transpose_stored():
    model = _transpose_model(extra_use=False)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["MatMul"]
    stored = all_initializers(out)
    assert len(stored) == 1 and list(stored[0].dims) == [1024, 512]
    assert out.ByteSize() < model.ByteSize() + 4096
    np.testing.assert_array_equal(initializers(out)[stored[0].name],
                                  initializers(model)["W"].T)
    # MatMul on a transposed layout sums in another order: float32 rounding differs
    assert_same_outputs(model, out, rtol=1e-4, atol=1e-4)


def test_transpose_of_a_large_shared_weight_does_not_inflate_the_file():
    model = _transpose_model(extra_use=True)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert_same_outputs(model, out, rtol=1e-4, atol=1e-4)
    assert out.ByteSize() <= model.ByteSize() + (1 << 20)


@pytest.mark.parametrize("other_reader", [False, True])
def test_slices_splitting_one_weight_fold_together(other_reader):
    """Two Slices cutting a [512, 128] weight in halves (an LSTM's gates) each add 128 KiB,
    over the per-fold growth limit alone, but free the weight together: both fold. With a
    reader that does not fold (a MatMul of an input), the weight stays and so do they."""
    w = np.arange(512 * 128, dtype=np.float32).reshape(512, 128) / 1e4
    bounds = {"lo": np.array([0]), "mid": np.array([256]), "hi": np.array([512]),
              "axis": np.array([0])}
    nodes = [helper.make_node("Slice", ["W", "lo", "mid", "axis"], ["a"]),
             helper.make_node("Slice", ["W", "mid", "hi", "axis"], ["b"]),
             helper.make_node("Concat", ["a", "b"], ["ab"], axis=0),
             helper.make_node("Add", ["x", "ab"], ["y"])]
    inputs, outputs = [("x", np.float32, [512, 128])], [("y", np.float32, [512, 128])]
    if other_reader:
        nodes.append(helper.make_node("MatMul", ["v", "W"], ["z"]))
        inputs.append(("v", np.float32, [4, 512]))
        outputs.append(("z", np.float32, [4, 128]))
    model = make_model(nodes, inputs, outputs, {"W": w, **bounds})
    out, _ = run_passes(model, FOLD)
    assert ("Slice" in ops(out)) == other_reader
    assert_same_outputs(model, out)


def test_folded_graph_output_keeps_its_name():
    nodes = [helper.make_node("Add", ["A", "B"], ["y"]), helper.make_node("Neg", ["x"], ["z"])]
    model = make_model(nodes, [("x", np.float32, [2])], [("y", np.float32, [2]),
                                                          ("z", np.float32, [2])],
                       {"A": np.ones(2, np.float32), "B": np.ones(2, np.float32)})
    out, _ = run_passes(model, FOLD)
    assert [o.name for o in out.graph.output] == ["y", "z"]
    assert sorted(ops(out)) == ["Constant", "Neg"]
    assert_same_outputs(model, out)


def test_unchanged_graph_reports_not_modified():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", np.float32, [2])],
                       [("y", np.float32, [2])])
    _, records = run_passes(model, ["fold_constants"])
    assert [r.modified for r in records] == [False]


@settings(max_examples=30, deadline=None)
@given(random_models())
def test_generated_graphs_through_the_lossless_pipeline_match_the_original(model):
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert_same_outputs(model, out)
    assert len(out.graph.node) <= len(model.graph.node)


@settings(max_examples=15, deadline=None)
@given(random_models())
def test_generated_graphs_through_fold_constants_alone_match_the_original(model):
    out, _ = run_passes(model, ["fold_constants"])
    assert_same_outputs(model, out)


# Absorbing elements: integer x * 0, x and false, x or true.

def _state_offset_model(sr_shape: list, sr_dtype=np.int64) -> onnx.ModelProto:
    """``y = Relu(x) + Cast(sr * 0, float)``: the pattern of silero-vad's ``stateN``."""
    nodes = [helper.make_node("Mul", ["sr", "zero"], ["m"]),
             helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Add", ["r", "mf"], ["y"])]
    return make_model(nodes, [("x", np.float32, [3, 2]), ("sr", sr_dtype, sr_shape)],
                      [("y", np.float32, [3, 2])],
                      {"zero": np.array(0, np.dtype(sr_dtype))})


def _int_feeds(model, *extremes):
    """Random feeds plus feeds whose integer inputs hold ``extremes`` (overflowing products)."""
    feeds = [random_feed(model, seed) for seed in (0, 1)]
    for v in extremes:
        feed = dict(feeds[0])
        for k, a in feed.items():
            if a.dtype.kind in "iu":
                feed[k] = np.full(a.shape, v, a.dtype)
        feeds.append(feed)
    return feeds


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_integer_times_zero_of_a_static_shape_is_folded(dtype):
    model = _state_offset_model([], dtype)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["Relu"]  # Mul folds, then Cast, then r + 0.0 goes
    info = np.iinfo(dtype)
    assert_same_outputs(model, out, _int_feeds(model, info.max, info.min))


def test_integer_times_zeros_folds_to_the_broadcast_shape():
    nodes = [helper.make_node("Mul", ["zeros", "n"], ["y"]),
             helper.make_node("Add", ["y", "n"], ["z"])]
    model = make_model(nodes, [("n", np.int64, [2, 1])], [("z", np.int64, [2, 3])],
                       {"zeros": np.zeros([1, 3], np.int64)})
    out, _ = run_passes(model, FOLD)
    assert ops(out) == ["Add"]
    assert initializers(out)["y"].shape == (2, 3)
    assert_same_outputs(model, out, _int_feeds(model, np.iinfo(np.int64).max))


def test_integer_times_partly_zero_constant_is_not_folded():
    nodes = [helper.make_node("Mul", ["n", "c"], ["y"])]
    model = make_model(nodes, [("n", np.int64, [3])], [("y", np.int64, [3])],
                       {"c": np.array([0, 2, 0], np.int64)})
    out, _ = run_passes(model, FOLD)
    assert ops(out) == ["Mul"]
    assert_same_outputs(model, out)


def test_float_times_zero_is_not_folded():
    """NaN * 0 and inf * 0 are NaN, -1 * 0 is -0.0: the product depends on x."""
    nodes = [helper.make_node("Mul", ["x", "zero"], ["y"])]
    model = make_model(nodes, [("x", np.float32, [4])], [("y", np.float32, [4])],
                       {"zero": np.array(0.0, np.float32)})
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert ops(out) == ["Mul"]
    x = np.array([np.nan, np.inf, -1.0, 2.0], np.float32)
    assert_same_outputs(model, out, [{"x": x}])
    assert np.isnan(run_ort(out, {"x": x})["y"][:2]).all()


def test_integer_times_zero_of_a_dynamic_shape_is_not_folded():
    model = _state_offset_model(["n"])
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert "Mul" in ops(out)
    assert_same_outputs(model, out)


@pytest.mark.parametrize("op, absorbing, folds", [("And", False, True), ("Or", True, True),
                                                  ("And", True, False), ("Or", False, False)])
def test_and_false_and_or_true_are_folded(op, absorbing, folds):
    nodes = [helper.make_node(op, ["b", "c"], ["y"]), helper.make_node("Xor", ["y", "b"], ["z"])]
    model = make_model(nodes, [("b", np.bool_, [2, 3])], [("z", np.bool_, [2, 3])],
                       {"c": np.array([absorbing] * 3)})
    out, _ = run_passes(model, FOLD)
    assert (op in ops(out)) is not folds
    assert_same_outputs(model, out, [{"b": np.array([[True, False, True], [False, False, True]])}])


@pytest.mark.zoo
def test_real_model_state_offset_is_folded(monkeypatch):
    """silero_vad_16k_op15: ``stateN = Concat(...) + Cast(sr * 0)``: Mul, Cast and Add go."""
    onnx_file, npz_file = zoo_files("silero_vad_16k_op15")
    _, report = optimize(onnx_file, inputs=npz_file)
    monkeypatch.setattr(fold_constants, "_absorbed", lambda *args: False)
    _, base = optimize(onnx_file, inputs=npz_file)
    assert report.validation.passed
    assert report.after.nodes == base.after.nodes - 3
    assert base.after.op_counts["Mul"] == 1 and "Mul" not in report.after.op_counts


# --- the model keeps its size class ---------------------------------------------------------------

def _light_resnet50() -> str:
    import os

    import onnx.backend.test

    return os.path.join(os.path.dirname(onnx.backend.test.__file__), "data", "light",
                        "light_resnet50.onnx")


def test_many_small_folds_do_not_grow_the_model_past_its_size_class(tmp_path):
    """light_resnet50 (78 KiB) generates every weight with a ConstantOfShape; each fold is under
    the per-fold limits, all of them together grew the file to 291 KiB."""
    path = _light_resnet50()
    out = tmp_path / "default.opt.onnx"
    _, report = optimize(path, output=out)
    assert report.validation.passed
    allowed = max(64 << 10, report.before.file_bytes // 10)
    assert report.after.parameter_bytes <= report.before.parameter_bytes + allowed
    assert out.stat().st_size <= report.before.file_bytes + allowed
    refused = [w for w in report.warnings if "folds refused to keep the model's size class" in w]
    assert len(refused) == 1 and "--fold-size-limit" in refused[0]
    records = [r for r in report.passes if r.name == "fold_constants"]
    assert all(r.stats.get("refused", {}).get("would grow the model past its size class")
               for r in records)
    # asked for: a given size limit lifts the bound, and the model grows
    big = tmp_path / "big.opt.onnx"
    _, asked = optimize(path, output=big, fold_size_limit=100 << 20)
    assert asked.validation.passed
    assert big.stat().st_size > out.stat().st_size + allowed
    assert not any("size class" in w for w in asked.warnings)
    folded = sum(r.stats.get("by_kind", {}).get("folded", 0) for r in records)
    assert sum(r.stats.get("by_kind", {}).get("folded", 0) for r in asked.passes
               if r.name == "fold_constants") > folded
    for result in (out, big):
        assert_same_outputs(onnx.load(path), onnx.load(str(result)))


def test_the_size_class_bound_adds_up_folds_and_counts_the_refused():
    """Eight 16 KiB ConstantOfShape weights of a model of a few hundred bytes: the first four
    fit in the 64 KiB all folds may add (a fifth would pass it), the others are refused."""
    nodes, outs = [], []
    for i in range(8):
        nodes += [helper.make_node("ConstantOfShape", ["s"], [f"c{i}"],
                                   value=helper.make_tensor("v", TensorProto.FLOAT, [1], [i + 1.0])),
                  helper.make_node("Add", ["x", f"c{i}"], [f"y{i}"])]
        outs.append((f"y{i}", np.float32, [64, 64]))
    model = make_model(nodes, [("x", np.float32, [1, 64])], outs,
                       {"s": np.array([64, 64], np.int64)})
    out, records = run_passes(model, [get_pass("fold_constants")])
    assert ops(out).count("ConstantOfShape") == 4
    first = records[0]
    assert first.stats["refused"]["would grow the model past its size class"] == 4
    (warning,) = [w for r in records for w in r.warnings]
    assert "4 folds refused" in warning and f"{4 * 64 * 64 * 4} bytes" in warning
    assert_same_outputs(model, out)
    out, records = run_passes(model, [get_pass("fold_constants", size_limit=1 << 20)])
    assert "ConstantOfShape" not in ops(out) and not any(r.warnings for r in records)
    assert_same_outputs(model, out)


def test_a_constant_of_shape_over_the_size_limit_is_refused_before_it_is_computed(monkeypatch):
    computed = []
    real = fold_constants.evaluate_node

    def spy(node, *args, **kwargs):
        computed.append(node.op)
        return real(node, *args, **kwargs)

    monkeypatch.setattr(fold_constants, "evaluate_node", spy)
    model = _constant_of_shape_model(600)
    out, records = run_passes(model, [get_pass("fold_constants")])
    assert ops(out) == ["ConstantOfShape", "Add"] and "ConstantOfShape" not in computed
    assert records[0].stats["refused"] == {"over the size limit": 1}
