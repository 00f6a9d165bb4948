"""Pruning math shared by the pruning passes: masks, SparseGPT reconstruction, layer errors and
the allocation of sparsity across layers by measured sensitivity.

Convention: a weight is viewed as a matrix ``w[K, N]`` -- K input features (the contracted
dimension, "columns" in the papers' ``W[N, K]``) as rows, N outputs as columns -- so that the
layer computes ``y = x @ w`` for an input row ``x[K]``; ``gram = X^T X`` (float64 ``[K, K]``)
over the calibration rows ``X[n, K]`` (``onnxopt.analyses.activations.TensorStats.gram``).

* :func:`keep_mask`: the weights kept when the lowest-scored fraction is pruned, per tensor or
  per output ("row": Wanda's comparison group, Sun et al. 2023, "A Simple and Effective Pruning
  Approach for Large Language Models", section 3), or N:M -- in each group of M consecutive
  input weights of an output, the N highest-scored are kept (the 2:4 pattern of sparse tensor
  cores, Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks", section 2).
* :func:`sparsegpt`: Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be
  Accurately Pruned in One-Shot", ICML, Algorithm 1. With ``H = X^T X + λ I`` (``λ = damp ·
  mean diag``) and ``U`` the upper Cholesky factor of ``H^-1``, input features are visited in
  order; in each block of ``B`` features the mask is chosen by the OBS saliency ``w^2 / U_jj^2``
  (Hassibi and Stork 1993, "Optimal Brain Surgeon"), and pruning feature ``j`` of an output
  adds ``-(w_j / U_jj) U_j,j+1:`` to that output's not yet visited weights -- the least-squares
  refit of the remaining weights to the layer's outputs on ``X``.
* :func:`refit_target`: the dense weight a layer fed the pruned model's inputs ``X~`` needs to
  reproduce the original outputs ``X w`` (ridge toward ``w``); :func:`sparsegpt` prunes it when
  given the cross Gram ``X~^T X`` (GPTAQ's asymmetric calibration, Li et al. 2025).
* :func:`refit_masked`: with the mask fixed, the least-squares optimum of the kept weights (Boža
  2024, "Fast and Effective Weight Update for Pruned Large Language Models"), by conjugate
  gradients, after SparseGPT's one-way updates.
* :func:`relative_error`: ``tr(dW^T G dW) / tr(W^T G W)``, the calibration output error of a
  change ``dW`` relative to the layer's output energy (no activations held: ``||X dW||^2``).
* :func:`allocate`: per-layer sparsities under one global target (fraction of all weights):
  greedily give the next step of sparsity to the layer whose relative error grows least per
  weight pruned -- the layer-wise sensitivity allocation of OWL (Yin et al. 2024, "Outlier
  Weighed Layerwise Sparsity", section 3.3, which ranks layers by outlier ratio) and of
  "ZipLM"/"SPDY" (Frantar and Alistarh 2022, "SPDY: Accurate Pruning with Speedup Guarantees",
  section 3: per-layer error curves and a budgeted choice), here with measured error curves.
"""

from __future__ import annotations

import heapq

import numpy as np

