"""Tests of optimizer/evaluate.py: one node evaluated by onnxruntime, as constant folding uses it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxopt.evaluate import evaluate_node


def _graph(opset=17):
    return gs.Graph(opset=opset)


def test_node_of_constants_and_explicit_values():
    a = gs.Constant("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    node = gs.Node("Transpose", inputs=[a], outputs=[gs.Variable("t")], attrs={"perm": [1, 0]})
    (value,) = evaluate_node(node, _graph())
    np.testing.assert_array_equal(value, a.values.T)
    (value,) = evaluate_node(node, _graph(), [np.ones((1, 2), np.float32)])
    assert value.shape == (2, 1)


def test_omitted_optional_inputs_and_rejection():
    x = gs.Constant("x", np.array([[1.0, -2.0]], np.float32))
    node = gs.Node("Clip", inputs=[x, gs.Variable.empty(), gs.Constant("hi", np.array(0.5, np.float32))],
                   outputs=[gs.Variable("y")])
    (value,) = evaluate_node(node, _graph())
    np.testing.assert_array_equal(value, [[0.5, -2.0]])
    bad = gs.Node("Reshape", inputs=[x, gs.Constant("s", np.array([3], np.int64))],
                  outputs=[gs.Variable("r")])
    with pytest.raises(Exception):
        evaluate_node(bad, _graph())
