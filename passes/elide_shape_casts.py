"""Shape-cast elision: drop the int64 -> int32 -> int64 round trip exporters put on shape tensors.

tf2onnx and others compute reshape targets as ``Shape(x) -> Cast(int32) -> Slice/Concat/...
-> Cast(int64) -> Reshape``. ``Shape`` and ``Size`` return int64 (ONNX spec); the detour through
int32 changes no value as long as every dimension is below 2**31 -- which holds for any tensor a
runtime can allocate (2**31 elements along one axis) and is the same assumption onnx-graphsurgeon's
``fold_constants`` makes when it elides casts on shape tensors. The region between the casts is
limited to ops that move values without arithmetic (Slice, Concat, Gather, Squeeze, Unsqueeze,
Reshape, Flatten, Identity), so computing it in int64 gives exactly the same numbers.

The rewrite: the first Cast is bypassed (the region reads the int64 shape), the region's tensors
are renamed (their dtype changes, so a name would otherwise stand for two different values), int32
initializers the region concatenates become int64 copies, and the closing Casts to int64 are
bypassed. It applies
only when every tensor the region produces is read by region ops or by ``Cast(to=int64)`` of the
same graph, never by anything else, from a subgraph, or as a graph output (their dtype would
change). Main graph and subgraphs alike.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import bypass, drop_disconnected
from onnxopt.names import fresh_name
from onnxopt.ops import is_default_domain

_INT32, _INT64 = onnx.TensorProto.INT32, onnx.TensorProto.INT64
#: Ops that move shape values without arithmetic, and the input index that carries the values.
_MOVERS = {"Slice": (0,), "Gather": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Reshape": (0,),
           "Flatten": (0,), "Identity": (0,), "Concat": None}


def _is_cast(node: gs.Node, to: int) -> bool:
    return node.op == "Cast" and is_default_domain(node) and node.attrs.get("to") == to


def _region(seed: gs.Node, graph: gs.Graph, graph_outputs: set[int]
            ) -> tuple[list, list, list] | str:
    """The nodes between ``seed`` (a Cast to int32 of a Shape) and the Casts back to int64.

    Returns:
        ``(movers, concat_constants, closing_casts)`` or the reason the region is refused.
    """
    movers, constants, closing = [], [], []
    frontier, seen = [seed.outputs[0]], set()
    while frontier:
        t = frontier.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in graph_outputs:
            return "int32 tensor is a graph output"
        for node in t.outputs:
            if not any(node is n for n in graph.nodes):
                return "int32 tensor read in another graph"
            if _is_cast(node, _INT64):
                closing.append(node)
                continue
            if node.op not in _MOVERS or not is_default_domain(node):
                return f"int32 tensor read by {node.op}"
            slots = _MOVERS[node.op]
            for i, inp in enumerate(node.inputs):
                if inp is t and slots is not None and i not in slots:
                    return f"int32 tensor read as an index of {node.op}"
            if node.op == "Concat":
                for inp in node.inputs:
                    if inp is t or id(inp) in seen:
                        continue
                    if isinstance(inp, gs.Constant) and np.dtype(inp.dtype) == np.int32:
                        constants.append((node, inp))
                    elif not (inp.inputs and any(inp.inputs[0] is n for n in movers + [seed])):
                        return "Concat mixes in another int32 tensor"
            if not any(node is n for n in movers):
                movers.append(node)
                frontier.extend(node.outputs)
    return movers, constants, closing


@register
class ElideShapeCasts(Pass):
    name = "elide_shape_casts"
    description = "Remove int64->int32->int64 cast round trips around shape computations."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        elided = 0
        refused: Counter[str] = Counter()
        for g in iter_graphs(graph):
            graph_outputs = {id(t) for t in g.outputs}
            for seed in list(g.nodes):
                if not seed.outputs or not _is_cast(seed, _INT32) or not seed.inputs:
                    continue
                producer = seed.inputs[0].inputs[0] if seed.inputs[0].inputs else None
                if producer is None or producer.op not in ("Shape", "Size"):
                    continue
                region = _region(seed, g, graph_outputs)
                if isinstance(region, str):
                    refused[region] += 1
                    continue
                movers, constants, closing = region
                # The seed's output is not a graph output (checked), so the bypass succeeds.
                bypass(g, seed, seed.inputs[0], seed.outputs[0])
                for node in movers:  # a tensor whose dtype changes gets a new name
                    for t in node.outputs:
                        t.name, t.dtype = fresh_name(graph, f"{t.name}_int64"), np.int64
                for node, const in constants:
                    wide = gs.Constant(fresh_name(graph, f"{const.name}_int64"),
                                       np.asarray(const.values).astype(np.int64))
                    for i, t in enumerate(node.inputs):
                        if t is const:
                            node.inputs[i] = wide
                for cast in closing:
                    if bypass(g, cast, cast.inputs[0], cast.outputs[0]):
                        elided += 1
                elided += 1
            drop_disconnected(g)
        stats = {"casts_elided": elided}
        if refused:
            stats["refused"] = dict(refused)
        return PassResult(elided > 0, stats)
