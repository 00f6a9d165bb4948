"""Constant folding: evaluate nodes whose inputs are all known, store their outputs as initializers.

A node is folded when every input is an initializer (or an omitted optional input) and the op is
deterministic, or when its outputs are known element by element from *partial values* (below),
in the main graph and in If/Loop/Scan bodies alike.

Partial values. Shape computations (``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``) are often
constant although the tensor they start from has dynamic dims: for ``state[2, batch, 128]``,
``Gather(Shape(state), [0])`` is ``[2]``. Each small tensor is given a value array and a mask of
the elements known, derived only from initializers, from the shapes ``onnxopt.analyses.TensorTypes``
infers (ONNX shape inference from the graph inputs, initializers and ops; a dim_param or a
negative declared dim is unknown) and from op semantics:

- ``Shape(x)[start:end]``: element i is dim ``start + i`` of ``x`` when that dim is static (the
  rank must be known); ``Size(x)``: known when every dim is static;
- data movement -- Identity, Gather, Slice, Squeeze, Unsqueeze, Reshape, Flatten, Concat,
  Transpose, Expand, Tile -- with every other input known: each output element is a copy of one
  data element. The op is run in onnxruntime on *element indices* (data input k replaced by
  ``offset_k + arange``), which yields, for each output element, the data element it copies, so
  its value and its known-flag follow, with the op's exact semantics (negative indices, clamped
  slice bounds, broadcasting);
- elementwise ops (Cast, arithmetic, comparisons, logic, Where, Min/Max, ...): an output element
  is known when the elements it is computed from are all known (the input masks broadcast to the
  output shape); values are computed by onnxruntime with 1 in place of unknown elements, which
  affects only unknown outputs;
- absorbing elements: an output element of ``Mul`` on *integer* tensors is known (0) when either
  operand element is a known 0, of ``And`` (false) when either is a known false, of ``Or`` (true)
  when either is a known true, whatever the other operand holds. ONNX ``Mul`` on integers is
  the ring product modulo 2^bits (two's complement wrap-around, as every runtime computes it),
  where ``x * 0 = 0`` for every x; ``And``/``Or`` are boolean logic (spec, opsets 1-21), where
  ``x and false = false`` and ``x or true = true``. The value computed with 1 (true) in place of
  the unknown operand is therefore the right one. Floats are excluded: ``NaN * 0`` and
  ``inf * 0`` are NaN, and ``-x * 0`` is ``-0.0`` (IEEE 754). So ``Cast(Mul(sr, 0))`` of an int64
  input ``sr`` of static shape folds, whatever ``sr`` is at run time.

A tensor with a static shape but no other information enters as all-unknown (so
``Concat([batch], [128])`` is ``[?, 128]``). A node all of whose outputs are fully known is
replaced by initializers. Partial values are tracked for tensors of at most
``_PARTIAL_ELEMENTS`` elements.

Values are computed by onnxruntime, one node at a time (``onnxopt.evaluate``), so the result is
what the runtime would have computed. Size bounds, so that a small generator
(``ConstantOfShape``, ``Tile``, ``Expand``, ``Range`` of constants) is not materialized into a
large tensor:

- a result of ``size_limit`` bytes or more (an option, 1 MiB by default) is materialized only if
  it is no larger than the initializers that disappear with the node -- those it alone reads
  (e.g. ``Transpose(W)`` of a W used nowhere else), and an equal share of those all of whose
  readers fold too (the Slices cutting one weight into an LSTM's gates); otherwise the node stays
  symbolic;
- no fold adds more than ``growth_limit`` bytes (64 KiB by default) to the initializers, so that
  a compressed storage form (clustered weights ``Gather(codebook, indices)``) of a model loaded
  from a file, which no pass of this run marked (below), is not decompressed into the file;
- unless ``size_limit`` is given (``--fold-size-limit``: the user asked for large folds), the
  model keeps its size class: all folds of the run together leave the tensors (initializers and
  Constant values, in every graph) at most ``max(growth_limit, 10% of the original file)`` bytes
  larger than the original's. Each fold is under the per-fold limits, but there can be hundreds:
  the ONNX ``light_*`` test models generate every weight with a ``ConstantOfShape``, and folding
  them grew ``light_resnet50`` from 78 KiB to 291 KiB (193 folds of at most 64 KiB; 2.89 MiB
  before dedup_initializers merged the equal ones). Folds are accepted in graph order while they
  fit; the refused ones are counted, with the bytes they would have added, in a warning.

Sequence and optional values are never folded.

Never folded: random ops, QuantizeLinear/DequantizeLinear (a QDQ pair is the quantized model's
storage format), nodes with subgraphs, ops of non-default domains, and the nodes of a compressed
storage form -- nodes with an output named in ``PassContext.storage``: the decompression subgraph
of a weight that a lossy pass built (cluster_weights' unpacking of 4-bit indices and codebook
lookup) or a shared transpose (dedup_initializers). The growth limit alone does not protect them:
the 4-bit unpacking of a 256 x 256 weight is a chain of steps of at most 64 KiB each, folded one
by one back into uint8 indices twice the size, and a small table is decompressed into floats.

Statistics: ``rewritten``; ``by_kind``: ``folded`` (nodes replaced by initializers) and ``reshape
target made constant``; ``refused``: ``over the size limit``, ``would grow the initializers``,
``would grow the model past its size class``, ``onnxruntime cannot evaluate it``, ``compressed
storage`` (a storage node whose inputs are all constant, counted each round).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes
from onnxopt.edit import nbytes
from onnxopt.external import peek
from onnxopt.evaluate import evaluate_node
from onnxopt.graph import iter_graphs, model_stats
from onnxopt.ops import NONDETERMINISTIC_OPS, is_default_domain
from onnxopt.pass_manager import PassContext, PassResult, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

_NEVER_FOLD = NONDETERMINISTIC_OPS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}

#: ``size_limit`` when none is given (bytes).
DEFAULT_SIZE_LIMIT = 1 << 20
#: Fraction of the original file all folds together may add to the tensors when no
#: ``size_limit`` is given (at least ``growth_limit``; module docstring).
MODEL_GROWTH = 0.1
_SIZE_CLASS = "would grow the model past its size class"
#: numpy (ml_dtypes) names of the 4-bit types ONNX packs two to a byte.
_PACKED_NAMES = frozenset({"int4", "uint4", "float4_e2m1fn"})

#: Largest tensor (in elements) whose partial value is tracked: shape computations are tiny.
_PARTIAL_ELEMENTS = 64

#: Ops each output element of which is a copy of one element of the data inputs, and the indices
#: of those data inputs (None: every input).
_MOVEMENT_OPS = {"Identity": (0,), "Gather": (0,), "Slice": (0,), "Squeeze": (0,),
                 "Unsqueeze": (0,), "Reshape": (0,), "Flatten": (0,), "Concat": None,
                 "Transpose": (0,), "Expand": (0,), "Tile": (0,)}

#: Elementwise ops with an absorbing element: op -> (the absorbing value, whether only integer
#: operands qualify). See the module docstring.
_ABSORBING = {"Mul": (0, True), "And": (False, False), "Or": (True, False)}

_ELEMENTWISE_OPS = frozenset({
    "Cast", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Sign", "Floor", "Ceil", "Equal",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Max", "Min",
    "Where"})


@dataclass
class _Partial:
    """A tensor's value where ``known``; other elements hold a placeholder. ``origin`` names, for
    an unknown element copied from a shape, the dim it is (see ``_PartialValues.dim_symbol``),
    else -1."""
    values: np.ndarray
    known: np.ndarray
    origin: np.ndarray | None = None

    def __post_init__(self):
        # numpy indexing and arithmetic turn 0-d arrays into scalars, which onnxruntime refuses
        self.values, self.known = np.asarray(self.values), np.asarray(self.known)
        if self.origin is not None:
            self.origin = np.asarray(self.origin)

    def origins(self) -> np.ndarray:
        return np.full(self.values.shape, -1, np.int64) if self.origin is None else self.origin

    @property
    def complete(self) -> bool:
        return bool(self.known.all())


class _PartialValues:
    """Partial values of the tensors of a graph and its subgraphs, filled in node order."""

    def __init__(self, types: TensorTypes):
        self._types = types
        self._known: dict[int, _Partial] = {}
        self._symbols: dict[tuple[int, int], int] = {}

    def dim_symbol(self, t: gs.Tensor, axis: int) -> int:
        """A number standing for dim ``axis`` of ``t`` (the same for the same dim)."""
        return self._symbols.setdefault((id(t), axis), len(self._symbols))

    def set(self, t: gs.Tensor, value: np.ndarray) -> None:
        self._known[id(t)] = _Partial(value, np.ones(value.shape, bool))

    def get(self, t: gs.Tensor) -> _Partial | None:
        if t.is_empty():
            return None
        if id(t) in self._known:
            return self._known[id(t)]
        if isinstance(t, gs.Constant):
            if int(np.prod(t.shape, dtype=np.int64)) > _PARTIAL_ELEMENTS:
                return None
            value = peek(t)
            if not isinstance(value, np.ndarray):
                return None
            value = np.asarray(value)
            return _Partial(value, np.ones(value.shape, bool))
        shape, dtype = self._types.static_shape(t), self._types.dtype(t)
        if shape is None or dtype is None or int(np.prod(shape)) > _PARTIAL_ELEMENTS:
            return None
        return _Partial(np.ones(shape, dtype), np.zeros(shape, bool))

    def propagate(self, node: gs.Node, graph: gs.Graph,
                  inputs: list[gs.Tensor] | None = None) -> list[_Partial] | None:
        """The partial values of the outputs of ``node`` (recorded), or None; ``inputs`` stand
        for the node's inputs when given."""
        outs = self._compute(node, graph, node.inputs if inputs is None else inputs)
        if outs is None or len(outs) != len(node.outputs) \
                or any(p.values.size > _PARTIAL_ELEMENTS for p in outs):
            return None
        for t, p in zip(node.outputs, outs):
            self._known[id(t)] = p
        return outs

    def _compute(self, node: gs.Node, graph: gs.Graph, inputs: list[gs.Tensor]
                 ) -> list[_Partial] | None:
        if not is_default_domain(node) or not node.inputs:
            return None
        if node.op in ("Shape", "Size"):
            p = self._shape(node)
            return None if p is None else [p]
        if node.op not in _MOVEMENT_OPS and node.op not in _ELEMENTWISE_OPS:
            return None
        if node.op in ("Expand", "Tile"):  # the only movements that can grow: size them first
            shape = self._types.static_shape(node.outputs[0])
            if shape is None or int(np.prod(shape)) > _PARTIAL_ELEMENTS:
                return None
        partials = [self.get(t) for t in inputs]
        if any(p is None for p, t in zip(partials, inputs) if not t.is_empty()):
            return None
        if node.op in _ELEMENTWISE_OPS:
            return self._elementwise(node, graph, partials)
        return self._movement(node, graph, partials)

    def _shape(self, node: gs.Node) -> _Partial:
        shape = self._types.shape(node.inputs[0])
        if shape is None:
            return (_Partial(np.ones((), np.int64), np.zeros((), bool)) if node.op == "Size"
                    else None)
        if node.op == "Size":
            known = all(d is not None for d in shape)
            return _Partial(np.array(np.prod(shape) if known else 1, np.int64), np.array(known))
        axes = range(len(shape))[node.attrs.get("start", 0):node.attrs.get("end", len(shape))]
        x = node.inputs[0]
        return _Partial(np.array([1 if shape[a] is None else shape[a] for a in axes], np.int64),
                        np.array([shape[a] is not None for a in axes], bool),
                        np.array([-1 if shape[a] is not None else self.dim_symbol(x, a)
                                  for a in axes], np.int64))

    @staticmethod
    def _movement(node, graph, partials) -> list[_Partial] | None:
        data = _MOVEMENT_OPS[node.op] or range(len(partials))
        feeds, flat_values, flat_known, flat_origin, offset = [], [], [], [], 0
        for i, p in enumerate(partials):
            if p is None:
                feeds.append(None)
            elif i in data:
                feeds.append(np.asarray(offset + np.arange(p.values.size, dtype=np.int64)
                                        .reshape(p.values.shape)))
                flat_values.append(p.values.ravel())
                flat_known.append(p.known.ravel())
                flat_origin.append(p.origins().ravel())
                offset += p.values.size
            elif not p.complete:
                return None  # an unknown index, axis or shape: the movement itself is unknown
            else:
                feeds.append(p.values)
        if len({v.dtype for v in flat_values}) != 1:
            return None
        try:
            (picked,) = evaluate_node(node, graph, feeds)
        except Exception:  # noqa: BLE001 -- onnxruntime rejects the node: nothing known
            return None
        values, known = np.concatenate(flat_values), np.concatenate(flat_known)
        return [_Partial(values[picked], known[picked], np.concatenate(flat_origin)[picked])]

    @staticmethod
    def _elementwise(node, graph, partials) -> list[_Partial] | None:
        present = [p for p in partials if p is not None]
        try:
            known = np.logical_and.reduce(np.broadcast_arrays(*[p.known for p in present]))
            feeds = [None if p is None else np.where(p.known, p.values, np.ones((), p.values.dtype))
                     for p in partials]
            (values,) = evaluate_node(node, graph, feeds)
        except Exception:  # noqa: BLE001 -- shapes do not broadcast, or onnxruntime rejects it
            return None
        if not isinstance(values, np.ndarray) or values.shape != known.shape:
            return None
        return [_Partial(values, known | _absorbed(node.op, present, known.shape))]


