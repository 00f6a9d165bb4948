"""Attention biases that change nothing or move: the key bias is dropped, the value bias moves
into the output projection's bias.

In an attention (``passes/_attention.py`` for the arrangement: ``D = N * H`` channels, ``q``,
``k``, ``v`` of ``[B, S, D]``, ``P = Softmax(scores, axis=-1)`` over the key positions ``t``),
with ``k = k0 + b_k`` and ``v = v0 + b_v`` (``b_k``, ``b_v`` constant ``[D]``):

* **key bias**: ``scores[n, i, t] = c (q_i . k_t) + m[n, i, t] = c (q_i . k0_t) + c (q_i . b_k)
  + m`` (``c``: the scalar scale, ``m``: what the mask Adds add). The term ``c (q_i . b_k)``
  does not depend on ``t``, and softmax is invariant to a shift constant along its axis
  (``softmax(z + a) = softmax(z)``), so ``P`` is the same without ``b_k``: the Add is removed.
  This holds whatever ``q`` and ``m`` are.
* **value bias**: ``merged(P, v)[i, c] = sum_t P[i, t] (v0[t, c] + b_v[c]) = merged(P, v0)[i, c]
  + b_v[c]``, since every row of a softmax sums to 1. When the merged heads are read by one
  ``MatMul(x, W_o)`` followed by a constant bias ``Add(., b_o)``: ``(x0 + b_v) W_o + b_o =
  x0 W_o + (b_v W_o + b_o)``, so the value bias Add is removed and ``b_o' = b_o + b_v W_o``
  (computed in float64, rounded once).

Both hold in real arithmetic; in floating point the results differ by rounding only: softmax
subtracts each row's maximum first (onnxruntime and numpy alike), which removes the key term as
exactly as a shift can, and the rows of a float softmax sum to 1 within a few units in the last
place. A row whose every score is ``-inf`` (all keys masked) gives NaN with and without the
biases. BERT-style encoders (MiniLM: 6 layers) lose two Adds per layer, one elementwise pass over
``[B, S, D]`` each; a Q/K/V-quantized model's integer kernels do not take a bias (onnxruntime's
``MatMulIntegerToFloat`` from QDQ runs the bias Add apart).

Conditions (each refusal counted by reason): ``Softmax`` over the last axis (``axis = -1``, or
the last of a known rank; before opset 13, a rank known); between the scores ``MatMul`` and the
Softmax only ``Add`` (any other operand) and ``Mul``/``Div`` by a one-element constant; the
key and value paths, and the merged heads, as in ``passes/_attention.py`` with every
intermediate read once and no graph input or output (a key/value cache returned as an output
keeps its bias); the split inputs of a proven rank 3 (``[B, S, D]``: an unbatched ``[S, D]``
input splits its channels, not its positions); the biases one-dimensional float constants of
``D`` elements (or one) added by an ``Add`` read only there to a ``[B, S, D]`` tensor (a bias
that broadcasts its operand cannot go without changing the shape); for the value bias, float32
or float64 (in float16, ``b_v W_o`` rounded alone loses what cancels in ``(v0 + b_v) W_o``),
``W_o`` a constant ``[D, D']`` and ``b_o`` a constant broadcasting along the last axis
(``[D']``).

Statistics: ``rewritten`` (attentions changed), ``by_kind`` (``key bias`` dropped, ``value
bias`` moved) and ``refused`` per reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_value
from onnxopt.ops import FLOAT_DTYPES
from onnxopt.pass_manager import register
from onnxopt.passes._attention import HEADS, KEYS, merged_heads, producer, split_heads
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

#: Value bias dtypes moved into the output projection's bias: ``b_v W_o`` is rounded alone
#: there, where the original rounds ``(v0 + b_v) W_o``, whose terms may cancel; in float16
#: that lost half the digits or overflowed to inf on a breaker's weights.
_MOVABLE = (np.dtype(np.float32), np.dtype(np.float64))

#: Ops allowed between the scores MatMul and the Softmax.
_BETWEEN = ("Add", "Mul", "Div")


def _scalar(t: gs.Tensor) -> bool:
    value = constant_value(t)
    return value is not None and value.size == 1


def _bias(add: gs.Node | None, shape) -> tuple[gs.Tensor, np.ndarray] | None:
    """``(x, b)`` for ``add = Add(x, b)`` (either order) with ``b`` a 1-D float constant that
    does not broadcast ``x`` (``shape(x)`` proves ``x`` of rank 3 with ``b``'s size as its last
    dim, or ``b`` has one element: removing the Add keeps the shape), else None."""
    if add is None or len(add.inputs) != 2:
        return None
    for xi, bi in ((0, 1), (1, 0)):
        b = constant_value(add.inputs[bi])
        if b is not None and constant_value(add.inputs[xi]) is None and b.ndim == 1 \
                and b.dtype.type in FLOAT_DTYPES:
            known = shape(add.inputs[xi])
            if known is None or len(known) != 3 or b.size not in (1, known[-1]):
                return None
            return add.inputs[xi], b
    return None


def _scores_matmul(t: gs.Tensor, single, depth: int = 8) -> gs.Node | None:
    """The MatMul computing the scores ``t`` through Adds (of anything) and Mul/Div by a
    one-element constant, or None (none, or an Add both of whose operands lead to one)."""
    node = producer(t, "MatMul", single)
    if node is not None or depth == 0:
        return node
    found = [n for op in _BETWEEN if (n := producer(t, op, single)) is not None]
    if not found or len(found[0].inputs) != 2:
        return None
    node = found[0]
    if node.op == "Add":
        ahead = [m for i in node.inputs if (m := _scores_matmul(i, single, depth - 1))]
        return ahead[0] if len(ahead) == 1 else None
    if not _scalar(node.inputs[1]) or _scalar(node.inputs[0]):
        return None  # Mul(x, c) or Div(x, c) only
    return _scores_matmul(node.inputs[0], single, depth - 1)


@register
class FoldAttentionBias(RewritePass):
    name = "fold_attention_bias"
    description = "Attention: drop the key bias (softmax ignores a per-row shift), move the " \
                  "value bias into the output projection's bias (softmax rows sum to 1)."
    ops = ("Softmax",)
    min_opset = 1

    def match(self, node: gs.Node, scope: Scope) -> tuple | Refusal | None:
        axis = int(node.attrs.get("axis", -1 if scope.opset >= 13 else 1))
        if axis != -1:
            shape = scope.types.shape(node.inputs[0])
            if shape is None or axis != len(shape) - 1:
                return refuse("Softmax not over a known last axis")

        def single(t: gs.Tensor) -> bool:
            return len(t.outputs) == 1 and not scope.usedef.on_boundary(t)

        scores = _scores_matmul(node.inputs[0], single)
        if scores is None:
            return None
        types = scope.types
        key = split_heads(scores.inputs[1], KEYS, single, types.rank)
        key_bias = None
        if not isinstance(key, str):
            key_bias = _bias(producer(key.source, "Add", single), types.shape)
        value = None
        p = node.outputs[0]
        if single(p) and p.outputs[0].op == "MatMul" and p.outputs[0].inputs[0] is p:
            value = self._value_plan(p.outputs[0], single, types)
        if key_bias is None and not isinstance(value, tuple):
            return value if isinstance(value, Refusal) else None
        return (key if key_bias else None, key_bias,
                value if isinstance(value, tuple) else None)

    @staticmethod
    def _value_plan(pv: gs.Node, single, types) -> tuple | Refusal | None:
        """``(value split, its variable operand, b_v, output projection bias Add, b_o's input
        index, W_o)`` for the value path of ``pv = MatMul(P, heads(v))``, or a refusal, or
        None (not an attention's value path)."""
        out = pv.outputs[0]
        if len(out.outputs) != 1 or out.outputs[0].op != "Transpose":
            return None
        merge_out = out.outputs[0].outputs[0]
        if len(merge_out.outputs) != 1 or merge_out.outputs[0].op != "Reshape":
            return None
        x = merge_out.outputs[0].outputs[0]
        values = split_heads(pv.inputs[1], HEADS, single, types.rank)
        if isinstance(values, str):
            return None
        bias = _bias(producer(values.source, "Add", single), types.shape)
        if bias is None:
            return None
        if bias[1].dtype not in _MOVABLE:
            return refuse("value bias not float32 or float64 (moving it rounds b_v W_o alone)")
        channels = bias[1].size
        merged = merged_heads(x, channels, single, types.rank)
        if isinstance(merged, str) or merged.matmul is not pv or not single(x) \
                or x.outputs[0].op != "MatMul" or x.outputs[0].inputs[0] is not x:
            return refuse("merged heads not read by one output projection")
        project = x.outputs[0]
        w = constant_value(project.inputs[1])
        y = project.outputs[0]
        if w is None or w.ndim != 2 or w.shape[0] != channels or w.dtype != bias[1].dtype \
                or not single(y) or y.outputs[0].op != "Add":
            return refuse("output projection without a constant weight and bias Add")
        add_o = y.outputs[0]
        index = 1 if add_o.inputs[0] is y else 0
        b_o = constant_value(add_o.inputs[index])
        if b_o is None or b_o.dtype != w.dtype or b_o.ndim < 1 or b_o.shape[-1] != w.shape[1] \
                or any(d != 1 for d in b_o.shape[:-1]):
            return refuse("output projection's bias not a constant along the last axis")
        return values, bias[0], bias[1], add_o, index, w

    def rewrite(self, node: gs.Node, match: tuple, scope: Scope) -> str:
        key, key_bias, value = match
        kinds = []
        if key_bias is not None:
            add = key.source.inputs[0]
            key.reshape.inputs[0] = key_bias[0]
            scope.drop_if_unused(add)
            kinds.append("key bias")
        if value is not None:
            values, v0, b_v, add_o, index, w = value
            b_o = add_o.inputs[index]
            moved = (b_o.values.astype(np.float64)
                     + b_v.astype(np.float64) @ w.astype(np.float64)).astype(w.dtype)
            add_o.inputs[index] = gs.Constant(scope.fresh(f"{b_o.name}_with_value_bias"), moved)
            add_v = values.source.inputs[0]
            values.reshape.inputs[0] = v0
            scope.drop_if_unused(add_v)
            kinds.append("value bias")
        return " and ".join(kinds)
