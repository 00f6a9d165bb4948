"""Constant folding: evaluate nodes whose inputs are all known, store their outputs as initializers.

A node is foldable when every input is an initializer (or an omitted optional input) and the op is
deterministic; ``Shape`` and ``Size`` are also foldable when their input's shape is fully static
according to ``passes._util.TensorTypes`` (ONNX shape inference from the graph's inputs and
initializers only), in the main graph and in If/Loop/Scan bodies alike.

Values are computed by onnxruntime, one node at a time, so the result is what the runtime would have
computed. A result of ``ctx.fold_size_limit`` bytes (1 MiB by default) or more is materialized only
if it is no larger than the initializers that disappear with the node -- those it alone reads
(e.g. ``Transpose(W)`` of a W used nowhere else); otherwise the node stays symbolic, so that
``ConstantOfShape``/``Tile``/``Expand`` cannot inflate the file. Sequence and optional values are
never folded.

Never folded: random ops, QuantizeLinear/DequantizeLinear (a QDQ pair is the quantized model's
storage format), nodes with subgraphs, and ops of non-default domains.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from optimizer.graph import iter_graphs
from optimizer.pass_manager import Pass, PassContext, PassResult, register
from passes._util import NONDETERMINISTIC_OPS, TensorTypes, is_default_domain, nbytes

_NEVER_FOLD = NONDETERMINISTIC_OPS | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _evaluate(node: gs.Node, graph: gs.Graph) -> list[np.ndarray]:
    """Run one node in onnxruntime with its constant inputs and return its outputs."""
    proto = OnnxExporter.export_node(node)
    inputs, feeds = [], {}
    for t in node.inputs:
        if t.is_empty():
            continue
        value = np.asarray(t.values)
        if t.name not in feeds:
            inputs.append(onnx.helper.make_tensor_value_info(
                t.name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
        feeds[t.name] = value
    outputs = [onnx.helper.make_empty_tensor_value_info(t.name) for t in node.outputs
               if not t.is_empty()]
    model = onnx.helper.make_model(
        onnx.helper.make_graph([proto], "fold", inputs, outputs),
        opset_imports=list(graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)]))
    model.ir_version = min(graph.ir_version or onnx.IR_VERSION, onnx.IR_VERSION)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@register
class FoldConstants(Pass):
    name = "fold_constants"
    description = "Evaluate nodes whose inputs are all constant (and Shape of static shapes)."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        types = TensorTypes(graph, ctx.template)
        folded = refused_size = failed = 0
        for g in iter_graphs(graph):
            outputs = {id(t) for t in g.outputs}
            for node in list(g.nodes):
                if not self._foldable(node, types):
                    continue
                if node.op in ("Shape", "Size") and not isinstance(node.inputs[0], gs.Constant):
                    values = [self._shape_value(node, types.static_shape(node.inputs[0]))]
                else:
                    try:
                        values = _evaluate(node, g)
                    except Exception:  # onnxruntime rejects the node: leave it to the runtime
                        failed += 1
                        continue
                if not all(isinstance(v, np.ndarray) for v in values):
                    continue  # a sequence or optional value: not an initializer
                # Only initializers this node alone reads disappear with it.
                alone = {id(t): t for t in node.inputs
                         if isinstance(t, gs.Constant) and all(n is node for n in t.outputs)}
                consumed = sum(nbytes(t) for t in alone.values())
                produced = sum(v.nbytes for v in values)
                if produced >= ctx.fold_size_limit and produced > consumed:
                    refused_size += 1
                    continue
                live = [t for t in node.outputs if not t.is_empty()]
                if any(id(t) in outputs for t in live):
                    if len(live) != 1:
                        continue
                    node.op, node.domain = "Constant", None
                    node.attrs = {"value": gs.Constant(live[0].name + "__value", values[0])}
                    node.inputs.clear()
                else:
                    for t, v in zip(live, values):
                        t.to_constant(np.asarray(v))
                        t.inputs.clear()
                    node.inputs.clear()
                    node.outputs.clear()
                folded += 1
            g.nodes = [n for n in g.nodes if n.outputs]
        stats = {"nodes_folded": folded}
        if refused_size:
            stats["refused_over_size_limit"] = refused_size
        if failed:
            stats["evaluation_failed"] = failed
        return PassResult(folded > 0, stats)

    @staticmethod
    def _foldable(node: gs.Node, types: TensorTypes) -> bool:
        if not is_default_domain(node) or node.op in _NEVER_FOLD or node.op == "Constant":
            return False
        if any(True for _ in node.subgraphs()) or not node.outputs:
            return False
        if node.op in ("Shape", "Size") and node.inputs \
                and types.static_shape(node.inputs[0]) is not None:
            return True
        real = [t for t in node.inputs if not t.is_empty()]
        return bool(real) and all(isinstance(t, gs.Constant) for t in real)

    @staticmethod
    def _shape_value(node: gs.Node, shape: tuple[int, ...]) -> np.ndarray:
        if node.op == "Size":
            return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        rank = len(shape)
        start = node.attrs.get("start", 0)
        end = node.attrs.get("end", rank)
        return np.array(shape, dtype=np.int64)[slice(start, end)]
