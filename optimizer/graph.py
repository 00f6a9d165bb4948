"""The in-memory graph every pass edits: onnx-graphsurgeon's Graph, Node and Tensor.

``import_graph`` turns a ModelProto into a ``gs.Graph`` and lowers ``Constant`` nodes to
initializers (``gs.Constant`` tensors), so that weights stored as Constant nodes -- as the PaddleOCR
exports store all of theirs -- are seen as initializers by every pass. ``export_graph`` is the one
place that turns the graph back into protobuf: it sorts nodes topologically (repairing models that
were not sorted), drops intermediate value_info (a rewrite may have made it stale; onnxruntime infers
its own) and keeps the original model's metadata.

Also here: walking a graph with all its subgraphs, and the statistics the reports show.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import logging
import types
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.errors import UnsupportedModel

logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

_CONSTANT_VALUE_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """Yield ``graph`` and then every subgraph (If/Loop/Scan bodies), depth first.

    Reads node attributes directly: ``gs.Node.subgraphs()`` is general, and slow enough to
    dominate passes that walk every scope often."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield from iter_graphs(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, gs.Graph):
                        yield from iter_graphs(item)


def branch_scopes(graph: gs.Graph, parent: gs.Graph | None = None, branch: bool = True
                  ) -> Iterator[tuple[gs.Graph, gs.Graph | None, bool]]:
    """``(g, parent, in_branches)`` for ``graph`` and every subgraph, depth first: ``parent`` the
    graph holding the node that owns ``g`` (None for ``graph``), ``in_branches`` whether ``g`` is
    ``graph`` or an If branch reached through If branches only -- whose tensors calibration
    reaches (``onnxopt.analyses.activations``) and whose values run once per model run, unlike a
    Loop or Scan body's, which run once per iteration."""
    yield graph, parent, branch
    for node in graph.nodes:
        is_if = branch and node.op == "If" and node.domain in ("", "ai.onnx", None)
        for value in node.attrs.values():
            for sub in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(sub, gs.Graph):
                    yield from branch_scopes(sub, graph, is_if)


def branch_labels(graph: gs.Graph, branches: Iterable[gs.Graph]) -> list[str]:
    """``"the then branch of If 'name' (its condition reads input 'sr')"`` for each If branch
    of ``branches`` (graphs of ``graph``'s model) not nested in another of them, in graph
    order; an unnamed If is named by its first output, the model inputs its condition is
    computed from are named when there are any. For messages."""
    wanted = {id(g) for g in branches}
    model_inputs = {id(t): t.name for t in graph.inputs}
    labels: list[str] = []

    def deciding(cond: gs.Tensor) -> list[str]:
        """The model inputs the If condition ``cond`` is computed from."""
        found, seen, todo = [], set(), [cond]
        while todo and len(seen) < 1000:
            t = todo.pop()
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in model_inputs:
                found.append(model_inputs[id(t)])
            for producer in t.inputs:
                todo.extend(producer.inputs)
        return sorted(set(found))

    def walk(g: gs.Graph, inside: bool) -> None:
        for node in g.nodes:
            for key, sub in node.attrs.items():
                if not isinstance(sub, gs.Graph):
                    continue
                if id(sub) in wanted and not inside and node.op == "If":
                    label = node.name or (node.outputs[0].name if node.outputs else "")
                    reads = deciding(node.inputs[0]) if node.inputs else []
                    labels.append(f"the {key.split('_')[0]} branch of If '{label}'" + (
                        f" (its condition reads input {', '.join(map(repr, reads))})"
                        if reads else ""))
                walk(sub, inside or id(sub) in wanted)

    walk(graph, False)
    return labels


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    if len(node.attrs) != 1:
        return None
    name, value = next(iter(node.attrs.items()))
    if name not in _CONSTANT_VALUE_ATTRS or isinstance(value, gs.Node.AttributeRef):
        return None
    if isinstance(value, gs.Constant):
        return external.peek(value)
    if name in ("value_float", "value_floats"):
        return np.array(value, dtype=np.float32)
    return np.array(value, dtype=np.int64)


