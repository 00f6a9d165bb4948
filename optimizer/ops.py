"""Facts about ONNX operators, in one table every pass reads.

For each op: which inputs are learned weights (and, for each weight, its output-channel and
input-channel axes), and which are shapes, indices, scales, biases or normalization statistics.
Fusions, pruning (unstructured and by channel) and quantization (per-channel, block-wise) all read
the axes here, so a rule about a layout is written once.

Axes, from the ONNX operator specs (https://onnx.ai/onnx/operators/):

* MatMul ``A[..., M, K] @ B[..., K, N]``: B's output channels are its last axis (N) and its
  input channels the one before (K); a constant A (a transposed-weight export) has its output
  channels at ``rank - 2`` (M) and input channels last (K). A 1-D operand has no channel axis.
* Gemm ``A'[M, K] @ B'[N...]`` with ``A' = A^T`` when ``transA`` (likewise B): B's output axis is
  1 (``[K, N]``), 0 when ``transB``; A's output axis is 0, 1 when ``transA``; the input axis is the
  other one.
* Conv ``W[M, C/group, k...]``: output channels on axis 0, input channels (within a group) on 1.
* ConvTranspose ``W[C, M/group, k...]``: input channels on axis 0, output channels (within a group)
  on axis 1; output channel ``o = g · (M/group) + m`` is column ``m`` of group ``g``'s rows.
* Gather ``data[V, D...]`` as an embedding table: rows are tokens; quantization groups run along
  the last axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from onnxopt.graph import graph_protos, iter_graphs, subgraph_protos
from onnxopt.names import NameAuthority

#: Ops whose output is not a function of their inputs: never folded, never merged by CSE.
NONDETERMINISTIC_OPS = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})

FLOAT_DTYPES = (np.float16, np.float32, np.float64)

#: Ops whose presence means a model is already quantized (QDQ, integer kernels, and the
#: com.microsoft quantized contrib ops): quantization passes refuse such a model rather than
#: quantize it twice.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "ConvInteger", "QLinearMatMul", "QLinearConv",
    # com.microsoft
    "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QGemm",
    "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
    "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSoftmax", "QOrderedMatMul",
    "GatherBlockQuantized", "DynamicQuantizeLSTM", "QuantizeBFP", "DequantizeBFP",
})

#: (node, weight rank) -> axis, or None when the weight has no such axis.
AxisRule = Callable[[gs.Node, int], "int | None"]


@dataclass(frozen=True)
class WeightSlot:
    """A weight input of an op.

    Attributes:
        kind: ``"matrix"`` (MatMul/Gemm operand), ``"kernel"`` (Conv/ConvTranspose),
            ``"table"`` (Gather data) or ``"recurrent"`` (RNN/GRU/LSTM W and R).
        output_axis: the weight's output-channel axis (see the module docstring).
        input_axis: the weight's input-channel axis.
    """

    kind: str
    output_axis: AxisRule
    input_axis: AxisRule


@dataclass(frozen=True)
class OpFacts:
    """The roles of an op's inputs, by input index (default domain)."""

    weights: dict[int, WeightSlot] = field(default_factory=dict)
    shapes: frozenset[int] = frozenset()
    indices: frozenset[int] = frozenset()
    scales: frozenset[int] = frozenset()
    biases: frozenset[int] = frozenset()
    statistics: frozenset[int] = frozenset()


def _last_axis(node: gs.Node, rank: int) -> int | None:
    return rank - 1 if rank >= 2 else None


def _second_last_axis(node: gs.Node, rank: int) -> int | None:
    return rank - 2 if rank >= 2 else None


def _gemm(index: int, output: bool) -> AxisRule:
    """Gemm operand ``index`` (0: A, 1: B): its output (or input) axis, flipped by transA/B."""
    def axis(node: gs.Node, rank: int) -> int:
        flipped = int(bool(node.attrs.get("transA" if index == 0 else "transB", 0)))
        base = (0 if index == 0 else 1) if output else (1 if index == 0 else 0)
        return base ^ flipped
    return axis


