"""Structured pruning: remove whole output channels of Conv / MatMul / Gemm layers.

A *layer* is a producer (a Conv with ``group = 1``, or a MatMul/Gemm with a 2-D weight, with its
bias Add) whose output channels flow, through a *region* of channel-wise ops, into the input
channels of one or more *consumers* (Conv with ``group = 1``, MatMul, Gemm). The region may hold
BatchNormalization, elementwise ops whose other operand is a scalar or per-channel constant or
another region tensor (Relu, Clip, HardSwish ``x * Clip(x + 3, 0, 6) / 6``, ``x * Sigmoid(x)``,
GELU ``x * 0.5 * (1 + Erf(x / sqrt 2))``) and depthwise Convs (``group = C``, one kernel per
channel: the same channels go there). Removing channel ``r`` deletes row ``r`` of the producer
(Conv ``W[r]``, MatMul ``W[:, r]``) and its bias, the BN parameters, per-channel constants and
depthwise kernels ``r``, and the consumers' input channel ``r`` (Conv ``W2[:, r]``, MatMul
``W2[r, :]``). MiniLM's FFN ``MatMul W1 [384, 1536] + b1 -> GELU -> MatMul W2 [1536, 384]`` is
such a layer: its channels are the intermediate neurons. A region is refused, with a reason, when
a channel meets an op that needs every channel (a residual Add or other elementwise op with an
unrelated activation, Concat, Reshape, Flatten, a graph output, an unknown reader, a node of an
If/Loop/Scan body reading the tensor from the outer scope: "read inside a subgraph"): then all
branches would have to agree.

**Bias folding.** When channel ``r`` is removed, the consumer sees ``x_r`` replaced by 0; with a
fold value ``c_r`` the consumer's bias gets ``b2 += sum_k W2[:, r, k] c_r`` (Conv) or
``b2 += c_r W2[r, :]`` (MatMul), i.e. ``x_r`` is replaced by ``c_r``; a consumer Gemm computes
``alpha H W2 + beta C``, so its ``C`` gets ``alpha / beta`` times that (nothing with ``beta = 0``).
``c_r`` is the channel's exact value when it is constant (a producer row of zeros: the channel is
``f(bias)`` after BN and activation, ``f(beta C)`` for a Gemm producer; exact for MatMul and for 1x1 / unpadded Conv consumers) and, with calibration
statistics, its mean over the calibration data (the least-squares constant, as in bias
correction). Without a bias to fold into (a Conv without bias and BN), nothing is folded.

**Reconstruction** (``reconstruct``): a MatMul/Gemm or 1x1 Conv consumer's weights are refit on
the calibration activations ``X`` of its input: with ``X_k`` the kept channels and a column of
ones (the bias), ``min ||[X_k 1] [W'; d] - X W||^2``, solved from the Gram matrices by the
dampened normal equations ``([X_k 1]^T [X_k 1] + lambda I) [W'; d] = [X_k 1]^T X W``
(``lambda = 0.01 mean diag``; Optimal Brain Surgeon / SparseGPT's layer-wise objective, Frantar &
Alistarh 2023, "SparseGPT", section 3, solved directly for a removed input channel).

**Importance** of channel ``r`` (``importance``): ``"magnitude"``, the L2 norm of the producer's
weights of ``r`` times ``|gamma / sqrt(var + eps)|`` of a BatchNormalization in the region (Li et
al. 2017, "Pruning Filters for Efficient ConvNets", section 3.1, with the BN scale that network
slimming uses, Liu et al. 2017); ``"activation"``, ``||x_r - mean x_r||_2`` over the calibration
data at the consumers' input times the L2 norm of the consumers' weights reading ``r`` (the
output error of replacing ``x_r`` by its mean, as in the Wanda criterion, Sun et al. 2023).
Constant channels have importance 0. Channels go by ``threshold`` (importance below it) or to
remove a fraction ``flops`` of the weighted ops' FLOPs, the same fraction of channels of every
layer (found by bisection); ``min_channels`` keeps a floor per layer.

**Proposals.** Each layer is one budget group, proposed as its *equivalent* model with the same
shapes: the removed channels silenced -- the last per-channel affine op of the region (BN scale
and bias, else the depthwise kernel and bias, else the producer's row and bias) set to 0 so that
the channel is exactly 0 where the consumers read it (a Gemm producer's scalar ``C`` is not
silenced: its channel starts at ``beta C``; the region must map that to 0, which is
checked numerically; where it maps it to a constant ``z``, as PP-LCNet's learnable affine
``a x + b`` does, every consumer must be pointwise with a bias, which absorbs ``- z W2``) -- and
the consumers' bias folded (or weights refit). ``apply`` writes those values (without the ``z``
correction) and slices every tensor: producer rows and bias, BN parameters, per-channel
constants, depthwise kernels and their ``group``, the consumers' input channels, and the
channel dimension of the region's value shapes. Two layers whose equivalents change the same
tensor are one group (a Conv without BN feeding another layer: its bias takes both the fold and
the silencing). The pass preserves no analysis (shapes change).

FLOPs count 2 per multiply-add of every Conv, ConvTranspose, MatMul and Gemm with a constant
weight, at the output sizes the calibration feeds produce (averaged over them; the declared
shapes, unknown dimensions taken as 1, without data).

Statistics (JSON-serializable): ``layers`` (prunable), ``refused`` (``{reason: count}``),
``flops_target``, ``flops_planned`` (fraction the proposals remove), ``proposed`` /
``accepted`` (tensors), ``layers_pruned``, ``channels_removed``, ``flops_before`` /
``flops_after`` / ``flops_removed`` (fraction), ``params_before`` (weights of the weighted ops),
``params_removed`` (every sliced tensor), ``per_layer``: ``{node: {flops_before, flops_after,
channels, removed, params_removed}}``.

Errors: :class:`onnxopt.errors.UsageError` for invalid options, and for ``importance =
"activation"`` or ``reconstruct`` without calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses.activations import calibration_feeds, collect
from onnxopt.analyses.manager import Analysis
from onnxopt.budget import Proposal
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph
from onnxopt.ops import FLOAT_DTYPES, PROBE_OPS, is_default_domain, probe
from onnxopt.pass_manager import Pass, PassContext, PassResult, register

#: Ops whose FLOPs are counted (the weighted ops).
WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: Dampening of the reconstruction's normal equations, relative to their mean diagonal.
DAMPING = 0.01


@dataclass(frozen=True)
class PruneChannelsOptions:
    """Options of :class:`PruneChannels`.

    Attributes:
        flops: fraction in (0, 1) of the weighted ops' FLOPs (Conv, MatMul, Gemm) to remove, or
            ``"auto"`` (the strength search); None: use ``threshold``.
        threshold: importance (see the module docstring, in its units) below which a channel is
            removed; None: use ``flops``.
        importance: ``"magnitude"`` or ``"activation"`` (needs calibration data).
        reconstruct: refit MatMul/Gemm/1x1 Conv consumers on calibration activations.
        min_channels: channels every layer keeps: a count (>= 1) or a fraction in (0, 1)
            (default: half; without retraining, removing more ruins most layers).
    """

    flops: float | str | None = None
    threshold: float | None = None
    importance: str = "magnitude"
    reconstruct: bool = False
    min_channels: float = 0.5

    def check(self) -> str | None:
        if isinstance(self.flops, str) and self.flops != "auto":
            return f"option flops must be a fraction in (0, 1) or 'auto', got {self.flops!r}"
        if isinstance(self.flops, (int, float)) and not 0 < self.flops < 1:
            return f"option flops must be in (0, 1), got {self.flops}"
        if self.flops is not None and self.threshold is not None:
            return "give flops or threshold, not both"
        if self.threshold is not None and not 0 <= self.threshold < math.inf:
            return f"option threshold must be >= 0 and finite, got {self.threshold}"
        if self.importance not in ("magnitude", "activation"):
            return f"option importance must be 'magnitude' or 'activation', got " \
                   f"{self.importance!r}"
        if not 0 < self.min_channels < math.inf:
            return f"option min_channels must be positive, got {self.min_channels}"
        return None


class Refused(Exception):
    """A layer that cannot be pruned; the message is the reason counted in statistics."""


@dataclass
class Layer:
    """A producer, its channel region and its consumers (see the module docstring).

    ``slices`` are ``(tensor, axis)`` pairs cut along the channel axis; ``silence`` the
    ``(tensor, axis)`` pairs zeroed to silence a channel; ``folds`` the consumers' ``(node,
    weight, input axis, bias tensor, bias kind)``; ``variables`` the region's activations with
    their channel axis.
    """

    producer: gs.Node
    channels: int
    rank_kind: str  # "conv" (channel axis 1) or "matrix" (last axis)
    region: list[gs.Node]
    consumers: list[gs.Node]
    slices: list[tuple[gs.Constant, int]]
    silence: list[tuple[gs.Constant, int]]
    folds: list[tuple]
    variables: list[gs.Variable]
    depthwise: list[gs.Node]
    terminal_inputs: list[gs.Variable]
    importance: np.ndarray | None = None
    fold_values: np.ndarray | None = None
    cost: float = 0.0
    silenced: np.ndarray | None = None
    removed: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The producer's name (its output's, for an unnamed node): the budget group."""
        return self.producer.name or self.producer.outputs[0].name


