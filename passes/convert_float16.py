"""Float16 storage and compute: float32 regions of the model become float16, float32 kept at
the graph's inputs and outputs and wherever measurement says float16 overflows or loses too much.

IEEE 754 binary16 (``float16``) has a 10-bit mantissa (relative rounding error ``2^-11 ≈ 4.9e-4``)
and an exponent range whose largest finite value is 65504 and smallest normal ``2^-14 ≈ 6.1e-5``;
smaller magnitudes are subnormal (precision falls off) and below ``2^-24 ≈ 6e-8`` they flush to 0.
Converting a node means every float32 input and output that its ONNX type constraint allows in
float16 (``onnx.defs`` schema at the model's opset) becomes float16, and its float32 initializers
are stored as ``float16(w)`` (a Cast converts by its ``to``, a ConstantOfShape by its fill
value) -- half the bytes, ``|w - float16(w)| <= 2^-11 |w|`` in the normal range.

Which nodes, decided per node and then by the drift budget:

1. *Type constraints*: a node converts only when every float32 type parameter it binds admits
   ``tensor(float16)`` at the model's opset; inputs of fixed type ``tensor(float)`` (Resize
   ``scales``) and parameters bound only to shape-like inputs (``onnxopt.ops`` facts: Resize
   ``roi``) stay float32.
2. *Blocklist* (:data:`BLOCKLIST`): ops known to be unsafe in float16 whatever the data
   (recurrent state and long accumulations: RNN/GRU/LSTM, CumSum, STFT/DFT; box and index ops
   whose results hinge on exact comparisons: NonMaxSuppression, TopK, RoiAlign; Range; random
   generators), plus ops of other domains, the If/Loop/Scan nodes themselves, and the nodes of
   Loop and Scan bodies (calibration does not reach them: a body runs once per iteration).
   Nodes of If branches (nested Ifs too) are planned like the main graph's: a branch reads an
   outer-scope float16 twin directly, or its own Cast of an outer float32 value, and writes its
   outputs float32 through a Cast (the If's output types stay); a branch no calibration feed
   takes has no measured range and stays float32, and so does one none of the drift budget's
   feeds takes (the budget leaves such groups unchanged: ``Proposal.unexercised``). silero-vad
   (its network in the branches of an If on the sample rate, calibrated at 16 kHz): 2.22 MiB ->
   1.78 MiB, the 8 kHz branch float32. ONNX inference gives no dtype to what a contrib op
   (com.microsoft FusedMatMul, BiasGelu...) writes; a tensor of unknown dtype that shares a type
   parameter with a float32 one is float32 (one parameter binds one dtype), so it enters a
   region through a Cast.
3. *Range* (measured): the float32 activations each candidate reads or writes are collected over
   the calibration feeds (``onnxopt.analyses.activations.collect``); a node whose inputs or
   outputs reach ``FLOAT16_MAX / headroom`` (``headroom`` an option, default 2: calibration does
   not see every input) stays float32 -- e.g. the ``Pow`` of a LayerNorm on large activations, an
   attention mask of ``-3.4e38``, the ``Exp`` of unnormalized logits; initializers with
   magnitudes beyond ``FLOAT16_MAX`` likewise. Non-finite values (masks of ``-inf``) are not
   ranges and are preserved by float16.
4. *Drift budget*: every remaining node is a group of proposals (``group`` = the node's name):
   a simulated proposal per float32 output, computing ``Cast(float32)(Cast(float16)(y))`` in its
   place, a simulated proposal per float32 input that comes from outside the candidates (the
   same rounding, for that node only), and a weight proposal per float32 initializer whose value
   is ``float32(float16(w))``. The budget keeps the harmful groups float32 (loss of precision in
   the subnormal range, e.g. variances below 6e-5, shows up here).
5. *Cost*: a connected region of candidates that reads no initializer stays float32 (its Casts
   would cost time and nothing would shrink), and a node that writes no float (Shape, a
   comparison) converts only when all its float inputs are float16 already.

The Cast explosion is avoided by construction. Accepted nodes are converted one at a time and
share one table ``float32 tensor -> its float16 twin``: a tensor written by a converted node has
its float16 output as twin (readers that convert later read it directly: no
``Cast(float32) -> Cast(float16)`` chain), any other tensor gets one ``Cast(to=FLOAT16)`` shared by
all converted readers, and a converted node's output keeps its name and float32 type for
unconverted readers and graph outputs through one ``Cast(to=FLOAT)``. Casts nobody reads are then
removed, and a boundary Cast reading a Cast reads that Cast's input instead (``Cast(int64 ->
float16) -> Cast(float32)`` becomes ``Cast(int64 -> float32)``, what the original computed), so
Casts remain exactly on the boundaries of maximal connected float16 regions.
Initializers become float16 copies (no Cast on weights), renamed back to their own name once no
float32 reader is left; a ``Cast`` node that itself produces float32 converts by its ``to``.

Speed: onnxruntime's CPU provider implements few ops in float16 (:data:`ORT_CPU_FLOAT16_OPS`,
onnxruntime 1.32: no MatMul, Conv, Add, Mul...); it runs the others in float32 between Casts it
inserts, and cancels the Cast pairs that meet (float16 values reach memory only around ops with a
float16 kernel), so on CPU this mode halves storage at about the float32 latency (measured
0.8-1.1x on MiniLM, PP-OCRv4 rec, NudeNet, silero-vad) and is more accurate there than on
float16 hardware; the budget's simulation (explicit Cast pairs) measures the float16 rounding of
every converted tensor, the stricter case. ``ort_cpu_inserted_casts`` in the statistics counts
the converted nodes of that kind.

The peer: onnxconverter-common's ``float16.convert_float_to_float16`` converts every node outside
a fixed op blocklist without measuring, inserts a Cast pair per blocked node (Cast chains), clamps
small values to 1e-7, and keeps the model's stale value_info (its outputs fail to load in
onnxruntime on models where an op's output type is fixed).

Statistics: ``nodes_converted``, ``regions`` (connected float16 regions), ``casts_added``,
``ort_cpu_inserted_casts`` (``{op: count}``), ``refused`` (``{reason: count}``, the budget's
``kept float: drift budget`` included), ``kept_float32`` (names of nodes kept by the budget),
``bytes_before`` / ``bytes_after`` of the converted initializers (``bytes_after`` includes the
float32 originals still read by float32 nodes: ``initializers_stored_twice``),
``proposed``/``accepted``.

Errors: none of its own.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import SparseValues

from onnxopt.analyses import TensorTypes
from onnxopt.analyses.activations import collect
from onnxopt.budget import UNEXERCISED, Proposal
from onnxopt.edit import input_slots, nbytes
from onnxopt.graph import (branch_labels, branch_scopes, export_graph, iter_graphs,
                           opset_version)
from onnxopt.names import fresh_name
from onnxopt.ops import facts, is_default_domain, onnxruntime_crashes_on_transpose
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._quant import QuantizeOptions, excluded

#: Largest finite float16.
FLOAT16_MAX = float(np.finfo(np.float16).max)
_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)

#: Ops left float32 whatever the data, with the reason.
BLOCKLIST: dict[str, str] = {
    **{op: "recurrent state accumulates float16 error" for op in ("RNN", "GRU", "LSTM")},
    "CumSum": "long accumulation", "STFT": "long accumulation", "DFT": "long accumulation",
    "NonMaxSuppression": "box comparisons", "RoiAlign": "box coordinates",
    "TopK": "index ties", "Range": "loop counts from float values",
    **{op: "random generator" for op in ("RandomNormal", "RandomNormalLike", "RandomUniform",
                                         "RandomUniformLike", "Multinomial", "Bernoulli")},
    "EyeLike": "output dtype set by attribute",
}

#: Default-domain ops with a float16 kernel in onnxruntime's CPU provider (onnxruntime 1.32,
#: ``onnxruntime.capi._pybind_state.get_all_opkernel_def()``); other converted ops run there
#: between Casts onnxruntime inserts.
ORT_CPU_FLOAT16_OPS = frozenset({
    "Cast", "Celu", "Clip", "Compress", "Concat", "ConstantOfShape", "Dropout", "Expand",
    "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "IsInf", "IsNaN",
    "LayerNormalization", "Max", "Min", "Mod", "Reshape", "ReverseSequence", "Round", "Scatter",
    "ScatterElements", "ScatterND", "Shape", "Shrink", "Sign", "Slice", "Split", "Squeeze",
    "Transpose", "Unsqueeze", "RMSNormalization",
})


@dataclass(frozen=True)
class ConvertFloat16Options(QuantizeOptions):
    """Options of :class:`ConvertFloat16` (and ``exclude`` / ``ops``, see
    :class:`~onnxopt.passes._quant.QuantizeOptions`).

    Attributes:
        headroom: a node stays float32 when a calibration value it reads or writes reaches
            ``FLOAT16_MAX / headroom`` (unitless, >= 1; default 2: values unseen in calibration
            may be larger).
    """

    headroom: float = 2.0

    def check(self) -> str | None:
        if not self.headroom >= 1.0:
            return f"option headroom must be at least 1, got {self.headroom}"
        return super().check()


@dataclass
class _Plan:
    """What converting a node changes: the input and output slots that become float16."""

    node: gs.Node
    inputs: list[int]
    outputs: list[int]
    #: the drift budget's group of the node's proposals (its name)
    group: str = ""


def _is_f32(t: gs.Tensor, types: TensorTypes, derived: set[int] = frozenset()) -> bool:
    if t.is_empty():
        return False
    if id(t) in derived:
        return True
    if isinstance(t, gs.Constant):
        return np.dtype(t.dtype) == _F32 and not isinstance(t.values, SparseValues)
    dtype = _dtype(t, types)
    return dtype is not None and np.dtype(dtype) == _F32


def _dtype(t: gs.Tensor, types: TensorTypes):
    if isinstance(t, gs.Constant):
        return t.dtype
    return types.dtype(t) or t.dtype  # inferred first: an export's value_info may be stale


def _formal(params, index: int):
    """The schema's formal parameter of actual position ``index`` (the last one is variadic)."""
    if index < len(params):
        return params[index]
    last = params[-1] if params else None
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return last if last is not None and last.option == variadic else None


