"""SmoothQuant: migrate activation outliers into the weights, before quantization.

Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML, section 4. A MatMul ``Y = X W`` (``W[K, N]`` constant) whose activation
``X[..., K]`` has a few input channels of large magnitude is hard to quantize per tensor; with a
per-channel factor ``s[K] > 0``::

    Y = (X diag(s)^-1) (diag(s) W)          exact in real arithmetic
    s_j = max |X_j|^alpha / max |W_j|^(1 - alpha)        (eq. 4; alpha: the migration strength)

``max |X_j|`` comes from calibration (``onnxopt.analyses.ActivationStats``' ``channel_absmax``),
``max |W_j|`` is the largest magnitude of row ``j`` over every smoothed weight reading ``X``
(Q, K and V share one ``s``). The division by ``s`` is folded into the op producing ``X``:

* ``LayerNormalization`` (normalized over the last axis, constant 1-D gamma/beta):
  ``gamma' = gamma / s``, ``beta' = beta / s``;
* ``Mul(a, c)`` or ``Div(a, c)`` with a constant ``c`` broadcasting along the last axis
  (``c' = c / s`` or ``c * s``): the last Mul of an exported GELU, the affine end of a decomposed
  LayerNorm;
* ``Add(a, c)`` with a constant ``c``: ``c' = c / s`` and ``a`` smoothed the same way (its only
  reader being this Add), so the ``Add(Mul(normalized, gamma), beta)`` of a decomposed LayerNorm
  qualifies;
* an attention's merged heads (the input of its output projection, ``Reshape(Transpose(
  softmax(Q K^T) V))``): the columns of the value projection's weight and bias,
  ``W_v' = W_v diag(s)^-1`` (channel ``c`` of the merged heads is linear in column ``c`` of
  ``V`` alone; the head split and merge only move channels).

With ``explicit_mul`` the pass instead inserts ``X' = Mul(X, 1/s)``, read by the smoothed readers
only (the others keep reading ``X``; no compensation), wherever the producer cannot absorb the
factors (a Gather, an activation function...) and where absorbing them would turn the
scalar constant of a GELU into a vector: onnxruntime fuses the exported erf-GELU
``x * 0.5 * (1 + erf(x / sqrt 2))`` into one Gelu kernel only with its scalar constants
(``onnxruntime/core/optimizer/gelu_fusion.cc``). One elementwise pass over ``X`` costs less than
the four unfused GELU passes: MiniLM-L6 int8-dynamic with its FFN2 inputs smoothed through the GELU
constant ran 0.817x fp32, without them 0.765x (one interleaved run, loaded machine). (MiniLM's
attention output projections, whose simulated int8 error on calibration data halves in the first
layer at alpha 0.75 -- 1.39e-3 -> 7.6e-4 relative --, were smoothed so before the value
projection absorbed their factors.)

``s`` is applied only where it lowers ``max_j |X'_j| · mean_n max_k |W'_kn|`` (the product of
the per-tensor activation step and the mean per-channel weight step, to which the rounding noise
of ``X' W'`` is proportional); otherwise the activation is refused with that reason -- at
``alpha = 0.5`` MiniLM's GELU outputs (FFN2 inputs), whose channels are even and whose weight
rows are not, would get twice the outlier ratio.

Every reader of ``X`` must see the same values: MatMul (``X`` as A, constant 2-D ``B``) and Gemm
(``transA = 0``, constant ``B``) readers get ``diag(s) W``; any other reader (a post-LN
transformer's residual Add, in BERT every LayerNorm output) reads ``Mul(X', s)`` -- one added Mul,
exact in float -- when ``compensate`` is set, otherwise the tensor is refused. A tensor that is a
graph output is refused.

The rewrite is lossless in exact arithmetic (float rounding only), but needs calibration data and
must run once, before the quantizer: the pass is not a lossless pass (``lossless = False``) and
changes the graph itself (no proposals for the drift budget).

Statistics: ``smoothed`` (activations), ``weights_scaled``, ``compensated`` (Mul nodes added),
``inserted`` (``explicit_mul`` Mul nodes added),
``max_ratio_before``/``max_ratio_after`` (the largest ``max_j |X_j| / median_j |X_j|`` of the
smoothed activations, before and after), ``alpha``, ``refused`` (``{reason: count}``).

Errors: none of its own (``UsageError`` from the pass manager without calibration data).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import ActivationStats, TensorTypes, UseDef
from onnxopt.analyses.activations import EveryPositionStats
from onnxopt.edit import input_slots
from onnxopt.names import fresh_name
from onnxopt.ops import input_channel_axis
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._attention import Rank, merged_heads, producer
from onnxopt.passes._quant import QuantizeOptions, excluded, spread

#: Bounds of the smoothing factors (a channel that never fires would otherwise get s = 0).
S_MIN, S_MAX = 1e-5, 1e5


@dataclass(frozen=True)
class SmoothQuantOptions(QuantizeOptions):
    """Options of :class:`SmoothQuant` (``exclude`` / ``ops`` name the MatMul/Gemm readers that
    keep their weights; see :class:`~onnxopt.passes._quant.QuantizeOptions`).

    Attributes:
        alpha: migration strength in [0, 1] (0.5 in the paper for most models; larger moves more
            of the activation range into the weights).
        compensate: let a reader that cannot absorb the factors read ``Mul(X', s)`` (one added
            Mul per smoothed activation) instead of refusing the activation.
        explicit_mul: divide by ``s`` in an inserted ``Mul(X, 1/s)`` read by the smoothed readers
            where the producer cannot absorb it or would lose onnxruntime's Gelu fusion (its
            scalar constant made a vector); off: such activations are refused.
        needs_data: without calibration data, refuse the run (True, a UsageError from the
            pass manager) or change nothing and say so (False: a mode that works without data,
            ``int8-dynamic``, smooths only when it has some).
        drift_mask: take ``max |X_j|`` over the positions the run's drift mask keeps (True:
            the activations are quantized with calibrated ranges, which clip the padding) or
            over every position (False: ``int8-dynamic``, whose run-time ranges the padding
            sets too; ``onnxopt.analyses.activations.EveryPositionStats``).
    """

    alpha: float = 0.5
    compensate: bool = True
    explicit_mul: bool = False
    needs_data: bool = True
    drift_mask: bool = True

    def check(self) -> str | None:
        if not 0.0 <= self.alpha <= 1.0:
            return f"option alpha must be in [0, 1], got {self.alpha}"
        return super().check()


def _constant(t) -> np.ndarray | None:
    return t.values if isinstance(t, gs.Constant) and isinstance(t.values, np.ndarray) else None


def _channel_constant(t, channels: int) -> np.ndarray | None:
    """``t``'s value when it is a float constant that broadcasts along the last axis of a
    tensor with ``channels`` channels (a scalar, or a shape ending in 1 or ``channels`` with
    only ones before), else None."""
    c = _constant(t)
    if c is None or c.dtype != np.float32:
        return None
    if c.ndim and (c.shape[-1] not in (1, channels) or any(d != 1 for d in c.shape[:-1])):
        return None
    return c


def _ends_erf_gelu(node: gs.Node, depth: int = 3) -> bool:
    """Whether an Erf produces one of ``node``'s inputs within ``depth`` producers: ``node`` is
    a Mul of the exported ``x * 0.5 * (1 + erf(x / sqrt 2))``, in either order."""
    producers = [t.inputs[0] for t in node.inputs if isinstance(t, gs.Variable) and t.inputs]
    return any(p.op == "Erf" or (depth > 1 and _ends_erf_gelu(p, depth - 1)) for p in producers)


def _smoothing_edits(x: gs.Variable, channels: int, usedef: UseDef, rank: Rank,
                     explicit_mul: bool = False) -> list | str:
    """How to divide ``x`` by ``s`` at its producer: a list of ``(node, input index, op)`` with
    op ``"div"`` (the constant becomes ``c / s``) or ``"mul"`` (``c * s``); or why not. With
    ``explicit_mul`` the scalar constant of an erf-GELU is not made a vector (a reason)."""
    if len(x.inputs) != 1:
        return "graph input"
    node = x.inputs[0]
    if node.domain not in (None, "", "ai.onnx"):
        return f"produced by {node.op}"
    if node.op == "LayerNormalization":
        gamma = _channel_constant(node.inputs[1], channels)
        if node.attrs.get("axis", -1) not in (-1, len(x.shape or ()) - 1) or gamma is None \
                or gamma.ndim != 1:
            return "LayerNormalization not over the last axis with constant 1-D gamma"
        edits = [(node, 1, "div")]
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            if _channel_constant(node.inputs[2], channels) is None:
                return "LayerNormalization bias not constant"
            edits.append((node, 2, "div"))
        return edits
    if node.op in ("Mul", "Div", "Add") and len(node.inputs) == 2:
        sides = [i for i in (0, 1) if _channel_constant(node.inputs[i], channels) is not None]
        if node.op == "Div" and sides != [1]:
            return "Div without a constant divisor"
        if len(sides) != 1:
            return f"{node.op} without exactly one constant operand"
        c = sides[0]
        if node.op != "Add":
            if explicit_mul and node.inputs[c].values.size == 1 and _ends_erf_gelu(node):
                return "scalar constant of an erf-GELU (onnxruntime's Gelu fusion needs it)"
            return [(node, c, "mul" if node.op == "Div" else "div")]
        a = node.inputs[1 - c]
        if not isinstance(a, gs.Variable) or len(a.outputs) != 1 or usedef.on_boundary(a):
            return "Add whose other operand has other readers"
        inner = _smoothing_edits(a, channels, usedef, rank, explicit_mul)
        return inner if isinstance(inner, str) else [(node, c, "div")] + inner
    if node.op == "Reshape":
        return _attention_value_edits(x, channels, usedef, rank)
    return f"produced by {node.op}"


def _attention_value_edits(x: gs.Variable, channels: int, usedef: UseDef,
                           rank: Rank) -> list | str:
    """Edits dividing an attention's merged heads ``x`` by ``s`` at the value projection.

    ``x = merged(P, v)`` with ``v = MatMul(h, W_v) (+ b_v)`` (``passes/_attention.py``):
    channel ``c`` of ``x`` is ``sum_t P[n, ., t] v[t, c]``, linear in column ``c`` of ``W_v``
    and ``b_v`` alone, so ``W_v[:, c] / s_c`` and ``b_v[c] / s_c`` divide it exactly. Saves the
    inserted ``Mul(x, 1/s)`` of each attention output projection. Every intermediate must have
    one reader; ``W_v`` and ``b_v`` constants (``[K, channels]`` and ``[channels]``)."""
    def single(t) -> bool:
        return len(t.outputs) == 1 and not usedef.on_boundary(t)

    merged = merged_heads(x, channels, single, rank)
    if isinstance(merged, str):
        return "produced by Reshape"
    v = merged.values.source
    edits = []
    bias = producer(v, "Add", single)
    if bias is not None:
        sides = [i for i in (0, 1) if _channel_constant(bias.inputs[i], channels) is not None]
        if len(sides) != 1:
            return "attention value projection's Add without one constant bias"
        edits.append((bias, sides[0], "div"))
        v = bias.inputs[1 - sides[0]]
    project = producer(v, "MatMul", single)
    w = _constant(project.inputs[1]) if project is not None else None
    if w is None or w.dtype != np.float32 or w.ndim != 2 or w.shape[1] != channels:
        return "attention values not projected by a MatMul with a constant [K, channels] weight"
    return edits + [(project, 1, "div")]


def _smoothable_reader(node: gs.Node, index: int, options: SmoothQuantOptions) -> bool:
    """Whether reader ``(node, index)`` absorbs ``diag(s)`` into its constant weight."""
    if excluded(node, options) is not None or index != 0 or len(node.inputs) < 2:
        return False
    w = _constant(node.inputs[1])
    if w is None or w.dtype != np.float32 or w.ndim != 2:
        return False
    if node.op == "MatMul":
        return True
    return node.op == "Gemm" and not node.attrs.get("transA", 0)


def _difficulty(absmax: np.ndarray, weights: list) -> float:
    """``max_j |X_j| · mean_n max_k |W_kn|`` over the readers' weights (each scaled by ``s`` along
    its input axis when ``s`` is given): the product of the per-tensor activation step and the
    mean per-channel weight step, which the rounding noise of ``X W`` is proportional to."""
    steps = []
    for w, node, s in weights:
        axis = input_channel_axis(node, 1, 2)
        if s is not None:
            shape = [1, 1]
            shape[axis] = -1
            w = w * s.reshape(shape)
        steps.append(np.abs(w).max(axis=axis))
    return float(absmax.max() * np.concatenate(steps).mean())


@register
class SmoothQuant(Pass):
    name = "smooth_quant"
    description = "SmoothQuant: divide activations by per-channel factors folded into their " \
                  "producer, multiply the weights (exact; before quantization)."
    Options = SmoothQuantOptions
    lossless = False
    requires = frozenset({"calibration"})
    min_opset = 1

    def __init__(self, options=None, **fields) -> None:
        super().__init__(options, **fields)
        if not self.options.needs_data:
            self.requires = frozenset()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if not ctx.has_calibration():  # needs_data=False (the pass manager refuses otherwise)
            return PassResult(False, {"skipped": "no calibration data: activations not "
                                                 "smoothed"})
        usedef, types = ctx.analyses.get(UseDef), ctx.analyses.get(TensorTypes)
        refused: collections.Counter[str] = collections.Counter()
        candidates: dict[str, gs.Variable] = {}
        for node in graph.nodes:
            x = node.inputs[0] if node.inputs else None
            if node.op in ("MatMul", "Gemm") and isinstance(x, gs.Variable) \
                    and _smoothable_reader(node, 0, self.options):
                candidates.setdefault(x.name, x)
        if not candidates:
            return PassResult(False, {"refused": {}})
        stats = ctx.analyses.get(ActivationStats if self.options.drift_mask
                                 else EveryPositionStats)
        smoothed = scaled = compensated = inserted = 0
        before, after = [], []
        for x in candidates.values():
            reason, plan = self._plan(graph, x, stats, usedef, types)
            if reason is not None:
                refused[reason] += 1
                continue
            edits, slots, others, s, absmax = plan
            if edits is None:
                divided = gs.Variable(fresh_name(graph, f"{x.name}_smoothed"), dtype=x.dtype,
                                      shape=x.shape)
                graph.nodes.append(gs.Node(
                    "Mul", name=fresh_name(graph, f"{x.name}_smooth_Mul"),
                    inputs=[x, gs.Constant(fresh_name(graph, f"{x.name}_inverse_smoothing"),
                                           (1.0 / s).astype(np.float32))],
                    outputs=[divided]))
                for node, i in slots:
                    node.inputs[i] = divided
                others, edits = [], []
                inserted += 1
            for node, index, op in edits:
                c = node.inputs[index].values  # a scalar becomes a vector along the channels
                value = (c / s if op == "div" else c * s).astype(np.float32)
                node.inputs[index] = gs.Constant(fresh_name(graph, f"{node.inputs[index].name}"
                                                                   "_smoothed"), value)
            for node, _ in slots:
                w = node.inputs[1]
                axis = input_channel_axis(node, 1, 2)
                shape = [1, 1]
                shape[axis] = -1
                node.inputs[1] = gs.Constant(fresh_name(graph, f"{w.name}_smoothed"),
                                             (w.values * s.reshape(shape)).astype(np.float32))
                scaled += 1
            if others:
                restored = gs.Variable(fresh_name(graph, f"{x.name}_unsmoothed"), dtype=x.dtype,
                                       shape=x.shape)
                graph.nodes.append(gs.Node(
                    "Mul", name=fresh_name(graph, f"{x.name}_unsmooth_Mul"),
                    inputs=[x, gs.Constant(fresh_name(graph, f"{x.name}_smoothing"), s)],
                    outputs=[restored]))
                for node, i in others:
                    node.inputs[i] = restored
                compensated += 1
            smoothed += 1
            before.append(spread(absmax))
            after.append(spread(absmax / s))
        result = {"smoothed": smoothed, "weights_scaled": scaled, "compensated": compensated,
                  "inserted": inserted, "alpha": self.options.alpha,
                  "refused": dict(sorted(refused.items()))}
        if before:
            result["max_ratio_before"], result["max_ratio_after"] = max(before), max(after)
        return PassResult(smoothed > 0, result)

    def summarize(self, result: PassResult, accepted: list) -> dict:
        return dict(result.stats)

    def _plan(self, graph: gs.Graph, x: gs.Variable, stats: ActivationStats, usedef: UseDef,
              types: TensorTypes):
        """``(reason, None)`` when ``x`` cannot be smoothed, else ``(None, (producer edits or
        None for an inserted Mul, smoothed reader slots, compensated reader slots, s, channel
        absmax))``."""
        if usedef.on_boundary(x):
            return "graph input or output", None
        if x.name not in stats or stats[x.name].channel_absmax is None:
            return "no calibration statistics", None
        absmax = np.asarray(stats[x.name].channel_absmax, np.float64)
        channels = absmax.size
        slots = input_slots(x)
        smooth = [(n, i) for n, i in slots if _smoothable_reader(n, i, self.options)
                  and n.inputs[1].values.shape[input_channel_axis(n, 1, 2)] == channels]
        chosen = {(id(n), i) for n, i in smooth}
        others = [(n, i) for n, i in slots if (id(n), i) not in chosen]
        if any(usedef.owner(n) is not graph for n, _ in slots):
            return "read in a subgraph", None
        edits = _smoothing_edits(x, channels, usedef, types.rank, self.options.explicit_mul)
        if isinstance(edits, str):
            if not (self.options.explicit_mul and smooth):
                return edits, None
            edits = None  # Mul(x, 1/s) for the smoothed readers; the others keep reading x
        elif others and not self.options.compensate:
            return "a reader cannot absorb the factors", None
        w_absmax = np.zeros(channels)
        for n, _ in smooth:
            w = np.abs(n.inputs[1].values)
            w_absmax = np.maximum(w_absmax, w.max(axis=1 - input_channel_axis(n, 1, 2)))
        alpha = self.options.alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            s = absmax ** alpha / w_absmax ** (1 - alpha)
        s = np.where(np.isfinite(s) & (s > 0), np.clip(s, S_MIN, S_MAX), 1.0).astype(np.float32)
        if _difficulty(absmax / s, [(n.inputs[1].values, n, s) for n, _ in smooth]) \
                >= _difficulty(absmax, [(n.inputs[1].values, n, None) for n, _ in smooth]):
            return "smoothing would not reduce max|X| x max|W|", None
        return None, (edits, smooth, others, s, absmax)
