"""If inlining: an ``If`` whose condition is a constant is replaced by the branch it selects.

ONNX spec, ``If`` (opsets 1-21): ``cond`` is a tensor holding a single ``bool``; when it is true the
outputs are those of ``then_branch``, otherwise those of ``else_branch``. Both branches take no
inputs and bind their outputs to the ``If`` outputs by position; they may read any tensor of an
enclosing scope. So, for a constant ``cond``::

    If(cond)[then_branch=T, else_branch=E] -> (y_1, ..., y_k)
      ==  the nodes of B = (T if cond else E), with y_i := B.output_i

The selected branch's nodes move into the graph holding the ``If`` (at its position, so a sorted
graph stays sorted); the branch's own initializers come along, since they are tensors its nodes
read; tensors read from an outer scope are shared objects in onnx-graphsurgeon and keep working.
A condition computable from static shapes (``Equal(Gather(Shape(x), 0), 1)``) is an initializer
once ``fold_constants`` has run, so this pass belongs right after it.

Binding the outputs: where ``y_i`` is not an output of the enclosing graph, its consumers read the
branch output instead. Where it is, its name must survive: the branch node producing the value is
made to write ``y_i``; when the branch output is not produced by a branch node (an outer-scope
tensor, an initializer, or a value already bound to another output), an ``Identity`` writes ``y_i``.
The branch not taken is disconnected, so that outer tensors no longer list its nodes as consumers.
Branch tensors whose names clash with a name elsewhere in the model are renamed, and so are branch
nodes whose names another node uses (exporters repeat node names across scopes; onnxruntime
refuses a graph with two nodes of one name).

Every graph and subgraph is handled. The inlined branch's own Ifs land in the enclosing graph;
those with a constant condition are inlined with it (depth first, in order).

Statistics: ``rewritten`` (Ifs inlined by the walk), ``nested`` (Ifs of an inlined branch inlined
with it, when there are any), ``refused`` per reason: ``condition not constant`` (a graph input
that is also an initializer is imported as a plain input by ``onnxopt.graph.import_graph``, so it
lands here), ``condition not a single element``; the branch declares inputs (``branch has
inputs``) or a number of outputs different from the ``If``'s (``output count mismatch``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import constant_value, rename_clashes, replace_uses
from onnxopt.graph import iter_graphs
from onnxopt.names import rename_node_clashes
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


def _refusal(node: gs.Node) -> Refusal | None:
    """Why the If ``node`` cannot be inlined, or None when it can."""
    cond = node.inputs[0] if node.inputs else None
    value = constant_value(cond) if cond is not None else None
    if value is None:
        return refuse("condition not constant")
    if np.asarray(value).size != 1:
        return refuse("condition not a single element")
    branch = _chosen_branch(node)
    if branch.inputs:
        return refuse("branch has inputs")
    if len(branch.outputs) != len(node.outputs):
        return refuse("output count mismatch")
    return None


def _chosen_branch(node: gs.Node) -> gs.Graph:
    taken = bool(np.asarray(constant_value(node.inputs[0])).reshape(-1)[0])
    return node.attrs["then_branch" if taken else "else_branch"]


def _disconnect(graph: gs.Graph) -> None:
    """Detach every node of ``graph`` and its subgraphs from the tensors it reads and writes."""
    for g in list(iter_graphs(graph)):
        for n in g.nodes:
            n.inputs.clear()
            n.outputs.clear()


def _inline(scope: Scope, node: gs.Node) -> list[gs.Node]:
    """Replace the If ``node`` of ``scope.graph`` by its chosen branch; return the nodes moved."""
    graph = scope.graph
    position = next(i for i, n in enumerate(graph.nodes) if n is node)
    branch = _chosen_branch(node)
    other = node.attrs["else_branch" if branch is node.attrs["then_branch"] else "then_branch"]
    _disconnect(other)
    branch.toposort(recurse_subgraphs=False)
    rename_clashes(scope.root, branch)
    rename_node_clashes(scope.root, branch.nodes, graph)
    moved = list(branch.nodes)
    produced_here = {id(t) for n in moved for t in n.outputs}
    if_outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()

    holder: dict[int, gs.Tensor] = {}  # branch output -> the tensor now carrying its value
    extra: list[gs.Node] = []
    for y, b in zip(if_outputs, branch.outputs):
        source = holder.get(id(b), b)
        if not scope.is_output(y):
            replace_uses(y, source)
            continue
        if id(source) in produced_here and not scope.is_output(source) and source is b:
            producer = source.inputs[0]
            replace_uses(source, y)
            producer.outputs[producer.outputs.index(source)] = y
            holder[id(b)] = y
        else:
            extra.append(gs.Node("Identity", name=scope.fresh(f"{y.name}_inlined"),
                                 inputs=[source], outputs=[y]))
    branch.nodes = []
    branch.outputs = []
    graph.nodes[position:position + 1] = moved + extra
    return moved


@register
class InlineIf(RewritePass):
    name = "inline_if"
    description = "Replace an If whose condition is constant by the branch it selects."
    ops = ("If",)

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._nested = 0

    def match(self, node: gs.Node, scope: Scope) -> bool | Refusal:
        reason = _refusal(node)
        return True if reason is None else reason

    def rewrite(self, node: gs.Node, match: bool, scope: Scope) -> None:
        for moved in _inline(scope, node):
            # the walk has passed this position: the branch's Ifs are looked at here
            if moved.op == "If" and is_default_domain(moved) and _refusal(moved) is None:
                self._nested += 1
                self.rewrite(moved, True, scope)

    def extra_stats(self) -> dict[str, Any]:
        return {"nested": self._nested} if self._nested else {}
