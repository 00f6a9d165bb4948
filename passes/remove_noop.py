"""No-op removal: drop nodes whose output equals their input, element for element.

Each rule below states when ``y = op(x, ...)`` is ``x`` itself -- same dtype, same shape, same
values -- according to the ONNX operator specification (https://onnx.ai/onnx/operators/). The
node is then removed and its consumers read ``x``; when ``y`` is a graph output the producer of
``x`` is renamed instead so the output keeps its name (``onnxopt.edit.bypass``; impossible when
``x`` is a graph input, an initializer or from an outer scope, which is a refusal).

- ``Cast(x, to=T)`` with ``dtype(x) == T``; ``CastLike(x, t)`` with ``dtype(x) == dtype(t)``.
  The type of an ai.onnx.ml op's output is the one its spec fixes (``onnxopt.ops.ML_OUTPUT_TYPES``:
  float for Scaler, Normalizer, the regressors and classifier scores, the label type of the
  classifiers, the input's for Imputer...), which ONNX type inference does not always report,
  so that a converter's Cast to that type is seen to be one.
- Cast chains ``Cast(Cast(x: A, to=B), to=C)`` where B represents every value of A exactly
  (table ``_EXACT``: integer and float widenings whose significand holds every value of A, e.g.
  int32→int64, uint8→float16, float16→float32; bool→any standard numeric type). Then
  ``Cast(x, B)`` equals ``x`` value for value, and

  * C == A: the second Cast returns ``x`` and is removed;
  * C is also in ``_EXACT[A]``, or C is bool (``v != 0`` is kept by an exact conversion, NaN
    included), or A, B, C are all integer types (integer → integer conversion keeps the value
    modulo 2^bits of C, the same from A or from B): the second Cast reads ``x`` directly.

  Anything else (a narrowing float→float or float→int last step, string, float8, 4-bit types) is
  refused: the spec does not promise that rounding from A and from B agree there.
- ``Reshape(x, s)``: same rank, at most one -1, and every other entry is 0 (copy, without
  ``allowzero``) or the static dim of ``x``; the -1 then takes ``x``'s own dim.
- ``Flatten(x, axis)``: output ``(prod(d[:axis]), prod(d[axis:]))``, equal to ``x`` iff ``x`` is
  2-D and axis is 1 (or 0 with ``d0 == 1``, or 2 with ``d1 == 1``).
- ``Expand(x, s)``, and ``Add/Sub(x, 0)``, ``Mul/Div(x, 1)`` (the constant on either side for the
  commutative Add and Mul, on the right only for Sub and Div): the output shape is
  ``broadcast(shape(x), s)`` (numpy rule), which is ``shape(x)`` iff ``len(s) <= rank(x)`` and every
  right-aligned entry of ``s`` is 1 or the static dim of ``x``. When only a lower bound ``m`` of
  ``rank(x)`` is known (inside a Loop body, say: an ``Unsqueeze(v, axes)`` output has rank
  ``rank(v) + len(axes) >= len(axes)`` whatever ``v``), an ``s`` of 1s with ``len(s) <= m`` keeps
  ``shape(x)`` too: broadcasting a dim ``d`` with 1 gives ``d`` (0 included). The constant of the
  arithmetic ops must have x's dtype. ``x + 0`` gives ``+0.0`` for ``x = -0.0`` (equal, not
  bit-identical); every other case is exact in IEEE 754 (NaN stays NaN).
- ``Squeeze``/``Unsqueeze`` with empty axes (``Squeeze`` without axes removes every 1-dim, so it is
  a no-op only when every dim of ``x`` is static and not 1), and ``Unsqueeze(Squeeze(x, a), a)``,
  ``Squeeze(Unsqueeze(x, a), a)``: both axes lists are normalized by the same rank (the
  rank of ``x`` for the first, of the Unsqueeze output for the second), so equal axes sets
  cancel. A ``Squeeze`` without axes is resolved to the positions of the 1-dims of a fully static
  ``x``.
- ``Transpose`` whose ``perm`` is ``0..r-1`` (without ``perm``: reversal, a no-op for rank <= 1).
- ``Pad`` whose pads are all 0, any mode.
- ``Slice`` (opset 1 attributes, opset 10+ inputs) where every sliced axis has step 1, a start that
  clamps to 0 (0, or <= -dim) and an end that clamps to the dim (>= a static dim, or >= 2^31-1:
  we assume no axis is longer than that, the convention of the exporters' "to the end").
- ``Concat`` of a single input; ``Split`` into a single output.
- ``Resize`` whose scales are all 1 and has no sizes, or whose sizes equal x's static dims: the
  output size is x's and every output coordinate maps to itself, except for
  ``coordinate_transformation_mode`` ``tf_crop_and_resize`` (samples the roi) and
  ``tf_half_pixel_for_nn`` (maps ``i`` to ``i + 0.5``), which are refused.

Identity and Dropout are ``remove_identity``'s.

Scope: every graph, If/Loop/Scan bodies included. Dtypes and shapes come from
``onnxopt.analyses.TensorTypes`` (ONNX shape inference of the whole model, keyed by tensor object;
inside a Loop or Scan body nothing is derived from the shapes of the body inputs). Declared
value_info is never read.

Statistics: ``rewritten`` (no-ops removed and Cast chains shortened), ``by_kind`` (the op of each
removed no-op, ``Cast chain shortened``), ``producers_removed`` (per op: the producer of the
removed node's input, when the rewrite left it unread -- the Squeeze of a cancelled
``Unsqueeze(Squeeze(x))``, say) and ``refused`` (``"op: reason"``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto as TP

from onnxopt.analyses import TensorTypes
from onnxopt.edit import bypass, drop_if_unused
from onnxopt.graph import iter_graphs
from onnxopt.ops import is_default_domain, ml_output_type
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

_INTEGERS = frozenset({TP.INT8, TP.INT16, TP.INT32, TP.INT64,
                       TP.UINT8, TP.UINT16, TP.UINT32, TP.UINT64})
_NUMERIC = _INTEGERS | {TP.FLOAT16, TP.FLOAT, TP.DOUBLE}

#: A -> the types that represent every value of A exactly (a float type holds the integers up to
#: 2^(significand bits): 2^11 for float16, 2^24 for float32, 2^53 for float64).
_EXACT: dict[int, frozenset[int]] = {
    TP.BOOL: _NUMERIC,
    TP.INT8: frozenset({TP.INT16, TP.INT32, TP.INT64, TP.FLOAT16, TP.FLOAT, TP.DOUBLE}),
    TP.UINT8: frozenset({TP.INT16, TP.INT32, TP.INT64, TP.UINT16, TP.UINT32, TP.UINT64,
                         TP.FLOAT16, TP.FLOAT, TP.DOUBLE}),
    TP.INT16: frozenset({TP.INT32, TP.INT64, TP.FLOAT, TP.DOUBLE}),
    TP.UINT16: frozenset({TP.INT32, TP.INT64, TP.UINT32, TP.UINT64, TP.FLOAT, TP.DOUBLE}),
    TP.INT32: frozenset({TP.INT64, TP.DOUBLE}),
    TP.UINT32: frozenset({TP.INT64, TP.UINT64, TP.DOUBLE}),
    TP.FLOAT16: frozenset({TP.FLOAT, TP.DOUBLE}),
    TP.BFLOAT16: frozenset({TP.FLOAT, TP.DOUBLE}),
    TP.FLOAT: frozenset({TP.DOUBLE}),
}

#: An end at or above this reaches the end of any axis (see the module docstring).
_TO_THE_END = 2**31 - 1

_NO_SHAPE = "input shape unknown"

_OUTPUT_NAME = "graph output name cannot be kept (input is a graph input, initializer or " \
               "outer-scope tensor)"


@dataclass
class _Shorten:
    """Verdict for a Cast chain: the second Cast should read ``source`` (type A) directly."""

    source: gs.Tensor


@dataclass
class _Facts:
    """What is known about the tensors: inferred types and which initializers are overridable
    (also graph inputs, so not constants)."""

    types: TensorTypes
    overridable: frozenset[str]
    opset: int

    def value(self, t: gs.Tensor) -> np.ndarray | None:
        if isinstance(t, gs.Constant) and t.name not in self.overridable:
            return np.asarray(t.values)
        return None

    def dtype(self, t: gs.Tensor) -> int | None:
        """ONNX element type of ``t``: of a constant, of a Cast's output, of an ai.onnx.ml op's
        output whose type the spec fixes (``onnxopt.ops.ml_output_type``), or inferred."""
        if isinstance(t, gs.Constant):
            return _onnx_dtype(t.dtype)
        if len(t.inputs) == 1 and t.inputs[0].op == "Cast" and is_default_domain(t.inputs[0]):
            return int(t.inputs[0].attrs["to"])
        if len(t.inputs) == 1 and t.inputs[0].domain == "ai.onnx.ml":
            node = t.inputs[0]
            index = next(i for i, o in enumerate(node.outputs) if o is t)
            ml = ml_output_type(node, index, self.dtype(node.inputs[0]) if node.inputs else None)
            if ml is not None:
                return ml
        dtype = self.types.dtype(t)
        return _onnx_dtype(dtype) if dtype is not None else None

    def shape(self, t: gs.Tensor) -> tuple | None:
        """Shape of ``t`` (None for an unknown dim), or None when even the rank is unknown."""
        return self.types.shape(t)

    def min_rank(self, t: gs.Tensor) -> int:
        """A lower bound of ``rank(t)``: the inferred rank, else for an ``Unsqueeze`` output the
        number of its constant axes plus the bound of its input, else 0."""
        shape = self.shape(t)
        if shape is not None:
            return len(shape)
        unsqueeze = _producer(t, "Unsqueeze")
        axes = None if unsqueeze is None else _ints(unsqueeze, self, "axes", 1)
        return len(axes) + self.min_rank(unsqueeze.inputs[0]) if axes else 0


def _onnx_dtype(dtype) -> int | None:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    if len(t.inputs) == 1 and t.inputs[0].op == op and is_default_domain(t.inputs[0]):
        return t.inputs[0]
    return None


def _ints(node: gs.Node, f: _Facts, attr: str, index: int) -> list[int] | None | bool:
    """An int list given as attribute ``attr`` (older opsets) or constant input ``index``.

    Returns the list, None when absent, or False when it is a non-constant input.
    """
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) > index and not node.inputs[index].is_empty():
        value = f.value(node.inputs[index])
        return False if value is None else [int(v) for v in value.reshape(-1)]
    return None


def _broadcast_change(shape: tuple | None, other: tuple, min_rank: int = 0) -> str | None:
    """None when ``broadcast(shape, other) == shape``, else why it does not or may not;
    ``min_rank`` is a lower bound of the rank, for a ``shape`` that is not known."""
    if len(other) == 0:
        return None
    if shape is None:
        return None if len(other) <= min_rank and all(d == 1 for d in other) else _NO_SHAPE
    if len(other) > len(shape):
        return "broadcast would grow the rank"
    for d, s in zip(reversed(other), reversed(shape)):
        if d == 1 or d == s:
            continue
        return "broadcast may grow a dynamic dim" if s is None else "broadcast would change a dim"
    return None


#: What a check returns: the tensor the node's output equals, a _Shorten, a refusal reason, or
#: None when the node is not a no-op.
Verdict = gs.Tensor | _Shorten | str | None


def _cast(node: gs.Node, f: _Facts) -> Verdict:
    x, to = node.inputs[0], int(node.attrs["to"])
    b = f.dtype(x)
    if b is None:
        return "input dtype unknown"
    if b == to:
        return x
    first = _producer(x, "Cast")
    if first is None:
        return None
    source = first.inputs[0]
    a = f.dtype(source)
    if a is None or b not in _EXACT.get(a, ()):
        return None
    if to == a:
        return source
    if to in _EXACT[a] or to == TP.BOOL or {a, b, to} <= _INTEGERS:
        return _Shorten(source)
    return "cast chain: the last conversion may round differently from the first type"


def _cast_like(node: gs.Node, f: _Facts) -> Verdict:
    a, b = f.dtype(node.inputs[0]), f.dtype(node.inputs[1])
    if a is None or b is None:
        return "input dtype unknown"
    return node.inputs[0] if a == b else None


def _reshape(node: gs.Node, f: _Facts) -> Verdict:
    x = node.inputs[0]
    target = _ints(node, f, "shape", 1)
    if target is None or target is False:
        return None
    shape = f.shape(x)
    if shape is None:
        return _NO_SHAPE
    if len(target) != len(shape) or target.count(-1) > 1:
        return None
    copy_zero = not node.attrs.get("allowzero", 0)
    for d, s in zip(target, shape):
        if d == -1 or (d == 0 and copy_zero):
            continue
        if s is None:
            return "input dim not static"
        if d != s:
            return None
    if -1 in target and 0 in shape:
        return None  # -1 next to an empty dim is ambiguous
    return x


def _flatten(node: gs.Node, f: _Facts) -> Verdict:
    shape = f.shape(node.inputs[0])
    if shape is None:
        return _NO_SHAPE
    if len(shape) != 2:
        return None
    axis = node.attrs.get("axis", 1)
    axis = axis + 2 if axis < 0 else axis
    if axis == 1:
        return node.inputs[0]
    dim = shape[0] if axis == 0 else shape[1]
    if dim is None:
        return "input dim not static"
    return node.inputs[0] if dim == 1 else None


def _expand(node: gs.Node, f: _Facts) -> Verdict:
    target = f.value(node.inputs[1])
    if target is None:
        return None
    why = _broadcast_change(f.shape(node.inputs[0]), tuple(int(v) for v in target),
                            f.min_rank(node.inputs[0]))
    if why is None:
        return node.inputs[0]
    return None if why in ("broadcast would grow the rank", "broadcast would change a dim") else why


_IDENTITY_ELEMENT = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1}


def _arithmetic(node: gs.Node, f: _Facts) -> Verdict:
    sides = [(0, 1), (1, 0)] if node.op in ("Add", "Mul") else [(0, 1)]
    for xi, ci in sides:
        x, c = node.inputs[xi], node.inputs[ci]
        value = f.value(c)
        if value is None or f.value(x) is not None or value.dtype.kind not in "fiu":
            continue
        if not np.all(value == _IDENTITY_ELEMENT[node.op]):
            continue
        dtype = f.dtype(x)
        if dtype is not None and dtype != _onnx_dtype(value.dtype):
            return "constant dtype differs from the input's"
        why = _broadcast_change(f.shape(x), value.shape, f.min_rank(x))
        return x if why is None else why
    return None


def _squeeze_axes(node: gs.Node, f: _Facts) -> list[int] | None | bool | str:
    """Squeeze's axes; without axes, the positions of the 1-dims of a fully static input."""
    axes = _ints(node, f, "axes", 1)
    if axes is False or axes:
        return axes
    shape = f.shape(node.inputs[0])
    if shape is None:
        return _NO_SHAPE
    if any(d is None for d in shape):
        return "squeeze without axes: a dynamic dim may be 1"
    return [i for i, d in enumerate(shape) if d == 1]


