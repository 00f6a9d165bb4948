"""Helpers shared by the passes: reading constants, rewiring tensors, classifying weights.

Passes import this module and ``optimizer``'s core, never each other.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from optimizer.graph import iter_graphs

#: Ops whose output is not a function of their inputs: never folded, never merged by CSE.
NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})

#: (op, input index) pairs where a float initializer is a learned weight matrix or table.
WEIGHT_SLOTS = frozenset({
    ("MatMul", 1), ("MatMul", 0), ("Gemm", 0), ("Gemm", 1), ("Conv", 1), ("ConvTranspose", 1),
    ("Gather", 0),
})

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an initializer, or None for a Variable or an omitted optional input."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    return None


def nbytes(tensor: gs.Constant) -> int:
    """Size of an initializer's data in bytes (without loading lazily stored values)."""
    return int(np.prod(tensor.shape, dtype=np.int64)) * np.dtype(tensor.dtype).itemsize


def input_slots(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """Every (consumer node, input index) reading ``tensor``, in any graph or subgraph."""
    return [(node, i) for node in tensor.outputs for i, t in enumerate(node.inputs) if t is tensor]


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node reading ``old`` read ``new`` instead (subgraph nodes included)."""
    for node, i in input_slots(old):
        node.inputs[i] = new


class _Names:
    def __init__(self):
        self._counter = itertools.count()

    def fresh(self, graph: gs.Graph, base: str) -> str:
        used = _all_names(graph)
        while True:
            name = f"{base}__{next(self._counter)}"
            if name not in used:
                return name


def _all_names(graph: gs.Graph) -> set[str]:
    root = graph
    names = set()
    for g in iter_graphs(root):
        names.update(g.tensors().keys())
    return names


_names = _Names()


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor name based on ``base`` that no tensor of ``graph`` (or its subgraphs) uses."""
    return _names.fresh(graph, base)


def bypass(graph: gs.Graph, node: gs.Node, keep: gs.Tensor, drop: gs.Tensor) -> bool:
    """Remove a node whose output ``drop`` equals its input ``keep``; consumers read ``keep``.

    When ``drop`` is an output of ``graph`` its name must survive: the producer of ``keep`` is
    made to write ``drop`` instead, which is possible only if ``keep`` is a plain intermediate
    tensor of this graph (not a graph input or output, not an initializer, not from an outer
    scope). Otherwise the node stays.

    Args:
        graph: the graph (or subgraph) whose ``nodes`` list holds ``node``.

    Returns:
        True if the node was disconnected (the caller then drops it from ``graph.nodes``).
    """
    graph_outputs = [id(t) for t in graph.outputs]
    if id(drop) not in graph_outputs:
        replace_uses(drop, keep)
        node.inputs.clear()
        node.outputs.clear()
        return True
    if (not isinstance(keep, gs.Variable) or len(keep.inputs) != 1 or id(keep) in graph_outputs
            or any(t is keep for t in graph.inputs)):
        return False
    producer = keep.inputs[0]
    if not any(n is producer for n in graph.nodes):
        return False
    replace_uses(keep, drop)
    node.inputs.clear()
    node.outputs.clear()
    idx = next(i for i, t in enumerate(producer.outputs) if t is keep)
    producer.outputs[idx] = drop
    return True


def drop_disconnected(graph: gs.Graph) -> int:
    """Remove nodes with no outputs left from ``graph.nodes``; return how many were removed."""
    before = len(graph.nodes)
    graph.nodes = [n for n in graph.nodes if n.outputs]
    return before - len(graph.nodes)


def weight_initializers(graph: gs.Graph) -> list[gs.Constant]:
    """Float initializers every one of whose uses is a weight slot (see :data:`WEIGHT_SLOTS`).

    MatMul's left operand and Gemm's A count as weights only when constant, which is the case of
    a transposed-weight export. Shapes, indices, normalization statistics, scales and biases are
    never returned.
    """
    seen: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if (isinstance(t, gs.Constant) and id(t) not in seen
                        and np.dtype(t.dtype).type in _FLOAT_DTYPES):
                    seen[id(t)] = t
    out = []
    for t in seen.values():
        slots = input_slots(t)
        if slots and all(is_default_domain(n) and (n.op, i) in WEIGHT_SLOTS for n, i in slots):
            out.append(t)
    return out


def onnx_dtype(dtype) -> int:
    """The ONNX TensorProto data type of a numpy dtype."""
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


#: Initializers with more elements than this are given to shape inference as typed inputs only.
_SHAPE_INFERENCE_VALUE_LIMIT = 1024


def _shape_inference_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """The main graph as a ModelProto for shape inference: large initializers become typed inputs
    (their values never matter for shapes, and copying them dominates the cost), intermediate
    value_info and output shapes are left out."""
    inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
    initializers, seen = [], {t.name for t in graph.inputs}
    for node in graph.nodes:
        for t in node.inputs:
            if not isinstance(t, gs.Constant) or t.name in seen:
                continue
            seen.add(t.name)
            if int(np.prod(t.shape, dtype=np.int64)) > _SHAPE_INFERENCE_VALUE_LIMIT:
                inputs.append(onnx.helper.make_tensor_value_info(
                    t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), t.shape))
            else:
                initializers.append(OnnxExporter.export_tensor_proto(t))
    outputs = [onnx.helper.make_empty_tensor_value_info(t.name) for t in graph.outputs]
    nodes = [OnnxExporter.export_node(n) for n in graph.nodes]
    model = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "shapes", inputs, outputs, initializer=initializers),
        opset_imports=list(template.opset_import))
    model.ir_version = template.ir_version
    return model