def _const(t) -> bool:
    return isinstance(t, gs.Constant) and isinstance(t.values, np.ndarray) \
        and np.dtype(t.values.dtype).type in FLOAT_DTYPES


def _single_use(t: gs.Constant, node: gs.Node) -> bool:
    return all(n is node for n in t.outputs) and sum(x is t for x in node.inputs) == 1


def _channel_axis_of_constant(values: np.ndarray, channels: int, kind: str) -> int | None:
    """The axis of a per-channel constant operand, None for a scalar; raises Refused else."""
    if values.size == 1:
        return None
    shape = values.shape
    if kind == "conv":  # broadcast against [N, C, H, W]: [C, 1, 1] or [1, C, 1, 1]
        axis = len(shape) - 3
        ok = axis >= 0 and shape[axis] == channels and values.size == channels
    else:  # [..., C]
        axis = len(shape) - 1
        ok = shape[axis] == channels and values.size == channels
    if not ok:
        raise Refused("elementwise constant not per-channel")
    return axis


def _producer(node: gs.Node) -> tuple[gs.Constant, int, str] | None:
    """(weight, output-channel axis, kind) of a prunable producer, else None."""
    if not is_default_domain(node) or len(node.inputs) < 2 or not _const(node.inputs[1]):
        return None
    w = node.inputs[1]
    if node.op == "Conv" and node.attrs.get("group", 1) == 1 and w.values.ndim >= 3:
        return w, 0, "conv"
    if node.op == "MatMul" and w.values.ndim == 2 and not isinstance(node.inputs[0], gs.Constant):
        return w, 1, "matrix"
    if node.op == "Gemm" and not node.attrs.get("transA", 0) and w.values.ndim == 2:
        return w, 0 if node.attrs.get("transB", 0) else 1, "matrix"
    return None


