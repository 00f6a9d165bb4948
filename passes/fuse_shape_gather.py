"""Shape-slice fusion: ``Unsqueeze(Gather(Shape(x), i), [0])`` becomes
``Shape(x, start=a, end=a+1)``.

The idiom of traced exports for "dim ``i`` of ``x`` as a 1-element tensor" (to build a target shape
with ``Concat``). ONNX spec: ``Shape(x, start, end)`` (opset 15+; ``start`` default 0, ``end``
default ``r``, negative values count from ``r``, both clamped to ``[0, r]``) is the 1-D int64
tensor of the dims ``a`` in ``range(r)[start:end]``; ``Gather(data, indices)`` on a 1-D ``data``
with a 0-d ``indices = i`` (``-len <= i < len``, negative counting from the end; out of range is an
error) is the 0-d element ``data[i]``; ``Unsqueeze`` of a 0-d tensor by ``[0]`` (or ``[-1]``, the
same axis of the rank-1 output) is the 1-D tensor ``[data[i]]``. With ``a = range(r)[start:end][i]``
(``0 <= a < r``), ``Shape(x, start=a, end=a+1)`` is ``[dim a of x]``: the same int64 values, for
any ``x`` of rank ``r``, so the rewrite is exact.

Applied when every reader of the Gather is such an Unsqueeze (each is rewritten in place into the
new Shape, keeping its output tensor; CSE merges duplicates) and the Gather's output is not a graph
output: the Gather goes, and the original Shape too when nothing else reads it -- one node fewer at
least. Needs opset 15 (``start``/``end`` of Shape) and the rank of ``x`` (``onnxopt.analyses.
TensorTypes``; an index it makes out of range is left alone: the original fails there). The Gather's
``axis`` must be 0 (or -1: ``data`` is 1-D) and ``i`` a 0-d integer initializer. Every graph and
subgraph is handled.

Two more shape-slice rules, by the same Shape semantics:

- ``Slice(Shape(x), s, e)`` (constant ``s``, ``e``, axis 0, step 1) is
  ``Shape(x, start=a, end=b)`` for ``[a, b)`` the dims ``range(r)[start:end][s:e]`` (ONNX Slice
  on a 1-D tensor with step 1 adds the length to negative bounds and clamps them to
  ``[0, length]``, as Python's slicing does): the Slice becomes that Shape in place, and the
  original Shape goes when nothing else reads it. Needs the rank of ``x``.
- A shape slice of equal dims computed from another tensor: ``Shape(x, start=a, end=b)`` whose
  dims are, by the symbolic shapes of ``TensorTypes`` (ints, and symbols naming one size for
  every input the graph accepts), those of dims ``c .. c+b-a-1`` of a tensor ``y`` that comes
  first in its graph (its inputs, then its nodes' outputs in topological order) becomes
  ``Shape(y, start=c, end=c+b-a)``: the same values for every input. Every such slice of a
  graph then reads the first tensor that has those dims, so CSE merges them and the shape
  arithmetic built on them (an attention block's ``[-1, seq_len, 64]`` target in every layer).
  Only slices with a symbol among their dims (all-static ones are constants, folded by
  ``fold_constants``) and no unknown dim.

Statistics: ``rewritten``; ``by_kind``: ``gather`` (Gathers removed, each of their Unsqueezes
turned into a Shape), ``slice`` (Slices turned into Shapes), ``first source`` (Shapes reading
the first tensor with their dims); ``refused`` per reason: ``rank unknown``, ``index out of
range``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.analyses.types import rank1_slice
from onnxopt.edit import constant_value, int_list
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, producer_in_scope, refuse


def _unsqueezes(out: gs.Tensor, scope: Scope) -> list[gs.Node] | None:
    """The readers of ``out`` when every one is ``Unsqueeze(out, [0])`` (or ``[-1]``) and ``out``
    is not an output of the scope's graph, else None."""
    if not out.outputs or scope.is_output(out):
        return None
    for node in out.outputs:
        if node.op != "Unsqueeze" or not is_default_domain(node) or node.inputs[0] is not out \
                or int_list(node, "axes", 1) not in ([0], [-1]):
            return None
    return list(out.outputs)


def _dim(gather: gs.Node, shape: gs.Node, types: TensorTypes) -> int | Refusal | None:
    """The axis ``a`` of ``x`` that ``Gather(Shape(x), i)`` reads, a refusal reason, or None when
    the Gather is not of this form."""
    index = constant_value(gather.inputs[1])
    if index is None or np.ndim(index) != 0 or np.asarray(index).dtype.kind not in "iu" \
            or gather.attrs.get("axis", 0) not in (0, -1):
        return None
    rank = types.rank(shape.inputs[0])
    if rank is None:
        return refuse("rank unknown")
    axes = range(rank)[shape.attrs.get("start", 0):shape.attrs.get("end", rank)]
    i = int(index)
    if not -len(axes) <= i < len(axes):
        return refuse("index out of range")
    return axes[i]


