"""Pruning: weight values become exactly 0, by magnitude, by activation-aware importance, to a
sparsity or an N:M pattern, optionally refitting the remaining weights layer by layer.

Which values, by option (:class:`PruneOptions`; exactly one of the first four):

* ``threshold`` T: ``|w| < T`` (Han et al., 2015, "Learning both Weights and Connections for
  Efficient Neural Networks", NeurIPS);
* ``relative`` R: ``|w| < R · rms(w)``, the tensor's root mean square ``sqrt(mean w^2)`` as its
  scale (so one R fits tensors of different ranges);
* ``sparsity`` S: the fraction S of lowest *importance* -- per tensor (``scope="tensor"``), per
  output (``"row"``: Wanda's comparison group), or below one threshold across every pruned
  weight (``"global"``) -- or, with ``allocation="sensitivity"``, per-layer fractions whose
  weighted mean is S, chosen by each layer's measured relative output error
  ``tr(dW^T G dW) / tr(W^T G W)`` at each candidate sparsity (``G = X^T X`` of its calibration
  inputs) and a greedy allocation (``passes/_sparse.allocate``). Measured on MiniLM it does
  NOT help (Wanda at 50 %: cosine 0.8586 uniform, 0.7555 allocated): a layer's relative error
  does not track the model's output drift (layers feeding a residual stream or a softmax
  matter unequally). OWL's outlier-ratio allocation (Yin et al. 2024, "Outlier Weighed
  Layerwise Sparsity", section 3.3; per weight matrix, M = 5, λ = 0.08) was tried and did not
  help either (0.8455) and is not offered; keep ``"uniform"`` (the default);
* ``pattern`` N:M: in every group of M consecutive input weights of an output, the N most
  important are kept (2:4 is what sparse tensor cores run).

Importance: ``"magnitude"`` ``|w_ij|``, or ``"activation"``, Wanda's ``|w_ij| · ||x_j||_2`` with
``||x_j||`` the norm of input feature j over the calibration data (Sun et al., 2023, "A Simple
and Effective Pruning Approach for Large Language Models", section 3).

Reconstruction (``reconstruct``): SparseGPT (Frantar and Alistarh, 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", ICML, Algorithm 1; see
``passes/_sparse.sparsegpt``): the mask is chosen per block of 128 input features by the OBS
saliency ``w^2 / [U]_jj^2`` (``"activation"``) or ``w^2`` (``"magnitude"``), and each pruned
weight's error is spread over the row's remaining weights through the inverse Hessian
``H = X^T X + damp · mean diag``, the least-squares refit of the layer to its calibration
outputs. Sequential: the weighted nodes are visited in topological order, nodes that read the
same input (Q, K, V) in one batch, and the calibration feeds are carried through the model
segment by segment (each segment, the nodes up to the next batch's input, runs once per feed as
a small model of its own; the tensors later nodes read are held per feed), once through the
model holding every value decided so far, so a layer is refit on the inputs ``X~`` the pruned
model gives it. Target (``target``): ``"original"`` (default) refits the layer's outputs to the
*original model's* outputs ``X W`` -- the original teaching the pruned model, each layer making
up for the error of the layers before it --: a second stream carries the feeds through the
original model, the cross Gram ``C = X~^T X`` is summed beside ``H = X~^T X~``, and SparseGPT
prunes ``W* = argmin ||X~ W' - X W||^2 + λ ||W' - W||^2 = W + (H + λ I)^-1 (C - H) W``
(``passes/_sparse.refit_target``; the ridge ``λ = target_damp · mean diag H`` keeps ``W*`` near
``W``: without it the refit overfits the calibration rows -- measured on MiniLM at 50 %, cosine
0.8878 at ``λ`` = 0.01 mean diag, 0.9084 at 0.5). This is the asymmetric calibration of GPTAQ
(Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration",
applied to SparseGPT. ``"pruned"`` refits to ``X~ W`` (SparseGPT as published).
Residual streams (``residual``, with the ``"original"`` target): when a layer's output (after
its bias Add) is added to another activation ``R`` -- a transformer's attention output and
second FFN projection feeding the residual Add -- the earlier layers' pruning has already moved
that stream to ``R~``, and the layer is refit to ``X W + (R - R~)``: the target of the Add's
output, not of the layer's alone (``passes/_sparse.refit_target``'s ``offset``; bias correction
includes the mean of ``R - R~``). Masked refit (``refine`` iterations): after SparseGPT's pass,
the kept weights are solved for by conjugate gradients with the mask fixed, the least-squares
optimum SparseGPT's one-way updates approach (Boža 2024, ``passes/_sparse.refit_masked``).
Calibration rows (``rows``): an input of the model, one entry per row of the layer inputs (a
tokenizer's ``attention_mask`` ``[batch, sequence]``), whose 0 entries are left out of the
reconstruction's sums -- padding positions no output reader looks at (54 % of MiniLM's
calibration positions). Measured on MiniLM (row scope, activation importance; masked cosine
of last_hidden_state on the evaluation feeds, calibration apart), at 50 %: 0.9077 before these
three; ``residual`` alone 0.9117, ``refine=30`` alone 0.9162, both (the defaults) 0.9185, and
``rows="attention_mask"`` 0.9131 alone, 0.9248 with both; with the defaults 30 % 0.9810 ->
0.9838 and 2:4 0.8310 -> 0.8533. Refining on the target's ridge Hessian (``H + target_damp``)
instead of SparseGPT's gave 0.9186 at 50 %: no gain, not offered.
Grams are formed per feed in float32 (BLAS) and summed in float64. Only MatMul/Gemm weights and
1x1 ungrouped Conv kernels have a Gram matrix as their Hessian; other weights are pruned
without refit.

Bias correction (``bias_correction``, default on with ``reconstruct``): the output mean shift
``E[x'] W' - E[x] W`` (``x'`` the layer's input in the pruned model -- the original's without
reconstruction --, means per input feature, ``TensorStats.channel_mean``; for a Conv, padding
is ignored) is subtracted from the layer's bias: Gemm's C, a Conv's B, or the initializer a
MatMul's only reader, an Add, adds (Banner et al., 2019, "Post Training 4-bit Quantization of
Convolutional Networks for Rapid-Deployment", section 4.3). A weight and its corrected bias are
one proposal group. Without such a bias, nothing is corrected (a reason is counted).

What is pruned: float initializers used only as weights (``onnxopt.ops.weight_initializers``):
with a threshold, MatMul/Gemm operands, Conv/ConvTranspose kernels and Gather tables; with a
sparsity or a pattern, the first two (the weights whose inputs are activations). Shapes,
indices, normalization statistics, biases (except by bias correction), scales and any weight
also read by another op are left alone. Dtype and shape are kept; comparisons are made in
float64. Each changed initializer receives a new array. Zeros do not shrink a dense
initializer by themselves; they pay off under compression or with a sparse format or kernel.
``sparse_storage`` (ONNX ``sparse_initializer``) is refused: the project's export
(onnx-graphsurgeon) writes dense initializers only, so a pass cannot propose it.

This pass is lossy and runs before the lossless pipeline (``weights = "original"``). Each pruned
tensor is a proposal to the run's drift budget (``onnxopt.budget``); its strength is
``sparsity`` (``strength``/``ladder``: ``sparsity="auto"`` is searched by the pass manager and
never reaches :meth:`Prune.run`).

Statistics (JSON-serializable): ``threshold``, ``relative``, ``sparsity_target``, ``scope``,
``pattern``, ``importance``, ``reconstruct``, ``target`` (None without reconstruct),
``residual``, ``refine``, ``rows``, ``bias_correction``, ``allocation`` (the settings
used); ``tensors`` (weights considered), ``tensors_changed``, ``proposed``, ``accepted``;
``weights`` (elements considered), ``zeros_before``, ``zeros_after``, ``values_pruned``,
``sparsity = zeros_after / weights``; ``per_tensor``: ``{name: {shape, size, zeros_before,
zeros_after, sparsity}}`` (plus ``allocated``, the layer's chosen sparsity, when it differs from
the target); ``biases_corrected``; ``refused``: ``{reason: count}``.

Errors: :class:`onnxopt.errors.UsageError` for invalid options, ``sparsity="auto"`` given to
``run``, or data-driven options (activation importance, reconstruction, sensitivity allocation,
bias correction) without calibration data (synthesized inputs are not calibration data).
"""

