"""Tests of passes/merge_cast.py: Cast pairs through an exact widening merged (bit-identical on
onnxruntime), round trips removed, every refusal refused, If branches, a real model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto as T, helper

from helpers import (all_graphs, make_branch, make_model, ops, output_names, run_once, run_ort,
                     run_passes)
from optimizer import optimize
from passes import LOSSLESS_PIPELINE
from passes.merge_cast import EXACT_WIDENINGS
from tools import zoo

SHAPE = [4, 64]
NP = {T.BOOL: np.bool_, T.UINT8: np.uint8, T.INT8: np.int8, T.UINT16: np.uint16,
      T.INT16: np.int16, T.UINT32: np.uint32, T.INT32: np.int32, T.UINT64: np.uint64,
      T.INT64: np.int64, T.FLOAT16: np.float16, T.FLOAT: np.float32, T.DOUBLE: np.float64}


def _values(elem: int, seed: int = 0) -> np.ndarray:
    """Values spanning the type: extremes, zero, random (and inf/nan/-0 for floats)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(NP[elem])
    if dtype.kind == "b":
        return rng.random(SHAPE) < 0.5
    if dtype.kind == "f":
        v = rng.normal(0, 300, SHAPE).astype(dtype)
        v.flat[:6] = [np.inf, -np.inf, np.nan, -0.0, np.finfo(dtype).max, np.finfo(dtype).tiny]
        return v
    info = np.iinfo(dtype)
    v = rng.integers(info.min, info.max, SHAPE, dtype=dtype, endpoint=True)
    v.flat[:3] = [info.min, info.max, 0]
    return v


def _chain(a: int, b: int, c: int, relu: bool = False):
    """X: a -> [Abs] -> Cast(b) -> Cast(c) -> Y."""
    nodes = [helper.make_node("Abs", ["X"], ["R"])] if relu else []
    nodes += [helper.make_node("Cast", ["R" if relu else "X"], ["B"], to=b),
              helper.make_node("Cast", ["B"], ["Y"], to=c)]
    return make_model(nodes, [("X", a, SHAPE)], [("Y", c, SHAPE)])


def _assert_bit_identical(model, out, elem):
    for seed in (0, 1):
        feed = {"X": _values(elem, seed)}
        ref, got = run_ort(model, feed)["Y"], run_ort(out, feed)["Y"]
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


_MERGED = [(T.INT8, T.INT32, T.FLOAT), (T.INT32, T.INT64, T.DOUBLE), (T.UINT8, T.INT16, T.INT8),
           (T.FLOAT16, T.FLOAT, T.DOUBLE), (T.FLOAT, T.DOUBLE, T.FLOAT16), (T.BOOL, T.INT32, T.FLOAT),
           (T.UINT16, T.INT32, T.FLOAT16), (T.INT16, T.FLOAT, T.INT8), (T.UINT8, T.FLOAT16, T.INT32),
           (T.FLOAT16, T.FLOAT, T.BOOL), (T.INT32, T.DOUBLE, T.FLOAT)]


@pytest.mark.parametrize("a,b,c", _MERGED)
def test_widening_pair_becomes_one_cast(a, b, c):
    model = _chain(a, b, c)
    out, records = run_passes(model, ["merge_cast"])
    assert ops(out) == ["Cast"] and out.graph.node[0].input == ["X"]
    assert records[0].stats["merged"] == 1 and records[0].stats["nodes_removed"] == 1
    _assert_bit_identical(model, out, a)


@pytest.mark.parametrize("a,b", [(T.INT8, T.INT32), (T.FLOAT16, T.FLOAT), (T.FLOAT, T.DOUBLE),
                                 (T.UINT16, T.INT32)])
def test_round_trip_disappears(a, b):
    """A -> B -> A with B wider: both Casts go; Abs now writes the graph output Y."""
    model = _chain(a, b, a, relu=True)
    out, records = run_passes(model, ["merge_cast"])
    assert ops(out) == ["Abs"] and out.graph.node[0].output == ["Y"]
    assert output_names(out) == ["Y"]
    assert records[0].stats["cancelled"] == 1 and records[0].stats["nodes_removed"] == 2
    _assert_bit_identical(model, out, a)


def test_round_trip_on_graph_input_keeps_output_name():
    """Bypassing would make the graph output a graph input: one Cast A -> A remains, named Y."""
    model = _chain(T.FLOAT16, T.FLOAT, T.FLOAT16)
    out, _ = run_passes(model, ["merge_cast"])
    assert ops(out) == ["Cast"] and out.graph.node[0].input == ["X"]
    assert output_names(out) == ["Y"]
    _assert_bit_identical(model, out, T.FLOAT16)


def test_first_cast_with_other_consumer_stays():
    nodes = [helper.make_node("Cast", ["X"], ["B"], to=T.INT32),
             helper.make_node("Cast", ["B"], ["Y"], to=T.FLOAT),
             helper.make_node("Neg", ["B"], ["Z"])]
    model = make_model(nodes, [("X", T.INT8, SHAPE)], [("Y", T.FLOAT, SHAPE), ("Z", T.INT32, SHAPE)])
    out, records = run_passes(model, ["merge_cast"])
    assert ops(out) == ["Cast", "Cast", "Neg"]
    assert next(n for n in out.graph.node if n.output == ["Y"]).input == ["X"]
    assert records[0].stats["nodes_removed"] == 0
    _assert_bit_identical(model, out, T.INT8)


