"""Tests of passes/dedup_initializers.py: byte-equal initializers of one dtype and shape merge
(also across subgraphs); a different dtype, shape or one byte keeps them apart; compared with
onnxruntime on the original model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from onnx import helper, numpy_helper

from helpers import (all_initializers, assert_same_outputs, make_branch, make_model, random_models, run_once, run_passes)

PASS = ["dedup_initializers", "eliminate_dead"]


def _two_adds(a: np.ndarray, b: np.ndarray, shape=(3,)):
    nodes = [helper.make_node("Add", ["x", "A"], ["ya"]), helper.make_node("Add", ["x", "B"], ["yb"])]
    return make_model(nodes, [("x", a.dtype, list(shape))],
                      [("ya", a.dtype, list(np.broadcast_shapes(shape, a.shape))),
                       ("yb", b.dtype, list(np.broadcast_shapes(shape, b.shape)))],
                      {"A": a, "B": b})


def test_equal_initializers_are_merged():
    w = np.random.default_rng(0).normal(size=(3,)).astype(np.float32)
    model = _two_adds(w, w.copy())
    out, records = run_passes(model, PASS)
    assert [i.name for i in all_initializers(out)] == ["A"]
    assert records[0].stats == {"initializers_merged": 1, "bytes_saved": 12}
    assert_same_outputs(model, out)


def test_equal_nan_payloads_merge_but_signed_zeros_do_not():
    nan = np.array([np.nan, 1, 2], np.float32)
    assert run_once(_two_adds(nan, nan.copy()), "dedup_initializers")[1].modified
    zeros = np.zeros(3, np.float32)
    neg = -zeros
    out, result = run_once(_two_adds(zeros, neg), "dedup_initializers")
    assert not result.modified
    assert_same_outputs(_two_adds(zeros, neg), out)


def test_initializers_differing_in_dtype_are_not_merged():
    a = np.array([1, 2, 3], np.int32)
    b = a.view(np.float32).copy()  # same bytes, other dtype
    nodes = [helper.make_node("Add", ["i", "A"], ["ya"]), helper.make_node("Add", ["x", "B"], ["yb"])]
    model = make_model(nodes, [("i", np.int32, [3]), ("x", np.float32, [3])],
                       [("ya", np.int32, [3]), ("yb", np.float32, [3])], {"A": a, "B": b})
    out, result = run_once(model, "dedup_initializers")
    assert not result.modified
    assert_same_outputs(model, out)


@pytest.mark.parametrize("shape_a, shape_b", [((), (1,)), ((1,), (1, 1)), ((2, 3), (3, 2)),
                                              ((6,), (2, 3))])
def test_initializers_differing_in_shape_with_the_same_bytes_are_not_merged(shape_a, shape_b):
    size = int(np.prod(shape_a))
    a = np.arange(size, dtype=np.float32).reshape(shape_a) + 1
    b = a.reshape(shape_b).copy()
    model = _two_adds(a, b, shape=())  # a scalar x: each output has its initializer's shape
    out, result = run_once(model, "dedup_initializers")
    assert not result.modified
    stored = {i.name: list(i.dims) for i in all_initializers(out)}
    assert stored == {"A": list(shape_a), "B": list(shape_b)}
    assert_same_outputs(model, out)


def test_initializers_differing_by_one_byte_are_not_merged():
    a = np.random.default_rng(1).normal(size=(256,)).astype(np.float32)
    b = a.copy()
    b.view(np.uint8)[517] ^= 1
    model = _two_adds(a, b, shape=(256,))
    out, result = run_once(model, "dedup_initializers")
    assert not result.modified
    assert_same_outputs(model, out)


def test_three_copies_and_two_groups():
    u = np.full(4, 2.0, np.float32)
    v = np.full(4, 3.0, np.float32)
    nodes = [helper.make_node("Add", ["x", n], [f"y{n}"]) for n in ("U1", "V1", "U2", "V2", "U3")]
    model = make_model(nodes, [("x", np.float32, [4])], [(f"y{n}", np.float32, [4]) for n in
                                                         ("U1", "V1", "U2", "V2", "U3")],
                       {"U1": u, "V1": v, "U2": u, "V2": v, "U3": u})
    out, records = run_passes(model, PASS)
    assert sorted(i.name for i in all_initializers(out)) == ["U1", "V1"]
    assert records[0].stats["initializers_merged"] == 3
    assert_same_outputs(model, out)


def test_equal_initializers_of_two_if_branches_are_stored_once():
    w = np.random.default_rng(2).normal(size=(256,)).astype(np.float32)
    then_g = make_branch([helper.make_node("Add", ["x", "Wt"], ["t_out"])],
                         [("t_out", np.float32, [256])], {"Wt": w})
    else_g = make_branch([helper.make_node("Mul", ["x", "We"], ["e_out"])],
                         [("e_out", np.float32, [256])], {"We": w.copy()})
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [("x", np.float32, [256]), ("cond", np.bool_, [])], [("y", np.float32, [256])])
    out, _ = run_passes(model, PASS)
    stored = all_initializers(out)
    assert len(stored) == 1
    assert out.ByteSize() < model.ByteSize() - 900
    x = np.random.default_rng(3).normal(size=256).astype(np.float32)
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])


def test_main_graph_initializer_equal_to_a_branch_initializer():
    w = np.arange(8, dtype=np.float32)
    then_g = make_branch([helper.make_node("Add", ["x", "Wt"], ["t_out"])], [("t_out", np.float32, [8])],
                         {"Wt": w.copy()})
    else_g = make_branch([helper.make_node("Neg", ["x"], ["e_out"])], [("e_out", np.float32, [8])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["y", "W"], ["z"])]
    model = make_model(nodes, [("x", np.float32, [8]), ("cond", np.bool_, [])],
                       [("z", np.float32, [8])], {"W": w})
    out, _ = run_passes(model, PASS)
    assert [i.name for i in all_initializers(out)] == ["W"]
    x = np.arange(8, dtype=np.float32) - 3
    assert_same_outputs(model, out, [{"x": x, "cond": np.array(c)} for c in (True, False)])


@settings(max_examples=20, deadline=None)
@given(random_models())
def test_generated_graphs_through_dedup_match_the_original(model):
    out, _ = run_passes(model, PASS)
    assert_same_outputs(model, out)
    values = [numpy_helper.to_array(i) for i in all_initializers(out)]
    keys = [(v.dtype.str, v.shape, v.tobytes()) for v in values]
    assert len(keys) == len(set(keys))
