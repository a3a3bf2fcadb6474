"""Training modes: what ``flystage.training.loop.fit``'s epoch loop trains, and on which samples.

Each mode is one small function ``setup_<mode>(train, valid, labels, cache, config, log)``
returning a :class:`Setup`; the loop (optimiser, schedule, metric lines, best epoch,
checkpoints, data-parallel) is the same for all of them.

- ``full``: every weight of the model from ``build_model`` trained on augmented images (the
  from-scratch models, hognet).
- ``probe``: a frozen feature extractor (a pretrained backbone's pooled stages, or HOG),
  whose features are computed once per image and once per augmentation draw and kept; the
  linear head on them is solved exactly (``probe_solver="lbfgs"``, the default: no epochs)
  or trained by the loop (``"sgd"``: an epoch takes milliseconds).
- ``finetune``: a pretrained backbone trained on augmented images at ``backbone_lr_scale``
  times the head's learning rate, its first ``freeze_stages`` stages frozen, and its
  BatchNorm statistics kept from ImageNet (batches of 32 are too small to re-estimate them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from flystage.augment import build_train_transform
from flystage.manifest import Record
from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache, StageDataset, label_indices
from flystage.training.models import build_feature_extractor, build_model, freeze_backbone
from flystage.training.ordinal import ordinal_targets
from flystage.training.probe import ProbeNet, cached_features, fit_logistic, scaled_l2
from flystage.training.unlabelled import (
    PseudoLabel,
    describe_taken,
    pseudo_labels,
    with_pseudo_labels,
)


@dataclass
class Setup:
    """What the epoch loop needs: samples ``(x, target)``, the module it trains, and how that
    module becomes the image model (``finish``: trained module -> images-to-logits model)."""

    train_set: Dataset
    valid_set: Dataset
    targets: np.ndarray  # class index of every training sample (balance, sampler)
    model: nn.Module
    param_groups: list[dict[str, Any]]
    finish: Callable[[nn.Module], nn.Module]
    penalty: Callable[[], torch.Tensor] | None = None  # added to every batch's loss
    solved: bool = False  # the model is fitted already (the probe's exact solver): no epochs to run
    # Unlabelled images that joined the training images with a stage (self-training).
    pseudo_labels: list[PseudoLabel] = field(default_factory=list)


def _decay_groups(
    params: Sequence[nn.Parameter], weight_decay: float, lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    # As torchvision's references: no weight decay on norm weights and biases.
    decay = [p for p in params if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
    return [
        g
        for g in (
            {"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale},
        )
        if g["params"]
    ]


def _image_sets(
    train: Sequence[Record],
    valid: Sequence[Record],
    labels: Sequence[str],
    cache: ImageCache,
    config: TrainConfig,
) -> tuple[StageDataset, StageDataset]:
    augmenter = build_train_transform(config.augment, seed=config.seed)
    return (
        StageDataset(train, labels, cache, augmenter, train=True),
        StageDataset(valid, labels, cache),
    )


def setup_full(train, valid, labels, cache, config, log) -> Setup:
    train_set, valid_set = _image_sets(train, valid, labels, cache, config)
    model = build_model(config.arch, len(labels), config.preprocess.channels, config.pretrained)
    return Setup(
        train_set,
        valid_set,
        train_set.targets,
        model,
        _decay_groups(list(model.parameters()), config.weight_decay),
        finish=lambda m: m,
    )


def setup_finetune(train, valid, labels, cache, config, log) -> Setup:
    train_set, valid_set = _image_sets(train, valid, labels, cache, config)
    model = build_model(config.arch, len(labels), config.preprocess.channels, pretrained=True)
    backbone, head = freeze_backbone(model, config.freeze_stages)
    groups = _decay_groups(backbone, config.weight_decay, config.backbone_lr_scale) + _decay_groups(
        head, config.weight_decay
    )
    return Setup(train_set, valid_set, train_set.targets, model, groups, finish=lambda m: m)


def setup_probe(train, valid, labels, cache, config, log, unlabelled=()) -> Setup:
    features, dim = build_feature_extractor(
        config.arch,
        config.preprocess.channels,
        config.feature_taps,
        config.hog_features,
        pretrained=True,
        flips=config.probe_flips,
        columns=config.probe_columns,
    )
    t0 = time.perf_counter()
    # Only labels here: the images are read where their features are computed (on each host's
    # share of them when training on several hosts).
    train_targets, valid_targets = label_indices(train, labels), label_indices(valid, labels)
    # Every image once as it is, and augment_draws augmented copies, each drawn once: the
    # backbone runs (1 + draws) times per training image in the whole run (and across
    # cross-validation folds), not once per epoch.
    key = (
        config.arch,
        tuple(config.feature_taps),
        config.hog_features,
        config.probe_flips,
        config.probe_columns,
        json.dumps(config.augment.to_dict()),
    )
    transform = build_train_transform(config.augment, seed=config.seed)
    train_paths, valid_paths = [r.path for r in train], [r.path for r in valid]
    x = torch.cat(
        [
            cached_features(features, key, cache, train_paths, draw, transform, config.seed)
            for draw in range(1 + config.augment_draws)
        ]
    )
    y = np.tile(train_targets, 1 + config.augment_draws)
    valid_x = cached_features(features, key, cache, valid_paths, 0, None, config.seed)
    log(
        f"probe: {config.arch} features ({dim}) of {len(train)} training images x "
        f"{1 + config.augment_draws} draws and {len(valid)} valid images in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    unlabelled_x = cached_features(features, key, cache, list(unlabelled), 0, None, config.seed)
    # The loop trains a ProbeNet without its backbone (on cached features); finish puts it back.
    head = ProbeNet(nn.Identity(), dim, len(labels))
    stats = torch.cat([x, unlabelled_x]) if unlabelled and config.unlabelled_standardise else x
    with torch.no_grad():
        head.mean.copy_(stats.mean(0))
        head.std.copy_(stats.std(0).clamp_min(1e-6))
    l2 = scaled_l2(config.probe_l2, len(train))
    pseudo: list[PseudoLabel] = []
    if config.probe_solver == "lbfgs":
        # The exact L2-regularised logistic regression: no learning rate, batches or epochs,
        # and no best epoch to choose on a handful of validation images (docs/accuracy.md).
        t1 = time.perf_counter()
        _solve_head(head, x, y, labels, config, l2)
        log(
            f"probe: head solved exactly (L-BFGS, l2 {config.probe_l2:g} x 200/{len(train)} "
            f"images = {l2:.3g}) in {time.perf_counter() - t1:.1f} s"
        )
        if unlabelled and config.self_training:
            with torch.no_grad():
                take, stage, probability = pseudo_labels(
                    head(unlabelled_x), head(valid_x), valid_targets, config.self_training
                )
            x, y, pseudo = with_pseudo_labels(
                x, y, unlabelled_x, list(unlabelled), take, stage, probability, labels
            )
            log(describe_taken(pseudo, len(unlabelled), labels, config.self_training))
            _solve_head(
                head, x, y, labels, config, scaled_l2(config.probe_l2, len(train) + len(pseudo))
            )

    def finish(trained: nn.Module) -> nn.Module:
        trained.features = features
        return trained.eval()

    # An L2 penalty on the head's weights in the loss, as in a regularised logistic regression
    # (AdamW's decoupled decay is far weaker at these learning rates; docs/accuracy.md).
    return Setup(
        TensorDataset(x, torch.from_numpy(y)),
        TensorDataset(valid_x, torch.from_numpy(valid_targets)),
        y,
        head,
        _decay_groups(list(head.parameters()), 0.0),
        finish,
        penalty=lambda: 0.5 * l2 * head.head.weight.pow(2).sum(),
        solved=config.probe_solver == "lbfgs",
        pseudo_labels=pseudo,
    )


def _solve_head(
    head: ProbeNet, x: torch.Tensor, y: np.ndarray, labels: Sequence[str], config, l2: float
) -> None:
    """Set ``head``'s linear layer to the exact L2 logistic regression of features ``x`` (N, D)
    (standardised by the head's own mean and std) on stage indices ``y`` (N,)."""
    y_t = torch.from_numpy(y)
    counts = torch.bincount(y_t, minlength=len(labels)).double().clamp_min(1)
    weights = 1.0 / counts[y_t] if config.balance != "none" else None
    targets = (
        ordinal_targets(y_t, len(labels), config.ordinal_smoothing)
        if config.ordinal_smoothing
        else y_t
    )
    w, b = fit_logistic((x - head.mean) / head.std, targets, len(labels), l2, weights)
    with torch.no_grad():
        head.head.weight.copy_(w)
        head.head.bias.copy_(b)


SETUPS: dict[str, Callable[..., Setup]] = {
    "full": setup_full,
    "probe": setup_probe,
    "finetune": setup_finetune,
}
