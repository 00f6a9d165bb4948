"""Structured pruning: remove whole output channels of Conv / MatMul / Gemm layers, and whole
attention heads.

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

**Attention heads** (:func:`discover_heads`): the Q, K and V projections of a self-attention
block, split into heads by a Reshape, and the output projection reading the heads merged back
are one layer whose channels go a head at a time (``block``: features per head). Between them
every op is checked to act on each head alone (Transpose, MatMul batched over the heads, Softmax
over the last axis, a mask or scale that is the same for every head, by the inferred shapes);
removing head ``h`` slices its features from Q, K, V (weights and biases) and from the output
projection's input rows, and the split/merge Reshapes read constant shapes naming the heads
kept. Its equivalent model zeroes V's head (``scores x 0 = 0``). MiniLM-L6's six blocks
(12 heads of 32) are found after the lossless passes (the pass runs on the fused graph: the
exported Reshapes read ``Concat`` of Shape dims and the mask's shape is not provable before).

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
dampened normal equations of the change from the original weights ``W_k`` (rows kept, bias
change ``d`` from 0): ``(A + lambda I) Delta = [X_k 1]^T X W - A [W_k; 0]`` with ``A = [X_k 1]^T
[X_k 1]`` and ``[W'; d] = [W_k; 0] + Delta`` (``lambda = 0.01 diag A`` per channel; dampened towards the
original weights, not towards 0: channels that carried nothing leave the rest as they were; Optimal Brain Surgeon
/ SparseGPT's layer-wise objective, Frantar & Alistarh 2023, "SparseGPT", section 3, solved
directly for a removed input channel).

**Order of removal with ``reconstruct``** (and a FLOP target): greedy Optimal Brain Surgeon over
the units of a layer whose consumers are refit (:func:`_obs_order`): each step removes the
channel (head) whose removal, with the rest refit, costs the consumers' outputs least, and
updates the weights and the inverse Gram matrix as OBS does (ZipLM, Kurtic et al. 2023). It
sees what the importance below cannot: a channel that others duplicate costs nothing once the
refit moves its weights onto them. Measured on MiniLM-L6 (masked cosine, MLP neurons only):
3 % of the FLOPs 0.9785 -> 0.9787, 6 % 0.9675 -> 0.9687, 10 % 0.9490 -> 0.9529; heads only,
two per block (5.6 %): 0.9645 -> 0.9675.

**Importance** of channel ``r`` (``importance``): ``"magnitude"``, the L2 norm of the producer's
weights of ``r`` times ``|gamma / sqrt(var + eps)|`` of a BatchNormalization in the region (Li et
al. 2017, "Pruning Filters for Efficient ConvNets", section 3.1, with the BN scale that network
slimming uses, Liu et al. 2017); ``"activation"``, ``||x_r - mean x_r||_2`` over the calibration
data at the consumers' input times the L2 norm of the consumers' weights reading ``r`` (the
output error of replacing ``x_r`` by its mean, as in the Wanda criterion, Sun et al. 2023).
Constant channels have importance 0. A head's importance is the root sum of squares of its
features' (magnitude: the V columns' norms times the output projection rows'). Channels go by
``threshold`` (importance below it) or to remove a fraction ``flops`` of the weighted ops'
FLOPs, the same fraction of channels (heads) of every layer (found by bisection);
``min_channels`` keeps a floor per layer.

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

Statistics (JSON-serializable): ``layers`` (prunable, attention blocks included), ``refused``
(``{reason: count}``; attention blocks' as ``"attention heads: ..."``), ``flops_target``,
``flops_planned`` (fraction the proposals remove), ``proposed`` / ``accepted`` (tensors),
``layers_pruned``, ``channels_removed`` (of channel layers), ``heads_removed``,
``flops_before`` /
``flops_after`` / ``flops_removed`` (fraction), ``params_before`` (weights of the weighted ops),
``params_removed`` (every sliced tensor), ``per_layer``: ``{node: {flops_before, flops_after,
channels, removed, params_removed}}`` (an attention block's also ``heads``,
``heads_removed``).

Errors: :class:`onnxopt.errors.UsageError` for invalid options, and for ``importance =
"activation"`` or ``reconstruct`` without calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt import external
from onnxopt.analyses import TensorTypes
from onnxopt.analyses.activations import calibration_feeds, collect
from onnxopt.analyses.manager import Analysis
from onnxopt.budget import Proposal
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph, opset_version
from onnxopt.names import fresh_name
from onnxopt.ops import FLOAT_DTYPES, PROBE_OPS, is_default_domain, probe
from onnxopt.pass_manager import Pass, PassContext, PassResult, register

#: Ops whose FLOPs are counted (the weighted ops).
WEIGHTED = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
#: Dampening of the reconstruction's normal equations, relative to each channel's diagonal entry.
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
        min_channels: channels (heads, of an attention block) every layer keeps: a count
            (>= 1) or a fraction in (0, 1)
            (default: half; without retraining, removing more ruins most layers).
        round_to: a layer whose channel count is a multiple of this keeps a multiple of it
            (fewer channels removed): onnxruntime's x86 convolutions run in blocked NCHWc
            layouts (8 channels on AVX2, 16 on AVX-512) only for channel counts they divide;
            1: no rounding. Heads are not rounded.
    """

    flops: float | str | None = None
    threshold: float | None = None
    importance: str = "magnitude"
    reconstruct: bool = False
    min_channels: float = 0.5
    round_to: int = 8

    def check(self) -> str | None:
        if not isinstance(self.round_to, int) or self.round_to < 1:
            return f"option round_to must be a positive integer, got {self.round_to!r}"
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

    An attention block (:func:`discover_heads`) is a layer of ``channels`` features removed in
    blocks of ``block`` (one head): ``producer`` is the projection whose silencing zeroes a head
    (V), ``producers`` the others (Q, K), ``head_axes`` the ``(tensor, axis, unit)`` of every
    region tensor (its dim there is the kept features divided by ``unit``), ``shape_edits`` the
    ``(Reshape, leading dims copied, features per head or None)`` of each split (merge)
    Reshape, which reads ``[0, ..., heads kept, size]`` (``[0, ..., features kept]``) after
    apply.
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
    params_removed: int = 0
    block: int = 1
    producers: list[gs.Node] = field(default_factory=list)
    head_axes: list[tuple] = field(default_factory=list)
    shape_edits: list[tuple] = field(default_factory=list)
    order: np.ndarray | None = None

    @property
    def units(self) -> int:
        """What is removed whole: channels, or heads."""
        return self.channels // self.block

    def expand(self, units) -> list[int]:
        """The channels (features) of ``units``."""
        return sorted(int(u) * self.block + j for u in units for j in range(self.block))

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


