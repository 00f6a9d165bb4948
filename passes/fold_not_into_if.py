"""Negated If conditions: ``If(Not(c))`` becomes ``If(c)`` with its two branches swapped.

ONNX spec, ``If`` (opsets 1-21): the outputs are those of ``then_branch`` when ``cond`` (one bool
element) is true, of ``else_branch`` otherwise. ``Not`` (opsets 1-21) is elementwise logical
negation of a bool tensor, so ``Not(c)`` holds one element exactly when ``c`` does, and::

    If(Not(c))[then_branch=T, else_branch=E]  ==  If(c)[then_branch=E, else_branch=T]

for every value of ``c``: both select T when ``c`` is false and E when it is true. The branches
are only exchanged, never changed, so this is exact for any branch contents.

The ``Not`` node goes when every reader of its output is the condition of an ``If`` (in its own
graph or in a subgraph reading it from an outer scope), and its output is no graph output (of
the main graph or a subgraph); each of those Ifs is then swapped. Otherwise it stays and no If is
touched: swapping only some readers would keep the Not and gain nothing.

Statistics: ``nots_removed``, ``ifs_swapped`` and ``refused`` (per reason).
"""

from __future__ import annotations

from collections import Counter

import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import drop_disconnected, input_slots
from onnxopt.ops import is_default_domain


def _refusal(negated: gs.Tensor, outputs: set[int]) -> str | None:
    """Why the Not writing ``negated`` must stay, or None when every reader is an If condition."""
    if id(negated) in outputs:
        return "not_output_is_a_graph_output"
    if any(node.op != "If" or not is_default_domain(node) or i != 0 for node, i in input_slots(negated)):
        return "not_output_read_by_other_than_an_if_condition"
    return None


@register
class FoldNotIntoIf(Pass):
    name = "fold_not_into_if"
    description = "Remove a Not read only by If conditions, swapping those Ifs' branches."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graphs = list(iter_graphs(graph))
        outputs = {id(t) for g in graphs for t in g.outputs}
        removed = swapped = 0
        refused: Counter[str] = Counter()
        for g in graphs:
            for node in list(g.nodes):
                if node.op != "Not" or not is_default_domain(node) or len(node.inputs) != 1 \
                        or len(node.outputs) != 1:
                    continue
                negated = node.outputs[0]
                if not negated.outputs:
                    continue  # unused: eliminate_dead's
                reason = _refusal(negated, outputs)
                if reason is not None:
                    refused[reason] += 1
                    continue
                for reader, _ in input_slots(negated):
                    reader.inputs[0] = node.inputs[0]
                    reader.attrs["then_branch"], reader.attrs["else_branch"] = \
                        reader.attrs["else_branch"], reader.attrs["then_branch"]
                    swapped += 1
                node.inputs.clear()
                node.outputs.clear()
                removed += 1
            drop_disconnected(g)
        stats = {"nots_removed": removed, "ifs_swapped": swapped}
        if refused:
            stats["refused"] = dict(refused)
        return PassResult(removed > 0, stats)
