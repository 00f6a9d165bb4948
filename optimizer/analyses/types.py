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
from onnxopt.graph import graph_protos, iter_graphs
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

    A node with a *refinement* (:func:`_refinements`: facts an earlier round proved about its
    outputs, which ONNX inference does not derive) is written as nodes whose inferred outputs
    have the proved shapes (:meth:`_refined`); they are never run, only inferred.
    """

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto,
                 refinements: dict[int, tuple] | None = None):
        #: id(node) -> a refinement of its inference (see :func:`_refinements`).
        self._refinements = refinements or {}
        #: GraphProto name -> (gs graph, whether it is a Loop/Scan body).
        self.scopes: dict[str, tuple[gs.Graph, bool]] = {}
        self._large: dict[str, gs.Constant] = {}
        #: The stand-ins' indices (see the class docstring), inputs of the main graph.
        self._unknowns: list[onnx.ValueInfoProto] = []
        #: Symbols of prefix lengths: symbol -> (ends tensor, N), the dim being ``min(e, N)``
        #: for the value ``[e]`` of ``ends`` (see :func:`_refinements`).
        self.prefixes: dict[str, tuple[gs.Tensor, int]] = {}
        #: int64 constants of the refinements, initializers of the main graph.
        self._constants: list[onnx.TensorProto] = []
        self._main = graph
        self._names = NameAuthority.of(graph).fork()
        self._opset = next((o.version for o in template.opset_import
                            if o.domain in ("", "ai.onnx")), 0)
        main = self._graph(graph, loop_body=False)
        main.input.extend(onnx.helper.make_tensor_value_info(t.name, onnx_dtype(t.dtype), t.shape)
                          for t in self._large.values())
        main.input.extend(self._unknowns)
        main.initializer.extend(self._constants)
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
        refinement = self._refinements.get(id(node))
        if refinement is not None:
            return self._refined(node, *refinement)
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

    def _refined(self, node: gs.Node, kind: str, *args) -> list[onnx.NodeProto]:
        """The NodeProtos standing for ``node`` under a refinement (:func:`_refinements`), whose
        inferred output shapes are those the refinement proved."""
        ins, out = [t.name for t in node.inputs], node.outputs[0].name
        parts: list[onnx.NodeProto] = []
        if kind == "slice":  # dims of the data input on the axes not sliced
            return self._stand_in(ins[0], out, *args)
        if kind == "reshape":  # the -1 at position j is c: target[:j] ++ [c] ++ target[j+1:]
            (j, c), target = args, ins[1]
            zero, at, value, after, end = (self._int64(f"{target}__bound", [v]) for v in (
                0, j, c, j + 1, np.iinfo(np.int64).max))
            head, tail, refined = (self._names.fresh(f"{target}__{k}")
                                   for k in ("head", "tail", "refined"))
            attrs = {k: v for k, v in node.attrs.items() if k == "allowzero"}
            return [onnx.helper.make_node("Slice", [target, zero, at], [head]),
                    onnx.helper.make_node("Slice", [target, after, end], [tail]),
                    onnx.helper.make_node("Concat", [head, value, tail], [refined], axis=0),
                    onnx.helper.make_node("Reshape", [ins[0], refined], [out], **attrs)]
        if kind == "expand":  # the shape as Concat(constants, Shape(t, axis, axis + 1))
            names = []
            for piece in args[0]:
                if isinstance(piece, int):
                    names.append(self._int64(f"{ins[1]}__dim", [piece]))
                    continue
                t, axis = piece
                names.append(self._names.fresh(f"{ins[1]}__dim"))
                if self._opset >= 15:
                    parts.append(onnx.helper.make_node("Shape", [t.name], [names[-1]],
                                                       start=axis, end=axis + 1))
                else:
                    whole = self._names.fresh(f"{t.name}__shape")
                    parts += [onnx.helper.make_node("Shape", [t.name], [whole]),
                              onnx.helper.make_node("Gather", [whole, self._int64(
                                  f"{whole}__axis", [axis])], [names[-1]], axis=0)]
            shape = self._names.fresh(f"{ins[1]}__refined")
            return parts + [onnx.helper.make_node("Concat", names, [shape], axis=0),
                            onnx.helper.make_node("Expand", [ins[0], shape], [out])]
        if kind == "broadcast":  # operand i seen with dim 1 on axis a
            i, axis = args
            one = self._names.fresh(f"{ins[i]}__one")
            zero = self._int64(f"{ins[i]}__first", [0])
            ins[i] = one
            proto = onnx.helper.make_node(node.op, ins, [out], name=node.name)
            return [onnx.helper.make_node("Gather", [node.inputs[i].name, zero], [one],
                                          axis=axis), proto]
        # "range": Range(0, n, 1) has the shape [n] of ConstantOfShape([n])
        n = self._names.fresh(f"{ins[1]}__as_shape")
        unsqueeze = (onnx.helper.make_node("Unsqueeze", [ins[1], self._int64(f"{n}__axes", [0])],
                                           [n]) if self._opset >= 13
                     else onnx.helper.make_node("Unsqueeze", [ins[1]], [n], axes=[0]))
        zero = onnx.helper.make_tensor("value", onnx_dtype(node.inputs[0].dtype), [1], [0])
        return [unsqueeze, onnx.helper.make_node("ConstantOfShape", [n], [out], value=zero)]

    def _int64(self, name: str, values: list[int]) -> str:
        """A new int64 initializer of the main graph (visible in every scope), by name."""
        name = self._names.fresh(name)
        self._constants.append(onnx.numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def _stand_in(self, hidden: str, output: str, axes: tuple[int, ...] | None,
                  prefix: tuple[gs.Tensor, int] | None = None) -> list[onnx.NodeProto]:
        """Gathers from ``hidden`` to ``output`` that leave ``axes`` unknown (None: the shape).
        With ``prefix`` (one axis), the unknown dim is ``min(e, N)`` for ``prefix = (ends, N)``
        (``ends`` holding ``[e]``): its symbol is recorded in :attr:`prefixes`."""
        steps = [None] if axes is None else list(axes)
        nodes, current = [], hidden
        for k, axis in enumerate(steps):
            indices = self._names.fresh("__onnxopt_unknown_indices")
            if prefix is not None:
                self.prefixes[indices] = prefix
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
    # a dim_param is kept as its symbol; a negative dim_value some exporters write for a dynamic
    # dim is unknown (the inference model made it a symbol of its own already)
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
                  else d.dim_param or None for d in tt.shape.dim) \
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


def _infer_types(graph: gs.Graph, template: onnx.ModelProto) -> "_Symbolic":
    """``{id(tensor): (tensor, kind, dtype, shape)}`` for the graph inputs and node outputs of
    ``graph`` and of every subgraph, from ONNX shape inference (``data_prop``) of an
    ``_InferenceModel``, as the ``types`` of a :class:`_Symbolic`; ``kind`` as
    :meth:`TensorTypes.kind` names it, dtype and shape None unless it is "tensor", dims ints,
    symbols (str) or None.

    Each GraphProto's value_info is read only for the tensors that graph itself produces (its
    inputs and its nodes' outputs), so no tensor takes a result from another scope. Loop/Scan
    body inputs get their dtype only. A model shape inference rejects yields nothing.

    Inference runs in rounds: after each, :func:`_refinements` looks for nodes whose outputs
    the result proves more about than ONNX inference derives, and the next round's inference
    model lets those nodes say it; the rounds stop when nothing new is found (one round for
    most models), after ``_MAX_ROUNDS`` at most.
    """
    refinements: dict[int, tuple] = {}
    result = _Symbolic({}, {})
    for _ in range(_MAX_ROUNDS):
        built = _InferenceModel(graph, template, refinements)
        try:
            inferred = onnx.shape_inference.infer_shapes(built.model, data_prop=True)
        except Exception:  # noqa: BLE001 -- an op shape inference rejects: what the last round had
            return result
        result = _Symbolic(_read_types(graph, built, inferred), built.prefixes)
        found = _refinements(graph, result)
        if found.keys() <= refinements.keys():
            return result
        refinements.update(found)
    return result


def _read_types(graph: gs.Graph, built: _InferenceModel, inferred: onnx.ModelProto
                ) -> dict[int, tuple]:
    """The ``_infer_types`` entries from the inferred model of ``built``."""
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


#: Inference rounds at most (see ``_infer_types``); the refinements of attention blocks need
#: three (the embeddings' broadcast, then the Reshapes of every layer).
_MAX_ROUNDS = 6
#: Largest shape-arithmetic tensor (in elements) whose symbolic value is derived.
_VALUE_ELEMENTS = 64
#: Two-input elementwise ops with multidirectional broadcasting (ONNX spec, opset 7 on).
_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def _producer(t: gs.Tensor) -> gs.Node | None:
    """The default-domain node writing ``t``, or None."""
    return t.inputs[0] if len(t.inputs) == 1 and is_default_domain(t.inputs[0]) else None


class _Symbolic:
    """One inference round's symbolic shapes, and the symbolic values of the small int64 tensors
    shape arithmetic computes (``Shape -> Gather -> Unsqueeze -> Concat``).

    A dim or an element is an int, a symbol (str) or None (unknown). Symbols are the main graph
    inputs' dim_params -- by the ONNX IR a dim_param names one size wherever it appears, the
    contract the graph inputs declare -- and those ONNX inference creates for dims it cannot
    compute (``unk__N``) or the inference model gives (stand-ins); inference passes a symbol on
    only where a dim is that same dim (``MatMul`` keeps the rows of its first input, ``Add``
    of ``[s, 4]`` and ``[1, 4]`` has dim ``s``), so two dims with one symbol are equal for every
    input the graph accepts. An element copied from a dim (``Shape``) is that dim, hence never
    negative.
    """

    def __init__(self, types: dict[int, tuple], prefixes: dict[str, tuple[gs.Tensor, int]]):
        #: ``{id(tensor): (tensor, kind, dtype, symbolic shape)}`` (see ``_infer_types``).
        self.types, self.prefixes = types, prefixes
        self._values: dict[int, tuple | None] = {}
        #: :meth:`sources` of the main graph, while refinements are looked for.
        self.main_sources: dict[str, tuple[gs.Tensor, int]] = {}

    def shape(self, t: gs.Tensor) -> tuple | None:
        if isinstance(t, gs.Constant):
            return tuple(t.shape)
        entry = self.types.get(id(t))
        return entry[3] if entry is not None and entry[0] is t else None

    def value(self, t: gs.Tensor) -> tuple | None:
        """The elements of ``t``, an int64 tensor of rank 0 (one element) or 1 built from
        initializers and dims by ``Shape``, ``Gather`` (axis 0, constant indices), ``Squeeze``/
        ``Unsqueeze`` between rank 0 and one element of rank 1, ``Concat`` (axis 0), ``Identity``
        and ``Cast`` to int64; None otherwise."""
        if id(t) not in self._values:
            self._values[id(t)] = self._value(t)
        return self._values[id(t)]

    def _value(self, t: gs.Tensor) -> tuple | None:
        if isinstance(t, gs.Constant):
            v = constant_value(t)
            if v is None or v.dtype != np.int64 or v.ndim > 1 or v.size > _VALUE_ELEMENTS:
                return None
            return tuple(int(x) for x in np.ravel(v))
        node = _producer(t)
        if node is None or not node.inputs:
            return None
        x = node.inputs[0]
        if node.op == "Shape":
            shape = self.shape(x)
            if shape is None:
                return None
            axes = range(len(shape))[node.attrs.get("start", 0):node.attrs.get("end", len(shape))]
            return tuple(shape[a] for a in axes)
        if node.op == "Identity" or node.op == "Cast" and node.attrs.get("to") == \
                onnx.TensorProto.INT64:
            return self.value(x)
        if node.op in ("Squeeze", "Unsqueeze"):
            value, out = self.value(x), self.shape(t)
            return value if value is not None and len(value) == 1 and out is not None \
                and len(out) <= 1 else None
        if node.op == "Gather" and node.attrs.get("axis", 0) in (0, -1):
            data, index = self.value(x), constant_value(node.inputs[1])
            if data is None or self.shape(x) != (len(data),) or index is None \
                    or np.ndim(index) > 1 or any(not -len(data) <= i < len(data)
                                                 for i in np.ravel(index)):
                return None
            return tuple(data[int(i)] for i in np.ravel(index))
        if node.op == "Slice":
            return self._slice(node)
        if node.op == "Where":
            return self._where(node)
        if node.op == "Concat" and node.attrs.get("axis") in (0, -1):
            parts = [self.value(p) for p in node.inputs]
            if any(p is None or self.shape(q) != (len(p),) for p, q in zip(parts, node.inputs)):
                return None
            return sum(parts, ())
        return None

    def _slice(self, node: gs.Node) -> tuple | None:
        """``Slice`` of a rank-1 value by constants (:func:`rank1_slice`)."""
        data, bounds = self.value(node.inputs[0]), rank1_slice(node)
        if data is None or bounds is None or self.shape(node.inputs[0]) != (len(data),):
            return None
        return data[bounds]

    def _where(self, node: gs.Node) -> tuple | None:
        """``Where(Equal(p, q), a, b)`` on rank-1 values (or one element, broadcast): torch's
        ``expand`` keeps a dim where its target has ``-1``. An element of ``Equal`` is known when
        both are ints, both one symbol (true), or a symbol -- a dim, not negative -- and a
        negative int (false); the other elements are unknown."""
        cond = _producer(node.inputs[0])
        if cond is None or cond.op != "Equal":
            return None
        p, q, a, b = (self.value(t) for t in (*cond.inputs, *node.inputs[1:]))
        if any(v is None for v in (p, q, a, b)) \
                or any(self.shape(t) not in ((len(v),), ()) for t, v in zip(
                    (*cond.inputs, *node.inputs[1:]), (p, q, a, b))):
            return None
        n = max(len(v) for v in (p, q, a, b))
        if any(len(v) not in (1, n) for v in (p, q, a, b)):
            return None
        out = []
        for i in range(n):
            x, y = (v[i % len(v)] for v in (p, q))
            if isinstance(x, int) and isinstance(y, int) or x == y and x is not None:
                equal = x == y
            elif isinstance(x, str) and isinstance(y, int) and y < 0 \
                    or isinstance(y, str) and isinstance(x, int) and x < 0:
                equal = False
            else:
                equal = None
            out.append(None if equal is None else (a if equal else b)[i % len(a if equal else b)])
        return tuple(out)

    def sources(self, graph: gs.Graph) -> dict[str, tuple[gs.Tensor, int]]:
        """``{symbol: (tensor, axis)}``: the first tensor of ``graph`` (inputs, then node outputs)
        with dim ``axis`` that symbol."""
        found: dict[str, tuple[gs.Tensor, int]] = {}
        for t in itertools.chain(graph.inputs, (t for n in graph.nodes for t in n.outputs)):
            for axis, dim in enumerate(self.shape(t) or ()):
                if isinstance(dim, str):
                    found.setdefault(dim, (t, axis))
        return found


def rank1_slice(node: gs.Node) -> slice | None:
    """What a ``Slice`` node (opset 10 on) with constant one-element ``starts``, ``ends``,
    ``axes`` (0 or -1, the default 0) and ``steps`` (1 by default, positive) takes from a rank-1
    tensor, as a Python slice; None for other Slices. ONNX adds the length to a negative start
    or end, then clamps both to ``[0, length]`` (spec), as Python's slicing does."""
    if len(node.inputs) < 3:
        return None
    bounds = [constant_value(node.inputs[k]) if len(node.inputs) > k
              and not node.inputs[k].is_empty() else default
              for k, default in ((1, None), (2, None), (3, [0]), (4, [1]))]
    if any(b is None or np.size(b) != 1 for b in bounds):
        return None
    start, end, axis, step = (int(np.ravel(b)[0]) for b in bounds)
    return slice(start, end, step) if axis in (0, -1) and step > 0 else None


