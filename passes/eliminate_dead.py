"""Dead code elimination: remove nodes and initializers that no graph output depends on.

Uses onnx-graphsurgeon's ``Graph.cleanup`` on the graph and every subgraph. Graph inputs are kept
even when unused: they are part of the model's interface. Tensors read by a subgraph from an outer
scope count as used.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register


def _census(graph: gs.Graph) -> tuple[int, int]:
    nodes = 0
    constants = set()
    for g in iter_graphs(graph):
        nodes += len(g.nodes)
        constants.update(id(t) for n in g.nodes for t in n.inputs if isinstance(t, gs.Constant))
    return nodes, len(constants)


@register
class EliminateDead(Pass):
    name = "eliminate_dead"
    description = "Remove nodes and initializers that no graph output depends on."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before, inits_before = _census(graph)
        graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=True)
        nodes_after, inits_after = _census(graph)
        stats = {"nodes_removed": nodes_before - nodes_after,
                 "initializers_removed": inits_before - inits_after}
        return PassResult(nodes_after != nodes_before or inits_after != inits_before, stats)
