"""Helpers shared by the passes: reading constants, rewiring tensors, classifying weights.

Passes import this module and ``optimizer``'s core, never each other.
"""

from __future__ import annotations

import itertools
import weakref

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.graph import graph_protos, iter_graphs

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


def int_list(node: gs.Node, attr: str, index: int) -> list[int] | None | str:
    """An int list given as attribute ``attr`` (older opsets) or as input ``index`` (e.g. the
    ``axes`` of Squeeze/Unsqueeze, an input from opset 13): the list, None when absent, or
    ``"unknown"`` when the input is not an initializer."""
    if attr in node.attrs:
        return [int(v) for v in node.attrs[attr]]
    if len(node.inputs) <= index or node.inputs[index].is_empty():
        return None
    value = constant_value(node.inputs[index])
    return "unknown" if value is None else [int(v) for v in np.ravel(value)]


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


def rename_clashes(root: gs.Graph, branch: gs.Graph) -> int:
    """Rename the tensors of ``branch`` (a subgraph of ``root``: its nodes' outputs and the
    initializers only it reads, nested subgraphs included) whose names another tensor of the model
    uses, before its nodes move to another scope; return how many were renamed."""
    inside = {id(n) for g in iter_graphs(branch) for n in g.nodes}
    own: dict[int, gs.Tensor] = {}
    for g in iter_graphs(branch):
        for n in g.nodes:
            for t in n.outputs:
                own[id(t)] = t
            for t in n.inputs:
                # an initializer also read outside the branch (merged by dedup) keeps its name
                if isinstance(t, gs.Constant) and all(id(r) in inside for r in t.outputs):
                    own[id(t)] = t
    taken: set[str] = set()
    for g in iter_graphs(root):
        for n in g.nodes:
            for t in list(n.inputs) + list(n.outputs):
                if id(t) not in own and not t.is_empty():
                    taken.add(t.name)
        taken.update(t.name for t in list(g.inputs) + list(g.outputs) if id(t) not in own)
    renamed = 0
    for t in own.values():
        if not t.is_empty() and t.name in taken:
            if isinstance(t, gs.Constant):
                # load lazily stored values: exporting a lazy Constant renames the TensorProto
                # it was imported from, which belongs to the caller's model
                t.values = np.asarray(t.values)
            t.name = fresh_name(root, t.name)
            renamed += 1
    return renamed


class _Names:
    """Allocates tensor names. The names of a graph are collected once, on its first request, and
    every name handed out is added: passes name new tensors only through :func:`fresh_name`
    (renames at import happen before), so the set stays complete without walking the graph again
    for each name -- which dominated the cost of fusions that create many tensors."""

    def __init__(self):
        self._counter = itertools.count()
        self._used: dict[int, tuple[weakref.ref, set[str]]] = {}

    def fresh(self, graph: gs.Graph, base: str) -> str:
        entry = self._used.get(id(graph))
        if entry is None or entry[0]() is not graph:
            entry = (weakref.ref(graph), _all_names(graph))
            self._used = {k: v for k, v in self._used.items() if v[0]() is not None}
            self._used[id(graph)] = entry
        used = entry[1]
        while True:
            name = f"{base}__{next(self._counter)}"
            if name not in used:
                used.add(name)
                return name


def _all_names(graph: gs.Graph) -> set[str]:
    names = set()
    for g in iter_graphs(graph):
        names.update(t.name for t in g.inputs)
        names.update(t.name for t in g.outputs)
        for node in g.nodes:
            names.update(t.name for t in node.inputs)
            names.update(t.name for t in node.outputs)
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