def _fixed(axis: int | None) -> AxisRule:
    return lambda node, rank: axis


_SHAPES_1 = OpFacts(shapes=frozenset({1}))

#: The table. Ops not listed have no input with a known role.
OPS: dict[str, OpFacts] = {
    "MatMul": OpFacts(weights={
        0: WeightSlot("matrix", _second_last_axis, _last_axis),  # constant A: out M, in K
        1: WeightSlot("matrix", _last_axis, _second_last_axis)}),
    "Gemm": OpFacts(weights={
        0: WeightSlot("matrix", _gemm(0, True), _gemm(0, False)),
        1: WeightSlot("matrix", _gemm(1, True), _gemm(1, False))}, biases=frozenset({2})),
    "Conv": OpFacts(weights={1: WeightSlot("kernel", _fixed(0), _fixed(1))},
                    biases=frozenset({2})),
    "ConvTranspose": OpFacts(weights={1: WeightSlot("kernel", _fixed(1), _fixed(0))},
                             biases=frozenset({2})),
    "Gather": OpFacts(weights={0: WeightSlot("table", _fixed(0), lambda n, r: r - 1)},
                      indices=frozenset({1})),
    **{op: OpFacts(weights={1: WeightSlot("recurrent", _fixed(1), _fixed(2)),
                            2: WeightSlot("recurrent", _fixed(1), _fixed(2))},
                   biases=frozenset({3}), shapes=frozenset({4}))
       for op in ("RNN", "GRU", "LSTM")},
    "GatherElements": OpFacts(indices=frozenset({1})),
    "GatherND": OpFacts(indices=frozenset({1})),
    "ScatterElements": OpFacts(indices=frozenset({1})),
    "ScatterND": OpFacts(indices=frozenset({1})),
    "BatchNormalization": OpFacts(scales=frozenset({1}), biases=frozenset({2}),
                                  statistics=frozenset({3, 4})),
    "InstanceNormalization": OpFacts(scales=frozenset({1}), biases=frozenset({2})),
    "LayerNormalization": OpFacts(scales=frozenset({1}), biases=frozenset({2})),
    "QuantizeLinear": OpFacts(scales=frozenset({1, 2})),
    "DequantizeLinear": OpFacts(scales=frozenset({1, 2})),
    "Reshape": _SHAPES_1, "Expand": _SHAPES_1, "Tile": _SHAPES_1, "Squeeze": _SHAPES_1,
    "Unsqueeze": _SHAPES_1, "Split": _SHAPES_1, "TopK": _SHAPES_1, "OneHot": _SHAPES_1,
    "ConstantOfShape": OpFacts(shapes=frozenset({0})),
    "Slice": OpFacts(shapes=frozenset({1, 2, 3, 4})),
    "Pad": OpFacts(shapes=frozenset({1, 3})),
    "Resize": OpFacts(shapes=frozenset({1, 2, 3})),
    **{op: _SHAPES_1 for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
                               "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                               "ReduceLogSumExp", "ReduceSumSquare")},
}

_NO_FACTS = OpFacts()

# --- Output element types of ai.onnx.ml ops ---------------------------------------------------
# The ai.onnx.ml operator spec (https://onnx.ai/onnx/operators/#ai-onnx-ml) fixes these outputs'
# types, but ONNX type inference (onnx 1.23) reports none for Scaler, Normalizer,
# LinearRegressor, SVMRegressor, FeatureVectorizer, Imputer and SVMClassifier's scores, so a
# converter's Cast to that same type looks like a real conversion. By output index.

#: Output types: an ONNX element type, ``"input"`` (input 0's type), or ``"labels"`` (int64 with
#: an integer class-label attribute, string with ``classlabels_strings``).
ML_OUTPUT_TYPES: dict[str, tuple[int | str, ...]] = {
    **{op: (TensorProto.FLOAT,)
       for op in ("Scaler", "Normalizer", "LinearRegressor", "SVMRegressor",
                  "TreeEnsembleRegressor", "FeatureVectorizer", "OneHotEncoder")},
    **{op: ("labels", TensorProto.FLOAT)
       for op in ("LinearClassifier", "SVMClassifier", "TreeEnsembleClassifier")},
    **{op: ("input",) for op in ("Imputer", "Binarizer", "ArrayFeatureExtractor", "TreeEnsemble")},
}


def ml_output_type(node: gs.Node, index: int, input_type: int | None) -> int | None:
    """The ONNX element type of output ``index`` of an ai.onnx.ml ``node`` per
    :data:`ML_OUTPUT_TYPES` (``input_type``: the type of its input 0, None when unknown); None
    for other nodes or when the spec leaves it open."""
    if node.domain != "ai.onnx.ml" or index >= len(ML_OUTPUT_TYPES.get(node.op, ())):
        return None
    rule = ML_OUTPUT_TYPES[node.op][index]
    if rule == "input":
        return input_type
    if rule == "labels":
        if any(a in node.attrs for a in ("classlabels_ints", "classlabels_int64s")):
            return TensorProto.INT64
        return TensorProto.STRING if "classlabels_strings" in node.attrs else None
    return rule


def is_default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def facts(node: gs.Node) -> OpFacts:
    """The facts of ``node``'s op; no facts for other domains."""
    return OPS.get(node.op, _NO_FACTS) if is_default_domain(node) else _NO_FACTS


def weight_slot(node: gs.Node, index: int) -> WeightSlot | None:
    """The weight slot of ``node``'s input ``index``, or None."""
    return facts(node).weights.get(index)


def output_channel_axis(node: gs.Node, index: int, rank: int) -> int | None:
    """The output-channel axis of the weight ``node`` reads at ``index`` (rank ``rank``); None
    when it has none (a 1-D MatMul operand) or the input is not a weight."""
    slot = weight_slot(node, index)
    return None if slot is None else slot.output_axis(node, rank)


def input_channel_axis(node: gs.Node, index: int, rank: int) -> int | None:
    """The input-channel axis of the weight ``node`` reads at ``index``, or None."""
    slot = weight_slot(node, index)
    return None if slot is None else slot.input_axis(node, rank)


def conv_output_channels(conv: gs.Node) -> int:
    """M, the output channels of a Conv or ConvTranspose, from its weight's shape."""
    w = conv.inputs[1]
    return w.shape[0] if conv.op == "Conv" else w.shape[1] * conv.attrs.get("group", 1)


def conv_input_channels(conv: gs.Node) -> int:
    """C, the input channels of a Conv or ConvTranspose, from its weight's shape."""
    w = conv.inputs[1]
    return w.shape[1] * conv.attrs.get("group", 1) if conv.op == "Conv" else w.shape[0]


def weight_initializers(graph: gs.Graph, kinds: frozenset[str]) -> list[gs.Constant]:
    """Float initializers every one of whose reads is a weight slot of one of ``kinds``.

    A MatMul's left operand and Gemm's A count only when constant (a transposed-weight export).
    Shapes, indices, normalization statistics, scales and biases are never returned, nor is a
    weight that another op also reads.
    """
    seen: dict[int, gs.Constant] = {}
    for g in iter_graphs(graph):
        for node in g.nodes:
            for t in node.inputs:
                if (isinstance(t, gs.Constant) and id(t) not in seen
                        and np.dtype(t.dtype).type in FLOAT_DTYPES):
                    seen[id(t)] = t
    out = []
    for t in seen.values():
        slots = [(node, i) for node in t.outputs for i, x in enumerate(node.inputs) if x is t]
        if slots and all((s := weight_slot(n, i)) is not None and s.kind in kinds
                         for n, i in slots):
            out.append(t)
    return out


# --- Channel-wise ops (structured pruning, passes/prune_channels.py) -------------------------
# Ops that act on each channel independently when every other operand is a scalar or a
# per-channel constant (or the same activation), so removing a channel commutes with them; and a
# numpy evaluation of each, used to check what a silenced (all-zero) or constant channel becomes.

def _erf(x: np.ndarray) -> np.ndarray:
    import math
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _clip(node: gs.Node, x: np.ndarray, low, high) -> np.ndarray:
    low = node.attrs.get("min", -np.inf) if low is None else low
    high = node.attrs.get("max", np.inf) if high is None else high
    return np.minimum(np.maximum(x, low), high)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_UNARY: dict[str, Callable] = {
    "Relu": lambda n, x: np.maximum(x, 0.0),
    "Sigmoid": lambda n, x: _sigmoid(x),
    "HardSigmoid": lambda n, x: np.clip(n.attrs.get("alpha", 0.2) * x
                                        + n.attrs.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda n, x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "Tanh": lambda n, x: np.tanh(x),
    "Erf": lambda n, x: _erf(x),
    "LeakyRelu": lambda n, x: np.where(x >= 0, x, n.attrs.get("alpha", 0.01) * x),
    "Identity": lambda n, x: x,
    "Neg": lambda n, x: -x,
    "Abs": lambda n, x: np.abs(x),
    "Exp": lambda n, x: np.exp(x),
    "Softplus": lambda n, x: np.log1p(np.exp(x)),
    "Elu": lambda n, x: np.where(x >= 0, x, n.attrs.get("alpha", 1.0) * (np.exp(x) - 1.0)),
    "Sqrt": lambda n, x: np.sqrt(x),
}
_BINARY: dict[str, Callable] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Max": np.maximum, "Min": np.minimum, "Pow": np.power,
}
#: Elementwise ops a channel passes through unchanged in number (see :func:`probe`).
PROBE_OPS = frozenset(_UNARY) | frozenset(_BINARY) | {"Clip"}


def probe(node: gs.Node, inputs: list) -> np.ndarray:
    """``node``'s output (float64) for numpy ``inputs`` (None for an omitted input): the ops of
    :data:`PROBE_OPS`, BatchNormalization (channel axis 1) and a depthwise Conv on a constant
    image (each channel times the sum of its kernel, plus bias: exact away from padded borders).

    Raises:
        KeyError: another op.
    """
    op = node.op
    if op in _UNARY:
        with np.errstate(all="ignore"):
            return _UNARY[op](node, inputs[0])
    if op in _BINARY:
        with np.errstate(all="ignore"):
            return _BINARY[op](inputs[0], inputs[1])
    if op == "Clip":
        bounds = (inputs + [None, None])[1:3]
        return _clip(node, inputs[0], *bounds)
    x = inputs[0]
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if op == "BatchNormalization":
        scale, bias, mean, var = (v.reshape(shape) for v in inputs[1:5])
        return (x - mean) / np.sqrt(var + node.attrs.get("epsilon", 1e-5)) * scale + bias
    if op == "Conv":
        w = inputs[1]
        out = x * w.reshape(w.shape[0], -1).sum(axis=1).reshape(shape)
        return out + inputs[2].reshape(shape) if len(inputs) > 2 and inputs[2] is not None \
            else out
    raise KeyError(op)


def onnxruntime_crashes_on_transpose(perm, float16: bool, readers) -> str | None:
    """Why onnxruntime cannot take a Transpose with ``perm`` writing float16 (``float16``) read by
    ``readers`` (nodes), when it may crash on it; else None.

    onnxruntime 1.32's CPU graph optimizations at ``ORT_ENABLE_ALL`` (its default session; the
    NCHWc transformer's level: ``disabled_optimizers=["NchwcTransformer"]`` loads) end the
    process with a segmentation fault on a float16 ``Transpose`` read by a ``MatMul`` whose
    other input is a constant, with or without a Cast to float32 between them, for the perms
    ``[1, 0, 2]``, ``[1, 2, 0]``, ``[1, 2, 0, 3]`` and ``[1, 2, 3, 0]`` with the constant as
    ``B`` and ``[1, 0, 2]`` with it as ``A``; not for ``[0, 2, 1]``, ``[2, 0, 1]``, ``[2, 1, 0]``,
    ``[1, 0, 2, 3]`` (measured on an AVX-512 CPU, each in a child process). Found on
    khmersm_dynamo's float16 encoder (a Conformer's ``transpose(0, 1)`` before its
    feed-forward MatMul). The rule here is wider than the measured cases, since the cause is
    not known: every perm that moves the leading axis. ``convert_float16`` keeps such a
    Transpose float32 and ``sink_transpose`` does not move one below a Cast to float16."""
    if not float16 or not perm or list(perm)[0] == 0:
        return None
    if any(r.op == "MatMul" and any(isinstance(t, gs.Constant) for t in r.inputs[:2])
           for r in readers):
        return ("onnxruntime 1.32 crashes on a float16 Transpose of the leading axis read by a "
                "MatMul")
    return None


#: Ops whose omitted outputs onnxruntime 1.32 cannot run (:func:`name_omitted_outputs`).
OMISSION_CRASHES = ("Loop", "Scan")


def _node_lists(model: onnx.ModelProto):
    """Every node list of ``model``: its graphs' and its local functions' (with the graphs
    nested in their nodes), as ``(nodes, names)`` with ``names`` the names the list's scope
    declares besides node outputs (inputs, initializers, value_info, outputs)."""
    def declared(g: onnx.GraphProto) -> list[str]:
        return [*(i.name for i in g.input), *(i.name for i in g.initializer),
                *(i.values.name for i in g.sparse_initializer),
                *(i.name for i in g.value_info), *(o.name for o in g.output)]

    for g in graph_protos(model.graph):
        yield g.node, declared(g)
    for f in model.functions:
        yield f.node, [*f.input, *f.output]
        for sub in (sub for node in f.node for sub in subgraph_protos(node)):
            for g in graph_protos(sub):
                yield g.node, declared(g)


def omitted_outputs(model: onnx.ModelProto) -> bool:
    """Whether a Loop or Scan node of ``model`` (graphs and local functions) omits an output
    (:func:`name_omitted_outputs`)."""
    return any(_omits(node) for nodes, _ in _node_lists(model) for node in nodes)


def _omits(node: onnx.NodeProto) -> bool:
    return node.op_type in OMISSION_CRASHES and node.domain in ("", "ai.onnx") \
        and not all(node.output)


def name_omitted_outputs(model: onnx.ModelProto) -> list[str]:
    """Give every omitted output (an empty name) of a Loop or Scan node, in every graph and
    local function of ``model``, a name no scope of the model uses, in place; return the names
    given.

    Omitting an output is valid ONNX (IR spec, "Optional inputs and outputs"), and naming one
    that nothing reads changes no other value, so the model computes the same outputs. It is
    needed because onnxruntime 1.32 cannot run such a node: a Loop whose final carried value is
    omitted ends the process with a segmentation fault when the session starts, one whose scan
    output is omitted fails to load ("Could not find OrtValue with name ''"); Scan likewise
    (and inside a local function, which onnxruntime inlines). ``onnxopt.optimize`` and
    ``onnxopt.validate`` apply it to the models they load, so that the original can be run and
    the result runs in onnxruntime (reported in ``Report.warnings``).
    """
    lists = list(_node_lists(model))
    used = set()
    for nodes, names in lists:
        used.update(names)
        for node in nodes:
            used.update(node.output)
            used.update(node.input)
    authority = NameAuthority(used)
    named = []
    for nodes, _ in lists:
        for node in nodes:
            if _omits(node):
                for i, name in enumerate(node.output):
                    if not name:
                        node.output[i] = authority.fresh(f"{node.name or node.op_type}_out{i}")
                        named.append(node.output[i])
    return named