def _monomial(dims) -> tuple[int, tuple] | None:
    """``dims`` (ints and symbols) as a product ``(constant, sorted symbols)``; None if one is
    unknown."""
    if any(d is None for d in dims):
        return None
    return (int(np.prod([d for d in dims if isinstance(d, int)], dtype=np.int64)),
            tuple(sorted(d for d in dims if isinstance(d, str))))


def _reshape_refinement(node: gs.Node, sym: _Symbolic) -> tuple | None:
    """``("reshape", j, c)`` when the ``-1`` at position ``j`` of the target is ``c`` for every
    input the graph accepts.

    ONNX Reshape (spec, opsets 5-21): the ``-1`` is the input's element count divided by the
    product of the other (resolved) entries. When the input's dims and the other entries are
    known as products of the same symbols, ``c`` is the quotient of their constant factors
    (``[s, 400, 384]`` to ``[s, -1, 6, 64]``: ``400``). When a symbol is 0 the count is 0 and
    the division is undefined: onnxruntime then fails (allowzero 0: ``size != 0`` check) or,
    with allowzero 1, divides the products of the non-zero dims, which is ``c`` again. So the
    dim is ``c`` wherever the Reshape succeeds. Refused: a target entry 0 with allowzero 1 (a
    literal zero beside the ``-1``), an input dim 0 or unknown, a quotient that is not a
    positive integer.
    """
    if len(node.inputs) != 2 or node.inputs[1].is_empty():
        return None
    x, target = sym.shape(node.inputs[0]), sym.value(node.inputs[1])
    if x is None or target is None or target.count(-1) != 1 or 0 in x:
        return None
    j, allowzero = target.index(-1), node.attrs.get("allowzero", 0)
    out = sym.shape(node.outputs[0])
    if out is not None and len(out) == len(target) and isinstance(out[j], int):
        return None  # inference knows it already
    others = []
    for k, entry in enumerate(target):
        if k == j:
            continue
        if entry == 0 and not allowzero:
            entry = x[k] if k < len(x) else None
        if entry is None or isinstance(entry, int) and entry <= 0:
            return None
        others.append(entry)
    num, den = _monomial(x), _monomial(others)
    if num is None or den is None or num[1] != den[1] or num[0] % den[0] or num[0] == 0:
        return None
    return "reshape", j, num[0] // den[0]


