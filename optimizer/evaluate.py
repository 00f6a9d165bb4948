"""Evaluating single nodes in onnxruntime, for constant folding: the value is what the runtime
would have computed (one-thread sessions: a thread pool per folded node would cost more than the
node)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from onnxopt.validate import session_options


def evaluate_node(node: gs.Node, graph: gs.Graph, values: list[np.ndarray | None] | None = None
              ) -> list[np.ndarray]:
    """Run one node in onnxruntime and return its outputs.

    Args:
        node: the node (no subgraphs); ``graph`` gives the opsets and IR version to run it at.
        values: one array per input slot (None for an omitted one); by default the values of
            the node's constant inputs.

    Raises:
        Exception: whatever onnxruntime raises when it rejects the node (callers leave the
            node to the runtime).
    """
    if values is None:
        values = [None if t.is_empty() else np.asarray(t.values) for t in node.inputs]
    proto = OnnxExporter.export_node(node)
    inputs, feeds = [], {}
    for i, value in enumerate(values):
        if value is None:
            proto.input[i] = ""
            continue
        # one name per slot: the same tensor may fill several slots with different index arrays
        proto.input[i] = name = f"in{i}"
        inputs.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
        feeds[name] = value
    outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in proto.output if name]
    model = onnx.helper.make_model(
        onnx.helper.make_graph([proto], "fold", inputs, outputs),
        opset_imports=list(graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)]))
    model.ir_version = min(graph.ir_version or onnx.IR_VERSION, onnx.IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads=1),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