def test_table_only_holds_exact_widenings():
    """Every (A, B) of the table round-trips every value exactly (numpy conversion)."""
    for a, targets in EXACT_WIDENINGS.items():
        for b in targets:
            if a not in NP or b not in NP:
                continue  # bfloat16: no numpy type
            v = _values(a)
            if np.dtype(NP[a]).kind == "f":
                v = v[np.isfinite(v)]
            w = v.astype(NP[b])
            np.testing.assert_array_equal(w.astype(NP[a]), v, err_msg=f"{a}->{b}")
            assert np.array_equal(w.astype(np.float64), v.astype(np.float64)), (a, b)


@pytest.mark.parametrize("a,b,c,reason", [
    (T.FLOAT, T.FLOAT16, T.FLOAT, "not_exact_widening"),
    (T.INT32, T.FLOAT, T.INT64, "not_exact_widening"),
    (T.INT64, T.INT32, T.INT64, "not_exact_widening"),
    (T.UINT16, T.FLOAT16, T.FLOAT, "not_exact_widening"),
    (T.FLOAT16, T.FLOAT, T.INT32, "float_to_integer"),
    (T.FLOAT, T.DOUBLE, T.INT8, "float_to_integer"),
])
def test_refused(a, b, c, reason):
    model = _chain(a, b, c)
    out, result = run_once(model, "merge_cast")
    assert not result.modified and result.stats["refused"] == {reason: 1}
    assert ops(out) == ["Cast", "Cast"]


def test_dtype_of_subgraph_tensor_unknown_refused():
    """In a branch, the first Cast reads a branch-local tensor: its type is not inferred."""
    branch = make_branch([helper.make_node("Abs", ["X"], ["R"]),
                          helper.make_node("Cast", ["R"], ["B"], to=T.INT32),
                          helper.make_node("Cast", ["B"], ["TY"], to=T.INT64)],
                         [("TY", T.INT64, SHAPE)], name="then")
    other = make_branch([helper.make_node("Cast", ["X"], ["EY"], to=T.INT64)],
                        [("EY", T.INT64, SHAPE)], name="else")
    node = helper.make_node("If", ["C"], ["Y"], then_branch=branch, else_branch=other)
    model = make_model([node], [("X", T.INT8, SHAPE), ("C", T.BOOL, [])], [("Y", T.INT64, SHAPE)])
    _, result = run_once(model, "merge_cast")
    assert result.stats["refused"] == {"input_dtype_unknown": 1}


def test_other_attribute_refused():
    nodes = [helper.make_node("Cast", ["X"], ["B"], to=T.FLOAT),
             helper.make_node("Cast", ["B"], ["Y"], to=T.FLOAT8E4M3FN, saturate=1)]
    model = make_model(nodes, [("X", T.FLOAT16, SHAPE)], [("Y", T.FLOAT8E4M3FN, SHAPE)], opset=19)
    _, result = run_once(model, "merge_cast")
    assert result.stats["refused"] == {"attributes": 1}


def test_chain_in_if_branch():
    """The branch's chain reads a main-graph input, whose type is known: merged."""
    branch = make_branch([helper.make_node("Cast", ["X"], ["B"], to=T.INT32),
                          helper.make_node("Cast", ["B"], ["B2"], to=T.INT64),
                          helper.make_node("Cast", ["B2"], ["TY"], to=T.DOUBLE)],
                         [("TY", T.DOUBLE, SHAPE)], name="then")
    other = make_branch([helper.make_node("Cast", ["X"], ["EY"], to=T.DOUBLE)],
                        [("EY", T.DOUBLE, SHAPE)], name="else")
    node = helper.make_node("If", ["C"], ["Y"], then_branch=branch, else_branch=other)
    model = make_model([node], [("X", T.INT8, SHAPE), ("C", T.BOOL, [])], [("Y", T.DOUBLE, SHAPE)])
    out, _ = run_passes(model, ["merge_cast"])
    _, then_out = list(all_graphs(out.graph))[1:]  # attributes sorted by name: else first
    assert ops(then_out) == ["Cast"] and then_out.node[0].input == ["X"]
    for c in (True, False):
        feed = {"X": _values(T.INT8), "C": np.array(c)}
        np.testing.assert_array_equal(run_ort(out, feed)["Y"], run_ort(model, feed)["Y"])


@pytest.mark.zoo
def test_real_model_magika():
    """magika: Cast-heavy shape arithmetic; the pipeline keeps validating with the pass."""
    name = "magika"
    onnx_file, npz_file = zoo.model_path(zoo.DEFAULT_DEST, name), zoo.inputs_path(zoo.DEFAULT_DEST, name)
    if not onnx_file.is_file() or not npz_file.is_file():
        pytest.skip(f"{onnx_file} not fetched (tools/fetch_models.py)")
    _, base = optimize(str(onnx_file), passes=LOSSLESS_PIPELINE, inputs=str(npz_file))
    _, report = optimize(str(onnx_file), passes=LOSSLESS_PIPELINE + ["merge_cast"],
                         inputs=str(npz_file))
    assert report.validation.passed
    assert report.after.nodes <= base.after.nodes
