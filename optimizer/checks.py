"""Sanity checks of a loaded model, run before any pass or onnxruntime session sees it.

A model that breaks the ONNX IR's rules (onnx/docs/IR.md) makes the passes or onnxruntime fail
deep inside with a message about something else ("Cycle detected in graph!", "Duplicate
definition-site"), or silently computes something else. These checks name the problem instead,
in one line, as a :class:`onnxopt.errors.ModelLoadError` (exit 2):

* the IR version or an ONNX opset is newer than the installed ``onnx`` knows;
* a graph (or subgraph) declares an input twice, or defines a tensor twice (two nodes writing
  it, or a node writing a graph input or an initializer): the IR's single static assignment
  rule, which ``onnx.checker`` and onnxruntime enforce too. A tensor listed twice as a graph
  *output* breaks no rule (both accept it, one value read twice) and is optimized as it is;
* the nodes of a graph form a cycle (a subgraph's reads of outer values count as its node's);
* with validation, a node of a custom domain whose op onnxruntime does not know (no schema, no
  kernel, no model-local function): validation cannot run, the passes would leave the node as
  it is.
"""

from __future__ import annotations

import functools
from typing import Iterator

import onnx

from onnxopt.errors import ModelLoadError

#: Domains whose ops are defined by ONNX itself (checked against the installed ``onnx``).
_ONNX_DOMAINS = {"": onnx.defs.onnx_opset_version, "ai.onnx": onnx.defs.onnx_opset_version,
                 "ai.onnx.ml": onnx.defs.onnx_ml_opset_version}


def check_model_structure(model: onnx.ModelProto, source: str, *, validating: bool = False
                          ) -> None:
    """Raise ModelLoadError when ``model`` cannot be optimized (or, with ``validating``,
    validated on onnxruntime) as it is.

    Args:
        model: the loaded model (external data need not be loaded: tensors are not read).
        source: what the message names: the model's path, or ``<memory>``.
        validating: the model is about to run on onnxruntime (validation): refuse ops of custom
            domains onnxruntime does not know.

    Raises:
        ModelLoadError: a one-line message naming the version, opset, tensor or node at fault.
    """
    _check_versions(model, source)
    for graph, where in _graphs(model.graph, ""):
        _check_definitions(graph, source, where)
        _check_acyclic(graph, source, where)
    if validating:
        _check_known_to_onnxruntime(model, source)


def _graphs(graph: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.GraphProto, str]]:
    """``graph`` and its subgraphs, depth first, each with the words placing it in a message
    ("" for the main graph, `` in subgraph 'then_branch' of node 'if0'`` for the others)."""
    yield graph, where
    for node in graph.node:
        for attribute, sub in _subgraphs(node):
            yield from _graphs(sub, f" in subgraph '{attribute}' of node '{node.name}'")


def _check_versions(model: onnx.ModelProto, source: str) -> None:
    installed = f"the installed onnx {onnx.__version__}"
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(f"{source}: IR version {model.ir_version} is newer than "
                             f"{installed} supports ({onnx.IR_VERSION}); upgrade onnx")
    for opset in model.opset_import:
        newest = _ONNX_DOMAINS.get(opset.domain)
        if newest is not None and opset.version > newest():
            raise ModelLoadError(f"{source}: opset {opset.version} of domain "
                                 f"{opset.domain or 'ai.onnx'} is newer than {installed} "
                                 f"supports ({newest()}); upgrade onnx")


def _node(node: onnx.NodeProto) -> str:
    return (f"node '{node.name}' ({node.op_type})" if node.name
            else f"an unnamed {node.op_type} node")