def plan(node: gs.Node, opset: int, types: TensorTypes, derived: set[int]) -> _Plan | str:
    """The slots of ``node`` that become float16, or why it stays float32 (from the ONNX schema
    at ``opset`` and the tensors' dtypes).

    A tensor of unknown dtype (ONNX inference stops at contrib ops such as com.microsoft's
    FusedMatMul) bound to the same type parameter as a float32 tensor is float32 -- one parameter
    binds one dtype; such outputs are added to ``derived`` (tensor ids), which later calls read,
    so a float32 chain after a contrib op is still known (nodes in topological order)."""
    if node.op in BLOCKLIST:
        return BLOCKLIST[node.op]
    if node.op in ("ScatterElements", "ScatterND") and \
            node.attrs.get("reduction", "none") != "none":
        # onnxruntime 1.32 CPU: "MLFloat16 ... not supported with ScatterElements ... reduction"
        return "onnxruntime's CPU kernel has no float16 reduction"
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return "has subgraphs"
    if node.op == "Constant":
        return "Constant node (a graph output)"
    if "dtype" in node.attrs:
        return "output dtype set by attribute"
    try:
        schema = onnx.defs.get_schema(node.op, opset, "")
    except onnx.defs.SchemaError:
        return "no ONNX schema"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    shape_slots = facts(node).shapes
    bound: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    unknown: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for kind, tensors, params in (("in", node.inputs, schema.inputs),
                                  ("out", node.outputs, schema.outputs)):
        for i, t in enumerate(tensors):
            formal = _formal(params, i)
            if formal is None:
                return "more inputs than its schema"
            if _is_f32(t, types, derived):
                bound[formal.type_str].append((kind, i))
            elif _dtype(t, types) is None and not t.is_empty():
                unknown[formal.type_str].append((kind, i))
    for param, slots in unknown.items():
        if param in bound:
            bound[param] += slots
            derived.update(id(node.outputs[i]) for kind, i in slots if kind == "out")
    plan_ = _Plan(node, [], [])
    for param, slots in bound.items():
        if param not in allowed:  # a fixed type such as tensor(float): stays
            continue
        if all(kind == "in" and i in shape_slots for kind, i in slots):
            continue
        if "tensor(float16)" not in allowed[param]:
            return f"type {param} of {node.op}-{schema.since_version} excludes float16"
        for kind, i in slots:
            (plan_.inputs if kind == "in" else plan_.outputs).append(i)
    if node.op == "Cast":  # converts by its ``to`` (float32 -> float16), other targets stay
        plan_.outputs = [0] if node.attrs.get("to") == onnx.TensorProto.FLOAT else []
    elif node.op != "ConstantOfShape" and "value" in node.attrs and plan_.outputs:
        return "output dtype set by attribute"
    if not plan_.inputs and not plan_.outputs:
        return "no float32 data"
    return plan_