def _absorbed(op: str, partials: list[_Partial], shape: tuple) -> np.ndarray | bool:
    """Where an absorbing element decides the output of ``op`` whatever the other operand holds
    (see ``_ABSORBING``); False when ``op`` has none or its operands do not qualify."""
    if op not in _ABSORBING or len(partials) != 2:
        return False
    value, integers_only = _ABSORBING[op]
    if integers_only and not all(np.issubdtype(p.values.dtype, np.integer) for p in partials):
        return False
    hits = [np.broadcast_to(p.known & (p.values == value), shape) for p in partials]
    return np.logical_or.reduce(hits)


@dataclass(frozen=True)
class FoldConstantsOptions:
    """Options of :class:`FoldConstants`.

    Attributes:
        size_limit: largest result, in bytes, folding materializes unless it replaces at least
            as many bytes of initializers; None: :data:`DEFAULT_SIZE_LIMIT` (1 MiB), and all
            folds together keep the model's size class (module docstring), which a given
            limit lifts.
        growth_limit: most bytes one fold may add to the initializers (its result minus the
            initializers that disappear with it; default 64 KiB), so that a compressed storage
            form that no pass of the run marked in ``PassContext.storage`` -- clustered weights
            ``Gather(codebook, indices)`` of a model loaded so -- is not expanded back into the
            float tensor it encodes.
    """

    size_limit: int | None = None
    growth_limit: int = 64 << 10

    def check(self) -> str | None:
        if self.size_limit is not None and self.size_limit < 0:
            return f"option size_limit must not be negative, got {self.size_limit}"
        if self.growth_limit < 0:
            return f"option growth_limit must not be negative, got {self.growth_limit}"
        return None