def _same_axes(a: list[int], b: list[int], rank: int | None) -> bool | str:
    if sorted(a) == sorted(b):
        return True
    if rank is None:
        return "axes differ in sign and the rank is unknown"
    return sorted(v % rank for v in a) == sorted(v % rank for v in b)


def _rank(shape: tuple | None, extra: int = 0) -> int | None:
    return None if shape is None else len(shape) + extra


def _squeeze(node: gs.Node, f: _Facts) -> Verdict:
    x = node.inputs[0]
    axes = _squeeze_axes(node, f)
    inner = _producer(x, "Unsqueeze")
    if inner is not None:
        unsq = _ints(inner, f, "axes", 1)
        if unsq:
            if axes is None or isinstance(axes, str):  # without axes: x must have no 1-dim
                shape = f.shape(inner.inputs[0])
                if shape is None:
                    return _NO_SHAPE
                if any(d is None for d in shape):
                    return "squeeze without axes: a dynamic dim may be 1"
                return inner.inputs[0] if 1 not in shape else None
            if axes:
                same = _same_axes(axes, unsq, _rank(f.shape(x)))
                return inner.inputs[0] if same is True else (same or None)
    if isinstance(axes, str):
        return axes
    return x if axes == [] else None


def _unsqueeze(node: gs.Node, f: _Facts) -> Verdict:
    x = node.inputs[0]
    axes = _ints(node, f, "axes", 1)
    if axes is False:
        return None
    if not axes:
        return x
    inner = _producer(x, "Squeeze")
    if inner is None:
        return None
    sq = _squeeze_axes(inner, f)
    if not isinstance(sq, list) or not sq:
        return sq if isinstance(sq, str) else None
    same = _same_axes(axes, sq, _rank(f.shape(inner.inputs[0])))
    return inner.inputs[0] if same is True else (same or None)