#: Input features SparseGPT chooses a mask for at once (the paper's B_s).
SPARSEGPT_BLOCK = 128
#: The candidate per-layer sparsities of :func:`allocate`.
ALLOCATION_LEVELS = tuple(round(0.05 * i, 2) for i in range(20))  # 0.0 .. 0.95


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``.

    Raises:
        ValueError: not ``N:M`` with ``0 < N < M``.
    """
    n, sep, m = pattern.partition(":")
    if not sep or not n.strip().isdigit() or not m.strip().isdigit():
        raise ValueError(f"pattern must be N:M (e.g. 2:4), got {pattern!r}")
    n, m = int(n), int(m)
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def _pruned_count(sparsity: float, size: int) -> int:
    return min(size, int(np.floor(sparsity * size + 0.5)))


def keep_mask(scores: np.ndarray, sparsity: float = 0.0, scope: str = "tensor",
              pattern: tuple[int, int] | None = None) -> np.ndarray:
    """The weights kept (bool, shape of ``scores[K, N]``) when the lowest scores are pruned.

    Args:
        scores: importance, >= 0 (``|w|``, or Wanda's ``|w_ij| ||x_j||``), float ``[K, N]``.
        sparsity: fraction pruned, of the tensor (``scope="tensor"``) or of each output column
            (``"row"``), rounded to the nearest count; ignored with ``pattern``.
        pattern: ``(n, m)``: in each group of ``m`` consecutive rows of a column keep ``n``.

    Raises:
        ValueError: ``K`` is not a multiple of ``m``.
    """
    k, n_out = scores.shape
    keep = np.ones(scores.shape, bool)
    if pattern is not None:
        n, m = pattern
        if k % m:
            raise ValueError(f"{k} input features are not a multiple of {m}")
        groups = scores.reshape(k // m, m, n_out)
        ranks = np.argsort(np.argsort(groups, axis=1, kind="stable"), axis=1, kind="stable")
        return (ranks >= m - n).reshape(k, n_out)
    if scope == "row":
        count = _pruned_count(sparsity, k)
        order = np.argsort(scores, axis=0, kind="stable")[:count]
        keep[order, np.arange(n_out)[None, :]] = False
        return keep
    count = _pruned_count(sparsity, scores.size)
    keep.reshape(-1)[np.argsort(scores, axis=None, kind="stable")[:count]] = False
    return keep


def global_sparsities(scores: list[np.ndarray], sparsity: float) -> list[float]:
    """Per-tensor sparsities of one threshold across all ``scores`` pruning ``sparsity`` of
    their elements together (the lowest scores of the concatenation)."""
    flat = np.concatenate([s.reshape(-1) for s in scores])
    count = _pruned_count(sparsity, flat.size)
    if count == 0:
        return [0.0] * len(scores)
    threshold = np.partition(flat, count - 1)[count - 1]
    return [float(np.count_nonzero(s <= threshold)) / s.size for s in scores]


def damped_hessian(gram: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(H, dead)``: ``gram`` with never-active features (zero diagonal) set to ``H_jj = 1``
    and ``damp · mean diag`` added to the diagonal; ``dead`` marks those features."""
    h = np.array(gram, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    return h, dead


def sparsegpt(w: np.ndarray, gram: np.ndarray, sparsity: float = 0.0, scope: str = "tensor",
              pattern: tuple[int, int] | None = None, damp: float = 0.01,
              saliency: str = "obs", block: int = SPARSEGPT_BLOCK,
              cross: np.ndarray | None = None, target_damp: float | None = None,
              offset: np.ndarray | None = None, refine: int = 0) -> np.ndarray:
    """SparseGPT (module docstring) of ``w`` (float ``[K, N]``) given ``gram`` (``[K, K]``).

    Args:
        cross: ``C = X~^T X`` (``[K, K]``) when the layer's inputs ``X~`` (whose ``gram`` is
            ``X~^T X~``) differ from the inputs ``X`` the original weight was applied to: the
            refit then targets the original outputs ``X w`` instead of ``X~ w``. Since
            ``||X~ w' - X w||^2 = ||X~ (w' - w*)||^2 + const`` with ``w* = H^-1 C w`` (the
            least-squares weight, damped ``H``), SparseGPT prunes ``w*`` (see :func:`refit_target`).
        offset: ``X~^T D`` (``[K, N]``, with ``cross``): the refit also makes up for an error
            ``D = R - R~`` (rows ``[n, N]``) of the stream the layer's output is added to,
            e.g. the residual stream (:func:`refit_target`).
        sparsity: fraction of each block's weights pruned, of the whole block (``scope=
            "tensor"``) or of each output (``"row"``); ignored with ``pattern``.
        pattern: ``(n, m)``: keep ``n`` of every ``m`` consecutive input features per output.
        saliency: ``"obs"`` (``w^2 / U_jj^2``) or ``"magnitude"`` (``w^2``) chooses the mask.
        refine: iterations of :func:`refit_masked` (on the same damped ``H``) after the pass
            over the features (0: none).

    Returns:
        The pruned and refit weight (float64 ``[K, N]``); weights of never-active features are 0.

    Raises:
        ValueError: ``K`` is not a multiple of ``m`` for a pattern.
        numpy.linalg.LinAlgError: ``H`` not positive definite (cannot happen for a Gram matrix
            with ``damp > 0``).
    """
    k = w.shape[0]
    if pattern is not None and k % pattern[1]:
        raise ValueError(f"{k} input features are not a multiple of {pattern[1]}")
    h, dead = damped_hessian(gram, damp)
    work = np.array(w, np.float64).T  # [N, K]: one row per output, as in the paper
    if cross is not None:
        work = np.ascontiguousarray(refit_target(
            w, gram, cross, damp if target_damp is None else target_damp, offset).T)
    work[:, dead] = 0.0
    goal = work.T.copy() if refine else None
    u = inverse_upper(h)  # upper: H^-1 = U^T U
    if pattern is not None:
        block = block - block % pattern[1] or pattern[1]
    for start in range(0, k, block):
        stop = min(start + block, k)
        w1, u1 = work[:, start:stop].copy(), u[start:stop, start:stop]
        d = np.diag(u1)
        errors = np.zeros_like(w1)
        prune = np.zeros(w1.shape, bool)
        if pattern is None:
            score = w1 ** 2 / d[None, :] ** 2 if saliency == "obs" else w1 ** 2
            prune = ~keep_mask(score.T, sparsity, scope).T
        for i in range(stop - start):
            if pattern is not None and i % pattern[1] == 0:
                group = w1[:, i:i + pattern[1]] ** 2
                if saliency == "obs":
                    group = group / d[None, i:i + pattern[1]] ** 2
                prune[:, i:i + pattern[1]] = ~keep_mask(group.T, pattern=pattern).T
            col = w1[:, i]
            q = np.where(prune[:, i], 0.0, col)
            err = (col - q) / d[i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            w1[:, i] = q
            errors[:, i] = err
        work[:, start:stop] = w1
        work[:, stop:] -= errors @ u[start:stop, stop:]
    if refine:
        return refit_masked(work.T, goal, h, work.T != 0, refine)
    return work.T


def refit_masked(start: np.ndarray, goal: np.ndarray, h: np.ndarray, keep: np.ndarray,
                 iterations: int) -> np.ndarray:
    """The weight ``w'[K, N]`` zero outside ``keep`` minimizing ``(w' - goal)^T H (w' - goal)``
    per output, approached from ``start`` by ``iterations`` steps of conjugate gradients with
    the Jacobi preconditioner (every output column at once; each step lowers the error).

    SparseGPT's updates refit a weight only from the features not yet visited, so with the mask
    fixed the result is not the least-squares optimum; solving the masked problem afterwards
    is the weight update of Boža 2024 ("Fast and Effective Weight Update for Pruned Large
    Language Models", TMLR 2024, there by ADMM). Weights zero in ``start`` stay zero (the
    mask, N:M patterns included, is kept). Float64 throughout."""
    keep = np.asarray(keep, bool)
    w = np.where(keep, start, 0.0)
    inv_diag = 1.0 / np.diag(h)[:, None]
    r = np.where(keep, h @ (goal - w), 0.0)
    z = r * inv_diag
    p = z.copy()
    rz = np.sum(r * z, axis=0)
    for _ in range(iterations):
        hp = np.where(keep, h @ p, 0.0)
        curvature = np.sum(p * hp, axis=0)
        alpha = np.divide(rz, curvature, out=np.zeros_like(rz), where=curvature > 0)
        w += alpha * p
        r -= alpha * hp
        z = r * inv_diag
        rz_next = np.sum(r * z, axis=0)
        beta = np.divide(rz_next, rz, out=np.zeros_like(rz), where=rz > 0)
        p = z + beta * p
        rz = rz_next
    return w


def _cholesky_solve(lower: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A^-1 b`` for ``A = L L^T`` (two triangular solves; numpy has no triangular solver, so
    the inverse of ``L`` is formed once -- at K <= a few thousand this is cheap and exact
    enough)."""
    inv = np.linalg.inv(lower)
    return inv.T @ (inv @ b)


def inverse_upper(h: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``H^-1 = U^T U``: from ``H = L L^T``, ``H^-1 = L^-T L^-1``,
    and the upper Cholesky factor of that is ``chol(H^-1)^T``."""
    return np.linalg.cholesky(np.linalg.inv(h)).T


def refit_target(w: np.ndarray, gram: np.ndarray, cross: np.ndarray,
                 damp: float = 0.01, offset: np.ndarray | None = None) -> np.ndarray:
    """The dense weight whose outputs on the pruned model's inputs ``X~`` best match the
    original outputs ``X w`` (float64 ``[K, N]``): ``argmin ||X~ w' - X w||^2 + λ ||w' - w||^2
    = w + (X~^T X~ + λ I)^-1 (X~^T X - X~^T X~) w`` (``λ`` as in :func:`damped_hessian`,
    regularizing toward ``w``: when ``X~ = X``, ``w*`` is ``w`` itself). With ``H`` that damped
    Hessian, ``||X~ w' - X w||^2 + λ ||w' - w||^2 = (w' - w*)^T H (w' - w*) + const``: pruning
    ``w*`` by SparseGPT on ``H`` minimizes the error to the original outputs.

    ``offset = X~^T D`` (float ``[K, N]``) widens the target to ``X w + D``: when the layer's
    output is added to a stream ``R`` (a residual connection), ``D = R - R~`` is the error the
    earlier layers left in that stream in the pruned model, and the refit makes up for the part
    of it its inputs predict (``w* = w + H^-1 ((X~^T X - X~^T X~) w + X~^T D)``): GPTAQ's
    asymmetric target (Li et al. 2025) carried across the residual Add."""
    w = np.asarray(w, np.float64)
    h, _ = damped_hessian(gram, damp)
    change = (np.asarray(cross, np.float64) - np.asarray(gram, np.float64)) @ w
    if offset is not None:
        change = change + np.asarray(offset, np.float64)
    return w + _cholesky_solve(np.linalg.cholesky(h), change)


def relative_error(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
    """``tr(dW^T G dW) / tr(W^T G W)`` for ``dW = w_hat - w`` (``[K, N]``), 0 when the
    denominator is 0."""
    w = np.asarray(w, np.float64)
    d = np.asarray(w_hat, np.float64) - w
    den = float(np.sum((gram @ w) * w))
    return float(np.sum((gram @ d) * d)) / den if den > 0 else 0.0


def error_curve(w: np.ndarray, scores: np.ndarray, gram: np.ndarray, scope: str,
                levels=ALLOCATION_LEVELS) -> np.ndarray:
    """:func:`relative_error` of pruning ``w[K, N]`` by ``scores`` to each of ``levels``
    (without refit: the sensitivity that ranks layers)."""
    w = np.asarray(w, np.float64)
    return np.array([relative_error(w, w * keep_mask(scores, s, scope), gram) for s in levels])


def allocate(curves: list[np.ndarray], sizes: list[int], target: float,
             levels=ALLOCATION_LEVELS) -> list[float]:
    """Per-layer sparsities (values of ``levels``) whose weighted mean reaches ``target``
    (within one step of one layer), chosen greedily: each step goes to the layer whose error
    (``curves[l][i]`` at ``levels[i]``) grows least per weight pruned.

    Args:
        curves: per layer, its error at each level (non-decreasing in practice).
        sizes: per layer, its number of weights.
        target: the global fraction of weights to prune, ``< levels[-1]``.
    """
    at = [0] * len(curves)
    budget = target * sum(sizes)
    pruned = 0.0
    heap = []

    def push(layer: int) -> None:
        i = at[layer]
        if i + 1 < len(levels):
            step = (levels[i + 1] - levels[i]) * sizes[layer]
            cost = (curves[layer][i + 1] - curves[layer][i]) / max(step, 1e-12)
            heapq.heappush(heap, (cost, layer))

    for layer in range(len(curves)):
        push(layer)
    while heap and pruned < budget - 1e-9:
        _, layer = heapq.heappop(heap)
        pruned += (levels[at[layer] + 1] - levels[at[layer]]) * sizes[layer]
        at[layer] += 1
        push(layer)
    return [float(levels[i]) for i in at]
