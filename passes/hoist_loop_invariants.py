"""Loop-carried values that no iteration changes become outer-scope values of the body.

ONNX spec, Loop (opset 1+): the inputs ``M, cond, v_initial...`` (N loop-carried values) bind to
the body's inputs ``iteration_num, condition, v_in...``; the body returns ``condition,
v_out..., scan_outputs...``, each ``v_out`` becoming the next iteration's ``v_in`` and, after the
last one, the Loop's output ``v_final`` (then the K scan outputs). Scan (opset 9+) does the same
with its N state variables: inputs ``initial_state..., scan_inputs...`` bind to body inputs
``state..., scan_elements...``, the body returns ``state..., scan_outputs...``, the Scan returns
``final_state..., scan_outputs...``. A body that returns a carried value unchanged (its
``v_out`` is its ``v_in``, or an Identity of it) carries the same value through every iteration:
it equals ``v_initial`` in each of them and after the last one (also after zero iterations).
Exporters do this with weights: paddle2onnx passes every weight a decoder loop reads as a
loop-carried value (PP-Structure's SLANet: 16 of its 23).

Such a slot is removed: the body's nodes (and the subgraphs nested in it) read ``v_initial``
directly, as an outer-scope value (ONNX IR, "Names Within a Graph": a subgraph may read the
values of the graphs enclosing it), the readers of ``v_final`` read ``v_initial``, and the slot
goes from the node's inputs and outputs and the body's inputs and outputs. The values computed are
the same; onnxruntime no longer hands the value from one iteration to the next, and the
weight-reading passes (quantization, float16, pruning) see a weight where they saw a body input.

Refused, with the reason: ``v_final`` is an output of the Loop's graph (its name would change),
another body output returns the same ``v_in`` (a subgraph output may not be an outer-scope value
in onnxruntime), a value of the body (an input, a node output, an initializer) has
``v_initial``'s name (the outer value would be shadowed),
and Scan before opset 9 (its first input is ``sequence_lens``).

Statistics: ``rewritten`` (nodes with slots removed), ``slots_removed``, ``refused``.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import PassContext, register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


def _slots(node: gs.Node, body: gs.Graph, opset: int) -> tuple[int, int, int] | str:
    """``(first node input, first body input, first body output)`` of the carried values (their
    count is the same in each list and starts the node's outputs), or why the node is refused."""
    if node.op == "Loop":
        return 2, 2, 1
    if opset < 9:
        return "Scan before opset 9 (sequence_lens input)"
    return 0, 0, 0


def _returned_unchanged(out: gs.Tensor, b_in: gs.Tensor) -> bool:
    """Whether the body output ``out`` is the body input ``b_in`` or an Identity of it."""
    if out is b_in:
        return True
    return (len(out.inputs) == 1 and out.inputs[0].op == "Identity"
            and out.inputs[0].domain in ("", "ai.onnx", None) and out.inputs[0].inputs[0] is b_in)


def _replace(graphs: list[gs.Graph], new: dict[int, gs.Tensor]) -> None:
    """Let every node of ``graphs`` that reads a tensor whose ``id`` is a key of ``new`` read
    that key's tensor instead."""
    for g in graphs:
        for node in g.nodes:
            for i, t in enumerate(node.inputs):
                if id(t) in new:
                    node.inputs[i] = new[id(t)]


@register
class HoistLoopInvariants(RewritePass):
    name = "hoist_loop_invariants"
    description = ("Loop/Scan-carried values every iteration returns unchanged become "
                   "outer-scope values of the body (one slot fewer per value).")
    ops = ("Loop", "Scan")

    def start(self, graph: gs.Graph, ctx: PassContext) -> None:
        self._removed = 0

    def match(self, node: gs.Node, scope: Scope) -> list[int] | Refusal | None:
        """The carried slots (0-based) whose value no iteration changes, or a refusal."""
        body = node.attrs.get("body")
        if not isinstance(body, gs.Graph):
            return None
        slots = _slots(node, body, scope.opset)
        if isinstance(slots, str):
            return refuse(slots)
        first_in, first_body_in, first_body_out = slots
        carried = (len(node.inputs) - first_in if node.op == "Loop"
                   else len(node.inputs) - node.attrs.get("num_scan_inputs", 0))
        if carried <= 0 or len(body.inputs) < first_body_in + carried \
                or len(body.outputs) < first_body_out + carried \
                or len(node.outputs) < carried:
            return None
        found, refusal = [], None
        names = None
        for j in range(carried):
            v0 = node.inputs[first_in + j]
            b_in, out = body.inputs[first_body_in + j], body.outputs[first_body_out + j]
            if v0.is_empty() or not _returned_unchanged(out, b_in):
                continue
            others = [o for k, o in enumerate(body.outputs) if k != first_body_out + j]
            if any(o is b_in or _returned_unchanged(o, b_in) for o in others):
                refusal = refusal or refuse("another body output returns the same value")
                continue
            if scope.is_output(node.outputs[j]):
                refusal = refusal or refuse("its final value is a graph output")
                continue
            if names is None:  # what the body defines or reads under a name (not the object)
                names = {(t.name, id(t)) for g in iter_graphs(body) for t in [
                    *g.inputs, *(t for n in g.nodes for t in [*n.inputs, *n.outputs])]}
            if any(name == v0.name and key != id(v0) for name, key in names):
                refusal = refusal or refuse("a body value has the outer value's name")
                continue
            found.append(j)
        return found or refusal

    def rewrite(self, node: gs.Node, found: list[int], scope: Scope) -> None:
        body = node.attrs["body"]
        first_in, first_body_in, first_body_out = _slots(node, body, scope.opset)
        inside, outside = {}, {}  # id(replaced tensor) -> the outer value, for all slots
        for j in found:
            v0 = node.inputs[first_in + j]
            inside[id(body.inputs[first_body_in + j])] = v0
            inside[id(body.outputs[first_body_out + j])] = v0
            outside[id(node.outputs[j])] = v0
        _replace(list(iter_graphs(body)), inside)
        everywhere = list(iter_graphs(scope.root))
        _replace(everywhere, outside)
        for g in everywhere:  # a nested graph returning a final value as outer value
            g.outputs = [outside.get(id(o), o) for o in g.outputs]
        for j in sorted(found, reverse=True):  # later slots first: earlier indices stay valid
            del node.inputs[first_in + j]
            del body.inputs[first_body_in + j]
            del body.outputs[first_body_out + j]
            del node.outputs[j]
        self._removed += len(found)

    def extra_stats(self) -> dict[str, int]:
        return {"slots_removed": self._removed}
