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

Statistics: ``rewritten`` (Gathers removed, each of their Unsqueezes turned into a Shape) and
``refused`` per reason: ``rank unknown``, ``index out of range``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.edit import constant_value, int_list
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


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


@register
class FuseShapeGather(RewritePass):
    name = "fuse_shape_gather"
    description = "Turn Unsqueeze(Gather(Shape(x), i), [0]) into Shape(x, start=i, end=i+1)."
    ops = ("Gather",)
    min_opset = 15

    def match(self, gather: gs.Node, scope: Scope
              ) -> tuple[gs.Node, list[gs.Node], int] | Refusal | None:
        """``(Shape, Unsqueezes reading the Gather, axis of x)``."""
        data = gather.inputs[0]
        shape = data.inputs[0] if len(data.inputs) == 1 else None
        if shape is None or shape.op != "Shape" or not is_default_domain(shape):
            return None
        readers = _unsqueezes(gather.outputs[0], scope)
        if readers is None:
            return None
        a = _dim(gather, shape, scope.types)
        return a if a is None or isinstance(a, Refusal) else (shape, readers, a)

    def rewrite(self, gather: gs.Node, match: tuple[gs.Node, list[gs.Node], int],
                scope: Scope) -> None:
        shape, readers, a = match
        for node in readers:
            node.op = "Shape"
            node.inputs.clear()
            node.inputs.append(shape.inputs[0])
            node.attrs = {"start": a, "end": a + 1}
        gather.inputs.clear()
        gather.outputs.clear()
        scope.drop_if_unused(shape)
