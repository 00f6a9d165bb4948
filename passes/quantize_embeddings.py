"""Embedding tables (Gather data) stored as int8 rows or int4 blocks, dequantized after the Gather.

An embedding table is a float32 initializer ``E[V, D]`` read only as the data of ``Gather``
(``axis`` 0): each inference reads a few rows (one per token). MiniLM's word embedding
(30522 x 384, 47 MB) is half of the model, and ``quantize_weights`` leaves it alone because it is
not a MatMul/Conv weight.

Runtime form: only the gathered rows are dequantized, never the table. Dequantizing the whole
table in front of the Gather (``Gather(DequantizeLinear(q), ids)``) would convert 30522 x 384
values on every inference unless the runtime constant-folds it back into a float table (which
onnxruntime does, in memory, so the saving would be on disk only); gathering the codes and their
scales with the same indices costs a handful of element-wise ops on ``[..., D]``.

int8 (``bits=8``), per-row symmetric scale (the scheme of ``quantize_weights``, see
``onnxopt.passes._quant.quantize_symmetric``, with the row as the channel)::

    scale_v = max_d |E[v, d]| / 127            q = clip(round_half_even(E / scale_v), -127, 127)
    Gather(E, ids)  ->  Mul(Cast<float>(Gather(q, ids)), Gather(S, ids))      S = scale as [V, 1]

``|E - E'| <= scale_v / 2``. Storage ``V (D + 4)`` bytes against ``4 V D``.

int4 (``bits=4``), block-wise along D with ``block_size`` values per block (default 32, the
block of onnxruntime's ``MatMulNBits``/``GatherBlockQuantized`` and of the int4 literature;
Frantar et al. 2023, Lin et al. 2024), symmetric per block::

    scale_vb = max |E[v, block b]| / 7         c = clip(round_half_even(E / scale_vb), -7, 7) + 8

The codes ``c`` (1..15) of one block are packed two per byte: byte ``j`` of a block holds value
``j`` in its low nibble and value ``j + block_size / 2`` in its high nibble, so unpacking is a
Concat along the last axis (no interleaving)::

    P[V, D / block_size, block_size / 2] uint8          S[V, D / block_size, 1] float32
    p  = Gather(P, ids)                                         [..., nb, bs / 2]
    c  = Concat(Mod(p, 16), BitShift(p, 4, "RIGHT"), axis=-1)  [..., nb, bs]
    E' = Reshape(Mul(Sub(Cast<float>(c), 8), Gather(S, ids)), [0, ..., 0, D])   [..., D]

Standard ops of opset 11 (BitShift); int4 types cannot be Gathered (ONNX's int4 support at
opset 21 does not include Gather), hence the packed uint8 form. Storage ``V D / 2 + 4 V D /
block_size`` bytes (18 % of float32 at block 32, plus nothing for zero points). The final
Reshape needs the rank of the indices: a Gather whose indices have an unknown rank is refused.

Small tables (option ``eight_bit_rows``): with ``bits=4``, a table of at most that many rows is
stored as int8 rows instead. Every Gather reads one row per index whatever the table's size, so
a position or token-type table's rows are read by every sequence while a vocabulary's rows are
read rarely: their 4-bit error reaches the output as often as the vocabulary's at a fraction of
its bytes. Measured on MiniLM-L6 (evaluation sentences, masked cosine of ``last_hidden_state``,
MatMuls float): the 512-row position table at 4 bits alone costs 0.0008 of cosine, the
30522-row word table 0.0012; the position table in 8 bits adds 98 KB (0.1 % of the model).
The mixed-precision idea of keeping the most sensitive tensors at 8 bits is NNCF's
(``ratio`` of ``compress_weights``) and Dettmers et al. 2022 ("LLM.int8()"), here decided by
how often a table's rows are read.

With ``contrib_ops`` the Gather becomes com.microsoft ``GatherBlockQuantized`` (same codes and
scales; onnxruntime only). Measured on MiniLM's word embedding, 8 x 64 token ids, onnxruntime
1.32 CPU, 2 threads (median of 300 runs): float Gather 37-50 us; int8 Gather + Cast + Mul 85-92 us;
``Gather(DequantizeLinear(table))`` 6.6 ms (onnxruntime does not fold it: the whole table is
dequantized on every run); int8 Gather -> blocked DequantizeLinear (opset 21) 404 us; int4 standard
form 373-439 us; int4 GatherBlockQuantized 160-288 us. A MiniLM inference of that batch takes
tens of milliseconds, so every form but the first-dequantize-then-Gather one is negligible.

Drift budget: each table is one proposal (its dequantized values; group: the table's name).
Statistics: ``tensors_quantized``, ``scheme``, ``proposed``/``accepted``, ``refused``
(``{reason: count}``), ``bytes_before``/``bytes_after`` (of the accepted tables).

Errors: none of its own.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses import TensorTypes, UseDef
from onnxopt.budget import Proposal
from onnxopt.edit import input_slots
from onnxopt.names import fresh_name
from onnxopt.ops import weight_slot
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._quant import (QuantizeOptions, dequantize, import_domain,
                                   quantize_symmetric, weight_refusal, weight_summary)

#: Tables with fewer elements stay float.
MIN_ELEMENTS = 16
#: Values per int4 block (along D).
BLOCK_SIZE = 32
#: Largest magnitude of the symmetric int4 grid, and the offset making its codes unsigned.
INT4_QMAX, INT4_OFFSET = 7, 8
_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class QuantizeEmbeddingsOptions(QuantizeOptions):
    """Options of :class:`QuantizeEmbeddings` (and ``exclude`` / ``ops``, see
    :class:`~onnxopt.passes._quant.QuantizeOptions`; the op type is ``Gather``).

    Attributes:
        bits: 8 (per-row int8) or 4 (block-wise int4).
        block_size: values per int4 block along the embedding dimension (even, at least 2;
            the dimension must be a multiple of it). Ignored for 8 bits.
        min_elements: tables with fewer elements stay float.
        symmetric: for 4 bits, symmetric blocks (zero point 8, none stored) or asymmetric ones
            (a zero point per block, one byte in the standard form).
        contrib_ops: for 4 bits, emit com.microsoft ``GatherBlockQuantized`` (onnxruntime only;
            ``block_size`` a power of two of at least 16) instead of the standard-op unpacking.
        eight_bit_rows: for 4 bits, tables of at most this many rows are stored as int8 rows
            (see the module docstring); 0: every table in 4 bits.
    """

    bits: int = 8
    block_size: int = BLOCK_SIZE
    min_elements: int = MIN_ELEMENTS
    symmetric: bool = True
    contrib_ops: bool = False
    eight_bit_rows: int = 0

    def check(self) -> str | None:
        if self.bits not in (8, 4):
            return f"option bits must be 8 or 4, got {self.bits}"
        if self.block_size < 2 or self.block_size % 2:
            return f"option block_size must be an even number of at least 2, got " \
                   f"{self.block_size}"
        if self.min_elements < 1:
            return f"option min_elements must be at least 1, got {self.min_elements}"
        if self.eight_bit_rows < 0:
            return f"option eight_bit_rows must be at least 0, got {self.eight_bit_rows}"
        if self.contrib_ops and self.bits == 4 and (
                self.block_size < 16 or self.block_size & (self.block_size - 1)):
            return f"option block_size must be a power of two of at least 16 with contrib_ops " \
                   f"(GatherBlockQuantized), got {self.block_size}"
        return super().check()


def quantize_int4_blocks(table: np.ndarray, block_size: int, symmetric: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """int4 quantization of ``table`` ``[V, D]`` in blocks of ``block_size`` along D: symmetric
    (codes ``q + 8``, zero point 8) or asymmetric (the block's ``[min, max]``, widened to hold
    0, onto codes 0..15 with a zero point per block; ``onnxopt.passes._quant`` for the grid).

    Returns:
        ``(packed, scale, zero_point)``: ``packed`` uint8 ``[V, D / block_size, block_size /
        2]`` (see the module docstring for the nibble layout), ``scale`` float32
        ``[V, D / block_size, 1]``, ``zero_point`` uint8 of the scale's shape (None when
        symmetric).
    """
    v, d = table.shape
    blocks = table.reshape(v, d // block_size, block_size).astype(np.float64)
    if symmetric:
        q, scale = quantize_symmetric(blocks.reshape(-1, block_size), 0, INT4_QMAX)
        codes = (q.astype(np.int16) + INT4_OFFSET).astype(np.uint8).reshape(blocks.shape)
        scale, zero_point = scale.reshape(v, d // block_size, 1), None
    else:
        lo = np.minimum(blocks.min(axis=-1, keepdims=True), 0.0)
        hi = np.maximum(blocks.max(axis=-1, keepdims=True), 0.0)
        scale = ((hi - lo) / 15).astype(np.float32)
        scale = np.where(scale >= np.finfo(np.float32).tiny, scale, np.float32(1.0))
        zero = np.clip(np.rint(-lo / scale), 0, 15)
        codes = np.clip(np.rint(blocks / scale) + zero, 0, 15).astype(np.uint8)
        zero_point = zero.astype(np.uint8)
    half = block_size // 2
    packed = codes[..., :half] | (codes[..., half:] << 4)
    return packed, scale.astype(np.float32), zero_point


def dequantize_int4_blocks(packed: np.ndarray, scale: np.ndarray,
                           zero_point: np.ndarray | None = None) -> np.ndarray:
    """What the int4 runtime form computes for the whole table: float32 ``[V, D]``."""
    codes = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.float32)
    offset = INT4_OFFSET if zero_point is None else zero_point.astype(np.float32)
    value = (codes - offset) * scale
    return value.reshape(value.shape[0], -1)


def table_bits(t: gs.Constant, options: QuantizeEmbeddingsOptions) -> int:
    """The bits of table ``t`` ``[V, D]``: 8 under ``bits=4`` for a table of at most
    ``eight_bit_rows`` rows (module docstring), else ``options.bits``."""
    return 8 if options.bits == 8 or t.shape[0] <= options.eight_bit_rows else 4


def _refusal(t: gs.Constant, slots: list, usedef: UseDef,
             options: QuantizeEmbeddingsOptions, ranks) -> str | None:
    """Why table ``t`` must stay float, or None (``options`` with the table's bits, see
    :func:`table_bits`)."""
    reason = weight_refusal(
        t, slots, usedef, options,
        lambda n, i: n.op == "Gather" and i == 0 and weight_slot(n, i) is not None,
        "also read outside a Gather table slot", ndim=2)
    if reason is None and any(n.attrs.get("axis", 0) != 0 for n, _ in slots):
        reason = "Gather axis is not 0"
    if reason is None and table_bits(t, options) == 4:
        if t.shape[1] % options.block_size:
            reason = "embedding dimension not a multiple of block_size"
        elif not options.contrib_ops and any(ranks(n.inputs[1]) is None for n, _ in slots):
            reason = "indices of unknown rank"
    return reason


@register
class QuantizeEmbeddings(Pass):
    name = "quantize_embeddings"
    description = "Embedding tables (Gather data) as int8 rows or int4 blocks, dequantized " \
                  "after the Gather."
    Options = QuantizeEmbeddingsOptions
    lossless = False
    quantizes = True
    #: Tables are tensors no other quantizer touches: decided with the mode's next pass.
    joins_next = True
    min_opset = 11

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        refused: collections.Counter[str] = collections.Counter()
        usedef = ctx.analyses.get(UseDef)
        tables: dict[int, gs.Constant] = {}
        for g in usedef.scopes:
            for node in g.nodes:
                if node.op == "Gather" and weight_slot(node, 0) is not None and node.inputs \
                        and isinstance(node.inputs[0], gs.Constant) \
                        and np.issubdtype(np.dtype(node.inputs[0].dtype), np.floating):
                    tables.setdefault(id(node.inputs[0]), node.inputs[0])
        proposals = []
        self._stored: dict[int, int] = {}
        self._ranks = ctx.analyses.get(TensorTypes).rank \
            if self.options.bits == 4 and not self.options.contrib_ops else None
        for t in tables.values():
            slots = input_slots(t)
            reason = _refusal(t, slots, usedef, self.options, self._ranks)
            if reason is not None:
                refused[reason] += 1
                continue
            g = usedef.owner(slots[0][0])
            bits = table_bits(t, self.options)
            if bits == 8:
                q, scale = quantize_symmetric(external.peek(t), 0)
                scale = scale.reshape(-1, 1)
                value = functools.partial(dequantize, q, scale, None)
                zero_point = None
            else:
                q, scale, zero_point = quantize_int4_blocks(
                    external.peek(t), self.options.block_size, self.options.symmetric)
                value = functools.partial(dequantize_int4_blocks, q, scale, zero_point)
            proposals.append(Proposal(tensor=t, value=value,
                                      apply=self._rewrite(graph, g, t, bits, q, scale,
                                                          zero_point)))
        stats = {"refused": dict(sorted(refused.items()))} if refused else {}
        return PassResult(False, stats, proposals=proposals)

    @property
    def scheme(self) -> str:
        if self.options.bits == 8:
            return "int8 per-row, dequantized after Gather"
        kind = "symmetric" if self.options.symmetric else "asymmetric"
        if self.options.contrib_ops:
            scheme = f"int4 {kind} block {self.options.block_size}, com.microsoft " \
                     "GatherBlockQuantized"
        else:
            scheme = f"int4 {kind} block {self.options.block_size} (packed uint8), dequantized " \
                     "after Gather"
        if self.options.eight_bit_rows:
            scheme += f"; tables of at most {self.options.eight_bit_rows} rows int8 per-row"
        return scheme

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        return weight_summary(result, accepted, self.scheme, self._stored)

    def _rewrite(self, root: gs.Graph, g: gs.Graph, t: gs.Constant, bits: int, q: np.ndarray,
                 scale: np.ndarray, zero_point: np.ndarray | None):
        """The proposal's ``apply``: every Gather of ``t`` reads the codes and scales instead."""
        def apply() -> None:
            def name(suffix: str) -> str:
                return fresh_name(root, f"{t.name}_{suffix}")

            if bits == 4 and self.options.contrib_ops:
                self._stored[id(t)] = self._gather_block_quantized(root, t, q, scale,
                                                                   zero_point, name)
                return
            self._stored[id(t)] = q.nbytes + scale.nbytes + (
                0 if zero_point is None else zero_point.nbytes)
            codes, scales = gs.Constant(name("quantized"), q), gs.Constant(name("scale"), scale)
            zeros = None if zero_point is None else gs.Constant(name("zero_point"), zero_point)
            for node, _ in input_slots(t):
                self._dequantize_after(g, node, bits, codes, scales, zeros, name)
        return apply

    def _dequantize_after(self, g: gs.Graph, gather: gs.Node, bits: int, codes: gs.Constant,
                          scales: gs.Constant, zeros: gs.Constant | None, name) -> None:
        """Make ``gather`` read ``codes`` and append the nodes rebuilding its float output."""
        ids, out = gather.inputs[1], gather.outputs[0]

        def node(op: str, inputs: list, dtype=np.float32, output: gs.Variable | None = None,
                 **attrs) -> gs.Variable:
            result = output or gs.Variable(name(f"{op}_output"), dtype=dtype)
            g.nodes.append(gs.Node(op, name=name(op), attrs=attrs, inputs=inputs,
                                   outputs=[result]))
            return result

        gathered = gs.Variable(name("gathered"), dtype=codes.values.dtype)
        gather.inputs[0] = codes
        gather.outputs[0] = gathered  # onnx-graphsurgeon relinks the producers
        row_scale = node("Gather", [scales, ids], axis=0)
        if bits == 8:
            values = node("Cast", [gathered], to=onnx.TensorProto.FLOAT)
            node("Mul", [values, row_scale], output=out)
            return
        low = node("Mod", [gathered, gs.Constant(name("sixteen"), np.array(16, np.uint8))],
                   dtype=np.uint8)
        high = node("BitShift", [gathered, gs.Constant(name("four"), np.array(4, np.uint8))],
                    dtype=np.uint8, direction="RIGHT")
        unpacked = node("Concat", [low, high], dtype=np.uint8, axis=-1)
        offset = gs.Constant(name("offset"), np.array(INT4_OFFSET, np.float32)) \
            if zeros is None else node("Cast", [node("Gather", [zeros, ids], dtype=np.uint8,
                                                     axis=0)], to=onnx.TensorProto.FLOAT)
        centred = node("Sub", [node("Cast", [unpacked], to=onnx.TensorProto.FLOAT), offset])
        blocks = node("Mul", [centred, row_scale])
        shape = [0] * self._ranks(ids) + [codes.shape[1] * 2 * codes.shape[2]]
        node("Reshape", [blocks, gs.Constant(name("shape"), np.array(shape, np.int64))],
             output=out)

    def _gather_block_quantized(self, root: gs.Graph, t: gs.Constant, packed: np.ndarray,
                                scale: np.ndarray, zero_point: np.ndarray | None, name) -> int:
        """Turn every Gather of ``t`` into com.microsoft ``GatherBlockQuantized`` and return the
        bytes stored. Its data packs values ``2j`` and ``2j + 1`` of a row into the low and high
        nibble of byte ``j`` (zero points likewise, blocks ``2j`` and ``2j + 1``); its zero point
        is 8 when none is given (onnxruntime's contrib op schema)."""
        v, blocks, _ = packed.shape
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(v, -1)
        added = [gs.Constant(name("quantized"), codes[:, 0::2] | (codes[:, 1::2] << 4)),
                 gs.Constant(name("scale"), scale.reshape(v, blocks))]
        if zero_point is not None:
            zp = np.pad(zero_point.reshape(v, blocks), ((0, 0), (0, blocks % 2)))
            added.append(gs.Constant(name("zero_point"), zp[:, 0::2] | (zp[:, 1::2] << 4)))
        for gather, _ in input_slots(t):
            gather.op, gather.domain = "GatherBlockQuantized", "com.microsoft"
            gather.inputs[0] = added[0]
            gather.inputs.extend(added[1:])
            gather.attrs = {"gather_axis": 0, "quantize_axis": 1,
                            "block_size": self.options.block_size}
        import_domain(root, "com.microsoft", 1)
        return sum(c.values.nbytes for c in added)