def infer_tensor_types(graph: gs.Graph, template: onnx.ModelProto
                       ) -> dict[str, tuple[np.dtype | None, tuple | None]]:
    """Dtype and shape of the main graph's tensors, from ONNX shape inference (``data_prop``).

    Only graph input types, initializers and op semantics are used: intermediate value_info and
    declared graph output shapes are ignored (real exports sometimes declare them wrongly).
    Initializers are included. Shapes are tuples of ints, with None for an unknown dim; a shape is
    None when even the rank is unknown. Inference is best effort: a model it rejects yields
    only the initializers.

    Returns:
        ``{tensor name: (numpy dtype or None, shape or None)}``.
    """
    types: dict[str, tuple] = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                types[t.name] = (np.dtype(t.dtype), tuple(t.shape))
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _shape_inference_model(graph, template), data_prop=True)
    except Exception:  # an op shape inference rejects: no inferred types at all
        return types
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) \
            + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or vi.name in types:
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) \
            if tt.elem_type else None
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) \
            if tt.HasField("shape") else None
        types[vi.name] = (dtype, shape)
    return types


def static_shapes(graph: gs.Graph, template: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The fully static shapes among :func:`infer_tensor_types`' results."""
    return {name: shape for name, (_, shape) in infer_tensor_types(graph, template).items()
            if shape is not None and all(d is not None for d in shape)}


# Conv and ConvTranspose weights, for the fusions that rewrite them.

def constant_refusal(t: gs.Tensor, what: str) -> str | None:
    """Why ``t`` cannot be read as a dense initializer (``what`` names it), or None."""
    if not isinstance(t, gs.Constant):
        return f"{what} is not an initializer"
    if not isinstance(t.values, np.ndarray):
        return f"{what} is a sparse initializer"
    return None


def conv_output_channels(conv: gs.Node) -> int:
    """M, the output channels of a Conv or ConvTranspose, from its weight's shape."""
    w = conv.inputs[1]
    return w.shape[0] if conv.op == "Conv" else w.shape[1] * conv.attrs.get("group", 1)


def conv_weight_refusal(conv: gs.Node) -> str | None:
    """Why the weights of ``conv`` cannot be rewritten, or None."""
    if len(conv.inputs) < 2 or len(conv.outputs) != 1:
        return "conv has no weight input"
    w = conv.inputs[1]
    reason = constant_refusal(w, "weight")
    if reason:
        return reason
    if np.dtype(w.dtype).type not in _FLOAT_DTYPES:
        return "weight is not float"
    if w.values.ndim < 3:
        return "weight rank below 3"
    group = conv.attrs.get("group", 1)
    if conv.op == "ConvTranspose" and w.shape[0] % group:
        return "weight channels not divisible by group"
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        b = conv.inputs[2]
        reason = constant_refusal(b, "conv bias")
        if reason:
            return reason
        if np.dtype(b.dtype) != np.dtype(w.dtype):
            return "dtypes differ"
        if tuple(b.shape) != (conv_output_channels(conv),):
            return "conv bias shape is not [M]"
    return None


def scale_conv_output_channels(conv: gs.Node, s: np.ndarray) -> np.ndarray:
    """``W · s`` along the output-channel axis of ``conv``, in float64.

    Conv ``W[M, C/group, k...]``: axis 0. ConvTranspose ``W[C, M/group, k...]``: output channel
    ``o = g · (M/group) + m`` is column ``m`` of group ``g``'s rows, so ``W`` is viewed as
    ``[group, C/group, M/group, k...]`` and ``s`` as ``[group, 1, M/group, 1...]`` (ONNX spec).
    """
    w = np.asarray(conv.inputs[1].values, dtype=np.float64)
    if conv.op == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    group = conv.attrs.get("group", 1)
    grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
    return (grouped * s.reshape((group, 1, -1) + (1,) * (w.ndim - 2))).reshape(w.shape)


def conv_bias(conv: gs.Node) -> np.ndarray:
    """The bias of ``conv`` in float64, zeros when absent."""
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        return np.asarray(conv.inputs[2].values, dtype=np.float64)
    return np.zeros(conv_output_channels(conv))


def fit_drift_budget(graph: gs.Graph, ctx, replacements: dict[str, tuple[np.ndarray, np.ndarray]]
                     ) -> dict:
    """Choose which lossy weight replacements to apply so the outputs keep ``ctx.max_drift``.

    ``replacements`` maps initializer names to ``(original, replacement)`` values (a dequantized
    or pruned weight, say). The drift of a set of applied replacements is the lowest cosine
    similarity, over every output and every feed of ``ctx.feeds``, between the model with them
    applied and the model as it is. If applying all keeps the drift within budget, all are
    applied. Otherwise each replacement's sensitivity is measured alone (the drift with only it
    applied), they are ranked from most to least harmful, and a binary search finds the fewest
    most-harmful ones to leave out -- the mixed-precision fallback of accuracy-aware quantization
    tools (e.g. onnxruntime.quantization's ``nodes_to_exclude``, chosen here from measured
    sensitivity instead of by hand). Cost: one model run per feed and evaluation; at most
    ``2 + n + log2(n)`` evaluations for ``n`` replacements, usually one.

    The target is ``max_drift + 0.1 (1 - max_drift)``, a margin over the validation criterion.

    Returns:
        ``{"target", "cosine_all", "cosine_final", "evaluations", "kept": [names not replaced]}``.

    Raises:
        InputError: onnxruntime cannot run the model on the feeds.
    """
    from optimizer.graph import export_graph, graph_protos
    from optimizer.validate import make_session, output_metrics

    target = ctx.max_drift + 0.1 * (1.0 - ctx.max_drift)
    originals = {name: pair[0] for name, pair in replacements.items()}
    # The weights become graph inputs, so that one session evaluates any mix of original and
    # replaced values by feeding them.
    model = export_graph(graph, ctx.template)
    for g in graph_protos(model.graph):
        moved = [init for init in g.initializer if init.name in originals]
        for init in moved:
            g.initializer.remove(init)
            model.graph.input.append(onnx.helper.make_tensor_value_info(
                init.name, init.data_type, list(init.dims)))
    session = make_session(model, "model before a lossy pass")
    inputs = [i.name for i in session.get_inputs()]
    references = [session.run(None, {n: {**f, **originals}[n] for n in inputs})
                  for f in ctx.feeds]
    evaluations = 0

    def drift(applied: set[str]) -> float:
        nonlocal evaluations
        evaluations += 1
        weights = {n: replacements[n][1] if n in applied else v for n, v in originals.items()}
        worst = 1.0
        for feed, ref in zip(ctx.feeds, references):
            out = session.run(None, {n: {**feed, **weights}[n] for n in inputs})
            for r, c in zip(ref, out):
                worst = min(worst, output_metrics(np.asarray(r), np.asarray(c))["cosine"])
        return worst

    names = list(replacements)
    cosine_all = drift(set(names))
    kept: list[str] = []
    if cosine_all < target:
        sensitivity = {name: drift({name}) for name in names}
        ranked = sorted(names, key=lambda n: sensitivity[n])
        low, high = 0, len(ranked)  # leaving everything out trivially meets the target
        while low < high:
            mid = (low + high) // 2
            if drift(set(ranked[mid:])) >= target:
                high = mid
            else:
                low = mid + 1
        kept = ranked[:low]
    cosine_final = drift(set(names) - set(kept)) if kept else cosine_all
    return {"target": target, "cosine_all": cosine_all, "cosine_final": cosine_final,
            "evaluations": evaluations, "kept": kept}
