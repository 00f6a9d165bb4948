"""Tests of passes/fuse_space_to_depth.py: the Focus block (four strided Slices concatenated on the
channels) becomes SpaceToDepth -- alone, with the channel order folded into a Conv, or with a
Gather -- and the model computes what the original computes on onnxruntime, for every order of
the four slices; odd sizes fail as the original fails; each refusal is refused and counted; If
branches; a real model through the pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from helpers import (all_graphs, assert_same_outputs, make_branch, make_model, ops, run_once,
                     run_ort, run_passes, with_and_without)
from onnx import TensorProto, helper


BIG = np.iinfo(np.int64).max
YOLO = [(0, 0), (1, 0), (0, 1), (1, 1)]  # YOLOv5's order: blocks 0, 2, 1, 3
C, M = 3, 4
_ANY4 = ["n", "c", "h", "w"]  # declared output shapes are not read by the pass


def _focus(x_shape=(1, C, 8, 10), offsets=YOLO, reader="conv", dtype=np.float32, axes=(2, 3),
           concat_axis=1, steps=(2, 2), ends=(BIG, BIG), group=1, same_x=True, extra_reader=False):
    """x -> four Slices (``offsets`` (h0, w0) on ``axes``) -> Concat -> reader -> y.

    ``reader``: "conv" (3x3, ``group``, weight initializer), "conv_input" (weight a graph
    input), "relu" or None (the Concat is the output)."""
    rng = np.random.default_rng(0)
    inits = {"axes": np.array(axes, np.int64), "steps": np.array(steps, np.int64),
             "ends": np.array(ends, np.int64)}
    inputs = [("x", dtype, list(x_shape) if x_shape is not None else None)]
    nodes = []
    if not same_x:
        inputs.append(("x2", dtype, list(x_shape)))
    for j, (h0, w0) in enumerate(offsets):
        start = [h0, w0] if axes[0] % 4 == 2 else [w0, h0]
        inits[f"s{j}"] = np.array(start, np.int64)
        src = "x2" if not same_x and j == 3 else "x"
        nodes.append(helper.make_node("Slice", [src, f"s{j}", "ends", "axes", "steps"], [f"f{j}"]))
    nodes.append(helper.make_node("Concat", [f"f{j}" for j in range(4)], ["cat"],
                                  axis=concat_axis))
    outputs = [("y", dtype, _ANY4)]
    if reader in ("conv", "conv_input"):
        channels = 4 * x_shape[1]
        inits["b"] = rng.normal(size=M).astype(dtype)
        w = rng.normal(size=(M, channels // group, 3, 3)).astype(dtype)
        if reader == "conv":
            inits["w"] = w
        else:
            inputs.append(("w", dtype, list(w.shape)))
        nodes.append(helper.make_node("Conv", ["cat", "w", "b"], ["y"], pads=[1, 1, 1, 1],
                                      group=group))
    elif reader == "relu":
        nodes.append(helper.make_node("Relu", ["cat"], ["y"]))
    else:
        nodes[-1].output[0] = "y"
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["f0"], ["z"]))
        outputs.append(("z", dtype, _ANY4))
    return make_model(nodes, inputs, outputs, inits, check=False)


def _feeds(model, shapes=((1, C, 8, 10),)):
    rng = np.random.default_rng(1)
    feeds = []
    for shape in shapes:
        feed = {}
        for inp in model.graph.input:
            if inp.name in {i.name for i in model.graph.initializer}:
                continue
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
            feed[inp.name] = rng.normal(size=shape if inp.name.startswith("x") else dims) \
                .astype(dtype) * 4
        feeds.append(feed)
    return feeds


@pytest.mark.parametrize("offsets", list(itertools.permutations(YOLO)))
def test_every_order_with_gather(offsets):
    """Every order of the four blocks, read by a Relu: SpaceToDepth and (unless in block order) a
    Gather; values exact."""
    model = _focus(offsets=offsets, reader="relu")
    out, records = run_passes(model, ["fuse_space_to_depth"])
    in_order = list(offsets) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert ops(out) == (["SpaceToDepth", "Relu"] if in_order
                        else ["SpaceToDepth", "Gather", "Relu"])
    form = "space_to_depth" if in_order else "gather"
    assert records[0].stats["rewritten"] == 1 and records[0].stats["by_kind"] == {form: 1}
    assert len(out.graph.node) == len(model.graph.node) - (4 if in_order else 3)
    assert_same_outputs(model, out, _feeds(model), rtol=0, atol=0)


@pytest.mark.parametrize("offsets", list(itertools.permutations(YOLO)))
def test_focus_into_conv(offsets):
    """The channel order moves into the Conv's weight: SpaceToDepth -> Conv, 4 nodes fewer (every
    order: YOLOv5's is its own inverse, a 4-cycle is not)."""
    model = _focus(offsets=offsets)
    out, records = run_passes(model, ["fuse_space_to_depth"])
    assert ops(out) == ["SpaceToDepth", "Conv"]
    in_order = list(offsets) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert records[0].stats["by_kind"] == {"space_to_depth" if in_order else "into_conv": 1}
    assert_same_outputs(model, out, _feeds(model), atol=1e-4)  # outputs ~100: summation order


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.uint8])
def test_other_dtypes(dtype):
    model = _focus(reader=None, dtype=dtype)
    out, _ = run_passes(model, ["fuse_space_to_depth"])
    assert ops(out) == ["SpaceToDepth", "Gather"]
    feed = {"x": np.arange(240).reshape(1, C, 8, 10).astype(dtype)}
    assert_same_outputs(model, out, [feed], rtol=0, atol=0)