def _rows(values: np.ndarray, axis: int, channels: int) -> np.ndarray:
    """``values`` as float64 ``[channels, -1]``: one row per channel along ``axis``."""
    return np.moveaxis(values.astype(np.float64), axis, 0).reshape(channels, -1)


def _norm(layer: Layer, tensors) -> np.ndarray:
    """Per channel: the L2 norm of the values of ``(tensor, axis)`` pairs (or consumer folds)."""
    return np.sqrt(sum((_rows(t.values, axis, layer.channels) ** 2).sum(axis=1)
                       for t, axis in tensors))


def _zero_channels(layer: Layer) -> np.ndarray:
    """Boolean ``[C]``: the producer's weights of the channel are all zero."""
    w, axis = layer.slices[0]
    moved = np.moveaxis(w.values, axis, 0).reshape(layer.channels, -1)
    return ~np.any(moved != 0, axis=1)


def _magnitude(layer: Layer) -> np.ndarray:
    norm = _norm(layer, layer.slices[:1])
    for r in layer.region:
        if r.op == "BatchNormalization":
            gamma, var = r.inputs[1].values, r.inputs[4].values
            norm = norm * np.abs(gamma / np.sqrt(var + r.attrs.get("epsilon", 1e-5)))
            break
    return norm


def _consumer_norm(layer: Layer) -> np.ndarray:
    return _norm(layer, [(cw, axis) for _, cw, axis, _, _ in layer.folds])


# --- attention heads ----------------------------------------------------------------------------

#: Elementwise ops a head region passes through when their other operands are the same for every
#: head (size 1 on the head axes, checked on the inferred shapes).
_HEAD_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where"})
#: Ops that pass a head region's tensor on unchanged in layout.
_HEAD_UNARY = frozenset({"Cast", "Identity", "Dropout"})


@dataclass(frozen=True)
class _HeadLayout:
    """Where the heads are in a tensor of a head region (rank ``rank``): ``merged``, the
    ``features`` (heads x ``size``, head-major) on ``axis``; else the heads on ``axis`` and the
    features within a head on ``inner`` (None: attention scores, no feature axis)."""

    axis: int
    inner: int | None
    merged: bool
    rank: int
    features: int

    def shifted(self, rank: int) -> "_HeadLayout":
        """The layout after broadcasting to ``rank`` (leading axes added)."""
        k = rank - self.rank
        return _HeadLayout(self.axis + k, None if self.inner is None else self.inner + k,
                           self.merged, rank, self.features)


class _HeadComponent:
    """What discovery gathers about one connected head region (see :func:`discover_heads`)."""

    def __init__(self) -> None:
        self.failed: str | None = None
        self.size: int | None = None  # features per head
        self.seeds: list[tuple] = []  # (producer, weight, axis, bias, bias axis, start)
        self.region: list[gs.Node] = []
        self.consumers: list[gs.Node] = []
        self.layouts: list[tuple[gs.Variable, int, int]] = []  # (tensor, axis, unit)
        # (Reshape, leading dims copied, features per head: a split; None: a merge)
        self.edits: list[tuple[gs.Node, int, int | None]] = []

    def fail(self, reason: str) -> None:
        self.failed = self.failed or reason


