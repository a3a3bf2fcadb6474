"""Linear probe: a frozen pretrained backbone whose features are computed once, and a linear head.

A few hundred images cannot retrain an ImageNet network, but its features already separate
the stages (docs/accuracy.md). So the backbone stays frozen and every image's pooled features
are computed once, and once per augmentation draw (``cached_features``); the training loop
(``flystage.training.modes.setup_probe``) then fits only a linear head on standardised features. The
result is one ``nn.Module`` (:class:`ProbeNet`: backbone, standardisation, head) that exports to
ONNX like any other model. ``fit_logistic`` is the exact L2 logistic regression the ablation
(bench/ablation_pretrained.py) uses as a quick proxy.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flystage.training.data import ImageCache, gather_rows, to_float


class ProbeNet(nn.Module):
    """``features`` (frozen), then ``(f - mean) / std``, then a linear layer: images -> logits."""

    def __init__(self, features: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.features(x) - self.mean) / self.std)


@torch.no_grad()
def extract(features: nn.Module, images: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """Features ``(N, D)`` float32 of images ``(N, C, H, W)`` (uint8 cache, or float in [0, 1])."""
    features.eval()
    out = []
    for i in range(0, len(images), batch_size):
        out.append(features(to_float(images[i : i + batch_size])))
    return torch.cat(out) if out else torch.zeros(0, 0)


def cached_features(
    features: nn.Module,
    key: Any,
    cache: ImageCache,
    paths: Sequence[Path],
    draw: int,
    transform: Callable | None,
    seed: int,
) -> torch.Tensor:
    """Features ``(N, D)`` of ``paths`` (draw 0: as preprocessed; draw d > 0: the d-th
    augmented copy), computed once per (``key``, path, draw) and kept in ``cache.derived``.

    Each copy's augmentation is seeded by (seed, draw, path), so it is the same copy whichever
    fold, call or host asks for it: cross-validation folds share every feature row, and with
    torch.distributed up each host computes only its share of the missing rows.
    """
    store = cache.derived.setdefault(("probe", key, seed), {})
    missing = [p for p in dict.fromkeys(map(Path, paths)) if (p, draw) not in store]

    def compute(share: list[Path]) -> torch.Tensor:
        images = cache.get(share)
        if draw and share:
            images = np.stack(
                [
                    transform(
                        to_float(image),
                        np.random.default_rng((seed, draw, zlib.crc32(str(p).encode()))),
                    ).numpy()
                    for p, image in zip(share, images)
                ]
            ).astype(np.float32)
        return extract(features, images)

    if missing:
        # With several hosts each reads, augments and runs the backbone on its share only.
        for p, row in zip(missing, gather_rows(compute, missing)):
            store[(p, draw)] = row
    return torch.stack([store[(Path(p), draw)] for p in paths]) if paths else torch.zeros(0, 0)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    sample_weight: torch.Tensor | None = None,
    max_iter: int = 500,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: weight ``(K, D)`` and bias ``(K,)`` minimising the
    (weighted) mean cross-entropy + ``l2 / 2 * |weight|^2``, by L-BFGS (deterministic).

    ``x`` ``(N, D)`` float32 (standardise it first), ``y`` ``(N,)`` int64 class indices or
    ``(N, K)`` target probabilities (``flystage.training.ordinal.ordinal_targets``).
    """
    x = x.double()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    y = y.double() if y.is_floating_point() else y
    w = torch.ones(len(y), dtype=torch.float64) if sample_weight is None else sample_weight.double()
    w = w / w.sum()
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="none") * w).sum()
        loss = loss + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


# Training images at which ``probe_l2`` is applied as given (about one BDGP fold's).
L2_REFERENCE_IMAGES = 200


def scaled_l2(l2: float, n_images: int) -> float:
    """The penalty per image of a fixed prior ``l2`` stated for :data:`L2_REFERENCE_IMAGES`
    images: ``l2 * 200 / n_images`` (the mean loss of more images needs less of it)."""
    return l2 * L2_REFERENCE_IMAGES / max(1, n_images)


def standardise(train: torch.Tensor, *others: torch.Tensor) -> Sequence[torch.Tensor]:
    """``train`` and ``others`` standardised by ``train``'s mean and std (per feature)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]