def _check_definitions(graph: onnx.GraphProto, source: str, where: str) -> None:
    """Each input declared once; each tensor defined once (an initializer may also be declared
    as an input: its default value)."""
    defined: dict[str, str] = {}
    for v in graph.input:
        if v.name in defined:
            raise ModelLoadError(f"{source}: graph input '{v.name}' is declared twice{where}")
        defined[v.name] = "a graph input"
    for init in graph.initializer:
        if defined.get(init.name, "a graph input") != "a graph input":
            raise ModelLoadError(f"{source}: initializer '{init.name}' is declared twice{where}")
        defined.setdefault(init.name, "an initializer")
    for node in graph.node:
        for name in filter(None, node.output):
            if name in defined:
                raise ModelLoadError(f"{source}: tensor '{name}' is written by {_node(node)} "
                                     f"and is also {defined[name]}{where}")
            defined[name] = f"the output of {_node(node)}"


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The names ``graph`` (with its own subgraphs) reads from enclosing graphs."""
    own = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    own.update(o for n in graph.node for o in n.output)
    reads = {i for n in graph.node for i in n.input if i}
    reads.update(name for n in graph.node for _, sub in _subgraphs(n)
                 for name in _outer_reads(sub))
    reads.update(o.name for o in graph.output)
    return reads - own


def _subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """``(attribute name, graph)`` of every graph in ``node``'s attributes (If branches, Loop
    and Scan bodies)."""
    return [(a.name, g) for a in node.attribute
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                      a.graphs if a.type == onnx.AttributeProto.GRAPHS else [])]


def _check_acyclic(graph: onnx.GraphProto, source: str, where: str) -> None:
    """Kahn's algorithm over the nodes (in any order: sorting is the passes' business); what
    is left over lies on or behind a cycle, which the message walks back to name."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    reads = [[name for name in (*n.input, *(r for _, s in _subgraphs(n) for r in _outer_reads(s)))
              if name in producer] for n in graph.node]
    waiting = [len(r) for r in reads]
    readers: dict[int, list[int]] = {}
    for i, names in enumerate(reads):
        for name in names:
            readers.setdefault(producer[name], []).append(i)
    ready = [i for i, w in enumerate(waiting) if not w]
    for i in ready:  # grows while iterated
        for reader in readers.get(i, []):
            waiting[reader] -= 1
            if not waiting[reader]:
                ready.append(reader)
    if len(ready) == len(graph.node):
        return
    # Walk back from a node left over through inputs whose producers are left over too: the
    # walk must come back to a node it passed, which closes the cycle.
    done = set(ready)
    path: list[tuple[int, str]] = []
    node = next(i for i in range(len(graph.node)) if i not in done)
    while node not in [p for p, _ in path]:
        name = next(name for name in reads[node] if producer[name] not in done)
        path.append((node, name))
        node = producer[name]
    cycle = path[[p for p, _ in path].index(node):]
    steps = ", which".join(f" reads '{name}' from {_node(graph.node[producer[name]])}"
                           for _, name in cycle)
    raise ModelLoadError(f"{source}: the graph has a cycle{where}: "
                         f"{_node(graph.node[node])}{steps}")


@functools.cache
def _onnxruntime_ops() -> frozenset[tuple[str, str]]:
    """(domain, op) pairs onnxruntime has a schema or a kernel for, from the listings of its
    pybind module (``onnxruntime.capi``: not a public API, hence the care); empty when this build does not have
    them (onnxruntime's own load error then tells)."""
    from onnxruntime.capi import _pybind_state as ort_c

    schemas = getattr(ort_c, "get_all_operator_schema", list)()
    kernels = getattr(ort_c, "get_all_opkernel_def", list)()
    return frozenset({(s.domain, s.name) for s in schemas}
                     | {(k.domain, k.op_name) for k in kernels})


def _check_known_to_onnxruntime(model: onnx.ModelProto, source: str) -> None:
    known = _onnxruntime_ops()
    if not known:
        return
    known = known | {(f.domain, f.name) for f in model.functions}
    for graph, where in _graphs(model.graph, ""):
        for node in graph.node:
            domain = node.domain
            if domain.startswith("ai.onnx") or not domain or (domain, node.op_type) in known:
                continue
            raise ModelLoadError(
                f"{source}: validation cannot run: onnxruntime does not know op "
                f"'{node.op_type}' of domain '{domain}' ({_node(node)}{where}); "
                "--no-validate (validate=False) writes the optimized model without validation, "
                "leaving such nodes as they are")