def _consumer_axis(node: gs.Node, x: gs.Tensor, kind: str) -> int | None:
    """The input-channel axis of ``node``'s weight when it consumes region tensor ``x`` as its
    data input, else None."""
    if not is_default_domain(node) or len(node.inputs) < 2 or node.inputs[0] is not x \
            or not _const(node.inputs[1]):
        return None
    w = node.inputs[1].values
    if node.op == "Conv" and kind == "conv" and node.attrs.get("group", 1) == 1:
        return 1
    if node.op == "MatMul" and kind == "matrix" and w.ndim == 2:
        return 0
    if node.op == "Gemm" and kind == "matrix" and not node.attrs.get("transA", 0) and w.ndim == 2:
        return 1 if node.attrs.get("transB", 0) else 0
    return None


def _bias_of(node: gs.Node, main: set[int]) -> tuple[gs.Constant | None, str | None]:
    """The tensor a consumer's output bias can be folded into: its own bias input (not a Gemm's
    with ``beta = 0``), the Add of a MatMul, or the mean of a BatchNormalization right after a
    Conv without bias; ``main`` holds the ids of the main graph's nodes (a reader inside a
    subgraph may not run)."""
    out = node.outputs[0]
    if node.op == "Gemm" and node.attrs.get("beta", 1.0) == 0:
        return None, None
    if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and _const(node.inputs[2]):
        b = node.inputs[2]
        n = node.inputs[1].values.shape[0 if node.op == "Conv" or node.attrs.get("transB", 0)
                                        else 1]
        if b.values.size == n and _single_use(b, node):
            return b, "add"
        return None, None
    readers = list(out.outputs)
    if len(readers) == 1 and is_default_domain(readers[0]) and id(readers[0]) in main:
        r = readers[0]
        if node.op == "MatMul" and r.op == "Add":
            b = r.inputs[1] if r.inputs[0] is out else r.inputs[0]
            if _const(b) and b.values.ndim == 1 and _single_use(b, r):
                return b, "add"
        if node.op == "Conv" and len(node.inputs) < 3 and r.op == "BatchNormalization" \
                and _const(r.inputs[3]) and _single_use(r.inputs[3], r):
            return r.inputs[3], "mean"
    return None, None


def _fold_scale(node: gs.Node) -> float:
    """What a consumer's bias tensor must get per unit of output change: a Gemm computes
    ``alpha A B + beta C``, so replacing input channel ``r`` by ``c`` adds ``alpha c B[r]`` to
    the output, i.e. ``alpha / beta c B[r]`` to ``C``; 1 for other ops."""
    if node.op == "Gemm":
        return float(node.attrs.get("alpha", 1.0)) / float(node.attrs.get("beta", 1.0))
    return 1.0


def _producer_bias_output(node: gs.Node) -> float:
    """What a Gemm producer with a scalar (broadcast) bias ``C`` outputs on a channel whose
    weights are zero: ``beta C`` (its bias is not per-channel, so silencing leaves it); 0
    otherwise."""
    if node.op == "Gemm" and len(node.inputs) > 2 and _const(node.inputs[2]) \
            and node.inputs[2].values.size == 1:
        return float(node.attrs.get("beta", 1.0)) * float(node.inputs[2].values.reshape(-1)[0])
    return 0.0


