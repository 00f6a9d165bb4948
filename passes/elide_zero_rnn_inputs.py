"""Zero RNN inputs are the default: omit an initial state, bias or peephole that is all zeros.

ONNX spec, RNN/GRU/LSTM (every opset): ``B`` (input 3), ``initial_h`` (input 5), ``initial_c``
(input 6, LSTM) and ``P`` (input 7, LSTM) are optional, and "if not specified - assumed to be 0".
onnxruntime's ``com.microsoft::DynamicQuantizeLSTM`` documents the same for its ``initial_h`` and
``initial_c`` (same slots). Exporters nevertheless compute the zeros, typically with the batch size
read at run time (PyTorch: ``ConstantOfShape(Concat([num_directions], Unsqueeze(Gather(Shape(x),
1)), [hidden_size]))``, sliced per layer; TensorFlow converters: ``Expand(0, shape)``), and a zero
tensor of static shape becomes an initializer. Such an input is replaced by the empty name (its
producers are left to ``eliminate_dead``, which removes them unless something else reads them), and
empty inputs at the end of the list are dropped, as ONNX allows for trailing optional inputs.

A tensor is *provably all zeros* when it is an initializer of zeros, a Constant or ConstantOfShape
of zeros (ConstantOfShape's ``value`` defaults to float 0), or the output of an op that only
moves, repeats or casts the elements of its data inputs -- Identity, Reshape, Flatten, Transpose,
Squeeze, Unsqueeze, Slice, Gather, Tile, Expand (input 0), Concat (every input), Cast and CastLike
(0 casts to 0, false, +0.0) -- when those inputs are provably all zeros. Zeros of any shape
qualify: if the shape is not the one the spec requires (``[num_directions, batch_size,
hidden_size]``), the original model fails at run time and the rewritten one runs, which is the only
direction in which results may differ. Floating zeros must be +0.0: -0.0 would change the sign of
some zero results. A bias of zeros and no bias give the same sums (``v + 0 = v`` for every v except
-0.0, whose sum is +0.0: the sign of a zero only).

Statistics: ``rewritten`` (nodes with inputs omitted), ``inputs_omitted`` and ``refused``: a node
where nothing could be omitted, with the reason of its first initial state not proven zero
(``initial_h is a graph input``, say). Non-zero biases and peepholes are the common case and are
not reported, nor are the other inputs of a node some of whose inputs were omitted.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

#: Default-domain ops -> {input index: spec name} of the inputs whose omission means zeros.
_ZERO_DEFAULTS = {
    "RNN": {3: "B", 5: "initial_h"},
    "GRU": {3: "B", 5: "initial_h"},
    "LSTM": {3: "B", 5: "initial_h", 6: "initial_c", 7: "P"},
}
#: The same for ops of the com.microsoft domain.
_CONTRIB_ZERO_DEFAULTS = {"DynamicQuantizeLSTM": {5: "initial_h", 6: "initial_c"}}

#: Ops whose output elements are copies (or casts) of elements of the listed data inputs
#: (None: every input).
_COPYING_OPS = {"Identity": (0,), "Reshape": (0,), "Flatten": (0,), "Transpose": (0,),
                "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,), "Gather": (0,), "Tile": (0,),
                "Expand": (0,), "Cast": (0,), "CastLike": (0,), "Concat": None}

#: How many producers a proof may go through (exporters' chains are a handful long).
_MAX_DEPTH = 32


def _all_zero(values) -> bool:
    """Whether ``values`` is a numeric or boolean array of zeros, +0.0 for floats."""
    array = np.asarray(values)
    if array.dtype.kind not in "biufc":
        return False
    if not np.all(array == 0):
        return False
    return array.dtype.kind not in "fc" or not np.any(np.signbit(np.real(array)))


def _constant_node_value(node: gs.Node):
    """The value of a Constant node (any of its value attributes), or None."""
    for attr in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if attr in node.attrs:
            value = node.attrs[attr]
            return value.values if isinstance(value, gs.Constant) else value
    return None


def why_not_zero(t: gs.Tensor, depth: int = 0) -> str | None:
    """None when ``t`` is provably all zeros (see the module docstring), else the reason not."""
    if isinstance(t, gs.Constant):
        return None if _all_zero(t.values) else "has non-zero values"
    if not t.inputs:
        return "is a graph input"
    node = t.inputs[0]
    if not is_default_domain(node):
        return f"is computed by {node.op}"
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        return None if value is None or _all_zero(value.values) else \
            "is a ConstantOfShape of a non-zero value"
    if node.op == "Constant":
        value = _constant_node_value(node)
        return None if value is not None and _all_zero(value) else "has non-zero values"
    if node.op not in _COPYING_OPS:
        return f"is computed by {node.op}"
    if depth >= _MAX_DEPTH:
        return "is computed by too long a chain"
    slots = _COPYING_OPS[node.op] or range(len(node.inputs))
    for i in slots:
        if i < len(node.inputs) and not node.inputs[i].is_empty():
            reason = why_not_zero(node.inputs[i], depth + 1)
            if reason:
                return reason
    return None


def _zero_defaults(node: gs.Node) -> dict[int, str]:
    if is_default_domain(node):
        return _ZERO_DEFAULTS.get(node.op, {})
    if node.domain == "com.microsoft":
        return _CONTRIB_ZERO_DEFAULTS.get(node.op, {})
    return {}


@register
class ElideZeroRnnInputs(RewritePass):
    name = "elide_zero_rnn_inputs"
    description = ("Omit RNN/GRU/LSTM initial states, biases and peepholes that are all zeros "
                   "(the spec's default).")
    ops = ("RNN", "GRU", "LSTM", "DynamicQuantizeLSTM")
    domain = None  # RNNs of the default domain and of com.microsoft: see _zero_defaults

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._omitted = 0

    def match(self, node: gs.Node, scope: Scope) -> list[int] | Refusal | None:
        """The indices of the inputs proven all zeros, else the refusal of an initial state."""
        zeros, refusal = [], None
        for i, name in _zero_defaults(node).items():
            if i >= len(node.inputs) or node.inputs[i].is_empty():
                continue
            reason = why_not_zero(node.inputs[i])
            if reason is None:
                zeros.append(i)
            elif refusal is None and name.startswith("initial"):
                refusal = refuse(f"{name} {reason}")
        return zeros or refusal

    def rewrite(self, node: gs.Node, zeros: list[int], scope: Scope) -> None:
        for i in zeros:
            node.inputs[i] = gs.Variable.empty()
        while node.inputs[-1].is_empty():
            node.inputs.pop()
        self._omitted += len(zeros)

    def extra_stats(self) -> dict[str, int]:
        return {"inputs_omitted": self._omitted}