from __future__ import annotations

from collections import Counter
from itertools import repeat
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt.analyses import ActivationStats, TensorTypes, UseDef
from onnxopt.analyses.activations import (GRAM_MAX_CHANNELS, ActivationGrams,
                                          activation_inputs)
from onnxopt.budget import Proposal
from onnxopt.errors import UsageError
from onnxopt.graph import export_graph
from onnxopt.ops import (FLOAT_DTYPES, input_channel_axis, output_channel_axis,
                         weight_initializers)
from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._sparse import (allocate, error_curve, global_sparsities, keep_mask,
                                    parse_pattern, sparsegpt)

#: The weight slots a threshold prunes (``onnxopt.ops``): MatMul/Gemm operands, Conv kernels,
#: Gather tables.
PRUNED_KINDS = frozenset({"matrix", "kernel", "table"})
#: The weight slots a sparsity or a pattern prunes: those whose input is an activation.
SPARSITY_KINDS = frozenset({"matrix", "kernel"})
SCOPES = ("tensor", "row", "global")
IMPORTANCES = ("magnitude", "activation")
ALLOCATIONS = ("uniform", "sensitivity")
TARGETS = ("original", "pruned")
SPARSE_STORAGE_REFUSAL = ("sparse storage: the export path (onnx-graphsurgeon) writes dense "
                          "initializers only; ONNX sparse_initializer is not produced")