def find_layer(graph_outputs: set[int], node: gs.Node, main: set[int]) -> Layer:
    """The :class:`Layer` of producer ``node``; ``main`` holds the ids of the main graph's
    nodes: a region read by a node of a subgraph (If/Loop/Scan bodies read outer tensors
    directly) is refused, as slicing it would change what the subgraph computes.
    Raises :class:`Refused` with the reason."""
    found = _producer(node)
    if found is None:
        raise Refused("not a prunable producer")
    w, axis, kind = found
    if not _single_use(w, node):
        raise Refused("weight is shared")
    channels = w.values.shape[axis]
    slices, silence_last = [(w, axis)], [(w, axis)]
    out = node.outputs[0]
    region_start = out
    if node.op == "Conv" and len(node.inputs) > 2 and _const(node.inputs[2]):
        if not _single_use(node.inputs[2], node):
            raise Refused("bias is shared")
        slices.append((node.inputs[2], 0))
        silence_last.append((node.inputs[2], 0))
    if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
        b = node.inputs[2]
        if not _const(b) or b.values.size not in (1, channels) or not _single_use(b, node):
            raise Refused("Gemm bias not per-channel")
        if b.values.size == channels:
            slices.append((b, b.values.ndim - 1))
            silence_last.append((b, b.values.ndim - 1))
    if node.op == "MatMul":
        readers = list(out.outputs)
        if any(id(r) not in main for r in readers):
            raise Refused("read inside a subgraph")
        if len(readers) == 1 and readers[0].op == "Add" and id(out) not in graph_outputs:
            add = readers[0]
            b = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if _const(b) and b.values.ndim == 1 and b.values.size == channels \
                    and _single_use(b, add):
                slices.append((b, 0))
                silence_last.append((b, 0))
                region_start = add.outputs[0]
                bias_node = add
            else:
                bias_node = None
        else:
            bias_node = None
    else:
        bias_node = None
    region: list[gs.Node] = [bias_node] if bias_node is not None else []
    variables = [out] + ([region_start] if region_start is not out else [])
    consumers: list[gs.Node] = []
    terminal_inputs: list[gs.Variable] = []
    depthwise: list[gs.Node] = []
    silence = list(silence_last)
    seen = {id(region_start)}
    queue = [region_start]
    members = {id(n) for n in region} | {id(node)}
    at_output = False
    while queue:
        t = queue.pop(0)
        at_output |= id(t) in graph_outputs  # refused below, after the more specific reasons
        for r in list(t.outputs):
            if id(r) in members:
                continue
            if id(r) not in main:
                raise Refused("read inside a subgraph")
            op = r.op if is_default_domain(r) else f"{r.domain}.{r.op}"
            if _consumer_axis(r, t, kind) is not None:
                if r is node:
                    raise Refused("cycle")
                consumers.append(r)
                members.add(id(r))
                if t not in terminal_inputs:
                    terminal_inputs.append(t)
                continue
            if op == "BatchNormalization" and kind == "conv" and r.inputs[0] is t:
                params = r.inputs[1:5]
                if not all(_const(p) and p.values.size == channels and _single_use(p, r)
                           for p in params):
                    raise Refused("BatchNormalization parameters not per-channel or shared")
                slices += [(p, 0) for p in params]
                silence = [(r.inputs[1], 0), (r.inputs[2], 0)]
            elif op == "Conv" and kind == "conv" and r.inputs[0] is t \
                    and r.attrs.get("group", 1) == channels and _const(r.inputs[1]) \
                    and r.inputs[1].values.shape[:2] == (channels, 1):
                dw = [r.inputs[1]] + ([r.inputs[2]] if len(r.inputs) > 2 else [])
                if not all(_const(p) and _single_use(p, r) for p in dw):
                    raise Refused("depthwise weight shared")
                slices += [(p, 0) for p in dw]
                silence = [(p, 0) for p in dw]
                depthwise.append(r)
            elif op in PROBE_OPS:
                others = [x for x in r.inputs if x is not t and not x.is_empty()]
                for x in others:
                    if op == "Clip" and x in r.inputs[1:]:
                        if not (_const(x) and x.values.size == 1):
                            raise Refused("Clip bound not constant")
                        continue
                    if _const(x):
                        if not all(n is r for n in x.outputs):
                            if x.values.size != 1:
                                raise Refused("per-channel constant shared")
                            continue
                        ax = _channel_axis_of_constant(x.values, channels, kind)
                        if ax is not None:
                            slices.append((x, ax))
                    elif isinstance(x, gs.Constant):
                        raise Refused("non-float constant operand")
                # Variable operands are checked below, once the region is complete
            elif op == "Add":
                raise Refused("residual Add")
            elif op in ("Concat", "Reshape", "Flatten"):
                raise Refused(op)
            else:
                raise Refused(f"unknown reader {op}")
            members.add(id(r))
            region.append(r)
            for o in r.outputs:
                if id(o) not in seen:
                    seen.add(id(o))
                    variables.append(o)
                    queue.append(o)
    inside = {id(v) for v in variables}
    for r in region:
        for x in r.inputs:
            if isinstance(x, gs.Variable) and not x.is_empty() and id(x) not in inside:
                raise Refused("residual Add" if r.op == "Add" else
                              f"{r.op} with an activation from outside the layer")
    if at_output:
        raise Refused("channel reaches a graph output")
    if not consumers:
        raise Refused("no consumer layer")
    folds = []
    for c in consumers:
        cw = c.inputs[1]
        if not _single_use(cw, c):
            raise Refused("consumer weight is shared")
        if cw.values.shape[_consumer_axis(c, c.inputs[0], kind)] != channels:
            raise Refused("consumer channels do not match")
        bias, how = _bias_of(c, main)
        folds.append((c, cw, _consumer_axis(c, c.inputs[0], kind), bias, how))
        slices.append((cw, _consumer_axis(c, c.inputs[0], kind)))
    layer = Layer(node, channels, kind, region, consumers, slices, silence, folds, variables,
                  depthwise, terminal_inputs)
    _check_silence(layer)
    return layer


def _evaluate(layer: Layer, start: np.ndarray, override: dict | None = None
              ) -> dict[int, np.ndarray]:
    """Per-channel probe values of the region's tensors for producer output ``start`` (shape
    ``[1, C, 1, 1]`` or ``[1, C]``; spatial ops see a constant image), ``override`` mapping
    constant ids to replacement values; keyed by tensor id."""
    values = {id(layer.variables[0]): start}
    override = override or {}

    def value_of(t):
        if id(t) in values:
            return values[id(t)]
        v = override.get(id(t), t.values)
        return v.astype(np.float64)

    pending = list(layer.region)
    while pending:
        progressed = False
        for r in list(pending):
            if all(x.is_empty() or isinstance(x, gs.Constant) or id(x) in values
                   for x in r.inputs):
                ins = [None if x.is_empty() else value_of(x) for x in r.inputs]
                values[id(r.outputs[0])] = probe(r, ins)
                pending.remove(r)
                progressed = True
        if not progressed:
            raise Refused("region not evaluable")
    return values


