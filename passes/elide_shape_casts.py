"""Shape-cast elision: drop the int64 -> int32 -> int64 round trip exporters put on shape tensors.

tf2onnx and others compute reshape targets as ``Shape(x) -> Cast(int32) -> Slice/Concat/...
-> Cast(int64) -> Reshape``. ``Shape`` and ``Size`` return int64 (ONNX spec); the detour through
int32 changes no value as long as every dimension is below 2**31 -- which holds for any tensor a
runtime can allocate (2**31 elements along one axis) and is the same assumption onnx-graphsurgeon's
``fold_constants`` makes when it elides casts on shape tensors. The region between the casts is
limited to ops that move values without arithmetic (Slice, Concat, Gather, Squeeze, Unsqueeze,
Reshape, Flatten, Identity), so computing it in int64 gives exactly the same numbers.

The rewrite: the first Cast is bypassed (the region reads the int64 shape), the region's tensors
are renamed (their dtype changes, so a name would otherwise stand for two different values), int32
initializers the region concatenates become int64 copies, and the closing Casts to int64 are
bypassed. It applies
only when every tensor the region produces is read by region ops or by ``Cast(to=int64)`` of the
same graph, never by anything else, from a subgraph, or as a graph output (their dtype would
change). Main graph and subgraphs alike.

Statistics: ``rewritten`` (round trips removed: each the Cast to int32 and the Casts back to
int64 it reaches) and ``refused`` per reason (how the int32 values escape the region).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxopt.edit import bypass
from onnxopt.ops import is_default_domain
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse

_INT32, _INT64 = onnx.TensorProto.INT32, onnx.TensorProto.INT64
#: Ops that move shape values without arithmetic, and the input index that carries the values.
_MOVERS = {"Slice": (0,), "Gather": (0,), "Squeeze": (0,), "Unsqueeze": (0,), "Reshape": (0,),
           "Flatten": (0,), "Identity": (0,), "Concat": None}


def _is_cast(node: gs.Node, to: int) -> bool:
    return node.op == "Cast" and is_default_domain(node) and node.attrs.get("to") == to


@dataclass
class _Region:
    """The nodes between a Cast to int32 of a Shape and the Casts back to int64.

    Attributes:
        movers: the region's nodes (ops of ``_MOVERS``).
        constants: ``(Concat, int32 initializer it reads)`` pairs.
        closing: the Casts to int64 reading the region.
    """

    movers: list[gs.Node]
    constants: list[tuple[gs.Node, gs.Constant]]
    closing: list[gs.Node]


def _region(seed: gs.Node, scope: Scope) -> _Region | Refusal:
    """The region of ``seed`` (a Cast to int32 of a Shape), or why it is refused."""
    movers, constants, closing = [], [], []
    frontier, seen = [seed.outputs[0]], set()
    while frontier:
        t = frontier.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if scope.is_output(t):
            return refuse("int32 tensor is a graph output")
        for node in t.outputs:
            if not any(node is n for n in scope.graph.nodes):
                return refuse("int32 tensor read in another graph")
            if _is_cast(node, _INT64):
                closing.append(node)
                continue
            if node.op not in _MOVERS or not is_default_domain(node):
                return refuse(f"int32 tensor read by {node.op}")
            slots = _MOVERS[node.op]
            for i, inp in enumerate(node.inputs):
                if inp is t and slots is not None and i not in slots:
                    return refuse(f"int32 tensor read as an index of {node.op}")
            if node.op == "Concat":
                for inp in node.inputs:
                    if inp is t or id(inp) in seen:
                        continue
                    if isinstance(inp, gs.Constant) and np.dtype(inp.dtype) == np.int32:
                        constants.append((node, inp))
                    elif not (inp.inputs and any(inp.inputs[0] is n for n in movers + [seed])):
                        return refuse("Concat mixes in another int32 tensor")
            if not any(node is n for n in movers):
                movers.append(node)
                frontier.extend(node.outputs)
    return _Region(movers, constants, closing)


@register
class ElideShapeCasts(RewritePass):
    name = "elide_shape_casts"
    description = "Remove int64->int32->int64 cast round trips around shape computations."
    ops = ("Cast",)

    def match(self, node: gs.Node, scope: Scope) -> _Region | Refusal | None:
        if node.attrs.get("to") != _INT32 or not node.inputs:
            return None
        producer = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        if producer is None or producer.op not in ("Shape", "Size"):
            return None
        return _region(node, scope)

    def rewrite(self, node: gs.Node, region: _Region, scope: Scope) -> None:
        # The seed's output is not a graph output (checked), so the bypass succeeds.
        bypass(scope.graph, node, node.inputs[0], node.outputs[0])
        for mover in region.movers:  # a tensor whose dtype changes gets a new name
            for t in mover.outputs:
                t.name, t.dtype = scope.fresh(f"{t.name}_int64"), np.int64
        for concat, const in region.constants:
            wide = gs.Constant(scope.fresh(f"{const.name}_int64"),
                               np.asarray(const.values).astype(np.int64))
            for i, t in enumerate(concat.inputs):
                if t is const:
                    concat.inputs[i] = wide
        for cast in region.closing:
            bypass(scope.graph, cast, cast.inputs[0], cast.outputs[0])