def drop_if_unused(graph: gs.Graph, node: gs.Node | None) -> bool:
    """Disconnect ``node``, a node of ``graph``, when none of its outputs is read or is an output
    of ``graph`` (the caller then drops it from ``graph.nodes``, see :func:`drop_disconnected`).

    Returns:
        True if the node was disconnected; False for None, an already disconnected node, or a node
        of another graph.
    """
    if node is None or not node.outputs or not any(n is node for n in graph.nodes):
        return False
    outputs = {id(t) for t in graph.outputs}
    if any(t.outputs or id(t) in outputs for t in node.outputs):
        return False
    node.inputs.clear()
    node.outputs.clear()
    return True


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


def _clear_shapes(type_proto: onnx.TypeProto) -> None:
    """Remove every shape from ``type_proto`` (tensor, or the elements of a sequence/optional)."""
    kind = type_proto.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        getattr(type_proto, kind).ClearField("shape")
    elif kind in ("sequence_type", "optional_type"):
        _clear_shapes(getattr(type_proto, kind).elem_type)


def _negative_dims_unknown(vi: onnx.ValueInfoProto) -> None:
    """Make a declared negative dim (``-1``, as some exporters write a dynamic dim) a fresh
    symbol: ONNX shape inference would compute with it as a number (``(-1) * (-1) = 1``) and
    produce plausible static dims that are wrong at run time."""
    if not vi.type.HasField("tensor_type"):
        return
    for i, dim in enumerate(vi.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value < 0:
            dim.Clear()
            dim.dim_param = f"__onnxopt_dynamic_{vi.name}_{i}"


class _InferenceModel:
    """Every graph of a model as one ModelProto for shape inference, and which gs graph each
    GraphProto stands for (GraphProto names are replaced by ``scope<k>``).

    Large initializers become typed inputs of the main graph (their values never matter for
    shapes, and copying them dominates the cost; the main graph's inputs are visible in every
    subgraph), small ones initializers of each graph that reads them (so their values reach data
    propagation). Declared shapes are kept only for main-graph inputs: subgraph inputs carry
    their dtype only, graph outputs and intermediate value_info nothing. Without a declared shape,
    ONNX's Loop inference gives a body its loop-carried inputs without shape (onnx 1.23; a
    declared one would be believed); Scan gives the shapes of its state variables and of one
    slice of its scan inputs, which the spec keeps the same in every iteration.

    A node whose output sizes ONNX inference may compute differently from onnxruntime
    (:func:`_disputed_axes`) writes a hidden tensor instead, and a *stand-in* turns it into the
    real output with those axes unknown: ``Gather(t, i_k, axis=a)`` for each doubtful axis ``a``,
    where ``i_k`` is a main-graph input of shape ``[i_k]`` (its own symbol, of unknown value).
    Gather's output shape is ``t.shape[:a] + i_k.shape + t.shape[a+1:]`` (ONNX spec, opset 1 on),
    so the rank and the other dims -- those inference gets right -- are kept, the doubtful dims
    become symbols no other dim shares, and no value is propagated (``i_k`` has none). When the
    doubtful axes cannot be told, the stand-in gathers with indices of unknown rank, which leaves
    the output without shape, rank included. Inference then treats everything downstream as it
    treats any unknown dim: a dim computed from a doubtful one is unknown, the others stay known
    (``Flatten(axis=1)`` of ``[N, C, ?, ?]`` is ``[N, ?]``, a MatMul by a ``[K, M]`` weight ends in
    ``M``, a Squeeze without axes has no shape). This is exactly as sound as inference is on
    unknown dims, which is the premise of using it at all.

    Contrib ops ONNX inference does not know get a default-domain stand-in with the same output
    shapes, so that their outputs and what follows are inferred (see :func:`_contrib_stand_in`).
    """

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto):
        #: GraphProto name -> (gs graph, whether it is a Loop/Scan body).
        self.scopes: dict[str, tuple[gs.Graph, bool]] = {}
        self._large: dict[str, gs.Constant] = {}
        #: The stand-ins' indices (see the class docstring), inputs of the main graph.
        self._unknowns: list[onnx.ValueInfoProto] = []
        self._main = graph
        self._opset = next((o.version for o in template.opset_import
                            if o.domain in ("", "ai.onnx")), 0)
        main = self._graph(graph, loop_body=False)
        main.input.extend(onnx.helper.make_tensor_value_info(t.name, onnx_dtype(t.dtype), t.shape)
                          for t in self._large.values())
        main.input.extend(self._unknowns)
        self.model = onnx.helper.make_model(main, opset_imports=list(template.opset_import))
        self.model.ir_version = template.ir_version

    def _graph(self, g: gs.Graph, loop_body: bool) -> onnx.GraphProto:
        name = f"scope{len(self.scopes)}"
        self.scopes[name] = (g, loop_body)
        nodes, initializers, seen = [], [], set()
        for node in g.nodes:
            if not node.outputs:  # disconnected by a pass, not yet dropped
                continue
            for t in node.inputs:
                if not isinstance(t, gs.Constant) or t.name in seen:
                    continue
                seen.add(t.name)
                if int(np.prod(t.shape, dtype=np.int64)) > _SHAPE_INFERENCE_VALUE_LIMIT:
                    self._large[t.name] = t
                else:
                    initializers.append(OnnxExporter.export_tensor_proto(t))
            nodes.extend(self._node(node))
        inputs = [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in g.inputs]
        if g is not self._main:
            for vi in inputs:
                _clear_shapes(vi.type)
        for vi in inputs:
            _negative_dims_unknown(vi)
        outputs = [onnx.helper.make_empty_tensor_value_info(t.name) for t in g.outputs]
        return onnx.helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)

    def _node(self, node: gs.Node) -> list[onnx.NodeProto]:
        """``node`` as NodeProtos: itself, then the stand-ins of its outputs if it is disputed;
        or the stand-in of a contrib op."""
        contrib = _contrib_stand_in(node, self._opset)
        if contrib is not None:
            return [contrib]
        graphs = {k: v for k, v in node.attrs.items() if isinstance(v, gs.Graph)}
        axes = _disputed_axes(node)
        outputs = [t.name for t in node.outputs]
        stand_ins = []
        if axes != ():
            for i, name in enumerate(outputs):
                if name:
                    outputs[i] = fresh_name(self._main, f"{name}__disputed")
                    stand_ins.extend(self._stand_in(outputs[i], name, axes))
        proto = onnx.helper.make_node(node.op, [t.name for t in node.inputs], outputs,
                                      name=node.name, domain=node.domain)
        proto.attribute.extend(OnnxExporter.export_attributes(
            {k: v for k, v in node.attrs.items() if k not in graphs}))
        proto.attribute.extend(
            onnx.helper.make_attribute(k, self._graph(v, loop_body=node.op in ("Loop", "Scan")))
            for k, v in graphs.items())
        return [proto] + stand_ins

    def _stand_in(self, hidden: str, output: str, axes: tuple[int, ...] | None
                  ) -> list[onnx.NodeProto]:
        """Gathers from ``hidden`` to ``output`` that leave ``axes`` unknown (None: the shape)."""
        steps = [None] if axes is None else list(axes)
        nodes, current = [], hidden
        for k, axis in enumerate(steps):
            indices = fresh_name(self._main, "__onnxopt_unknown_indices")
            self._unknowns.append(onnx.helper.make_tensor_value_info(
                indices, onnx.TensorProto.INT64, None if axis is None else [indices]))
            target = output if k == len(steps) - 1 else fresh_name(self._main, f"{output}__dim")
            nodes.append(onnx.helper.make_node("Gather", [current, indices], [target],
                                               axis=axis or 0))
            current = target
        return nodes