def _pointwise(node: gs.Node) -> bool:
    """A consumer that sees a constant channel as a constant everywhere: MatMul/Gemm, or a Conv
    with 1x1 kernels and no padding (padding would show the constant's borders)."""
    if node.op != "Conv":
        return True
    w = node.inputs[1].values
    return all(d == 1 for d in w.shape[2:]) and not any(node.attrs.get("pads", [])) \
        and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")


def _check_silence(layer: Layer) -> None:
    """Set ``layer.silenced``: each channel's value at the consumers' input once
    ``layer.silence`` is zeroed. Raise Refused unless it is a constant independent of the
    producer's output, and 0 unless every consumer is pointwise with a bias (the constant is then
    subtracted from the bias)."""
    c = layer.channels
    shape = (1, c, 1, 1) if layer.rank_kind == "conv" else (1, c)
    rng = np.random.default_rng(0)
    override = {id(t): np.zeros_like(t.values) for t, _ in layer.silence}
    # a silenced producer outputs 0 (``beta C`` with a Gemm's scalar bias, which silencing
    # leaves); else the silenced op must hide what it outputs
    producer_silenced = any(t is layer.slices[0][0] for t, _ in layer.silence)
    runs = [_evaluate(layer, np.full(shape, _producer_bias_output(layer.producer))
                      if producer_silenced else rng.normal(size=shape) * scale + 1.0, override)
            for scale in (1.0, 3.0)]
    silenced = runs[0][id(layer.terminal_inputs[0])]
    for t in layer.terminal_inputs:
        if any(not np.array_equal(r[id(t)], silenced) for r in runs):
            raise Refused("region does not map 0 to a constant")
    if np.any(silenced != 0) and not all(_pointwise(c) and bias is not None
                                         for c, _, _, bias, _ in layer.folds):
        raise Refused("region does not map 0 to 0")
    if not np.all(np.isfinite(silenced)):
        raise Refused("region does not map 0 to a constant")
    layer.silenced = silenced.reshape(-1)


def _fold_constants(layer: Layer) -> np.ndarray:
    """Each channel's value at the consumers' input when the producer's weights of the channel
    are all zero (the producer then outputs its own bias), float64 ``[C]``."""
    c, p = layer.channels, layer.producer
    shape = (1, c, 1, 1) if layer.rank_kind == "conv" else (1, c)
    start = np.zeros(c)
    if p.op in ("Conv", "Gemm") and len(p.inputs) > 2 and _const(p.inputs[2]):
        beta = float(p.attrs.get("beta", 1.0)) if p.op == "Gemm" else 1.0
        start = start + beta * p.inputs[2].values.reshape(-1).astype(np.float64)
    values = _evaluate(layer, start.reshape(shape))
    return values[id(layer.terminal_inputs[0])].reshape(-1)


def _zero_channels(layer: Layer) -> np.ndarray:
    """Boolean ``[C]``: the producer's weights of the channel are all zero."""
    w, axis = layer.slices[0]
    moved = np.moveaxis(w.values, axis, 0).reshape(layer.channels, -1)
    return ~np.any(moved != 0, axis=1)


def _magnitude(layer: Layer) -> np.ndarray:
    w, axis = layer.slices[0]
    norm = np.sqrt((np.moveaxis(w.values.astype(np.float64), axis, 0)
                    .reshape(layer.channels, -1) ** 2).sum(axis=1))
    for r in layer.region:
        if r.op == "BatchNormalization":
            gamma, var = r.inputs[1].values, r.inputs[4].values
            norm = norm * np.abs(gamma / np.sqrt(var + r.attrs.get("epsilon", 1e-5)))
            break
    return norm


def _consumer_norm(layer: Layer) -> np.ndarray:
    total = np.zeros(layer.channels)
    for c, cw, axis, _, _ in layer.folds:
        total += (np.moveaxis(cw.values.astype(np.float64), axis, 0)
                  .reshape(layer.channels, -1) ** 2).sum(axis=1)
    return np.sqrt(total)


class ChannelStatistics(Analysis):
    """Per-feed element counts of every weighted op's output (for FLOPs) and channel statistics
    (mean, centered norm, Gram matrix) of every prunable layer's consumer input, from one
    instrumented run over the calibration feeds (validation feeds when there are none)."""

    #: Whether :meth:`compute` also collects Gram matrices (for ``reconstruct``).
    grams = False

    def __init__(self, stats, feeds: int) -> None:
        self.stats, self.feeds = stats, feeds

    @classmethod
    def compute(cls, graph: gs.Graph, ctx) -> "ChannelStatistics":
        feeds = calibration_feeds(ctx, "prune_channels: activation statistics")
        layers, _ = discover(graph)
        tensors: dict[str, int | None] = {}
        grams = []
        for n in graph.nodes:
            if n.op in WEIGHTED and n.outputs:
                tensors[n.outputs[0].name] = None
        for layer in layers:
            for t in layer.terminal_inputs:
                tensors[t.name] = 1 if layer.rank_kind == "conv" else -1
                if cls.grams:
                    grams.append(t.name)
        stats = collect(export_graph(graph, ctx.template), tensors, feeds, grams=grams,
                        histograms=False)
        return cls(stats.tensors, stats.feeds)


class ChannelGrams(ChannelStatistics):
    """:class:`ChannelStatistics` with the Gram matrix of every consumer input."""

    grams = True