def _slice_refinement(node: gs.Node, sym: _Symbolic) -> tuple | None:
    """``("slice", axes, prefix)`` for a Slice (opset 10 on) with computed starts or ends,
    whose output ONNX inference leaves without dims: the axes not in ``axes`` have the data
    input's dims (spec: only the sliced axes change). ``prefix`` is ``(ends, N)`` when the one
    sliced axis, of static size ``N``, is sliced from 0 with step 1 to the end ``e`` that
    ``ends = [e]`` holds, a dim: its length is then ``min(e, N)`` (ends are clamped to ``N``).
    Only data of rank 2 or more (no shape arithmetic, whose values inference propagates) and
    positive constant steps (negative ones are disputed)."""
    if len(node.inputs) < 3:
        return None
    data = sym.shape(node.inputs[0])
    starts, ends = (constant_value(t) for t in node.inputs[1:3])
    if data is None or len(data) < 2 or starts is not None and ends is not None:
        return None
    n = sym.shape(node.inputs[1])
    axes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and \
        not node.inputs[3].is_empty() else (None if n is None or len(n) != 1 or n[0] is None
                                            else np.arange(n[0]))
    steps = constant_value(node.inputs[4]) if len(node.inputs) > 4 and \
        not node.inputs[4].is_empty() else np.ones(1, np.int64)
    if axes is None or steps is None or (np.asarray(steps) <= 0).any() \
            or any(not -len(data) <= a < len(data) for a in np.ravel(axes)):
        return None
    axes = tuple(sorted({int(a) % len(data) for a in np.ravel(axes)}))
    out = sym.shape(node.outputs[0])
    if out is not None and (any(isinstance(out[a], int) for a in axes)
                            or all(out[a] == data[a] for a in range(len(data)) if a not in axes)):
        return None
    prefix = None
    if len(axes) == 1 and isinstance(data[axes[0]], int) and data[axes[0]] >= 1 \
            and starts is not None and np.ravel(starts).tolist() == [0] \
            and np.ravel(steps).tolist() == [1]:
        value = sym.value(node.inputs[2])
        if value is not None and len(value) == 1 and isinstance(value[0], str):
            prefix = (node.inputs[2], data[axes[0]])
    return "slice", axes, prefix