@dataclass(frozen=True)
class PruneOptions:
    """Options of :class:`Prune` (see the module docstring).

    Attributes:
        threshold: magnitude (in the weight's own units) under which a value becomes 0.
        relative: R: values with ``|w| < R · rms(w)`` (per tensor) become 0.
        sparsity: fraction of the weights set to 0, in [0, 1); ``"auto"``: chosen by the pass
            manager's strength search.
        scope: what a sparsity is a fraction of: ``"tensor"``, ``"row"`` (each output) or
            ``"global"`` (all pruned weights, one threshold).
        pattern: ``"N:M"``: keep N of every M consecutive input weights of each output.
        importance: ``"magnitude"`` (|w|) or ``"activation"`` (Wanda: |w| · ||x||).
        reconstruct: refit the remaining weights by SparseGPT, layer by layer (sequential).
        bias_correction: correct the output mean shift into the bias; None: with reconstruct.
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"sensitivity"`` (per-layer
            sparsities under one global target, by measured error).
        target: what reconstruction refits a layer's outputs to, on the pruned model's inputs
            ``X~``: ``"original"`` -- the original model's outputs ``X W`` (the original
            teaching the pruned model) -- or ``"pruned"`` -- ``X~ W`` (SparseGPT's sequential
            setting).
        target_damp: with ``target="original"``, the ridge ``λ ||W' - W||^2`` that keeps the
            refit near the original weight, ``λ`` as a fraction of the mean diagonal of
            ``X~^T X~`` (measured on MiniLM at 50 %: 0.01 -> cosine 0.8878, 0.1 -> 0.9044,
            0.5 -> 0.9084; the plain ``"pruned"`` target 0.8984).
        residual: with ``reconstruct`` and ``target="original"``, refit a layer whose output is
            added to a residual stream to the original stream's value too (module docstring).
        refine: with ``reconstruct``, conjugate-gradient iterations of the masked refit after
            SparseGPT (0: none).
        rows: name of a model input whose 0 entries mark calibration rows (positions) left out
            of reconstruction (an ``attention_mask``); None: the run's drift mask
            (``--drift-mask``, ``PassContext.drift_mask``) when it has one, else every row.
        damp: SparseGPT's dampening, a fraction of the mean diagonal of ``X^T X``.
        sparse_storage: store sparse initializers as ONNX sparse tensors (refused, see above).
    """

    threshold: float | None = None
    relative: float | None = None
    sparsity: float | str | None = None
    scope: str = "tensor"
    pattern: str | None = None
    importance: str = "magnitude"
    reconstruct: bool = False
    bias_correction: bool | None = None
    allocation: str = "uniform"
    target: str = "original"
    target_damp: float = 0.5
    residual: bool = True
    refine: int = 30
    rows: str | None = None
    damp: float = 0.01
    sparse_storage: bool = False

    def check(self) -> str | None:
        modes = [n for n in ("threshold", "relative", "sparsity", "pattern")
                 if getattr(self, n) is not None]
        if len(modes) > 1:
            return f"options {' and '.join(modes)} exclude each other: give one"
        for name in ("threshold", "relative"):
            value = getattr(self, name)
            if value is not None and not 0 < value < float("inf"):
                return f"option {name} must be positive and finite, got {value}"
        s = self.sparsity
        if isinstance(s, str) and s != "auto":
            return f"option sparsity must be a fraction in [0, 1) or 'auto', got {s!r}"
        if s is not None and not isinstance(s, str) and not 0 <= s < 1:
            return f"option sparsity must be a fraction in [0, 1), got {s}"
        if self.pattern is not None:
            try:
                parse_pattern(self.pattern)
            except ValueError as err:
                return f"option {err}"
        for name, allowed in (("scope", SCOPES), ("importance", IMPORTANCES),
                              ("allocation", ALLOCATIONS), ("target", TARGETS)):
            if getattr(self, name) not in allowed:
                return (f"option {name} must be one of {', '.join(allowed)}, got "
                        f"{getattr(self, name)!r}")
        if not 0 < self.damp < 1:
            return f"option damp must be in (0, 1), got {self.damp}"
        if not 0 < self.target_damp < float("inf"):
            return f"option target_damp must be positive and finite, got {self.target_damp}"
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            return f"option refine must be a whole number of iterations >= 0, got {self.refine!r}"
        if self.sparse_storage:
            return f"option sparse_storage is not supported: {SPARSE_STORAGE_REFUSAL}"
        targeted = self.sparsity is not None or self.pattern is not None
        if not targeted:
            for name, default in (("importance", "magnitude"), ("reconstruct", False),
                                  ("allocation", "uniform"), ("scope", "tensor")):
                if getattr(self, name) != default:
                    return f"option {name}={getattr(self, name)!r} needs sparsity or pattern"
        if not self.reconstruct and self.rows is not None:
            return "option rows needs reconstruct"
        if self.pattern is not None and (self.scope == "global"
                                         or self.allocation != "uniform"):
            return "option pattern fixes every layer's sparsity: no global scope or allocation"
        if self.allocation != "uniform" and self.scope == "global":
            return (f"options allocation={self.allocation!r} and scope='global' exclude each "
                    "other")
        return None


@dataclass
class _Layer:
    """A pruned weight viewed as ``matrix[K, N]`` (``passes/_sparse``'s convention)."""

    tensor: gs.Constant
    node: gs.Node | None  # the only reader, None when several nodes read it
    values: np.ndarray
    matrix: np.ndarray  # float64 [K, N]
    moved: tuple[int, ...]  # the weight's shape with input, output axes moved last
    axes: tuple[int, int]  # (input axis, output axis), or (-2, -1) without
    x: str | None = None  # the input activation read with it, when statistics apply
    repeat: int = 1  # rows of the matrix per input feature (a Conv's kernel positions)
    gram: bool = False  # X^T X of ``x`` is the layer's Hessian
    note: str | None = None  # why activation statistics do not apply
    bias: gs.Constant | None = None
    bias_note: str | None = None
    residual: str | None = None  # the stream the layer's output (plus bias) is added to

    def restore(self, matrix: np.ndarray) -> np.ndarray:
        back = np.moveaxis(matrix.reshape(self.moved), (-2, -1), self.axes)
        return back.astype(self.values.dtype)


