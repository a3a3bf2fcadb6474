"""Stages come in order: targets that give a neighbouring stage part of the credit.

Most errors of a stage classifier are between neighbouring stages (9-10 vs 11-12), where the
stages themselves blur into each other. ``ordinal_targets`` turns class indices into target
probabilities with ``smoothing`` moved from the true stage to its neighbours in label order
(``flystage.manifest.sort_labels``), so that the model pays less for naming a neighbour
than a far stage, and its top-3 tends to be contiguous stages. ``OrdinalLoss`` is the epoch
loop's cross-entropy on those targets; the exact probe solver takes them directly.
"""

from __future__ import annotations

import torch
from torch import nn


def ordinal_matrix(num_classes: int, smoothing: float) -> torch.Tensor:
    """``(K, K)`` float64: row ``c`` is the target distribution of stage ``c``: each existing
    neighbour (``c - 1``, ``c + 1``) gets ``smoothing / 2``, ``c`` the rest (an end stage,
    with one neighbour, keeps ``1 - smoothing / 2``)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"ordinal smoothing must be in [0, 1), not {smoothing}")
    m = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for c in range(num_classes):
        for n in (c - 1, c + 1):
            if 0 <= n < num_classes:
                m[c, n] = smoothing / 2
        m[c, c] = 1.0 - m[c].sum()
    return m


def ordinal_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Class indices ``(N,)`` int64 -> target probabilities ``(N, K)`` float64 (rows sum to 1)."""
    return ordinal_matrix(num_classes, smoothing)[y]


class OrdinalLoss(nn.Module):
    """Cross-entropy of logits ``(N, K)`` against :func:`ordinal_targets` of ``y`` ``(N,)``, with
    per-class ``weight`` and ``label_smoothing`` as :class:`torch.nn.CrossEntropyLoss`."""

    def __init__(
        self,
        num_classes: int,
        smoothing: float,
        weight: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.register_buffer("matrix", ordinal_matrix(num_classes, smoothing).float())
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            logits,
            self.matrix[y].to(logits.dtype),
            weight=self.weight,
            label_smoothing=self.label_smoothing,
        )
