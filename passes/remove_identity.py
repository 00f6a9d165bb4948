"""Identity removal: drop ``Identity`` and inference-mode ``Dropout`` nodes.

At inference, ``Dropout`` (ONNX spec, opsets 1-22) returns its input unchanged: when
``training_mode`` is omitted or a constant false, ``output = data``. Its optional ``mask`` output
must be unused for the node to go. Consumers are rewired to the input; when the removed node
produces a graph output, the producer of its input is renamed so the output keeps its name (see
``onnxopt.edit.bypass``).

Statistics: ``rewritten`` (nodes removed), ``by_kind`` (``Identity``, ``Dropout``) and
``refused`` per reason: a Dropout that may be in training mode or whose mask is read or is a
graph output; a graph output whose name cannot be kept (the input is a graph input, a graph
output too, an initializer or an outer-scope tensor).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.edit import bypass, constant_value
from onnxopt.pass_manager import register
from onnxopt.rewrite import Refusal, RewritePass, Scope, refuse


def _dropout_refusal(node: gs.Node, scope: Scope) -> Refusal | None:
    """Why a Dropout is not an identity at inference, or None."""
    if len(node.inputs) >= 3 and not node.inputs[2].is_empty():
        mode = constant_value(node.inputs[2])
        if mode is None or bool(np.asarray(mode).any()):
            return refuse("training mode may be on")
    if node.attrs.get("is_test", 1) == 0 and "is_test" in node.attrs:
        return refuse("training mode may be on")
    for mask in node.outputs[1:]:
        if not mask.is_empty() and mask.outputs:
            return refuse("mask is read")
        if scope.is_output(mask):
            return refuse("mask is a graph output")
    return None


@register
class RemoveIdentity(RewritePass):
    name = "remove_identity"
    description = "Remove Identity and inference-mode Dropout nodes."
    ops = ("Identity", "Dropout")

    def match(self, node: gs.Node, scope: Scope) -> Refusal | bool | None:
        if not node.inputs:
            return None
        if node.op == "Dropout":
            return _dropout_refusal(node, scope) or True
        return True

    def rewrite(self, node: gs.Node, match: bool, scope: Scope) -> str | Refusal:
        if not bypass(scope.graph, node, node.inputs[0], node.outputs[0]):
            return refuse("graph output name cannot be kept")
        return node.op
