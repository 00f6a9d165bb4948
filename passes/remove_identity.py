"""Identity removal: drop ``Identity`` and inference-mode ``Dropout`` nodes.

At inference, ``Dropout`` (ONNX spec, opsets 1-22) returns its input unchanged: when
``training_mode`` is omitted or a constant false, ``output = data``. Its optional ``mask`` output
must be unused for the node to go. Consumers are rewired to the input; when the removed node
produces a graph output, the producer of its input is renamed so the output keeps its name (see
``onnxopt.edit.bypass``).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.graph import iter_graphs
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.edit import bypass, constant_value, drop_disconnected
from onnxopt.ops import is_default_domain


def _is_inference_dropout(node: gs.Node) -> bool:
    if len(node.inputs) >= 3 and not node.inputs[2].is_empty():
        mode = constant_value(node.inputs[2])
        if mode is None or bool(np.asarray(mode).any()):
            return False
    if node.attrs.get("is_test", 1) == 0 and "is_test" in node.attrs:
        return False
    mask = node.outputs[1:] if len(node.outputs) > 1 else []
    return all(m.is_empty() or not m.outputs for m in mask)


@register
class RemoveIdentity(Pass):
    name = "remove_identity"
    description = "Remove Identity and inference-mode Dropout nodes."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for g in iter_graphs(graph):
            for node in list(g.nodes):
                if not is_default_domain(node) or not node.inputs or not node.outputs:
                    continue
                if node.op == "Identity" or (node.op == "Dropout" and _is_inference_dropout(node)):
                    graph_outputs = {id(t) for t in g.outputs}
                    mask = node.outputs[1] if len(node.outputs) > 1 else None
                    if mask is not None and id(mask) in graph_outputs:
                        continue
                    if bypass(g, node, node.inputs[0], node.outputs[0]):
                        removed += 1
            drop_disconnected(g)
        return PassResult(removed > 0, {"nodes_removed": removed})