def discover(graph: gs.Graph) -> tuple[list[Layer], dict[str, int]]:
    """Every prunable layer of the main graph and the refusals ``{reason: count}``."""
    outputs = {id(t) for t in graph.outputs}
    main = {id(n) for n in graph.nodes}
    layers, refused = [], {}
    for node in graph.nodes:
        if _producer(node) is None:
            continue
        try:
            layers.append(find_layer(outputs, node, main))
        except Refused as why:
            refused[str(why)] = refused.get(str(why), 0) + 1
    return layers, refused


def _positions(node: gs.Node, stats, feeds: int) -> float:
    """Output elements per feed of a weighted node / its output channels (spatial positions
    times batch, or rows of a MatMul)."""
    out = node.outputs[0]
    w = node.inputs[1].values if len(node.inputs) > 1 and _const(node.inputs[1]) else None
    channels = None
    if w is not None:
        if node.op == "Conv":
            channels = w.shape[0]
        elif node.op == "ConvTranspose":
            channels = w.shape[1] * node.attrs.get("group", 1)
        elif node.op == "MatMul":
            channels = w.shape[-1]
        elif node.op == "Gemm":
            channels = w.shape[0 if node.attrs.get("transB", 0) else 1]
    if stats is not None and out.name in stats and stats[out.name].count:
        elements = stats[out.name].count / max(feeds, 1)
    else:
        shape = out.shape or []
        elements = float(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in shape]))
    return elements / channels if channels else elements


def _flops(node: gs.Node, positions: float, out_kept: int | None = None,
           in_kept: int | None = None) -> float:
    """Multiply-add FLOPs (2 per MAC) of a weighted node with ``out_kept`` output and
    ``in_kept`` input channels (None: all)."""
    if len(node.inputs) < 2 or not _const(node.inputs[1]):
        return 0.0
    w = node.inputs[1].values
    if node.op == "Conv":
        group = node.attrs.get("group", 1)
        out, per_group = w.shape[0], w.shape[1]
        k = float(np.prod(w.shape[2:]))
        if group > 1 and group == out and per_group == 1:  # depthwise
            n = out if out_kept is None else out_kept
            return 2.0 * positions * n * k
        return 2.0 * positions * (out if out_kept is None else out_kept) * \
            (per_group if in_kept is None else in_kept) * k
    if node.op == "ConvTranspose":
        return 2.0 * positions * w.shape[1] * node.attrs.get("group", 1) * w.shape[0] / \
            node.attrs.get("group", 1) * float(np.prod(w.shape[2:]))
    if node.op in ("MatMul", "Gemm") and w.ndim == 2:
        oa = 0 if node.op == "Gemm" and node.attrs.get("transB", 0) else 1
        out, k = w.shape[oa], w.shape[1 - oa]
        return 2.0 * positions * (out if out_kept is None else out_kept) * \
            (k if in_kept is None else in_kept)
    return 0.0


