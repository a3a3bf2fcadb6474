"""Screen: does fine-tuning EfficientNet-Lite2's last block stage beat the exact linear probe?

Item 5 of issue 15, measured outside the toolkit (docs/accuracy.md). Every image's stage-5
output map and pooled stages 1-5 are computed once; per fold, the exact probe (stages 1-6
pooled over the image, class-balanced L2 logistic regression, ``probe_l2`` scaled as the
toolkit scales it) is solved, then the last stage is trained on the cached maps with AdamW
(BatchNorm statistics kept; the head frozen at the probe's solution unless ``--head-lr``),
and the head is solved again exactly on the tuned features. Prints, per fold and pooled,
top-1 / top-3 / within one stage of both.

    python bench/screen_finetune_last.py [--dataset bdgp|stages15] [--data DIR]
        [--epochs 10] [--stage-lr 1e-4] [--head-lr 0]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench_accuracy import read_stages15
from common import DATA, read_by_gene
from flystage.evaluate import topk_accuracy
from flystage.imaging import PreprocessConfig
from flystage.manifest import sort_labels
from flystage.training.backbones import LiteFeatures
from flystage.training.data import ImageCache, to_float
from flystage.training.folds import plan_folds
from flystage.training.probe import fit_logistic, scaled_l2

STAGES15 = DATA.parent / "bdgp-stages15"


@torch.no_grad()
def cached_maps(features: LiteFeatures, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled stages 1-5 ``(N, 488)`` and stage 5's output maps ``(N, 208, h, w)``."""
    fixed, maps = [], []
    for i in range(0, len(images), 32):
        x = to_float(images[i : i + 32]).expand(-1, 3, -1, -1)
        x = features.bn1(features.conv_stem(x * 2.0 - 1.0))
        pooled = []
        for j, stage in enumerate(features.blocks[:6]):
            x = stage(x)
            if j >= 1:
                pooled.append(x.mean((2, 3)))
        fixed.append(torch.cat(pooled, 1))
        maps.append(x)
    return torch.cat(fixed), torch.cat(maps)


def solve(x: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Standardisation and the exact class-balanced probe head of features ``x`` (N, D)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    counts = torch.bincount(y, minlength=k).double().clamp_min(1)
    w, b = fit_logistic((x - mean) / std, y, k, scaled_l2(1.0, len(y)), 1.0 / counts[y])
    return mean, std, w, b


def one_fold(base, fixed, maps, y, train, test, k, args) -> tuple[np.ndarray, np.ndarray]:
    """Held-out probabilities of the probe and of the tuned last stage for one fold."""
    stage = copy.deepcopy(base).eval()  # eval: BatchNorm keeps ImageNet's statistics

    def features(index: np.ndarray) -> torch.Tensor:
        return torch.cat([fixed[index], stage(maps[index]).mean((2, 3))], 1)

    y_t = torch.from_numpy(y)
    with torch.no_grad():
        mean, std, w, b = solve(features(train), y_t[train], k)
        probe = torch.softmax((features(test) - mean) / std @ w.T + b, 1).numpy()
    head = nn.Linear(len(mean), k)
    head.weight.data.copy_(w)
    head.bias.data.copy_(b)
    optimizer = torch.optim.AdamW(
        [
            {"params": stage.parameters(), "lr": args.stage_lr, "weight_decay": 0.05},
            {"params": head.parameters(), "lr": args.head_lr, "weight_decay": 0.0},
        ]
    )
    counts = torch.bincount(y_t[train], minlength=k).float().clamp_min(1)
    weight = (1.0 / counts) / (1.0 / counts).mean()
    rng = np.random.default_rng(0)
    for _ in range(args.epochs):
        order = rng.permutation(train)
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            logits = head((features(batch) - mean) / std)
            loss = nn.functional.cross_entropy(logits, y_t[batch], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        mean, std, w, b = solve(features(train), y_t[train], k)
        tuned = torch.softmax((features(test) - mean) / std @ w.T + b, 1).numpy()
    return probe, tuned


def scores(probs: np.ndarray, y: np.ndarray) -> str:
    within1 = float(np.mean(np.abs(probs.argmax(1) - y) <= 1))
    return (
        f"top-1 {topk_accuracy(probs, y, 1):.3f} top-3 {topk_accuracy(probs, y, 3):.3f} "
        f"within one {within1:.3f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("bdgp", "stages15"), default="bdgp")
    parser.add_argument("--data", type=Path, help="the data folder (default: as bench_accuracy)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--stage-lr", type=float, default=1e-4)
    parser.add_argument("--head-lr", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    stages15 = args.dataset == "stages15"
    data = args.data or (STAGES15 if stages15 else DATA)
    records = read_stages15(data) if stages15 else read_by_gene(data)
    folds = plan_folds(records, k=5 if stages15 else None)
    labels = sort_labels({r.label for r in records})
    index = {r.path: i for i, r in enumerate(records)}
    y = np.array([labels.index(r.label) for r in records])
    features = LiteFeatures("efficientnet_lite2", (1, 2, 3, 4, 5, 6)).eval()
    cache = ImageCache(PreprocessConfig(), workers=2)
    fixed, maps = cached_maps(features, cache.get([r.path for r in records]))
    probe, tuned = np.zeros((len(y), len(labels))), np.zeros((len(y), len(labels)))
    for fold in folds:
        # Every training group of the fold (the probe screen holds no validation groups back).
        train = np.array([index[r.path] for r in (*fold.train, *fold.valid)])
        test = np.array([index[r.path] for r in fold.test])
        probe[test], tuned[test] = one_fold(
            features.blocks[6], fixed, maps, y, train, test, len(labels), args
        )
        print(
            f"{fold.group}: probe {scores(probe[test], y[test])}; "
            f"tuned {scores(tuned[test], y[test])}",
            flush=True,
        )
    print(f"pooled, probe: {scores(probe, y)}")
    print(f"pooled, last stage tuned: {scores(tuned, y)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