def _shape_range(node: gs.Node, types: TensorTypes) -> range | None:
    """The axes of its input a Shape node reads, None when the rank is unknown."""
    rank = types.rank(node.inputs[0])
    return None if rank is None else \
        range(rank)[node.attrs.get("start", 0):node.attrs.get("end", rank)]


def _slice_axes(node: gs.Node, types: TensorTypes) -> tuple[gs.Node, range] | Refusal | None:
    """``(Shape, axes)`` for ``Slice(Shape(x), s, e)`` by constants, axis 0, step 1: the axes of
    ``x`` whose dims it holds; a refusal, or None when the Slice is not of this form."""
    shape, taken = producer_in_scope(node.inputs[0]), rank1_slice(node)
    if shape is None or shape.op != "Shape" or taken is None or taken.step != 1:
        return None
    axes = _shape_range(shape, types)
    return refuse("rank unknown") if axes is None else (shape, axes[taken])


class _Sources:
    """The tensors of one graph in order (its inputs, then its nodes' outputs, topologically
    sorted), with their symbolic shapes: where a run of dims is first found."""

    def __init__(self, graph: gs.Graph, types: TensorTypes):
        self._graph, self._types = graph, types
        self._tensors = list(graph.inputs) + [t for n in graph.nodes for t in n.outputs]

    def first(self, dims: tuple, x: gs.Tensor) -> tuple[gs.Tensor, int] | None:
        """``(y, c)``: the first tensor ``y`` up to ``x`` with ``dims`` at ``c .. c+len(dims)-1``;
        None when ``x`` is not of this graph."""
        n = len(dims)
        for t in self._tensors:
            shape = self._types.symbolic_shape(t)
            if shape is not None and (t.inputs or t in self._graph.inputs):
                for c in range(len(shape) - n + 1):
                    if shape[c:c + n] == dims:
                        return t, c
            if t is x:
                return None
        return None


@register
class FuseShapeGather(RewritePass):
    name = "fuse_shape_gather"
    description = ("Turn Unsqueeze(Gather(Shape(x), i), [0]) and Slice(Shape(x), s, e) into "
                   "Shape(x, start, end), reading the first tensor with the same dims.")
    ops = ("Gather", "Slice", "Shape")
    min_opset = 15
    sorted_walk = True

    def start(self, graph: gs.Graph, ctx) -> None:
        self._sources: dict[int, _Sources] = {}

    def match(self, node: gs.Node, scope: Scope) -> tuple | Refusal | None:
        """``("gather", Shape, Unsqueezes, axis)``, ``("slice", Shape, axes)`` or
        ``("first", y, c)``."""
        if node.op == "Gather":
            found = self._gather(node, scope)
        elif node.op == "Slice":
            found = _slice_axes(node, scope.types)
            found = found if found is None or isinstance(found, Refusal) else ("slice", *found)
        else:
            found = self._first(node, scope)
        return found

    def _first(self, shape: gs.Node, scope: Scope) -> tuple | None:
        """``("first", y, c)`` when the dims ``shape`` reads are first found in ``y`` at ``c``,
        another place than where it reads them."""
        x = shape.inputs[0]
        dims, axes = scope.types.symbolic_shape(x), _shape_range(shape, scope.types)
        if dims is None or axes is None or not axes:
            return None
        run = tuple(dims[a] for a in axes)
        if None in run or all(isinstance(d, int) for d in run):
            return None
        if id(scope.graph) not in self._sources:
            self._sources[id(scope.graph)] = _Sources(scope.graph, scope.types)
        found = self._sources[id(scope.graph)].first(run, x)
        return None if found is None or found == (x, axes.start) else ("first", *found)

    def _gather(self, gather: gs.Node, scope: Scope) -> tuple | Refusal | None:
        """``("gather", Shape, Unsqueezes reading the Gather, axis of x)``."""
        data = gather.inputs[0]
        shape = data.inputs[0] if len(data.inputs) == 1 else None
        if shape is None or shape.op != "Shape" or not is_default_domain(shape):
            return None
        readers = _unsqueezes(gather.outputs[0], scope)
        if readers is None:
            return None
        a = _dim(gather, shape, scope.types)
        return a if a is None or isinstance(a, Refusal) else ("gather", shape, readers, a)

    def rewrite(self, node: gs.Node, match: tuple, scope: Scope) -> str:
        kind = match[0]
        if kind == "gather":
            _, shape, readers, a = match
            for reader in readers:
                _make_shape(reader, shape.inputs[0], a, a + 1)
            node.inputs.clear()
            node.outputs.clear()
            scope.drop_if_unused(shape)
            return "gather"
        if kind == "slice":
            _, shape, axes = match
            _make_shape(node, shape.inputs[0], axes.start, axes.start + len(axes))
            scope.drop_if_unused(shape)
            return "slice"
        _, y, c = match
        length = len(_shape_range(node, scope.types))
        _make_shape(node, y, c, c + length)
        return "first source"


def _make_shape(node: gs.Node, x: gs.Tensor, start: int, end: int) -> None:
    """Make ``node`` (its output kept) ``Shape(x, start=start, end=end)``."""
    node.op = "Shape"
    node.inputs.clear()
    node.inputs.append(x)
    node.attrs = {"start": start, "end": end}
