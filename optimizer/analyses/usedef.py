"""Use and definition sites across scopes: which graph owns each node, which tensors are graph
inputs or outputs of which scope.

Readers and producers of a tensor are onnx-graphsurgeon's live links (``tensor.outputs`` and
``tensor.inputs``, subgraph readers of outer-scope values included; ``onnxopt.edit.input_slots``
lists the reads); this analysis adds what those links do not say: the scope a node belongs to and each scope's interface.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.analyses.manager import Analysis
from onnxopt.graph import iter_graphs


class UseDef(Analysis):
    """Owning graph of every node and the interface of every scope.

    Attributes:
        scopes: the main graph, then every subgraph, depth first.
    """

    def __init__(self, graph: gs.Graph) -> None:
        self.main = graph
        self.scopes: list[gs.Graph] = list(iter_graphs(graph))
        self._owner = {id(n): g for g in self.scopes for n in g.nodes}
        self._outputs = {id(g): {id(t) for t in g.outputs} for g in self.scopes}
        self._boundary = {id(t) for g in self.scopes for t in list(g.inputs) + list(g.outputs)}

    @classmethod
    def compute(cls, graph: gs.Graph, ctx) -> "UseDef":
        return cls(graph)

    def owner(self, node: gs.Node) -> gs.Graph | None:
        """The graph whose ``nodes`` hold ``node`` (None for a node created since)."""
        return self._owner.get(id(node))

    def is_output(self, t: gs.Tensor, g: gs.Graph | None = None) -> bool:
        """Whether ``t`` is an output of ``g`` (of any scope when ``g`` is None)."""
        if g is None:
            return any(id(t) in outs for outs in self._outputs.values())
        return id(t) in self._outputs.get(id(g), ())

    def on_boundary(self, t: gs.Tensor) -> bool:
        """Whether ``t`` is an input or output of any scope."""
        return id(t) in self._boundary
