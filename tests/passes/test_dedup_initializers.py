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
    assert records[0].stats == {"initializers_merged": 1, "transposes_shared": 0,
                                "bytes_saved": 12}
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


# ------------------------------------------------------------------ a weight beside its transpose

_V, _D = 1024, 256  # E[V, D] float32: exactly 1 MiB, the default transpose_min_bytes


def _tied_embeddings(head_first: bool = False, v: int = _V, d: int = _D, seed: int = 4):
    """ids -> Gather(E) -> Relu -> MatMul(., E^T) -> logits: tied embeddings stored twice (E and
    its transpose, as exporters write them); with ``head_first`` the MatMul weight is W[D, V]
    and the table is W^T, read after it."""
    e = np.random.default_rng(seed).normal(size=(v, d)).astype(np.float32)
    table, head = ("E", "H") if not head_first else ("T", "W")
    nodes = [helper.make_node("Gather", [table, "ids"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", head], ["logits"])]
    inits = {table: e, head: np.ascontiguousarray(e.T)}
    if head_first:  # the head's weight is read first: it is kept, the table is its transpose
        nodes = [helper.make_node("MatMul", ["x", head], ["first"]), *nodes]
    inputs = [("ids", np.int64, ["B", "S"])] + ([("x", np.float32, ["B", d])] if head_first else [])
    outputs = [("logits", np.float32, ["B", "S", v])]
    if head_first:
        outputs.append(("first", np.float32, ["B", v]))
    return make_model(nodes, inputs, outputs, inits)


def _feeds(model, v: int = _V):
    rng = np.random.default_rng(5)
    feeds = []
    for b, s in ((1, 3), (2, 1), (0, 2)):
        feed = {"ids": rng.integers(0, v, size=(b, s)).astype(np.int64)}
        if any(i.name == "x" for i in model.graph.input):
            feed["x"] = rng.normal(size=(b, _D)).astype(np.float32)
        feeds.append(feed)
    return feeds


def test_tied_embeddings_stored_once_through_the_default_pipeline():
    from onnxopt.passes import LOSSLESS_PIPELINE

    model = _tied_embeddings()
    out, records = run_passes(model, LOSSLESS_PIPELINE)
    assert [i.name for i in all_initializers(out)] == ["E"]
    assert [n.op_type for n in out.graph.node].count("Transpose") == 1
    assert out.ByteSize() < model.ByteSize() - _V * _D * 4 + 1024
    dedup = [r.stats for r in records if r.name == "dedup_initializers" and r.modified]
    assert dedup == [{"initializers_merged": 0, "transposes_shared": 1,
                      "bytes_saved": _V * _D * 4}]
    folded = [r.stats.get("refused", {}) for r in records if r.name == "fold_constants"]
    assert any("compressed storage" in r for r in folded)  # the Transpose stays a node
    # same weights bit for bit, but onnxruntime prepacks a constant MatMul weight and not a
    # computed one: the sums over D terms are ordered differently
    assert_same_outputs(model, out, _feeds(model), rtol=1e-5, atol=1e-4)


def test_matmul_weight_first_keeps_it_and_the_table_reads_its_transpose():
    model = _tied_embeddings(head_first=True)
    out, records = run_passes(model, PASS)
    assert [i.name for i in all_initializers(out)] == ["W"]
    assert records[0].stats["transposes_shared"] == 1
    assert_same_outputs(model, out, _feeds(model), rtol=1e-5, atol=1e-4)


def test_transpose_below_the_threshold_is_kept_unless_asked():
    from onnxopt.pass_manager import get_pass

    model = _tied_embeddings(v=64, d=16)
    out, result = run_once(model, "dedup_initializers")
    assert not result.modified and len(all_initializers(out)) == 2
    out, result = run_once(model, get_pass("dedup_initializers", transpose_min_bytes=1024))
    assert result.stats["transposes_shared"] == 1
    assert result.stats["bytes_saved"] == 64 * 16 * 4
    assert_same_outputs(model, out, _feeds(model, v=64), rtol=0, atol=0)


@pytest.mark.parametrize("min_bytes", [0, 1024, 4096])
def test_a_small_shared_transpose_is_not_folded_back(min_bytes):
    """Below fold_constants' growth limit (64 KiB) a shared Transpose of a tensor with other
    readers would be folded back every round, and sharing redone: the two passes undid each
    other until max_iterations. Its output is marked as storage, so any threshold is stable."""
    from onnxopt.pass_manager import get_pass
    from onnxopt.passes import LOSSLESS_PIPELINE

    model = _tied_embeddings(v=64, d=32)  # 8 KiB
    passes = [get_pass("dedup_initializers", transpose_min_bytes=min_bytes)
              if n == "dedup_initializers" else get_pass(n) for n in LOSSLESS_PIPELINE]
    out, records = run_passes(model, passes)
    changed = [(r.name, r.iteration) for r in records
               if r.modified and r.name in ("dedup_initializers", "fold_constants")]
    assert changed == [("dedup_initializers", 0)]
    assert max(r.iteration for r in records) == 1  # a fixed point after one quiet round
    assert [i.name for i in all_initializers(out)] == ["E"]
    assert [n.op_type for n in out.graph.node].count("Transpose") == 1
    assert_same_outputs(model, out, _feeds(model, v=64), rtol=1e-5, atol=1e-4)


def test_square_transposes_and_other_permutations():
    from onnxopt.pass_manager import get_pass

    rng = np.random.default_rng(6)
    a = rng.normal(size=(8, 8)).astype(np.float32)
    sym = (a + a.T).astype(np.float32)
    cube = rng.normal(size=(2, 3, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", n], [f"y{n}"]) for n in ("A", "AT", "S", "ST")]
    nodes += [helper.make_node("Add", ["c", n], [f"y{n}"]) for n in ("C", "CT")]
    outputs = [(f"y{n}", np.float32, [2, 8]) for n in ("A", "AT", "S", "ST")]
    outputs += [("yC", np.float32, [2, 3, 4]), ("yCT", np.float32, [4, 3, 2])]
    model = make_model(nodes, [("x", np.float32, [2, 8]), ("c", np.float32, [])], outputs,
                       {"A": a, "AT": np.ascontiguousarray(a.T), "S": sym,
                        "ST": np.ascontiguousarray(sym.T), "C": cube,
                        "CT": np.ascontiguousarray(cube.transpose(2, 1, 0))})
    out, result = run_once(model, get_pass("dedup_initializers", transpose_min_bytes=0))
    # a symmetric matrix is its own duplicate; A^T is a transpose; rank 3 is never shared
    assert result.stats == {"initializers_merged": 1, "transposes_shared": 1,
                            "bytes_saved": 2 * 8 * 8 * 4}
    assert sorted(i.name for i in all_initializers(out)) == ["A", "C", "CT", "S"]
    assert_same_outputs(model, out)


def test_overridable_initializer_is_not_shared():
    from onnxopt.pass_manager import get_pass

    model = _tied_embeddings(v=64, d=16)
    model.graph.input.append(helper.make_tensor_value_info("H", 1, [16, 64]))
    out, result = run_once(model, get_pass("dedup_initializers", transpose_min_bytes=0))
    assert not result.modified


def test_sharing_waits_while_a_lossy_pass_is_pending():
    from onnxopt.pass_manager import PassContext, get_pass

    model = _tied_embeddings(v=64, d=16)
    ctx = PassContext(template=model)
    ctx.lossy_pending = True  # set by the pass manager before a quantization pass runs
    out, result = run_once(model, get_pass("dedup_initializers", transpose_min_bytes=0), ctx)
    assert result.stats["transposes_shared"] == 0 and len(all_initializers(out)) == 2