def _sparsity(zeros: int, size: int) -> float:
    return zeros / size if size else 0.0


@register
class Prune(Pass):
    name = "prune"
    description = ("Set weights to 0: by threshold, or to a sparsity / N:M pattern by magnitude "
                   "or activation importance, optionally with SparseGPT reconstruction.")
    Options = PruneOptions
    lossless = False
    weights = "original"
    strength: ClassVar[str | None] = "sparsity"
    ladder: ClassVar[tuple] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    # values of weights change, never shapes or the graph's structure
    preserves = frozenset({TensorTypes, UseDef})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        o = self.options
        self._plan: list[tuple[gs.Constant, np.ndarray, np.ndarray | None]] = []
        self._refused: Counter = Counter()
        self._allocated: dict[str, float] = {}
        self._biases: set[str] = set()
        self._rows = o.rows if o.rows is not None else ctx.drift_mask()
        if o.sparsity == "auto":
            raise UsageError("pass 'prune': sparsity 'auto' is chosen by the pass manager's "
                             "strength search, not by the pass")
        if o.threshold is None and o.relative is None and o.sparsity is None \
                and o.pattern is None:
            return PassResult(False, {"threshold": None})
        if o.sparse_storage:
            self._refused[SPARSE_STORAGE_REFUSAL] += 1
        if o.threshold is not None or o.relative is not None:
            proposals = self._by_threshold(graph)
        else:
            proposals = self._by_sparsity(graph, ctx)
        return PassResult(False, self._settings(), proposals=proposals)

    def _settings(self) -> dict:
        o = self.options
        if o.threshold is not None or o.relative is not None:
            settings = {"threshold": None if o.threshold is None else float(o.threshold)}
            if o.relative is not None:
                settings["relative"] = float(o.relative)
            return settings
        return {"threshold": None,
                "sparsity_target": None if o.sparsity is None else float(o.sparsity),
                "scope": o.scope, "pattern": o.pattern, "importance": o.importance,
                "reconstruct": o.reconstruct, "target": o.target if o.reconstruct else None,
                "residual": o.reconstruct and o.target == "original" and o.residual,
                "refine": o.refine if o.reconstruct else 0,
                "rows": self._rows if o.reconstruct else None,
                "bias_correction": self._bias_correction(),
                "allocation": o.allocation}

    def _bias_correction(self) -> bool:
        o = self.options
        return o.reconstruct if o.bias_correction is None else o.bias_correction

    # -- threshold / relative ---------------------------------------------------------------

    def _by_threshold(self, graph: gs.Graph) -> list[Proposal]:
        o = self.options
        proposals = []
        for t in weight_initializers(graph, PRUNED_KINDS):
            values = t.values
            if not isinstance(values, np.ndarray):  # sparse initializers have no dense array
                continue
            wide = values.astype(np.float64, copy=False)
            threshold = o.threshold
            if threshold is None:
                finite = wide[np.isfinite(wide)]
                threshold = o.relative * float(np.sqrt(np.mean(finite ** 2))) if finite.size \
                    else 0.0
            prune = (np.abs(wide) < threshold) & (values != 0)
            pruned = None
            if prune.any():
                pruned = np.where(prune, values.dtype.type(0), values).astype(values.dtype,
                                                                               copy=False)
                proposals.append(Proposal(t, pruned, _setter(t, pruned)))
            self._plan.append((t, values, pruned))
        return proposals

    # -- sparsity / pattern -----------------------------------------------------------------

    def _by_sparsity(self, graph: gs.Graph, ctx: PassContext) -> list[Proposal]:
        o = self.options
        pattern = parse_pattern(o.pattern) if o.pattern is not None else None
        correct = self._bias_correction()
        needs_data = (o.importance == "activation" or o.reconstruct or correct
                      or o.allocation == "sensitivity")
        feeds = ctx.calibration if ctx.calibration is not None else ctx.feeds
        if needs_data and not ctx.has_calibration():
            raise UsageError("pass 'prune': activation importance, reconstruction, sensitivity "
                             "allocation and bias correction need calibration data "
                             "(--calibration-data, or real --inputs): synthesized random "
                             "inputs are not calibration data")
        layers = self._layers(graph)
        original = None
        if needs_data:
            kind = ActivationGrams if o.allocation == "sensitivity" else ActivationStats
            original = ctx.analyses.get(kind) if ctx.analyses is not None \
                else kind.compute(graph, ctx)
        scores = [self._scores(layer, original) for layer in layers]
        targets = self._targets(layers, scores, original, pattern)
        mask_scope = "row" if o.scope == "row" else "tensor"
        if pattern is not None:
            layers, scores, targets = self._fit_pattern(layers, scores, targets, pattern[1])
        results: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        if o.reconstruct:
            results = self._sequential(graph, ctx, feeds, layers, targets, original, pattern)
        for layer, score, target in zip(layers, scores, targets):
            if id(layer.tensor) in results:
                continue
            new = layer.matrix * keep_mask(score, target, mask_scope, pattern)
            bias = None
            if correct:
                mean = None if original is None or layer.x is None else \
                    original[layer.x].channel_mean
                bias = self._corrected_bias(layer, new, mean, mean)
            results[id(layer.tensor)] = (new, bias)
        proposals = []
        for layer, target in zip(layers, targets):
            new, bias = results[id(layer.tensor)]
            if pattern is None and o.scope == "global" or o.allocation == "sensitivity":
                self._allocated[layer.tensor.name] = float(target)
            value = layer.restore(new)
            if np.array_equal(value, layer.values, equal_nan=True):
                self._plan.append((layer.tensor, layer.values, None))
                continue
            group = None if bias is None else f"prune:{layer.tensor.name}"
            proposals.append(Proposal(layer.tensor, value, _setter(layer.tensor, value),
                                      group=group))
            if bias is not None:
                proposals.append(Proposal(layer.bias, bias, _setter(layer.bias, bias),
                                          group=group))
                self._biases.add(layer.bias.name)
            self._plan.append((layer.tensor, layer.values, value))
        return proposals

    def _layers(self, graph: gs.Graph) -> list[_Layer]:
        """The weights a sparsity prunes, as matrices, with what statistics apply to them."""
        axes_of = activation_inputs(graph)
        main = {id(n) for n in graph.nodes}
        layers = []
        for t in weight_initializers(graph, SPARSITY_KINDS):
            values = t.values
            if not isinstance(values, np.ndarray):
                continue
            slots = [(n, i) for n in t.outputs for i, x in enumerate(n.inputs) if x is t]
            node, index = slots[0]
            rank = values.ndim
            ia, oa = input_channel_axis(node, index, rank), output_channel_axis(node, index, rank)
            if ia is None or oa is None:
                self._refused["1-D weight: no output axis"] += 1
                continue
            moved = np.moveaxis(values, (ia, oa), (-2, -1))
            layer = _Layer(t, node if len(slots) == 1 else None, values,
                           moved.reshape(-1, moved.shape[-1]).astype(np.float64),
                           moved.shape, (ia, oa))
            layer.note = self._statistics_note(layer, index, main, axes_of)
            if layer.note is None:
                layer.x = node.inputs[0].name
                layer.repeat = int(np.prod(moved.shape[:-2], dtype=np.int64))
                layer.gram = node.op in ("MatMul", "Gemm") or layer.repeat == 1
            if self._bias_correction():
                layer.bias, layer.bias_note = _find_bias(layer)
            if self.options.residual and layer.gram and node.op in ("MatMul", "Gemm"):
                layer.residual = _find_residual(node)
            layers.append(layer)
        return layers

    @staticmethod
    def _statistics_note(layer: _Layer, index: int, main, axes_of) -> str | None:
        node = layer.node
        if node is None:
            return "weight read by several nodes"
        if id(node) not in main:
            return "weight in a subgraph"
        if index != 1 or node.op not in ("MatMul", "Gemm", "Conv"):
            return f"{node.op} input {index} is not a weight applied to an activation"
        if node.op == "Conv" and node.attrs.get("group", 1) != 1:
            return "grouped Conv"
        if layer.values.ndim < 2 or (node.op == "MatMul" and layer.values.ndim != 2):
            return "batched or 1-D MatMul weight"
        if node.inputs[0].name not in axes_of:
            return "input is not a float activation"
        return None

    def _scores(self, layer: _Layer, original) -> np.ndarray:
        score = np.abs(layer.matrix)
        if self.options.importance != "activation":
            return score
        if layer.note is not None or original is None or layer.x not in original \
                or original[layer.x].channel_norm is None:
            self._refused[f"activation importance: {layer.note or 'no statistics'}; "
                          "magnitude used"] += 1
            return score
        norm = original[layer.x].channel_norm
        if norm.size * layer.repeat != layer.matrix.shape[0]:
            self._refused["activation importance: channels disagree; magnitude used"] += 1
            return score
        return score * np.tile(norm, layer.repeat)[:, None]

    def _targets(self, layers, scores, original, pattern) -> list[float]:
        o = self.options
        if pattern is not None:
            return [1.0 - pattern[0] / pattern[1]] * len(layers)
        if o.scope == "global":
            return global_sparsities(scores, o.sparsity)
        targets = [float(o.sparsity)] * len(layers)
        if o.allocation != "sensitivity":
            return targets
        measured = [i for i, layer in enumerate(layers)
                    if layer.gram and original[layer.x].gram is not None]
        for i in set(range(len(layers))) - set(measured):
            self._refused[f"sensitivity allocation: {layers[i].note or 'no Gram matrix'}; "
                          "uniform sparsity"] += 1
        if measured:
            curves = [error_curve(layers[i].matrix, scores[i], original[layers[i].x].gram,
                                  "row" if o.scope == "row" else "tensor") for i in measured]
            chosen = allocate(curves, [layers[i].matrix.size for i in measured], o.sparsity)
            for i, s in zip(measured, chosen):
                targets[i] = s
        return targets

    def _fit_pattern(self, layers, scores, targets, m: int):
        keep = [i for i, layer in enumerate(layers) if layer.matrix.shape[0] % m == 0]
        for i in set(range(len(layers))) - set(keep):
            self._refused[f"pattern: input features not a multiple of {m}"] += 1
            self._plan.append((layers[i].tensor, layers[i].values, None))
        return ([layers[i] for i in keep], [scores[i] for i in keep],
                [targets[i] for i in keep])

    def _sequential(self, graph, ctx, feeds, layers, targets, original, pattern) -> dict:
        """SparseGPT layer by layer on the pruned model's inputs (module docstring).

        Two :class:`_Stream` s carry the calibration feeds through the model, one segment (the
        nodes up to the next batch's input) at a time: the original model and the model
        holding every value decided so far. Each batch accumulates ``X~^T X~`` and ``X~^T X``
        of its input feed by feed, is refit, and its new values enter the pruned stream's
        later segments."""
        o = self.options
        model = export_graph(graph, ctx.template)
        inits = {init.name: init for init in model.graph.initializer}
        axes_of = activation_inputs(graph)
        teacher = o.target == "original"
        feeds = list(feeds)  # two streams read them
        pruned = _Stream(model, feeds, inits, {})
        reference = _Stream(model, feeds, inits, None) if teacher else None
        batches: dict[str, list[tuple[_Layer, float]]] = {}
        for layer, target in zip(layers, targets):
            if layer.x is not None and layer.tensor.name in inits:
                batches.setdefault(layer.x, []).append((layer, target))
        mask_scope = "row" if o.scope == "row" else "tensor"
        saliency = "obs" if o.importance == "activation" else "magnitude"
        results = {}
        for x in sorted(batches, key=pruned.position):
            batch = batches[x]
            wants_gram = any(layer.gram for layer, _ in batch)
            sums = _CrossGram(x, axes_of[x], wants_gram, teacher,
                              {layer.residual for layer, _ in batch} - {None} if teacher
                              else set())
            for values, original_values, feed in zip(pruned.advance(x),
                                                     reference.advance(x) if teacher else
                                                     repeat(None), feeds):
                sums.update(values, original_values,
                            None if self._rows is None else feed.get(self._rows, np.empty(0)))
            if sums.unmasked:
                self._refused[f"rows: '{self._rows}' is not fed or does not match the rows of a "
                              "layer input; every row used"] += 1
            mean_original = sums.mean_original if teacher else original[x].channel_mean
            for layer, target in batch:
                offset, shift = sums.offset(layer.residual, layer.matrix.shape[1])
                if layer.residual is not None and offset is None:
                    self._refused["residual: stream not available or of another shape; "
                                  "layer output refit alone"] += 1
                if layer.gram and sums.gram is not None:
                    new = sparsegpt(layer.matrix, sums.gram, target, mask_scope, pattern,
                                    o.damp, saliency, cross=sums.cross,
                                    target_damp=o.target_damp, offset=offset,
                                    refine=o.refine)
                else:
                    self._refused["reconstruct: no Gram matrix (Conv kernel larger than 1x1); "
                                  "pruned without refit"] += 1
                    score = np.abs(layer.matrix)
                    if o.importance == "activation" and sums.norm is not None \
                            and sums.norm.size * layer.repeat == layer.matrix.shape[0]:
                        score = score * np.tile(sums.norm, layer.repeat)[:, None]
                    new = layer.matrix * keep_mask(score, target, mask_scope, pattern)
                bias = None
                if self._bias_correction():
                    bias = self._corrected_bias(layer, new, sums.mean, mean_original, shift)
                    if bias is not None:
                        pruned.overrides[layer.bias.name] = numpy_helper.from_array(
                            bias, layer.bias.name)
                pruned.overrides[layer.tensor.name] = numpy_helper.from_array(
                    layer.restore(new), layer.tensor.name)
                results[id(layer.tensor)] = (new, bias)
        return results

    def _corrected_bias(self, layer: _Layer, new: np.ndarray, mean_pruned, mean_original,
                        stream_shift: np.ndarray | None = None):
        """The layer's bias minus ``E[x'] W' - E[x] W - E[R - R~]`` (the last term, over
        the outputs, when the layer's residual stream is made up for), or None (a reason is
        counted)."""
        if layer.bias is None:
            self._refused[f"bias correction: {layer.bias_note}"] += 1
            return None
        if mean_pruned is None or mean_original is None \
                or mean_pruned.size * layer.repeat != layer.matrix.shape[0]:
            self._refused["bias correction: no input mean"] += 1
            return None
        shift = np.tile(mean_pruned, layer.repeat) @ new \
            - np.tile(mean_original, layer.repeat) @ layer.matrix
        if stream_shift is not None:
            shift = shift - stream_shift
        b = layer.bias.values
        return (b.astype(np.float64) - shift.reshape(b.shape)).astype(b.dtype)

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        o = self.options
        if o.threshold is None and o.relative is None and o.sparsity is None \
                and o.pattern is None:
            return {}
        done = {id(p.tensor) for p in accepted}
        per_tensor: dict[str, dict] = {}
        weights = zeros_before = zeros_after = 0
        for t, values, proposed in self._plan:
            before = int(np.count_nonzero(values == 0))
            after = int(np.count_nonzero(proposed == 0)) if (
                proposed is not None and id(t) in done) else before
            per_tensor[t.name] = {"shape": [int(d) for d in values.shape],
                                  "size": int(values.size), "zeros_before": before,
                                  "zeros_after": after,
                                  "sparsity": _sparsity(after, int(values.size))}
            if t.name in self._allocated:
                per_tensor[t.name]["allocated"] = self._allocated[t.name]
            weights += int(values.size)
            zeros_before += before
            zeros_after += after
        stats = {
            **result.stats, "tensors": len(per_tensor),
            "tensors_changed": len({id(p.tensor) for p in accepted} & {id(t) for t, _, _ in
                                                                      self._plan}),
            "proposed": len(result.proposals), "accepted": len(accepted), "weights": weights,
            "zeros_before": zeros_before, "zeros_after": zeros_after,
            "values_pruned": zeros_after - zeros_before,
            "sparsity": _sparsity(zeros_after, weights), "per_tensor": per_tensor,
        }
        if self._biases:
            stats["biases_corrected"] = len(self._biases & {p.tensor.name for p in accepted})
        if self._refused:
            stats["refused"] = dict(self._refused)
        return stats


