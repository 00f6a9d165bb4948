"""Layerwise drift localization: which intermediate tensor is the first to go wrong, and which
nodes add the most error.

Both models get their main-graph intermediate tensors as extra graph outputs and run on the same
feeds (onnxruntime CPU, graph optimizations off, through :func:`onnxopt.validate.compare_models`,
so every tensor is judged exactly like an output). A candidate tensor is *matched* with the
reference tensor of the same name: the passes keep a tensor's name whenever the rewrite keeps its
value (a fused Conv+BatchNormalization takes over the BatchNormalization's output name), so a
rewrite that renames or fuses a value leaves it *unmatched*, and it is listed as such, never
guessed. Tensors inside If branches (nested Ifs too) are compared as well: each is threaded out
as a new output of its If (``onnxopt.analyses.activations.expose_branch_tensors``; on a feed
taking the other branch both models give an empty tensor, which agrees) and named
``<tensor>@branch`` among the exposed outputs. Not exposed, and listed as *skipped*: tensors
inside Loop and Scan bodies (one iteration at a time), branch tensors whose dtype ONNX shape
inference does not give, and values that are not tensors (sequences, optionals, maps), as the
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

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import helper

from onnxopt.analyses import TensorTypes
from onnxopt.errors import InputError
from onnxopt.graph import import_graph
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
    #: node outputs of If branches (reached through If branches only), with their producer
    branch: dict[str, onnx.NodeProto] = field(default_factory=dict)
    #: every exposable name in topological order: an If's branch tensors before its outputs
    order: list[str] = field(default_factory=list)
    #: the nodes of the main graph and its If branches in that order (Constant nodes left out)
    nodes: list[onnx.NodeProto] = field(default_factory=list)


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
    found = _Tensors({}, {})
    defined: dict[str, int] = {}
    _walk(model.graph, found, non_tensor, "main", defined)
    # ONNX lets sibling branches define the same name: which one a comparison would see is
    # not defined, so neither is compared
    twice = {n for n, k in defined.items() if k > 1}
    for name in twice:
        found.producers.pop(name, None)
        found.branch.pop(name, None)
        found.not_exposed[name] = "defined in more than one graph (sibling If branches)"
    found.order = [n for n in found.order if n not in twice]
    return found


def _walk(graph: onnx.GraphProto, found: _Tensors, non_tensor: dict, where: str,
          defined: dict[str, int]) -> None:
    """Record the node outputs of ``graph`` (``where``: "main", "branch" -- an If branch
    reached through If branches only -- or "body", inside a Loop or Scan body) in ``found``,
    in topological order, a node's subgraphs before its outputs."""
    for node in graph.node:
        is_if = node.op_type == "If" and node.domain in ("", "ai.onnx")
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _walk(sub, found, non_tensor, "branch" if is_if and where != "body" else "body",
                      defined)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            continue
        if where != "body":
            found.nodes.append(node)
        for name in filter(None, node.output):
            defined[name] = defined.get(name, 0) + 1
            if where == "body":
                found.not_exposed.setdefault(name, "inside a Loop or Scan body")
            elif where == "main" and name in non_tensor:
                found.not_exposed[name] = f"not a tensor ({non_tensor[name]})"
            else:
                (found.producers if where == "main" else found.branch)[name] = node
                found.order.append(name)


#: Suffix of the output a branch tensor is exposed as (tensor names are unique in a model).
BRANCH_SUFFIX = "@branch"


