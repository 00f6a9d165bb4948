"""Layerwise drift localization: which intermediate tensor is the first to go wrong, and which
nodes add the most error.

Both models get their main-graph intermediate tensors as extra graph outputs and run on the same
feeds (onnxruntime CPU, graph optimizations off, through :func:`onnxopt.validate.compare_models`,
so every tensor is judged exactly like an output). A candidate tensor is *matched* with the
reference tensor of the same name: the passes keep a tensor's name whenever the rewrite keeps its
value (a fused Conv+BatchNormalization takes over the BatchNormalization's output name), so a
rewrite that renames or fuses a value leaves it *unmatched*, and it is listed as such, never
guessed. Not exposed, and listed as *skipped*: tensors inside subgraphs (If/Loop/Scan bodies)
and values that are not tensors (sequences, optionals, maps), as the
:class:`~onnxopt.analyses.TensorTypes` analysis finds them (a value whose kind it cannot tell is
tried as a tensor). Outputs of ``Constant`` nodes are parameters, like initializers, and are not
compared.

Everything else is read from the ModelProtos as given: they are what runs, with extra outputs,
and what the report names -- their node order and names, and subgraph tensors by the names the
model gives them (the imported graph renames subgraph tensors whose names clash).

Matched pairs are compared in the topological (node) order of the candidate; the first whose
drift exceeds the tolerance is the *first divergence* -- lossless: ``max_abs > atol + rtol *
range(reference tensor)``, lossy: a criterion of ``max_drift`` fails (``cosine < 0.99`` by
default, see ``onnxopt.metrics``); a dtype or shape mismatch, or NaN in
different places, diverges too. It is reported with the node producing it in each model.

For a lossy comparison (a pruned or quantized model) nodes are also ranked by the error they add:
with ``SNR(t)`` the signal-to-quantization-noise ratio in dB of matched tensor ``t`` (worst over
the feeds), a node's added error is ``min SNR(inputs) - min SNR(outputs)``. Graph inputs are exact
(``+inf`` dB); initializers and ``Constant`` outputs carry no measured error and are ignored; an
unmatched tensor inherits the worst SNR of its producer's inputs, so the error of a run of
unmatched nodes (a DequantizeLinear, a fused chain) is charged to the first matched node after it.
A node whose inputs are exact and whose output is not adds ``+inf`` dB.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxopt.analyses import TensorTypes
from onnxopt.errors import InputError
from onnxopt.graph import graph_protos, import_graph
from onnxopt.validate import (DEFAULT_ATOL, DEFAULT_MAX_DRIFT, DEFAULT_RTOL, OutputMetrics,
                                compare_models)

#: How many nodes the ranking keeps.
RANKING_SIZE = 10


def _json_float(x: float):
    """JSON has no infinities: ``"inf"``/``"-inf"`` strings, NaN as null (as in the report)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


@dataclass
class NodeRef:
    """The node producing a tensor: its name (may be empty) and op type."""

    name: str
    op: str


@dataclass
class Divergence:
    """The first matched tensor whose drift exceeds the tolerance (``metrics.reason`` says how)."""

    tensor: str
    reference_node: NodeRef
    candidate_node: NodeRef
    metrics: OutputMetrics

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metrics"] = {k: {e: _json_float(x) for e, x in v.items()} if isinstance(v, dict)
                        else _json_float(v) for k, v in d["metrics"].items() if k != "name"}
        return d


@dataclass
class NodeError:
    """Error a candidate node adds: SNR of its worst input minus SNR of its worst output (dB)."""

    node: NodeRef
    tensor: str
    input_snr_db: float
    output_snr_db: float
    added_db: float

    def to_dict(self) -> dict:
        return {k: _json_float(v) for k, v in asdict(self).items()}


@dataclass
class LayerwiseResult:
    """Tensor-by-tensor comparison of a candidate with its reference.

    ``unmatched`` lists, per model, the exposed tensors without a same-named counterpart;
    ``skipped`` the tensors not compared, each ``{tensor, reason}``; ``reason`` is non-empty when
    the comparison could not run (the candidate does not load or run with the extra outputs).
    ``tensors`` holds every compared tensor in the candidate's node order, as
    ``{tensor, max_abs, cosine, snr_db, passed}`` (the per-layer drift chart of the HTML report).
    """

    mode: str
    feeds: int
    compared: int = 0
    unmatched: dict[str, list[str]] = field(
        default_factory=lambda: {"candidate": [], "reference": []})
    skipped: list[dict[str, str]] = field(default_factory=list)
    first_divergence: Divergence | None = None
    ranking: list[NodeError] = field(default_factory=list)
    reason: str = ""
    tensors: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "feeds": self.feeds, "compared": self.compared,
                "unmatched": self.unmatched, "skipped": self.skipped,
                "first_divergence": (self.first_divergence.to_dict()
                                     if self.first_divergence else None),
                "ranking": [r.to_dict() for r in self.ranking], "reason": self.reason,
                "tensors": self.tensors}


@dataclass
class _Tensors:
    """What one model exposes: main-graph node outputs by name (with their producer, in node
    order), and the names that cannot be exposed, with why."""

    producers: dict[str, onnx.NodeProto]
    not_exposed: dict[str, str]