def _tensor_type(vi: onnx.ValueInfoProto) -> tuple[np.dtype | None, tuple | None]:
    tt = vi.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type \
            else None
    except (KeyError, TypeError, ValueError):
        dtype = None
    # a dim_param, or a negative dim_value some exporters write for a dynamic dim: unknown
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                  for d in tt.shape.dim) \
        if tt.HasField("shape") else None
    return dtype, shape


def _contrib_stand_in(node: gs.Node, opset: int) -> onnx.NodeProto | None:
    """A default-domain node with the output shapes of ``node``, a contrib op ONNX inference does
    not know, for the inference model; None for other nodes.

    ``com.microsoft::DynamicQuantizeLSTM`` (onnxruntime's contrib op schema): ``X[seq_length,
    batch_size, input_size]`` in, ``Y[seq_length, num_directions, batch_size, hidden_size]``,
    ``Y_h`` and ``Y_c[num_directions, batch_size, hidden_size]`` out, ``num_directions`` 2 when
    ``direction`` is bidirectional, else 1 -- the shapes of ONNX's LSTM (layout 0, opset 7 on),
    whose inference reads only X's shape, ``hidden_size`` and ``direction`` (ONNX's
    ``RNNShapeInference``); its W and R inputs are given X, of the float type LSTM requires.
    """
    if node.domain != "com.microsoft" or node.op != "DynamicQuantizeLSTM" or opset < 7 \
            or not node.inputs or node.inputs[0].is_empty():
        return None
    x = node.inputs[0].name
    attrs = {k: node.attrs[k] for k in ("hidden_size", "direction") if k in node.attrs}
    return onnx.helper.make_node("LSTM", [x, x, x], [t.name for t in node.outputs],
                                 name=node.name, **attrs)


