"""Percentile bootstrap intervals over groups (a cluster bootstrap) for a model's answers.

Images of one group (a gene, an embryo, a session) look alike and often share a stage, so they
are not independent: resampling single images gives intervals that are too narrow. Each
resample here draws G of the G groups with replacement and scores the images of the drawn
groups (a group drawn twice counts twice). Every score is a function of per-image sums, so a
resample is ``counts (G,) @ per-group sums (G, m)``: 2,000 resamples of 3,000 images are a few
matrix products, not 2,000 passes over the images.

Scores (:data:`METRICS`), all over the top-ranked stages (ties to the earlier stage, as
``flystage predict`` ranks them): ``top1`` and ``top3`` (share of images whose true stage is
among the 1 / 3 most probable), ``within1`` (share whose top-1 is at most one stage from the
truth, stages in label-list order), ``mae`` (mean |top-1 - truth| in label-list steps) and
``ece`` (expected calibration error, the bins of
:func:`flystage.calibrate.expected_calibration_error`).

Shapes: ``probs`` ``(N, K)`` float, ``targets`` ``(N,)`` int class indices, ``groups`` N names
or None (each image its own group).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flystage.calibrate import calibration_gaps

METRICS: tuple[str, ...] = ("top1", "top3", "within1", "mae", "ece")
# Scores where a smaller value is the better model (the others: larger is better).
LOWER_IS_BETTER = frozenset({"mae", "ece"})
N_BOOT = 2000
LEVEL = 0.95
METHOD = "percentile bootstrap over groups"
# Resamples drawn at once: bounds the counts matrix to _CHUNK x G integers. Fixed, so a seed
# gives the same intervals whatever the data size.
_CHUNK = 250
_FIXED = 4  # image_terms columns before the calibration gaps


def json_float(x: float | None, digits: int = 6) -> float | None:
    """``x`` rounded for a JSON report; None for None or NaN (``+ 0.0`` turns -0.0 into 0.0)."""
    return None if x is None or np.isnan(x) else round(float(x), digits) + 0.0


def ranking(probs: np.ndarray) -> np.ndarray:
    """``(N, K)`` int64 class indices, most probable first; ties go to the earlier stage."""
    return np.argsort(-np.asarray(probs, dtype=np.float64), axis=1, kind="stable")


def image_terms(probs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``(N, 4 + bins)`` float64 per-image terms whose column sums give every score: top-1 hit,
    top-3 hit, top-1 within one stage, |top-1 - truth| in stages, then the calibration gaps
    (:func:`flystage.calibrate.calibration_gaps`)."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets, dtype=np.int64)
    order = ranking(probs)
    error = np.abs(order[:, 0] - targets)
    return np.column_stack(
        [
            order[:, 0] == targets,
            (order[:, :3] == targets[:, None]).any(axis=1),
            error <= 1,
            error,
            calibration_gaps(probs, targets),
        ]
    ).astype(np.float64)


def metrics_of_sums(sums: np.ndarray, n: np.ndarray | float) -> dict[str, np.ndarray]:
    """Scores from summed :func:`image_terms` ``(..., m)`` over ``n`` images (``(...)``)."""
    sums = np.asarray(sums, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "top1": sums[..., 0] / n,
            "top3": sums[..., 1] / n,
            "within1": sums[..., 2] / n,
            "mae": sums[..., 3] / n,
            # Per bin |summed gap| / n: the ECE's share-weighted |accuracy - confidence|.
            "ece": np.abs(sums[..., _FIXED:]).sum(axis=-1) / n,
        }


def group_index(groups: Sequence[Any] | None, n: int) -> tuple[np.ndarray, int]:
    """``(N,)`` int64 group number of each image and the number of groups G; without groups
    each image is its own group."""
    if groups is None:
        return np.arange(n, dtype=np.int64), n
    names = [str(g) for g in groups]
    if len(names) != n:
        raise ValueError(f"groups must name the group of each of the {n} images, got {len(names)}")
    unique, index = np.unique(np.asarray(names, dtype=str), return_inverse=True)
    return index.astype(np.int64).reshape(-1), len(unique)


def resampled_sums(
    terms: np.ndarray, groups: Sequence[Any] | None, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Column sums of ``terms`` ``(N, m)`` over the images of ``n_boot`` cluster resamples.

    Returns the sums ``(n_boot, m)``, the resampled image counts ``(n_boot,)`` and G. Each
    resample draws G groups uniformly with replacement from ``np.random.default_rng(seed)``.
    """
    terms = np.asarray(terms, dtype=np.float64)
    index, n_groups = group_index(groups, len(terms))
    # Per-group sums, with the group's image count as a last column.
    per_group = np.zeros((n_groups, terms.shape[1] + 1), dtype=np.float64)
    np.add.at(per_group, index, np.column_stack([terms, np.ones(len(terms))]))
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, per_group.shape[1]), dtype=np.float64)
    for start in range(0, n_boot, _CHUNK):
        b = min(_CHUNK, n_boot - start)
        drawn = rng.integers(0, n_groups, size=(b, n_groups))
        # How often each group was drawn in each resample, by one bincount over all rows.
        offsets = (np.arange(b, dtype=np.int64) * n_groups)[:, None]
        counts = np.bincount((drawn + offsets).ravel(), minlength=b * n_groups)
        out[start : start + b] = counts.reshape(b, n_groups).astype(np.float64) @ per_group
    return out[:, :-1], out[:, -1], n_groups


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``values`` ``(B,)``."""
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100.0 - tail])
    return float(lo), float(hi)


def _check(n_boot: int, level: float, n_images: int) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    if n_images == 0:
        raise ValueError("no images to resample")


def describe(n_boot: int, level: float, n_groups: int) -> dict[str, Any]:
    """The report's ``bootstrap`` entry: how the intervals were made."""
    return {"method": METHOD, "resamples": int(n_boot), "level": level, "n_groups": int(n_groups)}