class _Stream:
    """The calibration feeds carried through ``model`` segment by segment: per feed, the
    tensors that nodes not yet run still read (graph inputs and earlier segments' outputs), so
    each node runs once per feed however many layers are refit (SparseGPT's layer-by-layer
    forward, for any ONNX graph). A segment is a small model: its nodes, the initializers they
    read (``overrides`` first: values decided since), its live tensors as inputs."""

    def __init__(self, model: onnx.ModelProto, feeds, inits: dict, overrides: dict | None):
        self.model = model
        self.nodes = list(model.graph.node)
        self.inits = inits
        self.overrides = overrides if overrides is not None else {}
        self.cache = [dict(feed) for feed in feeds]
        self.done = 0
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output}
        self.uses = [_used_names(node) for node in self.nodes]
        self.last: dict[str, int] = {}
        for i, names in enumerate(self.uses):
            for name in names:
                self.last[name] = i

    def position(self, name: str) -> int:
        return self.producer.get(name, -1)

    def advance(self, name: str):
        """Run the nodes up to ``name``'s producer; yield, per feed, the live values
        (``name`` -> array: ``name`` and every tensor a node not yet run reads)."""
        end = self.position(name) + 1
        if end > self.done:
            self._run(self.done, end, name)
        yield from self.cache

    def _run(self, start: int, end: int, name: str) -> None:
        from onnxopt.validate import make_session, run_model  # onnxruntime, when needed

        nodes = self.nodes[start:end]
        produced = {out for node in nodes for out in node.output}
        read = set().union(*self.uses[start:end]) - produced - {""}
        live = self.cache[0]
        inputs = sorted(n for n in read if n in live and n not in self.inits)
        keep = [n for n in sorted(produced) if self.last.get(n, -1) >= end or n == name]
        g = onnx.helper.make_graph(
            nodes, f"segment_{start}_{end}",
            [onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(live[n]).dtype), None)
             for n in inputs],
            [onnx.helper.make_empty_tensor_value_info(n) for n in keep],
            [self.overrides.get(n, self.inits[n]) for n in sorted(read) if n in self.inits])
        segment = onnx.helper.make_model(g, opset_imports=self.model.opset_import,
                                         functions=self.model.functions)
        segment.ir_version = self.model.ir_version
        what = "calibration forward (prune reconstruction)"
        session = make_session(segment, what)
        names = [o.name for o in session.get_outputs()]
        for values in self.cache:
            values.update(zip(names, run_model(session, values, what)))
            for n in [n for n in values if n != name and self.last.get(n, -1) < end]:
                del values[n]
        self.done = end


