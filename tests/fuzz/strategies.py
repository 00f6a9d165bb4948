"""Hypothesis strategy of random *valid* ONNX models for differential fuzzing (``test_fuzz.py``,
``tools/fuzz.py``).

A model is grown one operator at a time from a pool of tensors whose dtype and shape the builder
tracks itself, so that every node it adds is valid for them; no shape inference is consulted.
A dimension is an ``int``, a symbol (``"N"``, ``"S"``: a symbolic dim of the graph inputs, whose
value each feed chooses) or None (computed but not tracked: ``Flatten`` of a symbolic dim, say).
Two dims are equal only when both are the same int or the same symbol; None equals nothing, so a
node never relies on an untracked dim matching another.

Coverage (65 op types, opsets 13-21, float32, float16 and int64 tensors):

* elementwise with broadcasting: Add Sub Mul Div Max Min Pow, Equal Less Greater, Where; unary
  Relu Sigmoid Tanh Exp Abs Neg Sqrt (of Abs) Erf Floor Ceil LeakyRelu Elu Softplus HardSigmoid
  Identity Dropout Clip (min/max inputs, either optional) Gelu (opset >= 20);
* reductions ReduceSum/Mean/Max/Min/Prod/L2 with ``axes`` as attribute (opset < 18; ReduceSum
  from 13 and all from 18 take it as an input), keepdims, negative axes; ArgMax/ArgMin;
* shape ops: Reshape (0 and -1, allowzero), Transpose, Squeeze/Unsqueeze, Flatten, Expand (to a
  constant shape or to ``Shape`` of another tensor), Shape (start/end from 15), Slice (negative
  steps, clamped ends, on symbolic axes as full ranges), Gather (constant indices, scalar
  indices on shapes), GatherElements (constant or ArgMax indices), Concat, Split (``split``
  input, equal parts, ``num_outputs`` from 18), Tile, Pad (constant/reflect/edge, negative pads,
  ``axes`` from 18), ConstantOfShape, Range (constant or symbolic limit);
* Conv with groups, strides, dilations and pads; BatchNormalization; MatMul; Gemm with
  transA/transB/alpha/beta and C of several shapes; Softmax/LogSoftmax; LayerNormalization
  (17+); Cast (also chains through float16) and CastLike (15+);
* control flow: If on a data-dependent, a constant or a shape condition, several Ifs on one
  condition, 1-2 outputs, branches reading outer values and holding their own initializers;
  Loop with a constant or symbolic trip count, a carried value, a scan output and a body reading
  outer values;
* graph level: initializers that are also graph inputs, graph outputs that other nodes read,
  exact duplicate nodes (CSE) and duplicates differing in one attribute, equal initializers
  under two names, node names that repeat across scopes (as exporters write them).

Symbolic dims take :data:`SYMBOLS`' default in the first feed; :func:`feeds` adds feeds with every
symbol at other values, 0 included (a feed onnxruntime rejects on the original model says nothing
about onnxopt and is dropped by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

F32, F16, I64, BOOL = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.int64),
                       np.dtype(np.bool_))
FLOATS = (F32, F16)

#: Symbolic dims: default value (first feed), then the other values the feeds try.
SYMBOLS = {"N": (2, 1, 3, 0), "S": (3, 1, 0)}

#: IR version of each opset (the newest the opset allows, as exporters write).
IR_VERSIONS = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}

INT_MAX = 2 ** 63 - 1

Dim = int | str | None


@dataclass(frozen=True)
class Value:
    """A tensor of the graph being built. ``content``: for a 1-D int64 tensor holding dims (a
    Shape output, a constant shape), those dims; for an int64 scalar holding one dim, a 1-tuple."""

    name: str
    dtype: np.dtype
    shape: tuple
    content: tuple | None = None


@dataclass
class Case:
    """A generated model and the symbolic dims its feeds may vary.

    ``overridable``: names of initializers that are also graph inputs (feeds may override them).
    ``ops``: the op types used, main graph and bodies.
    """

    model: onnx.ModelProto
    symbols: dict[str, tuple[int, ...]] = field(default_factory=dict)
    overridable: tuple[str, ...] = ()

    @property
    def ops(self) -> set[str]:
        from onnxopt.graph import graph_protos

        return {n.op_type for g in graph_protos(self.model.graph) for n in g.node}


def same(a: Dim, b: Dim) -> bool:
    return a is not None and a == b


def broadcast(a: tuple, b: tuple) -> tuple | None:
    """Numpy broadcasting of two tracked shapes, or None when it cannot be proven valid."""
    out = []
    for x, y in zip(((1,) * (len(b) - len(a)) + a), ((1,) * (len(a) - len(b)) + b)):
        if x == 1:
            out.append(y)
        elif y == 1 or same(x, y):
            out.append(x)
        else:
            return None
    return tuple(out)


def static(shape: tuple) -> bool:
    return all(isinstance(d, int) for d in shape)


def numel(shape: tuple) -> int | None:
    return int(np.prod(shape)) if static(shape) else None


def slice_length(d: int, start: int, end: int, step: int) -> int:
    """Elements ``Slice`` takes from an axis of ``d`` (ONNX spec: negative starts and ends count
    from the end, then are clamped to [0, d] or, for a negative step, [0, d-1] and [-1, d-1]);
    not Python's slicing, which clamps a negative start differently."""
    start, end = (x + d if x < 0 else x for x in (start, end))
    if step > 0:
        start, end = min(max(start, 0), d), min(max(end, 0), d)
    else:
        start, end = min(max(start, 0), d - 1), min(max(end, -1), d - 1)
    return max(0, -(-(end - start) // step))


def _tensor_dtype(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(dtype)


class Builder:
    """Grows one graph (the main graph or a body). ``outer``: the pool of enclosing scopes,
    readable by this graph's nodes; ``names``: the model's tensor-name counter (shared by all
    scopes, so tensor names are unique in the model); node names count per graph, so that
    bodies repeat the outer graph's node names as exporters do."""

    def __init__(self, draw, rng: np.random.Generator, opset: int, names: list[int],
                 outer: list[Value] = ()):
        self.draw, self.rng, self.opset, self.names = draw, rng, opset, names
        self.outer = list(outer)
        self.pool: list[Value] = []
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.op_count: dict[str, int] = {}
        self.float = F32

    # ------------------------------------------------------------------ helpers

    def fresh(self, prefix: str = "t") -> str:
        self.names[0] += 1
        return f"{prefix}{self.names[0]}"

    def node(self, op: str, inputs: list, outputs: list[Value], **attrs) -> None:
        """Add a node reading ``inputs`` (Values or names, "" for a left-out optional input)
        and writing ``outputs``, which join the pool."""
        k = self.op_count.get(op, 0)
        self.op_count[op] = k + 1
        name = "" if self.draw(st.integers(0, 9)) == 0 else f"{op}_{k}"
        self.pool.extend(outputs)
        ins = [v if isinstance(v, str) else v.name for v in inputs]
        self.nodes.append(helper.make_node(op, ins, [v.name for v in outputs], name=name or None,
                                           **attrs))

    def out(self, dtype: np.dtype, shape: tuple, content: tuple | None = None) -> Value:
        return Value(self.fresh(), np.dtype(dtype), tuple(shape), content)

    def const(self, array: np.ndarray, content: tuple | None = None) -> Value:
        """An initializer of this graph holding ``array``."""
        array = np.asarray(array)
        name = self.fresh("c")
        self.inits.append(numpy_helper.from_array(array, name))
        return Value(name, array.dtype, array.shape, content)

    def ints(self, values, content: tuple | None = None) -> Value:
        return self.const(np.asarray(values, dtype=np.int64), content)

    def random_array(self, shape: tuple, dtype: np.dtype, low: float = -2.0,
                     high: float = 2.0) -> np.ndarray:
        if dtype == I64:
            return self.rng.integers(int(low), int(high) + 1, size=shape).astype(np.int64)
        if dtype == BOOL:
            return self.rng.random(shape) < 0.5
        return self.rng.uniform(low, high, size=shape).astype(dtype)

    def visible(self) -> list[Value]:
        return self.outer + self.pool

    def pick(self, pred: Callable[[Value], bool] = lambda v: True, recent: bool = True
             ) -> Value | None:
        """A visible value satisfying ``pred``, preferring recent ones (chains), or None."""
        cands = [v for v in self.visible() if pred(v)]
        if not cands:
            return None
        i = self.draw(st.integers(0, len(cands) - 1))
        return cands[len(cands) - 1 - i] if recent else cands[i]

    def choice(self, seq):
        return self.draw(st.sampled_from(list(seq)))

    def flag(self, p_true: int = 50) -> bool:
        return self.draw(st.integers(0, 99)) < p_true

    def floats(self, v: Value) -> bool:
        return v.dtype in FLOATS

    def axis_of(self, v: Value, pred: Callable[[Dim], bool] = lambda d: True) -> int | None:
        """An axis of ``v`` whose dim satisfies ``pred``, given negative half the time."""
        axes = [i for i, d in enumerate(v.shape) if pred(d)]
        if not axes:
            return None
        a = self.choice(axes)
        return a - len(v.shape) if self.flag() else a

    # ------------------------------------------------------------------ elementwise

    def operand_for(self, a: Value, shape_keeping: bool = False) -> Value:
        """A second operand broadcastable with ``a``: ``a`` itself, another visible value or a
        constant (suffix of ``a``'s shape with some dims 1, or with one extra leading dim)."""
        kind = self.draw(st.integers(0, 3))
        if kind == 0:
            return a
        if kind == 1:
            other = self.pick(lambda v: v.dtype == a.dtype and v is not a and (
                (broadcast(a.shape, v.shape) == a.shape) if shape_keeping
                else broadcast(a.shape, v.shape) is not None) and len(v.shape) <= 4)
            if other is not None:
                return other
        rank = self.draw(st.integers(0, len(a.shape)))
        dims = [d if isinstance(d, int) and self.flag(70) else 1
                for d in a.shape[len(a.shape) - rank:]]
        if not shape_keeping and kind == 3 and len(a.shape) < 4:
            dims = [self.choice((1, 2))] + dims
        return self.const(self.random_array(tuple(dims), a.dtype))

    def op_binary(self) -> bool:
        a = self.pick(lambda v: v.dtype in (F32, F16, I64) and len(v.shape) <= 4)
        if a is None:
            return False
        ops = ["Add", "Sub", "Mul", "Max", "Min"] + (["Div", "Pow"] if self.floats(a) else [])
        op = self.choice(ops)
        b = self.operand_for(a)
        if op == "Div":
            if self.flag(60) or b is a:
                b = self.const(self.choice((0.5, -2.0, 4.0, 3.0)) * np.ones(
                    tuple(d if isinstance(d, int) else 1 for d in b.shape), a.dtype))
            else:
                s = self.out(b.dtype, b.shape)
                self.node("Sigmoid", [b], [s])
                b = s
        elif op == "Pow":
            b = self.const(np.asarray(self.choice((2.0, 3.0, 0.5, -1.0, 1.0)), a.dtype))
        if op != "Pow" and b is not a and self.flag(20):
            # the neutral element, maybe of a shape that broadcasts a to more (remove_noop)
            neutral = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1}.get(op)
            if neutral is not None:
                b = self.const(np.full(tuple(d if isinstance(d, int) else 1 for d in b.shape),
                                       neutral, a.dtype))
        shape = broadcast(a.shape, b.shape)
        if shape is None:
            return False
        if self.flag(20):
            a, b = b, a
        self.node(op, [a, b], [self.out(a.dtype, shape)])
        return True

    _BOUNDED_UNARY = ("Sigmoid", "Tanh", "Erf")

    def op_unary(self) -> bool:
        a = self.pick(lambda v: v.dtype in (F32, F16, I64))
        if a is None:
            return False
        if a.dtype == I64:
            op = self.choice(("Abs", "Neg", "Identity", "Clip"))  # no int64 Relu kernel
        else:
            op = self.choice(("Relu", "Sigmoid", "Tanh", "Exp", "Abs", "Neg", "Sqrt", "Erf",
                              "Floor", "Ceil", "LeakyRelu", "Elu", "Softplus", "HardSigmoid",
                              "Identity", "Dropout", "Clip", "Gelu"))
        attrs, extra = {}, []
        if op == "Exp":  # keep values finite: exp of a bounded value
            t = self.out(a.dtype, a.shape)
            self.node("Tanh", [a], [t])
            a = t
        elif op == "Sqrt":
            t = self.out(a.dtype, a.shape)
            self.node("Abs", [a], [t])
            a = t
        elif op in ("LeakyRelu", "Elu"):
            attrs["alpha"] = self.choice((0.01, 0.1, 0.5, 1.0))
        elif op == "HardSigmoid":
            attrs["alpha"] = self.choice((0.2, 0.5))
        elif op == "Clip":
            lo = self.const(np.asarray(self.choice((-1, 0)), a.dtype))
            hi = self.const(np.asarray(self.choice((1, 6)), a.dtype))
            extra = self.choice(([lo, hi], [lo], ["", hi], []))
        elif op == "Gelu":
            if self.opset < 20:
                op = "Erf"
            else:
                attrs["approximate"] = self.choice(("none", "tanh"))
        out = self.out(a.dtype, a.shape)
        self.node(op, [a, *extra], [out], **attrs)
        if op in ("LeakyRelu", "Elu", "HardSigmoid") and self.flag(25):
            # a duplicate differing in one attribute only: CSE must keep both
            attrs["alpha"] = attrs["alpha"] * 2 + 0.05
            self.node(op, [a], [self.out(a.dtype, a.shape)], **attrs)
        return True

    def op_compare_where(self) -> bool:
        a = self.pick(lambda v: v.dtype in (F32, F16, I64) and len(v.shape) <= 4)
        if a is None:
            return False
        b = self.operand_for(a)
        shape = broadcast(a.shape, b.shape)
        if shape is None:
            return False
        cond = self.out(BOOL, shape)
        self.node(self.choice(("Equal", "Less", "Greater")), [a, b], [cond])
        x = self.pick(lambda v: v.dtype in (F32, F16) and broadcast(v.shape, shape) is not None)
        if x is None:
            return True
        y = self.operand_for(x)
        xy = broadcast(x.shape, y.shape)
        full = broadcast(xy, shape) if xy is not None else None
        if full is None or y.dtype != x.dtype:
            return True
        self.node("Where", [cond, x, y], [self.out(x.dtype, full)])
        return True

    # ------------------------------------------------------------------ reductions

    def op_reduce(self) -> bool:
        a = self.pick(lambda v: v.dtype in (F32, F16, I64) and len(v.shape) >= 1)
        if a is None:
            return False
        ops = ["ReduceSum", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin"]
        if self.floats(a):
            ops += ["ReduceMean", "ReduceProd", "ReduceL2"]
        op = self.choice(ops)
        keep = self.flag()
        rank = len(a.shape)
        if op in ("ArgMax", "ArgMin"):
            axis = self.axis_of(a)
            attrs = {"axis": axis, "keepdims": int(keep)}
            if self.flag(30):
                attrs["select_last_index"] = 1
            shape = tuple(1 if i == axis % rank else d for i, d in enumerate(a.shape)) if keep \
                else tuple(d for i, d in enumerate(a.shape) if i != axis % rank)
            self.node(op, [a], [self.out(I64, shape)], **attrs)
            return True
        n = self.draw(st.integers(0, rank))
        axes = sorted(self.draw(st.permutations(range(rank)))[:n]) if n else []
        given = [x - rank if self.flag(30) else x for x in axes]
        reduced = set(axes) if axes else set(range(rank))
        shape = tuple((1 if keep else None) if i in reduced else d for i, d in enumerate(a.shape))
        shape = tuple(d for i, d in enumerate(shape) if keep or i not in reduced)
        attrs = {"keepdims": int(keep)}
        as_input = self.opset >= 18 or op == "ReduceSum"
        inputs = [a]
        if given:
            if as_input:
                inputs.append(self.ints(given))
            else:
                attrs["axes"] = given
        self.node(op, inputs, [self.out(a.dtype, shape)], **attrs)
        if self.flag(15):  # the same reduction with the other keepdims: CSE must keep both
            attrs["keepdims"] = int(not keep)
            other = tuple(1 if i in reduced else d for i, d in enumerate(a.shape)) if not keep \
                else tuple(d for i, d in enumerate(a.shape) if i not in reduced)
            self.node(op, inputs, [self.out(a.dtype, other)], **attrs)
        return True

    # ------------------------------------------------------------------ shape ops

    def op_reshape(self) -> bool:
        a = self.pick(lambda v: 1 <= len(v.shape) <= 4 and None not in v.shape)
        if a is None:
            return False
        shape = a.shape
        lead = 0  # leading dims copied with 0 (symbols must stay where they are)
        while lead < len(shape) and not isinstance(shape[lead], int):
            lead += 1
        rest = shape[lead:]
        if not static(rest):
            return False
        total = int(np.prod(rest)) if rest else 1
        factors = [f for f in range(1, total + 1) if total % f == 0]
        kind = self.draw(st.integers(0, 3))
        if kind == 0:
            tail = [-1]
            out_tail = [total] if lead or total else [None]
        elif kind == 1 and total:
            f = self.choice(factors)
            tail, out_tail = [f, total // f], [f, total // f]
            if self.flag():
                tail[self.draw(st.integers(0, 1))] = -1
        elif kind == 2:
            tail, out_tail = [total, 1], [total, 1]
        else:
            tail, out_tail = list(rest) or [1], list(rest) or [1]
        target = [0] * lead + tail
        out_shape = tuple(shape[:lead]) + tuple(out_tail)
        if not total and (lead or -1 in tail or self.opset < 14):
            return False  # a 0 in the target copies the input's dim unless allowzero=1
        if lead == 0 and self.flag(40):
            # the target computed from the static shape: a chain fold_constants folds
            target_value = self.const_shape_chain(a, out_shape) if static(a.shape) else None
        else:
            target_value = None
        if target_value is None:
            target_value = self.ints(target)
        attrs = {"allowzero": int(not total)} if self.opset >= 14 and (
            self.flag(20) or not total) else {}
        self.node("Reshape", [a, target_value], [self.out(a.dtype, out_shape)], **attrs)
        return True

    def const_shape_chain(self, a: Value, out_shape: tuple) -> Value | None:
        """``Concat(Gather(Shape(a), i)..., const)`` computing ``out_shape`` (all static)."""
        shp = self.out(I64, (len(a.shape),), a.shape)
        self.node("Shape", [a], [shp])
        parts = []
        for d in out_shape:
            if d in a.shape and self.flag(60):
                g = self.out(I64, (1,), (d,))
                self.node("Gather", [shp, self.ints([a.shape.index(d)])], [g], axis=0)
                parts.append(g)
            else:
                parts.append(self.ints([d]))
        if len(parts) == 1:
            return parts[0]
        res = self.out(I64, (len(out_shape),), tuple(out_shape))
        self.node("Concat", parts, [res], axis=0)
        return res

    def op_transpose(self) -> bool:
        a = self.pick(lambda v: 2 <= len(v.shape) <= 5)
        if a is None:
            return False
        rank = len(a.shape)
        if self.flag(15):
            self.node("Transpose", [a], [self.out(a.dtype, a.shape[::-1])])
            return True
        perm = list(self.draw(st.permutations(range(rank))))
        out = self.out(a.dtype, tuple(a.shape[p] for p in perm))
        self.node("Transpose", [a], [out], perm=perm)
        if self.flag(30):  # often followed by another Transpose (merge_transpose)
            perm2 = list(self.draw(st.permutations(range(rank))))
            self.node("Transpose", [out], [self.out(a.dtype, tuple(out.shape[p] for p in perm2))],
                      perm=perm2)
        return True

    def op_squeeze_unsqueeze(self) -> bool:
        a = self.pick(lambda v: len(v.shape) <= 4)
        if a is None:
            return False
        rank = len(a.shape)
        ones = [i for i, d in enumerate(a.shape) if d == 1]
        if ones and self.flag():
            axes = sorted(set(self.draw(st.lists(st.sampled_from(ones), min_size=1))))
            shape = tuple(d for i, d in enumerate(a.shape) if i not in axes)
            given = [x - rank if self.flag(30) else x for x in axes]
            self.node("Squeeze", [a, self.ints(given)], [self.out(a.dtype, shape)])
            return True
        n = self.draw(st.integers(1, 2))
        out_rank = rank + n
        axes = sorted(self.draw(st.permutations(range(out_rank)))[:n])
        dims = iter(a.shape)
        shape = tuple(1 if i in axes else next(dims) for i in range(out_rank))
        given = [x - out_rank if self.flag(30) else x for x in axes]
        out = self.out(a.dtype, shape)
        self.node("Unsqueeze", [a, self.ints(given)], [out])
        if self.flag(20):  # Squeeze back (remove_noop, merge)
            self.node("Squeeze", [out, self.ints(axes)], [self.out(a.dtype, a.shape)])
        return True

    def op_flatten(self) -> bool:
        a = self.pick(lambda v: 1 <= len(v.shape) <= 4)
        if a is None:
            return False
        axis = self.draw(st.integers(-len(a.shape), len(a.shape)))
        k = axis + len(a.shape) if axis < 0 else axis

        def prod(dims):
            if len(dims) == 1:
                return dims[0]
            return numel(dims)

        shape = (prod(a.shape[:k]) if k else 1, prod(a.shape[k:]) if k < len(a.shape) else 1)
        self.node("Flatten", [a], [self.out(a.dtype, shape)], axis=axis)
        return True

    def op_expand(self) -> bool:
        a = self.pick(lambda v: len(v.shape) <= 3)
        if a is None:
            return False
        like = self.pick(lambda v: v is not a and broadcast(v.shape, a.shape) == v.shape
                         and len(v.shape) <= 4)
        if like is not None and self.flag(40):
            shp = self.out(I64, (len(like.shape),), like.shape)
            self.node("Shape", [like], [shp])
            self.node("Expand", [a, shp], [self.out(a.dtype, like.shape)])
            return True
        target = [self.choice((2, 3)) if d == 1 and self.flag() else (d if self.flag(70)
                                                                       or d == 1 else 1)
                  for d in a.shape]
        if any(not isinstance(d, int) for d in target):
            target = [1 if not isinstance(d, int) else d for d in target]
        if self.flag(30):
            target = [self.choice((1, 2))] + target
        shape = broadcast(a.shape, tuple(target))
        if shape is None:
            return False
        self.node("Expand", [a, self.ints(target)], [self.out(a.dtype, shape)])
        return True

    def op_shape(self) -> bool:
        a = self.pick(lambda v: len(v.shape) >= 1)
        if a is None:
            return False
        rank = len(a.shape)
        attrs, dims = {}, a.shape
        if self.opset >= 15 and self.flag(30):
            start = self.draw(st.integers(-rank, rank - 1))
            attrs["start"] = start
            dims = a.shape[start:]
            if self.flag():
                end = self.draw(st.integers(-rank, rank))
                attrs["end"] = end
                dims = a.shape[slice(start, end)]
            if not dims:
                return False
        shp = self.out(I64, (len(dims),), tuple(dims))
        self.node("Shape", [a], [shp], **attrs)
        # use it: a dim as a scalar, ConstantOfShape or Range
        kind = self.draw(st.integers(0, 2))
        if kind == 0:
            i = self.draw(st.integers(0, len(dims) - 1))
            g = self.out(I64, (), (dims[i],))
            self.node("Gather", [shp, self.ints(i - len(dims) if self.flag() else i)], [g], axis=0)
            if self.flag():
                self.node("Range", [self.ints(0), g, self.ints(1)], [self.out(I64, (dims[i],))])
        elif kind == 1 and self.floats(a):
            value = helper.make_tensor("value", _tensor_dtype(a.dtype), [1], [0.5])
            self.node("ConstantOfShape", [shp], [self.out(a.dtype, tuple(dims))], value=value)
        return True

    def op_slice(self) -> bool:
        a = self.pick(lambda v: 1 <= len(v.shape) <= 4)
        return a is not None and self.op_slice_of(a)

    def op_slice_of(self, a: Value) -> bool:
        rank = len(a.shape)
        n = self.draw(st.integers(1, rank))
        axes = list(self.draw(st.permutations(range(rank)))[:n])
        starts, ends, steps = [], [], []
        shape = list(a.shape)
        for ax in axes:
            d = a.shape[ax]
            step = self.choice((1, 1, 2, -1, -2))
            if isinstance(d, int):
                start = self.draw(st.integers(-d - 2, d + 2))
                # onnxruntime 1.32 takes an end of INT_MAX with a negative step as "to the
                # start" (one element more than the spec's clamp to d - 1): not generated
                end = self.choice((self.draw(st.integers(-d - 2, d + 2)),
                                   INT_MAX if step > 0 else -INT_MAX))
                shape[ax] = slice_length(d, start, end, step)
            else:  # the whole axis, either way
                step = self.choice((1, -1))
                start, end = (0, INT_MAX) if step == 1 else (-1, -INT_MAX)
            starts.append(start)
            ends.append(end)
            steps.append(step)
        inputs = [a, self.ints(starts), self.ints(ends)]
        given = [x - rank if self.flag(30) else x for x in axes]
        if self.flag(80) or any(s != 1 for s in steps):
            inputs.append(self.ints(given))
            if self.flag(80) or any(s != 1 for s in steps):
                inputs.append(self.ints(steps))
        elif axes != list(range(n)):
            inputs.append(self.ints(given))
        out = self.out(a.dtype, tuple(shape))
        self.node("Slice", inputs, [out])
        if self.flag(25):  # often followed by another Slice (merge_slice)
            self.op_slice_of(out)
        return True

    def op_gather(self) -> bool:
        a = self.pick(lambda v: len(v.shape) >= 1 and any(isinstance(d, int) and d > 0
                                                           for d in v.shape))
        if a is None:
            return False
        axis = self.axis_of(a, lambda d: isinstance(d, int) and d > 0)
        d = a.shape[axis]
        if self.flag(30) and static(a.shape) and len(a.shape) <= 3:
            idx = self.rng.integers(-d, d, size=a.shape).astype(np.int64)
            keep = [self.draw(st.integers(1, k)) if k > 1 else k for k in a.shape]
            idx = idx[tuple(slice(0, k) for k in keep)]
            idx[idx < -d] = 0
            self.node("GatherElements", [a, self.const(idx)], [self.out(a.dtype, idx.shape)],
                      axis=axis)
            return True
        if self.flag(25) and len(a.shape) <= 4 and a.dtype != BOOL:
            # indices from ArgMax along the axis: valid for any shape
            arg = self.out(I64, tuple(1 if i == axis % len(a.shape) else x
                                      for i, x in enumerate(a.shape)))
            self.node("ArgMax", [a], [arg], axis=axis, keepdims=1)
            self.node("GatherElements", [a, arg], [self.out(a.dtype, arg.shape)], axis=axis)
            return True
        ishape = self.choice(((), (1,), (2,), (2, 2)))
        idx = self.rng.integers(-d, d, size=ishape).astype(np.int64)
        k = axis % len(a.shape)
        shape = a.shape[:k] + ishape + a.shape[k + 1:]
        content = None
        if a.content is not None and ishape == ():
            content = (a.content[int(idx)],)
        self.node("Gather", [a, self.const(idx)], [self.out(a.dtype, shape, content)], axis=axis)
        return True

    def op_concat(self) -> bool:
        a = self.pick(lambda v: 1 <= len(v.shape) <= 4)
        if a is None:
            return False
        axis = self.axis_of(a, lambda d: isinstance(d, int))
        if axis is None:
            return False
        k = axis % len(a.shape)

        def fits(v):
            return v.dtype == a.dtype and len(v.shape) == len(a.shape) and all(
                i == k or same(x, y) for i, (x, y) in enumerate(zip(v.shape, a.shape))) \
                and isinstance(v.shape[k], int)

        parts = [a]
        for _ in range(self.draw(st.integers(1, 2))):
            other = self.pick(fits) if self.flag(60) else None
            if other is None and static(a.shape[:k] + a.shape[k + 1:]):
                shape = list(a.shape)
                shape[k] = self.draw(st.integers(0, 2))
                other = self.const(self.random_array(tuple(shape), a.dtype))
            parts.append(other or a)
        shape = list(a.shape)
        shape[k] = sum(p.shape[k] for p in parts)
        content = (sum((p.content for p in parts), ()) if all(p.content is not None
                                                               for p in parts) else None)
        self.node("Concat", parts, [self.out(a.dtype, tuple(shape), content)], axis=axis)
        return True

    def op_split(self) -> bool:
        a = self.pick(lambda v: any(isinstance(d, int) and d >= 2 for d in v.shape))
        if a is None:
            return False
        axis = self.axis_of(a, lambda d: isinstance(d, int) and d >= 2)
        k, d = axis % len(a.shape), a.shape[axis]
        kind = self.draw(st.integers(0, 2))
        attrs, inputs = {"axis": axis}, [a]
        if kind == 0:  # sizes as an input (a 0 size is allowed)
            cut = sorted(self.draw(st.lists(st.integers(0, d), min_size=1, max_size=2)))
            sizes = [y - x for x, y in zip([0] + cut, cut + [d])]
            inputs.append(self.ints(sizes))
        elif kind == 1 or self.opset < 18:  # equal parts, as many as outputs
            parts = self.choice([p for p in (1, 2, 3) if d % p == 0])
            sizes = [d // parts] * parts
            if self.opset >= 18:
                attrs["num_outputs"] = parts
        else:  # num_outputs (18+): the last part may be smaller
            parts = self.draw(st.integers(1, min(d, 3)))
            size = -(-d // parts)
            sizes = [min(size, d - i * size) for i in range(parts)]
            if sizes[-1] <= 0:
                return False
            attrs["num_outputs"] = parts
        outs = [self.out(a.dtype, a.shape[:k] + (s,) + a.shape[k + 1:]) for s in sizes]
        self.node("Split", inputs, outs, **attrs)
        return True

    def op_tile(self) -> bool:
        a = self.pick(lambda v: 1 <= len(v.shape) <= 4)
        if a is None:
            return False
        reps = [self.choice((1, 1, 2)) if isinstance(d, int) else 1 for d in a.shape]
        shape = tuple(d * r if r != 1 else d for d, r in zip(a.shape, reps))
        self.node("Tile", [a, self.ints(reps)], [self.out(a.dtype, shape)])
        return True

    def op_pad(self) -> bool:
        a = self.pick(lambda v: 1 <= len(v.shape) <= 4 and v.dtype != BOOL)
        if a is None:
            return False
        rank = len(a.shape)
        mode = self.choice(("constant", "constant", "reflect", "edge"))
        axes = [i for i, d in enumerate(a.shape) if isinstance(d, int) and d >= (
            2 if mode == "reflect" else 1)]
        if not axes:
            return False
        use_axes = self.opset >= 18 and self.flag(40)
        chosen = sorted(self.draw(st.lists(st.sampled_from(axes), min_size=1, unique=True))) \
            if use_axes else axes
        pads_b, pads_e, shape = [], [], list(a.shape)
        for ax in (chosen if use_axes else range(rank)):
            d = a.shape[ax]
            if ax not in chosen:
                pads_b.append(0)
                pads_e.append(0)
                continue
            hi = d - 1 if mode == "reflect" else 2
            lo = -(d - 1) if mode == "constant" else 0
            b, e = self.draw(st.integers(lo, hi)), self.draw(st.integers(lo, hi))
            if self.flag(15):
                b = e = 0  # all zero: a no-op
            if d + b + e < 1:
                b, e = 0, 0
            pads_b.append(b)
            pads_e.append(e)
            shape[ax] = d + b + e
        inputs = [a, self.ints(pads_b + pads_e)]
        attrs = {"mode": mode}
        if mode == "constant" and self.flag():
            inputs.append(self.const(np.asarray(1.5 if self.floats(a) else 3, a.dtype)))
        if use_axes:
            inputs += [""] * (3 - len(inputs)) + [self.ints([x - rank if self.flag(30) else x
                                                              for x in chosen])]
        self.node("Pad", inputs, [self.out(a.dtype, tuple(shape))], **attrs)
        return True

    def op_range(self) -> bool:
        if self.flag():
            start, limit, delta = self.choice(((0, 5, 1), (1, 7, 2), (5, 0, -1), (0.5, 3.0, 0.75),
                                               (2, 2, 1)))
            dtype = self.choice((I64, F32)) if isinstance(start, int) else F32
            n = max(int(np.ceil((limit - start) / delta)), 0)
            vals = [self.const(np.asarray(x, dtype)) for x in (start, limit, delta)]
            self.node("Range", vals, [self.out(dtype, (n,))])
            return True
        return self.op_shape()

    def op_cast(self) -> bool:
        a = self.pick(lambda v: v.dtype in (F32, F16, I64, BOOL))
        if a is None:
            return False
        to = self.choice([t for t in (F32, F16, I64, BOOL) if t != a.dtype or self.flag(10)])
        if a.dtype == BOOL and to == BOOL:
            to = F32
        if self.opset >= 15 and self.flag(20):
            like = self.pick(lambda v: v.dtype == to) or self.const(np.zeros((), to))
            self.node("CastLike", [a, like], [self.out(to, a.shape)])
            return True
        out = self.out(to, a.shape, a.content if to == I64 else None)
        self.node("Cast", [a], [out], to=_tensor_dtype(to))
        if to == F16 and a.dtype == F32 and self.flag(40):  # back: not a no-op
            self.node("Cast", [out], [self.out(F32, a.shape)], to=TensorProto.FLOAT)
        return True

    # ------------------------------------------------------------------ neural-network ops

    def op_conv(self) -> bool:
        a = self.pick(lambda v: self.floats(v) and len(v.shape) == 4 and static(v.shape[1:])
                      and v.shape[1] >= 1 and all(d >= 1 for d in v.shape[2:]))
        if a is None:
            return False
        if self.flag(25):  # zero padding first (fuse_pad)
            pads = [0, 0, self.draw(st.integers(0, 1)), self.draw(st.integers(0, 1))] * 2
            padded = self.out(a.dtype, a.shape[:2] + (a.shape[2] + pads[2] + pads[6],
                                                     a.shape[3] + pads[3] + pads[7]))
            self.node("Pad", [a, self.ints(pads)], [padded], mode="constant")
            a = padded
        _, c, h, w = a.shape
        groups = self.choice([g for g in (1, 2, 3, 4) if c % g == 0])
        if self.flag(20) and c > 1:
            groups = c  # depthwise
        m = groups * self.draw(st.integers(1, 2))
        kh, kw = self.choice((1, 2, 3)), self.choice((1, 2, 3))
        sh, sw = self.choice((1, 1, 2)), self.choice((1, 1, 2))
        dh, dw = self.choice((1, 1, 2)), 1
        pads = [self.draw(st.integers(0, 1)) for _ in range(4)]
        oh = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            return False
        weight = self.const(self.random_array((m, c // groups, kh, kw), a.dtype, -1, 1))
        inputs = [a, weight]
        if self.flag(60):
            inputs.append(self.const(self.random_array((m,), a.dtype)))
        out = self.out(a.dtype, (a.shape[0], m, oh, ow))
        attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw], pads=pads,
                     group=groups)
        if self.flag(20):
            del attrs["kernel_shape"]
        self.node("Conv", inputs, [out], **attrs)
        if self.flag(50):  # followed by BatchNormalization (fuse_conv_bn)
            self.batchnorm(out)
        elif self.flag(40):  # or by a per-channel Mul and Add (fuse_conv_affine)
            for op in self.choice((("Mul",), ("Add",), ("Mul", "Add"))):
                shape = self.choice(((m, 1, 1), (1, m, 1, 1), (1,)))
                nxt = self.out(a.dtype, out.shape)
                self.node(op, [out, self.const(self.random_array(shape, a.dtype, 0.5, 1.5))],
                          [nxt])
                out = nxt
        return True

    def batchnorm(self, a: Value) -> None:
        c = a.shape[1]
        params = [self.random_array((c,), a.dtype), self.random_array((c,), a.dtype),
                  self.random_array((c,), a.dtype), self.random_array((c,), a.dtype, 0.5, 2.0)]
        self.node("BatchNormalization", [a] + [self.const(p) for p in params],
                  [self.out(a.dtype, a.shape)], epsilon=self.choice((1e-5, 1e-3)))

    def op_batchnorm(self) -> bool:
        a = self.pick(lambda v: self.floats(v) and 2 <= len(v.shape) <= 4
                      and isinstance(v.shape[1], int) and v.shape[1] >= 1)
        if a is None:
            return False
        self.batchnorm(a)
        return True

    def op_matmul(self) -> bool:
        a = self.pick(lambda v: v.dtype in (F32, F16) and 1 <= len(v.shape) <= 4
                      and isinstance(v.shape[-1], int))
        if a is None:
            return False
        k = a.shape[-1]
        p = self.choice((1, 2, 3))
        if self.flag(20):
            b = self.const(self.random_array((k,), a.dtype, -1, 1))
            shape = a.shape[:-1]
        else:
            b = self.const(self.random_array((k, p), a.dtype, -1, 1))
            shape = (a.shape[:-1] + (p,)) if len(a.shape) > 1 else (p,)
        out = self.out(a.dtype, shape)
        self.node("MatMul", [a, b], [out])
        if shape and isinstance(shape[-1], int) and self.flag(40):  # + bias (fuse_matmul_add)
            self.node("Add", [out, self.const(self.random_array(shape[-1:], a.dtype))],
                      [self.out(a.dtype, shape)])
        return True

    def op_gemm(self) -> bool:
        a = self.pick(lambda v: v.dtype in (F32, F16) and len(v.shape) == 2
                      and any(isinstance(d, int) for d in v.shape))
        if a is None:
            return False
        trans_a = int(isinstance(a.shape[0], int) and (not isinstance(a.shape[1], int)
                                                       or self.flag(30)))
        k, m = (a.shape[0], a.shape[1]) if trans_a else (a.shape[1], a.shape[0])
        if not isinstance(k, int):
            return False
        n = self.choice((1, 2, 3))
        trans_b = int(self.flag())
        b = self.const(self.random_array((n, k) if trans_b else (k, n), a.dtype, -1, 1))
        inputs = [a, b]
        if self.flag(70):
            cshape = self.choice([(n,), (1, n), ()] + ([(m, n), (m, 1)] if isinstance(m, int)
                                                      else []))
            inputs.append(self.const(self.random_array(cshape, a.dtype)))
        attrs = {"transA": trans_a, "transB": trans_b}
        if self.flag():
            attrs["alpha"] = self.choice((0.5, 2.0, 1.0))
        if self.flag():
            attrs["beta"] = self.choice((0.5, 0.0, 2.0))
        self.node("Gemm", inputs, [self.out(a.dtype, (m, n))], **attrs)
        if self.flag(15):  # the same Gemm with another alpha
            attrs["alpha"] = attrs.get("alpha", 1.0) + 0.25
            self.node("Gemm", inputs, [self.out(a.dtype, (m, n))], **attrs)
        return True

    def op_softmax(self) -> bool:
        a = self.pick(lambda v: self.floats(v) and len(v.shape) >= 1)
        if a is None:
            return False
        op = self.choice(("Softmax", "Softmax", "LogSoftmax"))
        attrs = {} if self.flag(30) else {"axis": self.axis_of(a)}
        self.node(op, [a], [self.out(a.dtype, a.shape)], **attrs)
        if len(a.shape) >= 2 and self.flag(20):  # the same with another axis
            self.node(op, [a], [self.out(a.dtype, a.shape)],
                      axis=(attrs.get("axis", -1) + 1) % len(a.shape))
        return True

    def op_layernorm(self) -> bool:
        if self.opset < 17:
            return False
        a = self.pick(lambda v: self.floats(v) and len(v.shape) >= 1
                      and isinstance(v.shape[-1], int))
        if a is None:
            return False
        rank = len(a.shape)
        start = rank - 1
        while start > 0 and isinstance(a.shape[start - 1], int) and self.flag(30):
            start -= 1
        norm = a.shape[start:]
        inputs = [a, self.const(self.random_array(norm, a.dtype, 0.5, 1.5))]
        if self.flag():
            inputs.append(self.const(self.random_array(norm, a.dtype)))
        self.node("LayerNormalization", inputs, [self.out(a.dtype, a.shape)],
                  axis=start - rank if self.flag() else start, epsilon=1e-5)
        return True

    # ------------------------------------------------------------------ control flow

    def body(self, inputs: list[Value], outputs_from: Callable[["Builder"], list[Value]],
             name: str) -> tuple[onnx.GraphProto, list[Value]]:
        """A subgraph with ``inputs``; ``outputs_from(child)`` adds its nodes and returns the
        values it outputs."""
        child = Builder(self.draw, self.rng, self.opset, self.names, self.visible())
        child.float = self.float
        child.pool = list(inputs)
        outs = outputs_from(child)
        graph = helper.make_graph(
            child.nodes, name, [value_info(v) for v in inputs], [value_info(v) for v in outs],
            child.inits)
        return graph, outs

    def elementwise_chain(self, start: Value, steps: int) -> Value:
        """Shape-keeping elementwise ops from ``start`` (reading outer values too)."""
        v = start
        for _ in range(steps):
            if self.floats(v):
                op = self.choice(("Relu", "Neg", "Add", "Mul", "Sigmoid", "Sub", "Identity"))
            else:
                op = self.choice(("Neg", "Add", "Mul", "Identity"))
            out = self.out(v.dtype, v.shape)
            if op in ("Add", "Mul", "Sub"):
                self.node(op, [v, self.operand_for(v, shape_keeping=True)], [out])
            else:
                self.node(op, [v], [out])
            v = out
        return v

    def condition(self) -> Value:
        kind = self.draw(st.integers(0, 3))
        if kind == 0:
            return self.const(np.asarray(self.flag(), np.bool_))
        a = self.pick(lambda v: v.dtype in (F32, F16, I64) and len(v.shape) >= 1)
        if a is None:
            return self.const(np.asarray(self.flag(), np.bool_))
        if kind == 1 and isinstance(a.shape[0], int):
            shp = self.out(I64, (len(a.shape),), a.shape)
            self.node("Shape", [a], [shp])
            g = self.out(I64, (), (a.shape[0],))
            self.node("Gather", [shp, self.ints(0)], [g], axis=0)
            c = self.out(BOOL, ())
            self.node("Equal", [g, self.ints(self.choice((1, a.shape[0])))], [c])
            return c
        r = self.out(a.dtype, ())
        self.node("ReduceSum", [a], [r], keepdims=0)
        c = self.out(BOOL, ())
        self.node("Greater", [r, self.const(np.zeros((), a.dtype))], [c])
        if self.flag(20):
            n = self.out(BOOL, ())
            self.node("Not", [c], [n])
            return n
        return c

    def op_if(self, cond: Value | None = None) -> bool:
        srcs = [self.pick(lambda v: v.dtype in (F32, F16, I64) and len(v.shape) <= 4)
                for _ in range(self.draw(st.integers(1, 2)))]
        if srcs[0] is None:
            return False
        cond = cond or self.condition()

        def branch(src_list):
            def build(child: "Builder") -> list[Value]:
                outs = []
                for src in src_list:
                    if child.flag(15) and static(src.shape):  # a branch-own initializer
                        c = child.const(child.random_array(src.shape, src.dtype))
                        outs.append(child.elementwise_chain(c, 1))
                    else:
                        outs.append(child.elementwise_chain(src, child.draw(st.integers(1, 3))))
                if child.flag(15) and len(outs) == 1 and child.flag():
                    child.op_if()  # a nested If in the branch, its outputs unused or returned
                    if child.pool[-1].shape == outs[0].shape and \
                            child.pool[-1].dtype == outs[0].dtype:
                        outs[0] = child.pool[-1]
                return outs
            return build

        then_g, then_out = self.body([], branch(srcs), self.fresh("then"))
        else_g, else_out = self.body([], branch(srcs), self.fresh("else"))
        outs = [self.out(t.dtype, t.shape if t.shape == e.shape else
                         tuple(x if same(x, y) else None for x, y in zip(t.shape, e.shape)))
                for t, e in zip(then_out, else_out)]
        self.node("If", [cond], outs, then_branch=then_g, else_branch=else_g)
        if self.flag(40):  # another If on the same condition (fuse_if)
            self.op_if(cond)
        return True

    def op_loop(self) -> bool:
        v = self.pick(lambda x: x.dtype in (F32, F16, I64) and len(x.shape) <= 3)
        if v is None:
            return False
        sym = self.pick(lambda x: x.dtype == I64 and x.shape == () and x.content is not None) \
            if self.flag(30) else None
        if sym is not None:  # a trip count from the shape of a tensor (symbolic, maybe 0)
            trip, count = sym, sym.content[0]
        else:
            count = self.draw(st.integers(1, 3))
            trip = self.ints(count)
        cond_in = Value(self.fresh("cond"), BOOL, ())
        it = Value(self.fresh("i"), I64, ())
        carried = Value(self.fresh("v"), v.dtype, v.shape)
        scan = self.flag()

        def build(child: "Builder") -> list[Value]:
            cond_out = child.out(BOOL, ())
            child.node("Identity", [cond_in], [cond_out])
            nxt = child.elementwise_chain(carried, child.draw(st.integers(1, 2)))
            if child.flag(20) and child.op_if():  # an If in the body (inline_if, fuse_if)
                last = child.pool[-1]
                if last.shape == nxt.shape and last.dtype == nxt.dtype:
                    nxt = last
            if child.flag(30) and carried.dtype != BOOL:  # use the iteration number
                itc = child.out(carried.dtype, ())
                child.node("Cast", [it], [itc], to=_tensor_dtype(carried.dtype))
                added = child.out(carried.dtype, carried.shape)
                child.node("Add", [nxt, itc], [added])
                nxt = added
            outs = [cond_out, nxt]
            if scan:
                s = child.out(carried.dtype, carried.shape)
                child.node("Relu" if child.floats(carried) else "Abs", [nxt], [s])
                outs.append(s)
            return outs

        body, _ = self.body([it, cond_in, carried], build, self.fresh("body"))
        cond_init = "" if self.flag() else self.const(np.asarray(True)).name
        outs = [self.out(v.dtype, v.shape)]
        if scan:
            outs.append(self.out(v.dtype, (count,) + v.shape))
        self.node("Loop", [trip, cond_init, v], outs, body=body)
        return True

    # ------------------------------------------------------------------ duplicates

    def op_duplicate(self) -> bool:
        """An exact copy of an earlier node (with fresh outputs): CSE merges it."""
        cands = [n for n in self.nodes if n.op_type not in ("If", "Loop", "Split")
                 and len(n.output) == 1]
        if not cands:
            return False
        src = self.choice(cands)
        old = next((v for v in self.pool if v.name == src.output[0]), None)
        if old is None:
            return False
        copy = onnx.NodeProto()
        copy.CopyFrom(src)
        new = self.out(old.dtype, old.shape, old.content)
        copy.output[0] = new.name
        k = self.op_count[src.op_type]
        self.op_count[src.op_type] = k + 1
        copy.name = f"{src.op_type}_{k}"
        self.nodes.append(copy)
        self.pool.append(new)
        return True


def value_info(v: Value, declare_shape: bool = True) -> onnx.ValueInfoProto:
    """The ValueInfoProto of ``v``; an untracked dim is declared with neither value nor
    parameter, and ``declare_shape=False`` declares the rank only."""
    return helper.make_tensor_value_info(v.name, _tensor_dtype(v.dtype),
                                         list(v.shape) if declare_shape else [None] * len(v.shape))


OPS: dict[str, Callable[[Builder], bool]] = {
    "binary": Builder.op_binary, "unary": Builder.op_unary, "where": Builder.op_compare_where,
    "reduce": Builder.op_reduce, "reshape": Builder.op_reshape,
    "transpose": Builder.op_transpose, "squeeze": Builder.op_squeeze_unsqueeze,
    "flatten": Builder.op_flatten, "expand": Builder.op_expand, "shape": Builder.op_shape,
    "slice": Builder.op_slice, "gather": Builder.op_gather, "concat": Builder.op_concat,
    "split": Builder.op_split, "tile": Builder.op_tile, "pad": Builder.op_pad,
    "range": Builder.op_range, "cast": Builder.op_cast, "conv": Builder.op_conv,
    "batchnorm": Builder.op_batchnorm, "matmul": Builder.op_matmul, "gemm": Builder.op_gemm,
    "softmax": Builder.op_softmax, "layernorm": Builder.op_layernorm, "if": Builder.op_if,
    "loop": Builder.op_loop, "duplicate": Builder.op_duplicate,
}


def _input_shape(b: Builder) -> tuple:
    rank = b.draw(st.integers(1, 4))
    if rank == 4 or b.flag(25):  # an image: N, C, H, W
        return (b.choice(("N", 1, 2)), b.choice((1, 2, 3, 4)), b.choice((3, 4, 5)),
                b.choice((3, 4)))
    dims = [b.choice((1, 2, 3, 4)) for _ in range(rank)]
    if b.flag(45):
        dims[0] = "N"
    if rank >= 2 and b.flag(20):
        dims[1] = "S"
    return tuple(dims)


@st.composite
def models(draw, max_ops: int = 8) -> Case:
    """A random valid model (see the module docstring) with 1 to ``max_ops`` operator steps
    (a step may add a few nodes), as a :class:`Case`."""
    opset = draw(st.integers(13, 21))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    b = Builder(draw, rng, opset, [0])
    b.float = F16 if b.flag(20) else F32
    inputs = []
    for i in range(draw(st.integers(1, 2))):
        dtype = I64 if i and b.flag(25) else b.float
        inputs.append(Value(f"in{i}", dtype, _input_shape(b)))
    b.pool = list(inputs)
    overridable = []
    if b.flag(20):  # an initializer that is also a graph input (an overridable default)
        shape = tuple(d if isinstance(d, int) else 1 for d in inputs[0].shape)
        w = b.const(b.random_array(shape, b.float))
        b.pool.append(w)
        overridable.append(w.name)
        if b.flag(30):  # the same bytes under another name (dedup_initializers)
            b.inits.append(numpy_helper.from_array(numpy_helper.to_array(b.inits[-1]),
                                                   b.fresh("c")))
            b.pool.append(Value(b.inits[-1].name, w.dtype, w.shape))
    steps = draw(st.integers(1, max_ops))
    names = list(OPS)
    for _ in range(steps):
        for _attempt in range(4):
            if OPS[draw(st.sampled_from(names))](b):
                break
    produced = [v for v in b.pool if v not in inputs and v.name not in overridable
                and not any(v.name == i.name for i in b.inits)]
    if not produced:
        b.node("Identity", [inputs[0]], [b.out(inputs[0].dtype, inputs[0].shape)])
        produced = [b.pool[-1]]
    # outputs: the last value (a chain's end) and a few others, which nodes may also read
    chosen = [produced[-1]] + draw(st.lists(st.sampled_from(produced), max_size=2))
    outputs = list({v.name: v for v in chosen}.values())
    declare = [b.flag(85) for _ in outputs]
    graph = helper.make_graph(
        b.nodes, "fuzz", [value_info(v) for v in inputs]
        + [value_info(Value(n, *_init_type(b, n))) for n in overridable],
        [value_info(v, d) for v, d in zip(outputs, declare)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="onnxopt-fuzz")
    model.ir_version = IR_VERSIONS[opset]
    onnx.checker.check_model(model, full_check=True)
    symbols = {s: vals for s, vals in SYMBOLS.items()
               if any(s in v.shape for v in inputs)}
    return Case(model, symbols, tuple(overridable))


def _init_type(b: Builder, name: str) -> tuple[np.dtype, tuple]:
    init = next(i for i in b.inits if i.name == name)
    return np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)), tuple(init.dims)


def feeds(case: Case, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds for ``case.model``: the symbols at their defaults (two random draws, the second
    also overriding the overridable initializers), then each symbol at each other value, then
    every symbol at 0 at once. Floats are normal, int64 values in [0, 5)."""
    defaults = {s: vals[0] for s, vals in case.symbols.items()}
    settings = [dict(defaults), dict(defaults)]
    for s, vals in case.symbols.items():
        settings += [{**defaults, s: v} for v in vals[1:]]
    if len(case.symbols) > 1:
        settings.append({s: 0 for s in case.symbols})
    rng = np.random.default_rng(seed)
    graph = case.model.graph
    inits = {i.name for i in graph.initializer}
    out = []
    for k, dims in enumerate(settings):
        feed = {}
        for inp in graph.input:
            if inp.name in inits and (k != 1 or inp.name not in case.overridable):
                continue
            tt = inp.type.tensor_type
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
            shape = [d.dim_value if d.HasField("dim_value") else dims[d.dim_param]
                     for d in tt.shape.dim]
            if dtype.kind == "f":
                feed[inp.name] = rng.normal(size=shape).astype(dtype)
            else:
                feed[inp.name] = rng.integers(0, 5, size=shape).astype(dtype)
        out.append(feed)
    return out