def bootstrap_intervals(
    terms: np.ndarray,
    groups: Sequence[Any] | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    """Percentile intervals of every score in :data:`METRICS` over cluster resamples of
    :func:`image_terms` ``(N, m)``; returns them and :func:`describe`'s entry."""
    _check(n_boot, level, len(terms))
    sums, counts, n_groups = resampled_sums(terms, groups, n_boot, seed)
    scores = metrics_of_sums(sums, counts)
    intervals = {name: percentile_interval(scores[name], level) for name in METRICS}
    return intervals, describe(n_boot, level, n_groups)


def paired_bootstrap(
    terms_a: np.ndarray,
    terms_b: np.ndarray,
    groups: Sequence[Any] | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Model B against model A on the same N images (row i of both :func:`image_terms` arrays
    is the same image).

    Per score in :data:`METRICS`: ``a``, ``b``, ``difference`` (b - a) and ``interval`` of the
    difference, each resample scoring both models on the same drawn groups (what the models
    share, such as hard groups, cancels). Returns those and :func:`describe`'s entry.
    """
    terms_a, terms_b = np.asarray(terms_a), np.asarray(terms_b)
    if terms_a.shape != terms_b.shape:
        raise ValueError(f"terms must match, got {terms_a.shape} and {terms_b.shape}")
    _check(n_boot, level, len(terms_a))
    m = terms_a.shape[1]
    sums, counts, n_groups = resampled_sums(np.hstack([terms_a, terms_b]), groups, n_boot, seed)
    drawn_a, drawn_b = metrics_of_sums(sums[:, :m], counts), metrics_of_sums(sums[:, m:], counts)
    point_a = metrics_of_sums(terms_a.sum(axis=0), len(terms_a))
    point_b = metrics_of_sums(terms_b.sum(axis=0), len(terms_b))
    out = {
        name: {
            "a": float(point_a[name]),
            "b": float(point_b[name]),
            "difference": float(point_b[name] - point_a[name]),
            "interval": percentile_interval(drawn_b[name] - drawn_a[name], level),
        }
        for name in METRICS
    }
    return out, describe(n_boot, level, n_groups)