def _non_tensor_values(model: onnx.ModelProto) -> dict[str, str]:
    """Main-graph node outputs that :meth:`TensorTypes.kind` finds are not tensors: name -> kind
    ("sequence", "optional", "map", "sparse tensor"). A hint: a model onnxopt cannot import
    (optional or map graph inputs or outputs) yields none, and every value is tried."""
    try:
        graph = import_graph(model)  # keeps the main graph's tensor names
    except InputError:
        return {}
    types = TensorTypes(graph, model)
    kinds = {}
    for node in graph.nodes:
        for t in node.outputs:
            kind = types.kind(t)
            if kind not in ("tensor", None):
                kinds[t.name] = kind
    return kinds


def _tensors(model: onnx.ModelProto) -> _Tensors:
    non_tensor = _non_tensor_values(model)
    producers, not_exposed = {}, {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        for name in filter(None, node.output):
            if name in non_tensor:
                not_exposed[name] = f"not a tensor ({non_tensor[name]})"
            else:
                producers[name] = node
    for sub in list(graph_protos(model.graph))[1:]:
        for node in sub.node:
            for name in filter(None, node.output):
                not_exposed.setdefault(name, "inside a subgraph")
    return _Tensors(producers, not_exposed)


def _exposing(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are exactly ``names`` (types left to onnxruntime)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return exposed


def _node_ref(node: onnx.NodeProto) -> NodeRef:
    return NodeRef(node.name, node.op_type)


def _rank(candidate: onnx.ModelProto, snr: dict[str, float]) -> list[NodeError]:
    """Candidate nodes by the SNR they lose (see the module docstring), most first."""
    effective = {i.name: math.inf for i in candidate.graph.input}
    entries = []
    for node in candidate.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        worst_in = min((effective[i] for i in node.input if i in effective), default=math.inf)
        matched = [o for o in node.output if o in snr]
        for o in filter(None, node.output):
            effective[o] = snr.get(o, worst_in)
        if not matched:
            continue
        tensor = min(matched, key=lambda o: snr[o])
        out = snr[tensor]
        added = 0.0 if worst_in == out else worst_in - out
        if added > 0:
            entries.append(NodeError(_node_ref(node), tensor, worst_in, out, added))
    entries.sort(key=lambda e: (-e.added_db, e.output_snr_db))
    return entries[:RANKING_SIZE]


def compare_layerwise(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                      feeds: list[dict[str, np.ndarray]], *, atol: float = DEFAULT_ATOL,
                      rtol: float = DEFAULT_RTOL, max_drift=DEFAULT_MAX_DRIFT,
                      metric="cosine", lossy: bool = False,
                      synthesized: bool = False) -> LayerwiseResult:
    """Compare every main-graph tensor the two models share, in the candidate's node order.

    Args:
        reference, candidate: the original and the optimized model (not modified); their nodes
            are in topological order, as ONNX requires.
        feeds: input feeds, ``{input name: array}``.
        atol, rtol, max_drift, metric, lossy: the criterion, as in :func:`compare_models`;
            ``lossy`` also ranks nodes by added error.
        synthesized: the feeds were synthesized (an error then suggests real inputs).

    Raises:
        InputError: the reference cannot be loaded or run with its tensors exposed.
    """
    result = LayerwiseResult("lossy" if lossy else "lossless", len(feeds))
    ref, cand = _tensors(reference), _tensors(candidate)
    matched = []
    for name in cand.producers:
        if name in ref.producers:
            matched.append(name)
        elif name in ref.not_exposed:
            result.skipped.append({"tensor": name,
                                   "reason": f"{ref.not_exposed[name]} of the reference"})
        else:
            result.unmatched["candidate"].append(name)
    result.skipped.extend({"tensor": n, "reason": why} for n, why in cand.not_exposed.items())
    result.unmatched["reference"] = [
        n for n in ref.producers if n not in cand.producers and n not in cand.not_exposed]
    if not matched:
        return result
    check = compare_models(_exposing(reference, matched), _exposing(candidate, matched), feeds,
                           atol=atol, rtol=rtol, max_drift=max_drift, metric=metric,
                           lossy=lossy,
                           synthesized=synthesized)
    if not check.outputs:  # the candidate did not load or run
        result.reason = check.reason
        return result
    result.compared = len(check.outputs)
    result.tensors = [{"tensor": m.name, "max_abs": _json_float(m.max_abs),
                       "cosine": _json_float(m.cosine), "snr_db": _json_float(m.snr_db),
                       "passed": m.passed} for m in check.outputs]
    bad = next((m for m in check.outputs if not m.passed), None)
    if bad is not None:
        result.first_divergence = Divergence(bad.name, _node_ref(ref.producers[bad.name]),
                                             _node_ref(cand.producers[bad.name]), bad)
    if lossy:
        result.ranking = _rank(candidate, {m.name: m.snr_db for m in check.outputs
                                           if m.dtype == m.candidate_dtype
                                           and m.shape == m.candidate_shape})
    return result


def first_divergence(reference: onnx.ModelProto, candidate: onnx.ModelProto,
                     feeds: list[dict[str, np.ndarray]], **criterion) -> dict | None:
    """The first diverging tensor as a JSON-ready dict (see :meth:`Divergence.to_dict`), or None
    when no shared tensor diverges or the comparison cannot run; ``criterion`` as in
    :func:`compare_layerwise`. For reports of a failed candidate, which must not fail themselves.
    """
    try:
        found = compare_layerwise(reference, candidate, feeds, **criterion).first_divergence
    except InputError:
        return None
    return found.to_dict() if found else None