def _topological(graph: gs.Graph) -> list[gs.Node]:
    """The main graph's nodes in a topological order (Kahn; ties in list order)."""
    ids = {id(n): n for n in graph.nodes}
    waiting = {id(n): sum(1 for t in n.inputs for p in t.inputs if id(p) in ids)
               for n in graph.nodes}
    ready = [n for n in graph.nodes if waiting[id(n)] == 0]
    order = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for t in n.outputs:
            for r in t.outputs:
                if id(r) in waiting:
                    waiting[id(r)] -= sum(1 for x in r.inputs if x is t)
                    if waiting[id(r)] == 0:
                        ready.append(r)
    return order


def _head_seed(node: gs.Node, types, outputs: set[int]) -> tuple | None:
    """``(weight, axis, bias, bias axis, start tensor)`` of a MatMul/Gemm that may start a head
    region: its output (after a per-feature bias Add of a MatMul) with a known rank."""
    found = _producer(node)
    if found is None or found[2] != "matrix" or not _single_use(found[0], node):
        return None
    w, axis, _ = found
    features = w.values.shape[axis]
    bias, bias_axis, start = None, 0, node.outputs[0]
    if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
        b = node.inputs[2]
        if not _const(b) or b.values.size != features or not _single_use(b, node):
            return None  # a scalar C would not silence
        bias, bias_axis = b, b.values.ndim - 1
    readers = list(start.outputs)
    if node.op == "MatMul" and len(readers) == 1 and readers[0].op == "Add" \
            and id(start) not in outputs:
        add = readers[0]
        b = add.inputs[1] if add.inputs[0] is start else add.inputs[0]
        if _const(b) and b.values.ndim == 1 and b.values.size == features \
                and _single_use(b, add):
            bias, start = b, add.outputs[0]
    rank = types.rank(start)
    if rank is None or rank < 2:
        return None
    return w, axis, bias, bias_axis, start


def _reshape_step(node: gs.Node, s: _HeadLayout, comp: _HeadComponent,
                  types) -> _HeadLayout | None:
    """The layout after a Reshape that splits merged features into (heads, size) or merges them
    back; None (the component failed) otherwise. The shape may be computed (``Concat`` of
    ``Shape`` dims, as exporters write it): its value in terms of the input's dims
    (:meth:`TensorTypes.shape_value`) must keep the leading dims; apply then reads a constant
    ``[0, ..., 0, heads kept, size]`` or ``[0, ..., 0, features kept]`` instead (recorded in
    ``comp.edits``; never ``-1``, which onnxruntime refuses on an empty tensor: batch 0)."""
    shape = node.inputs[1] if len(node.inputs) > 1 else None
    if shape is None or node.attrs.get("allowzero", 0):
        comp.fail("Reshape with allowzero")
        return None
    if isinstance(shape, gs.Constant):
        v = [int(x) for x in np.asarray(shape.values).reshape(-1)]
    else:
        v = types.shape_value(shape)
        if v is None:
            comp.fail("computed Reshape shape")
            return None
        v = list(v)
    dims = types.symbolic_shape(node.inputs[0]) or ()

    def keeps(k: int) -> bool:  # the first k dims are copied
        return len(dims) >= k and all(
            e == 0 or (e is not None and e == d) for e, d in zip(v[:k], dims[:k]))

    if s.merged and s.axis == s.rank - 1 and len(v) == s.rank + 1 and keeps(s.rank - 1) \
            and isinstance(v[-1], int) and v[-1] > 0 and s.features % v[-1] == 0:
        size = v[-1]
        heads = s.features // size
        if comp.size not in (None, size) or v[-2] not in (-1, heads):
            comp.fail("Reshape does not split whole heads")
            return None
        comp.size = size
        comp.edits.append((node, s.rank - 1, size))
        return _HeadLayout(s.rank - 1, s.rank, False, s.rank + 1, s.features)
    if not s.merged and s.axis == s.rank - 2 and s.inner == s.rank - 1 \
            and len(v) == s.rank - 1 and keeps(s.rank - 2) and v[-1] in (-1, s.features):
        comp.edits.append((node, s.rank - 2, None))
        return _HeadLayout(s.rank - 2, None, True, s.rank - 1, s.features)
    comp.fail("Reshape across heads")
    return None


