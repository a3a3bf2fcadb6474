"""The lab's unlabelled images: what a probe can learn from images nobody has staged yet.

A lab always has far more unlabelled images than labelled ones. Two uses, both for the
linear probe (``flystage train --unlabelled FOLDER``, or the SageMaker channel
``unlabelled``):

- **Feature statistics of the lab's own images** (``unlabelled_standardise``): the probe
  standardises its features by the mean and SD of the training and unlabelled images
  together, so the scale the head sees is that of the images it will be asked about (the
  idea of AdaBN, for a frozen backbone's pooled features).
- **Self-training** (``self_training`` = a probability threshold): the head, calibrated on the
  validation images, names the unlabelled images; those whose calibrated top-1 probability
  reaches the threshold join the training images with that stage as their label, and the
  head is solved again. The share taken, per stage, is logged; a bench that knows the true
  stages scores the pseudo-labels (``PseudoLabel``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flystage.calibrate import fit_temperature


@dataclass(frozen=True)
class PseudoLabel:
    """An unlabelled image the model labelled with confidence: its path, stage and calibrated
    top-1 probability."""

    path: Path
    label: str
    probability: float


def pseudo_labels(
    unlabelled_logits: torch.Tensor,
    valid_logits: torch.Tensor,
    valid_targets: np.ndarray,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which unlabelled images to take, their stage index and calibrated top-1 probability.

    ``unlabelled_logits`` ``(M, K)``; the temperature is fitted on ``valid_logits`` ``(V, K)``
    against ``valid_targets`` ``(V,)`` (``flystage.calibrate.fit_temperature``), so the
    threshold is a probability the validation images vouch for. Returns ``take`` ``(M,)``
    bool, ``stage`` ``(M,)`` int64, ``probability`` ``(M,)`` float64.
    """
    temperature = fit_temperature(valid_logits.double().numpy(), np.asarray(valid_targets))
    probs = torch.softmax(unlabelled_logits.double() / temperature, dim=1).numpy()
    probability = probs.max(axis=1)
    return probability >= threshold, probs.argmax(axis=1).astype(np.int64), probability


def describe_taken(
    taken: Sequence[PseudoLabel], total: int, labels: Sequence[str], threshold: float
) -> str:
    """One log line: how many unlabelled images took a pseudo-label, and per stage."""
    counts = {label: 0 for label in labels}
    for p in taken:
        counts[p.label] += 1
    share = len(taken) / total if total else 0.0
    per_stage = ", ".join(f"{label} {n}" for label, n in counts.items())
    return (
        f"self-training: {len(taken)} of {total} unlabelled images ({100 * share:.0f} %) "
        f"reached calibrated p >= {threshold:g} and joined the training images ({per_stage})"
    )


def with_pseudo_labels(
    x: torch.Tensor,
    y: np.ndarray,
    unlabelled_x: torch.Tensor,
    unlabelled_paths: Sequence[Path],
    take: np.ndarray,
    stage: np.ndarray,
    probability: np.ndarray,
    labels: Sequence[str],
) -> tuple[torch.Tensor, np.ndarray, list[PseudoLabel]]:
    """Training features and targets with the taken unlabelled rows appended, and the
    pseudo-labels given."""
    index = np.flatnonzero(take)
    taken = [
        PseudoLabel(Path(unlabelled_paths[i]), labels[stage[i]], round(float(probability[i]), 6))
        for i in index
    ]
    return (
        torch.cat([x, unlabelled_x[torch.from_numpy(index)]]),
        np.concatenate([y, stage[index]]),
        taken,
    )
