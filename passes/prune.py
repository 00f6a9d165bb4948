"""Magnitude pruning: weight values with ``|w| < threshold`` become exactly 0.

Magnitude pruning (Han et al., 2015, "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS) assumes that the connections of smallest absolute weight contribute least to
the output. For every float initializer used only as a weight -- a MatMul/Gemm operand, a
Conv/ConvTranspose kernel or a Gather table, see ``passes._util.weight_initializers`` -- this pass
sets ``w' = 0 if |w| < ctx.prune_threshold else w``. Shapes, indices, normalization statistics,
biases, scales and any weight also read by another op are left alone.

Dtype (float16, float32 or float64) and shape are kept; the comparison is made in float64, so a
float16 weight is not compared against a threshold rounded to float16. Each changed initializer
receives a new array: the old one may be shared or lazily loaded from external data. NaN values
are kept, and so are zeros already there (``-0.0`` included). Nothing is done when
``ctx.prune_threshold`` is None. Zeros do not shrink a dense initializer by themselves; they pay off
under compression or with a sparse format or kernel.

This pass is lossy (``lossless = False``) and runs before the lossless pipeline
(``stage = "before"``): it prunes the model's own weights, not the products of fusions (a Conv
whose weights a following per-channel scale shrinks below the threshold would otherwise vanish).
When validation feeds are known (``ctx.feeds``), tensors whose pruning alone hurts the outputs most
stay dense until the outputs keep ``ctx.max_drift`` (``passes._util.fit_drift_budget``); they
are listed under ``drift_budget.kept``. Validation then requires every output's cosine
similarity with the original to reach ``max_drift``.

Statistics (JSON-serializable):

* ``threshold`` (float); ``tensors`` (weights considered) and ``tensors_changed``;
* ``weights`` (elements considered), ``zeros_before``, ``zeros_after``, ``values_pruned``;
* ``sparsity`` = ``zeros_after / weights`` (0.0 when there are no weights);
* ``per_tensor``: ``{name: {shape, size, zeros_before, zeros_after, sparsity}}``.

Errors: none of its own; ``ctx.prune_threshold`` is checked (positive) by ``onnxopt.api``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.pass_manager import Pass, PassContext, PassResult, register
from onnxopt.passes._util import fit_drift_budget, lossy_warnings, weight_initializers


def _sparsity(zeros: int, size: int) -> float:
    return zeros / size if size else 0.0


@register
class Prune(Pass):
    name = "prune"
    description = "Set weight values with |w| < prune_threshold to 0 (magnitude pruning)."
    lossless = False
    stage = "before"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        threshold = ctx.prune_threshold
        if threshold is None:
            return PassResult(False, {})
        per_tensor: dict[str, dict] = {}
        plan = []
        for t in weight_initializers(graph):
            values = t.values
            if not isinstance(values, np.ndarray):  # sparse initializers have no dense array
                continue
            prune = (np.abs(values.astype(np.float64, copy=False)) < threshold) & (values != 0)
            plan.append((t, values, prune))
        budget = None
        candidates = {t.name: (values, np.where(prune, values.dtype.type(0), values))
                      for t, values, prune in plan if prune.any()}
        if ctx.feeds and candidates:
            budget = fit_drift_budget(graph, ctx, candidates)
        kept = set(budget["kept"]) if budget else set()

        per_tensor: dict[str, dict] = {}
        weights = zeros_before = zeros_after = changed_tensors = 0
        for t, values, prune in plan:
            before = int(np.count_nonzero(values == 0))
            pruned = 0 if t.name in kept else int(np.count_nonzero(prune))
            if pruned:
                t.values = candidates[t.name][1].astype(values.dtype, copy=False)
                changed_tensors += 1
            after = before + pruned
            per_tensor[t.name] = {"shape": [int(d) for d in values.shape], "size": int(values.size),
                                  "zeros_before": before, "zeros_after": after,
                                  "sparsity": _sparsity(after, int(values.size))}
            weights += int(values.size)
            zeros_before += before
            zeros_after += after
        stats = {
            "threshold": float(threshold), "tensors": len(per_tensor),
            "tensors_changed": changed_tensors, "weights": weights,
            "zeros_before": zeros_before, "zeros_after": zeros_after,
            "values_pruned": zeros_after - zeros_before,
            "sparsity": _sparsity(zeros_after, weights), "per_tensor": per_tensor,
        }
        if budget is not None:
            stats["drift_budget"] = budget
        return PassResult(changed_tensors > 0, stats, lossy_warnings(
            self.name, changed_tensors > 0, budget, ctx.max_drift))
