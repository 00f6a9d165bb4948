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

Scope: every graph, If/Loop/Scan bodies included. Statistics: ``ops_sunk``, per branch action
``branch_nodes`` (``replaced``, ``cancelled``, ``appended``), and ``refused`` (per reason).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import constant_value, drop_disconnected, input_slots, int_list
from onnxopt.names import fresh_name
from onnxopt.ops import is_default_domain

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


def _branch_plan(branch: gs.Graph, k: int, n: gs.Node) -> _Step | str:
    """How ``n`` merges into output ``k`` of ``branch``, or why it cannot."""
    b = branch.outputs[k]
    if sum(t is b for t in branch.outputs) != 1:
        return "branch_output_bound_twice"
    if b.outputs:
        return "branch_output_also_read_in_the_branch"
    if len(b.inputs) != 1 or not any(node is b.inputs[0] for node in branch.nodes):
        return "branch_output_not_computed_in_the_branch"
    p = b.inputs[0]
    if not is_default_domain(p):
        return "branch_output_from_another_domain"
    if p.op == "Identity":
        return _Step("replaced", branch, k, p)
    if p.op == "If":
        nested = _if_plan(p, next(j for j, t in enumerate(p.outputs) if t is b), n)
        return nested if isinstance(nested, str) else _Step("nested", branch, k, p, nested)
    if _cancels(p, n):
        return _Step("cancelled", branch, k, p)
    if _merges(p, n):
        return _Step("appended", branch, k, p)
    return f"branch_output_from_{p.op}_does_not_merge_with_{n.op}"


def _if_plan(node: gs.Node, k: int, n: gs.Node) -> list[_Step] | str:
    """The steps sinking ``n`` into output ``k`` of the If ``node``, or why it cannot be sunk."""
    steps = []
    for attr in ("then_branch", "else_branch"):
        branch = node.attrs.get(attr)
        if not isinstance(branch, gs.Graph) or branch.inputs \
                or len(branch.outputs) != len(node.outputs):
            return "malformed_branch"
        step = _branch_plan(branch, k, n)
        if isinstance(step, str):
            return step
        steps.append(step)
    return steps


def _reader_refusal(g: gs.Graph, o: gs.Tensor, outputs: set[int]) -> gs.Node | str | None:
    """The node to sink, the only reader of If output ``o``; a reason when it cannot be sunk;
    None when ``o`` has no reader of a sinkable op (nothing to report)."""
    slots = input_slots(o)
    if not any(node.op in _SINKABLE and is_default_domain(node) for node, _ in slots):
        return None
    if len(slots) != 1:
        return "if_output_has_several_readers"
    n, i = slots[0]
    if id(o) in outputs:
        return "if_output_is_a_graph_output"
    if i != 0 or len(n.outputs) != 1 or not any(m is n for m in g.nodes):
        return "if_output_not_the_data_input_of_a_node_of_its_graph"
    if not all(t.is_empty() or isinstance(t, gs.Constant) for t in n.inputs[1:]):
        return "other_input_not_an_initializer"
    return n


def _result_dtype(n: gs.Node, dtype):
    if n.op == "Cast":
        return onnx.helper.tensor_dtype_to_np_dtype(int(n.attrs["to"]))
    return dtype


def _apply(root: gs.Graph, steps: list[_Step], n: gs.Node, done: Counter) -> None:
    """Carry out ``steps``: each branch output now holds ``n`` applied to its former value."""
    for step in steps:
        p, b = step.producer, step.branch.outputs[step.index]
        if step.action == "nested":
            _apply(root, step.nested, n, done)
        elif step.action == "replaced":
            v = p.inputs[0]
            p.op, p.attrs, p.name = n.op, dict(n.attrs), fresh_name(root, n.name or n.op)
            p.inputs.clear()
            p.inputs.extend([v] + list(n.inputs[1:]))
        elif step.action == "cancelled":
            v = p.inputs[0]
            p.op, p.attrs = "Identity", {}
            p.inputs.clear()
            p.inputs.append(v)
        else:
            b = gs.Variable(fresh_name(root, b.name), dtype=b.dtype)
            step.branch.nodes.append(gs.Node(
                n.op, name=fresh_name(root, n.name or n.op), attrs=dict(n.attrs),
                inputs=[p.outputs[0]] + list(n.inputs[1:]), outputs=[b]))
            step.branch.outputs[step.index] = b
        b.dtype, b.shape = _result_dtype(n, b.dtype), None
        done[step.action] += 1


@register
class SinkIntoIf(Pass):
    name = "sink_into_if"
    description = ("Move a shape op reading an If output into both branches, where it merges "
                   "with the node computing the branch output.")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graphs = list(iter_graphs(graph))
        outputs = {id(t) for g in graphs for t in g.outputs}
        sunk = 0
        done: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for g in graphs:
            for node in [m for m in g.nodes if m.op == "If" and is_default_domain(m)]:
                for k, o in enumerate(list(node.outputs)):
                    n = _reader_refusal(g, o, outputs)
                    if n is None:
                        continue
                    plan = n if isinstance(n, str) else _if_plan(node, k, n)
                    if isinstance(plan, str):
                        refused[plan] += 1
                        continue
                    _apply(graph, plan, n, done)
                    y = n.outputs[0]
                    n.inputs.clear()
                    n.outputs.clear()
                    node.outputs[k] = y
                    sunk += 1
            drop_disconnected(g)
        stats = {"ops_sunk": sunk, "branch_nodes": dict(sorted(done.items()))}
        if refused:
            stats["refused"] = dict(sorted(refused.items()))
        return PassResult(sunk > 0, stats)
