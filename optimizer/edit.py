"""Reading and editing the in-memory graph: constants, readers, rewiring, removal, ordering.

These are the verbs every pass uses on onnx-graphsurgeon's Graph/Node/Tensor objects. A tensor's
``inputs`` are its producers and its ``outputs`` its readers (onnx-graphsurgeon's convention), in
any scope: a subgraph node reading an outer-scope value is among that value's readers.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.names import fresh_name


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


def clip_bounds(node: gs.Node) -> tuple[float | None | str, float | None | str]:
    """A Clip's ``(min, max)``, from its attributes (opsets 6-10) or its inputs 1 and 2 (opset
    11 on): each a float, None when not given (unbounded), or ``"unknown"`` when given by an
    input that is not a one-element initializer."""
    def bound(attr: str, index: int) -> float | None | str:
        if attr in node.attrs:
            return float(node.attrs[attr])
        if len(node.inputs) <= index or node.inputs[index].is_empty():
            return None
        value = constant_value(node.inputs[index])
        if value is None or np.asarray(value).size != 1:
            return "unknown"
        return float(np.asarray(value).ravel()[0])
    return bound("min", 1), bound("max", 2)


def numpy_dtype(tensor: gs.Tensor) -> np.dtype:
    """The numpy dtype of a tensor with a known type, also for the ONNX types onnx-graphsurgeon
    gives as the ONNX type number (bfloat16, float8: ml_dtypes' types)."""
    if isinstance(tensor.dtype, int):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.dtype))
    return np.dtype(tensor.dtype)


def nbytes(tensor: gs.Constant) -> int:
    """Size of an initializer's data in bytes (without loading lazily stored values)."""
    return int(np.prod(tensor.shape, dtype=np.int64)) * numpy_dtype(tensor).itemsize


def input_slots(tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
    """Every (reader node, input index) reading ``tensor``, in any graph or subgraph, each once
    (``tensor.outputs`` lists a node once per input it reads ``tensor`` at), in the order
    onnx-graphsurgeon linked them."""
    nodes = {id(node): node for node in tensor.outputs}.values()
    return [(node, i) for node in nodes for i, t in enumerate(node.inputs) if t is tensor]


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



def onnx_dtype(dtype) -> int:
    """The ONNX TensorProto data type of a numpy dtype."""
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))



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



def constant_refusal(t: gs.Tensor, what: str) -> str | None:
    """Why ``t`` cannot be read as a dense initializer (``what`` names it), or None."""
    if not isinstance(t, gs.Constant):
        return f"{what} is not an initializer"
    if not isinstance(t.values, np.ndarray):
        return f"{what} is a sparse initializer"
    return None




#: The branch attributes of If (ONNX spec, opsets 1-21).
IF_BRANCHES = ("then_branch", "else_branch")


def if_branches(node: gs.Node) -> tuple[gs.Graph, gs.Graph] | None:
    """The ``(then_branch, else_branch)`` of an If when both are well formed -- graphs without
    inputs, with as many outputs as the If -- else None."""
    branches = tuple(node.attrs.get(attr) for attr in IF_BRANCHES)
    if all(isinstance(b, gs.Graph) and not b.inputs and len(b.outputs) == len(node.outputs)
           for b in branches):
        return branches
    return None
