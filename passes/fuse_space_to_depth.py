"""Space-to-depth fusion: the YOLOv5 "Focus" block -- four strided Slices of one tensor
concatenated along the channels -- becomes one ``SpaceToDepth``.

ONNX ``SpaceToDepth`` (spec, opsets 1-21; reference ``onnx/reference/ops/op_space_to_depth.py``),
``X`` of shape ``[N, C, H, W]``, ``blocksize`` ``b``::

    Y = reshape(transpose(reshape(X, [N, C, H/b, b, W/b, b]), [0, 3, 5, 1, 2, 4]),
                [N, C·b·b, H/b, W/b])

so ``Y[n, (bh·b + bw)·C + c, h, w] = X[n, c, h·b + bh, w·b + bw]`` for block offsets ``bh, bw``.
``Slice`` (spec, opsets 10-21) with ``starts = [h0, w0]``, ``ends`` to the end, ``axes = [2, 3]``
and ``steps = [2, 2]`` gives ``S[n, c, h, w] = X[n, c, 2h + h0, 2w + w0]`` with ``ceil((H-h0)/2)``
rows. For even ``H`` and ``W`` and ``h0, w0`` in ``{0, 1}`` that is ``H/2`` rows and::

    Slice(X, [h0, w0]) = Y[:, k·C : (k+1)·C],   k = 2·h0 + w0   (b = 2)

So ``Concat(S_0, S_1, S_2, S_3, axis=1)`` of the four offsets in any order has channel
``j·C + c`` equal to channel ``perm[j·C + c] = k_j·C + c`` of ``Y``, ``k_j`` the block of the
``j``-th input (YOLOv5 concatenates (0,0), (1,0), (0,1), (1,1): ``k = 0, 2, 1, 3``)::

    Concat(S_0, ..., S_3, axis=1) = Gather(SpaceToDepth(X, 2), perm, axis=1)

(onnxruntime's own rewrite). Only static, even ``H`` and ``W`` are accepted: for odd sizes the
slices differ in size and the original Concat is invalid -- onnxruntime 1.32 fails on most, but
for ``H = 1`` or ``W = 1`` it skips the empty slices and returns a tensor where ``SpaceToDepth``
fails -- so a model that is rewritten has one runnable input size, at which both agree. Three
forms, all moving values only:

- ``perm`` the identity (the slices in block order): just ``SpaceToDepth`` (4 nodes fewer);
- the Concat's only reader is input 0 of a ``Conv`` with ``group = 1`` and an initializer weight
  ``W [M, 4C, ...]``: ``Σ_i W[m, i]·Concat[i] = Σ_i W[m, i]·Y[perm[i]]``, so the Conv reads ``Y``
  with ``W'[:, perm[i]] = W[:, i]`` (a new initializer; 4 nodes fewer). The weight values are
  only moved; the Conv may accumulate its sum in another order (float rounding);
- otherwise ``Gather`` with a constant ``perm``, which needs ``C`` static (3 nodes fewer).

Conditions: a default-domain Concat on axis 1 (or -3) of exactly four Slice outputs of the same
tensor ``X`` of rank 4 with static even ``H`` and ``W`` (shape inference,
``onnxopt.analyses.TensorTypes``); each Slice in input form (opset 10+) with constant
starts/ends/axes/steps, slicing axes 2 and 3 (negative: -2, -1) by step 2 from 0 or 1 to the end
(an end of at least the dim) and nothing else; the four offsets are the four blocks; each Slice is
read only by the Concat; ``X``'s dtype is one onnxruntime's CPU ``SpaceToDepth`` implements
(float, double, float16, uint8; the spec allows all, onnxruntime does not).

The Concat node becomes the ``SpaceToDepth`` (keeping its output tensor, except in the Gather form
where the new Gather writes it); the Slices are removed. Works in every graph and subgraph.

Statistics: ``rewritten``, ``by_kind`` per form (``space_to_depth``, ``into_conv``, ``gather``),
and ``refused`` per reason: ``slice is not a focus slice`` (other starts, steps, ends or axes, or
not constant), ``slice read elsewhere``, ``size unknown`` (rank, ``H`` or ``W`` not known),
``odd size``, ``dtype not supported`` (unknown or not implemented), ``channels unknown`` (Gather
form without a static ``C``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_refusal, constant_value
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

#: Element types onnxruntime's CPU provider implements SpaceToDepth for (1.32).
_DTYPES = frozenset(np.dtype(t) for t in (np.float32, np.float64, np.float16, np.uint8))


@dataclass
class _Focus:
    """A Focus block: ``slices`` of ``x`` concatenated in channel order ``perm`` of
    ``SpaceToDepth(x, 2)``; ``conv`` the Conv that alone reads the Concat and can take ``perm``
    into its weight, or None."""

    x: gs.Tensor
    slices: list[gs.Node]
    perm: np.ndarray
    conv: gs.Node | None


def _block(node: gs.Node, shape: tuple) -> int | None:
    """The block ``k = 2·h0 + w0`` a Focus Slice takes from its input of static rank-4 ``shape``,
    or None when it is not a Focus Slice."""
    if "starts" in node.attrs or not 3 <= len(node.inputs) <= 5:
        return None
    values = [None if t.is_empty() else constant_value(t) for t in node.inputs[1:5]]
    if any(v is None and not t.is_empty() for v, t in zip(values, node.inputs[1:5])):
        return None
    values += [None] * (4 - len(values))
    starts, ends, axes, steps = (None if v is None else np.asarray(v, np.int64).ravel()
                                 for v in values)
    axes = np.arange(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    if not len(starts) == len(ends) == len(axes) == len(steps) == 2 \
            or any(a < -4 or a > 3 for a in axes) or sorted(int(a) % 4 for a in axes) != [2, 3]:
        return None
    offsets = {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step != 2 or start not in (0, 1) or end < shape[int(axis) % 4]:
            return None
        offsets[int(axis) % 4] = int(start)
    return 2 * offsets[2] + offsets[3]


def _conv_reader(out: gs.Tensor, scope: Scope) -> gs.Node | None:
    """The Conv that alone reads ``out`` (input 0, group 1, initializer weight of rank 4)."""
    if len(out.outputs) != 1 or scope.is_output(out):
        return None
    conv = out.outputs[0]
    if conv.op != "Conv" or not is_default_domain(conv) or conv.attrs.get("group", 1) != 1 \
            or len(conv.inputs) < 2 or conv.inputs[0] is not out \
            or any(t is out for t in conv.inputs[1:]):
        return None
    w = conv.inputs[1]
    if constant_refusal(w, "weight") or w.values.ndim != 4 or w.values.shape[1] % 4:
        return None
    return conv


@register
class FuseSpaceToDepth(RewritePass):
    name = "fuse_space_to_depth"
    description = ("Replace the YOLOv5 Focus block (four strided Slices concatenated on the "
                   "channels) by SpaceToDepth, the channel order folded into a Conv or a Gather.")
    ops = ("Concat",)

    def match(self, concat: gs.Node, scope: Scope) -> Refusal | _Focus | None:
        """None when ``concat`` is not four Slices of one tensor on axis 1 (no Focus at all)."""
        if len(concat.inputs) != 4 or concat.attrs.get("axis") not in (1, -3):
            return None
        slices = []
        for t in concat.inputs:
            producer = t.inputs[0] if len(t.inputs) == 1 else None
            if producer is None or producer.op != "Slice" or not is_default_domain(producer) \
                    or scope.usedef.owner(producer) is not scope.graph:
                return None
            slices.append(producer)
        x = slices[0].inputs[0]
        if any(s.inputs[0] is not x for s in slices):
            return None
        shape = scope.types.shape(x)
        if shape is None or len(shape) != 4 or shape[2] is None or shape[3] is None:
            return refuse("size unknown")
        if shape[2] % 2 or shape[3] % 2:
            return refuse("odd size")
        blocks = [_block(s, shape) for s in slices]
        if None in blocks or sorted(blocks) != [0, 1, 2, 3]:
            return refuse("slice is not a focus slice")
        for s in slices:
            out = s.outputs[0]
            if len(s.outputs) != 1 or len(out.outputs) != 1 or scope.is_output(out):
                return refuse("slice read elsewhere")
        conv = _conv_reader(concat.outputs[0], scope)
        dtype = scope.types.dtype(x)
        if dtype is None and conv is not None:
            dtype = np.dtype(conv.inputs[1].dtype)
        if dtype is None or np.dtype(dtype) not in _DTYPES:
            return refuse("dtype not supported")
        channels = conv.inputs[1].values.shape[1] // 4 if conv is not None else shape[1]
        if channels is None:
            return refuse("channels unknown")
        perm = np.concatenate([np.arange(channels) + k * channels for k in blocks])
        return _Focus(x, slices, perm, conv)

    def rewrite(self, concat: gs.Node, focus: _Focus, scope: Scope) -> str:
        """The Concat becomes the SpaceToDepth; returns the form used."""
        out, perm, conv = concat.outputs[0], focus.perm, focus.conv
        for s in focus.slices:
            s.inputs.clear()
            s.outputs.clear()
        concat.op = "SpaceToDepth"
        concat.attrs = {"blocksize": 2}
        concat.inputs.clear()
        concat.inputs.append(focus.x)
        if np.array_equal(perm, np.arange(len(perm))):
            return "space_to_depth"
        if conv is not None:
            w = conv.inputs[1]
            moved = np.empty_like(w.values)
            moved[:, perm] = w.values
            conv.inputs[1] = gs.Constant(scope.fresh(w.name), moved)
            return "into_conv"
        y = gs.Variable(scope.fresh(f"{out.name}_space_to_depth"), dtype=out.dtype)
        concat.outputs[0] = y
        indices = gs.Constant(scope.fresh(f"{out.name}_perm"), perm.astype(np.int64))
        gather = gs.Node("Gather", name=scope.fresh(f"{concat.name or 'focus'}_gather"),
                         attrs={"axis": 1}, inputs=[y, indices], outputs=[out])
        nodes = scope.graph.nodes
        nodes.insert(next(i for i, n in enumerate(nodes) if n is concat) + 1, gather)
        return "gather"
