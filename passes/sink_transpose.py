"""Transpose sinking: move a Transpose below the layout-neutral op that reads it, so that it meets
its inverse (``merge_transpose`` then cancels the pair) or a Reduce that absorbs it.

Keras and TensorFlow exports in NHWC wrap every Conv in ``Transpose(0,3,1,2) ... Transpose(0,2,
3,1)`` and apply the per-channel batch-norm ``Sub``/``Mul``/``Add``, the activations and the
residual ``Add`` in NHWC between them. Moving each output Transpose down through those ops brings
it next to the following input Transpose, its inverse; once the pair is gone the affine ops follow
the Conv directly and ``fuse_conv_affine`` folds them into its weights.

ONNX ``Transpose`` (spec, opsets 1-21): ``Y = Transpose(X, p)`` has ``Y.shape[i] = X.shape[p[i]]``
and ``Y[j] = X[k]`` with ``k[p[i]] = j[i]``; an omitted ``p`` is the reversal of the rank. Write
``T_p`` for it: ``T_q(T_p(X)) = T_{p∘q}(X)`` with ``(p∘q)[i] = p[q[i]]``, and the inverse of
``T_p`` is ``T_{p⁻¹}`` with ``p⁻¹ = argsort(p)``. For an op ``R`` reading ``Y = T_p(X)`` (rank
``r = len(p)``) and writing ``Z``, the rewrite is ``Z = T_{p'}(R'(X, ...))``:

1. Elementwise unary ops (``Relu``, ``Sigmoid``, ``Cast``, ``Clip``...; table ``_UNARY``):
   ``R(T_p(X)) = T_p(R(X))``, because the op maps each element by itself. Their other inputs
   (``Clip``'s scalar bounds, ``CastLike``'s type carrier) do not depend on the layout.
2. Elementwise ops with (multi- or unidirectional) broadcasting (``Add``, ``Sub``, ``Mul``,
   ``Div``, ``Pow``, ``Max``, ``Min``, ``PRelu``, ``Where``, comparisons...; ``_BROADCAST``),
   operand by operand, keeping operand positions (so ``Sub``/``Div`` need no commutativity):

   - an operand ``T_p(X_i)`` (the same ``p``) is replaced by ``X_i``;
   - a constant ``c`` of rank ``k <= r`` is first given rank ``r`` by leading 1s (numpy
     broadcasting aligns from the right: ``c' = c.reshape([1]*(r-k) + c.shape)``, the same
     elements) and then laid out as ``c'' = T_{p⁻¹}(c')``, so that ``T_p(c'') = c'``; e.g.
     ``[1,1,1,C]`` under ``p = (0,2,3,1)`` becomes ``[1,C,1,1]``. A constant whose dims are all
     1 (a scalar, say) broadcasts the same in any layout and is kept as it is;
   - any other operand is accepted only when its inferred rank is at most ``r`` and every dim
     is statically 1.

   Then ``R(T_p(X_1), c', ...)[j] = R(X_1[k], c''[k], ...) = T_p(R(X_1, c'', ...))[j]``: with
   every operand of rank ``r``, broadcasting commutes with the permutation (the output dim is
   the max of the operand dims, axis by axis, in either layout).
3. ``Reduce*`` (``ReduceMean``, ``ReduceSum``...; axes an attribute or, from opset 13/18, a
   constant input) over axes ``A`` of ``Y`` reduce axes ``p[A]`` of ``X``. With ``keepdims=1``,
   ``Z = T_p(Reduce(X, p[A]))`` (the reduced axes stay in place, as size 1). With ``keepdims=0``
   the kept axes of ``Y`` are ``K = [i not in A]`` in order; ``Reduce(X, p[A])`` keeps the axes
   ``S = sorted(p[i] for i in K)`` of ``X`` in order, so ``Z = T_q(...)`` with
   ``q[m] = S.index(p[K[m]])``: the Transpose is absorbed when ``q`` is the identity (the
   global average pooling ``ReduceMean(NHWC, [1,2])`` of a Keras head becomes
   ``ReduceMean(NCHW, [2,3])``). No axes reduces every axis (unless ``noop_with_empty_axes``:
   then the op is the identity and the Transpose just moves). ``ArgMax``/``ArgMin`` are the
   same with one axis.
4. ``Softmax``/``LogSoftmax``/``Hardmax`` from opset 13 (one ``axis``): ``axis' = p[axis]``,
   ``Z = T_p(R'(X))``. (Before opset 13 the axis flattens the trailing dims: refused.)
5. ``Pad`` (constant ``pads``; from opset 18 optionally with constant ``axes``): padding axis
   ``i`` of ``Y`` pads axis ``p[i]`` of ``X``. Without ``axes``, ``pads'[p[i]] = pads[i]`` and
   ``pads'[r + p[i]] = pads[r + i]``; with ``axes``, ``axes'[m] = p[axes[m]]`` and the pads stay.
   Every mode pads each axis on its own, so ``Pad(T_p(X)) = T_p(Pad'(X))``.

Every rewrite only moves elements or maps each one by itself, so it is exact for every dtype and
every input, empty tensors (a batch of 0) included; shapes are never read except a non-constant
operand's inferred rank and static 1-dims (2.), and the rank of an omitted ``perm``.

**When a move is made (the count rule).** Let ``removed`` be the input Transposes that ``R`` is
the only reader of (not graph outputs), and ``added`` the Transpose written after ``R``: 0 when
it is absorbed (3.), or when every reader of ``Z`` is itself a Transpose (the new one then merges
into each of them, ``merge_transpose``), else 1. The move is made only when
``added <= removed``: no Transpose is ever duplicated, the number of Transposes never grows,
and on every path through ``R`` it stays the same or drops. An input Transpose that has other
readers (or is a graph output) stays for them and ``R`` reads its input directly; so for a
Transpose shared by a Relu and a residual Add, the Add moves it when its other operand carries a
Transpose it removes, and the Transpose is left to its other reader, often its inverse.

Refused, counted under ``refused`` by reason: ``operands transposed differently``; ``operand is
not transposed`` (neither transposed the same way, nor constant, nor statically all 1s of rank
at most ``r``); ``constant has a higher rank``; ``operand is a sparse initializer``; ``axes not
constant``, ``pads not constant``, ``axes out of range or repeated``, ``pads do not match the
rank``, ``axes not constant, out of range or repeated`` (Pad's; out of range or repeated, the
original fails: left to onnxruntime); ``softmax axis flattens before opset 13``; ``rank
unknown`` (an omitted ``perm`` whose input rank inference does not give); ``perm is not a
permutation``; ``transpose would stay for other readers`` (the count rule).

Prior art: onnxruntime's layout transformer / transpose optimizer
(``onnxruntime/core/optimizer/transpose_optimization``) pushes Transposes through such ops with
a cost model that can also insert inverse Transposes on other inputs; it runs on the session's
copy of the model only, and does not fold the affine ops into the Conv weights afterwards. This
pass is written from the ONNX operator specs, without that code, and never inserts a Transpose on
an input.

Scope: every graph, each walked in topological order (so a chain moves its Transpose to the end
in one run); the input Transpose may be in an enclosing graph. The moved Transpose writes ``R``'s
output tensor, so graph output names survive; ``R`` writes a new tensor.

Statistics: ``rewritten`` (ops a Transpose moved below or was absorbed into), ``by_kind`` (the
op type), ``refused`` (per reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal, int_list
from onnxopt.ops import is_default_domain, onnxruntime_crashes_on_transpose
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, producer_in_scope, refuse

#: Elementwise ops of one data input (input 0); their other inputs do not depend on the layout.
_UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "CastLike",
    "Ceil", "Celu", "Clip", "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid",
    "HardSwish", "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal",
    "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt",
    "Tan", "Tanh", "ThresholdedRelu"})
#: Elementwise ops whose every input broadcasts against the others (numpy rule; PRelu's slope
#: unidirectionally, which permuting both operands keeps).
_BROADCAST = frozenset({
    "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow",
    "PRelu", "Sub", "Sum", "Where", "Xor"})
#: Reduce ops (``axes`` an attribute, or an input from opset 13 for ReduceSum, 18 for the others).
_REDUCE = frozenset({"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                     "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare"})
_ARG = frozenset({"ArgMax", "ArgMin"})
_SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax"})


@dataclass
class _Move:
    """A planned move: ``R``'s new inputs, attributes and the Transpose to write after it.

    Attributes:
        inputs: ``R``'s inputs after the move (transposed ones replaced by their source,
            constants re-laid out).
        attrs: attributes to set on ``R`` (renumbered ``axes``/``axis``).
        out_perm: the perm of the Transpose written after ``R``; None when it is absorbed.
        removed: the input Transposes only ``R`` reads (disconnected after the move).
    """

    inputs: list[gs.Tensor]
    attrs: dict = field(default_factory=dict)
    out_perm: list[int] | None = None
    removed: list[gs.Node] = field(default_factory=list)


def _writes_float16(node: gs.Node) -> bool:
    """Whether ``node``'s output is float16 (a Cast to it, or a known dtype)."""
    if node.op == "Cast":
        return node.attrs.get("to") == onnx.TensorProto.FLOAT16
    return node.outputs[0].dtype == np.float16


