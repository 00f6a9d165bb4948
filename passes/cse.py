"""Common-subexpression elimination (CSE): merge nodes that compute the same thing.

Two nodes are the same computation when they have the same op, domain, inputs (the same tensors, in
order), number of outputs and *all* attributes equal, subgraph attributes included (compared as
serialized GraphProtos). Random ops are never merged. Of two equal nodes one is kept and the other's
consumers are rewired to it; the one producing a graph output is kept, and when both do neither is
removed. Each graph and subgraph is handled on its own.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import drop_disconnected, replace_uses, sort_nodes
from onnxopt.ops import NONDETERMINISTIC_OPS


def _key(node: gs.Node) -> tuple:
    attrs = tuple(a.SerializeToString(deterministic=True)
                  for a in sorted(OnnxExporter.export_node(node).attribute, key=lambda a: a.name))
    return (node.op, node.domain or "", tuple(id(t) for t in node.inputs), len(node.outputs), attrs)


@register
class CommonSubexpressionElimination(Pass):
    name = "cse"
    description = "Merge nodes with the same op, inputs and attributes (subgraphs included)."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        merged = 0
        for g in iter_graphs(graph):
            sort_nodes(g)
            seen: dict[tuple, gs.Node] = {}
            outputs = {id(t) for t in g.outputs}
            for node in list(g.nodes):
                if node.op in NONDETERMINISTIC_OPS or not node.outputs:
                    continue
                key = _key(node)
                first = seen.get(key)
                if first is None:
                    seen[key] = node
                    continue
                keep, drop = first, node
                if any(id(t) in outputs for t in drop.outputs):
                    if any(id(t) in outputs for t in keep.outputs):
                        continue
                    keep, drop = drop, keep
                    seen[key] = keep
                for old, new in zip(drop.outputs, keep.outputs):
                    replace_uses(old, new)
                drop.inputs.clear()
                drop.outputs.clear()
                merged += 1
            drop_disconnected(g)
        return PassResult(merged > 0, {"nodes_merged": merged})