def _transpose(node: gs.Node, f: _Facts) -> Verdict:
    perm = node.attrs.get("perm")
    if perm is None:
        shape = f.shape(node.inputs[0])
        if shape is None:
            return _NO_SHAPE
        return node.inputs[0] if len(shape) <= 1 else None
    return node.inputs[0] if list(perm) == list(range(len(perm))) else None


def _pad(node: gs.Node, f: _Facts) -> Verdict:
    pads = _ints(node, f, "pads", 1)
    if pads is False or pads is None:
        return None
    return node.inputs[0] if not any(pads) else None


def _slice(node: gs.Node, f: _Facts) -> Verdict:
    x = node.inputs[0]
    parts = [_ints(node, f, name, i) for name, i in
             (("starts", 1), ("ends", 2), ("axes", 3), ("steps", 4))]
    starts, ends, axes, steps = parts
    if starts is False or ends is False or axes is False or steps is False:
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if any(s != 1 for s in steps) or any(s > 0 for s in starts) or any(e < 0 for e in ends):
        return None
    shape = f.shape(x)
    for start, end, axis in zip(starts, ends, axes):
        if start == 0 and end >= _TO_THE_END and axis >= 0:
            continue
        if shape is None:
            return _NO_SHAPE
        if not -len(shape) <= axis < len(shape):
            return None
        dim = shape[axis]
        if dim is None:
            return "input dim not static"
        if (start != 0 and start > -dim) or end < dim:
            return None
    return x