def _broadcast_refinement(node: gs.Node, sym: _Symbolic) -> tuple | None:
    """``("broadcast", i, a)`` when dim ``a`` of operand ``i`` is a prefix length ``min(e, N)``
    (:func:`_slice_refinement`) and the other operand's dim broadcast with it is ``e``: the
    output dim is then ``e`` wherever the op succeeds (``e <= N``: both are ``e``; ``e > N``:
    ``N`` and ``e`` broadcast only when ``N = 1``, to ``e``), as if operand ``i`` had a 1 there
    (``position_embeddings[:, :seq_len] + token_embeddings``)."""
    if len(node.inputs) != 2:
        return None
    shapes, out = [sym.shape(t) for t in node.inputs], sym.shape(node.outputs[0])
    if any(s is None for s in shapes):
        return None
    for i in (0, 1):
        mine, other = shapes[i], shapes[1 - i]
        for a, dim in enumerate(mine):
            if dim not in sym.prefixes:
                continue
            value = sym.value(sym.prefixes[dim][0])
            k = a + len(other) - len(mine)
            if value is None or len(value) != 1 or k < 0 or other[k] != value[0]:
                continue
            if out is not None and out[a + len(out) - len(mine)] == value[0]:
                return None
            return "broadcast", i, a
    return None


