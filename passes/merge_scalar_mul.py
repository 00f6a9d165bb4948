"""Scale merging: a chain of two Mul/Div by one-element constants becomes one Mul (or Div).

With ``c1``, ``c2`` constants of one element each (a scalar, ``[1]``, ``[1, 1]``...) and ``x`` any
float tensor (ONNX ``Mul``/``Div``, https://onnx.ai/onnx/operators/onnx__Mul.html, numpy
broadcasting from opset 7)::

    Mul(Mul(x, c1), c2) = Mul(x, c1 · c2)        Mul(Div(x, c1), c2) = Mul(x, c2 / c1)
    Div(Mul(x, c1), c2) = Mul(x, c1 / c2)        Div(Div(x, c1), c2) = Div(x, c1 · c2)

in real arithmetic; the folded constant ``k`` is computed in float64 and rounded once to the
dtype, so the result differs from the chain's by float rounding only (one rounding of ``x · k``
and one of ``k`` instead of two of the chain: a few units in the last place). The folded
constant has the broadcast shape of ``c1`` and ``c2``, so the output shape,
``broadcast(x, c1, c2)``, is the chain's (a ``[1]`` constant on a scalar ``x`` still gives
``[1]``). A Mul's constant may be either operand; a Div's must be the divisor.

Refused, because rounding is then not the only difference: a constant that is 0, infinite or NaN
(``x / 0`` or ``x · inf`` followed by another scale gives infinities and NaNs the folded constant
does not reproduce), and a folded constant that is not finite or below the dtype's smallest
normal number (it over- or underflows where the chain may not). One difference is accepted: the
chain can overflow (or underflow) in its intermediate where ``x · k`` does not (``x · 1e4 · 1e-4``
in float16); the merged form is then the exact one.

Conditions: the dtype is float16, float or double (ONNX requires both constants to have
``x``'s); the constants are initializers that are not graph inputs (which a
user may override); the intermediate has no other reader and is not a graph output (it
disappears). The second node is rewritten in place (it keeps its output tensor) with a new
initializer, and the first is removed. Every graph and subgraph is handled, in topological order,
so a longer chain folds into one node; the first node may be in an enclosing graph.

Statistics: ``rewritten`` (pairs merged), ``by_kind`` (``Mul·Mul``, ``Mul·Div``, ``Div·Mul``,
``Div·Div``: first op then second) and ``refused`` per reason.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_value
from onnxopt.graph import iter_graphs
from onnxopt.ops import FLOAT_DTYPES
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, producer_in_scope, refuse

_SCALES = ("Mul", "Div")


def _split(node: gs.Node, overridable: frozenset[str]) -> tuple[gs.Tensor, np.ndarray] | None:
    """``(x, c)`` for ``node = Mul(x, c)``, ``Mul(c, x)`` or ``Div(x, c)`` with ``c`` a
    one-element constant that no user can override, else None."""
    if len(node.inputs) != 2:
        return None
    sides = ((0, 1), (1, 0)) if node.op == "Mul" else ((0, 1),)
    for xi, ci in sides:
        c = node.inputs[ci]
        value = None if c.name in overridable else constant_value(c)
        if value is not None and value.size == 1 and constant_value(node.inputs[xi]) is None:
            return node.inputs[xi], np.asarray(value)
    return None


def _folded(first: str, c1: np.ndarray, second: str, c2: np.ndarray
            ) -> tuple[str, np.ndarray] | Refusal:
    """The op and constant ``k`` of the merged node (module docstring), or a refusal."""
    if c1.dtype.type not in FLOAT_DTYPES:
        return refuse("dtype is not float16, float or double")
    a, b = c1.astype(np.float64), c2.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all() and a.all() and b.all()):
        return refuse("constant is zero or not finite")
    op = "Div" if first == second == "Div" else "Mul"
    k = {("Mul", "Mul"): a * b, ("Div", "Div"): a * b, ("Mul", "Div"): a / b,
         ("Div", "Mul"): b / a}[first, second]
    info = np.finfo(c1.dtype)
    with np.errstate(over="ignore"):
        folded = np.asarray(k, c1.dtype)
    if not np.isfinite(folded).all() or (np.abs(folded) < info.tiny).any():
        return refuse("folded constant over- or underflows")
    return op, folded


@register
class MergeScalarMul(RewritePass):
    name = "merge_scalar_mul"
    description = "Merge two consecutive Mul/Div by one-element float constants into one node."
    ops = _SCALES
    sorted_walk = True

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._overridable = frozenset(t.name for g in iter_graphs(graph) for t in g.inputs)

    def match(self, node: gs.Node, scope: Scope
              ) -> tuple[gs.Node, gs.Tensor, str, np.ndarray] | Refusal | None:
        outer = _split(node, self._overridable)
        first = None if outer is None else producer_in_scope(outer[0])
        owner = None if first is None else scope.usedef.owner(first)
        if owner is None or first.op not in _SCALES:
            return None
        inner = _split(first, self._overridable)
        if inner is None:
            return None
        mid = first.outputs[0]
        if len(mid.outputs) != 1:
            return refuse("intermediate has other readers")
        if any(mid is o for o in owner.outputs):
            return refuse("intermediate is a graph output")
        plan = _folded(first.op, inner[1], node.op, outer[1])
        return plan if isinstance(plan, Refusal) else (first, inner[0], *plan)

    def rewrite(self, node: gs.Node, match: tuple[gs.Node, gs.Tensor, str, np.ndarray],
                scope: Scope) -> str:
        first, x, op, k = match
        kind = f"{first.op}·{node.op}"
        node.op = op
        node.inputs.clear()
        node.inputs.extend([x, gs.Constant(scope.fresh(f"{node.outputs[0].name}_scale"), k)])
        scope.drop_if_unused(first)
        return kind