def _head_step(node: gs.Node, layouts: dict[int, _HeadLayout], comp: _HeadComponent,
               types, opset: int) -> _HeadLayout | None | bool:
    """What ``node``, reading region tensors (``layouts``), does to the heads: the layout of its
    output; True when it is a consumer (a MatMul/Gemm with a constant weight reading the merged
    features); None when the component fails (the reason recorded)."""
    ins = [layouts.get(id(t)) for t in node.inputs]
    op = node.op if is_default_domain(node) else f"{node.domain}.{node.op}"
    first = ins[0] if ins else None
    if op in ("MatMul", "Gemm") and first is not None and all(s is None for s in ins[1:]):
        if first.merged and first.axis == first.rank - 1 \
                and _consumer_axis(node, node.inputs[0], "matrix") is not None:
            return True
        comp.fail(f"{op} with a weight across heads")
        return None
    if op == "MatMul" and first is not None and ins[1] is not None:
        a, b = first, ins[1]
        rank = max(a.rank, b.rank)
        if a.merged or b.merged or a.axis - a.rank != b.axis - b.rank \
                or a.axis >= a.rank - 2 or b.axis >= b.rank - 2:
            comp.fail("MatMul mixes heads")
            return None
        axis = rank + a.axis - a.rank
        if a.inner == a.rank - 1 and b.inner == b.rank - 2:  # Q K^T: scores
            return _HeadLayout(axis, None, False, rank, a.features)
        if a.inner is None and b.inner == b.rank - 1:  # scores V
            return _HeadLayout(axis, rank - 1, False, rank, a.features)
        comp.fail("MatMul mixes features across heads")
        return None
    if any(s is None for s in ins[:1]) and op not in _HEAD_ELEMENTWISE:
        comp.fail(f"{op} reads the heads as a parameter")
        return None
    if op == "Reshape":
        return _reshape_step(node, first, comp, types)
    if op == "Transpose":
        perm = list(node.attrs.get("perm", range(first.rank - 1, -1, -1)))
        return _HeadLayout(perm.index(first.axis),
                           None if first.inner is None else perm.index(first.inner),
                           first.merged, first.rank, first.features)
    if op in ("Softmax", "LogSoftmax"):
        axis = node.attrs.get("axis", -1 if opset >= 13 else 1)
        axis = axis + first.rank if axis < 0 else axis
        if first.merged or axis != first.rank - 1 or first.axis == axis:
            comp.fail(f"{op} across heads")
            return None
        return first
    if op in _HEAD_UNARY:
        if any(t.outputs for t in node.outputs[1:]):
            comp.fail(f"{op} mask output read")
            return None
        return first
    if op in _HEAD_ELEMENTWISE:
        region = [s for s in ins if s is not None]
        ranks = [s.rank if s is not None else types.rank(t) for s, t in zip(ins, node.inputs)]
        if any(r is None for r in ranks) or (op == "Where" and ins[0] is not None):
            comp.fail(f"{op} operand of unknown rank")
            return None
        rank = max(ranks)
        out = region[0].shifted(rank)
        if any(s.shifted(rank) != out for s in region):
            comp.fail(f"{op} of two head layouts")
            return None
        for s, t in zip(ins, node.inputs):
            if s is not None:
                continue
            shape = types.shape(t)
            if shape is None:
                comp.fail(f"{op} operand of unknown shape")
                return None
            for axis in (out.axis, out.inner):
                j = None if axis is None else axis - (rank - len(shape))
                if j is not None and j >= 0 and shape[j] != 1:
                    comp.fail(f"{op} operand differs per head")
                    return None
        return out
    comp.fail(op)
    return None


def _zero_preserved(comp: _HeadComponent, start: gs.Tensor) -> bool:
    """Whether a zero head of ``start`` gives a zero head at every consumer's input (MatMul,
    Mul, Reshape, Transpose and the unary ops keep a zero; a Div only as dividend by a constant
    without zeros; Where only when both branches are zero)."""
    zero = {id(start)}
    for n in comp.region:
        z = [id(t) in zero for t in n.inputs]
        if n.op in ("MatMul", "Mul"):
            keeps = any(z)
        elif n.op == "Div":
            d = n.inputs[1]
            keeps = z[0] and isinstance(d, gs.Constant) and np.all(np.asarray(d.values) != 0)
        elif n.op == "Where":
            keeps = z[1] and z[2]
        elif n.op in ("Reshape", "Transpose") or n.op in _HEAD_UNARY:
            keeps = z[0]
        else:
            keeps = False
        if keeps:
            zero.add(id(n.outputs[0]))
    return all(id(c.inputs[0]) in zero for c in comp.consumers)


