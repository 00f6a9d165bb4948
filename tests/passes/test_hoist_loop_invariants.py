"""hoist_loop_invariants: Loop/Scan-carried values the body returns unchanged become outer-scope
values; outputs compared with the original on onnxruntime for several trip counts (zero
included), the slot gone from node, body and outputs, and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, run_once, run_ort, run_passes
from onnx import TensorProto as TP
from onnx import helper

from onnxopt.passes import LOSSLESS_PIPELINE

F, I64 = np.float32, np.int64
_RNG = np.random.default_rng(0)
_W = {"W": _RNG.normal(size=(4, 4)).astype(F)}


def _loop_model(identity: bool = False, final_is_output: bool = False,
                twice: bool = False) -> onnx.ModelProto:
    """``h = x; repeat n times: h = tanh(h @ w)`` with ``w`` (from the initializer W) carried
    through the Loop unchanged (returned as is, or through an Identity); the final ``w`` is read
    after the Loop (``W_final * 1``), or is a graph output."""
    body_nodes = [helper.make_node("MatMul", ["h_in", "w_in"], ["hw"]),
                  helper.make_node("Tanh", ["hw"], ["h_out"]),
                  helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    w_out = "w_in"
    if identity:
        body_nodes.append(helper.make_node("Identity", ["w_in"], ["w_copy"]))
        w_out = "w_copy"
    outs = [helper.make_tensor_value_info("cond_out", TP.BOOL, []),
            helper.make_tensor_value_info("h_out", TP.FLOAT, None),
            helper.make_tensor_value_info(w_out, TP.FLOAT, None)]
    if twice:  # a scan output returning the same carried value
        outs.append(helper.make_tensor_value_info("w_in", TP.FLOAT, None))
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TP.INT64, []),
         helper.make_tensor_value_info("cond_in", TP.BOOL, []),
         helper.make_tensor_value_info("h_in", TP.FLOAT, None),
         helper.make_tensor_value_info("w_in", TP.FLOAT, None)], outs)
    loop_outs = ["h_final", "w_final"] + (["w_scan"] if twice else [])
    nodes = [helper.make_node("Loop", ["n", "", "x", "W"], loop_outs, body=body)]
    outputs = [("h_final", F, ["N", 4])]
    if final_is_output:
        outputs.append(("w_final", F, [4, 4]))
    else:
        nodes.append(helper.make_node("Mul", ["w_final", "one"], ["w_seen"]))
        outputs.append(("w_seen", F, [4, 4]))
    return make_model(nodes, [("x", F, ["N", 4]), ("n", I64, [])], outputs,
                      {**_W, "one": np.array(1.0, F)})


def _feeds(batch=(2, 0), trips=(0, 1, 3)):
    return [{"x": _RNG.normal(size=(b, 4)).astype(F), "n": np.array(t, I64)}
            for b in batch for t in trips]


@pytest.mark.parametrize("identity", [False, True])
def test_a_weight_carried_unchanged_is_read_from_the_outer_scope(identity):
    model = _loop_model(identity=identity)
    out, record = run_once(model, "hoist_loop_invariants")
    onnx.checker.check_model(out, full_check=True)
    assert record.stats["rewritten"] == 1 and record.stats["slots_removed"] == 1
    loop = next(n for n in out.graph.node if n.op_type == "Loop")
    body = loop.attribute[0].g
    assert list(loop.input) == ["n", "", "x"] and len(loop.output) == 1
    assert [i.name for i in body.input] == ["i", "cond_in", "h_in"]
    assert [o.name for o in body.output] == ["cond_out", "h_out"]
    matmul = next(n for n in body.node if n.op_type == "MatMul")
    assert matmul.input[1] == "W"  # the initializer, an outer-scope value of the body
    mul = next(n for n in out.graph.node if n.op_type == "Mul")
    assert mul.input[0] == "W"  # the final value is the initial one, zero trips included
    assert_same_outputs(model, out, _feeds())


def test_the_default_pipeline_keeps_the_outputs():
    model = _loop_model(identity=True)
    out, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert_same_outputs(model, out, _feeds())


@pytest.mark.parametrize("kind, reason", [
    ("final_is_output", "its final value is a graph output"),
    ("twice", "another body output returns the same value")])
def test_refusals(kind, reason):
    model = _loop_model(**{kind: True})
    out, record = run_once(model, "hoist_loop_invariants")
    assert record.stats["rewritten"] == 0
    assert record.stats["refused"] == {reason: 1}
    assert out.SerializeToString() == model.SerializeToString() or \
        len(next(n for n in out.graph.node if n.op_type == "Loop").input) == 4


@pytest.mark.parametrize("identity", [False, True])
def test_a_scan_state_returned_unchanged(identity):
    """Scan: state ``w`` returned unchanged, state ``acc`` summed over the rows of ``xs``; the
    outputs against numpy (onnxruntime 1.32 miscomputes the original when the body returns the
    state input itself: ``acc`` is wrong there, right after the rewrite)."""
    body_nodes = [helper.make_node("MatMul", ["row", "w_in"], ["rw"]),
                  helper.make_node("Add", ["acc_in", "rw"], ["acc_out"]),
                  helper.make_node("Identity", ["rw"], ["rw_out"])]
    if identity:
        body_nodes.append(helper.make_node("Identity", ["w_in"], ["w_copy"]))
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("w_in", TP.FLOAT, [4, 4]),
         helper.make_tensor_value_info("acc_in", TP.FLOAT, [4]),
         helper.make_tensor_value_info("row", TP.FLOAT, [4])],
        [helper.make_tensor_value_info("w_copy" if identity else "w_in", TP.FLOAT, [4, 4]),
         helper.make_tensor_value_info("acc_out", TP.FLOAT, [4]),
         helper.make_tensor_value_info("rw_out", TP.FLOAT, [4])])
    nodes = [helper.make_node("Scan", ["W", "acc0", "xs"], ["w_final", "acc", "rows"],
                              body=body, num_scan_inputs=1),
             helper.make_node("Add", ["w_final", "acc"], ["wa"])]
    model = make_model(nodes, [("xs", F, ["T", 4])],
                       [("acc", F, [4]), ("rows", F, ["T", 4]), ("wa", F, [4, 4])],
                       {**_W, "acc0": np.zeros(4, F)})
    out, record = run_once(model, "hoist_loop_invariants")
    onnx.checker.check_model(out, full_check=True)
    assert record.stats["slots_removed"] == 1
    scan = next(n for n in out.graph.node if n.op_type == "Scan")
    assert list(scan.input) == ["acc0", "xs"] and list(scan.output) == ["acc", "rows"]
    for t in (3, 1):  # onnxruntime refuses a Scan over 0 rows
        xs = _RNG.normal(size=(t, 4)).astype(F)
        rows = xs @ _W["W"]
        got = run_ort(out, {"xs": xs})
        np.testing.assert_allclose(got["rows"], rows, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["acc"], rows.sum(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["wa"], _W["W"] + rows.sum(0), rtol=1e-5, atol=1e-6)
        if identity:
            assert_same_outputs(model, out, [{"xs": xs}])