def _exposing(model: onnx.ModelProto, names: list[str], branch: set[str] = frozenset(),
              suffix: str = BRANCH_SUFFIX) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose graph outputs are exactly ``names`` (types left to onnxruntime),
    those of ``branch`` (If-branch tensors) as ``<name>@branch``, and the names exposed (a
    branch tensor whose dtype shape inference does not give is left out)."""
    from onnxopt.analyses.activations import expose_branch_tensors

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    threaded = expose_branch_tensors(exposed, {n for n in names if n in branch},
                                     guess_float=False)
    del exposed.graph.output[:]
    shown = [n for n in names if n not in branch or n in threaded]
    for n in shown:
        if n in threaded:
            exposed.graph.node.append(helper.make_node("Identity", [threaded[n]],
                                                       [n + suffix]))
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(
        n + suffix if n in threaded else n) for n in shown)
    return exposed, shown


def _node_ref(node: onnx.NodeProto) -> NodeRef:
    return NodeRef(node.name, node.op_type)


def _rank(candidate: onnx.ModelProto, nodes: list[onnx.NodeProto], snr: dict[str, float]
          ) -> list[NodeError]:
    """Candidate nodes (``nodes``: :attr:`_Tensors.nodes`) by the SNR they lose (see the module
    docstring), most first; nodes of If branches included (an If node itself is not ranked: its
    branches' nodes are)."""
    effective = {i.name: math.inf for i in candidate.graph.input}
    entries = []
    for node in nodes:
        worst_in = min((effective[i] for i in node.input if i in effective), default=math.inf)
        matched = [o for o in node.output if o in snr]
        for o in filter(None, node.output):
            effective[o] = snr.get(o, worst_in)
        if not matched:
            continue
        if node.op_type == "If":  # its error is its branches' nodes', ranked themselves
            continue
        tensor = min(matched, key=lambda o: snr[o])
        out = snr[tensor]
        added = 0.0 if worst_in == out else worst_in - out
        if added > 0:
            entries.append(NodeError(_node_ref(node), tensor, worst_in, out, added))
    entries.sort(key=lambda e: (-e.added_db, e.output_snr_db))
    return entries[:RANKING_SIZE]


def _names(model: onnx.ModelProto) -> set[str]:
    """Every tensor name of ``model``, in every graph."""
    from onnxopt.graph import graph_protos

    return {n for g in graph_protos(model.graph) for n in itertools.chain(
        (i.name for i in g.input), (i.name for i in g.initializer),
        (o for node in g.node for o in node.output))}


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
    matched, branch = [], set()
    for name in cand.order:
        if name in ref.producers and name in cand.producers or \
                name in ref.branch and name in cand.branch:
            matched.append(name)
            if name in cand.branch:
                branch.add(name)
        elif name in ref.not_exposed:
            result.skipped.append({"tensor": name,
                                   "reason": f"{ref.not_exposed[name]} of the reference"})
        else:
            result.unmatched["candidate"].append(name)
    result.skipped.extend({"tensor": n, "reason": why} for n, why in cand.not_exposed.items())
    ours = set(cand.producers) | set(cand.branch) | set(cand.not_exposed)
    result.unmatched["reference"] = [n for n in ref.order if n not in ours]
    used = _names(reference) | _names(candidate)
    suffix, k = BRANCH_SUFFIX, 0
    while any(n + suffix in used for n in branch):  # a name the models use already
        k += 1
        suffix = f"{BRANCH_SUFFIX}{k}"
    ref_model, shown = _exposing(reference, matched, branch, suffix)
    cand_model, cand_shown = _exposing(candidate, shown, branch, suffix)
    result.skipped.extend({"tensor": n, "reason": "inside an If branch, dtype unknown"}
                          for n in matched if n not in cand_shown)
    matched = [n for n in shown if n in cand_shown]
    if len(matched) < len(shown):
        ref_model, _ = _exposing(reference, matched, branch, suffix)
    if not matched:
        return result
    check = compare_models(ref_model, cand_model, feeds,
                           atol=atol, rtol=rtol, max_drift=max_drift, metric=metric,
                           lossy=lossy,
                           synthesized=synthesized)
    for m in check.outputs:  # the tensors' own names in the result
        if m.name.endswith(suffix) and m.name[:-len(suffix)] in branch:
            m.name = m.name[:-len(suffix)]
    if not check.outputs:  # the candidate did not load or run
        result.reason = check.reason
        return result
    result.compared = len(check.outputs)
    result.tensors = [{"tensor": m.name, "max_abs": _json_float(m.max_abs),
                       "cosine": _json_float(m.cosine), "snr_db": _json_float(m.snr_db),
                       "passed": m.passed} for m in check.outputs]
    bad = next((m for m in check.outputs if not m.passed), None)
    if bad is not None:
        result.first_divergence = Divergence(
            bad.name, _node_ref({**ref.producers, **ref.branch}[bad.name]),
            _node_ref({**cand.producers, **cand.branch}[bad.name]), bad)
    if lossy:
        result.ranking = _rank(candidate, cand.nodes, {
            m.name: m.snr_db for m in check.outputs
            if m.dtype == m.candidate_dtype and m.shape == m.candidate_shape})
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