def discover_heads(graph: gs.Graph, types) -> tuple[list[Layer], dict[str, int]]:
    """Every attention block of the main graph whose heads can be removed, as a :class:`Layer`
    of ``block`` = features per head, and the refusals ``{reason: count}``.

    A head region starts at MatMul/Gemm producers with constant weights (Q, K, V projections,
    with their bias Add) and ends at MatMul/Gemm consumers with constant weights (the output
    projection). In between, every op must act on each head alone, which is checked on the
    layout of the heads in each tensor (:class:`_HeadLayout`; ranks and broadcast shapes from
    ONNX shape inference, ``types``): a Reshape from ``[..., heads x size]`` to ``[..., -1 or
    heads, size]`` and back (constant shapes), Transpose, MatMul batched over the heads (``Q
    K^T`` and ``scores V``), Softmax over the last axis, elementwise ops whose other operands
    are the same for every head (the attention mask, a scale), Cast/Identity/Dropout. A region
    with no such split is not an attention block (an MLP is a channel layer). Removing head
    ``h`` slices the features ``h x size ... (h + 1) x size - 1`` of every producer and
    consumer; each split and merge Reshape reads a constant shape naming the heads kept after
    it. The equivalent model
    silences a producer whose zero head stays zero up to the consumers (V: ``scores x 0``)."""
    outputs = {id(t) for t in graph.outputs}
    main = {id(n) for n in graph.nodes}
    opset = opset_version(graph)
    comps: list[_HeadComponent] = []
    parent: list[int] = []

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    layouts: dict[int, _HeadLayout] = {}
    owner: dict[int, int] = {}
    tensors: dict[int, gs.Tensor] = {}
    bias_adds: set[int] = set()
    for node in graph.nodes:
        seed = _head_seed(node, types, outputs)
        if seed is None:
            continue
        w, axis, bias, bias_axis, start = seed
        comp = _HeadComponent()
        comp.seeds.append((node, w, axis, bias, bias_axis, start))
        comps.append(comp)
        parent.append(len(parent))
        rank = types.rank(start)
        layouts[id(start)] = _HeadLayout(rank - 1, None, True, rank, w.values.shape[axis])
        owner[id(start)] = len(comps) - 1
        tensors[id(start)] = start
        if start is not node.outputs[0]:
            bias_adds.add(id(start.inputs[0]))
            comps[-1].layouts.append((node.outputs[0], rank - 1, 1))
        comps[-1].layouts.append((start, rank - 1, 1))
    for node in _topological(graph):
        if id(node) in bias_adds:
            continue
        held = [owner[id(t)] for t in node.inputs if id(t) in layouts]
        if not held:
            continue
        root = find(held[0])
        for h in held[1:]:
            other = find(h)
            if other != root:
                parent[other] = root
                into, merged = comps[root], comps[other]
                into.failed = into.failed or merged.failed
                if merged.size is not None and into.size not in (None, merged.size):
                    into.fail("heads of different sizes meet")
                into.size = into.size or merged.size
                for name in ("seeds", "region", "consumers", "layouts", "edits"):
                    getattr(into, name).extend(getattr(merged, name))
        comp = comps[root]
        step = _head_step(node, layouts, comp, types, opset)
        if step is True:
            comp.consumers.append(node)
        elif step is not None:
            comp.region.append(node)
            out = node.outputs[0]
            layouts[id(out)] = step
            for o in node.outputs:  # a Dropout's mask too: graph outputs and subgraphs checked
                owner[id(o)] = root
                tensors[id(o)] = o
            unit = 1 if step.merged else 0
            comp.layouts.append((out, step.axis, unit))
    for key, t in tensors.items():
        comp = comps[find(owner[key])]
        if key in outputs:
            comp.fail("heads reach a graph output")
        if any(id(r) not in main for r in t.outputs):
            comp.fail("read inside a subgraph")
    layers, refused = [], {}
    for i, comp in enumerate(comps):
        if find(i) != i or comp.size is None:
            continue  # merged into another, or no heads (an MLP: a channel layer)
        seed = _check_heads(comp) if comp.failed is None else None
        if seed is None:
            refused[f"attention heads: {comp.failed}"] = \
                refused.get(f"attention heads: {comp.failed}", 0) + 1
            continue
        layers.append(_head_layer(comp, seed, main))
    return layers, refused


def _check_heads(comp: _HeadComponent) -> tuple | None:
    """The seed whose projection silences the heads, or None (``comp`` failed, the reason
    recorded): its weights and consumers must be sliceable too."""
    features = {int(s[1].values.shape[s[2]]) for s in comp.seeds}
    if len(features) != 1 or not comp.consumers:
        comp.fail("projections of different widths" if comp.consumers else "no consumer layer")
        return None
    (features,) = features
    if {id(s[0]) for s in comp.seeds} & {id(c) for c in comp.consumers}:
        comp.fail("a projection reads the heads")
        return None
    for c in comp.consumers:
        cw = c.inputs[1]
        if not _single_use(cw, c):
            comp.fail("consumer weight is shared")
        elif cw.values.shape[_consumer_axis(c, c.inputs[0], "matrix")] != features:
            comp.fail("consumer channels do not match")
    seed = next((s for s in comp.seeds if _zero_preserved(comp, s[5])), None)
    if seed is None:
        comp.fail("no projection silences a head")
    return None if comp.failed else seed


def _head_layer(comp: _HeadComponent, seed: tuple, main: set[int]) -> Layer:
    """The :class:`Layer` of a checked head component whose ``seed`` silences the heads."""
    node, w, axis, bias, bias_axis, _ = seed
    features = int(w.values.shape[axis])
    slices, others = [], []
    for p, pw, pa, pb, pba, _ in [seed] + [s for s in comp.seeds if s is not seed]:
        slices.append((pw, pa))
        if pb is not None:
            slices.append((pb, pba))
        if p is not node:
            others.append(p)
    silence = [(w, axis)] + ([(bias, bias_axis)] if bias is not None else [])
    folds = []
    for c in comp.consumers:
        cw = c.inputs[1]
        ca = _consumer_axis(c, c.inputs[0], "matrix")
        b, how = _bias_of(c, main)
        folds.append((c, cw, ca, b, how))
        slices.append((cw, ca))
    terminal = list({id(c.inputs[0]): c.inputs[0] for c in comp.consumers}.values())
    # a merged axis counts features (unit 1), a head axis heads (unit: features per head)
    layouts = [(t, axis, unit or comp.size) for t, axis, unit in comp.layouts]
    layer = Layer(node, features, "matrix", comp.region, comp.consumers, slices, silence, folds,
                  [t for t, _, _ in comp.layouts], [], terminal)
    layer.block, layer.producers, layer.head_axes = comp.size, others, layouts
    layer.shape_edits = comp.edits
    layer.silenced = np.zeros(features)
    return layer


