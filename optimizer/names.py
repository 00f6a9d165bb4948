"""The name authority: fresh tensor and node names owned by the model being optimized.

Every name a pass creates comes from the authority attached to the model's main graph (created on
the first request), never from a process-wide counter: optimizing the same model twice, in one
process or in two, hands out the same names in the same order, so the output bytes depend only on
the input and the pipeline (onnx-ir's passes keep a name authority per graph for the same reason).

A fresh name is ``f"{base}__{k}"`` with ``k`` the smallest counter value for that ``base`` whose
name no tensor of the model uses, in any scope (If/Loop/Scan bodies included): subgraphs read
outer-scope values by name, so a name unique only within its own scope could shadow one.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from typing import Iterable

from onnxopt.graph import iter_graphs

#: Attribute of a main ``gs.Graph`` holding its :class:`NameAuthority`.
_ATTR = "_onnxopt_names"


class NameAuthority:
    """Hands out names no tensor of a model uses.

    The names in use are collected once, on the first request; every name handed out is added,
    so the set stays complete as long as passes name new tensors only through the authority
    (imports rename before it exists).
    """

    def __init__(self, used: set[str]):
        self._used = used
        self._next: dict[str, int] = {}

    @classmethod
    def of(cls, graph: gs.Graph) -> "NameAuthority":
        """The authority of ``graph`` (a main graph), created on first use from every name of
        the graph and its subgraphs."""
        authority = vars(graph).get(_ATTR)  # gs.Graph's getattr treats names as functions
        if authority is None:
            authority = cls(_all_names(graph))
            setattr(graph, _ATTR, authority)
        return authority

    def fresh(self, base: str) -> str:
        """A name based on ``base`` that no tensor of the model uses; it is reserved."""
        k = self._next.get(base, 0)
        while f"{base}__{k}" in self._used:
            k += 1
        name = f"{base}__{k}"
        self._next[base] = k + 1
        self._used.add(name)
        return name

    def fork(self) -> "NameAuthority":
        """An authority that avoids every name this one knows but reserves nothing in it: for
        helper models (shape inference) whose names must not shift the model's own."""
        return NameAuthority(set(self._used))


def _all_names(graph: gs.Graph) -> set[str]:
    names = set()
    for g in iter_graphs(graph):
        names.update(t.name for t in g.inputs)
        names.update(t.name for t in g.outputs)
        for node in g.nodes:
            names.update(t.name for t in node.inputs)
            names.update(t.name for t in node.outputs)
            if node.name:
                names.add(node.name)
    return names


def rename_node_clashes(root: gs.Graph, nodes: Iterable[gs.Node], into: gs.Graph) -> int:
    """Rename each of ``nodes`` -- nodes about to move into the graph ``into`` of ``root``'s model
    (an If branch inlined into the graph holding the If, two branches fused into one) -- whose
    name another node of ``into`` uses; the new name is fresh in the whole model
    (``f"{name}__{k}"``, see :class:`NameAuthority`). Returns how many were renamed.

    ONNX lets the nodes of different graphs (an If's branches and the graph around them) share
    names, and exporters write them so (``/Add`` in every branch); onnxruntime refuses a graph in
    which two nodes share one ("two nodes with same node name"). Unnamed nodes stay unnamed.
    ``root`` must be the main graph.
    """
    nodes = list(nodes)
    moving = {id(n) for n in nodes}
    taken = {n.name for n in into.nodes if n.name and id(n) not in moving}
    authority = NameAuthority.of(root)
    renamed = 0
    for n in nodes:
        if n.name and n.name in taken:
            base = n.name
            while n.name in taken:
                n.name = authority.fresh(base)
            renamed += 1
        taken.add(n.name)
    return renamed


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor or node name based on ``base`` that no tensor of ``graph``'s model uses.

    ``graph`` must be the main graph: a subgraph's own authority would not see the names of the
    scopes around it.
    """
    return NameAuthority.of(graph).fresh(base)
