"""Magnitude pruning: weight values with ``|w| < threshold`` become exactly 0.

Magnitude pruning (Han et al., 2015, "Learning both Weights and Connections for Efficient Neural
Networks", NeurIPS) assumes that the connections of smallest absolute weight contribute least to
the output. For every float initializer used only as a weight -- a MatMul/Gemm operand, a
Conv/ConvTranspose kernel or a Gather table, see ``onnxopt.ops.weight_initializers`` -- this pass
sets ``w' = 0 if |w| < threshold else w`` (:class:`PruneOptions`). Shapes, indices, normalization statistics,
biases, scales and any weight also read by another op are left alone.

Dtype (float16, float32 or float64) and shape are kept; the comparison is made in float64, so a
float16 weight is not compared against a threshold rounded to float16. Each changed initializer
receives a new array: the old one may be shared or lazily loaded from external data. NaN values
are kept, and so are zeros already there (``-0.0`` included). Nothing is done without a
threshold. Zeros do not shrink a dense initializer by themselves; they pay off
under compression or with a sparse format or kernel.

This pass is lossy (``lossless = False``) and runs before the lossless pipeline
(``weights = "original"``): it prunes the model's own weights, not the products of fusions (a Conv
whose weights a following per-channel scale shrinks below the threshold would otherwise vanish).
Each pruned tensor is a proposal to the run's drift budget (``onnxopt.budget``), which keeps the
most harmful ones dense until every output keeps ``max_drift`` against the original; they are
listed under ``drift_budget.kept``. Validation then requires every output's cosine similarity with
the original to reach ``max_drift``.

Statistics (JSON-serializable):

* ``threshold`` (float); ``tensors`` (weights considered) and ``tensors_changed``;
  ``proposed`` and ``accepted`` (tensors proposed to and accepted by the drift budget);
* ``weights`` (elements considered), ``zeros_before``, ``zeros_after``, ``values_pruned``;
* ``sparsity`` = ``zeros_after / weights`` (0.0 when there are no weights);
* ``per_tensor``: ``{name: {shape, size, zeros_before, zeros_after, sparsity}}``.

Errors: :class:`onnxopt.errors.UsageError` for a threshold that is not positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analyses import TensorTypes, UseDef
from onnxopt.budget import Proposal
from onnxopt.ops import weight_initializers
from onnxopt.pass_manager import Pass, PassContext, PassResult, register

#: The weight slots pruned (``onnxopt.ops``): MatMul/Gemm operands, Conv kernels, Gather tables.
PRUNED_KINDS = frozenset({"matrix", "kernel", "table"})


@dataclass(frozen=True)
class PruneOptions:
    """Options of :class:`Prune`.

    Attributes:
        threshold: magnitude (in the weight's own units) under which a value becomes 0; None
            prunes nothing.
    """

    threshold: float | None = None

    def check(self) -> str | None:
        if self.threshold is not None and not 0 < self.threshold < float("inf"):
            return f"option threshold must be positive and finite, got {self.threshold}"
        return None


def _sparsity(zeros: int, size: int) -> float:
    return zeros / size if size else 0.0


@register
class Prune(Pass):
    name = "prune"
    description = "Set weight values with |w| < threshold to 0 (magnitude pruning)."
    Options = PruneOptions
    lossless = False
    weights = "original"
    # values of weights change, never shapes or the graph's structure
    preserves = frozenset({TensorTypes, UseDef})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        threshold = self.options.threshold
        self._plan = []
        if threshold is None:
            return PassResult(False, {"threshold": None})
        proposals = []
        for t in weight_initializers(graph, PRUNED_KINDS):
            values = t.values
            if not isinstance(values, np.ndarray):  # sparse initializers have no dense array
                continue
            prune = (np.abs(values.astype(np.float64, copy=False)) < threshold) & (values != 0)
            self._plan.append((t, values, prune))
            if prune.any():
                pruned = np.where(prune, values.dtype.type(0), values).astype(values.dtype,
                                                                               copy=False)
                proposals.append(Proposal(t, pruned, _setter(t, pruned)))
        return PassResult(False, {"threshold": float(threshold)}, proposals=proposals)

    def summarize(self, result: PassResult, accepted: list[Proposal]) -> dict:
        if self.options.threshold is None:
            return {}
        done = {id(p.tensor) for p in accepted}
        per_tensor: dict[str, dict] = {}
        weights = zeros_before = zeros_after = 0
        for t, values, prune in self._plan:
            before = int(np.count_nonzero(values == 0))
            after = before + (int(np.count_nonzero(prune)) if id(t) in done else 0)
            per_tensor[t.name] = {"shape": [int(d) for d in values.shape],
                                  "size": int(values.size), "zeros_before": before,
                                  "zeros_after": after,
                                  "sparsity": _sparsity(after, int(values.size))}
            weights += int(values.size)
            zeros_before += before
            zeros_after += after
        return {
            "threshold": result.stats.get("threshold"), "tensors": len(per_tensor),
            "tensors_changed": len(accepted), "proposed": len(result.proposals),
            "accepted": len(accepted), "weights": weights,
            "zeros_before": zeros_before, "zeros_after": zeros_after,
            "values_pruned": zeros_after - zeros_before,
            "sparsity": _sparsity(zeros_after, weights), "per_tensor": per_tensor,
        }


def _setter(t: gs.Constant, values: np.ndarray):
    def apply() -> None:
        t.values = values
    return apply
