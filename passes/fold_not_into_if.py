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

Statistics: ``rewritten`` (Nots removed), ``ifs_swapped`` and ``refused`` per reason (``not
output is a graph output``, ``not output read by other than an if condition``).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.edit import input_slots
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


@register
class FoldNotIntoIf(RewritePass):
    name = "fold_not_into_if"
    description = "Remove a Not read only by If conditions, swapping those Ifs' branches."
    ops = ("Not",)

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._swapped = 0

    def match(self, node: gs.Node, scope: Scope) -> Refusal | bool | None:
        if len(node.inputs) != 1 or len(node.outputs) != 1:
            return None
        negated = node.outputs[0]
        if not negated.outputs:
            return None  # unused: eliminate_dead's
        # a subgraph may output an outer-scope value: the outputs of every scope count
        if scope.usedef.is_output(negated):
            return refuse("not output is a graph output")
        if any(reader.op != "If" or not is_default_domain(reader) or i != 0
               for reader, i in input_slots(negated)):
            return refuse("not output read by other than an if condition")
        return True

    def rewrite(self, node: gs.Node, match: bool, scope: Scope) -> None:
        for reader, _ in input_slots(node.outputs[0]):
            reader.inputs[0] = node.inputs[0]
            reader.attrs["then_branch"], reader.attrs["else_branch"] = \
                reader.attrs["else_branch"], reader.attrs["then_branch"]
            self._swapped += 1
        node.inputs.clear()
        node.outputs.clear()

    def extra_stats(self) -> dict[str, int]:
        return {"ifs_swapped": self._swapped}