def _concat(node: gs.Node, f: _Facts) -> Verdict:
    return node.inputs[0] if len(node.inputs) == 1 else None


def _split(node: gs.Node, f: _Facts) -> Verdict:
    return node.inputs[0] if len(node.outputs) == 1 else None


def _resize_size_kept(x: gs.Tensor, scales, sizes, axes, f: _Facts) -> bool | str:
    """Whether the output size is x's: scales all 1 without sizes, or sizes equal to x's dims."""
    if sizes is None or sizes.size == 0:
        return scales is not None and scales.size > 0 and bool(np.all(scales == 1))
    shape = f.shape(x)
    if shape is None:
        return _NO_SHAPE
    axes = [a % len(shape) for a in (axes if axes is not None else range(len(shape)))]
    if len(axes) != sizes.size:
        return False
    if any(shape[a] is None for a in axes):
        return "input dim not static"
    return all(shape[a] == size for a, size in zip(axes, sizes.reshape(-1)))


def _resize(node: gs.Node, f: _Facts) -> Verdict:
    if f.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        slots, mode = (1, None), "asymmetric"
    else:
        slots = (2, 3)
        mode = node.attrs.get("coordinate_transformation_mode", "half_pixel")
    scales, sizes = (None if i is None or len(node.inputs) <= i or node.inputs[i].is_empty()
                     else f.value(node.inputs[i]) for i in slots)
    kept = _resize_size_kept(node.inputs[0], scales, sizes, node.attrs.get("axes"), f)
    if kept is not True:
        return kept or None
    if mode in ("tf_crop_and_resize", "tf_half_pixel_for_nn"):
        return f"coordinate_transformation_mode {mode} moves the sampling points"
    return node.inputs[0]


