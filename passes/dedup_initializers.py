"""Parameter sharing: initializers that hold the same values are stored once.

- **Exact duplicates** (same dtype, shape and bytes) become one. Candidates are grouped by
  (dtype, shape) without reading their data, then by a hash of the bytes, and confirmed by a full
  byte comparison. Every reader of a duplicate reads the first copy instead (main graph first,
  then subgraphs in order); a constant shared between subgraphs is stored once, in the main
  graph, on export.
- **Transposes** (rank 2 only): an initializer ``B[b, a]`` equal to ``A^T`` for another
  initializer ``A[a, b]`` of the same dtype -- tied embeddings exported as a Gather table
  ``E[V, D]`` and an LM head reading ``E^T[D, V]``, say -- is replaced by ``Transpose(A)``, one
  node in the main graph (``perm=[1, 0]``; ``Transpose(A)[i, j] = A[j, i]``, ONNX spec, so the
  readers see the same values, bit for bit). The first of the two in the order above is kept.
  Candidates are matched by their first row against the first column of the ``[b, a]``
  initializers and confirmed byte for byte. Only tensors of at least ``transpose_min_bytes``
  (default 1 MiB) are shared: the saving must outweigh a node that runtimes evaluate. The
  Transpose's output is marked as compressed storage (``PassContext.storage``), so
  ``fold_constants`` never folds it back into an initializer -- without the mark it would fold
  every result of at most its ``growth_limit`` (64 KiB; ``A`` keeps its other readers, so
  nothing else frees bytes) and the two passes would undo each other every round. Any
  threshold is therefore consistent. onnxruntime constant-folds the Transpose when the
  session loads (graph optimizations on), so only the file shrinks, not the memory at run time.
  A quantization pass would see a weight read through a Transpose as computed, not as an
  initializer, and leave it float; so while a lossy pass is still to run
  (``PassContext.lossy_pending``, when the pass manager sets it) sharing waits for the rounds
  after it, where per-channel int8 of ``E`` and of ``E^T`` (same per-token scales) are
  themselves a transposed pair. Measured on a tied-embedding export (V=4096, D=256, 10.5 MB):
  default pipeline 6.30 MB instead of 10.49 MB; int8-weight 1.63 MB instead of 2.67 MB.

Statistics: ``initializers_merged`` (exact duplicates), ``transposes_shared`` (initializers
replaced by a Transpose of another) and ``bytes_saved`` (both, in bytes of initializer data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses import TensorTypes, UseDef
from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import nbytes, numpy_dtype, replace_uses
from onnxopt.names import fresh_name


#: Sub-byte types onnx stores packed (two values a byte): numpy has no such dtype, so their
#: values are not compared (reading them unpacks the data, which export would then mislabel).
_PACKED = frozenset({onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                     *([onnx.TensorProto.FLOAT4E2M1] if hasattr(onnx.TensorProto, "FLOAT4E2M1")
                       else [])})


#: Elements of a weight's first row and column compared before two weights are compared in full
#: as transposes of each other.
_PREFIX = 8


def _packed(t: gs.Constant) -> bool:
    tensor = getattr(t._values, "tensor", None)
    return tensor is not None and tensor.data_type in _PACKED


def _bytes(t: gs.Constant) -> bytes:
    # np.asarray, not ascontiguousarray: the latter turns a scalar into shape (1,)
    return np.asarray(external.peek(t)).tobytes()


def _transposed_bytes(t: gs.Constant) -> bytes:
    return np.ascontiguousarray(np.asarray(external.peek(t)).T).tobytes()


@dataclass(frozen=True)
class DedupInitializersOptions:
    """Options of :class:`DedupInitializers`.

    Attributes:
        transpose_min_bytes: smallest initializer, in bytes, replaced by the Transpose of another
            (default 1 MiB: below, the saving hardly outweighs a node the runtime evaluates).
    """

    transpose_min_bytes: int = 1 << 20

    def check(self) -> str | None:
        if self.transpose_min_bytes < 0:
            return f"option transpose_min_bytes must not be negative, got " \
                   f"{self.transpose_min_bytes}"
        return None


@register
class DedupInitializers(Pass):
    name = "dedup_initializers"
    description = ("Store equal initializers once: exact duplicates merged, a rank-2 initializer "
                   "equal to another's transpose read through a Transpose.")
    Options = DedupInitializersOptions
    # readers move to an equal initializer: no type, shape or node changes scope (a shared
    # transpose adds a node: the run then drops every analysis itself)
    preserves = frozenset({TensorTypes, UseDef})

    def __init__(self, options=None, **fields) -> None:
        super().__init__(options, **fields)
        # digest of an initializer's bytes, by array: the pipeline runs this pass every round,
        # and hashing large weights again each time dominated its cost (arrays kept alive here,
        # so an id is never reused for another array)
        self._digests: dict[int, tuple[np.ndarray, bytes]] = {}

    def _digest(self, t: gs.Constant) -> bytes:
        stored = external.stored_digest(t._values)
        if stored is not None:  # read from the file in chunks, never mapped
            return stored
        values = t.values
        cached = self._digests.get(id(values))
        if cached is None or cached[0] is not values:
            cached = (values, hashlib.blake2b(_bytes(t), digest_size=16).digest())
            self._digests[id(values)] = cached
        return cached[1]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        by_layout: dict[tuple, list[gs.Constant]] = {}
        seen: set[int] = set()
        ordered: list[tuple[tuple, gs.Constant]] = []
        for g in iter_graphs(graph):
            graph_inputs = {id(t) for t in g.inputs}
            for node in g.nodes:
                for t in node.inputs:
                    if isinstance(t, gs.Constant) and id(t) not in graph_inputs \
                            and id(t) not in seen and not _packed(t):
                        seen.add(id(t))
                        # by name: ml_dtypes' types share their ``str`` ('<V1': int4, uint4,
                        # float8e4m3fn)
                        key = (numpy_dtype(t).name, tuple(t.shape))
                        by_layout.setdefault(key, []).append(t)
                        ordered.append((key, t))
        merged = saved = 0
        for layout in by_layout.values():
            # external weights are told apart by a few sampled pages first: hashing all of a
            # large model's weights would read every byte of it
            groups: dict[bytes, list[gs.Constant]] = {}
            for t in layout if len(layout) > 1 else ():
                groups.setdefault(self._sketch(t), []).append(t)
            for candidates in groups.values():
                if len(candidates) > 1:
                    merged_here, saved_here = self._merge(candidates)
                    merged, saved = merged + merged_here, saved + saved_here
        # While a lossy pass is still to run (``PassContext.lossy_pending``), sharing waits: a
        # weight read through a Transpose is no initializer to quantize, and the quantized pair
        # (int8 per-channel of E and of E^T) is itself a transposed pair, shared afterwards.
        shared, shared_bytes = (0, 0) if getattr(ctx, "lossy_pending", False) \
            else self._share_transposes(graph, ordered, getattr(ctx, "storage", None))
        if shared and ctx.analyses is not None:
            ctx.analyses.invalidate()  # a new node and tensor: types and use-def are stale
        return PassResult(merged + shared > 0, {"initializers_merged": merged,
                                                "transposes_shared": shared,
                                                "bytes_saved": saved + shared_bytes})

    def _sketch(self, t: gs.Constant) -> bytes:
        """A key equal for equal initializers: sampled pages of an external one, else the
        digest."""
        source = external.source_of(t._values)
        return source.sketch() if source is not None else self._digest(t)

    def _merge(self, candidates: list[gs.Constant]) -> tuple[int, int]:
        """Point the readers of each of ``candidates`` (of one layout) equal to an earlier one
        at that one; return how many were merged and their bytes."""
        merged = saved = 0
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
        return merged, saved

    def _share_transposes(self, graph: gs.Graph, ordered: list[tuple[tuple, gs.Constant]],
                          storage: set[str] | None) -> tuple[int, int]:
        """Replace each rank-2 initializer of ``ordered`` ((dtype, shape) key, initializer) equal
        to the transpose of an earlier one by a Transpose of it, whose output is marked in
        ``storage`` (``PassContext.storage``; None: not marked); return how many and the bytes
        saved."""
        outputs = {id(t) for g in iter_graphs(graph) for t in g.outputs}
        # keyed by (dtype, shape, start of the first row): a partner of t[a, b] starts its first
        # row as t's first column starts, so a few elements are read before a full comparison
        by_row: dict[tuple, list[gs.Constant]] = {}
        shared = saved = 0
        transposes: list[gs.Node] = []
        for (dtype, shape), t in ordered:
            if len(shape) != 2 or 0 in shape or not t.outputs or id(t) in outputs \
                    or nbytes(t) < self.options.transpose_min_bytes \
                    or not isinstance(external.peek(t), np.ndarray):
                continue  # merged above (no reader left), a graph output, small or sparse
            values = np.asarray(external.peek(t))  # an external weight: mapped only here
            # the first _PREFIX elements of the first column and row are the keys: a whole
            # column touches a page of every row, and a full comparison confirms a match anyway
            column = np.ascontiguousarray(values[:_PREFIX, 0]).tobytes()
            partners = by_row.get((dtype, shape[::-1], column), [])
            source = next((p for p in partners if _bytes(p) == _transposed_bytes(t)), None)
            if source is None:
                by_row.setdefault((dtype, shape, values[0, :_PREFIX].tobytes()), []).append(t)
                continue
            value = gs.Variable(fresh_name(graph, f"{source.name}__transposed"), t.dtype,
                                list(t.shape))
            replace_uses(t, value)
            if storage is not None:
                storage.add(value.name)
            transposes.append(gs.Node("Transpose", fresh_name(graph, f"{t.name}__shared"),
                                      {"perm": [1, 0]}, [source], [value]))
            shared += 1
            saved += nbytes(t)
        graph.nodes[0:0] = transposes
        return shared, saved