class _CrossGram:
    """Running sums over the feeds of one layer input: ``X~^T X~`` (``gram``), ``X~^T X``
    (``cross``; ``X`` the original model's input, ``X~`` the pruned model's), the means of
    both per feature and ``||x~_j||``; per residual stream ``R`` in ``streams``, ``X~^T (R -
    R~)`` and the mean of ``R - R~`` (:meth:`offset`). Rows are flattened along ``axis`` (a
    stream's along its last axis); non-finite values count as 0; each feed's products are
    formed in float32 (BLAS) and summed in float64."""

    def __init__(self, name: str, axis: int | None, grams: bool, cross: bool,
                 streams: set[str] = frozenset()):
        self.name, self.axis, self.grams, self.wants_cross = name, axis, grams, cross
        self.gram = self.cross = self.sum = self.sum_original = self.sq = None
        self.rows = 0
        self.unmasked = False
        # stream -> [X~^T D, sum of D], None once a feed lacks it or disagrees in shape
        self.streams: dict[str, list | None] = {s: [0.0, 0.0] for s in sorted(streams)}

    @staticmethod
    def _flat(x: np.ndarray, axis: int) -> np.ndarray:
        x = np.asarray(x, np.float32)
        x = np.where(np.isfinite(x), x, np.float32(0))
        moved = np.moveaxis(x, axis % x.ndim, -1)
        return np.ascontiguousarray(moved.reshape(-1, moved.shape[-1]))

    def update(self, values: dict, original_values: dict | None,
               keep: np.ndarray | None = None) -> None:
        """Add one feed: ``values`` (``original_values``) map names to the pruned (original)
        model's live tensors (:meth:`_Stream.advance`); ``keep`` (any shape, one entry per
        row) leaves out the rows where it is 0 (when its size is not the number of rows,
        every row counts and ``unmasked`` is set)."""
        x = values[self.name]
        if self.axis is None or np.ndim(x) == 0:
            return
        xt = self._flat(x, self.axis)
        original = None if original_values is None else original_values[self.name]
        xo = self._flat(original, self.axis) if original is not None else None
        rows, rows_before = slice(None), xt.shape[0]
        if keep is not None:
            if np.size(keep) == xt.shape[0]:
                rows = np.asarray(keep).reshape(-1) != 0
                xt = xt[rows]
                xo = None if xo is None else xo[rows]
            else:
                self.unmasked = True
        for stream, acc in self.streams.items():
            if acc is None:
                continue
            r, ro = values.get(stream), (original_values or {}).get(stream)
            d = None if r is None or ro is None or np.shape(r) != np.shape(ro) or \
                np.ndim(r) == 0 else self._flat(ro, -1) - self._flat(r, -1)
            if d is not None and d.shape[0] == rows_before:
                d = d[rows]
            if d is None or d.shape[0] != xt.shape[0]:
                self.streams[stream] = None
                continue
            acc[0] = acc[0] + (xt.T @ d).astype(np.float64)
            acc[1] = acc[1] + d.sum(axis=0, dtype=np.float64)
        add = lambda a, b: b if a is None else a + b  # noqa: E731
        self.sum = add(self.sum, xt.sum(axis=0, dtype=np.float64))
        self.sq = add(self.sq, np.einsum("ij,ij->j", xt, xt, dtype=np.float64))
        self.rows += xt.shape[0]
        if xo is not None:
            self.sum_original = add(self.sum_original, xo.sum(axis=0, dtype=np.float64))
        if self.grams and xt.shape[1] <= GRAM_MAX_CHANNELS:
            self.gram = add(self.gram, (xt.T @ xt).astype(np.float64))
            if xo is not None and self.wants_cross:
                self.cross = add(self.cross, (xt.T @ xo).astype(np.float64))

    @property
    def mean(self):
        return None if self.sum is None or not self.rows else self.sum / self.rows

    def offset(self, stream: str | None, outputs: int):
        """``(X~^T D, E[D])`` of ``stream`` (``D = R - R~``, ``[K, outputs]`` and
        ``[outputs]``), or ``(None, None)``: no stream, or it was missing or of another shape
        in a feed."""
        acc = self.streams.get(stream) if stream is not None else None
        if acc is None or not self.rows or np.ndim(acc[0]) != 2 \
                or acc[0].shape[1] != outputs:
            return None, None
        return acc[0], acc[1] / self.rows

    @property
    def mean_original(self):
        return None if self.sum_original is None or not self.rows \
            else self.sum_original / self.rows

    @property
    def norm(self):
        return None if self.sq is None else np.sqrt(self.sq)


