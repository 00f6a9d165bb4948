"""Duplicate-initializer merge: initializers with the same dtype, shape and bytes become one.

Candidates are grouped by (dtype, shape, hash of the bytes) and confirmed by a full byte comparison.
Every reader of a duplicate reads the first copy instead (main graph first, then subgraphs in
order); a constant shared between subgraphs is stored once, in the main graph, on export.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from optimizer.graph import iter_graphs
from optimizer.pass_manager import Pass, PassContext, PassResult, register
from passes._util import nbytes, replace_uses


@register
class DedupInitializers(Pass):
    name = "dedup_initializers"
    description = "Merge initializers with identical dtype, shape and bytes."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        constants: dict[int, gs.Constant] = {}
        for g in iter_graphs(graph):
            graph_inputs = {id(t) for t in g.inputs}
            for node in g.nodes:
                for t in node.inputs:
                    if isinstance(t, gs.Constant) and id(t) not in graph_inputs:
                        constants.setdefault(id(t), t)
        groups: dict[tuple, list[tuple[gs.Constant, np.ndarray]]] = {}
        merged = saved = 0
        for t in constants.values():
            value = np.asarray(t.values)  # not ascontiguousarray: it makes scalars 1-D
            key = (value.dtype.str, value.shape, hashlib.blake2b(value.tobytes(), digest_size=16).digest())
            group = groups.setdefault(key, [])
            twin = next((c for c, v in group if np.array_equal(v, value, equal_nan=True)
                         and v.tobytes() == value.tobytes()), None)
            if twin is None:
                group.append((t, value))
                continue
            replace_uses(t, twin)
            merged += 1
            saved += nbytes(t)
        return PassResult(merged > 0, {"initializers_merged": merged, "bytes_saved": saved})
