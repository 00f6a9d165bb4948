"""The channel bookkeeping of multi-head attention, shared by the passes that reason about it.

A transformer's attention as exported by PyTorch and most converters (``D = N * H`` channels,
``N`` heads of ``H``; ONNX ``Reshape``, ``Transpose``, ``MatMul``, ``Softmax``)::

    heads(t)     = Transpose(Reshape(t, [0, 0, -1, H]), perm=[0, 2, 1, 3])   # -> [B, N, S, H]
    keys(t)      = Transpose(Reshape(t, [0, 0, -1, H]), perm=[0, 2, 3, 1])   # -> [B, N, H, S]
    scores       = MatMul(heads(q), keys(k)), then scalar Mul/Div and Adds (the mask)
    P            = Softmax(scores, axis=-1)                                   rows sum to 1
    merged(P, v) = Reshape(Transpose(MatMul(P, heads(v)), perm=[0, 2, 1, 3]), [0, 0, -1])

Channel ``c = n H + d`` of ``t`` is head ``n``'s channel ``d`` in ``heads(t)`` and ``keys(t)``,
and channel ``c`` of ``merged(P, v)`` is ``sum_t P[n, ., t] v[t, c]``: the split and the merge
only move channels, ``P`` mixes positions, never channels. The ``Reshape`` shapes must copy the
leading dimensions (``0`` entries, ``allowzero`` unset) and split or merge only the last axis,
so that the mapping holds for every batch size and sequence length; the split's input must be
of rank 3, proven (``rank``: ``TensorTypes.rank``): a ``0`` of ``[0, 0, -1, H]`` copies
whatever the input's second axis is, the channels of an unbatched ``[S, D]`` input, whose
"heads" then mix channels along the softmax axis and in ``P v``.

Each helper walks one arrangement from its end back to its start and returns the nodes, or a
reason (a string) when the graph is not that arrangement. ``single(t)`` tells whether a tensor
may change with the rewrite: a variable with one reader that is no graph input or output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_graphsurgeon as gs

from onnxopt.rewrite import producer_in_scope

Single = Callable[[gs.Tensor], bool]
Rank = Callable[[gs.Tensor], "int | None"]

HEADS = [0, 2, 1, 3]
KEYS = [0, 2, 3, 1]


def _copies_leading(shape: gs.Tensor, rank: int) -> bool:
    """A Reshape ``shape`` constant of length ``rank`` whose first ``rank - 2`` entries are 0
    (copy the input's dimensions)."""
    return isinstance(shape, gs.Constant) and shape.values.shape == (rank,) \
        and not shape.values[:rank - 2].any()


def producer(t: gs.Tensor, op: str, single: Single) -> gs.Node | None:
    """``t``'s producer when it is a default-domain ``op`` node and ``single(t)``."""
    node = producer_in_scope(t) if isinstance(t, gs.Variable) and single(t) else None
    return node if node is not None and node.op == op else None


@dataclass
class Split:
    """``t`` split into heads: ``transpose(reshape(source))``; ``head_size`` is ``H``."""

    source: gs.Tensor
    reshape: gs.Node
    transpose: gs.Node
    head_size: int


def split_heads(t: gs.Tensor, perm: list[int], single: Single, rank: Rank) -> Split | str:
    """``t = Transpose(Reshape(source, [0, 0, -1 | N, H]), perm)`` (``perm``: :data:`HEADS` or
    :data:`KEYS`), ``source`` of rank 3 (``rank(source)``), every intermediate ``single``, or
    why not."""
    transpose = producer(t, "Transpose", single)
    reshape = transpose and producer(transpose.inputs[0], "Reshape", single)
    if transpose is None or reshape is None or list(transpose.attrs.get("perm", [])) != perm:
        return "not a per-head Transpose of a Reshape"
    shape = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    if reshape.attrs.get("allowzero", 0) or shape is None or not _copies_leading(shape, 4):
        return "the head split does not copy the leading dimensions"
    head_size = int(shape.values[3])
    if head_size <= 0 or int(shape.values[2]) == 0:
        return "the head split's sizes are not given"
    if rank(reshape.inputs[0]) != 3:
        return "the head split's input is not of a known rank 3"
    return Split(reshape.inputs[0], reshape, transpose, head_size)


@dataclass
class Merged:
    """``x = Reshape(Transpose(MatMul(P, heads(values))))``: ``matmul`` is the MatMul."""

    matmul: gs.Node
    values: Split


def merged_heads(x: gs.Tensor, channels: int, single: Single, rank: Rank) -> Merged | str:
    """``x`` (``[B, S, channels]``) as the merged heads of an attention, or why not; the
    intermediates between ``x``'s MatMul and ``x``, and the value path, ``single``."""
    if not isinstance(x, gs.Variable) or len(x.inputs) != 1 or x.inputs[0].op != "Reshape":
        return "not a Reshape"
    merge = x.inputs[0]
    shape = merge.inputs[1] if len(merge.inputs) > 1 else None
    if merge.attrs.get("allowzero", 0) or shape is None or not _copies_leading(shape, 3) \
            or int(shape.values[2]) not in (-1, channels):
        return "not a merge of the last two axes"
    out = producer(merge.inputs[0], "Transpose", single)
    matmul = out and producer(out.inputs[0], "MatMul", single)
    if out is None or matmul is None or list(out.attrs.get("perm", [])) != HEADS:
        return "not heads merged from MatMul(P, V)"
    values = split_heads(matmul.inputs[1], HEADS, single, rank)
    if isinstance(values, str):
        return values
    if channels % values.head_size or int(values.reshape.inputs[1].values[2]) not in (
            -1, channels // values.head_size):
        return "head split and merge disagree"
    return Merged(matmul, values)