def lower_constant_nodes(graph: gs.Graph) -> int:
    """Turn ``Constant`` nodes into initializers, in ``graph`` and its subgraphs.

    A Constant whose output is a graph output stays a node: a graph output must be produced by a
    node or be a graph input. Sparse and string-list Constants are left alone.

    Returns:
        The number of Constant nodes lowered.
    """
    lowered = 0
    for g in iter_graphs(graph):
        outputs = set(map(id, g.outputs))
        for node in g.nodes:
            if node.op != "Constant" or node.domain not in (None, "", "ai.onnx"):
                continue
            out = node.outputs[0]
            if id(out) in outputs:
                continue
            value = node.attrs.get("value")
            if isinstance(getattr(value, "_values", None), external.ExternalValues):
                out.to_constant(value._values)  # stays a reference to its file
            else:
                value = _constant_node_value(node)
                if value is None:
                    continue
                out.to_constant(np.asarray(value))
            out.inputs.clear()
            node.outputs.clear()
            lowered += 1
        g.nodes = [n for n in g.nodes if n.outputs or n.op != "Constant"]
    return lowered


def make_names_unique(graph: gs.Graph) -> int:
    """Rename tensors so that no two tensors of the model share a name, across all scopes.

    ONNX lets sibling subgraphs (the two branches of an If) reuse names; a rewrite that moves a
    tensor from one scope to another (merging equal initializers of two branches, say) would then
    create a clash. The main graph's tensors keep their names, so the model's interface is kept;
    subgraph inputs and outputs bind by position and may be renamed.

    Returns:
        The number of tensors renamed.
    """
    owners: dict[str, int] = {}
    taken: set[str] = set()
    renamed = 0
    for g in iter_graphs(graph):
        tensors = list(g.inputs) + list(g.outputs)
        for node in g.nodes:
            tensors.extend(node.inputs)
            tensors.extend(node.outputs)
        for t in tensors:
            if t.is_empty():
                continue
            owner = owners.get(t.name)
            if owner is None:
                owners[t.name] = id(t)
                taken.add(t.name)
            elif owner != id(t):
                if isinstance(t, gs.Constant):
                    # A lazily loaded initializer exports by renaming the TensorProto it was
                    # read from -- the caller's model. Loading it detaches it from that proto.
                    t.values = t.values
                base, n = t.name, 1
                while f"{base}__{n}" in taken:
                    n += 1
                t.name = f"{base}__{n}"
                owners[t.name] = id(t)
                taken.add(t.name)
                renamed += 1
    return renamed


#: Attribute of an imported ``gs.Graph`` holding the default values of graph inputs that are also
#: initializers (overridable initializers, IR >= 4), restored by ``export_graph``.
_INPUT_DEFAULTS = "_onnxopt_input_defaults"


def _defined(g: onnx.GraphProto) -> set[str]:
    """The names ``g`` itself defines: its inputs, initializers and node outputs."""
    return ({i.name for i in g.input} | {t.name for t in g.initializer}
            | {t.values.name for t in g.sparse_initializer}
            | {o for node in g.node for o in node.output if o})


def _shadowing(graph: onnx.GraphProto, visible: frozenset[str] = frozenset()) -> bool:
    """Whether a subgraph of ``graph`` defines a name an enclosing graph defines too."""
    defined = _defined(graph)
    if defined & visible:
        return True
    inner = visible | defined
    return any(_shadowing(sub, inner) for node in graph.node for sub in subgraph_protos(node))