@register
class ConvertFloat16(Pass):
    name = "convert_float16"
    description = ("Float16 weights and compute in maximal regions, float32 kept at the graph's "
                   "inputs/outputs and where calibration or the drift budget says so.")
    Options = ConvertFloat16Options
    lossless = False
    quantizes = True
    min_opset = 1

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opset = opset_version(graph)
        types = ctx.analyses.get(TensorTypes)
        refused: collections.Counter[str] = collections.Counter()
        plans: dict[int, _Plan] = {}
        derived: set[int] = set()
        self._graph = graph
        self._scope: dict[int, gs.Graph] = {}  # id(node) -> the graph holding it
        self._untaken: dict[int, gs.Graph] = {}  # If branches left float32 for want of feeds
        self._parent: dict[int, gs.Graph | None] = {}  # id(graph) -> the graph holding its If
        for scope, parent, in_branches in branch_scopes(graph):
            self._parent[id(scope)] = parent
            if not in_branches:
                refused["in a Loop or Scan body (stays float32)"] += len(scope.nodes)
                continue
            for node in scope.nodes:
                self._scope[id(node)] = scope
                reason = (excluded(node, self.options)
                          or (None if is_default_domain(node) else "not a default-domain op")
                          or (onnxruntime_crashes_on_transpose(node.attrs.get("perm"), True,
                                                               node.outputs[0].outputs)
                              if node.op == "Transpose" else None))
                result = plan(node, opset, types, derived) if reason is None else reason
                if isinstance(result, str):
                    if result != "no float32 data":
                        refused[result] += 1
                else:
                    plans[id(node)] = result
        for reason in self._overflows(graph, ctx, plans):
            refused[reason] += 1
        scopes: dict[int, list[_Plan]] = collections.defaultdict(list)
        for key, p in plans.items():
            scopes[id(self._scope[key])].append(p)
        # regions within one graph: a branch's nodes joined to the main graph's region through
        # the outer values they read would add the Casts of the branch's outputs for nothing
        for region in [r for ps in scopes.values() for r in _components(ps)]:
            if not any(isinstance(t, gs.Constant) for p in region for t in _slot_tensors(p)):
                refused["region without weights (its Casts would cost, nothing shrinks)"] += \
                    len(region)
                for p in region:
                    del plans[id(p.node)]
        named = collections.Counter(n.name for g in iter_graphs(graph) for n in g.nodes
                                    if n.name)
        self._ambiguous = {name for name, k in named.items() if k > 1}
        self._plans = plans
        # (id(graph), id(float32 tensor)) -> its float16 twin, visible in that graph and the
        # graphs nested in it; initializers' twins under graph id 0 (visible everywhere)
        self._twin: dict[tuple[int, int], gs.Tensor] = {}
        self._twin_graphs: dict[int, list[int]] = collections.defaultdict(list)
        self._cast_graphs: dict[int, gs.Graph] = {}
        self._casts: list[gs.Node] = []
        self._copies: dict[int, tuple[gs.Constant, gs.Constant]] = {}
        self._converted: dict[int, gs.Node] = {}
        self._sinks: list[gs.Node] = []
        self._sinks_done: list[gs.Node] = []
        proposals = []
        for p in plans.values():
            proposals += self._proposals(p)
        stats = {"refused": dict(sorted(refused.items()))} if refused else {}
        return PassResult(False, stats, proposals=proposals)

    def _overflows(self, graph: gs.Graph, ctx: PassContext, plans: dict[int, _Plan]) -> list[str]:
        """Remove from ``plans`` the nodes whose float32 values reach ``FLOAT16_MAX / headroom``
        (initializers, and activations over the calibration feeds); return a reason per node."""
        limit = FLOAT16_MAX / self.options.headroom
        watched: dict[str, None] = {}
        reasons = []
        for key, p in list(plans.items()):
            for t in _slot_tensors(p):
                if isinstance(t, gs.Constant):
                    finite = t.values[np.isfinite(t.values)]
                    if finite.size and float(np.abs(finite).max()) >= limit:
                        del plans[key]
                        reasons.append("weight beyond float16's range")
                        break
                else:
                    watched[t.name] = None
        feeds = ctx.calibration if ctx.calibration is not None else ctx.feeds
        if feeds is None or (isinstance(feeds, list) and not feeds) or not watched:
            return reasons
        stats = collect(export_graph(graph, ctx.template), dict.fromkeys(watched), feeds,
                        histograms=False)
        for key, p in list(plans.items()):
            for t in _slot_tensors(p):
                s = stats.tensors.get(t.name) if isinstance(t, gs.Variable) else None
                if s is not None and s.count and max(-s.minimum, s.maximum) >= limit:
                    del plans[key]
                    reasons.append("calibration values beyond float16's range")
                    break
        for key, p in list(plans.items()):  # an If branch no feed takes: its range is unknown
            if self._scope[key] is not graph and p.outputs and \
                    stats[p.node.outputs[p.outputs[0]].name].count == 0:
                del plans[key]
                self._untaken[id(self._scope[key])] = self._scope[key]
                reasons.append("no calibration value (no feed takes its If branch)")
        return reasons

    def _proposals(self, p: _Plan) -> list[Proposal]:
        node = p.node
        # node names may repeat across If branches: such a node's group names its output too
        p.group = (f"{node.name} ({node.outputs[0].name})" if node.name in self._ambiguous
                   else node.name or fresh_name(self._graph, node.op))
        group, apply = p.group, lambda: self._convert(node)
        scope = self._scope[id(node)]
        scope = None if scope is self._graph else scope
        out = []
        for i in p.inputs:
            t = node.inputs[i]
            if isinstance(t, gs.Constant):
                value = t.values.astype(_F16).astype(_F32)
                out.append(Proposal(tensor=t, value=value, apply=apply, group=group))
            elif not (t.inputs and id(t.inputs[0]) in self._plans):
                out.append(Proposal(tensor=t, value=None, apply=apply, group=group,
                                    simulate=round_trip, readers=[(node, i)], scope=scope))
        for i in p.outputs:
            out.append(Proposal(tensor=node.outputs[i], value=None, apply=apply, group=group,
                                simulate=round_trip, scope=scope))
        if not out:  # e.g. a Shape of a converted tensor: its own rounded input, to be decided
            i = p.inputs[0]
            out.append(Proposal(tensor=node.inputs[i], value=None, apply=apply, group=group,
                                simulate=round_trip, readers=[(node, i)], scope=scope))
        return out

    # -- the rewrite, one accepted node at a time -------------------------------------------

    def _convert(self, node: gs.Node) -> None:
        if id(node) in self._converted:
            return
        p = self._plans[id(node)]
        if not p.outputs:  # a sink (Shape, a comparison): converts only inside a region
            self._sinks.append(node)
            return
        self._converted[id(node)] = node
        scope = self._scope[id(node)]
        for i in p.inputs:
            node.inputs[i] = self._half(node.inputs[i], scope)
        for i in p.outputs:
            y = node.outputs[i]
            y16 = gs.Variable(fresh_name(self._graph, f"{y.name}_fp16"), _F16, y.shape)
            node.outputs[i] = y16
            self._cast(y16, y, onnx.TensorProto.FLOAT, scope)
            # converted readers read a Cast(float16) of y (in this graph or one nested in it,
            # where y16 is visible too): they read y16
            for where in self._twin_graphs.pop(id(y), []):
                earlier = self._twin.pop((where, id(y)))
                cast = earlier.inputs[0]
                for reader, j in input_slots(earlier):
                    reader.inputs[j] = y16
                cast.inputs.clear()
                cast.outputs.clear()
            self._set_twin(scope, y, y16)
        if node.op == "Cast" and p.outputs:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        elif node.op == "ConstantOfShape":  # the fill value (default 0.0) sets the dtype
            value = node.attrs.get("value")
            fill = np.asarray(value.values if value is not None else [0.0]).astype(_F16)
            node.attrs["value"] = gs.Constant(fresh_name(self._graph, f"{node.name}_value"),
                                              fill)

    def _visible_twin(self, t: gs.Tensor, scope: gs.Graph) -> gs.Tensor | None:
        """The float16 twin of ``t`` that nodes of ``scope`` can read (made in ``scope`` or a
        graph enclosing it), or None."""
        if isinstance(t, gs.Constant):
            return self._twin.get((0, id(t)))
        g = scope
        while g is not None:
            twin = self._twin.get((id(g), id(t)))
            if twin is not None:
                return twin
            g = self._parent.get(id(g))
        return None

    def _set_twin(self, scope: gs.Graph, t: gs.Tensor, twin: gs.Tensor) -> None:
        self._twin[(id(scope), id(t))] = twin
        self._twin_graphs[id(t)].append(id(scope))

    def _half(self, t: gs.Tensor, scope: gs.Graph) -> gs.Tensor:
        """The float16 twin of float32 ``t`` for a reader in ``scope`` (created on first
        request: an initializer's copy, or a Cast in ``scope``)."""
        twin = self._visible_twin(t, scope)
        if twin is None:
            if isinstance(t, gs.Constant):
                twin = gs.Constant(fresh_name(self._graph, f"{t.name}_fp16"),
                                   np.asarray(t.values).astype(_F16))
                self._copies[id(t)] = (t, twin)
                self._twin[(0, id(t))] = twin
            else:
                twin = gs.Variable(fresh_name(self._graph, f"{t.name}_fp16"), _F16, t.shape)
                self._cast(t, twin, onnx.TensorProto.FLOAT16, scope)
                self._set_twin(scope, t, twin)
        return twin

    def _cast(self, x: gs.Tensor, y: gs.Variable, to: int, scope: gs.Graph) -> None:
        cast = gs.Node("Cast", name=fresh_name(self._graph, f"{y.name}_Cast"),
                       attrs={"to": to}, inputs=[x], outputs=[y])
        scope.nodes.append(cast)
        self._casts.append(cast)
        self._cast_graphs[id(scope)] = scope

    def _finish(self) -> None:
        """Convert the deferred sinks whose float inputs are all float16 already, merge Cast
        chains, drop the Casts nobody reads, and give each float16 initializer its original's
        name once no float32 reader is left."""
        for node in self._sinks:
            p, scope = self._plans[id(node)], self._scope[id(node)]
            if all(self._inside(node.inputs[i], scope) for i in p.inputs):
                self._sinks_done.append(node)
                for i in p.inputs:
                    node.inputs[i] = self._visible_twin(node.inputs[i], scope)
        outputs = {id(t) for g in iter_graphs(self._graph) for t in g.outputs}
        casts = self._casts + [n for n in self._converted.values() if n.op == "Cast"]
        for c in self._casts:
            source = c.inputs[0].inputs[0] if c.inputs[0].inputs else None
            if source is not None and source.op == "Cast" and source.inputs:
                # Cast(a -> b) -> Cast(b -> c) becomes Cast(a -> c): what the original computed
                c.inputs[0] = source.inputs[0]
        dead = True
        while dead:
            dead = [c for c in casts if c.outputs and not c.outputs[0].outputs
                    and id(c.outputs[0]) not in outputs]
            for c in dead:
                c.inputs.clear()
                c.outputs.clear()
        for g in self._cast_graphs.values():
            g.nodes = [n for n in g.nodes if n.outputs or n.op != "Cast"]
        self._casts = [c for c in self._casts if c.outputs]
        for original, twin in self._copies.values():
            if not original.outputs and id(original) not in outputs:
                name = original.name
                original.name = fresh_name(self._graph, f"{name}_float32")
                twin.name = name

    def _inside(self, t: gs.Tensor, scope: gs.Graph) -> bool:
        """Whether float32 ``t`` has a float16 twin visible in ``scope`` written by a converted
        node or stored."""
        twin = self._visible_twin(t, scope)
        return twin is not None and (isinstance(twin, gs.Constant) or not twin.inputs
                                     or id(twin.inputs[0]) in self._converted)

    def finish(self, graph: gs.Graph) -> None:
        self._finish()

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        converted = list(self._converted.values()) + self._sinks_done
        refused = collections.Counter(result.stats.get("refused", {}))
        sinks = {id(n) for n in self._sinks}
        kept = [p for p in self._plans.values()
                if id(p.node) not in self._converted and id(p.node) not in sinks]
        unexercised = {q.key for q in result.proposals if q.unexercised}
        untaken = dict(self._untaken)
        for p in kept:  # in an If branch no budget feed takes, or the budget's choice
            if p.group in unexercised:
                refused[UNEXERCISED] += 1
                untaken[id(self._scope[id(p.node)])] = self._scope[id(p.node)]
            else:
                refused["kept float: drift budget"] += 1
        kept = [p.group for p in kept]
        outside = len(self._sinks) - len(self._sinks_done)
        if outside:
            refused["reads float32 only, writes no float (a Cast for nothing)"] += outside
        copies = list(self._copies.values())
        both = [o for o, _ in copies if o.outputs]  # also read by float32 nodes: stored twice
        return {
            "nodes_converted": len(converted),
            "regions": len(_components([self._plans[id(n)] for n in converted])),
            "casts_added": len(self._casts),
            "ort_cpu_inserted_casts": dict(sorted(collections.Counter(
                n.op for n in converted if n.op not in ORT_CPU_FLOAT16_OPS).items())),
            "proposed": len(result.proposals), "accepted": len(accepted),
            "refused": dict(sorted(refused.items())),
            "kept_float32": kept,
            "bytes_before": sum(nbytes(o) for o, _ in copies),
            "bytes_after": sum(nbytes(t) for _, t in copies) + sum(nbytes(o) for o in both),
            "initializers_stored_twice": len(both),
            **({"branches_not_taken": branch_labels(self._graph, untaken.values())}
               if untaken else {}),
        }


