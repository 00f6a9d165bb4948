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
Branch tensors whose names clash with a name elsewhere in the model are renamed.

Refusals (counted in the statistics under ``refused``): the condition is not an initializer
(``condition_not_constant``; a graph input that is also an initializer is imported as a plain input
by ``onnxopt.graph.import_graph``, so it lands here), does not hold exactly one element
(``condition_not_single_element``); the branch declares inputs (``branch_has_inputs``) or a number
of outputs different from the ``If``'s (``output_count_mismatch``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import constant_value, rename_clashes, replace_uses
from onnxopt.names import fresh_name
from onnxopt.ops import is_default_domain


def _refusal(node: gs.Node) -> str | None:
    """Why the If ``node`` cannot be inlined, or None when it can."""
    cond = node.inputs[0] if node.inputs else None
    value = constant_value(cond) if cond is not None else None
    if value is None:
        return "condition_not_constant"
    if np.asarray(value).size != 1:
        return "condition_not_single_element"
    branch = _chosen_branch(node)
    if branch.inputs:
        return "branch_has_inputs"
    if len(branch.outputs) != len(node.outputs):
        return "output_count_mismatch"
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


def _inline(root: gs.Graph, graph: gs.Graph, position: int) -> int:
    """Replace the If at ``graph.nodes[position]`` by its chosen branch; return nodes moved."""
    node = graph.nodes[position]
    branch = _chosen_branch(node)
    other = node.attrs["else_branch" if branch is node.attrs["then_branch"] else "then_branch"]
    _disconnect(other)
    branch.toposort(recurse_subgraphs=False)
    rename_clashes(root, branch)
    moved = list(branch.nodes)
    produced_here = {id(t) for n in moved for t in n.outputs}
    if_outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()

    graph_outputs = {id(t) for t in graph.outputs}
    holder: dict[int, gs.Tensor] = {}  # branch output -> the tensor now carrying its value
    extra: list[gs.Node] = []
    for y, b in zip(if_outputs, branch.outputs):
        source = holder.get(id(b), b)
        if id(y) not in graph_outputs:
            replace_uses(y, source)
            continue
        if id(source) in produced_here and id(source) not in graph_outputs and source is b:
            producer = source.inputs[0]
            replace_uses(source, y)
            producer.outputs[producer.outputs.index(source)] = y
            holder[id(b)] = y
        else:
            extra.append(gs.Node("Identity", name=fresh_name(root, f"{y.name}_inlined"),
                                 inputs=[source], outputs=[y]))
    branch.nodes = []
    branch.outputs = []
    graph.nodes[position:position + 1] = moved + extra
    return len(moved)


@register
class InlineIf(Pass):
    name = "inline_if"
    description = "Replace an If whose condition is constant by the branch it selects."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        inlined = moved = 0
        refused: Counter[str] = Counter()
        for g in iter_graphs(graph):
            i = 0
            while i < len(g.nodes):
                node = g.nodes[i]
                if node.op != "If" or not is_default_domain(node):
                    i += 1
                    continue
                reason = _refusal(node)
                if reason is not None:
                    refused[reason] += 1
                    i += 1
                    continue
                # the branch's nodes take the If's place and are examined next (a nested If)
                moved += _inline(graph, g, i)
                inlined += 1
        stats = {"ifs_inlined": inlined, "nodes_moved": moved}
        if refused:
            stats["refused"] = dict(refused)
        return PassResult(inlined > 0, stats)