def _find_bias(layer: _Layer) -> tuple[gs.Constant | None, str | None]:
    """The bias the layer's output mean shift can be corrected into, or a reason."""
    node = layer.node
    n = layer.matrix.shape[1]
    if node is None:
        return None, "weight read by several nodes"
    if node.op in ("Gemm", "Conv"):
        b = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
    elif node.op == "MatMul":
        readers = node.outputs[0].outputs
        if len(readers) != 1 or readers[0].op != "Add" or len(readers[0].inputs) != 2:
            return None, "no bias (MatMul not followed by one Add)"
        b = next((x for x in readers[0].inputs if x is not node.outputs[0]), None)
    else:
        b = None
    if not isinstance(b, gs.Constant):
        return None, "no bias initializer"
    values = b.values
    if not isinstance(values, np.ndarray) or values.dtype.type not in FLOAT_DTYPES \
            or values.size != n or values.shape[-1:] != (n,):
        return None, "bias is not a float vector over the outputs"
    if len(b.outputs) != 1:
        return None, "bias shared with another node"
    return b, None


def _find_residual(node: gs.Node) -> str | None:
    """The stream a MatMul/Gemm's output is added to: its only reader, or the only reader of
    the Add of a constant bias after it, is an Add of an activation (a residual connection,
    ``Y + b + R``); that activation's name, else None."""
    out = node.outputs[0]
    for _ in range(2):
        readers = out.outputs
        if len(readers) != 1 or readers[0].op != "Add" or len(readers[0].inputs) != 2:
            return None
        add = readers[0]
        other = next((x for x in add.inputs if x is not out), None)
        if other is None:
            return None
        if not isinstance(other, gs.Constant):
            return other.name
        out = add.outputs[0]
    return None


def _used_names(node: onnx.NodeProto) -> set[str]:
    """The names ``node`` reads, including those its subgraphs read from outer scopes (a
    superset: every input of a subgraph node)."""
    names = set(node.input)
    for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for inner in g.node:
                names |= _used_names(inner)
    return names


def _setter(t: gs.Constant, values: np.ndarray):
    def apply() -> None:
        t.values = values
    return apply
