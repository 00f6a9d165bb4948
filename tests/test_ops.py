"""Tests of optimizer/ops.py: the op facts table gives each weight's channel axes and tells
weights from shapes, indices, scales and statistics."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxopt.ops import (OPS, facts, input_channel_axis, output_channel_axis,
                         weight_initializers)


def _node(op, attrs=None, domain=""):
    return gs.Node(op, attrs=attrs or {}, domain=domain)


@pytest.mark.parametrize("op,attrs,index,rank,out_axis,in_axis", [
    ("MatMul", {}, 1, 2, 1, 0),                      # B[K, N]
    ("MatMul", {}, 1, 3, 2, 1),                      # batched B[b, K, N]
    ("MatMul", {}, 0, 2, 0, 1),                      # constant A[M, K]
    ("MatMul", {}, 1, 1, None, None),                # 1-D operand
    ("Gemm", {}, 1, 2, 1, 0),                        # B[K, N]
    ("Gemm", {"transB": 1}, 1, 2, 0, 1),             # B[N, K]
    ("Gemm", {}, 0, 2, 0, 1),                        # A[M, K]
    ("Gemm", {"transA": 1}, 0, 2, 1, 0),             # A[K, M]
    ("Conv", {"group": 2}, 1, 4, 0, 1),              # W[M, C/group, kh, kw]
    ("ConvTranspose", {"group": 2}, 1, 4, 1, 0),     # W[C, M/group, kh, kw]
    ("Gather", {}, 0, 2, 0, 1),                      # table[V, D]
])
def test_channel_axes_follow_the_operator_specs(op, attrs, index, rank, out_axis, in_axis):
    node = _node(op, attrs)
    assert output_channel_axis(node, index, rank) == out_axis
    assert input_channel_axis(node, index, rank) == in_axis


def test_roles_of_inputs():
    assert facts(_node("BatchNormalization")).statistics == {3, 4}
    assert facts(_node("Reshape")).shapes == {1}
    assert facts(_node("Gather")).indices == {1}
    assert facts(_node("DequantizeLinear")).scales == {1, 2}
    assert facts(_node("Conv")).biases == {2}
    assert facts(_node("Conv", domain="com.microsoft")).weights == {}  # other domains: no facts
    assert output_channel_axis(_node("Relu"), 0, 2) is None


def test_weight_initializers_only_weights_of_the_asked_kinds():
    w = gs.Constant("W", np.ones((4, 3), np.float32))
    table = gs.Constant("T", np.ones((10, 4), np.float32))
    shared = gs.Constant("S", np.ones((3, 3), np.float32))
    shape = gs.Constant("shape", np.array([2, 6], np.int64))
    x, ids = gs.Variable("x", np.float32, (2, 4)), gs.Variable("ids", np.int64, (2,))
    y, e, z, r, a = (gs.Variable(n, np.float32) for n in "yezra")
    nodes = [gs.Node("MatMul", inputs=[x, w], outputs=[y]),
             gs.Node("Gather", inputs=[table, ids], outputs=[e]),
             gs.Node("MatMul", inputs=[y, shared], outputs=[z]),
             gs.Node("Add", inputs=[z, shared], outputs=[a]),   # S is also read by an Add
             gs.Node("Reshape", inputs=[a, shape], outputs=[r])]
    graph = gs.Graph(nodes=nodes, inputs=[x, ids], outputs=[r, e])
    assert {t.name for t in weight_initializers(graph, frozenset({"matrix"}))} == {"W"}
    assert {t.name for t in weight_initializers(graph, frozenset({"matrix", "table"}))} == \
        {"W", "T"}


def test_every_weight_slot_has_both_axes():
    for op, f in OPS.items():
        for index, slot in f.weights.items():
            node = _node(op)
            assert slot.kind in ("matrix", "kernel", "table", "recurrent"), op
            assert output_channel_axis(node, index, 3) is not None, (op, index)
            assert input_channel_axis(node, index, 3) is not None, (op, index)