def _types(graph: gs.Graph, ctx) -> TensorTypes:
    """The graph's :class:`TensorTypes` (the analysis manager's when there is one)."""
    return ctx.analyses.get(TensorTypes) if ctx.analyses is not None \
        else TensorTypes(graph, ctx.template)


def _augmented_gram(ts, keep: np.ndarray) -> np.ndarray:
    """``[X_k 1]^T [X_k 1]`` of the channels ``keep`` of a consumer input's statistics ``ts``
    (Gram matrix, channel sums, rows), float64 ``[k + 1, k + 1]``."""
    g, s = external.unspill(ts.gram), ts.channel_sum
    a = np.zeros((len(keep) + 1, len(keep) + 1))
    a[:-1, :-1] = g[np.ix_(keep, keep)]
    a[:-1, -1] = a[-1, :-1] = s[keep]
    a[-1, -1] = float(ts.rows)
    return a


def _damped(a: np.ndarray) -> np.ndarray:
    """``a + lambda D``: ``D`` the diagonal of ``a`` (floored at 1e-6 of its mean, for channels
    that are always 0), ``lambda`` = :data:`DAMPING`. Relative to each channel's own energy,
    so that scaling a channel (and its consumer weights inversely) changes neither the refit
    nor the OBS order; one dampening of the mean diagonal let a single large channel swamp the
    others."""
    d = np.diag(a).copy()
    d = np.maximum(d, 1e-6 * max(float(np.mean(d)), 1e-30))
    return a + DAMPING * np.diag(d)


