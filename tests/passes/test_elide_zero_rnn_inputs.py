"""elide_zero_rnn_inputs: RNN/GRU/LSTM initial states, biases and peepholes proven all zeros are
omitted (the spec's default); outputs compared with the original on onnxruntime at several batch
sizes, including the pipeline's removal of the zero-making chain."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, ops, random_feed, run_once, run_passes
from onnx import TensorProto as TP
from onnx import helper

from onnxopt.passes import LOSSLESS_PIPELINE

F, I64 = np.float32, np.int64
T, IN, H = 3, 4, 5  # sequence length, input size, hidden size
_RNG = np.random.default_rng(0)


def _weights(op: str, dirs: int) -> dict[str, np.ndarray]:
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    return {"W": _RNG.normal(size=(dirs, gates * H, IN)).astype(F),
            "R": _RNG.normal(size=(dirs, gates * H, H)).astype(F),
            "B": _RNG.normal(size=(dirs, 2 * gates * H)).astype(F)}


def _torch_zeros(name: str, dirs: int) -> list[onnx.NodeProto]:
    """PyTorch's initial state: ConstantOfShape(Concat([dirs], Unsqueeze(Gather(Shape(x), 1)),
    [H])), sliced as for one layer."""
    return [helper.make_node("Shape", ["x"], [f"{name}_s"]),
            helper.make_node("Gather", [f"{name}_s", "one"], [f"{name}_b"], axis=0),
            helper.make_node("Unsqueeze", [f"{name}_b", "zero1"], [f"{name}_bu"]),
            helper.make_node("Concat", [f"dirs{dirs}", f"{name}_bu", "hid"], [f"{name}_shape"],
                             axis=0),
            helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_all"]),
            helper.make_node("Slice", [f"{name}_all", "zero1", f"dirs{dirs}", "zero1"], [name])]


_SHAPE_CONSTANTS = {"one": np.array(1, I64), "zero1": np.array([0], I64),
                    "dirs1": np.array([1], I64), "dirs2": np.array([2], I64),
                    "hid": np.array([H], I64)}


def _rnn_model(op: str, rnn_inputs: list[str], extra_nodes=(), extra_inits=None, dirs: int = 1,
               extra_outputs=(), **attrs) -> onnx.ModelProto:
    """``x[T, N, IN]`` into one ``op`` reading ``rnn_inputs`` (after X, W, R); outputs Y, Y_h."""
    direction = "bidirectional" if dirs == 2 else "forward"
    rnn = helper.make_node(op, ["x", "W", "R"] + rnn_inputs, ["y", "y_h"], hidden_size=H,
                           direction=direction, **attrs)
    inits = {**_weights(op, dirs), **_SHAPE_CONSTANTS, **(extra_inits or {})}
    used = {i for n in list(extra_nodes) + [rnn] for i in n.input}
    return make_model(list(extra_nodes) + [rnn],
                      [("x", F, [T, "N", IN]), ("h_in", F, [dirs, "N", H])],
                      [("y", F, [T, dirs, "N", H]), ("y_h", F, [dirs, "N", H])]
                      + list(extra_outputs),
                      {k: v for k, v in inits.items() if k in used})


def _feeds(model):
    return [random_feed(model, seed, dim) for seed, dim in ((0, 1), (1, 3), (2, 6))]


def _rnn_inputs(model) -> list[str]:
    (node,) = [n for n in model.graph.node if n.op_type in ("RNN", "GRU", "LSTM",
                                                             "DynamicQuantizeLSTM")]
    return list(node.input)


@pytest.mark.parametrize("op,dirs", [("GRU", 2), ("RNN", 1), ("LSTM", 1)])
def test_computed_zero_initial_state_is_omitted_and_its_chain_removed(op, dirs):
    model = _rnn_model(op, ["B", "", "h0"], _torch_zeros("h0", dirs), dirs=dirs)
    optimized, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert _rnn_inputs(optimized) == ["x", "W", "R", "B"]
    assert ops(optimized) == [op]
    assert_same_outputs(model, optimized, _feeds(model))


def test_lstm_zero_states_bias_and_peepholes_go_sequence_lens_stays():
    """Initial h and c from ``Expand(0, shape)``, B and P zero initializers: inputs 3, 5, 6, 7
    become empty, the trailing ones are dropped, sequence_lens (input 4) stays."""
    expand = [helper.make_node("Shape", ["x"], ["s"]),
              helper.make_node("Gather", ["s", "one"], ["b"], axis=0),
              helper.make_node("Unsqueeze", ["b", "zero1"], ["bu"]),
              helper.make_node("Concat", ["dirs1", "bu", "hid"], ["shape"], axis=0),
              helper.make_node("Expand", ["zero_scalar", "shape"], ["h0"]),
              helper.make_node("Identity", ["h0"], ["c0"]),
              helper.make_node("Gather", ["s", "zero1"], ["t"], axis=0),
              helper.make_node("Expand", ["t", "bu"], ["lens64"]),
              helper.make_node("Cast", ["lens64"], ["lens"], to=TP.INT32)]
    inits = {"B": np.zeros((1, 8 * H), F), "P": np.zeros((1, 3 * H), F),
             "zero_scalar": np.array(0.0, F)}
    model = _rnn_model("LSTM", ["B", "lens", "h0", "c0", "P"], expand, inits)
    optimized, _ = run_passes(model, LOSSLESS_PIPELINE)
    assert _rnn_inputs(optimized)[:3] == ["x", "W", "R"]
    assert [i == "" for i in _rnn_inputs(optimized)[3:]] == [True, False]
    assert "Expand" in ops(optimized)  # sequence_lens is computed
    assert_same_outputs(model, optimized, _feeds(model))


def test_zero_state_also_read_elsewhere_stays_for_that_reader():
    """The RNN input is omitted; the zeros are still computed for the graph output reading
    them."""
    model = _rnn_model("GRU", ["B", "", "h0"], _torch_zeros("h0", 1) + [
        helper.make_node("Neg", ["h0"], ["neg"])], extra_outputs=[("neg", F, [1, "N", H])])
    optimized, records = run_passes(model, LOSSLESS_PIPELINE)
    assert _rnn_inputs(optimized) == ["x", "W", "R", "B"]
    assert "ConstantOfShape" in ops(optimized)
    assert_same_outputs(model, optimized, _feeds(model))


@pytest.mark.parametrize("value,reason", [
    (np.array([1.0], F), "initial_h is a ConstantOfShape of a non-zero value"),
    (np.array([-0.0], F), "initial_h is a ConstantOfShape of a non-zero value"),
])
def test_non_zero_constant_of_shape_is_kept(value, reason):
    nodes = _torch_zeros("h0", 1)
    nodes[4] = helper.make_node("ConstantOfShape", ["h0_shape"], ["h0_all"],
                                value=onnx.numpy_helper.from_array(value))
    model = _rnn_model("GRU", ["B", "", "h0"], nodes)
    optimized, result = run_once(model, "elide_zero_rnn_inputs")
    assert not result.modified
    assert result.stats["refused"] == {reason: 1}
    assert _rnn_inputs(optimized)[5] == "h0"


@pytest.mark.parametrize("state,nodes,reason", [
    ("h_in", [], "initial_h is a graph input"),
    ("h0", [helper.make_node("Mul", ["h_in", "zero_scalar"], ["h0"])],
     "initial_h is computed by Mul"),  # NaN * 0 is NaN: never proven zero
])
def test_states_not_proven_zero_are_kept(state, nodes, reason):
    model = _rnn_model("GRU", ["B", "", state], nodes, {"zero_scalar": np.array(0.0, F)})
    optimized, result = run_once(model, "elide_zero_rnn_inputs")
    assert not result.modified and result.stats["refused"] == {reason: 1}
    assert _rnn_inputs(optimized)[5] == state


def test_non_zero_bias_is_kept_zero_bias_goes():
    model = _rnn_model("RNN", ["B"], (), {})
    _, result = run_once(model, "elide_zero_rnn_inputs")
    assert not result.modified
    zero_b = _rnn_model("RNN", ["B0"], (), {"B0": np.zeros((1, 2 * H), F)})
    optimized, result = run_once(zero_b, "elide_zero_rnn_inputs")
    assert result.stats == {"rewritten": 1, "inputs_omitted": 1}
    assert _rnn_inputs(optimized) == ["x", "W", "R"]
    assert_same_outputs(zero_b, optimized, _feeds(zero_b))


def test_zero_bias_goes_next_to_a_refused_initial_state():
    """Only a node where nothing can be omitted reports the refusal of its initial state."""
    model = _rnn_model("GRU", ["B0", "", "h_in"], (), {"B0": np.zeros((1, 6 * H), F)})
    optimized, result = run_once(model, "elide_zero_rnn_inputs")
    assert result.stats == {"rewritten": 1, "inputs_omitted": 1}
    assert _rnn_inputs(optimized) == ["x", "W", "R", "", "", "h_in"]
    assert_same_outputs(model, optimized, _feeds(model))


def test_dynamic_quantize_lstm_initial_states():
    """com.microsoft::DynamicQuantizeLSTM documents the same defaults for initial_h/initial_c;
    its inputs after P are required, so the omitted ones stay as empty names."""
    w = _RNG.integers(-100, 100, size=(1, IN, 4 * H)).astype(np.int8)
    r = _RNG.integers(-100, 100, size=(1, H, 4 * H)).astype(np.int8)
    inits = {"Wq": w, "Rq": r, "B": _RNG.normal(size=(1, 8 * H)).astype(F),
             "ws": np.array([0.01], F), "wz": np.array([0], np.int8),
             "rs": np.array([0.02], F), "rz": np.array([0], np.int8), **_SHAPE_CONSTANTS}
    node = helper.make_node("DynamicQuantizeLSTM",
                            ["x", "Wq", "Rq", "B", "", "h0", "h0", "", "ws", "wz", "rs", "rz"],
                            ["y", "y_h"], domain="com.microsoft", hidden_size=H)
    nodes = _torch_zeros("h0", 1) + [node]
    used = {i for n in nodes for i in n.input}
    model = make_model(nodes, [("x", F, [T, "N", IN])],
                       [("y", F, [T, 1, "N", H]), ("y_h", F, [1, "N", H])],
                       {k: v for k, v in inits.items() if k in used}, check=False)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    optimized, _ = run_passes(model, LOSSLESS_PIPELINE)
    inputs = _rnn_inputs(optimized)
    assert len(inputs) == 12 and inputs[3:8] == ["B", "", "", "", ""]
    assert ops(optimized) == ["DynamicQuantizeLSTM"]
    assert_same_outputs(model, optimized, [random_feed(model, s, d) for s, d in ((0, 1), (1, 4))])