def subgraph_protos(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs of ``node``'s attributes, in attribute order."""
    return [g for attr in node.attribute for g in (
        [attr.g] if attr.type == onnx.AttributeProto.GRAPH else
        attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else [])]


def _free(g: onnx.GraphProto) -> set[str]:
    """The names ``g`` (and the graphs nested in it) read from enclosing graphs."""
    used = {n for node in g.node for n in node.input if n} | {o.name for o in g.output}
    used |= {n for node in g.node for sub in subgraph_protos(node) for n in _free(sub)}
    return used - _defined(g)


def unshadow(model: onnx.ModelProto) -> int:
    """Make, in place, the names a subgraph defines distinct from its enclosing graphs' names,
    computing what onnxruntime computes; return how many were renamed or dropped.

    A name a subgraph defines (input, initializer, node output) that an enclosing graph defines
    too means the subgraph's own value there: it is renamed, with its uses in that subgraph and
    the graphs nested in it (onnx-graphsurgeon's import shares tensors by name across scopes and
    would read the outer value). One exception, measured on onnxruntime 1.32 and onnx's
    ``ReferenceEvaluator`` alike: an outer value that one subgraph of a node reads (an implicit
    input of the If) is fed to all of the node's subgraphs and takes the place of a sibling's
    own initializer of that name for the sibling's node reads -- that initializer is dropped,
    so the sibling reads the outer value as the runtimes do; where the sibling returns it as an
    output, onnxruntime returns the sibling's own value: it is kept, renamed, for the output
    only. The main graph keeps its names.
    """
    from onnxopt.names import NameAuthority  # names imports this module

    fresh = NameAuthority({n for g in graph_protos(model.graph) for n in itertools.chain(
        _defined(g), (i for node in g.node for i in node.input))}).fresh
    changed = 0

    def walk(g: onnx.GraphProto, visible: frozenset[str], mapping: dict[str, str],
             fed: set[str]) -> None:
        nonlocal changed
        overridden = [t for t in g.initializer if t.name in fed and t.name in visible]
        for t in overridden:  # an implicit input of the owning node replaces it for node reads
            returned = [o for o in g.output if o.name == t.name]
            if returned:  # ... but the branch returns its own initializer (onnxruntime 1.32)
                t.name = fresh(t.name)
                for o in returned:
                    o.name = t.name
            else:
                g.initializer.remove(t)
            changed += 1
        defined = _defined(g)
        mapping = {k: v for k, v in mapping.items() if k not in defined}
        for name in sorted(defined & visible):
            mapping[name] = fresh(name)
            changed += 1
        # what each node's subgraphs read from outside, before any renaming below
        implicit = [set().union(*map(_free, subgraph_protos(node))) for node in g.node]

        def rename(value: str) -> str:
            return mapping.get(value, value)

        for v in itertools.chain(g.input, g.output, g.value_info):
            v.name = rename(v.name)
        for t in g.initializer:
            t.name = rename(t.name)
        for t in g.sparse_initializer:
            t.values.name = rename(t.values.name)
            t.indices.name = rename(t.indices.name)
        for node in g.node:
            node.input[:] = [rename(i) if i else i for i in node.input]
            node.output[:] = [rename(o) if o else o for o in node.output]
        inner = visible | defined
        for node, fed_here in zip(g.node, implicit):
            for sub in subgraph_protos(node):
                walk(sub, inner, mapping, fed_here)

    walk(model.graph, frozenset(), {}, set())
    return changed


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import ``model`` into onnx-graphsurgeon, make tensor names unique across scopes and lower
    its Constant nodes to initializers.

    From IR version 4, a graph input that is also an initializer is a value the caller may
    override: it is imported as a plain input (a ``gs.Variable``, so no pass treats it as
    constant) and its initializer is put back by ``export_graph``. Before IR version 4 every
    initializer had to be listed as an input, and the listing means nothing (onnxruntime does not
    let such inputs be fed): they are imported as constants, and ``export_graph`` lists the
    initializers as inputs again (ONNX IR spec, docs/IR.md, "Graphs").

    Raises:
        UnsupportedModel: a graph input or output has a type onnx-graphsurgeon cannot represent
            (optional, map).
    """
    for g in graph_protos(model.graph):
        for v in list(g.input) + list(g.output):
            kind = v.type.WhichOneof("value")
            if kind not in ("tensor_type", "sequence_type", "sparse_tensor_type", None):
                raise UnsupportedModel(f"graph '{g.name}' {('input', 'output')[v in g.output]} "
                                 f"'{v.name}' has {kind.replace('_', ' ')}, which onnxopt does "
                                 "not support yet")
    input_names = {i.name for i in model.graph.input}
    defaults = [init for init in model.graph.initializer if init.name in input_names]
    # A value_info entry naming a graph input or output wins over the input's or output's own
    # type in onnx-graphsurgeon's import; it may say less (no shape), or something else.
    def declared(g: onnx.GraphProto) -> set[str]:
        return {i.name for i in g.input} | {o.name for o in g.output}

    shadowing = any(any(v.name in names for v in g.value_info)
                    for g in graph_protos(model.graph) if (names := declared(g)))
    scoped = _shadowing(model.graph)  # a subgraph redefining an outer name (renamed below)
    if defaults or shadowing or scoped:
        stripped = onnx.ModelProto()
        stripped.CopyFrom(model)
        if scoped:
            unshadow(stripped)
        for g in graph_protos(stripped.graph):
            names = declared(g)
            kept = [v for v in g.value_info if v.name not in names]
            if len(kept) != len(g.value_info):
                del g.value_info[:]
                g.value_info.extend(kept)
        if defaults and model.ir_version < 4:  # listed because IR 3 required it: constants
            names = {init.name for init in defaults}
            real = [i for i in stripped.graph.input if i.name not in names]
            del stripped.graph.input[:]
            stripped.graph.input.extend(real)
            defaults = []
        elif defaults:
            keep = [init for init in stripped.graph.initializer if init.name not in input_names]
            del stripped.graph.initializer[:]
            stripped.graph.initializer.extend(keep)
        model = stripped
    graph = gs.import_onnx(model)
    folder = external.current_folder()
    if folder is not None:
        external.attach(graph, folder)
    setattr(graph, _INPUT_DEFAULTS, defaults)
    make_names_unique(graph)
    lower_constant_nodes(graph)
    return graph


def _shared_constants(graph: gs.Graph) -> set[str]:
    """Names of initializers read by nodes of more than one graph (an outer scope and a subgraph)."""
    users: dict[str, set[int]] = collections.defaultdict(set)
    objects: dict[str, set[int]] = collections.defaultdict(set)
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    users[t.name].add(id(g))
                    objects[t.name].add(id(t))
    return {name for name, gids in users.items() if len(gids) > 1 and len(objects[name]) == 1}


def _hoist_outer_initializers(main: onnx.GraphProto, names: set[str]) -> None:
    """Move initializers that subgraphs read from an outer scope up to the main graph.

    onnx-graphsurgeon exports an outer-scope constant as an initializer of every subgraph that reads
    it, which copies the weight once per branch. A main-graph initializer is visible in every
    subgraph, so one copy there is enough.
    """
    if not names:
        return
    present = {init.name for init in main.initializer}
    for sub in list(graph_protos(main))[1:]:
        keep = []
        for init in sub.initializer:
            if init.name not in names:
                keep.append(init)
            elif init.name not in present:
                main.initializer.append(init)
                present.add(init.name)
        if len(keep) != len(sub.initializer):
            del sub.initializer[:]
            sub.initializer.extend(keep)


def _strip_value_info(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_value_info(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _strip_value_info(g)


def export_graph(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` to a ModelProto carrying ``template``'s IR version, opsets and metadata.

    Nodes are sorted topologically (subgraphs too). Intermediate value_info is dropped. Before
    IR version 4, the main graph's initializers are listed as inputs too, as that IR requires.
    """
    graph.toposort(recurse_subgraphs=True)
    external.restore_references(graph)
    model = gs.export_onnx(graph, do_type_check=False)
    external.fill_spilled(model)
    model.graph.initializer.extend(getattr(graph, _INPUT_DEFAULTS, []))
    _hoist_outer_initializers(model.graph, _shared_constants(graph))
    _strip_value_info(model.graph)
    model.ir_version = template.ir_version
    if model.ir_version < 4:
        listed = {i.name for i in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            for init in model.graph.initializer if init.name not in listed)
    known = {op.domain: op.version for op in model.opset_import}
    for op in template.opset_import:
        known[op.domain] = max(known.get(op.domain, 0), op.version) if op.domain in known else op.version
    del model.opset_import[:]
    for domain, version in sorted(known.items()):
        model.opset_import.add(domain=domain, version=version)
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    return model


def opset_version(graph: gs.Graph) -> int:
    """The default-domain (ai.onnx) opset the graph's model imports."""
    for imp in graph.import_domains or []:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return graph.opset


@dataclass
class ModelStats:
    """Size of a model: nodes by op type (main graph and in total), parameters and bytes."""

    nodes: int
    nodes_total: int
    op_counts: dict[str, int]
    subgraphs: int
    parameters: int
    parameter_bytes: int
    file_bytes: int
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Yield ``graph`` and every GraphProto nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for sub in subgraph_protos(node):
            yield from graph_protos(sub)


def describe_value_infos(values) -> list[dict]:
    """Name, dtype name and shape (ints, dim_param strings or None) of ValueInfoProtos."""
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = None
        if t.HasField("shape"):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None
        out.append({"name": v.name, "dtype": dtype, "shape": shape})
    return out


def model_stats(model: onnx.ModelProto, serialized: bytes | None = None) -> ModelStats:
    """Count the nodes, op types, subgraphs and parameters of ``model``.

    Parameters are the elements of initializers and of Constant node tensors, in every graph.
    ``file_bytes`` is the serialized size of the protobuf plus the external data it refers to:
    pass ``serialized``, the model's serialization, when there is one (measuring costs as much as
    serializing).
    """
    counts: collections.Counter[str] = collections.Counter()
    total = params = param_bytes = 0
    graphs = list(graph_protos(model.graph))
    for g in graphs:
        total += len(g.node)
        for node in g.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        arr_size = int(np.prod(attr.t.dims, dtype=np.int64))
                        params += arr_size
                        param_bytes += arr_size * _itemsize(attr.t.data_type)
        for init in g.initializer:
            arr_size = int(np.prod(init.dims, dtype=np.int64))
            params += arr_size
            param_bytes += arr_size * _itemsize(init.data_type)
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] += 1
    return ModelStats(
        nodes=len(model.graph.node), nodes_total=total, op_counts=dict(sorted(counts.items())),
        subgraphs=len(graphs) - 1, parameters=params, parameter_bytes=param_bytes,
        file_bytes=(_proto_bytes(model) if serialized is None else len(serialized))
        + external.external_bytes(model),
        inputs=describe_value_infos(model.graph.input),
        outputs=describe_value_infos(model.graph.output))


