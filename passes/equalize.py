"""Cross-layer equalization: balance the per-channel weight ranges of consecutive convolutions.

Nagel et al., 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV, section 4.1. For ``Conv1 -> f -> Conv2`` with ``f`` positively homogeneous
(``f(x / s) = f(x) / s`` for ``s > 0``), output channel ``i`` of Conv1 may be divided by ``s_i``
and input channel ``i`` of Conv2 multiplied by it without changing the result::

    W1'[i] = W1[i] / s_i      b1'[i] = b1[i] / s_i      W2'[:, i] = W2[:, i] * s_i
    s_i = sqrt(r1_i / r2_i)        (r1_i: max |W1[i]|, r2_i: max |W2[:, i]|)

after which both ranges are ``sqrt(r1_i r2_i)``: a per-tensor (or per-channel) int8 grid wastes
less of its range on one channel. Depthwise convolutions, whose channels' ranges differ most
(MobileNet-style models), benefit most; a grouped Conv2 scales the slice of its kernel that reads
channel ``i`` (``W2[g·N/G : (g+1)·N/G, i mod (M/G)]``, ``g = i div (M/G)``). Chains
(``Conv -> Conv -> Conv``) are equalized pair by pair, repeated ``iterations`` times (the paper
iterates to convergence; the ranges move little after a few rounds).

``f`` may be nothing (Conv1 feeds Conv2 directly) or a chain of up to four of: ``Relu``,
``LeakyRelu``, ``PRelu`` (with a slope per channel or shared), ``Identity``, ``Clip`` with min 0
and no max (a ReLU), and per-channel pooling (``MaxPool``, ``AveragePool``, their global forms). Not
homogeneous, hence refused: ``Clip(0, 6)`` (ReLU6: ``min(x / s, 6) != min(x, 6) / s``),
HardSwish, HardSigmoid, Sigmoid, Swish and other bounded or curved activations -- the activations
of most PaddleOCR backbones, so the pass applies there only to their plain-ReLU and linear
(no-activation) pairs.

Conditions, each refusal counted by reason: Conv1's output and every output of the chain read only
by the next node (and not graph outputs); both kernels constant float32; Conv1's bias constant or
absent; ``f``'s parameters (PRelu slope) constant.

Exact in real arithmetic (float rounding only) and data-free, but not a lossless pass in the pass
manager's sense: it runs once, before the quantizer (``lossless = False``), and changes the graph
itself (no proposals).

Statistics: ``pairs`` (equalized), ``iterations``, ``spread_before``/``spread_after`` (mean over
the equalized kernels of ``max_i r_i / median_i r_i``, the per-channel range spread),
``refused`` (``{reason: count}``).

Errors: none of its own.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import UseDef
from onnxopt.edit import clip_bounds
from onnxopt.names import fresh_name
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._quant import spread

#: Ops commuting with a positive per-channel scale ``s`` of their NCHW input
#: (``f(x / s) = f(x) / s``), and Clip with min 0 and no max. Pooling is a max or a mean
#: within a channel.
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "Identity", "MaxPool", "AveragePool",
                         "GlobalAveragePool", "GlobalMaxPool"})
#: Most ops between the two Convs.
MAX_CHAIN = 4
#: Bounds of the factors (a dead channel of either kernel would give 0 or infinity).
S_MIN, S_MAX = 1e-4, 1e4


@dataclass(frozen=True)
class EqualizeOptions:
    """Options of :class:`Equalize`.

    Attributes:
        iterations: rounds over all pairs (chains converge in a few).
        exclude: op types or node names (of either Conv) left alone.
    """

    iterations: int = 10
    exclude: tuple | list = ()

    def check(self) -> str | None:
        if self.iterations < 1:
            return f"option iterations must be at least 1, got {self.iterations}"
        if not all(isinstance(x, str) for x in self.exclude):
            return "option exclude must be a list of op types or node names"
        return None


def _constant(t) -> np.ndarray | None:
    return t.values if isinstance(t, gs.Constant) and isinstance(t.values, np.ndarray) else None


def _kernel(conv: gs.Node) -> np.ndarray | None:
    w = _constant(conv.inputs[1]) if len(conv.inputs) > 1 else None
    return w if w is not None and w.dtype == np.float32 and w.ndim >= 3 else None


def _only_reader(t: gs.Tensor, usedef: UseDef) -> gs.Node | None:
    """The one node reading ``t`` (once), or None."""
    if not isinstance(t, gs.Variable) or usedef.on_boundary(t) or len(t.outputs) != 1:
        return None
    reader = t.outputs[0]
    return reader if sum(x is t for x in reader.inputs) == 1 else None


def _homogeneous(node: gs.Node) -> str | None:
    """Why ``node`` is not positively homogeneous per channel, or None."""
    if node.op in HOMOGENEOUS and node.op != "PRelu":
        return None
    if node.op == "PRelu":
        slope = _constant(node.inputs[1])
        return None if slope is not None else "PRelu slope not constant"
    if node.op == "Clip":
        if clip_bounds(node) == (0.0, None):
            return None
        return "Clip with a bound other than min 0 (e.g. ReLU6) is not homogeneous"
    return f"{node.op} is not homogeneous"


def _pair(conv1: gs.Node, usedef: UseDef, exclude) -> tuple | str | None:
    """``(conv2, [ops between])`` when ``conv1``'s output reaches a Conv directly or through a
    chain of single-reader ops (at most :data:`MAX_CHAIN`); the reason when such a pair cannot
    be equalized; None when ``conv1`` is not followed by a Conv that way."""
    chain, nxt = [], _only_reader(conv1.outputs[0], usedef)
    while nxt is not None and nxt.op != "Conv" and len(chain) < MAX_CHAIN:
        chain.append(nxt)
        nxt = _only_reader(nxt.outputs[0], usedef)
    if nxt is None or nxt.op != "Conv" or nxt.inputs[0] is not (chain or [conv1])[-1].outputs[0]:
        return None
    for op in chain:
        if (reason := _homogeneous(op)) is not None:
            return reason
    if any(n.op in exclude or (n.name and n.name in exclude) for n in (conv1, nxt)):
        return "excluded by the user"
    if _kernel(conv1) is None or _kernel(nxt) is None:
        return "kernel not a constant float32"
    if len(conv1.inputs) > 2 and not conv1.inputs[2].is_empty() \
            and _constant(conv1.inputs[2]) is None:
        return "bias not constant"
    if nxt.inputs[1].shape[1] * nxt.attrs.get("group", 1) != conv1.inputs[1].shape[0]:
        return "channel counts disagree"
    for op in chain:
        if op.op == "PRelu" and op.inputs[1].values.size not in (1, conv1.inputs[1].shape[0]):
            return "PRelu slope not per channel"
    return nxt, chain


def _input_slices(conv2: gs.Node, channels: int) -> list[tuple[slice, int]]:
    """For each input channel ``i`` of ``conv2`` (``channels`` in all), the output-channel slice
    and the kernel column (axis 1) that read it."""
    group = conv2.attrs.get("group", 1)
    n = conv2.inputs[1].shape[0]
    per_group, out_per_group = channels // group, n // group
    return [(slice((i // per_group) * out_per_group, (i // per_group + 1) * out_per_group),
             i % per_group) for i in range(channels)]


def _ranges(w1: np.ndarray, w2: np.ndarray, slices) -> tuple[np.ndarray, np.ndarray]:
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
    r2 = np.array([np.abs(w2[rows, col]).max() for rows, col in slices])
    return r1, r2


@register
class Equalize(Pass):
    name = "equalize"
    description = "Cross-layer equalization of Conv -> (ReLU-like) -> Conv channel ranges " \
                  "(exact; data-free; before quantization)."
    Options = EqualizeOptions
    lossless = False
    min_opset = 1

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        usedef = ctx.analyses.get(UseDef)
        refused: collections.Counter[str] = collections.Counter()
        pairs = []
        for node in graph.nodes:
            if node.op != "Conv" or node.domain not in (None, "", "ai.onnx"):
                continue
            found = _pair(node, usedef, self.options.exclude)
            if isinstance(found, str):
                refused[found] += 1
            elif found is not None:
                pairs.append((node, *found))
        if not pairs:
            return PassResult(False, {"pairs": 0, "refused": dict(sorted(refused.items()))})
        # Work on copies: a kernel may be shared with a node outside the pair.
        weights = {}
        for conv1, conv2, _ in pairs:
            for conv in (conv1, conv2):
                weights.setdefault(id(conv), conv.inputs[1].values.astype(np.float64))
        biases = {id(c1): c1.inputs[2].values.astype(np.float64) for c1, _, _ in pairs
                  if len(c1.inputs) > 2 and not c1.inputs[2].is_empty()}
        slices = {id(c2): _input_slices(c2, c1.inputs[1].shape[0]) for c1, c2, _ in pairs}
        before = [spread(r) for c1, c2, _ in pairs
                  for r in _ranges(weights[id(c1)], weights[id(c2)], slices[id(c2)])]
        for _ in range(self.options.iterations):
            for conv1, conv2, _ in pairs:
                w1, w2 = weights[id(conv1)], weights[id(conv2)]
                r1, r2 = _ranges(w1, w2, slices[id(conv2)])
                with np.errstate(divide="ignore", invalid="ignore"):
                    s = np.sqrt(r1 / r2)
                s = np.where(np.isfinite(s) & (s > 0), np.clip(s, S_MIN, S_MAX), 1.0)
                w1 /= s.reshape([-1] + [1] * (w1.ndim - 1))
                if id(conv1) in biases:
                    biases[id(conv1)] /= s
                for i, (rows, col) in enumerate(slices[id(conv2)]):
                    w2[rows, col] *= s[i]
        after = [spread(r) for c1, c2, _ in pairs
                 for r in _ranges(weights[id(c1)], weights[id(c2)], slices[id(c2)])]
        for conv in {id(c): c for p in pairs for c in p[:2]}.values():
            conv.inputs[1] = gs.Constant(fresh_name(graph, f"{conv.inputs[1].name}_equalized"),
                                         weights[id(conv)].astype(np.float32))
            if id(conv) in biases:
                conv.inputs[2] = gs.Constant(fresh_name(graph,
                                                        f"{conv.inputs[2].name}_equalized"),
                                             biases[id(conv)].astype(np.float32))
        stats = {"pairs": len(pairs), "iterations": self.options.iterations,
                 "spread_before": float(np.mean(before)), "spread_after": float(np.mean(after)),
                 "refused": dict(sorted(refused.items()))}
        return PassResult(True, stats)

    def summarize(self, result: PassResult, accepted: list) -> dict:
        return dict(result.stats)
