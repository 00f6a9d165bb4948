"""MatMul + Add fusion: ``Add(MatMul(A, B), C)`` with 2-D ``A``, ``B`` and a bias ``C`` that
broadcasts unidirectionally to the product becomes ``Gemm(A, B, C)``.

Gemm (ONNX spec, https://onnx.ai/onnx/operators/onnx__Gemm.html, opset 7 and later) computes
``Y = alpha · A' · B' + beta · C`` with ``A'``, ``B'`` the operands transposed or not
(``transA``/``transB``, default 0) and ``alpha = beta = 1`` by default, for ``A`` of shape
``(M, K)`` and ``B`` of shape ``(K, N)``; ``C`` is broadcast *unidirectionally* to ``(M, N)`` and
may be any tensor, not only an initializer. With the defaults::

    Gemm(A, B, C) = A · B + C = Add(MatMul(A, B), C)

provided that

- ``A`` and ``B`` are both 2-D: MatMul of other ranks is batched (or vector) matrix product,
  which Gemm does not compute. The ranks come from an initializer's shape or from
  ``onnxopt.analyses.TensorTypes`` (ONNX shape inference, subgraphs included; a dim < 0, which some
  exports declare on their inputs, counts as unknown).
- ``C`` broadcasts unidirectionally to ``(M, N)``: ``rank(C) <= 2`` and each dim of ``C``,
  aligned from the right, is 1 or equals the matching dim of ``(M, N)`` -- scalar, ``[1]``,
  ``[N]``, ``[1, N]``, ``[M, 1]``, ``[M, N]``, ``[1, 1]``. That is exactly the condition for the
  Add's (multidirectional) output shape to be ``(M, N)`` too, so the Add does not broadcast the
  product up (``[M, N] + [3, M, N]`` or ``[M, N] + [1, 1, N]`` are refused). A dim of ``C`` other
  than 1 needs the matching dim of ``(M, N)`` to be static, since at run time it must match.
  The shape of an initializer ``C`` is its own; that of any other tensor (another MatMul's
  output, as in the LSTM cells keras and paddle exporters write out: ``x · W + h · R``, a graph
  input) comes from ``TensorTypes`` -- graph input types, initializers and op semantics, never
  declared value_info -- and every dim must be known: an unknown dim might broadcast the product
  up. Inside a Loop body a loop-carried value has no shape, so such a ``C`` is refused.
- The dtype is float16, float or double (Gemm-7 accepts these; integer types only from Gemm-9 and
  bfloat16 from Gemm-13, which we leave alone), and ``C`` has the product's dtype.
- Before opset 7 Gemm broadcasts ``C`` only with ``broadcast=1`` and under other rules: the pass
  applies from opset 7 (``min_opset``).

``C`` may be either operand of the Add. The Gemm writes the Add's output tensor, so that name
survives, and takes the Add's place in the node order (``C`` may be computed after the MatMul);
the MatMul output disappears, so it must have no other reader and not be a graph output. The sum
is ``A · B + C`` either way, up to the float rounding of the accumulation order. Works in every
subgraph.

Statistics: ``rewritten`` (MatMuls turned into Gemm) and ``refused`` (per reason).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.edit import constant_refusal
from onnxopt.ops import FLOAT_DTYPES, is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


def _shape(t: gs.Tensor, types: TensorTypes) -> tuple | None:
    """Shape of ``t`` (None for an unknown or negative dim), None when the rank is unknown."""
    shape = types.shape(t)
    if shape is None:
        return None
    return tuple(d if d is not None and d >= 0 else None for d in shape)


def _bias_refusal(c_shape: tuple, mn: tuple) -> str | None:
    """None when ``C`` of shape ``c_shape`` broadcasts unidirectionally to ``mn`` = (M, N)."""
    if len(c_shape) > 2:
        return "Add broadcasts the product to a higher rank"
    for c, d in zip(reversed(c_shape), reversed(mn)):
        if c == 1 or c == d:
            continue
        if d is None:
            return "bias dim may not match a dynamic dim of the product"
        return "Add broadcasts the product to a larger shape"
    return None


def _refusal(matmul: gs.Node, add: gs.Node, scope: Scope) -> str | None:
    """Why ``Add(matmul, C)`` cannot become a Gemm, or None."""
    y = matmul.outputs[0]
    if len(y.outputs) != 1:
        return "MatMul output has other consumers"
    if scope.is_output(y):
        return "MatMul output is a graph output"
    if scope.usedef.owner(add) is not scope.graph:
        return "Add in another scope"
    if len(add.inputs) != 2 or len(add.outputs) != 1 or add.inputs[0] is add.inputs[1]:
        return "unexpected Add arity"
    types = scope.types
    c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if isinstance(c, gs.Constant):
        reason = constant_refusal(c, "bias")
        if reason:
            return reason
        c_shape, c_dtype = tuple(c.shape), np.dtype(c.dtype)
    else:
        c_shape, c_dtype = types.static_shape(c), types.dtype(c)
        if c_shape is None:
            return "bias shape unknown"
    a, b = matmul.inputs
    a_shape, b_shape = _shape(a, types), _shape(b, types)
    if a_shape is None or b_shape is None:
        return "operand rank unknown"
    if len(a_shape) != 2 or len(b_shape) != 2:
        return "operands are not both 2-D"
    dtype = types.dtype(b)
    dtype = types.dtype(a) if dtype is None else dtype
    if dtype is None or dtype.type not in FLOAT_DTYPES:
        return "dtype is not float16, float or double"
    if c_dtype != dtype:
        return "bias dtype differs from the product's"
    return _bias_refusal(c_shape, (a_shape[0], b_shape[1]))


@register
class FuseMatMulAdd(RewritePass):
    name = "fuse_matmul_add"
    description = "Fuse MatMul of 2-D operands followed by Add of a bias into Gemm."
    ops = ("MatMul",)
    #: First opset whose Gemm broadcasts C unidirectionally without an attribute.
    min_opset = 7

    def match(self, matmul: gs.Node, scope: Scope) -> Refusal | gs.Node | None:
        if len(matmul.inputs) != 2 or len(matmul.outputs) != 1:
            return None
        adds = [n for n in matmul.outputs[0].outputs if n.op == "Add" and is_default_domain(n)]
        if not adds:
            return None
        reason = _refusal(matmul, adds[0], scope)
        return refuse(reason) if reason else adds[0]

    def rewrite(self, matmul: gs.Node, add: gs.Node, scope: Scope) -> None:
        """The MatMul becomes the Gemm, in place, and moves to the Add's place in the graph's
        nodes: a non-constant ``C`` may be computed between the two."""
        y = matmul.outputs[0]
        c = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
        out = add.outputs[0]
        add.inputs.clear()
        add.outputs.clear()
        matmul.op = "Gemm"
        matmul.inputs.append(c)
        matmul.outputs[0] = out
        nodes = scope.graph.nodes  # the walker changes this list only after the whole scope
        position = scope.memo.get("position")
        if position is None:
            position = scope.memo["position"] = {id(n): i for i, n in enumerate(nodes)}
        i, j = position[id(matmul)], position[id(add)]
        if i < j:
            nodes[i], nodes[j] = add, matmul
            position[id(matmul)], position[id(add)] = j, i
