"""Reshape targets built from the input's own shape: ``Reshape(x, Concat(Shape(x)[i] at position
i ..., constants))`` becomes ``Reshape(x, [0, ..., constants])``, a constant target.

Traced exports compute a Reshape's target from the shape of its own input (``view(x.size(0),
-1, 6, 64)``). ONNX ``Reshape`` (spec, opsets 5-21) with ``allowzero = 0`` (the default; the
attribute exists from opset 14) reads an entry 0 of the target as "copy dim ``i`` of the input".
Entry ``i`` of the computed target is ``d_i`` (dim ``i`` of ``x``): when ``d_i > 0`` it is that
size, when ``d_i = 0`` it is a copy of dim ``i``, which is 0. Either way the resolved dim is
``d_i``, exactly what a constant 0 at position ``i`` resolves to; every other entry is the same
constant in both targets. So the two targets resolve to the same dims *before* any ``-1`` is
inferred, and the ``-1`` (kept where it is) divides the same element count by the same product:
both succeed or both fail, with the same result, for every ``x`` -- a batch of 0 included. (A
peer writes ``-1`` for a dim it has inferred beside a copied ``0``; that fails when a dim is 0 and
is not done here: no entry changes but the copied ones.) With ``allowzero = 1`` a 0 is a literal
zero and the rule is refused.

The parts of the ``Concat`` (``axis`` 0 or -1; each a 1-D int64 tensor, placed one after the
other) that are recognized, ``k`` being the position where a part starts:

- an initializer: its values, kept;
- ``Gather(Shape(x), j)`` with a constant 1-D ``j`` (or a 0-d ``j`` under ``Unsqueeze(., [0])``):
  dims ``j`` of ``x``; each must be ``k + m`` for its ``m``-th entry. A ``j`` out of range makes
  the original fail, so no rank is needed; a negative ``j`` counts from the rank and needs it;
- ``Shape(x, start=a, end=b)`` (``start``/``end`` from opset 15) or ``Shape(x)``: dims ``a`` to
  ``b - 1``, clamped to the rank ``r``; ``a`` must be ``k``. The part's length depends on ``r``
  (a clamped range is shorter), so ``r`` must be known (ONNX shape inference,
  ``onnxopt.analyses.TensorTypes``; only the rank is read, never a dim).

``Shape`` here is a default-domain node reading the Reshape's own data tensor ``x`` (the same
tensor object). The Concat, Gathers and Shapes are left to ``eliminate_dead`` (other readers may
keep them).

When these parts are not recognized (dims of another tensor, as every attention block of a
torch export reshapes ``query(h)`` by ``h``'s dims), the target's value is read from
``TensorTypes.shape_value``: its entries are ints and *symbols* (dims of any tensor, equal for
every input wherever they are the same symbol; see ``_symbolic_target``). An entry that is the
symbol of ``x``'s own dim at its position is a copy, as above; any other symbolic entry is left
alone. That path also takes allowzero 1 targets, whose ``-1`` the analysis proves to be a
number (they become allowzero 0 targets without a ``-1``).

Statistics: ``rewritten`` (Reshapes given a constant target), ``refused`` (``allowzero``,
``rank unknown`` for a ``Shape`` range or a negative index, ``dim at another position``,
``part not recognized``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.edit import constant_value, int_list
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, producer_in_scope, refuse


def _shape_of(t: gs.Tensor, x: gs.Tensor) -> gs.Node | None:
    """The default-domain ``Shape(x)`` node writing ``t``, or None."""
    node = producer_in_scope(t)
    return node if node is not None and node.op == "Shape" and node.inputs[0] is x else None


class _Target:
    """The new target, built part by part (entries 0 for copied dims)."""

    def __init__(self, x: gs.Tensor, scope: Scope) -> None:
        self.x, self.scope, self.values, self.copied = x, scope, [], 0

    def copy(self, dims: list[int]) -> Refusal | None:
        """Append dims ``dims`` of ``x``, each of which must be at its own position."""
        if dims != list(range(len(self.values), len(self.values) + len(dims))):
            return refuse("dim at another position")
        self.values.extend([0] * len(dims))
        self.copied += len(dims)
        return None

    def rank(self) -> int | None:
        return self.scope.types.rank(self.x)

    def part(self, t: gs.Tensor) -> Refusal | None:
        """Append the part ``t`` of the Concat."""
        value = constant_value(t)
        if value is not None:
            if value.ndim != 1 or value.dtype != np.int64:
                return refuse("part not recognized")
            self.values.extend(int(v) for v in value)
            return None
        node = producer_in_scope(t)
        if node is not None and node.op == "Unsqueeze" and int_list(node, "axes", 1) in ([0], [-1]):
            return self._gather(node.inputs[0], scalar=True)
        shape = _shape_of(t, self.x)
        if shape is not None:
            return self._range(shape)
        return self._gather(t, scalar=False)

    def _gather(self, t: gs.Tensor, scalar: bool) -> Refusal | None:
        node = producer_in_scope(t)
        if node is None or node.op != "Gather" or node.attrs.get("axis", 0) not in (0, -1):
            return refuse("part not recognized")
        shape = _shape_of(node.inputs[0], self.x)
        j = constant_value(node.inputs[1])
        if shape is None or j is None or j.ndim != (0 if scalar else 1) or shape.attrs.get(
                "start", 0) != 0 or "end" in shape.attrs:
            return refuse("part not recognized")
        dims = [int(v) for v in np.ravel(j)]
        if any(d < 0 for d in dims):
            rank = self.rank()
            if rank is None:
                return refuse("rank unknown")
            dims = [d % rank if -rank <= d < 0 else d for d in dims]
        return self.copy(dims)

    def _range(self, shape: gs.Node) -> Refusal | None:
        rank = self.rank()
        if rank is None:
            return refuse("rank unknown")
        start, end = shape.attrs.get("start", 0), shape.attrs.get("end", rank)
        return self.copy(list(range(rank))[start:end])


def _symbolic_target(node: gs.Node, types: TensorTypes) -> list[int] | Refusal | None:
    """A constant target for ``Reshape(x, target)`` from the symbolic value of ``target``
    (``TensorTypes.shape_value``: entries that are dims of any tensor, not only of ``x``), or a
    refusal, or None when the value is not known.

    An entry that is the same symbol as dim ``k`` of ``x`` at its own position ``k`` becomes 0
    (a copy, allowzero 0: the argument of the module docstring, the symbol standing for the
    same number as ``x``'s dim for every input); ints stay. With allowzero 1 every entry is
    literal: the target can be given allowzero 0 only when it has no literal 0 (it would become
    a copy) and no ``-1``, which is then replaced by the value the analysis proves for it
    (``TensorTypes`` resolves a ``-1`` whose symbols cancel: ``[s, 400, 384]`` to
    ``[s, -1, 6, 64]`` has dim 400): allowzero 0 with a ``-1`` beside a copied 0 fails when a
    dim is 0, where onnxruntime's allowzero 1 divides the non-zero dims. With allowzero 0 a
    ``-1`` is kept: both targets resolve every other entry to the same dims first.
    """
    value, x = types.shape_value(node.inputs[1]), types.symbolic_shape(node.inputs[0])
    if value is None or x is None or any(v is None for v in value):
        return None
    allowzero = bool(node.attrs.get("allowzero", 0))
    out = types.shape(node.outputs[0])
    values, copied = [], 0
    for k, v in enumerate(value):
        if isinstance(v, str):
            if k >= len(x) or x[k] != v:
                return refuse("dim at another position")
            values.append(0)
            copied += 1
        elif allowzero and v == 0:
            return refuse("allowzero")
        elif allowzero and v == -1:
            if out is None or len(out) != len(value) or out[k] is None:
                return refuse("allowzero")
            values.append(out[k])
        else:
            values.append(v)
    return values if copied else None


@register
class ReshapeFromShape(RewritePass):
    name = "reshape_from_shape"
    description = ("Replace a Reshape target built from the input's own dims (Concat of "
                   "Shape/Gather parts and constants) by a constant with 0 for copied dims.")
    ops = ("Reshape",)

    def match(self, node: gs.Node, scope: Scope) -> list[int] | Refusal | None:
        if len(node.inputs) != 2 or isinstance(node.inputs[1], gs.Constant):
            return None
        concat = producer_in_scope(node.inputs[1])
        reason = None
        if concat is not None and concat.op == "Concat" and concat.attrs.get("axis") in (0, -1) \
                and not node.attrs.get("allowzero", 0):
            target = _Target(node.inputs[0], scope)
            reason = next(filter(None, map(target.part, concat.inputs)), None)
            if reason is None:
                return target.values if target.copied else None
        symbolic = _symbolic_target(node, scope.types)
        return symbolic if isinstance(symbolic, list) or reason is None else reason

    def rewrite(self, node: gs.Node, values: list[int], scope: Scope) -> None:
        name = scope.fresh(f"{node.outputs[0].name}_shape")
        node.inputs[1] = gs.Constant(name, np.array(values, np.int64))
        if node.attrs.get("allowzero", 0):  # the attribute exists from opset 14 only
            node.attrs["allowzero"] = 0
