"""Sinking into If branches: a shape op applied to an If's output moves into both branches.

ONNX spec, ``If`` (opsets 1-21): output ``o_k`` of ``If(c)`` is output ``k`` of ``then_branch`` when
``c`` is true, of ``else_branch`` otherwise; a branch may read any tensor of an enclosing scope.
So for an op ``n`` whose other inputs are initializers::

    n(If(c)[T, E].o_k, w...)  ==  If(c)[T', E'].o_k    with    T'.out_k = n(T.out_k, w...),
                                                                 E'.out_k = n(E.out_k, w...)

exactly, for any ``n``: the same op reads the same value in both programs. The If output takes
``n``'s output tensor (so a graph output keeps its name), ``n`` leaves the enclosing graph.

This pays off only when the node count does not grow, so ``n`` is sunk only when, in *each*
branch, it merges with the node ``p`` computing that branch's output ``b`` (``b`` read by nothing
else in the branch and bound to one output only):

- ``p`` is ``Identity(v)``: ``p`` becomes ``n(v, w...)`` (``n(Identity(v)) = n(v)``);
- ``p`` and ``n`` are a ``Squeeze``/``Unsqueeze`` pair (either order) with the same axes as
  written: ``p`` becomes ``Identity(v)``. Both ops normalize negative axes against the same rank
  (Squeeze: its input's, ``rank(v)`` or ``rank(v) + |a|``; Unsqueeze: its output's, the same),
  so the dims removed are the dims inserted, and a Squeeze removes only dims of size 1;
- ``p`` is an op the merge passes fold ``n`` into, always: ``Unsqueeze`` after ``Unsqueeze`` and
  ``Squeeze`` after ``Squeeze`` with constant non-negative axes (``merge_reshape``), ``Transpose``
  after ``Transpose`` with a ``perm`` on either (``merge_transpose``), ``Reshape`` with a constant
  shape without 0 entries (or ``allowzero``) after ``Reshape``/``Flatten``/``Squeeze``/``Unsqueeze``
  (``merge_reshape``): ``n`` is appended after ``p`` in the branch, and merged in the same round
  (this pass runs before them, and before ``remove_identity``, which would otherwise leave
  ``Neg(x)`` where ``Identity(Neg(x))`` could take ``n``);
- ``p`` is a nested ``If``: ``n`` is sunk into it by the same rules, recursively.

A branch output that is not computed by a node of the branch (an outer-scope tensor or an
initializer) would need a new node: refused. ``n`` is one of ``_SINKABLE`` (cheap shape ops and
Cast), reads the If output as its data input (input 0), its other inputs are initializers, and it
is the only reader of that output, which is no graph output. The branch outputs whose value
changes lose their declared shape (the dtype follows a Cast); ONNX shape inference re-derives it.

Scope: every graph, If/Loop/Scan bodies included; the rule looks at the ops of ``_SINKABLE``. An op
reading the output of an op sunk in the same run waits for the next run (by then the merge passes
have folded what the first one left in the branches).

Statistics: ``rewritten`` (ops sunk), ``branch_nodes`` per branch action (``replaced``,
``cancelled``, ``appended``, ``nested``), and ``refused`` per reason (per op reading an If
output): ``if output has several readers``, ``if output is a graph output``, ``if output not the
data input of a node of its graph``, ``other input not an initializer``, ``malformed branch``,
``branch output bound twice``, ``branch output also read in the branch``, ``branch output not
computed in the branch``, ``branch output from another domain``, ``branch output from P does not
merge with N`` (``P`` the op computing the branch output, ``N`` the op to sink).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_value, if_branches, input_slots, int_list
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, producer_in_scope, refuse

#: Ops that may be sunk: one data input (input 0), the others constant, one output.
_SINKABLE = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Cast"})

_SQUEEZES = frozenset({"Squeeze", "Unsqueeze"})


@dataclass
class _Step:
    """What happens in one branch: ``action`` on ``producer``, the node computing output
    ``index`` of ``branch``; ``nested`` holds the steps inside a nested If."""

    action: str  # "replaced", "cancelled", "appended" or "nested"
    branch: gs.Graph
    index: int
    producer: gs.Node
    nested: list[_Step] = field(default_factory=list)


def _axes(node: gs.Node) -> list[int] | None | str:
    return int_list(node, "axes", 1)


def _merges(p: gs.Node, n: gs.Node) -> bool:
    """Whether a merge pass always folds ``n(p(v))`` into one node (see the module docstring)."""
    if p.op == n.op and n.op in _SQUEEZES:
        axes = [_axes(p), _axes(n)]
        return all(isinstance(a, list) and a and min(a) >= 0 for a in axes)
    if p.op == n.op == "Transpose":
        return "perm" in p.attrs or "perm" in n.attrs
    if n.op == "Reshape" and p.op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        shape = constant_value(n.inputs[1])
        return bool(n.attrs.get("allowzero", 0)) or not (shape == 0).any()
    return False


def _cancels(p: gs.Node, n: gs.Node) -> bool:
    """Whether ``n(p(v)) = v``: a Squeeze/Unsqueeze pair with the same axes as written."""
    axes = _axes(p)
    return {p.op, n.op} == _SQUEEZES and isinstance(axes, list) and bool(axes) \
        and axes == _axes(n)


def _branch_plan(branch: gs.Graph, k: int, n: gs.Node) -> _Step | Refusal:
    """How ``n`` merges into output ``k`` of ``branch``, or why it cannot."""
    b = branch.outputs[k]
    if sum(t is b for t in branch.outputs) != 1:
        return refuse("branch output bound twice")
    if b.outputs:
        return refuse("branch output also read in the branch")
    if len(b.inputs) != 1 or not any(node is b.inputs[0] for node in branch.nodes):
        return refuse("branch output not computed in the branch")
    p = b.inputs[0]
    if not is_default_domain(p):
        return refuse("branch output from another domain")
    if p.op == "Identity":
        return _Step("replaced", branch, k, p)
    if p.op == "If":
        nested = _if_plan(p, next(j for j, t in enumerate(p.outputs) if t is b), n)
        return nested if isinstance(nested, Refusal) else _Step("nested", branch, k, p, nested)
    if _cancels(p, n):
        return _Step("cancelled", branch, k, p)
    if _merges(p, n):
        return _Step("appended", branch, k, p)
    return refuse(f"branch output from {p.op} does not merge with {n.op}")


def _if_plan(node: gs.Node, k: int, n: gs.Node) -> list[_Step] | Refusal:
    """The steps sinking ``n`` into output ``k`` of the If ``node``, or why it cannot be sunk."""
    branches = if_branches(node)
    if branches is None:
        return refuse("malformed branch")
    steps = []
    for branch in branches:
        step = _branch_plan(branch, k, n)
        if isinstance(step, Refusal):
            return step
        steps.append(step)
    return steps


def _reader_refusal(n: gs.Node, if_node: gs.Node, scope: Scope) -> Refusal | None:
    """Why ``n``, reading an output of ``if_node`` as its data input, cannot be sunk into it."""
    o = n.inputs[0]
    if len(input_slots(o)) != 1:
        return refuse("if output has several readers")
    if scope.usedef.is_output(o):
        return refuse("if output is a graph output")
    if len(n.outputs) != 1 or scope.usedef.owner(if_node) is not scope.graph:
        return refuse("if output not the data input of a node of its graph")
    if not all(t.is_empty() or isinstance(t, gs.Constant) for t in n.inputs[1:]):
        return refuse("other input not an initializer")
    return None


def _result_dtype(n: gs.Node, dtype):
    if n.op == "Cast":
        return onnx.helper.tensor_dtype_to_np_dtype(int(n.attrs["to"]))
    return dtype


def _apply(scope: Scope, steps: list[_Step], n: gs.Node, done: Counter) -> None:
    """Carry out ``steps``: each branch output now holds ``n`` applied to its former value."""
    for step in steps:
        p, b = step.producer, step.branch.outputs[step.index]
        if step.action == "nested":
            _apply(scope, step.nested, n, done)
        elif step.action == "replaced":
            v = p.inputs[0]
            p.op, p.attrs, p.name = n.op, dict(n.attrs), scope.fresh(n.name or n.op)
            p.inputs.clear()
            p.inputs.extend([v] + list(n.inputs[1:]))
        elif step.action == "cancelled":
            v = p.inputs[0]
            p.op, p.attrs = "Identity", {}
            p.inputs.clear()
            p.inputs.append(v)
        else:
            b = gs.Variable(scope.fresh(b.name), dtype=b.dtype)
            step.branch.nodes.append(gs.Node(
                n.op, name=scope.fresh(n.name or n.op), attrs=dict(n.attrs),
                inputs=[p.outputs[0]] + list(n.inputs[1:]), outputs=[b]))
            step.branch.outputs[step.index] = b
        b.dtype, b.shape = _result_dtype(n, b.dtype), None
        done[step.action] += 1


@register
class SinkIntoIf(RewritePass):
    name = "sink_into_if"
    description = ("Move a shape op reading an If output into both branches, where it merges "
                   "with the node computing the branch output.")
    ops = tuple(sorted(_SINKABLE))

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._done: Counter[str] = Counter()
        self._sunk: set[int] = set()  # If outputs that a sunk op wrote in this run

    def match(self, node: gs.Node, scope: Scope
              ) -> tuple[gs.Node, int, list[_Step]] | Refusal | None:
        if_node = producer_in_scope(node.inputs[0]) if node.inputs else None
        if if_node is None or if_node.op != "If" or id(node.inputs[0]) in self._sunk:
            return None
        reason = _reader_refusal(node, if_node, scope)
        if reason is not None:
            return reason
        k = next(j for j, t in enumerate(if_node.outputs) if t is node.inputs[0])
        plan = _if_plan(if_node, k, node)
        return plan if isinstance(plan, Refusal) else (if_node, k, plan)

    def rewrite(self, node: gs.Node, match: tuple[gs.Node, int, list[_Step]],
                scope: Scope) -> None:
        if_node, k, plan = match
        _apply(scope, plan, node, self._done)
        y = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        if_node.outputs[k] = y
        self._sunk.add(id(y))

    def extra_stats(self) -> dict[str, Any]:
        return {"branch_nodes": dict(sorted(self._done.items()))}