@register
class PruneChannels(Pass):
    name = "prune_channels"
    description = ("Remove whole output channels of Conv/MatMul/Gemm layers (and the next "
                   "layer's input channels): structured pruning.")
    Options = PruneChannelsOptions
    lossless = False
    weights = "original"
    preserves = frozenset()  # shapes change
    strength = "flops"
    ladder = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
    #: The strength search offers no per-layer strengths: the applies of two settings' groups
    #: slice shared tensors (a consumer's input channels are the next producer's output ones)
    #: each from its own original shapes, so mixing them gives an invalid model.
    per_layer_strengths = False

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.flops is None and o.threshold is None:
            return PassResult(False, {"flops_target": None})
        if o.flops == "auto":
            raise UsageError("prune_channels: flops='auto' is resolved by the strength search")
        has_data = ctx.calibration is not None or (ctx.feeds and not ctx.synthesized)
        needs = o.importance == "activation" or o.reconstruct
        if needs and not has_data:
            raise UsageError(f"prune_channels: importance={o.importance!r} / reconstruct need "
                             "calibration data (--calibration-data or real --inputs)")
        layers, refused = discover(graph)
        stats, feeds = None, 1
        if has_data or ctx.feeds:
            kind = ChannelGrams if o.reconstruct else ChannelStatistics
            cs = ctx.analyses.get(kind) if ctx.analyses is not None else kind.compute(graph, ctx)
            stats, feeds = cs.stats, cs.feeds
        positions = {id(n): _positions(n, stats, feeds) for n in graph.nodes
                     if n.op in WEIGHTED}
        total_flops = sum(_flops(n, positions[id(n)]) for n in graph.nodes if n.op in WEIGHTED)
        for layer in layers:
            zero = _zero_channels(layer)
            # synthesized feeds give FLOP counts, not means to fold
            ts = stats[layer.terminal_inputs[0].name] if stats is not None and has_data \
                else None
            mean = ts.channel_mean if ts is not None and ts.channel_sum is not None \
                and ts.channel_sum.size == layer.channels else None
            if o.importance == "activation":
                centered = np.sqrt(np.maximum(ts.channel_sq_sum - ts.rows * mean ** 2, 0.0))
                layer.importance = centered * _consumer_norm(layer)
            else:
                layer.importance = _magnitude(layer)
            layer.importance = np.where(zero, 0.0, layer.importance)
            layer.fold_values = np.where(zero, _fold_constants(layer),
                                         mean if mean is not None else 0.0)
            layer.cost = _flops(layer.producer, positions[id(layer.producer)], out_kept=1) + \
                sum(_flops(d, positions[id(d)], out_kept=1) for d in layer.depthwise) + \
                sum(_flops(c, positions[id(c)], in_kept=1) for c in layer.consumers)
        self._select(layers, total_flops)
        self._groups: dict[str, list[Layer]] = {}
        groups = self._propose(layers, stats)
        proposals = [p for g in groups for p in g]
        self._layers, self._positions, self._total = layers, positions, total_flops
        self._graph_nodes = [n for n in graph.nodes if n.op in WEIGHTED]
        planned = sum(len(la.removed) * la.cost for la in layers)
        warnings = []
        if o.flops is not None and total_flops and planned < 0.99 * o.flops * total_flops:
            warnings.append(f"prune_channels: the prunable layers give {planned / total_flops:.1%}"
                            f" of the FLOPs at most (min_channels), below flops={o.flops}")
        return PassResult(False, {"refused": refused, "layers": len(layers),
                                  "flops_target": o.flops, "flops_planned":
                                  planned / total_flops if total_flops else 0.0},
                          warnings=warnings, proposals=proposals)

    def _keep_floor(self, channels: int) -> int:
        m = self.options.min_channels
        return max(1, int(math.ceil(m * channels)) if m < 1 else int(m))

    def _select(self, layers: list[Layer], total: float) -> None:
        o = self.options
        order = {id(la): np.argsort(la.importance, kind="stable") for la in layers}

        def count(la: Layer, fraction: float) -> int:
            allowed = la.channels - min(self._keep_floor(la.channels), la.channels)
            zeros = int(np.count_nonzero(la.importance == 0))
            return min(allowed, max(int(fraction * la.channels), zeros))

        if o.threshold is not None:
            for la in layers:
                n = min(int(np.count_nonzero(la.importance < o.threshold)),
                        la.channels - self._keep_floor(la.channels))
                la.removed = sorted(order[id(la)][:max(n, 0)].tolist())
            return
        low, high = 0.0, 1.0
        for _ in range(40):
            mid = (low + high) / 2
            saved = sum(count(la, mid) * la.cost for la in layers)
            if saved < o.flops * total:
                low = mid
            else:
                high = mid
        for la in layers:
            la.removed = sorted(order[id(la)][:count(la, high)].tolist())

    def _propose(self, layers: list[Layer], stats) -> list[list[Proposal]]:
        active = [la for la in layers if la.removed]
        # union-find over tensors touched: layers sharing a tensor are one group
        parent = list(range(len(active)))

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        owner: dict[int, int] = {}
        for i, la in enumerate(active):
            touched = {id(t) for t, _ in la.silence} | {id(f[3]) for f in la.folds
                                                         if f[3] is not None}
            if self.options.reconstruct:
                touched |= {id(f[1]) for f in la.folds}
            for t in touched:
                if t in owner:
                    parent[find(i)] = find(owner[t])
                else:
                    owner[t] = i
        groups: dict[int, list[Layer]] = {}
        done_slices: dict[int, list] = {}
        for i, la in enumerate(active):
            groups.setdefault(find(i), []).append(la)
        out = []
        for members in groups.values():
            values: dict[int, np.ndarray] = {}
            finals: dict[int, np.ndarray] = {}
            tensors: dict[int, gs.Constant] = {}

            def working(t, final=False):
                """The tensor's equivalent value (or, ``final``, the value apply writes before
                slicing: they differ where a silenced channel is a nonzero constant)."""
                if id(t) not in values:
                    values[id(t)] = np.array(t.values, copy=True)
                    finals[id(t)] = np.array(t.values, copy=True)
                    tensors[id(t)] = t
                return finals[id(t)] if final else values[id(t)]

            for la in members:  # consumer side first: folds and refits read original weights
                self._fold(la, working, stats)
            for la in members:
                for t, axis in la.silence:
                    for final in (False, True):
                        v = working(t, final)
                        index = [slice(None)] * v.ndim
                        index[axis] = la.removed
                        v[tuple(index)] = 0
            name = "+".join(la.name for la in members)
            self._groups[name] = members
            apply = _applier(members, tensors, finals, done_slices)
            out.append([Proposal(tensors[k], values[k], apply, group=name) for k in values])
        return out

    def _fold(self, la: Layer, working, stats) -> None:
        """Fold the removed channels' values into each consumer's bias, or refit it."""
        removed = la.removed
        fold, silenced = np.nan_to_num(la.fold_values[removed]), la.silenced[removed]
        for c, cw, axis, bias, how in la.folds:
            w = cw.values.astype(np.float64)
            ts = stats[c.inputs[0].name] if stats is not None and c.inputs[0].name in stats \
                else None
            if self.options.reconstruct and ts is not None and ts.gram is not None \
                    and bias is not None and _pointwise(c):
                self._refit(la, c, cw, axis, bias, how, ts, working)
                continue
            if bias is None or not (np.any(fold) or np.any(silenced)):
                continue
            # the sliced consumer sees nothing where the equivalent model sees ``silenced``
            k = _fold_scale(c)
            _add_bias(working(bias), k * _project(fold - silenced, w, axis, removed), how)
            _add_bias(working(bias, True), k * _project(fold, w, axis, removed), how)

    def _refit(self, la, c, cw, axis, bias, how, ts, working) -> None:
        """Least-squares refit of consumer ``c`` on its kept input channels with a bias."""
        keep = np.setdiff1d(np.arange(la.channels), la.removed)
        g, s, n = external.unspill(ts.gram), ts.channel_sum, float(ts.rows)
        w = np.moveaxis(cw.values.astype(np.float64), axis, 0).reshape(la.channels, -1)
        a = np.zeros((len(keep) + 1, len(keep) + 1))
        a[:-1, :-1] = g[np.ix_(keep, keep)]
        a[:-1, -1] = a[-1, :-1] = s[keep]
        a[-1, -1] = n
        a += DAMPING * np.mean(np.diag(a)) * np.eye(len(a))
        rhs = np.vstack([g[keep] @ w, s @ w])
        sol = np.linalg.solve(a, rhs)
        new = w.copy()
        new[keep] = sol[:-1]
        shape = np.moveaxis(cw.values, axis, 0).shape
        for final in (False, True):
            cv = working(cw, final)
            cv[...] = np.moveaxis(new.reshape(shape), 0, axis).astype(cv.dtype)
        # the equivalent model still reads ``silenced`` through the original rows
        k = _fold_scale(c)
        _add_bias(working(bias), k * (sol[-1] - la.silenced[la.removed] @ w[la.removed]), how)
        _add_bias(working(bias, True), k * sol[-1], how)

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        if "layers" not in result.stats:
            return dict(result.stats)
        applied = [la for g in dict.fromkeys(p.group for p in accepted)
                   for la in self._groups[g]]
        out_kept = {id(la.producer): la.channels - len(la.removed) for la in applied}
        out_kept.update({id(d): la.channels - len(la.removed) for la in applied
                         for d in la.depthwise})
        in_kept = {id(c): la.channels - len(la.removed) for la in applied for c in la.consumers}
        per_layer, after = {}, 0.0
        for n in self._graph_nodes:
            pos = self._positions[id(n)]
            before = _flops(n, pos)
            now = _flops(n, pos, out_kept.get(id(n)), in_kept.get(id(n)))
            after += now
            if now != before:
                per_layer[n.name] = {"flops_before": before, "flops_after": now}
        for la in applied:
            per_layer.setdefault(la.name, {}).update(
                channels=la.channels, removed=len(la.removed),
                params_removed=_params_removed(la))
        params = sum(int(n.inputs[1].values.size) for n in self._graph_nodes
                     if len(n.inputs) > 1 and _const(n.inputs[1]))
        removed = sum(_params_removed(la) for la in applied)
        total = self._total
        return {**result.stats, "proposed": len(result.proposals), "accepted": len(accepted),
                "layers_pruned": len(applied),
                "channels_removed": sum(len(la.removed) for la in applied),
                "flops_before": total, "flops_after": after,
                "flops_removed": 1 - after / total if total else 0.0,
                "params_before": params, "params_removed": removed,
                "per_layer": per_layer}