_CHECKS: dict[str, Callable[[gs.Node, _Facts], Verdict]] = {
    "Cast": _cast, "CastLike": _cast_like, "Reshape": _reshape, "Flatten": _flatten,
    "Expand": _expand, "Add": _arithmetic, "Sub": _arithmetic, "Mul": _arithmetic,
    "Div": _arithmetic, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Transpose": _transpose,
    "Pad": _pad, "Slice": _slice, "Concat": _concat, "Split": _split, "Resize": _resize,
}


@register
class RemoveNoop(RewritePass):
    name = "remove_noop"
    description = ("Remove nodes that return their input unchanged (Cast to the same type, "
                   "identity Reshape/Transpose/Pad/Slice/Resize, x*1, x+0...).")
    ops = tuple(_CHECKS)

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._overridable = frozenset(t.name for g in iter_graphs(graph) for t in g.inputs)
        self._producers_removed: collections.Counter[str] = collections.Counter()

    def match(self, node: gs.Node, scope: Scope) -> Verdict | Refusal:
        if not node.inputs or node.inputs[0].is_empty():
            return None
        verdict = _CHECKS[node.op](node, _Facts(scope.types, self._overridable, scope.opset))
        return refuse(f"{node.op}: {verdict}") if isinstance(verdict, str) else verdict

    def rewrite(self, node: gs.Node, verdict: gs.Tensor | _Shorten, scope: Scope
                ) -> str | Refusal:
        inner = node.inputs[0].inputs[0] if len(node.inputs[0].inputs) == 1 else None
        if isinstance(verdict, _Shorten):
            node.inputs[0] = verdict.source
            kind = "Cast chain shortened"
        elif bypass(scope.graph, node, verdict, node.outputs[0]):
            kind = node.op
        else:
            return refuse(f"{node.op}: {_OUTPUT_NAME}")
        if drop_if_unused(scope.graph, inner):
            self._producers_removed[inner.op] += 1
        return kind

    def extra_stats(self) -> dict[str, dict[str, int]]:
        if not self._producers_removed:
            return {}
        return {"producers_removed": dict(sorted(self._producers_removed.items()))}