def _is_identity(perm: list[int] | None) -> bool:
    return perm is None or perm == list(range(len(perm)))


def _relayout(c: np.ndarray, p: list[int]) -> np.ndarray:
    """``T_{p⁻¹}`` of ``c`` given rank ``len(p)`` by leading 1s (``c.ndim <= len(p)``)."""
    full = c.reshape((1,) * (len(p) - c.ndim) + c.shape)
    return np.ascontiguousarray(np.transpose(full, np.argsort(p)))


def _normalized(axes: list[int], rank: int) -> list[int] | None:
    """``axes`` in ``[0, rank)``, or None when one is out of range or repeated."""
    if not all(-rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        return None
    return [a % rank for a in axes]


def _kept_perm(p: list[int], reduced: set[int]) -> list[int]:
    """``q`` of rewrite 3 with ``keepdims=0``: how the kept axes of ``Reduce(X, p[A])`` are
    reordered into the kept axes of ``Y``."""
    kept = [p[i] for i in range(len(p)) if i not in reduced]
    order = sorted(kept)
    return [order.index(k) for k in kept]


class _Planner:
    """Plans the move of the Transposes feeding ``node`` (see the module docstring)."""

    def __init__(self, node: gs.Node, scope: Scope, sources: dict[int, gs.Node], p: list[int]):
        self.node, self.scope, self.sources, self.p = node, scope, sources, p
        self.rank = len(p)

    def operand(self, i: int) -> gs.Tensor | Refusal:
        """Input ``i`` of a broadcasting op, in ``X``'s layout (rewrite 2)."""
        t = self.node.inputs[i]
        if i in self.sources:
            return self.sources[i].inputs[0]
        if isinstance(t, gs.Constant):
            reason = constant_refusal(t, "operand")
            if reason:
                return refuse(reason)
            c = np.asarray(t.values)
            if c.ndim > self.rank:
                return refuse("constant has a higher rank")
            if all(d == 1 for d in c.shape):
                return t
            name = self.scope.fresh(f"{t.name}_relayout")
            return gs.Constant(name, _relayout(c, self.p))
        shape = self.scope.types.shape(t)
        if shape is not None and len(shape) <= self.rank and all(d == 1 for d in shape):
            return t
        return refuse("operand is not transposed")

    def plan(self) -> _Move | Refusal:
        op, node, p = self.node.op, self.node, self.p
        if op in _UNARY:
            return _Move([self.sources[0].inputs[0], *node.inputs[1:]], out_perm=p)
        if op in _BROADCAST:
            inputs = [self.operand(i) for i in range(len(node.inputs))]
            bad = next((t for t in inputs if isinstance(t, Refusal)), None)
            return bad if bad is not None else _Move(inputs, out_perm=p)
        x = self.sources[0].inputs[0]
        if op in _REDUCE:
            return self._reduce(x)
        if op in _ARG:
            return self._axis(x, node.attrs.get("axis", 0), keep=node.attrs.get("keepdims", 1))
        if op in _SOFTMAX:
            if self.scope.opset < 13:
                return refuse("softmax axis flattens before opset 13")
            return self._axis(x, node.attrs.get("axis", -1), keep=1)
        return self._pad(x)

    def _axis(self, x: gs.Tensor, axis: int, keep: int) -> _Move | Refusal:
        axes = _normalized([int(axis)], self.rank)
        if axes is None:
            return refuse("axes out of range or repeated")
        out = self.p if keep else _kept_perm(self.p, set(axes))
        return _Move([x, *self.node.inputs[1:]], {"axis": self.p[axes[0]]},
                     None if _is_identity(out) else out)

    def _reduce(self, x: gs.Tensor) -> _Move | Refusal:
        node, p = self.node, self.p
        axes = int_list(node, "axes", 1)
        if axes == "unknown":
            return refuse("axes not constant")
        noop = node.attrs.get("noop_with_empty_axes", 0) and not axes
        axes = [] if noop else (axes or list(range(self.rank)))
        norm = _normalized(axes, self.rank)
        if norm is None:
            return refuse("axes out of range or repeated")
        new_axes = sorted(p[a] for a in norm)
        if node.attrs.get("keepdims", 1) or noop:
            out = None if len(norm) == self.rank else p
        else:
            out = _kept_perm(p, set(norm))
        inputs, attrs = [x, *node.inputs[1:]], {}
        if "axes" in node.attrs:
            attrs["axes"] = new_axes
        elif len(inputs) > 1 and not inputs[1].is_empty() and not noop:
            inputs[1] = gs.Constant(self.scope.fresh(f"{node.outputs[0].name}_axes"),
                                    np.array(new_axes, np.int64))
        return _Move(inputs, attrs, None if _is_identity(out) else out)

    def _pad(self, x: gs.Tensor) -> _Move | Refusal:
        node, p, r = self.node, self.p, self.rank
        pads = int_list(node, "pads", 1)
        if not isinstance(pads, list):
            return refuse("pads not constant")
        axes = int_list(node, "axes", 3)
        inputs, attrs = [x, *node.inputs[1:]], {}
        if axes is None:
            if len(pads) != 2 * r:
                return refuse("pads do not match the rank")
            new = [0] * (2 * r)
            for i in range(r):
                new[p[i]], new[r + p[i]] = pads[i], pads[r + i]
            if "pads" in node.attrs:
                attrs["pads"] = new
            else:
                inputs[1] = gs.Constant(self.scope.fresh(f"{node.outputs[0].name}_pads"),
                                        np.array(new, np.int64))
        else:
            norm = None if axes == "unknown" else _normalized(axes, r)
            if norm is None:
                return refuse("axes not constant, out of range or repeated")
            inputs[3] = gs.Constant(self.scope.fresh(f"{node.outputs[0].name}_axes"),
                                    np.array([p[a] for a in norm], np.int64))
        return _Move(inputs, attrs, p)


@register
class SinkTranspose(RewritePass):
    name = "sink_transpose"
    description = ("Move Transposes below elementwise, Reduce, Softmax and Pad ops so inverse "
                   "pairs meet and cancel (NHWC exports).")
    ops = tuple(sorted(_UNARY | _BROADCAST | _REDUCE | _ARG | _SOFTMAX | {"Pad"}))
    sorted_walk = True

    def _transpose_of(self, t: gs.Tensor, scope: Scope) -> gs.Node | None:
        """The default-domain Transpose writing ``t``: one of the model at the start of the pass
        (any scope) or one this pass wrote in this scope."""
        producer = producer_in_scope(t)
        if producer is None or producer.op != "Transpose":
            return None
        if scope.usedef.owner(producer) is None and id(producer) not in scope.memo.get("made", ()):
            return None
        return producer

    def _perm(self, transpose: gs.Node, scope: Scope) -> list[int] | None | Refusal:
        perm = transpose.attrs.get("perm")
        if perm is None:
            rank = scope.types.rank(transpose.inputs[0])
            return None if rank is None else list(range(rank - 1, -1, -1))
        perm = [int(v) for v in perm]
        return perm if sorted(perm) == list(range(len(perm))) else refuse(
            "perm is not a permutation")

    def _only_reader(self, transpose: gs.Node, node: gs.Node, scope: Scope) -> bool:
        y = transpose.outputs[0]
        return all(r is node for r in y.outputs) and not scope.usedef.is_output(y) \
            and not scope.is_output(y)

    def match(self, node: gs.Node, scope: Scope) -> _Move | Refusal | None:
        if len(node.outputs) != 1:
            return None
        data = node.inputs if node.op in _BROADCAST else node.inputs[:1]
        sources = {i: tp for i, t in enumerate(data)
                   if (tp := self._transpose_of(t, scope)) is not None}
        if not sources:
            return None
        perms = [self._perm(tp, scope) for tp in sources.values()]
        bad = next((pm for pm in perms if isinstance(pm, Refusal)), None)
        if bad is not None:
            return bad
        if any(pm is None for pm in perms):
            return refuse("rank unknown")
        if any(pm != perms[0] for pm in perms):
            return refuse("operands transposed differently")
        move = _Planner(node, scope, sources, perms[0]).plan()
        if isinstance(move, Refusal):
            return move
        removed = list({id(tp): tp for tp in sources.values()
                        if self._only_reader(tp, node, scope)}.values())
        z = node.outputs[0]
        absorbed = move.out_perm is None or (
            z.outputs and not scope.is_output(z)
            and all(r.op == "Transpose" and is_default_domain(r) for r in z.outputs))
        if (0 if absorbed else 1) > len(removed):
            return refuse("transpose would stay for other readers")
        if move.out_perm is not None and not absorbed:
            crash = onnxruntime_crashes_on_transpose(move.out_perm, _writes_float16(node),
                                                     z.outputs)
            if crash:
                return refuse(crash)
        move.removed = removed
        return move

    def rewrite(self, node: gs.Node, move: _Move, scope: Scope) -> str:
        z = node.outputs[0]
        for i, t in enumerate(move.inputs):
            node.inputs[i] = t
        node.attrs.update(move.attrs)
        if move.out_perm is not None:
            mid = gs.Variable(scope.fresh(f"{z.name}_untransposed"))
            node.outputs[0] = mid
            after = gs.Node("Transpose", scope.fresh(f"{node.name or z.name}_transpose"),
                            {"perm": move.out_perm}, [mid], [z])
            scope.graph.nodes.append(after)
            scope.memo.setdefault("made", set()).add(id(after))
        for tp in move.removed:
            if scope.usedef.owner(tp) is not None:
                scope.drop_if_unused(tp)
            elif not tp.outputs[0].outputs:
                tp.inputs.clear()
                tp.outputs.clear()
        return node.op