def _params_removed(la: Layer) -> int:
    """Parameters of every tensor ``la`` slices that its removed channels hold."""
    total = 0
    for t, axis in la.slices:
        shape = t.values.shape
        total += int(np.prod(shape)) // shape[axis] * len(la.removed) if shape[axis] else 0
    return total


def _project(values: np.ndarray, w: np.ndarray, axis: int, removed: list[int]) -> np.ndarray:
    """What input channels ``removed`` holding constants ``values`` add to each output of a
    consumer with weight ``w`` (input-channel ``axis``; Conv kernels summed), float64."""
    moved = np.moveaxis(w, axis, 0)[removed]  # [r, out, k...] or [r, out]
    return values @ moved.reshape(len(removed), moved.shape[1], -1).sum(axis=2)


def _add_bias(b: np.ndarray, delta: np.ndarray, how: str) -> None:
    """Add ``delta`` to a consumer's output bias ``b`` in place; ``how = "mean"``: ``b`` is
    the mean of the BatchNormalization after it, and ``BN(x + d)`` is BN with mean ``- d``."""
    sign = -1.0 if how == "mean" else 1.0
    b[...] = (b.astype(np.float64) + sign * delta.reshape(b.shape)).astype(b.dtype)


def _applier(members: list[Layer], tensors: dict, values: dict, done_slices: dict):
    """The ``apply`` of one group: write its equivalent values (cut as other groups' applies
    already cut them: groups change disjoint tensors but slice shared ones), then slice."""
    done = []

    def cut(t: gs.Constant, axis: int, removed: list[int]) -> None:
        t.values = np.ascontiguousarray(np.delete(t.values, removed, axis=axis))
        done_slices.setdefault(id(t), []).append((axis, removed))

    def apply() -> None:
        if done:
            return
        done.append(True)
        for k, t in tensors.items():
            t.values = values[k]
            for axis, removed in done_slices.get(k, []):
                t.values = np.ascontiguousarray(np.delete(t.values, removed, axis=axis))
        for la in members:
            sliced = set()
            for t, axis in la.slices:
                if id(t) not in sliced:
                    sliced.add(id(t))
                    cut(t, axis, la.removed)
            kept = la.channels - len(la.removed)
            for d in la.depthwise:
                d.attrs["group"] = kept
            for v in la.variables:
                if v.shape is not None and len(v.shape):
                    shape = list(v.shape)
                    shape[1 if la.rank_kind == "conv" else len(shape) - 1] = kept
                    v.shape = shape
    return apply