def _range_refinement(node: gs.Node, sym: _Symbolic) -> tuple | None:
    """``("range",)`` for ``Range(0, n, 1)`` (opset 11 on) with ``n`` an int64 dim: its output
    has ``max(ceil((n - 0) / 1), 0) = n`` elements (spec), shape ``[n]``."""
    start, delta = constant_value(node.inputs[0]), constant_value(node.inputs[2])
    if start is None or delta is None or start.dtype != np.int64 or start.ndim \
            or int(start) != 0 or int(delta) != 1:
        return None
    value = sym.value(node.inputs[1])
    if value is None or len(value) != 1 or not isinstance(value[0], str) \
            or sym.shape(node.outputs[0]) == value:
        return None
    return ("range",)


def _expand_refinement(node: gs.Node, sym: _Symbolic) -> tuple | None:
    """``("expand", pieces)`` for an ``Expand`` whose computed shape ``sym`` knows element by
    element but ONNX's data propagation does not (it stops at ``Where``): each piece an int or
    ``(tensor, axis)``, a main-graph tensor whose dim ``axis`` is that element. The next round
    gives Expand the shape ``Concat`` of constants and ``Shape(tensor, axis, axis + 1)``, whose
    values inference propagates, so that it broadcasts the input's shape with them (spec)."""
    if len(node.inputs) != 2 or isinstance(node.inputs[1], gs.Constant):
        return None
    value = sym.value(node.inputs[1])
    if value is None or None in value or sym.shape(node.inputs[1]) != (len(value),):
        return None
    pieces = []
    for v in value:
        if isinstance(v, str):
            if v not in sym.main_sources:
                return None
            v = sym.main_sources[v]
        pieces.append(v)
    return "expand", tuple(pieces)