def _infer_types(graph: gs.Graph, template: onnx.ModelProto
                 ) -> dict[int, tuple[gs.Tensor, np.dtype | None, tuple | None]]:
    """``{id(tensor): (tensor, dtype, shape)}`` for the graph inputs and node outputs of ``graph``
    and of every subgraph, from ONNX shape inference (``data_prop``) of an ``_InferenceModel``.

    Each GraphProto's value_info is read only for the tensors that graph itself produces (its
    inputs and its nodes' outputs), so no tensor takes a result from another scope. Loop/Scan
    body inputs get their dtype only. A model shape inference rejects yields nothing.
    """
    built = _InferenceModel(graph, template)
    try:
        inferred = onnx.shape_inference.infer_shapes(built.model, data_prop=True)
    except Exception:  # noqa: BLE001 -- an op shape inference rejects: no inferred types at all
        return {}
    types: dict[int, tuple] = {}
    for proto in graph_protos(inferred.graph):
        g, loop_body = built.scopes[proto.name]
        produced = {t.name: t for n in g.nodes for t in n.outputs}
        inputs = {t.name: t for t in g.inputs}
        for vi in itertools.chain(proto.input, proto.value_info, proto.output):
            t = produced.get(vi.name) or inputs.get(vi.name)
            if t is None or t.is_empty() or not vi.type.HasField("tensor_type"):
                continue
            dtype, shape = _tensor_type(vi)
            if loop_body and vi.name in inputs:
                shape = None
            types[id(t)] = (t, dtype, shape)
    return types