def _obs_order(la: Layer, stats, limit: int) -> np.ndarray | None:
    """The first ``limit`` units (channels or heads) of ``la`` in the order greedy Optimal
    Brain Surgeon removal takes them when the consumers are refit (``reconstruct``), or None
    when the layer's consumers cannot be refit (not pointwise, no bias, no Gram matrix).

    With ``H = [X 1]^T [X 1] + lambda I`` from the calibration inputs ``X [rows, C]`` of the
    consumers (a column of ones for the bias, ``lambda`` as in the refit) and ``W [C + 1, M]``
    their weights (input channels as rows, every consumer's outputs side by side; the bias row
    0), removing the channels ``S`` of one unit and refitting the rest changes the consumers'
    outputs by ``tr(W_S^T ((H^-1)_SS)^-1 W_S)`` in squared error summed over the rows
    (Hassibi and Stork 1993; for groups of channels, Kurtic et al. 2023, "ZipLM", section 3.1).
    Each step removes the unit with the least such error and updates ``W`` and ``H^-1`` as
    OBS does, so later choices see the refit of the earlier ones."""
    if limit <= 0 or len(la.terminal_inputs) != 1:
        return None
    ts = stats.get(la.terminal_inputs[0].name)
    if ts is None or ts.gram is None or ts.channel_sum is None \
            or any(b is None or not _pointwise(c) for c, _, _, b, _ in la.folds):
        return None
    c, b = la.channels, la.block
    h = _augmented_gram(ts, np.arange(c))
    try:
        hinv = np.linalg.inv(_damped(h))
    except np.linalg.LinAlgError:
        return None
    w = np.vstack([np.hstack([_rows(cw.values, axis, c) for _, cw, axis, _, _ in la.folds]),
                   np.zeros((1, sum(int(cw.values.size) // c for _, cw, _, _, _ in la.folds)))])
    alive = list(range(la.units))
    order = []
    for _ in range(min(limit, la.units)):
        index = np.array([[u * b + j for j in range(b)] for u in alive])  # [U, b]
        blocks = hinv[index[:, :, None], index[:, None, :]]  # [U, b, b]
        try:
            inverse = np.linalg.inv(blocks)
        except np.linalg.LinAlgError:
            return None
        ws = w[index]  # [U, b, M]
        loss = np.einsum("ubm,ubk,ukm->u", ws, inverse, ws)
        k = int(np.argmin(loss))
        sel, inv_s = index[k], inverse[k]
        w -= hinv[:, sel] @ (inv_s @ w[sel])
        hinv -= hinv[:, sel] @ inv_s @ hinv[sel, :]
        order.append(alive.pop(k))
    return np.array(order, dtype=np.int64)


class ChannelStatistics(Analysis):
    """Per-feed element counts of every weighted op's output (for FLOPs) and channel statistics
    (mean, centered norm, Gram matrix) of every prunable layer's consumer input, from one
    instrumented run over the calibration feeds (validation feeds when there are none); the
    channel statistics leave out the positions the run's drift mask marks 0 (``--drift-mask``:
    padding is not judged, so it need not be fitted)."""

    #: Whether :meth:`compute` also collects Gram matrices (for ``reconstruct``).
    grams = False

    def __init__(self, stats, feeds: int) -> None:
        self.stats, self.feeds = stats, feeds

    @classmethod
    def compute(cls, graph: gs.Graph, ctx) -> "ChannelStatistics":
        feeds = calibration_feeds(ctx, "prune_channels: activation statistics")
        layers, _ = discover(graph, _types(graph, ctx))
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
        # channel statistics leave out the positions the drift mask marks 0 (padding); the
        # element counts of the weighted ops' outputs (FLOPs) keep every position computed
        stats = collect(export_graph(graph, ctx.template), tensors, feeds, grams=grams,
                        histograms=False, rows=ctx.drift_mask(),
                        whole=[n for n, axis in tensors.items() if axis is None])
        return cls(stats.tensors, stats.feeds)


class ChannelGrams(ChannelStatistics):
    """:class:`ChannelStatistics` with the Gram matrix of every consumer input."""

    grams = True


def discover(graph: gs.Graph, types=None) -> tuple[list[Layer], dict[str, int]]:
    """Every prunable layer of the main graph and the refusals ``{reason: count}``: channel
    layers, and with ``types`` (:class:`onnxopt.analyses.TensorTypes`) attention blocks
    (:func:`discover_heads`), whose projections are not counted as refused channel layers."""
    outputs = {id(t) for t in graph.outputs}
    main = {id(n) for n in graph.nodes}
    layers, refused = discover_heads(graph, types) if types is not None else ([], {})
    in_heads = {id(n) for la in layers for n in [la.producer, *la.producers]}
    for node in graph.nodes:
        if _producer(node) is None or id(node) in in_heads:
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
    #: after the lossless passes: their constant Reshape shapes and folded BatchNormalizations
    #: let more layers and attention blocks be found (MiniLM: the heads' Reshapes read Concats
    #: of Shape dims before, and the attention mask's shape is not provable there)
    weights = "fused"
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
        layers, refused = discover(graph, _types(graph, ctx))
        stats, feeds = None, 1
        if has_data or ctx.feeds:
            kind = ChannelGrams if o.reconstruct else ChannelStatistics
            cs = ctx.analyses.get(kind) if ctx.analyses is not None else kind.compute(graph, ctx)
            stats, feeds = cs.stats, cs.feeds
        positions = {id(n): _positions(n, stats, feeds) for n in graph.nodes
                     if n.op in WEIGHTED}
        total_flops = sum(_flops(n, positions[id(n)]) for n in graph.nodes if n.op in WEIGHTED)
        for layer in layers:
            heads = layer.block > 1
            # a head's features all zero: not a constant the region maps to (softmax mixes)
            zero = np.zeros(layer.channels, bool) if heads else _zero_channels(layer)
            # synthesized feeds give FLOP counts, not means to fold
            ts = stats[layer.terminal_inputs[0].name] if stats is not None and has_data \
                else None
            mean = ts.channel_mean if ts is not None and ts.channel_sum is not None \
                and ts.channel_sum.size == layer.channels else None
            if o.importance == "activation":
                centered = np.sqrt(np.maximum(ts.channel_sq_sum - ts.rows * mean ** 2, 0.0))
                importance = centered * _consumer_norm(layer)
            elif heads:  # V's columns and bias (a head of bias alone outputs the bias)
                importance = _norm(layer, layer.silence) * _consumer_norm(layer)
            else:
                importance = _magnitude(layer)
            importance = np.where(zero, 0.0, importance)
            # a head's importance: the root sum of squares of its features'
            layer.importance = np.sqrt((importance.reshape(layer.units, layer.block) ** 2)
                                       .sum(axis=1))
            layer.fold_values = mean if mean is not None else np.zeros(layer.channels)
            if not heads:
                layer.fold_values = np.where(zero, _fold_constants(layer), layer.fold_values)
            layer.cost = layer.block * (
                sum(_flops(p, positions[id(p)], out_kept=1)
                    for p in [layer.producer, *layer.producers, *layer.depthwise]) +
                sum(_flops(c, positions[id(c)], in_kept=1) for c in layer.consumers))
        if o.reconstruct and o.threshold is None and stats is not None:
            for layer in layers:
                limit = layer.units - self._keep_floor(layer.units)
                order = _obs_order(layer, stats, limit)
                if order is not None:  # constant units first: they fold exactly
                    zero = np.flatnonzero(layer.importance == 0).tolist()
                    constant = set(zero)
                    rest = [u for u in order if u not in constant]
                    layer.order = np.array(zero + rest, np.int64)[:max(limit, 0)]
        self._select(layers, total_flops)
        for layer in layers:
            layer.params_removed = _params_removed(layer)
        self._graph = graph
        self._groups: dict[str, list[Layer]] = {}
        groups = self._propose(layers, stats)
        proposals = [p for g in groups for p in g]
        self._layers, self._positions, self._total = layers, positions, total_flops
        self._graph_nodes = [n for n in graph.nodes if n.op in WEIGHTED]
        # summarize runs after apply has sliced the weights: what they were, recorded now
        self._flops_before = {id(n): _flops(n, positions[id(n)]) for n in self._graph_nodes}
        self._params_before = sum(int(n.inputs[1].values.size) for n in self._graph_nodes
                                  if len(n.inputs) > 1 and _const(n.inputs[1]))
        planned = total_flops - self._flops_after(layers)[0]
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

    def _rounded(self, la: Layer, n: int) -> int:
        """``n`` removals, fewer if needed for ``la`` to keep a multiple of ``round_to``."""
        r = self.options.round_to
        if n <= 0 or la.block > 1 or r <= 1 or la.channels % r:
            return n
        return la.channels - int(math.ceil((la.channels - n) / r)) * r

    def _select(self, layers: list[Layer], total: float) -> None:
        o = self.options
        order = {id(la): la.order if la.order is not None
                 else np.argsort(la.importance, kind="stable") for la in layers}

        def count(la: Layer, fraction: float) -> int:
            allowed = la.units - min(self._keep_floor(la.units), la.units)
            zeros = int(np.count_nonzero(la.importance == 0))
            return self._rounded(la, min(allowed, max(int(fraction * la.units), zeros)))

        if o.threshold is not None:
            for la in layers:
                n = self._rounded(la, min(int(np.count_nonzero(la.importance < o.threshold)),
                                          la.units - self._keep_floor(la.units)))
                la.removed = la.expand(order[id(la)][:max(n, 0)])
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
            la.removed = la.expand(order[id(la)][:count(la, high)])

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
            apply = _applier(self._graph, members, tensors, finals, done_slices)
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
        g, s = external.unspill(ts.gram), ts.channel_sum
        w = _rows(cw.values, axis, la.channels)
        a = _augmented_gram(ts, keep)
        rhs = np.vstack([g[keep] @ w, s @ w])
        # the dampening pulls towards the original weights (the bias change towards 0), not
        # towards 0: removing channels that carried nothing changes nothing
        start = np.vstack([w[keep], np.zeros((1, w.shape[1]))])
        damped = _damped(a)
        sol = start + np.linalg.solve(damped, rhs - a @ start)
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

    def _flops_after(self, layers: list[Layer]) -> tuple[float, dict]:
        """FLOPs of the weighted ops once ``layers`` lose their ``removed`` channels, and
        ``{node: {flops_before, flops_after}}`` of the nodes that change. Exact where a node
        loses input channels to one layer and output channels to another (summing the
        layers' costs would count that node's product twice)."""
        out_kept = {id(p): la.channels - len(la.removed) for la in layers
                    for p in [la.producer, *la.producers]}
        out_kept.update({id(d): la.channels - len(la.removed) for la in layers
                         for d in la.depthwise})
        in_kept = {id(c): la.channels - len(la.removed) for la in layers for c in la.consumers}
        per_layer, after = {}, 0.0
        for n in self._graph_nodes:
            before = self._flops_before[id(n)]
            now = _flops(n, self._positions[id(n)], out_kept.get(id(n)), in_kept.get(id(n)))
            after += now
            if now != before:
                per_layer[n.name or n.outputs[0].name] = {"flops_before": before,
                                                          "flops_after": now}
        return after, per_layer

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        if "layers" not in result.stats:
            return dict(result.stats)
        applied = [la for g in dict.fromkeys(p.group for p in accepted)
                   for la in self._groups[g]]
        after, per_layer = self._flops_after(applied)
        for la in applied:
            per_layer.setdefault(la.name, {}).update(
                channels=la.channels, removed=len(la.removed),
                params_removed=la.params_removed)
            if la.block > 1:
                per_layer[la.name].update(heads=la.units,
                                          heads_removed=len(la.removed) // la.block)
        params = self._params_before
        removed = sum(la.params_removed for la in applied)
        total = self._total
        return {**result.stats, "proposed": len(result.proposals), "accepted": len(accepted),
                "layers_pruned": len(applied),
                "channels_removed": sum(len(la.removed) for la in applied if la.block == 1),
                "heads_removed": sum(len(la.removed) // la.block for la in applied
                                     if la.block > 1),
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


def _applier(graph: gs.Graph, members: list[Layer], tensors: dict, values: dict,
             done_slices: dict):
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
            for reshape, copied, size in la.shape_edits:
                shape = [0] * copied + ([kept // size, size] if size else [kept])
                reshape.inputs[1] = gs.Constant(fresh_name(graph, f"{reshape.name or 'Reshape'}"
                                                           "_shape"), np.array(shape, np.int64))
            for v, axis, unit in la.head_axes:
                if v.shape is not None and len(v.shape) > axis:
                    v.shape = [kept // unit if i == axis else d for i, d in enumerate(v.shape)]
            for v in la.variables if not la.head_axes else ():
                if v.shape is not None and len(v.shape):
                    shape = list(v.shape)
                    shape[1 if la.rank_kind == "conv" else len(shape) - 1] = kept
                    v.shape = shape
    return apply
