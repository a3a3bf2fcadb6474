"""Linear probe: a frozen pretrained backbone, features computed once, a linear head fitted exactly.

A few hundred images cannot retrain an ImageNet network, but its features already separate
the stages (docs/accuracy.md). So the backbone stays frozen, every image's pooled features
are computed once (and once per augmentation draw: ``augment_draws`` extra copies of each
training image, made by the training augmentation), and the head is an L2-regularised
multinomial logistic regression on standardised features, fitted to convergence by L-BFGS
in seconds. The result is one ``nn.Module`` (backbone, standardisation, head) that exports
to ONNX like any other model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from flystage.augment import build_train_transform
from flystage.data import to_float


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
def extract(features: nn.Module, images: np.ndarray, batch_size: int = 32,
            transform: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
            rng: np.random.Generator | None = None) -> torch.Tensor:
    """Features ``(N, D)`` float32 of cached images ``(N, C, H, W)`` (uint8 or float16).

    With ``transform`` (``transform(image, rng)``, the training augmentation), every image is
    augmented with ``rng`` first.
    """
    features.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size])
        if transform is not None:
            x = torch.stack([transform(image, rng) for image in x])
        out.append(features(x))
    return torch.cat(out) if out else torch.zeros(0, 0)


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

    ``x`` ``(N, D)`` float32 (standardise it first), ``y`` ``(N,)`` int64 class indices.
    """
    x = x.double()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    w = torch.ones(len(y), dtype=torch.float64) if sample_weight is None else sample_weight.double()
    w = w / w.sum()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (nn.functional.cross_entropy(x @ weight.T + bias, y, reduction="none") * w).sum()
        loss = loss + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


def fit_probe(
    features: nn.Module,
    dim: int,
    train_images: np.ndarray,
    train_targets: np.ndarray,
    num_classes: int,
    l2: float,
    *,
    balanced: bool = True,
    augment_draws: int = 0,
    augment_config=None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> ProbeNet:
    """Fit the linear head of a :class:`ProbeNet` on ``train_images`` ``(N, C, H, W)``.

    ``augment_draws`` adds that many augmented copies of every training image (the
    ``augment_config`` training augmentation), each drawn once; ``balanced`` weights every
    class equally in the loss.
    """
    targets = torch.as_tensor(np.asarray(train_targets), dtype=torch.int64)
    feats = [extract(features, train_images)]
    if augment_draws:
        transform = build_train_transform(augment_config, seed=seed)
        rng = np.random.default_rng(seed)
        for draw in range(augment_draws):
            feats.append(extract(features, train_images, transform=transform, rng=rng))
    x = torch.cat(feats)
    y = targets.repeat(1 + augment_draws)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    sample_weight = None
    if balanced:
        counts = torch.bincount(y, minlength=num_classes).double()
        sample_weight = 1.0 / counts[y]
    weight, bias = fit_logistic((x - mean) / std, y, num_classes, l2, sample_weight)
    net = ProbeNet(features, dim, num_classes)
    with torch.no_grad():
        net.mean.copy_(mean)
        net.std.copy_(std)
        net.head.weight.copy_(weight)
        net.head.bias.copy_(bias)
    log(f"probe: {len(y)} feature rows ({len(targets)} images x {1 + augment_draws}), {dim} features, l2 {l2:g}")
    return net.eval()


def standardise(train: torch.Tensor, *others: torch.Tensor) -> Sequence[torch.Tensor]:
    """``train`` and ``others`` standardised by ``train``'s mean and std (per feature)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]
