"""Task metrics for comparing a quantized model's outputs with the float model's, per model family.

Each function compares two runs on one evaluation set (``reference`` = fp32, ``candidate`` = the
optimized model), so a figure of 1.0 (or a CER of 0.0) means "behaves as the original", not
"is correct": the data under ``models/data/<model>/evaluation`` carries no labels to score against.

* OCR recognizers (PaddleOCR CRNN/SVTR, ddddocr): :func:`ctc_greedy_decode` then
  :func:`character_error_rate` between the two decodes. Greedy CTC (Graves et al. 2006, "Connectionist
  Temporal Classification", ICML, section 3.2 "best path decoding"): take the argmax class per time
  step, merge repeats, drop the blank. PaddleOCR's ``CTCLabelDecode`` (ppocr/postprocess/
  rec_postprocess.py) uses blank = 0 and the same rule; ddddocr's ``_ctc_decode_indices`` too.
* Classifiers (angle classifier, magika, ...): :func:`argmax_agreement`.
* DB text detectors: :func:`detection_iou` of the probability maps thresholded at 0.3, PaddleOCR's
  ``DBPostProcess(thresh=0.3)`` (ppocr/postprocess/db_postprocess.py; Liao et al. 2020,
  "Real-time Scene Text Detection with Differentiable Binarization", AAAI, section 3.3).
* Sentence encoders (MiniLM): :func:`masked_cosine` of ``last_hidden_state`` over the tokens the
  attention mask keeps, so padding positions (whose states no user reads) do not dilute the figure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The CTC blank index of PaddleOCR's and ddddocr's recognizers.
PADDLE_BLANK = 0
#: PaddleOCR DB's binarization threshold on the probability map.
DB_THRESHOLD = 0.3


def ctc_collapse(indices: Sequence[int] | np.ndarray, blank: int = PADDLE_BLANK) -> list[int]:
    """Merge runs of equal indices, then drop ``blank``: ``[0, 5, 5, 0, 5, 3, 3] -> [5, 5, 3]``.

    ``indices`` is one sequence of class indices over time (int, shape [T]), e.g. ddddocr's
    output, which is already the per-step argmax.
    """
    out, previous = [], None
    for index in np.asarray(indices).reshape(-1).tolist():
        if index != previous and index != blank:
            out.append(index)
        previous = index
    return out


def ctc_greedy_decode(probs: np.ndarray, blank: int = PADDLE_BLANK,
                      time_major: bool = False) -> list[list[int]]:
    """Greedy (best-path) CTC decode of per-step class scores.

    Args:
        probs: float [batch, time, classes] (PaddleOCR's softmax output), [time, batch,
            classes] with ``time_major`` (ddddocr's logits, [time, 1, 8210]), or [time, classes];
            probabilities, logits or log-probabilities alike (only the argmax is used).
        blank: the blank class index.
        time_major: the first axis of a 3-D ``probs`` is time.

    Returns:
        One index sequence per batch row (a single row for a 2-D input).
    """
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    elif probs.ndim != 3:
        raise ValueError(f"expected scores [batch, time, classes], got shape {list(probs.shape)}")
    elif time_major:
        probs = probs.transpose(1, 0, 2)
    return [ctc_collapse(row, blank) for row in probs.argmax(axis=-1)]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a``
    into ``b`` (Levenshtein 1966; Wagner and Fischer 1974, dynamic programming in O(len a *
    len b) time, O(len b) memory). Items are compared with ``==`` (strings, index lists)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def character_error_rate(references: Sequence[Sequence], hypotheses: Sequence[Sequence]) -> float:
    """Corpus CER: the summed edit distances over the summed reference lengths,
    ``sum(edit_distance(r, h)) / sum(len(r))`` (the (S + D + I) / N of speech and OCR
    evaluation). It can exceed 1 when hypotheses are longer than references.

    ``references`` and ``hypotheses`` are parallel lists of decodes (index lists or strings).
    When every reference is empty, returns 0.0 if every hypothesis is empty too, else 1.0.

    Raises:
        ValueError: the lists differ in length.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = sum(edit_distance(r, h) for r, h in zip(references, hypotheses))
    length = sum(len(r) for r in references)
    if length == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / length


def argmax_agreement(reference: np.ndarray, candidate: np.ndarray, axis: int = -1) -> float:
    """Fraction of positions where both outputs pick the same class along ``axis``
    (scores of equal shapes, e.g. [batch, classes] -> the fraction of the batch).

    Raises:
        ValueError: the shapes differ.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {list(reference.shape)} vs {list(candidate.shape)}")
    return float(np.mean(reference.argmax(axis=axis) == candidate.argmax(axis=axis)))


def detection_iou(reference: np.ndarray, candidate: np.ndarray,
                  threshold: float = DB_THRESHOLD) -> float:
    """Intersection over union of the two maps' text pixels, ``map > threshold``.

    Args:
        reference, candidate: probability maps of equal shapes (DB's [batch, 1, H, W]).
        threshold: the binarization threshold (0.3, PaddleOCR's default).

    Returns:
        |A and B| / |A or B|; 1.0 when neither map has a text pixel.

    Raises:
        ValueError: the shapes differ.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {list(reference.shape)} vs {list(candidate.shape)}")
    a, b = reference > threshold, candidate > threshold
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def masked_cosine(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray) -> float:
    """Cosine similarity of two ``last_hidden_state`` tensors over the non-padding tokens.

    Args:
        reference, candidate: float [batch, sequence, hidden].
        mask: the feed's ``attention_mask``, int or bool [batch, sequence]; tokens where it is 0
            are left out.

    Returns:
        The cosine of the two kept token states flattened into one vector each (float64 sums);
        1.0 when both are all zeros.

    Raises:
        ValueError: the shapes do not agree, or the mask keeps no token.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    keep = np.asarray(mask).astype(bool)
    if reference.shape != candidate.shape or reference.shape[:-1] != keep.shape:
        raise ValueError(f"shapes do not agree: {list(reference.shape)}, {list(candidate.shape)}, "
                         f"mask {list(keep.shape)}")
    if not keep.any():
        raise ValueError("the attention mask keeps no token")
    a = reference[keep].astype(np.float64).ravel()
    b = candidate[keep].astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b / norms)