@pytest.mark.parametrize("axes", [(-2, -1), (3, 2)])
def test_negative_and_swapped_axes(axes):
    model = _focus(axes=axes, reader="relu", concat_axis=-3)
    out, _ = run_passes(model, ["fuse_space_to_depth"])
    assert ops(out) == ["SpaceToDepth", "Gather", "Relu"]
    assert_same_outputs(model, out, _feeds(model), rtol=0, atol=0)


@pytest.mark.parametrize("reader, group", [("conv", 2), ("conv_input", 1)])
def test_conv_that_cannot_take_the_order_gets_a_gather(reader, group):
    """A grouped Conv mixes only within groups, a weight that is a graph input cannot be
    permuted: the Gather stays."""
    model = _focus(reader=reader, group=group)
    out, records = run_passes(model, ["fuse_space_to_depth"])
    assert ops(out) == ["SpaceToDepth", "Gather", "Conv"]
    assert records[0].stats["by_kind"] == {"gather": 1}
    assert_same_outputs(model, out, _feeds(model), atol=1e-4)


def _fails(model, feed):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    with pytest.raises(Exception):
        sess.run(None, feed)


@pytest.mark.parametrize("shape", [(1, C, 7, 10), (1, C, 8, 9), (1, C, 1, 2)])
def test_odd_size_refused(shape):
    """Odd sizes: the original fails (onnxruntime's Concat skips the empty slices of a size-1
    axis and returns 12 channels, where SpaceToDepth would fail): nothing is rewritten."""
    model = _focus(x_shape=shape, reader="relu")
    out, result = run_once(model, "fuse_space_to_depth")
    assert result.stats["refused"] == {"odd size": 1} and ops(out) == ops(model)
    if 1 not in shape:
        _fails(model, _feeds(model, [shape])[0])


@pytest.mark.parametrize("reader", ["conv", "relu"])
def test_dynamic_size_refused(reader):
    """H, W dynamic: at H = 1 or W = 1 the original runs on onnxruntime and SpaceToDepth would
    not (shown here), so dynamic sizes are refused."""
    model = _focus(x_shape=(1, C, "H", "W"), reader=reader)
    out, result = run_once(model, "fuse_space_to_depth")
    assert result.stats["refused"] == {"size unknown": 1} and ops(out) == ops(model)
    feed = _feeds(model, [(1, C, 1, 2)])[0]
    assert run_ort(model, feed)["y"].shape[:2] == (1, M if reader == "conv" else 4 * C)
    s2d = make_model([helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)],
                     [("x", np.float32, [1, C, "H", "W"])], [("y", np.float32, _ANY4)])
    _fails(s2d, feed)