#: Convolutions and pools: op -> index of the weight input (None: a pool, no weight).
_WINDOW_OPS = {"MaxPool": None, "AveragePool": None, "LpPool": None, "Conv": 1,
               "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1}


def _disputed_axes(node: gs.Node) -> tuple[int, ...] | None:
    """The axes (negative: counted from the back) of ``node``'s outputs whose sizes ONNX shape
    inference is known to compute differently from onnxruntime (onnx 1.23 vs onnxruntime 1.32);
    ``()`` when there are none, None when the node is disputed but which axes cannot be told.

    - pooling with ``ceil_mode`` (onnxruntime drops a last window that starts in the padding),
      ``auto_pad`` SAME on pooling and convolutions, ConvTranspose (``output_padding`` and SAME):
      the spatial axes. Batch and channels are certain: dim 0 is the input's dim 0, dim 1 the
      input's (pools) or ``M`` of the weight (``W[M, C/group, k...]`` for Conv, ``M/group`` times
      ``group`` of ``W[C, M/group, k...]`` for ConvTranspose), by the same rule in both;
    - Resize/Upsample (rounding of scaled sizes): the axes whose scale is not exactly 1
      (``floor(d · 1) = d``), every axis with ``sizes``;
    - Slice with a negative or non-constant step (clamping of huge ends): the axes sliced with
      such a step; the others are the input's dims in both.
    """
    op, attrs = node.op, node.attrs
    if not is_default_domain(node):
        return ()  # inference knows nothing of it: no shape to dispute
    if op in _WINDOW_OPS:
        auto_pad = attrs.get("auto_pad", "NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if op != "ConvTranspose" and not attrs.get("ceil_mode", 0) \
                and auto_pad in ("NOTSET", "VALID"):
            return ()
        spatial = _spatial_rank(node, _WINDOW_OPS[op])
        return None if spatial is None else tuple(range(-spatial, 0))
    if op in ("Resize", "Upsample"):
        return _resize_axes(node)
    if op == "Slice":
        if "steps" in attrs or len(node.inputs) < 5 or node.inputs[4].is_empty():
            return ()
        steps = constant_value(node.inputs[4])
        if steps is not None and not (np.asarray(steps) < 0).any():
            return ()
        if len(node.inputs) > 3 and not node.inputs[3].is_empty():
            axes = constant_value(node.inputs[3])
        else:  # default axes: 0 .. len(starts) - 1
            axes = None if steps is None else np.arange(np.size(steps))
        if axes is None:
            return None
        axes = np.ravel(axes)
        if steps is not None:
            axes = axes[np.ravel(steps) < 0]
        return tuple(sorted({int(a) for a in axes}))
    return ()


def _spatial_rank(node: gs.Node, weight: int | None) -> int | None:
    """How many spatial axes a convolution or pool has: from ``kernel_shape``, else from the rank
    of a constant weight ``W[M, C/group, k...]``; None when neither tells."""
    if "kernel_shape" in node.attrs:
        return len(node.attrs["kernel_shape"])
    if weight is not None and len(node.inputs) > weight \
            and isinstance(node.inputs[weight], gs.Constant):
        return len(node.inputs[weight].shape) - 2
    return None


def _resize_axes(node: gs.Node) -> tuple[int, ...] | None:
    """The doubtful axes of a Resize or Upsample (see :func:`_disputed_axes`)."""
    if "scales" in node.attrs:  # Upsample-7
        scales, sizes = np.asarray(node.attrs["scales"]), None
    else:
        # Resize-10 and Upsample-9: (X, scales); Resize-11 on: (X, roi, scales, sizes)
        index = 1 if node.op == "Upsample" or len(node.inputs) == 2 else 2
        present = [None if len(node.inputs) <= i or node.inputs[i].is_empty()
                   else node.inputs[i] for i in (index, index + 1)]
        scales, sizes = [None if t is None else constant_value(t) for t in present]
        if present[0] is not None and scales is None or present[1] is not None and sizes is None:
            return None  # computed at run time
    if scales is not None and np.size(scales) > 0:
        scales = np.ravel(scales)
        axes = node.attrs.get("axes", range(-len(scales), 0))
        return tuple(int(a) for a, s in zip(axes, scales) if s != 1)
    if sizes is None:
        return None
    return tuple(int(a) for a in node.attrs.get("axes", range(-np.size(sizes), 0)))


def sort_nodes(g: gs.Graph) -> None:
    """Order ``g``'s nodes topologically, its subgraphs' reads of outer values included
    (onnx-graphsurgeon's ``toposort``, not recursing), unless they already are: the check is
    linear, the sort is not, and a pass mostly finds the order the previous one left."""
    position = {id(n): i for i, n in enumerate(g.nodes)}
    for i, node in enumerate(g.nodes):
        for t in node_reads(node):
            if any(position.get(id(producer), -1) >= i for producer in t.inputs):
                g.toposort(recurse_subgraphs=False)
                return


def node_reads(node: gs.Node) -> list[gs.Tensor]:
    """The tensors ``node`` reads: its inputs, and the outer-scope values its subgraphs read
    (nested subgraphs included; tensors local to a nested subgraph may be listed too, which is
    harmless when looking for producers in ``node``'s own graph)."""
    reads = list(node.inputs)
    for sub in node.subgraphs():
        reads.extend(_outer_reads(sub))
    return reads


def _outer_reads(sub: gs.Graph) -> list[gs.Tensor]:
    local = {id(t) for n in sub.nodes for t in n.outputs} | {id(t) for t in sub.inputs}
    return [t for g in iter_graphs(sub) for n in g.nodes for t in n.inputs
            if id(t) not in local and not isinstance(t, gs.Constant)]


class TensorTypes:
    """Dtype and shape of the tensors of a graph and of its subgraphs (If/Loop/Scan bodies), from
    ONNX shape inference with data propagation, run once, on the first question about a tensor
    that is not an initializer.

    Only graph input types, initializers and op semantics are used: intermediate value_info and
    declared graph output shapes are ignored (real exports sometimes declare them wrongly), and
    so are the declared shapes of subgraph inputs. Inside a Loop body no shape is derived from a
    loop-carried value's shape (it may change from one iteration to the next); the inputs of a
    Loop or Scan body have no shape (see ``_InferenceModel``). Where ONNX inference is known to
    disagree with onnxruntime (``_disputed_axes``), the dims in question are unknown, and so is
    every dim inference derives from them; the rank and the certain dims are kept.
    Results are keyed by tensor object, so a subgraph tensor never takes another scope's result;
    tensors created after inference are unknown. Inference is best effort: a model it rejects
    yields only the initializers.

    Shapes are tuples of ints, with None for an unknown dim; a shape is None when even the rank
    is unknown.
    """

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto):
        self._graph, self._template = graph, template
        self._types: dict[int, tuple] | None = None

    @classmethod
    def of(cls, graph: gs.Graph, ctx) -> "TensorTypes":
        """The types of ``graph`` for a pass run with ``ctx``: shared with the previous passes
        as long as none of them changed the graph (``ctx.graph_version``), else computed anew."""
        cached = getattr(ctx, "_tensor_types", None)
        if cached is not None and cached[0] is graph and cached[1] == ctx.graph_version:
            return cached[2]
        types = cls(graph, ctx.template)
        ctx._tensor_types = (graph, ctx.graph_version, types)
        return types

    def _lookup(self, t: gs.Tensor) -> tuple[np.dtype | None, tuple | None]:
        if isinstance(t, gs.Constant):
            try:
                return np.dtype(t.dtype), tuple(t.shape)
            except TypeError:
                return None, tuple(t.shape)
        if self._types is None:
            self._types = _infer_types(self._graph, self._template)
        entry = self._types.get(id(t))
        return (entry[1], entry[2]) if entry is not None and entry[0] is t else (None, None)

    def dtype(self, t: gs.Tensor) -> np.dtype | None:
        return self._lookup(t)[0]

    def shape(self, t: gs.Tensor) -> tuple | None:
        return self._lookup(t)[1]

    def rank(self, t: gs.Tensor) -> int | None:
        shape = self.shape(t)
        return None if shape is None else len(shape)

    def static_shape(self, t: gs.Tensor) -> tuple[int, ...] | None:
        """The shape of ``t`` when every dim is known, else None."""
        shape = self.shape(t)
        return shape if shape is not None and all(d is not None for d in shape) else None


def infer_tensor_types(graph: gs.Graph, template: onnx.ModelProto
                       ) -> dict[str, tuple[np.dtype | None, tuple | None]]:
    """:class:`TensorTypes` of the main graph's tensors, by name (subgraph tensors left out).

    Returns:
        ``{tensor name: (numpy dtype or None, shape or None)}``.
    """
    types = TensorTypes(graph, template)
    return {name: (types.dtype(t), types.shape(t)) for name, t in graph.tensors().items()
            if not t.is_empty()}


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


def per_channel(c: np.ndarray, rank: int, m: int) -> np.ndarray | None:
    """``c`` as a float64 vector of length ``m`` if it broadcasts per channel against a rank-
    ``rank`` tensor with ``m`` channels at axis 1 without changing its shape (``rank(c) <= rank``;
    aligned from the right, every dim 1 except the channel dim, which is 1 or ``m``), else None."""
    if c.ndim > rank:
        return None
    dims = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(dims) if i != 1) or dims[1] not in (1, m):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (m,))