@dataclass
class _Plan:
    """What folding does to one node: a constant Reshape target (``shape``), the node's output
    values (``values``), or only the reason it is not folded (``refusal``)."""

    shape: np.ndarray | None = None
    values: list[np.ndarray] | None = None
    refusal: Refusal | None = None
    #: Bytes folding adds to the tensors (the values minus the initializers that disappear).
    growth: int = 0


@register
class FoldConstants(RewritePass):
    name = "fold_constants"
    description = ("Evaluate nodes whose inputs are all constant, and shape computations whose "
                   "dims are static.")
    Options = FoldConstantsOptions
    ops = None

    _baseline: tuple = (None, 0, 0)  # (template, its tensor bytes, its file bytes)
    _warned = None  # weak reference to the graph the size-class warning was given for

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._partial = _PartialValues(ctx.analyses.get(TensorTypes))
        #: Bytes the folds of this round may still add (None: no whole-model bound).
        self._room = None
        self._refused = [0, 0]  # folds refused for the size class, and the bytes they add
        if self.options.size_limit is None:
            now = _tensor_bytes(graph)
            if ctx.template is None:  # no original to measure: bound the growth from here
                self._baseline = (None, now, now)
            elif self._baseline[0] is not ctx.template:
                stats = model_stats(ctx.template)
                self._baseline = (ctx.template, stats.parameter_bytes, stats.file_bytes)
            _, tensors, file_bytes = self._baseline
            self._allowed = max(self.options.growth_limit, int(MODEL_GROWTH * file_bytes))
            self._room = tensors + self._allowed - now

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = super().run(graph, ctx)
        count, size = self._refused
        # Said once per graph, in the first round that folds nothing: earlier rounds' counts
        # shrink as other passes free room (dedup_initializers) or merge nodes (cse).
        if count and not result.modified and not (self._warned is not None
                                                  and self._warned() is graph):
            self._warned = weakref.ref(graph)
            result.warnings.append(
                f"fold_constants: {count} folds refused to keep the model's size class: they "
                f"would add {size} bytes, and by default all folds together add at most "
                f"{self._allowed} bytes (the larger of growth_limit and {MODEL_GROWTH:.0%} of "
                "the original file); give --fold-size-limit BYTES (fold_constants' size_limit) "
                "to fold them")
        return result

    def match(self, node: gs.Node, scope: Scope) -> _Plan | Refusal | None:
        if not self._foldable(node):
            return None
        storage = getattr(scope.ctx, "storage", None)
        if storage and any(t.name in storage for t in node.outputs):
            # a compressed storage form (PassContext.storage): refused where it would fold
            constant = all(isinstance(t, gs.Constant) for t in node.inputs if not t.is_empty())
            return refuse("compressed storage") if constant else None
        inputs, shape = list(node.inputs), None
        if node.op == "Reshape" and len(inputs) == 2 and not isinstance(inputs[1], gs.Constant):
            shape = self._reshape_shape(node, self._partial)
            if shape is not None:
                inputs[1] = gs.Constant(inputs[1].name, shape)  # as the rewrite will make it
        plan = _Plan(shape)
        consumed = sum(self._share(t, node) for t in
                       {id(t): t for t in node.inputs if isinstance(t, gs.Constant)}.values())
        real = [t for t in inputs if not t.is_empty()]
        if real and all(isinstance(t, gs.Constant) for t in real):
            # sized before it is computed: a ConstantOfShape of a 400 MB weight is refused
            # without materializing it
            expected = self._inferred_bytes(node, scope.types)
            refusal = None if expected is None else self._size_refusal(expected, consumed)
            if refusal is not None:
                return _Plan(shape, refusal=refusal)
            try:
                values = evaluate_node(node, scope.graph, [
                    None if t.is_empty() else np.asarray(peek(t)) for t in inputs])
            except Exception:  # noqa: BLE001 -- onnxruntime rejects the node: left to the runtime
                return _Plan(shape, refusal=refuse("onnxruntime cannot evaluate it"))
        else:
            known = self._partial.propagate(node, scope.graph, inputs)
            if known is None or not all(p.complete for p in known):
                return plan if shape is not None else None
            values = [p.values for p in known]
        if not all(isinstance(v, np.ndarray) for v in values):
            return plan if shape is not None else None  # a sequence or optional value
        if any(v.dtype.kind in "OSU" or v.dtype.name in _PACKED_NAMES for v in values):
            # onnx-graphsurgeon writes an array's bytes as they are in memory: strings and
            # 4-bit types (one byte per element in numpy) would be written wrongly
            return _Plan(shape, refusal=refuse("string or 4-bit values"))
        live = [t for t in node.outputs if not t.is_empty()]
        if any(scope.is_output(t) for t in live) and len(live) != 1:
            return plan if shape is not None else None
        produced = sum(v.nbytes for v in values)
        refusal = self._size_refusal(produced, consumed)
        if refusal is not None:
            return _Plan(shape, refusal=refusal)
        return _Plan(shape, values, growth=produced - consumed)

    def _share(self, t: gs.Constant, node: gs.Node) -> int:
        """Bytes of initializer ``t`` that disappear with ``node``: all of them when ``node``
        alone reads it; an equal share when every reader is itself a fold of constants (they
        go together: the Slices cutting an LSTM's [512, 128] weight into gates each add 64 KiB
        but free the weight between them); else none."""
        readers = list({id(n): n for n in t.outputs}.values())
        if all(n is node for n in readers):
            return nbytes(t)
        if all(self._foldable(n) and all(isinstance(i, gs.Constant) for i in n.inputs
                                         if not i.is_empty()) for n in readers):
            return nbytes(t) // len(readers)
        return 0

    def _size_refusal(self, produced: int, consumed: int) -> Refusal | None:
        """Why a fold producing ``produced`` bytes in place of ``consumed`` bytes of
        initializers is refused for its size (module docstring), or None; a refusal for the
        model's size class is counted."""
        size_limit = (DEFAULT_SIZE_LIMIT if self.options.size_limit is None
                      else self.options.size_limit)
        if produced >= size_limit and produced > consumed:
            return refuse("over the size limit")
        if produced - consumed > self.options.growth_limit:
            return refuse("would grow the initializers")
        if self._room is not None and produced - consumed > max(self._room, 0):
            self._refused[0] += 1
            self._refused[1] += produced - consumed
            return refuse(_SIZE_CLASS)
        return None

    @staticmethod
    def _inferred_bytes(node: gs.Node, types: TensorTypes) -> int | None:
        """Bytes of the outputs of ``node`` by their inferred static shapes and dtypes, None
        when one is not known."""
        total = 0
        for t in node.outputs:
            shape, dtype = types.static_shape(t), types.dtype(t)
            if shape is None or dtype is None:
                return None
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return total

    def rewrite(self, node: gs.Node, plan: _Plan, scope: Scope) -> str | Refusal:
        if plan.values is None and plan.shape is None:
            return plan.refusal
        if plan.shape is not None:
            node.inputs[1] = gs.Constant(scope.fresh(node.inputs[1].name), plan.shape)
        if plan.values is None:
            return "reshape target made constant"
        if self._room is not None:
            self._room -= plan.growth
        live = [t for t in node.outputs if not t.is_empty()]
        if any(scope.is_output(t) for t in live):
            self._partial.set(live[0], np.asarray(plan.values[0]))
            node.op, node.domain = "Constant", None
            node.attrs = {"value": gs.Constant(live[0].name + "__value", plan.values[0])}
            node.inputs.clear()
        else:
            for t, v in zip(live, plan.values):
                t.to_constant(np.asarray(v))
                t.inputs.clear()
            node.inputs.clear()
            node.outputs.clear()
        return "folded"

    @staticmethod
    def _foldable(node: gs.Node) -> bool:
        if not is_default_domain(node) or node.op in _NEVER_FOLD or node.op == "Constant":
            return False
        return not any(True for _ in node.subgraphs()) and bool(node.outputs)

    @staticmethod
    def _reshape_shape(node: gs.Node, partial: _PartialValues) -> np.ndarray | None:
        """A constant shape for ``Reshape(data, shape)`` equivalent to the computed ``shape``, or
        None. Unknown element j that is dim j of ``data`` itself becomes 0 ("copy the input's
        dim", allowzero=0 only); one remaining unknown element becomes -1 when every other
        element is a known positive number, since -1 is then inferred as
        ``size(data) / prod(others)``, which is the element's value."""
        shape = partial.get(node.inputs[1])
        if shape is None or shape.values.ndim != 1 or shape.values.dtype != np.int64:
            return None
        values, known = shape.values.copy(), shape.known.copy()
        if not node.attrs.get("allowzero", 0):
            origin = shape.origins()
            for j in np.flatnonzero(~known):
                if origin[j] == partial.dim_symbol(node.inputs[0], int(j)):
                    values[j], known[j] = 0, True
        unknown = np.flatnonzero(~known)
        if len(unknown) == 1:
            others = np.arange(len(values)) != unknown[0]
            if not (shape.known[others].all() and (shape.values[others] > 0).all()):
                return None
            values[unknown[0]] = -1
        elif len(unknown) > 1:
            return None
        return values


def _tensor_bytes(graph: gs.Graph) -> int:
    """Bytes of the constant tensors of ``graph`` and its subgraphs, each counted once."""
    constants = {id(t): t for g in iter_graphs(graph) for t in g.tensors().values()
                 if isinstance(t, gs.Constant)}
    return sum(nbytes(t) for t in constants.values())