def _proto_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of ``model``; past the 2 GiB protobuf limit, where ``ByteSize`` fails, the
    sum of its tensors' sizes (the rest is negligible there)."""
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 -- protobuf raises EncodeError or ValueError past 2 GiB
        return sum(t.ByteSize() for t in external.all_tensors(model))


def _itemsize(data_type: int) -> int:
    if data_type == onnx.TensorProto.STRING:
        return 0
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError):
        return 1


def _state(obj: object) -> dict[str, tuple[object, object]]:
    """``obj``'s attributes, each with a copy of its contents when it is a container (so that
    an edit made in place can be undone in place)."""
    return {k: (v, copy.copy(v) if isinstance(v, (list, dict, set)) else v)
            for k, v in vars(obj).items()}


def _restore(obj: object, cls: type, saved: dict[str, tuple[object, object]]) -> None:
    """Put back what :func:`_state` saved, into the same container objects (closures and other
    objects that hold one see the restored contents). Lists are restored with raw list
    operations: gs's synchronized lists would otherwise edit the linked tensors and nodes."""
    if obj.__class__ is not cls:
        obj.__class__ = cls  # gs's Tensor.to_variable / to_constant change the class in place
    current = vars(obj)
    for k in [k for k in current if k not in saved]:
        del current[k]
    for k, (value, contents) in saved.items():
        if value is not contents:
            if isinstance(value, list):
                list.clear(value)
                list.extend(value, contents)
            else:
                value.clear()
                value.update(contents)
        current[k] = value


