"""Tensor types and shapes: ONNX shape inference over every scope, careful about disputed axes.

:class:`TensorTypes` is the analysis; the rest builds the model shape inference runs on.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.analyses.manager import Analysis
from onnxopt.edit import constant_value, onnx_dtype
from onnxopt.graph import graph_protos
from onnxopt.names import NameAuthority
from onnxopt.ops import is_default_domain

#: Initializers with more elements than this are given to shape inference as typed inputs only.
_SHAPE_INFERENCE_VALUE_LIMIT = 1024

#: The kinds of value ONNX types (TypeProto's ``value`` field), as :meth:`TensorTypes.kind`
#: names them.
_KINDS = {"tensor_type": "tensor", "sparse_tensor_type": "sparse tensor",
          "sequence_type": "sequence", "optional_type": "optional", "map_type": "map"}


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
        self._names = NameAuthority.of(graph).fork()
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
                    outputs[i] = self._names.fresh(f"{name}__disputed")
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
            indices = self._names.fresh("__onnxopt_unknown_indices")
            self._unknowns.append(onnx.helper.make_tensor_value_info(
                indices, onnx.TensorProto.INT64, None if axis is None else [indices]))
            target = output if k == len(steps) - 1 else self._names.fresh(f"{output}__dim")
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
                 ) -> dict[int, tuple[gs.Tensor, str, np.dtype | None, tuple | None]]:
    """``{id(tensor): (tensor, kind, dtype, shape)}`` for the graph inputs and node outputs of
    ``graph`` and of every subgraph, from ONNX shape inference (``data_prop``) of an
    ``_InferenceModel``; ``kind`` as :meth:`TensorTypes.kind` names it, dtype and shape None
    unless it is "tensor".

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
            kind = _KINDS.get(vi.type.WhichOneof("value"))
            if t is None or t.is_empty() or kind is None:
                continue
            dtype, shape = _tensor_type(vi) if kind == "tensor" else (None, None)
            if loop_body and vi.name in inputs:
                shape = None
            types[id(t)] = (t, kind, dtype, shape)
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



class TensorTypes(Analysis):
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
    is unknown. :meth:`kind` tells a tensor from the values that are not one (sequences,
    optionals, maps, sparse tensors), whose dtype and shape are None.

    To ask about other input shapes than the declared ones (the synthesized shapes of
    ``onnxopt.inputs``), set the shapes of the main graph's input tensors before the first
    question: they are the shapes inference starts from.
    """

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto):
        self._graph, self._template = graph, template
        self._types: dict[int, tuple] | None = None

    @classmethod
    def compute(cls, graph: gs.Graph, ctx) -> "TensorTypes":
        """The analysis for the analysis manager: inferred on the first question."""
        return cls(graph, ctx.template)

    def _lookup(self, t: gs.Tensor) -> tuple[str | None, np.dtype | None, tuple | None]:
        if isinstance(t, gs.Constant):
            try:
                return "tensor", np.dtype(t.dtype), tuple(t.shape)
            except TypeError:
                return "tensor", None, tuple(t.shape)
        if self._types is None:
            self._types = _infer_types(self._graph, self._template)
        entry = self._types.get(id(t))
        return entry[1:] if entry is not None and entry[0] is t else (None, None, None)

    def kind(self, t: gs.Tensor) -> str | None:
        """What ``t`` holds: ``"tensor"``, ``"sparse tensor"``, ``"sequence"``, ``"optional"`` or
        ``"map"`` (the kinds of ONNX's TypeProto); None when inference does not tell (an op it
        does not know, a model it rejects, a tensor created since)."""
        return self._lookup(t)[0]

    def dtype(self, t: gs.Tensor) -> np.dtype | None:
        return self._lookup(t)[1]

    def shape(self, t: gs.Tensor) -> tuple | None:
        return self._lookup(t)[2]

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