def test_in_if_branch():
    then = make_branch([helper.make_node("Slice", ["x", f"s{j}", "ends", "axes", "steps"],
                                         [f"f{j}"]) for j in range(4)]
                       + [helper.make_node("Concat", [f"f{j}" for j in range(4)], ["ty"],
                                           axis=1)],
                       [("ty", np.float32, _ANY4)],
                       {**{f"s{j}": np.array(o, np.int64) for j, o in enumerate(YOLO)},
                        "ends": np.array([BIG, BIG]), "axes": np.array([2, 3]),
                        "steps": np.array([2, 2])}, name="then")
    other = make_branch([helper.make_node("SpaceToDepth", ["x"], ["ey"], blocksize=2)],
                        [("ey", np.float32, _ANY4)], name="else")
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=then,
                                         else_branch=other)],
                       [("x", np.float32, [1, C, 8, 10]), ("c", TensorProto.BOOL, [])],
                       [("y", np.float32, _ANY4)], check=False)
    out, _ = run_passes(model, ["fuse_space_to_depth"])
    then_out = next(g for g in all_graphs(out.graph) if g.name == "then")
    assert ops(then_out) == ["SpaceToDepth", "Gather"]
    x = np.random.default_rng(0).normal(size=(1, C, 8, 10)).astype(np.float32)
    assert_same_outputs(model, out, [{"x": x, "c": np.array(True)}, {"x": x, "c": np.array(False)}],
                        rtol=0, atol=0)


NOT_FOCUS = "slice is not a focus slice"
REFUSED = [
    ("steps_3", dict(steps=(3, 3), x_shape=(1, C, 6, 6)), NOT_FOCUS),
    ("starts_2_3", dict(offsets=[(h + 2, w + 2) for h, w in YOLO]), NOT_FOCUS),
    ("same_block_twice", dict(offsets=[(0, 0), (1, 0), (0, 1), (0, 1)]), NOT_FOCUS),
    ("end_short_of_dim", dict(ends=(6, BIG)), NOT_FOCUS),
    ("axes_1_2", dict(axes=(1, 2), x_shape=(1, 4, 8, 10), reader="relu"), NOT_FOCUS),
    ("slice_read_elsewhere", dict(extra_reader=True), "slice read elsewhere"),
    ("rank_unknown", dict(x_shape=None, reader="relu"), "size unknown"),
    ("channels_unknown", dict(x_shape=(1, "C", 8, 10), reader="relu"), "channels unknown"),
    ("dtype_int64", dict(dtype=np.int64, reader=None), "dtype not supported"),
]


@pytest.mark.parametrize("kwargs, reason", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused(kwargs, reason):
    model = _focus(**kwargs)
    out, result = run_once(model, "fuse_space_to_depth")
    assert sorted(ops(out)) == sorted(ops(model))
    assert not result.modified and result.stats["refused"] == {reason: 1}
    shape = kwargs.get("x_shape") or (1, C, 8, 10)
    shape = tuple(d if isinstance(d, int) else C for d in shape)
    feeds = _feeds(model, [shape])
    for name, value in run_ort(model, feeds[0]).items():
        np.testing.assert_array_equal(run_ort(out, feeds[0])[name], value)


def test_not_a_focus_block_is_not_counted():
    """Four Slices of two different tensors: not a candidate at all (no refusal)."""
    model = _focus(same_x=False, reader="relu")
    _, result = run_once(model, "fuse_space_to_depth")
    assert not result.modified and "refused" not in result.stats
    assert ops(model).count("Slice") == 4


@pytest.mark.zoo
def test_real_model_ddddocr_det():
    """ddddocr's YOLOv5-style detector: its Focus block becomes SpaceToDepth -> Conv."""
    (_, base), (out, report) = with_and_without("ddddocr_common_det", "fuse_space_to_depth")
    assert report.after.nodes == base.after.nodes - 4
    assert "SpaceToDepth" in ops(out) and "Slice" not in ops(out)