#: How deep :func:`edits_undone` follows an owner's attributes into the plain objects they hold
#: (an owner's dict of plans, each plan's tensors).
_OWNER_DEPTH = 2


def _held(value: object, found: dict[int, object], depth: int, seen: set[int]) -> None:
    """Add to ``found`` the graph objects (nodes, tensors) and, ``depth`` levels deep, the plain
    objects that ``value`` holds, through lists, tuples, sets and dicts."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _held(item, found, depth, seen)
    elif isinstance(value, dict):
        for key, item in value.items():
            _held(key, found, depth, seen)
            _held(item, found, depth, seen)
    elif isinstance(value, (gs.Tensor, gs.Node)):
        found.setdefault(id(value), value)
    elif (depth > 0 and hasattr(value, "__dict__") and not callable(value)
          and not isinstance(value, (gs.Graph, np.ndarray, types.ModuleType))):
        found.setdefault(id(value), value)
        for item in vars(value).values():
            _held(item, found, depth - 1, seen)


@contextlib.contextmanager
def edits_undone(graph: gs.Graph, owners: Iterable[object] = ()) -> Iterator[gs.Graph]:
    """Undo, on leaving the block, every edit made inside it to ``graph``: its nodes, inputs and
    outputs, every subgraph, node (attributes, links) and tensor (values, dtype, shape, links,
    class) that existed on entering, the name authority (``onnxopt.names``: a name handed out
    inside is handed out again after), and the attributes of ``owners`` (the passes whose
    ``Proposal.apply`` functions keep state) with the nodes, tensors and plain objects they hold
    (:data:`_OWNER_DEPTH` levels deep: a pass's plans, a tensor it made before the block and
    links inside it). Nodes and tensors created inside are dropped, and unlinked from any
    tensor that outlives the block.

    The drift budget applies a set of proposals for real, exports the model and measures it,
    then comes back here (:meth:`onnxopt.budget.DriftBudget.decide`, ``trial``). Values are not
    copied: an edit must replace an array, never write into one (no pass does).
    """
    from onnxopt.names import _ATTR as names_attr

    found: dict[int, object] = {}
    for g in iter_graphs(graph):
        found[id(g)] = g
        authority = vars(g).get(names_attr)
        if authority is not None:
            found[id(authority)] = authority
        for node in g.nodes:
            found[id(node)] = node
        for t in g.tensors().values():
            found[id(t)] = t
    seen: set[int] = set()
    for owner in owners:
        found[id(owner)] = owner
        for value in vars(owner).values():
            _held(value, found, _OWNER_DEPTH, seen)
    saved = [(obj, obj.__class__, _state(obj)) for obj in found.values()]
    try:
        yield graph
    finally:
        # a node made inside may be linked to a tensor nobody listed (made before the block,
        # held by a closure only): unlink it there, by identity
        for g in iter_graphs(graph):
            for node in g.nodes:
                if id(node) in found:
                    continue
                for t in node.inputs:
                    if id(t) not in found:
                        list.__init__(t.outputs, [n for n in t.outputs if n is not node])
                for t in node.outputs:
                    if id(t) not in found:
                        list.__init__(t.inputs, [n for n in t.inputs if n is not node])
        for obj, cls, state in saved:
            _restore(obj, cls, state)