def round_trip(graph: gs.Graph, x: gs.Variable) -> gs.Variable:
    """Append ``Cast(float32)(Cast(float16)(x))`` to ``graph`` and return its output: what a
    float32 reader of a float16 value sees (the simulation of a converted tensor)."""
    half = gs.Variable(fresh_name(graph, f"{x.name}_sim_fp16"), _F16, x.shape)
    back = gs.Variable(fresh_name(graph, f"{x.name}_sim_fp32"), _F32, x.shape)
    graph.nodes.append(gs.Node("Cast", name=fresh_name(graph, f"{x.name}_sim_Cast"),
                               attrs={"to": onnx.TensorProto.FLOAT16}, inputs=[x],
                               outputs=[half]))
    graph.nodes.append(gs.Node("Cast", name=fresh_name(graph, f"{x.name}_sim_Cast"),
                               attrs={"to": onnx.TensorProto.FLOAT}, inputs=[half],
                               outputs=[back]))
    return back


def _slot_tensors(p: _Plan) -> list[gs.Tensor]:
    return [p.node.inputs[i] for i in p.inputs] + [p.node.outputs[i] for i in p.outputs]


def _components(plans: list[_Plan]) -> list[list[_Plan]]:
    """Connected components of the planned nodes, linked by the tensors one writes and another
    reads."""
    parent = {id(p.node): id(p.node) for p in plans}

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for p in plans:
        for t in p.node.outputs:
            for reader in t.outputs:
                if id(reader) in parent:
                    parent[find(id(reader))] = find(id(p.node))
    groups: dict[int, list[_Plan]] = collections.defaultdict(list)
    for p in plans:
        groups[find(id(p.node))].append(p)
    return list(groups.values())