def conv_bias(conv: gs.Node) -> np.ndarray:
    """The bias of ``conv`` in float64, zeros when absent."""
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        return np.asarray(conv.inputs[2].values, dtype=np.float64)
    return np.zeros(conv_output_channels(conv))


def _minimal_kept(names: list[str], within_budget) -> list[str]:
    """A 1-minimal sublist ``K`` of ``names`` with ``within_budget(K)`` true, by ddmin: remove
    chunks of ``K`` (halves, then quarters, ...) while the predicate holds. ``within_budget(names)``
    must be true."""
    kept, granularity = list(names), 2
    while kept:
        size = -(-len(kept) // granularity)
        chunks = [kept[i:i + size] for i in range(0, len(kept), size)]
        for chunk in chunks:
            trial = [n for n in kept if n not in chunk]
            if within_budget(trial):
                kept, granularity = trial, max(granularity - 1, 2)
                break
        else:
            if granularity >= len(kept):
                break
            granularity = min(len(kept), granularity * 2)
    return kept


def lossy_warnings(pass_name: str, modified: bool, budget: dict | None, max_drift: float,
                   skipped: dict | None = None) -> list[str]:
    """What a lossy pass tells the user when it did less than asked: nothing at all (with the
    ``skipped`` reasons), or not every tensor because of the drift budget (``budget["kept"]``,
    see :func:`fit_drift_budget`)."""
    if not modified:
        why = ", ".join(f"{k}: {v}" for k, v in (skipped or {}).items())
        return [f"{pass_name} changed nothing" + (f" ({why})" if why else "")]
    kept = budget["kept"] if budget else []
    if not kept:
        return []
    shown = ", ".join(kept[:3]) + (", ..." if len(kept) > 3 else "")
    return [f"{pass_name} left {len(kept)} tensor(s) unchanged to keep every output's cosine "
            f"similarity >= {max_drift}: {shown}"]


def fit_drift_budget(graph: gs.Graph, ctx, replacements: dict[str, tuple[np.ndarray, np.ndarray]]
                     ) -> dict:
    """Choose which lossy weight replacements to apply so the outputs keep ``ctx.max_drift``.

    ``replacements`` maps initializer names to ``(original, replacement)`` values (a dequantized
    or pruned weight, say). The drift of a set of applied replacements is the lowest cosine
    similarity, over every output and every feed of ``ctx.feeds``, between the model with them
    applied and the model as it is. If applying all keeps the drift within budget, all are
    applied. Otherwise each replacement's sensitivity is measured alone (the drift with only it
    applied. Otherwise a 1-minimal set of replacements to leave out is found by delta debugging
    (Zeller and Hildebrandt, 2002, "Simplifying and Isolating Failure-Inducing Input", TSE):
    starting from leaving all out, ever smaller groups are put back while the drift stays within
    budget -- the mixed-precision fallback of accuracy-aware quantization tools (e.g.
    onnxruntime.quantization's ``nodes_to_exclude``, chosen here by measurement instead of by
    hand). Cost: one model run per feed and evaluation; about ``2 k log2(n)`` evaluations when
    ``k`` of ``n`` replacements must be left out, and one when none must.

    The target is ``max_drift + 0.1 (1 - max_drift)``, a margin over the validation criterion.

    Returns:
        ``{"target", "cosine_all", "cosine_final", "evaluations", "kept": [names not replaced]}``.

    Raises:
        InputError: onnxruntime cannot run the model on the feeds.
    """
    from onnxopt.graph import export_graph, graph_protos
    from onnxopt.validate import make_session, output_metrics

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
        kept = _minimal_kept(names, lambda keep: drift(set(names) - set(keep)) >= target)
    cosine_final = drift(set(names) - set(kept)) if kept else cosine_all
    return {"target": target, "cosine_all": cosine_all, "cosine_final": cosine_final,
            "evaluations": evaluations, "kept": kept}


def consecutive_pairs(graph: gs.Graph, second_ops: tuple[str, ...]):
    """Yield ``(g, first_graph, first, second)`` for every default-domain node ``second`` of an op in
    ``second_ops`` whose data input (input 0) is the single output of another default-domain
    node ``first`` -- the shape of every "merge two consecutive ops" rewrite.

    ``g`` holds ``second``; ``first_graph`` holds ``first`` (the same graph, or an enclosing one
    when ``second`` reads an outer-scope tensor). Each graph is sorted topologically before it is
    walked, so a chain is seen from its start; pairs are computed lazily, so a rewrite of one
    pair is seen by the next.
    """
    graphs = list(iter_graphs(graph))
    owner = {id(n): g for g in graphs for n in g.nodes}
    for g in graphs:
        sort_nodes(g)
        for second in list(g.nodes):
            if second.op not in second_ops or not is_default_domain(second) \
                    or not second.outputs or not second.inputs:
                continue
            mid = second.inputs[0]
            if len(mid.inputs) != 1 or not is_default_domain(mid.inputs[0]):
                continue
            first = mid.inputs[0]
            if id(first) in owner:
                yield g, owner[id(first)], first, second


def overflows(folded: np.ndarray, dtype, *sources: np.ndarray) -> bool:
    """True when ``folded`` (computed in float64 from ``sources``) has an infinity or NaN in
    ``dtype`` while every source is finite: the folded weight would turn outputs that were
    finite for some inputs (a small x in ``(x * s) * W``) into infinities for all of them."""
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.asarray(folded).astype(dtype)
    return not np.isfinite(cast).all() and all(np.isfinite(src).all() for src in sources)


def absorb_into_conv(graph: gs.Graph, conv: gs.Node, follower: gs.Node,
                     weight: np.ndarray | None, bias: np.ndarray, *sources: np.ndarray) -> bool:
    """Make ``conv`` compute what ``follower`` -- the only reader of its output -- computed.

    ``conv`` gets new weight (None: the current one is kept) and bias initializers, cast to the
    weight's dtype, and writes ``follower``'s output tensor, so that name survives (it may be a
    graph output); ``follower`` is disconnected (the caller drops it from its graph's nodes).
    Nothing changes, and False is returned, when the new weight or bias :func:`overflows` the
    dtype while the current weight and bias and ``sources`` (the follower's constants) are finite.
    """
    dtype = np.dtype(conv.inputs[1].dtype)
    inputs = [np.asarray(conv.inputs[1].values, np.float64), conv_bias(conv), *sources]
    if any(overflows(new, dtype, *inputs) for new in (weight, bias) if new is not None):
        return False
    w = conv.inputs[1] if weight is None else gs.Constant(
        fresh_name(graph, conv.inputs[1].name), weight.astype(dtype))
    b = gs.Constant(fresh_name(graph, f"{conv.inputs[1].name}_bias"), bias.astype(dtype))
    out = follower.outputs[0]
    follower.inputs.clear()
    follower.outputs.clear()
    x = conv.inputs[0]
    conv.inputs.clear()
    conv.inputs.extend([x, w, b])
    conv.outputs[0] = out
    return True
