"""Duplicate-initializer merge: initializers with the same dtype, shape and bytes become one.

Candidates are grouped by (dtype, shape) without reading their data, then by a hash of the bytes,
and confirmed by a full byte comparison. Every reader of a duplicate reads the first copy instead
(main graph first, then subgraphs in order); a constant shared between subgraphs is stored once,
in the main graph, on export.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes, UseDef
from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import nbytes, replace_uses


#: Sub-byte types onnx stores packed (two values a byte): numpy has no such dtype, so their
#: values are not compared (reading them unpacks the data, which export would then mislabel).
_PACKED = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                     *([onnx.TensorProto.FLOAT4E2M1] if hasattr(onnx.TensorProto, "FLOAT4E2M1")
                       else [])})


def _packed(t: gs.Constant) -> bool:
    tensor = getattr(t._values, "tensor", None)
    return tensor is not None and tensor.data_type in _PACKED


def _bytes(t: gs.Constant) -> bytes:
    # np.asarray, not ascontiguousarray: the latter turns a scalar into shape (1,)
    return np.asarray(t.values).tobytes()


@register
class DedupInitializers(Pass):
    name = "dedup_initializers"
    description = "Merge initializers with identical dtype, shape and bytes."
    # readers move to an equal initializer: no type, shape or node changes scope
    preserves = frozenset({TensorTypes, UseDef})

    def __init__(self, options=None, **fields) -> None:
        super().__init__(options, **fields)
        # digest of an initializer's bytes, by array: the pipeline runs this pass every round,
        # and hashing large weights again each time dominated its cost (arrays kept alive here,
        # so an id is never reused for another array)
        self._digests: dict[int, tuple[np.ndarray, bytes]] = {}

    def _digest(self, t: gs.Constant) -> bytes:
        values = t.values
        cached = self._digests.get(id(values))
        if cached is None or cached[0] is not values:
            cached = (values, hashlib.blake2b(_bytes(t), digest_size=16).digest())
            self._digests[id(values)] = cached
        return cached[1]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        by_layout: dict[tuple, list[gs.Constant]] = {}
        seen: set[int] = set()
        for g in iter_graphs(graph):
            graph_inputs = {id(t) for t in g.inputs}
            for node in g.nodes:
                for t in node.inputs:
                    if isinstance(t, gs.Constant) and id(t) not in graph_inputs \
                            and id(t) not in seen and not _packed(t):
                        seen.add(id(t))
                        key = (np.dtype(t.dtype).str, tuple(t.shape))
                        by_layout.setdefault(key, []).append(t)
        merged = saved = 0
        for candidates in by_layout.values():
            if len(candidates) < 2:
                continue
            kept: dict[bytes, list[gs.Constant]] = {}
            for t in candidates:
                bucket = kept.setdefault(self._digest(t), [])
                # equal digests: confirm byte for byte (only then are the bytes copied)
                twin = next((c for c in bucket if _bytes(c) == _bytes(t)), None)
                if twin is None:
                    bucket.append(t)
                    continue
                replace_uses(t, twin)
                merged += 1
                saved += nbytes(t)
        return PassResult(merged > 0, {"initializers_merged": merged, "bytes_saved": saved})