#: Refinements of inference: op -> rule finding what a node's outputs are proved to be.
_REFINEMENTS = {"Reshape": _reshape_refinement, "Slice": _slice_refinement,
                "Range": _range_refinement, "Expand": _expand_refinement,
                **{op: _broadcast_refinement for op in _BROADCAST_OPS}}


def _refinements(graph: gs.Graph, sym: _Symbolic) -> dict[int, tuple]:
    """``{id(node): refinement}`` for the nodes of ``graph`` and its subgraphs whose outputs one
    inference round (``sym``) proves more about than ONNX inference derived; the next round's
    inference model lets them say it (``_InferenceModel._refined``)."""
    found = {}
    sym.main_sources = sym.sources(graph)
    for g in iter_graphs(graph):
        for node in g.nodes:
            rule = _REFINEMENTS.get(node.op)
            if rule is None or not node.outputs or not is_default_domain(node) \
                    or _disputed_axes(node) != ():
                continue
            refinement = rule(node, sym)
            if refinement is not None:
                found[id(node)] = refinement
    return found


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
    is unknown. :meth:`symbolic_shape` also tells which unknown dims are equal (symbols: the
    graph inputs' dim_params and the dims inference derives from them), and
    :meth:`shape_value` the values of shape arithmetic in those terms. Beyond ONNX inference,
    what shape arithmetic proves is fed back into it (``_refinements``): a Reshape's ``-1``
    whose symbols cancel (``[s, 400, 384]`` to ``[s, -1, 6, 64]`` is ``[s, 400, 6, 64]``), the
    dims a Slice with computed bounds keeps, ``Range(0, n, 1)``, the sequence dim of
    ``position_embeddings[:, :seq_len] + embeddings``, an Expand to a target ``Where`` computes.
    Never a declared shape: only graph input shapes, initializers and op semantics.
    :meth:`kind` tells a tensor from the values that are not one (sequences, optionals, maps,
    sparse tensors), whose dtype and shape are None.

    To ask about other input shapes than the declared ones (the synthesized shapes of
    ``onnxopt.inputs``), set the shapes of the main graph's input tensors before the first
    question: they are the shapes inference starts from.
    """

    def __init__(self, graph: gs.Graph, template: onnx.ModelProto):
        self._graph, self._template = graph, template
        self._inferred: _Symbolic | None = None

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
        entry = self._symbolic().types.get(id(t))
        return entry[1:] if entry is not None and entry[0] is t else (None, None, None)

    def _symbolic(self) -> _Symbolic:
        if self._inferred is None:
            self._inferred = _infer_types(self._graph, self._template)
        return self._inferred

    def kind(self, t: gs.Tensor) -> str | None:
        """What ``t`` holds: ``"tensor"``, ``"sparse tensor"``, ``"sequence"``, ``"optional"`` or
        ``"map"`` (the kinds of ONNX's TypeProto); None when inference does not tell (an op it
        does not know, a model it rejects, a tensor created since)."""
        return self._lookup(t)[0]

    def dtype(self, t: gs.Tensor) -> np.dtype | None:
        return self._lookup(t)[1]

    def shape(self, t: gs.Tensor) -> tuple | None:
        shape = self._lookup(t)[2]
        return None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)

    def symbolic_shape(self, t: gs.Tensor) -> tuple | None:
        """The shape of ``t`` with each dim an int, a symbol (str) or None (unknown): two dims
        with the same symbol are equal for every input the graph accepts (see
        :class:`_Symbolic`); a symbol's value is never known."""
        return self._lookup(t)[2]

    def shape_value(self, t: gs.Tensor) -> tuple | None:
        """The elements of ``t`` when it is shape arithmetic of rank 0 or 1 (int64; ``Shape``,
        ``Gather``, ``Concat`` ... of dims and initializers, see :meth:`_Symbolic.value`), each
        an int, a symbol (a dim, :meth:`symbolic_shape`) or None; else None."""
        return self._symbolic().value(t)

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
