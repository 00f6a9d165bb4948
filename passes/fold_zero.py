"""Zero algebra: drop an all-zero bias, and replace a product with an all-zero weight by the
constant it computes.

``x + 0``, ``x - 0``, ``0 + x``, ``x * 1``, ``x / 1`` are ``remove_noop``'s (a node returning its
input). This pass handles what zeros do to the weighted ops (ONNX operator specification,
https://onnx.ai/onnx/operators/), one rule per op in ``_RULES``:

- **Zero bias** -- ``Conv(X, W, B)``, ``ConvTranspose(X, W, B)``, ``LayerNormalization(X, S, B)``
  and ``Gemm(A, B, C)`` (opset 11 on, where C is optional) with a constant all-zero bias: the
  bias input is dropped. ``y + 0 = y`` element for element, and the bias never defines the
  output shape (Conv's B is ``[M]``; Gemm's C is unidirectionally broadcast to ``[M, N]``, which
  ``A`` and ``B`` define), so shape and dtype are kept. Gemm computes ``beta * C``: a non-finite
  ``beta`` (``inf * 0 = NaN``) is refused.
- **Zero weight** -- ``MatMul(A, B)`` with a constant all-zero operand of rank <= 2, ``Gemm`` with
  an all-zero ``A`` or ``B``, and ``Conv`` with an all-zero kernel compute
  ``0``, ``beta * C`` broadcast to ``[M, N]`` and the bias broadcast to ``[N, M, out...]``. The
  node becomes ``ConstantOfShape(shape)`` (no bias) or ``Expand(bias, shape)``, where ``shape``
  is built from the constant dims (the weight's, and those ``onnxopt.analyses.TensorTypes``
  proves) and, for every other dim, ``Gather(Shape(x), axis)`` of the operand ``x`` that
  defines it (MatMul ``[..., M, K] @ [K, N] -> [..., M, N]``: the leading dims are x's; Gemm's
  ``M`` is ``A``'s dim ``transA``; Conv's batch is ``X``'s dim 0). So batch 0 and every value of
  a symbolic dim give the original output shape. Refused: a rank of x not known, a Conv whose
  spatial output dims are not proved static (padding arithmetic is not rebuilt; auto_pad SAME is
  never proved), a MatMul constant of rank > 2 (its batch dims broadcast with x's), a bias
  computed at run time (Conv, Gemm) or scaled by ``beta != 1`` (Gemm), opsets before 9 (no
  ConstantOfShape). ConvTranspose with a zero kernel is left alone: its spatial output dims are
  always disputed (``onnxopt.analyses.types``).

Float semantics. Dropping a zero bias turns an output ``-0.0`` into ``+0.0`` (IEEE 754: ``-0 + 0
= +0``): equal, not bit-identical. ``x * 0`` is ``NaN`` for ``x = ±inf`` or ``NaN``, so the
zero-weight rule is exact only for finite activations. It assumes them by default
(``assume_finite``), as compilers' algebraic simplifiers do under fast-math (e.g. LLVM's
``fmul nnan x, 0 -> 0``; XLA's algebraic simplifier does the same only for integers): a valid
input of a network does not make its activations infinite, and onnxruntime validation compares
on finite feeds. With ``assume_finite=False`` only integer products are folded, and float ones
are refused with a reason. Nothing else is assumed: no declared shape is read.

Statistics: ``rewritten``; ``by_kind``: ``"<op> zero bias dropped"``, ``"<op> zero weight
folded"``; ``refused`` (``"<op>: reason"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses import TensorTypes
from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

#: A dim of the output: a number, or (tensor, axis) -- that dim of another tensor at run time.
Dim = int | tuple[gs.Tensor, int]

#: Ops whose bias input (index 2 in each) the spec makes optional, and the first opset where it is.
_OPTIONAL_BIAS = {"Conv": 1, "ConvTranspose": 1, "LayerNormalization": 17, "Gemm": 11}


@dataclass
class _DropBias:
    """Drop input ``index`` of the node."""

    index: int


@dataclass
class _Constant:
    """Replace the node by ``bias`` (a constant, None: zeros of ``dtype``) broadcast to ``dims``."""

    dims: list[Dim]
    dtype: np.dtype
    bias: np.ndarray | None


@dataclass(frozen=True)
class FoldZeroOptions:
    """Options of :class:`FoldZero`.

    Attributes:
        assume_finite: fold a float product with an all-zero weight, assuming the other operand
            is finite (``inf * 0`` is NaN; see the module docstring). False: only integer
            products are folded. Default True.
    """

    assume_finite: bool = True

    def check(self) -> str | None:
        return None


@dataclass
class _Facts:
    types: TensorTypes
    overridable: frozenset[str]
    opset: int
    assume_finite: bool

    def zero(self, t: gs.Tensor) -> np.ndarray | None:
        """The value of ``t`` when it is a constant that is all zeros, else None."""
        if t.is_empty() or not isinstance(t, gs.Constant) or t.name in self.overridable:
            return None
        source = external.source_of(t._values)
        if source is not None and (sample := source.sample()) is not None and np.any(sample):
            return None  # an external weight: a few sampled pages say it is not zero
        if not isinstance(t.values, np.ndarray):
            return None
        value = np.asarray(t.values)
        if value.dtype.kind not in "fiu" or np.any(value):
            return None
        return value

    def finite_refusal(self, dtype: np.dtype) -> str | None:
        if dtype.kind == "f" and not self.assume_finite:
            return "float product: the other operand may be non-finite (assume_finite is off)"
        return None


def _input(node: gs.Node, i: int) -> gs.Tensor | None:
    return node.inputs[i] if len(node.inputs) > i and not node.inputs[i].is_empty() else None


def _dims_of(x: gs.Tensor, axes, f: _Facts) -> list[Dim] | str:
    """Dims ``axes`` of ``x``: the static ones as numbers, the others read at run time."""
    shape = f.types.shape(x)
    if shape is None:
        return "input rank unknown"
    return [shape[a] if shape[a] is not None else (x, a % len(shape)) for a in axes]


def _zero_bias(node: gs.Node, f: _Facts) -> _DropBias | str | None:
    bias = _input(node, 2)
    if bias is None or f.zero(bias) is None:
        return None
    if f.opset < _OPTIONAL_BIAS[node.op]:
        return f"bias is required before opset {_OPTIONAL_BIAS[node.op]}"
    if node.op == "Gemm" and not np.isfinite(node.attrs.get("beta", 1.0)):
        return "beta is not finite"
    return _DropBias(2)


def _matmul(node: gs.Node, f: _Facts) -> _Constant | str | None:
    a, b = node.inputs[0], node.inputs[1]
    for zero_index in (1, 0):
        weight, x = (b, a) if zero_index == 1 else (a, b)
        value = f.zero(weight)
        if value is None or f.zero(x) is not None or isinstance(x, gs.Constant):
            continue
        if value.ndim > 2:
            return "constant of rank > 2: its batch dims broadcast with the input's"
        why = f.finite_refusal(value.dtype)
        if why:
            return why
        rank = f.types.rank(x)
        if rank is None:
            return "input rank unknown"
        if zero_index == 1:  # x[..., M, K] @ W[K, N] -> [..., M, N]; W[K]: [..., M]
            dims = _dims_of(x, range(rank - 1), f)
            tail = [int(value.shape[1])] if value.ndim == 2 else []
        else:  # W[M, K] @ x[..., K, N] -> [..., M, N]; W[K]: [..., N]
            lead = _dims_of(x, range(rank - 2), f)
            last = _dims_of(x, [rank - 1], f) if rank >= 2 else []
            if isinstance(lead, str) or isinstance(last, str):
                return "input rank unknown"
            dims = lead + ([int(value.shape[0])] if value.ndim == 2 else []) + last
            tail = []
        if isinstance(dims, str):
            return dims
        return _Constant(dims + tail, value.dtype, None)
    return None


def _gemm(node: gs.Node, f: _Facts) -> _Constant | _DropBias | str | None:
    a, b = node.inputs[0], node.inputs[1]
    za, zb = f.zero(a), f.zero(b)
    if za is None and zb is None:
        return _zero_bias(node, f)
    if isinstance(a if za is None else b, gs.Constant):
        return None  # all constant: fold_constants'
    value = za if za is not None else zb
    why = f.finite_refusal(value.dtype)
    if why:
        return why
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    if not (np.isfinite(alpha) and np.isfinite(beta)):
        return "alpha or beta is not finite"
    trans_a, trans_b = int(node.attrs.get("transA", 0)), int(node.attrs.get("transB", 0))
    m = _dims_of(a, [trans_a], f) if za is None else [int(a.shape[trans_a])]
    n = _dims_of(b, [1 - trans_b], f) if zb is None else [int(b.shape[1 - trans_b])]
    if isinstance(m, str) or isinstance(n, str):
        return "input rank unknown"
    c = _input(node, 2)
    if c is None or f.zero(c) is not None:
        return _Constant(m + n, value.dtype, None)
    if not isinstance(c, gs.Constant) or c.name in f.overridable:
        return "bias is computed at run time"
    if beta != 1.0:
        return "bias is scaled by beta != 1"
    return _Constant(m + n, value.dtype, np.asarray(c.values))


def _conv(node: gs.Node, f: _Facts) -> _Constant | _DropBias | str | None:
    kernel = f.zero(node.inputs[1])
    if kernel is None:
        return _zero_bias(node, f)
    x = node.inputs[0]
    if isinstance(x, gs.Constant):
        return None
    why = f.finite_refusal(kernel.dtype)
    if why:
        return why
    out = f.types.shape(node.outputs[0])
    if out is None or len(out) != kernel.ndim or any(d is None for d in out[2:]):
        return "output spatial dims not proved static"
    bias = _input(node, 2)
    if bias is not None and not (isinstance(bias, gs.Constant) and bias.name not in f.overridable):
        return "bias is computed at run time"
    batch = _dims_of(x, [0], f)
    if isinstance(batch, str):
        return batch
    values = None if bias is None or f.zero(bias) is not None else \
        np.asarray(bias.values).reshape([-1] + [1] * (kernel.ndim - 2))
    return _Constant(batch + [int(kernel.shape[0])] + list(out[2:]), kernel.dtype, values)


def _bias_only(node: gs.Node, f: _Facts) -> _DropBias | str | None:
    return _zero_bias(node, f)


_RULES: dict[str, Callable[[gs.Node, _Facts], _Constant | _DropBias | str | None]] = {
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "ConvTranspose": _bias_only,
    "LayerNormalization": _bias_only,
}


@register
class FoldZero(RewritePass):
    name = "fold_zero"
    description = ("Drop all-zero biases; replace MatMul/Gemm/Conv with an all-zero weight by "
                   "the constant they compute.")
    Options = FoldZeroOptions
    ops = tuple(_RULES)

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._overridable = frozenset(t.name for g in iter_graphs(graph) for t in g.inputs)

    def match(self, node: gs.Node, scope: Scope) -> _Constant | _DropBias | Refusal | None:
        if len(node.inputs) < 2 or node.inputs[0].is_empty():
            return None
        facts = _Facts(scope.types, self._overridable, scope.opset, self.options.assume_finite)
        verdict = _RULES[node.op](node, facts)
        if isinstance(verdict, _Constant):
            if scope.opset < 9:
                return refuse(f"{node.op}: ConstantOfShape needs opset 9")
            if len(node.outputs) != 1:
                return refuse(f"{node.op}: more than one output")
        return refuse(f"{node.op}: {verdict}") if isinstance(verdict, str) else verdict

    def rewrite(self, node: gs.Node, plan: _Constant | _DropBias, scope: Scope) -> str:
        if isinstance(plan, _DropBias):
            while len(node.inputs) > plan.index:
                node.inputs.pop()
            return f"{node.op} zero bias dropped"
        out = node.outputs[0]
        base = node.name or out.name
        made: list[gs.Node] = []
        shape = _shape_tensor(plan.dims, base, scope, made)
        if plan.bias is None:
            fill = gs.Constant(scope.fresh(f"{base}__zero"), np.zeros([1], plan.dtype))
            made.append(gs.Node("ConstantOfShape", scope.fresh(f"{base}__zeros"),
                                {"value": fill}, [shape], [out]))
        else:
            bias = gs.Constant(scope.fresh(f"{base}__bias"), plan.bias.astype(plan.dtype))
            made.append(gs.Node("Expand", scope.fresh(f"{base}__bias_expand"), {}, [bias, shape],
                                [out]))
        op = node.op
        node.inputs.clear()
        node.outputs.clear()
        at = next(i for i, n in enumerate(scope.graph.nodes) if n is node)
        scope.graph.nodes[at:at] = made
        return f"{op} zero weight folded"


def _shape_tensor(dims: list[Dim], base: str, scope: Scope, made: list[gs.Node]) -> gs.Tensor:
    """An int64 1-D tensor holding ``dims``: constants for the numbers, ``Gather(Shape(t), axes)``
    for each run of dims read from the same tensor ``t``, joined by a Concat (nodes appended to
    ``made``)."""
    pieces: list[gs.Tensor] = []
    runs: list[tuple[gs.Tensor | None, list[int]]] = []
    for d in dims:
        source, value = (None, int(d)) if isinstance(d, int) else d
        if runs and runs[-1][0] is source:
            runs[-1][1].append(value)
        else:
            runs.append((source, [value]))
    shapes: dict[int, gs.Tensor] = {}
    for source, values in runs:
        if source is None:
            pieces.append(gs.Constant(scope.fresh(f"{base}__dims"), np.array(values, np.int64)))
            continue
        if id(source) not in shapes:
            shapes[id(source)] = gs.Variable(scope.fresh(f"{source.name}__shape"), np.int64,
                                             [None])
            made.append(gs.Node("Shape", scope.fresh(f"{base}__shape"), {}, [source],
                                [shapes[id(source)]]))
        picked = gs.Variable(scope.fresh(f"{base}__dims"), np.int64, [len(values)])
        axes = gs.Constant(scope.fresh(f"{base}__axes"), np.array(values, np.int64))
        made.append(gs.Node("Gather", scope.fresh(f"{base}__gather"), {"axis": 0},
                            [shapes[id(source)], axes], [picked]))
        pieces.append(picked)
    if not pieces:
        return gs.Constant(scope.fresh(f"{base}__dims"), np.zeros([0], np.int64))
    if len(pieces) == 1:
        return pieces[0]
    joined = gs.Variable(scope.fresh(f"{base}__dims"), np.int64, [len(dims)])
    made.append(gs.Node("Concat", scope.fresh(f"{base}__concat"), {"axis": 0}, pieces, [joined]))
    return joined
