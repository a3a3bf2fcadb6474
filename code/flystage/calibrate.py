"""Calibrated probabilities: temperature scaling, expected calibration error, coverage.

A model's top-1 probability should be the chance that its top-1 is right, so that a lab can
accept every answer above a threshold without a look. Temperature scaling (Guo et al. 2017)
divides the logits by one number T fitted on the validation images (T > 1 softens an
overconfident model); it never changes the ranking, so top-1 and top-3 stay as they are.

Numpy only (the serve image and ``evaluate`` run without torch); shapes: ``logits`` and
``probs`` ``(N, K)`` float, ``targets`` ``(N,)`` int class indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
ECE_BINS = 10
# SD of the prior on log T: T within about 0.6..1.6 before the data say otherwise.
PRIOR_SD = 0.5


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    p = softmax(logits, temperature)[np.arange(len(targets)), np.asarray(targets)]
    return float(-np.mean(np.log(np.clip(p, 1e-12, None))))


def fit_temperature(
    logits: np.ndarray,
    targets: np.ndarray,
    prior_sd: float = PRIOR_SD,
    bounds: tuple[float, float] = (0.05, 20.0),
) -> float:
    """The T in ``bounds`` minimising the validation NLL of ``softmax(logits / T)`` plus a
    Gaussian prior on log T centred on 0 (T = 1) with SD ``prior_sd``.

    The prior matters only for small validation sets: on ten images that are all right, the
    NLL alone drives T to its lower bound (a model that is sure of everything). It weighs as
    one image per ``1 / prior_sd^2`` nats, so a hundred images outweigh it. The objective is
    unimodal in log T, so a golden-section search finds the minimum without torch.
    """
    logits, targets = np.asarray(logits, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return 1.0
    n = len(targets)

    def objective(log_t: float) -> float:
        return (
            nll(logits, targets, np.exp(log_t))
            + (log_t**2 / (2.0 * prior_sd**2) if prior_sd else 0.0) / n
        )

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = objective(a), objective(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = objective(b)
    return float(np.exp((lo + hi) / 2.0))


def calibration_gaps(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """``(N, bins)`` float64: row i holds ``correct_i - confidence_i`` (top-1 right or not, minus
    its top-1 probability) in the column of the equal-width bin of its top-1 probability, 0
    elsewhere. The ECE is the sum over bins of |column sum| / N; kept per image so that a
    bootstrap resample's ECE is a weighted column sum (:mod:`flystage.bootstrap`)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    gaps = np.zeros((len(targets), bins), dtype=np.float64)
    if len(targets):
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == targets
        which = np.minimum((confidence * bins).astype(int), bins - 1)
        gaps[np.arange(len(targets)), which] = correct - confidence
    return gaps


def expected_calibration_error(
    probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: over ``bins`` equal-width bins of top-1 probability, the image-weighted mean of
    |accuracy - mean confidence| (0 = perfectly calibrated)."""
    if len(targets) == 0:
        return float("nan")
    # Share of images in a bin times |its mean gap| is |the bin's summed gap| / N.
    return float(np.abs(calibration_gaps(probs, targets, bins).sum(axis=0)).sum() / len(targets))


def coverage_table(
    probs: np.ndarray, targets: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> list[dict]:
    """For each threshold: the share of images whose top-1 probability reaches it
    (``coverage``), how many (``n``), and the top-1 accuracy on them (``accuracy``, None if
    none)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = probs.argmax(axis=1) == targets if len(probs) else np.zeros(0, bool)
    rows = []
    for t in thresholds:
        kept = confidence >= t
        rows.append(
            {
                "threshold": float(t),
                "coverage": round(float(kept.mean()), 4) if len(kept) else None,
                "n": int(kept.sum()),
                "accuracy": round(float(correct[kept].mean()), 4) if kept.any() else None,
            }
        )
    return rows
