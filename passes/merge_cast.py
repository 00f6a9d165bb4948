"""Cast merging: ``Cast(Cast(X: A, to=B), to=C)`` becomes ``Cast(X, to=C)`` when B widens A exactly.

ONNX ``Cast`` (spec, opsets 1-21) converts each element to the type ``to``. When every value of
type A is a value of type B (the table below), ``Cast(A->B)`` changes no value, so the second Cast
sees exactly the values of X and ``Cast(B->C)(Cast(A->B)(x)) = Cast(A->C)(x)``: the result is
bit-identical. With ``C = A`` the pair is a round trip and disappears (the second Cast is bypassed;
its consumers read X). A Cast whose ``to`` equals its input type is another pass's business
(``remove_noop``) and is not looked for here.

Exact widenings, A -> B (B holds every value of A; float16 has an 11-bit significand so integers up
to 2**11 are exact, bfloat16 8 bits so up to 2**8, float32 24 bits, float64 53 bits)::

    bool     -> every integer and float type
    uint8    -> uint16 uint32 uint64 int16 int32 int64 float16 bfloat16 float32 float64
    int8     -> int16 int32 int64 float16 bfloat16 float32 float64
    uint16   -> uint32 uint64 int32 int64 float32 float64
    int16    -> int32 int64 float32 float64
    uint32   -> uint64 int64 float64
    int32    -> int64 float64
    float16  -> float32 float64
    bfloat16 -> float32 float64
    float32  -> float64

Refused (stats ``refused``): ``not_exact_widening`` (B loses values of A; e.g. float32 -> float16
-> float32 rounds), ``float_to_integer`` (A is a float type and C an integer type other than A:
the spec leaves out-of-range float-to-integer conversion undefined, and the two conversions take
different code paths), ``input_dtype_unknown`` (A is known from an initializer, a main-graph input,
a producing Cast or shape inference of the main graph's tensors -- never from declared value_info),
``attributes`` (a Cast attribute other than ``to``, e.g. float8 ``saturate``),
.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto as T

from optimizer.graph import iter_graphs
from optimizer.pass_manager import Pass, PassContext, PassResult, register
from passes._util import bypass, drop_disconnected, infer_tensor_types, is_default_domain

_INTS = (T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.UINT64, T.INT64)
_FLOATS = (T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE)

#: A -> the types B that hold every value of A (see the module docstring).
EXACT_WIDENINGS: dict[int, frozenset[int]] = {
    T.BOOL: frozenset(_INTS + _FLOATS),
    T.UINT8: frozenset({T.UINT16, T.UINT32, T.UINT64, T.INT16, T.INT32, T.INT64, T.FLOAT16,
                        T.BFLOAT16, T.FLOAT, T.DOUBLE}),
    T.INT8: frozenset({T.INT16, T.INT32, T.INT64, T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE}),
    T.UINT16: frozenset({T.UINT32, T.UINT64, T.INT32, T.INT64, T.FLOAT, T.DOUBLE}),
    T.INT16: frozenset({T.INT32, T.INT64, T.FLOAT, T.DOUBLE}),
    T.UINT32: frozenset({T.UINT64, T.INT64, T.DOUBLE}),
    T.INT32: frozenset({T.INT64, T.DOUBLE}),
    T.FLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.BFLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.FLOAT: frozenset({T.DOUBLE}),
}


def _drop_if_unused(graph: gs.Graph, node: gs.Node) -> bool:
    """Disconnect ``node`` when none of its outputs is read or is an output of ``graph``."""
    outputs = {id(t) for t in graph.outputs}
    if any(t.outputs or id(t) in outputs for t in node.outputs):
        return False
    node.inputs.clear()
    node.outputs.clear()
    return True


def _onnx_type(dtype) -> int | None:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


class _InputTypes:
    """The ONNX element type of a Cast's input, from trusted sources only (see the docstring)."""

    def __init__(self, graph: gs.Graph, ctx: PassContext):
        self._main, self._ctx, self._inferred, self._tensors = graph, ctx, None, None

    def _main_tensors(self) -> dict[str, gs.Tensor]:
        if self._tensors is None:
            self._tensors = self._main.tensors()
        return self._tensors

    def __call__(self, tensor: gs.Tensor) -> int | None:
        if isinstance(tensor, gs.Constant):
            return _onnx_type(tensor.dtype)
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Cast" \
                and is_default_domain(tensor.inputs[0]):
            return int(tensor.inputs[0].attrs["to"])
        if self._main_tensors().get(tensor.name) is not tensor:
            return None  # a subgraph's own tensor: shape inference covers the main graph only
        if any(t is tensor for t in self._main.inputs):
            return _onnx_type(tensor.dtype) if tensor.dtype is not None else None
        if self._inferred is None:
            self._inferred = infer_tensor_types(self._main, self._ctx.template)
        dtype = self._inferred.get(tensor.name, (None, None))[0]
        return None if dtype is None else _onnx_type(dtype)


def _refusal(a: int | None, b: int, c: int) -> str | None:
    if a is None:
        return "input_dtype_unknown"
    if b not in EXACT_WIDENINGS.get(a, ()):
        return "not_exact_widening"
    if a in _FLOATS and c in _INTS and c != a:
        return "float_to_integer"
    return None


@register
class MergeCast(Pass):
    name = "merge_cast"
    description = "Merge Cast(A->B) then Cast(B->C) into Cast(A->C) when B holds every value of A."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = cancelled = removed = 0
        refused: collections.Counter[str] = collections.Counter()
        input_type = _InputTypes(graph, ctx)
        graphs = list(iter_graphs(graph))
        owner = {id(n): g for g in graphs for n in g.nodes}
        for g in graphs:
            g.toposort(recurse_subgraphs=False)
            for second in list(g.nodes):
                if second.op != "Cast" or not is_default_domain(second) or not second.outputs:
                    continue
                mid = second.inputs[0]
                if len(mid.inputs) != 1 or mid.inputs[0].op != "Cast" \
                        or not is_default_domain(mid.inputs[0]):
                    continue
                first = mid.inputs[0]
                fg = owner.get(id(first))
                if fg is None:
                    continue
                if set(first.attrs) != {"to"} or set(second.attrs) != {"to"}:
                    refused["attributes"] += 1
                    continue
                x = first.inputs[0]
                a, b, c = input_type(x), int(first.attrs["to"]), int(second.attrs["to"])
                reason = _refusal(a, b, c)
                if reason:
                    refused[reason] += 1
                    continue
                if a == c and bypass(g, second, x, second.outputs[0]):
                    cancelled += 1
                else:
                    second.inputs[0] = x
                    merged += 1
                removed += _drop_if_unused(fg, first)
        for g in graphs:
            drop_disconnected(g)
        stats = {"merged": merged, "cancelled": cancelled, "nodes_removed": removed + cancelled,
                 "refused": dict(refused)}
        return PassResult(merged + cancelled > 0, stats)
