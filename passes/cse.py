"""Common-subexpression elimination (CSE): merge nodes that compute the same thing.

Two nodes are the same computation when they have the same op, domain, inputs (the same tensors, in
order), number of outputs and *all* attributes equal, subgraph attributes included (compared as
serialized GraphProtos). Random ops are never merged. Of two equal nodes one is kept and the other's
consumers are rewired to it; the one producing a graph output is kept, and when both do neither is
removed. Each graph and subgraph is handled on its own, in topological order.

Statistics: ``rewritten`` (nodes merged away); ``refused`` (``both compute graph outputs``).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.edit import replace_uses
from onnxopt.ops import NONDETERMINISTIC_OPS
from onnxopt.pass_manager import register
from onnxopt.rewrite import RewritePass, Scope, refuse


def _key(node: gs.Node) -> tuple:
    attrs = tuple(a.SerializeToString(deterministic=True)
                  for a in sorted(OnnxExporter.export_node(node).attribute, key=lambda a: a.name))
    return (node.op, node.domain or "", tuple(id(t) for t in node.inputs), len(node.outputs), attrs)


@register
class CommonSubexpressionElimination(RewritePass):
    name = "cse"
    description = "Merge nodes with the same op, inputs and attributes (subgraphs included)."
    ops = None
    sorted_walk = True

    def match(self, node: gs.Node, scope: Scope):
        if node.op in NONDETERMINISTIC_OPS:
            return None
        seen: dict[tuple, gs.Node] = scope.memo.setdefault("seen", {})
        key = _key(node)
        first = seen.get(key)
        if first is None:
            seen[key] = node
            return None
        keep, drop = first, node
        if any(scope.is_output(t) for t in drop.outputs):
            if any(scope.is_output(t) for t in keep.outputs):
                return refuse("both compute graph outputs")
            keep, drop = drop, keep
            seen[key] = keep
        return keep, drop

    def rewrite(self, node: gs.Node, match: tuple[gs.Node, gs.Node], scope: Scope) -> None:
        keep, drop = match
        for old, new in zip(drop.outputs, keep.outputs):
            replace_uses(old, new)
        drop.inputs.clear()
        drop.outputs.clear()
