"""Train a stage classifier: the ``flystage train`` command and the SageMaker training program.

Read it top to bottom, like torchvision's references/classification/train.py:

1. ``TrainConfig``: every hyperparameter with its default and its one-line help (change
   defaults here only).
2. ``fit``: data (cached, augmented, balanced), model, optimiser and schedule, then the epoch
   loop (``train_one_epoch``, one metric line per epoch, early stopping on valid top-1 (then
   loss), a ``TrainState`` checkpoint every epoch, resumed on restart, and a clean stop on SIGTERM).
3. ``main`` / ``run``: arguments (``flystage.options``: one option per config field, grouped as
   the configs are) and the SageMaker environment (``SM_*``), data-parallel
   training over ``SM_HOSTS`` (torch.distributed, gloo), the model artefact, and the
   ``output/failure`` file when anything goes wrong.

The metric line, which SageMaker's metric definitions (``flystage.jobdef``) read::

    epoch=3 train_loss=0.8123 valid_loss=0.4100 valid_top1=0.8200 valid_top3=0.9700
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from flystage.augment import AugmentConfig
from flystage.calibrate import fit_temperature
from flystage.channels import DataError, FolderRules, data_summary, split_channels
from flystage.imaging import PreprocessConfig
from flystage.manifest import Record, manifest_sha256, sort_labels
from flystage.options import (
    ArgumentParser,
    Option,
    UsageError,
    add_options,
    dataclass_values,
    field_options,
    integer,
    mapping,
    markdown_table,
    option,
    regex_text,
)
from flystage.organise import iter_images
from flystage.training import kinds
from flystage.training.backbones import DEFAULT_TAPS
from flystage.training.data import (
    BALANCE_MODES,
    CACHE_DTYPES,
    ImageCache,
    class_weights,
    gather_rows,
    make_sampler,
    to_float,
)
from flystage.training.kinds import MODES, PROBE_SOLVERS
from flystage.training.models import (
    ARCHS,
    HOG_ARCHS,
    PRETRAINED_ARCHS,
    PROBE_FLIPS,
    Calibrated,
    EnsembleNet,
)
from flystage.training.modes import SETUPS
from flystage.training.ordinal import OrdinalLoss
from flystage.training.unlabelled import PseudoLabel

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "onecycle")
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
DEFAULT_DIST_PORT = 29500
DEFAULT_DIST_TIMEOUT_S = 900
SAVED_MODEL_PREFIX = "saved model: "
EXIT_STOPPED = 3  # stopped early on request (SIGTERM, stop_after_epoch); a checkpoint was saved


# ---- 1. configuration ----------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every training hyperparameter, its default and its one-line help (field metadata: the
    ``--help`` of ``flystage train`` and the table in docs/hyperparameters.md)."""

    # Measured held out by gene on BDGP and on a lab-like copy (docs/accuracy.md): a linear
    # probe on EfficientNet-Lite2's pooled stages 1-6, solved exactly, beats every model
    # trained from scratch, fine-tuning and the ensembles tried, in seconds per fold.
    arch: str = option(
        kinds.DEFAULT_ARCH,
        f"model architecture: {', '.join(ARCHS)}; the EfficientNet-Lites are "
        "ImageNet-pretrained, the others train from scratch unless pretrained is true",
    )
    mode: str = option(
        kinds.DEFAULT_MODE,
        "what is trained: probe (frozen pretrained features and a linear head), finetune "
        "(a pretrained backbone at a lower learning rate), full (every weight), or auto (probe for "
        "the EfficientNet-Lites and pretrained torchvision archs, full for the rest)",
    )
    pretrained: bool = option(
        False,
        "mode full: start from ImageNet weights (torchvision archs from the torch hub "
        "or its cache, EfficientNet-Lites from their pip package); with mode auto a pretrained "
        "torchvision arch is probed. Probe and finetune always start pretrained",
    )
    feature_taps: tuple[int, ...] = option(
        DEFAULT_TAPS,
        "probe, EfficientNet-Lite: the block stages (0-6) whose "
        "outputs are averaged over the image and concatenated as features",
    )
    hog_features: bool = option(
        False,
        "probe: append histogram-of-oriented-gradient features of the image to the "
        "backbone's features",
    )
    # Both measured on three protocols (docs/accuracy.md): together they raised lab-like top-1
    # by 4.0 points [2.3, 6.8] and stage-by-stage top-1 by 1.9 [0.9, 3.0], with no loss shown
    # on BDGP. The turn makes an embryo facing either way look the same; the bands keep
    # middle-versus-ends structure that survives the turn.
    probe_flips: str = option(
        "turn",
        "probe: average the features over flips of the image, in training and in the exported "
        "model, so that the embryo's orientation cannot count: none, turn (the image and its "
        "180-degree turn) or all (as is, left-right, up-down, both); 2 or 4 times the feature time",
    )
    probe_columns: int = option(
        3,
        "probe, EfficientNet-Lite: pool each stage's map over this many equal bands along the "
        "embryo's long axis (1 = over the whole image; 3 = anterior, middle, posterior), so the "
        "head sees where along the embryo a pattern lies; multiplies the features",
    )
    augment_draws: int = option(
        0,
        "probe: augmented copies of each training image (each drawn once, features "
        "computed once) added to the image itself; 0 = the probe sees no augmentation",
    )
    # A fixed prior on the head's weights: the penalty per image shrinks as images are added,
    # so 2,994 stage-by-stage images are fitted as closely as they allow while 170 BDGP images
    # stay as regularised as measured best (docs/accuracy.md).
    probe_l2: float = option(
        1.0,
        "probe: L2 penalty on the linear head's weights (>= 0) for 200 training images, "
        "scaled by 200 / (training images) so that more images are fitted more closely; larger "
        "gives a simpler head and softer probabilities. The knob to tune for the default model",
    )
    unlabelled_standardise: bool = option(
        True,
        "probe, with unlabelled images (--unlabelled, channel unlabelled): standardise the "
        "features by the training and unlabelled images together, the scale of the lab's own "
        "images",
    )
    # Given the images it will be asked about (docs/accuracy.md): lab-like top-1 +1.2 points
    # [+0.6, +2.8], BDGP +2.1 [+0.0, +3.4], stage by stage -0.1 [-0.4, +0.2].
    self_training: float = option(
        0.9,
        "probe, with unlabelled images: those whose calibrated top-1 probability reaches this "
        "threshold join the training images with that stage, and the head is solved again "
        "(0 = off)",
    )
    probe_solver: str = option(
        kinds.DEFAULT_PROBE_SOLVER,
        "probe: lbfgs solves the head exactly (no epochs, learning rate or "
        "batches: those options are then unused), sgd trains it in the epoch loop",
    )
    backbone_lr_scale: float = option(
        0.1,
        "finetune: the backbone's learning rate as a multiple of learning_rate (the head's), > 0",
    )
    freeze_stages: int = option(
        2, "finetune: the stem and this many first backbone stages (0-7) stay frozen"
    )
    # Members of one artefact whose probabilities are averaged: ensemble seeds (seed, seed+1,
    # ...) of each arch in ensemble_archs (empty: arch alone).
    ensemble: int = option(
        1,
        "models trained per arch, with seeds seed, seed+1, ..., whose probabilities are "
        "averaged in one model (1 = a single model)",
    )
    ensemble_archs: tuple[str, ...] = option(
        (), "comma-separated archs to ensemble, each trained ensemble times; empty = arch alone"
    )
    calibrate: bool = option(
        True,
        "fit a temperature on the validation images so that the stated probabilities "
        "match how often the model is right (the ranking of stages is unchanged)",
    )
    # Measured on the default probe (issue 17): ~1.35x the float graph's images/s on two
    # cores, top-1 unchanged on 98-99 % of BDGP images; cross-validated top-1 +0.5 points
    # [-3.1, +6.9] on BDGP, -3.6 [-5.5, -0.8] on lab-like copies (flystage.training.quantise).
    int8: bool = option(
        True,
        "after training, also save model-int8.onnx: the model quantised to int8 (calibrated on "
        "up to 64 training images), kept only if on the validation images it loses at most one "
        "correct top-1 and one correct top-3 answer against the float model; predict and serve "
        "then run it (--precision float overrides)",
    )
    epochs: int = option(60, "passes over the training images (>= 1); unused by the exact probe")
    batch_size: int = option(
        32,
        "images per optimiser step, all hosts together (split between hosts when "
        "training data-parallel); unused by the exact probe",
    )
    learning_rate: float = option(
        0.003, "peak learning rate (> 0), reached after warmup_epochs; unused by the exact probe"
    )
    weight_decay: float = option(
        0.05,
        "weight decay (>= 0; AdamW decoupled, SGD as L2) on weights, not on biases "
        "and normalisation; modes full and finetune (the probe uses probe_l2)",
    )
    optimizer: str = option("adamw", "adamw, or sgd (Nesterov, with momentum)")
    momentum: float = option(0.9, "optimizer sgd: momentum")
    scheduler: str = option(
        "cosine",
        "learning-rate schedule, stepped every batch: cosine (linear warm-up, then "
        "cosine decay to 0 at the last epoch) or onecycle",
    )
    warmup_epochs: float = option(
        1.0, "scheduler cosine: epochs (fractions allowed) of linear warm-up to learning_rate"
    )
    label_smoothing: float = option(
        0.1,
        "training loss: share of each target's probability spread over the other "
        "stages, in [0, 1); curbs overconfidence (0 = none)",
    )
    ordinal_smoothing: float = option(
        0.0,
        "stages come in order: share of each target's probability given to its neighbouring "
        "stages in label order (half to each), in [0, 1); a neighbour costs less than a far "
        "stage (0 = plain softmax targets)",
    )
    balance: str = option(
        "loss",
        "how unequal image counts per stage are evened out: loss (each stage weighted "
        "by the inverse of its count), sampler (class-balanced draws each epoch), or none",
    )
    patience: int = option(
        0,
        "stop after this many epochs without a better valid top-1 (ties: lower valid "
        "loss); 0 = train every epoch",
    )
    seed: int = option(
        0,
        "random seed of weights, sampling, augmentation and the valid split drawn from a "
        "channel: the same seed on the same data trains the same model",
    )
    num_workers: int = option(
        0, "DataLoader worker processes that augment images (0 = in the training process)"
    )
    threads: int = option(
        0, "CPU threads torch uses; 0 = torch's choice (under SageMaker: the instance's CPUs)"
    )
    cache_dtype: str = option(
        "uint8",
        "preprocessed images kept in memory as uint8 (half float16's memory) or "
        "float16 (finer intensity steps)",
    )
    stop_after_epoch: int = option(
        0,
        "end the run after this epoch with a checkpoint (exit code 3), to time-box "
        "a job; run again with the same checkpoint dir to resume; 0 = never",
    )
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.arch in ARCHS, f"arch {self.arch!r}: choose one of {', '.join(ARCHS)}"),
            (
                all(a in ARCHS for a in self.ensemble_archs),
                f"ensemble_archs {self.ensemble_archs}: choose from {', '.join(ARCHS)}",
            ),
            (self.mode in MODES, f"mode {self.mode!r}: choose one of {MODES}"),
            (
                self.mode in ("auto", "full")
                or all(
                    a in PRETRAINED_ARCHS or (self.mode == "probe" and a in HOG_ARCHS)
                    for a in self.member_archs
                ),
                f"mode {self.mode} needs pretrained archs ({', '.join(PRETRAINED_ARCHS)}) or, "
                "for probe, hognet",
            ),
            (self.ensemble >= 1, f"ensemble must be >= 1, not {self.ensemble}"),
            (self.augment_draws >= 0, f"augment_draws must be >= 0, not {self.augment_draws}"),
            (self.probe_l2 >= 0, f"probe_l2 must be >= 0, not {self.probe_l2}"),
            (
                1 <= self.probe_columns <= 16,
                f"probe_columns must be 1..16 bands, not {self.probe_columns}",
            ),
            (
                0 <= self.self_training < 1,
                f"self_training must be a probability in [0, 1) (0 = off), not "
                f"{self.self_training}",
            ),
            (
                self.probe_solver in PROBE_SOLVERS,
                f"probe_solver {self.probe_solver!r}: choose one of {PROBE_SOLVERS}",
            ),
            (
                self.probe_flips in PROBE_FLIPS,
                f"probe_flips {self.probe_flips!r}: choose one of {', '.join(PROBE_FLIPS)}",
            ),
            (
                self.backbone_lr_scale > 0,
                f"backbone_lr_scale must be > 0, not {self.backbone_lr_scale}",
            ),
            (0 <= self.freeze_stages <= 7, f"freeze_stages must be 0..7, not {self.freeze_stages}"),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer {self.optimizer!r}: choose one of {OPTIMIZERS}",
            ),
            (
                self.scheduler in SCHEDULERS,
                f"scheduler {self.scheduler!r}: choose one of {SCHEDULERS}",
            ),
            (
                self.balance in BALANCE_MODES,
                f"balance {self.balance!r}: choose one of {BALANCE_MODES}",
            ),
            (
                self.cache_dtype in CACHE_DTYPES,
                f"cache_dtype {self.cache_dtype!r}: choose one of {CACHE_DTYPES}",
            ),
            (self.epochs >= 1, f"epochs must be >= 1, not {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, not {self.batch_size}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, not {self.learning_rate}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, not {self.weight_decay}"),
            (
                0 <= self.label_smoothing < 1,
                f"label_smoothing must be in [0, 1), not {self.label_smoothing}",
            ),
            (
                0 <= self.ordinal_smoothing < 1,
                f"ordinal_smoothing must be in [0, 1), not {self.ordinal_smoothing}",
            ),
            (
                self.patience >= 0,
                f"patience must be >= 0 (0 = never stop early), not {self.patience}",
            ),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, not {self.warmup_epochs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def mode_of(self, arch: str | None = None) -> str:
        """The training mode of ``arch`` (default ``self.arch``), ``auto`` resolved."""
        return kinds.mode_of(self.mode, arch or self.arch, self.pretrained)

    @property
    def member_archs(self) -> tuple[str, ...]:
        return tuple(self.ensemble_archs) or (self.arch,)

    def model_spec(self, arch: str | None = None) -> dict[str, Any]:
        """What ``flystage.training.models.build_from_spec`` needs to rebuild one member's
        architecture."""
        spec = {
            "arch": arch or self.arch,
            "mode": self.mode_of(arch),
            "taps": list(self.feature_taps),
            "hog": self.hog_features,
        }
        if spec["mode"] == "probe":  # how a probe's features are pooled; nothing to other modes
            spec["flips"] = self.probe_flips
            if spec["arch"] in kinds.LITE_ARCHS:
                spec["columns"] = self.probe_columns
        return spec

    def architecture(self) -> dict[str, Any]:
        """The whole model's spec (every ensemble member, no temperature yet): build it untrained
        with ``flystage.training.models.build_from_spec`` (speed figures, tests)."""
        members = [
            self.model_spec(arch) for arch in self.member_archs for _ in range(self.ensemble)
        ]
        return members[0] if len(members) == 1 else {"members": members}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, nested: ``preprocess`` and ``augment`` as their own dicts."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["preprocess"] = self.preprocess.to_dict()
        out["augment"] = self.augment.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        if isinstance(data.get("preprocess"), dict):
            data["preprocess"] = PreprocessConfig.from_dict(data["preprocess"])
        if isinstance(data.get("augment"), dict):
            data["augment"] = AugmentConfig.from_dict(data["augment"])
        return cls(**data)


@dataclass
class FitResult:
    """What ``fit`` returns: the model (eval mode, best weights), its labels, and how it went."""

    model: nn.Module
    labels: list[str]
    history: list[
        dict[str, float]
    ]  # one dict per epoch: epoch, train_loss, valid_loss, valid_top1, valid_top3, ...
    best: dict[str, float]  # the history entry of the best epoch
    config: TrainConfig
    samples_seen: int = 0  # training samples this process saw (all epochs of this run)
    spec: dict[str, Any] = field(
        default_factory=dict
    )  # rebuilds the architecture (flystage.training.models.build_from_spec)
    # Unlabelled images that joined the training images (self-training), with their stage.
    pseudo_labels: list[PseudoLabel] = field(default_factory=list)


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM or ``stop_after_epoch``) after saving a checkpoint."""

    def __init__(
        self, message: str, epoch: int, checkpoint: Path | None, result: FitResult | None = None
    ):
        super().__init__(message)
        self.epoch = epoch
        self.checkpoint = checkpoint
        self.result = result  # the best model so far (None before the first finished epoch)


# SIGTERM (SageMaker stop, spot interruption) sets this; the loop finishes the current step,
# saves a checkpoint and raises TrainingStopped.
STOP = threading.Event()


# ---- 2. fit --------------------------------------------------------------------------------


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum ``values`` over all processes (identity when not distributed)."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if _dist_info()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def make_optimizer(
    param_groups: list[dict[str, Any]], config: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW or SGD over ``param_groups`` (from the mode's setup); a group's ``lr_scale``
    multiplies ``config.learning_rate`` (a fine-tuned backbone learns slower than its head)."""
    groups = [{**g, "lr": config.learning_rate * g.get("lr_scale", 1.0)} for g in param_groups]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.learning_rate, momentum=config.momentum, nesterov=True
        )
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """Stepped every batch: linear warm-up then cosine decay to 0, or one-cycle."""
    total = config.epochs * steps_per_epoch
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total
        )
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def metric_line(entry: dict[str, float]) -> str:
    """The per-epoch line that ``flystage.jobdef.METRIC_DEFINITIONS`` reads."""
    return (
        f"epoch={entry['epoch']} train_loss={entry['train_loss']:.4f} "
        f"valid_loss={entry['valid_loss']:.4f} valid_top1={entry['valid_top1']:.4f} "
        f"valid_top3={entry['valid_top3']:.4f}"
    )


def saved_model_line(best: dict[str, float]) -> str:
    """The saved model's metrics in the metric line's format, printed last: a tuning job ranks a
    trial by the last value of its objective, and the artefact is the best epoch, not the last."""
    return SAVED_MODEL_PREFIX + metric_line(best)


def _is_better(entry: dict[str, float], best: dict[str, float] | None) -> bool:
    """Best epoch: higher valid top-1, then lower valid loss (top-3 is 1.0 for every epoch
    when there are three stages or fewer, so it cannot rank them)."""
    if best is None:
        return True
    if entry["valid_top1"] != best["valid_top1"]:
        return entry["valid_top1"] > best["valid_top1"]
    return entry["valid_loss"] < best["valid_loss"]


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, num_classes: int) -> dict[str, float]:
    """Valid loss (plain cross-entropy), top-1 and top-3 accuracy, summed over all processes."""
    model.eval()
    loss_sum = top1 = top3 = n = 0.0
    k = min(3, num_classes)
    for x, y in loader:
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        ranked = logits.topk(k, dim=1).indices
        top1 += (ranked[:, 0] == y).sum().item()
        top3 += (ranked == y[:, None]).any(dim=1).sum().item()
        n += len(y)
    loss_sum, top1, top3, n = _all_reduce_sum([loss_sum, top1, top3, n])
    return {"valid_loss": loss_sum / n, "valid_top1": top1 / n, "valid_top3": top3 / n}


@dataclass
class TrainState:
    """How far the epoch loop is. With the model, optimiser and schedule it is what a
    checkpoint holds: plain tensors and Python types, so ``torch.load(weights_only=True)``
    reads it back."""

    epoch: int = 0  # the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)  # one metric dict per epoch
    best: dict[str, float] | None = None  # the history entry of the best epoch
    best_state: dict[str, torch.Tensor] | None = None  # the model's weights after the best epoch
    bad_epochs: int = 0  # epochs since the best one
    samples_seen: int = 0  # training samples this process saw in this run (not checkpointed)

    def record(self, entry: dict[str, float], model: nn.Module) -> None:
        """A finished epoch; its weights are kept when it is the best so far."""
        self.history.append(entry)
        self.epoch = int(entry["epoch"])
        if _is_better(entry, self.best):
            self.best, self.bad_epochs = dict(entry), 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1

    def out_of_patience(self, config: TrainConfig) -> bool:
        return bool(config.patience) and self.bad_epochs >= config.patience

    def checkpoint(
        self,
        labels: list[str],
        config: TrainConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> dict[str, Any]:
        """The checkpoint (format ``CHECKPOINT_FORMAT``) after ``self.epoch``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "labels": labels,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
        }

    @classmethod
    def restore(
        cls,
        checkpoint: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> TrainState:
        """Load a checkpoint's weights, optimiser and schedule; return its progress."""
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        return cls(
            checkpoint["epoch"],
            checkpoint["history"],
            checkpoint["best"],
            checkpoint["best_state"],
            checkpoint["bad_epochs"],
        )


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically: a reader (or a restart after SIGKILL) sees the old or the new file, never
    half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, labels: list[str], config: TrainConfig) -> dict[str, Any]:
    # weights_only: a checkpoint synced from S3 (spot jobs) must not be able to run code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"{path}: not a readable flystage checkpoint ({type(exc).__name__}); remove it or use "
            "another checkpoint dir"
        ) from None
    if not isinstance(state, dict):
        raise DataError(
            f"{path}: not a flystage checkpoint; remove it or use another checkpoint dir"
        )
    if state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(
            f"{path}: not a flystage checkpoint of format {CHECKPOINT_FORMAT}; remove it or use "
            "another checkpoint dir"
        )
    mismatch = []
    if state["labels"] != labels:
        mismatch.append(f"labels {state['labels']} (now {labels})")
    keys = ("arch", "mode", "feature_taps", "hog_features", "probe_flips", "probe_columns")
    for key in (*keys, "preprocess"):
        # A checkpoint from before probe_flips/probe_columns was trained without them.
        saved = {"probe_flips": "none", "probe_columns": 1, **state["config"]}.get(key)
        now = config.to_dict()[key]
        if saved != now:
            mismatch.append(f"{key} {saved} (now {now})")
    if mismatch:
        raise DataError(
            f"{path} belongs to another training run: "
            + "; ".join(mismatch)
            + ". Use an empty checkpoint dir for a new run, or remove that file."
        )
    return state


def _labels_and_cache(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    labels: Sequence[str] | None,
    image_cache: ImageCache | None,
) -> tuple[list[str], ImageCache]:
    """The label order (given, or every label of both sets in stage order) and an image cache
    for ``config.preprocess`` (given, or a new one)."""
    if labels is None:
        labels = sort_labels({r.label for r in train_records} | {r.label for r in valid_records})
    if image_cache is None:
        image_cache = ImageCache(
            config.preprocess, config.cache_dtype, workers=max(1, torch.get_num_threads())
        )
    elif image_cache.config != config.preprocess:
        raise ValueError("image_cache was made for another PreprocessConfig than config.preprocess")
    return list(labels), image_cache


def _resume(
    path: Path | None,
    labels: list[str],
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    say: Callable[[str], None],
) -> TrainState:
    """The run's state from the checkpoint at ``path`` (weights, optimiser and schedule loaded),
    or a fresh one. Rank 0's checkpoint is the truth (only rank 0 writes one): it is broadcast,
    and its error stops every rank."""
    rank, world = _dist_info()
    saved, error = None, None
    if rank == 0 and path is not None and path.is_file():
        try:
            saved = _load_checkpoint(path, labels, config)
        except DataError as exc:
            error = exc
    if world > 1:
        shared = [saved, str(error) if error else None]
        dist.broadcast_object_list(shared, src=0)
        saved, error = shared[0], (error or (DataError(shared[1]) if shared[1] else None))
    if error is not None:
        raise error
    if saved is None:
        return TrainState()
    state = TrainState.restore(saved, model, optimizer, scheduler)
    best = state.best
    say(
        f"resuming from checkpoint {path} after epoch {state.epoch}"
        + (f" (best valid_top1={best['valid_top1']:.4f} at epoch {best['epoch']})" if best else "")
    )
    return state


def _save_state(
    path: Path | None,
    state: TrainState,
    labels: list[str],
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Rank 0 checkpoints the run to ``path`` (None: no checkpoints)."""
    if path is not None and _dist_info()[0] == 0:
        _save_checkpoint(path, state.checkpoint(labels, config, model, optimizer, scheduler))


def _stop_requested(world: int) -> bool:
    """SIGTERM on any rank: every rank must stop at the same step, or the others would wait in
    all-reduce."""
    return _all_reduce_sum([float(STOP.is_set())])[0] > 0 if world > 1 else STOP.is_set()


def _best_so_far(
    state: TrainState, model: nn.Module, setup: Any, labels: list[str], config: TrainConfig
) -> FitResult | None:
    """The model at its best epoch so far: a stopped job (MaxRuntime, tuning early stop, spot)
    still leaves a usable model. None before the first finished epoch. Called only as the run
    stops, after its checkpoint is saved, so the live weights are not needed again."""
    if state.best_state is None:
        return None
    return _result_at_best(state, setup, model, labels, config)


def _result_at_best(
    state: TrainState, setup: Any, model: nn.Module, labels: list[str], config: TrainConfig
) -> FitResult:
    model.load_state_dict(state.best_state)
    return FitResult(
        setup.finish(model).eval(),
        labels,
        state.history,
        state.best,
        config,
        state.samples_seen,
        spec=config.model_spec(),
    )


def _setup(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    labels: Sequence[str] | None,
    image_cache: ImageCache | None,
    say: Callable[[str], None],
    unlabelled: Sequence[Path] = (),
) -> tuple[list[str], Any]:
    """The label order and the mode's setup (flystage.training.modes): what is trained on which
    samples,
    augmented images or a frozen backbone's cached features. Images are preprocessed once and
    augmented per sample; the label order is the stage order."""
    if not train_records or not valid_records:
        raise DataError(
            f"need training and validation images; got {len(train_records)} and "
            f"{len(valid_records)}"
        )
    labels, image_cache = _labels_and_cache(
        train_records, valid_records, config, labels, image_cache
    )
    untrained = sorted(set(labels) - {r.label for r in train_records})
    if untrained:
        say(f"warning: no training images for label(s) {untrained}: the model cannot learn them")
    t0 = time.perf_counter()
    _seed_everything(config.seed)
    if unlabelled and config.mode_of() != "probe":
        raise UsageError(
            f"unlabelled images are used by the probe only, not by mode {config.mode_of()}: "
            "train with mode probe, or leave out --unlabelled"
        )
    extra = {"unlabelled": list(unlabelled)} if unlabelled else {}
    setup = SETUPS[config.mode_of()](
        train_records, valid_records, labels, image_cache, config, say, **extra
    )
    say(
        f"data: {len(train_records)} train, {len(valid_records)} valid images, labels {labels}, "
        f"ready in {time.perf_counter() - t0:.1f} s"
    )
    return labels, setup


def _loaders(setup: Any, config: TrainConfig) -> tuple[Any, DataLoader, DataLoader]:
    """The training sampler and loader (this rank's share of the batch) and this rank's shard
    of the validation set."""
    rank, world = _dist_info()
    sampler = make_sampler(setup.targets, config.balance, rank, world, config.seed)
    per_rank_batch = max(1, config.batch_size // world)
    # BatchNorm cannot train on a batch of one: drop a last batch of exactly one.
    drop_last = len(sampler) % per_rank_batch == 1 and len(sampler) > 1
    loader_args = dict(
        num_workers=config.num_workers, worker_init_fn=_seed_worker if config.num_workers else None
    )
    train_loader = DataLoader(
        setup.train_set, per_rank_batch, sampler=sampler, drop_last=drop_last, **loader_args
    )
    valid_shard = Subset(setup.valid_set, range(rank, len(setup.valid_set), world))
    valid_loader = DataLoader(valid_shard, per_rank_batch * 2, shuffle=False, **loader_args)
    return sampler, train_loader, valid_loader


def train_one_epoch(
    net: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: DataLoader,
    penalty: Callable[[], torch.Tensor] | None,
    epoch: int,
    config: TrainConfig,
) -> tuple[float, float, bool]:
    """One pass over ``loader``, stepping the optimiser and the schedule every batch. Returns
    this process's summed loss and sample count, and whether a stop was requested (the epoch
    then ends after the step that saw it)."""
    rank, world = _dist_info()
    net.train()
    loss_sum = seen = 0.0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
        disable=None if rank == 0 else True,
    )
    for x, y in bar:
        loss = criterion(net(x), y)
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if _stop_requested(world):
            bar.close()
            return loss_sum, seen, True
    return loss_sum, seen, False


def _finish_epoch(
    epoch: int,
    loss_sum: float,
    seen: float,
    t0: float,
    model: nn.Module,
    valid_loader: DataLoader,
    num_classes: int,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    say: Callable[[str], None],
) -> dict[str, float]:
    """The epoch's history entry (training loss over every process, validation metrics, learning
    rate, speed), said as the metric line and a line of speed."""
    train_seconds = time.perf_counter() - t0
    train_loss_sum, train_n = _all_reduce_sum([loss_sum, seen])
    entry = {"epoch": epoch, "train_loss": train_loss_sum / train_n}
    # The bare model: DDP's forward would sync buffers, and ranks may hold unequal shares.
    entry.update(evaluate_loader(model, valid_loader, num_classes))
    entry["lr"] = optimizer.param_groups[0]["lr"]
    entry["seconds"] = time.perf_counter() - t0
    entry["images_per_second"] = train_n / train_seconds
    say(metric_line(entry))
    say(
        f"epoch {epoch}/{config.epochs}: {int(train_n)} images in {train_seconds:.1f} s "
        f"({entry['images_per_second']:.1f} images/s), lr {entry['lr']:.2e}"
    )
    return entry


def _plan_line(config: TrainConfig, model: nn.Module, train_loader: DataLoader, world: int) -> str:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (
        f"training {config.arch} ({config.mode_of()}: {trained:,} trained parameters) for "
        f"{config.epochs} epochs, {len(train_loader)} steps of {train_loader.batch_size} x "
        f"{world} images, {config.optimizer} lr {config.learning_rate:g}, {config.scheduler}, "
        f"balance {config.balance}, {torch.get_num_threads()} threads"
    )


def fit(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    *,
    labels: Sequence[str] | None = None,
    image_cache: ImageCache | None = None,
    unlabelled: Sequence[Path] = (),
) -> FitResult:
    """Train on ``train_records``, pick the best epoch on ``valid_records``.

    ``work_dir`` is the checkpoint folder: a checkpoint is written there after every epoch
    and training resumes from it when it holds one (None: no checkpoints). ``log`` receives
    every line to print (the metric lines only on rank 0). ``labels`` fixes the label order
    (default: every label of both sets, in stage order). ``image_cache`` shares
    preprocessed images between calls (cross-validation folds); it must use
    ``config.preprocess``. ``unlabelled`` are paths of images without a stage, used by the
    probe (``flystage.training.unlabelled``). Runs data-parallel when torch.distributed is
    initialised.

    Raises ``TrainingStopped`` on SIGTERM (``STOP``) or at ``config.stop_after_epoch``.
    """
    rank, world = _dist_info()
    say = log if rank == 0 else (lambda line: None)
    if config.threads > 0:
        torch.set_num_threads(config.threads)

    labels, setup = _setup(
        train_records, valid_records, config, labels, image_cache, say, unlabelled
    )
    model = setup.model
    if setup.solved:
        return _solved(setup, labels, config, say)
    sampler, train_loader, valid_loader = _loaders(setup, config)

    # Loss, optimiser, schedule. The same seed on every rank gave the same initial weights
    # (DDP also broadcasts rank 0's). Then resume after an interruption.
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    weight = class_weights(setup.targets, len(labels)) if config.balance == "loss" else None
    criterion = (
        OrdinalLoss(len(labels), config.ordinal_smoothing, weight, config.label_smoothing)
        if config.ordinal_smoothing
        else nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    )
    optimizer = make_optimizer(setup.param_groups, config)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    checkpoint = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None
    state = _resume(checkpoint, labels, config, model, optimizer, scheduler, say)
    run = (labels, config, model, optimizer, scheduler)  # what a checkpoint saves besides the state
    best_so_far = functools.partial(_best_so_far, state, model, setup, labels, config)

    say(_plan_line(config, model, train_loader, world))
    for epoch in range(state.epoch + 1, 0 if state.out_of_patience(config) else config.epochs + 1):
        # Reseeding from (seed, rank, epoch) makes a resumed run draw what the original would.
        _seed_everything(config.seed + 1000 * rank + epoch)
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, seen, stopped = train_one_epoch(
            net, criterion, optimizer, scheduler, train_loader, setup.penalty, epoch, config
        )
        state.samples_seen += int(seen)
        if stopped:
            _stop_on_sigterm(epoch, state, checkpoint, run, say, best_so_far)
        entry = _finish_epoch(
            epoch, loss_sum, seen, t0, model, valid_loader, len(labels), optimizer, config, say
        )
        state.record(entry, model)
        _save_state(checkpoint, state, *run)
        if state.out_of_patience(config):
            say(
                f"early stop: no better valid_top1 for {state.bad_epochs} epochs (best "
                f"{state.best['valid_top1']:.4f} at epoch {state.best['epoch']})"
            )
            break
        if config.stop_after_epoch and epoch >= config.stop_after_epoch and epoch < config.epochs:
            say(
                f"stopping after epoch {epoch} as asked (stop_after_epoch); checkpoint saved to "
                f"{checkpoint}"
            )
            raise TrainingStopped(
                f"stopped after epoch {epoch} (stop_after_epoch)", epoch, checkpoint, best_so_far()
            )

    return _best_result(state, setup, model, labels, config, checkpoint, say)


def _stop_on_sigterm(
    epoch: int,
    state: TrainState,
    checkpoint: Path | None,
    run: tuple,
    say: Callable[[str], None],
    best_so_far: Callable[[], FitResult],
) -> NoReturn:
    """Save the state reached in ``epoch`` and raise ``TrainingStopped`` (SIGTERM)."""
    # The checkpoint says epoch - 1: a restart runs this epoch again, from the weights
    # reached so far.
    _save_state(checkpoint, state, *run)
    say(
        f"SIGTERM: stopped in epoch {epoch} after a step; "
        + (
            f"checkpoint saved to {checkpoint}"
            if checkpoint
            else "no checkpoint dir, nothing saved"
        )
    )
    raise TrainingStopped(
        f"stopped by SIGTERM in epoch {epoch}", state.epoch, checkpoint, best_so_far()
    )


def _best_result(
    state: TrainState,
    setup: Any,
    model: nn.Module,
    labels: list[str],
    config: TrainConfig,
    checkpoint: Path | None,
    say: Callable[[str], None],
) -> FitResult:
    """The model at its best epoch, said and returned as the run's result."""
    if state.best_state is None:  # resumed from a checkpoint of a run that had already finished
        raise DataError(f"{checkpoint} holds no trained epoch; remove it and train again")
    say(
        f"best epoch {state.best['epoch']}: valid_top1={state.best['valid_top1']:.4f} "
        f"valid_top3={state.best['valid_top3']:.4f} valid_loss={state.best['valid_loss']:.4f}"
    )
    return _result_at_best(state, setup, model, labels, config)


def _solved(
    setup: Any, labels: list[str], config: TrainConfig, say: Callable[[str], None]
) -> FitResult:
    """The result of a mode that fitted its model in closed form: one metric line (epoch 1),
    so tuners and logs read it like any run."""
    rank, world = _dist_info()
    train = DataLoader(Subset(setup.train_set, range(rank, len(setup.train_set), world)), 256)
    valid = DataLoader(Subset(setup.valid_set, range(rank, len(setup.valid_set), world)), 256)
    entry = {
        "epoch": 1,
        "train_loss": evaluate_loader(setup.model, train, len(labels))["valid_loss"],
    }
    entry.update(evaluate_loader(setup.model, valid, len(labels)))
    say(metric_line(entry))
    model = setup.finish(setup.model).eval()
    return FitResult(
        model,
        labels,
        [entry],
        dict(entry),
        config,
        len(setup.train_set),
        spec=config.model_spec(),
        pseudo_labels=setup.pseudo_labels,
    )


@torch.no_grad()
def _logits(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = [
        model(to_float(images[i : i + batch_size])).double().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0))


def train_model(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    *,
    labels: Sequence[str] | None = None,
    image_cache: ImageCache | None = None,
    unlabelled: Sequence[Path] = (),
) -> FitResult:
    """The whole model of one training run: ``fit`` once per ensemble member (each arch of
    ``config.member_archs`` with ``config.ensemble`` seeds), members' probabilities averaged
    (:class:`flystage.training.models.EnsembleNet`), and, with ``config.calibrate``, a temperature
    fitted on the validation images (:class:`flystage.training.models.Calibrated`).

    Arguments as :func:`fit`; each member checkpoints in ``work_dir/member-<i>`` when there is
    more than one. ``best`` holds the whole model's valid scores and ``temperature``.
    """
    say = log if _dist_info()[0] == 0 else (lambda line: None)
    labels, image_cache = _labels_and_cache(
        train_records, valid_records, config, labels, image_cache
    )
    members = [
        (arch, config.seed + i) for arch in config.member_archs for i in range(config.ensemble)
    ]
    results = []
    for j, (arch, seed) in enumerate(members):
        member_config = dataclasses.replace(
            config, arch=arch, seed=seed, ensemble=1, ensemble_archs=()
        )
        member_dir = (
            Path(work_dir) / f"member-{j}"
            if work_dir is not None and len(members) > 1
            else work_dir
        )
        t0 = time.perf_counter()
        results.append(
            fit(
                train_records,
                valid_records,
                member_config,
                member_dir,
                log,
                labels=labels,
                image_cache=image_cache,
                unlabelled=unlabelled,
            )
        )
        if len(members) > 1:
            say(
                f"member {j + 1}/{len(members)}: {arch} seed {seed}, best valid_top1="
                f"{results[-1].best['valid_top1']:.4f} in {time.perf_counter() - t0:.1f} s"
            )
    model: nn.Module = (
        results[0].model if len(results) == 1 else EnsembleNet([r.model for r in results]).eval()
    )
    spec = results[0].spec if len(results) == 1 else {"members": [r.spec for r in results]}
    # Each host scores its share of the valid images; every host gets all logits.
    valid_logits = gather_rows(
        lambda paths: torch.from_numpy(_logits(model, image_cache.get(paths))),
        [r.path for r in valid_records],
    ).numpy()
    index = {label: i for i, label in enumerate(labels)}
    valid_targets = np.array([index[r.label] for r in valid_records])
    best = dict(results[0].best) if len(results) == 1 else _ensemble_best(results)
    best.update(_valid_scores(valid_logits, valid_targets, "valid"))
    if config.calibrate:
        temperature = fit_temperature(valid_logits, valid_targets)
        model, spec = Calibrated(model, temperature).eval(), {**spec, "temperature": temperature}
        best["temperature"] = temperature
        best.update(_valid_scores(valid_logits / temperature, valid_targets, "calibrated_valid"))
        say(
            f"calibration: temperature {temperature:.3f} on {len(valid_targets)} valid images, "
            f"valid NLL {best['valid_loss']:.4f} -> {best['calibrated_valid_loss']:.4f}, ECE "
            f"{best['valid_ece']:.4f} -> {best['calibrated_valid_ece']:.4f}"
        )
    history = [dict(entry, member=j) for j, r in enumerate(results) for entry in r.history]
    return FitResult(
        model,
        labels,
        history,
        best,
        config,
        sum(r.samples_seen for r in results),
        spec=spec,
        pseudo_labels=[p for r in results for p in r.pseudo_labels],
    )


def _ensemble_best(results: Sequence[FitResult]) -> dict[str, float]:
    """An ensemble's epoch (its last-trained member's best) and training loss (the members'
    mean at their best epochs), so its saved-model line reads like a single model's."""
    return {
        "epoch": max(r.best["epoch"] for r in results),
        "train_loss": float(np.mean([r.best["train_loss"] for r in results])),
    }


def _valid_scores(logits: np.ndarray, targets: np.ndarray, prefix: str) -> dict[str, float]:
    from flystage.calibrate import expected_calibration_error, nll, softmax

    probs = softmax(logits)
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    return {
        f"{prefix}_loss": nll(logits, targets),
        f"{prefix}_top1": float(np.mean(ranked[:, 0] == targets)),
        f"{prefix}_top3": float(np.mean((ranked == targets[:, None]).any(axis=1))),
        f"{prefix}_ece": expected_calibration_error(probs, targets),
    }


# ---- 3. the program ------------------------------------------------------------------------


def _augment_mapping(text: str) -> dict[str, Any]:
    if text.strip().strip('"').lower() in ("off", "none", "false"):
        return AugmentConfig.off().to_dict()
    return mapping(text)


def _base_dir() -> Path:
    return Path(os.environ.get("SAGEMAKER_BASE_DIR", "/opt/ml"))


def _in_sagemaker() -> bool:
    return "SM_TRAINING_ENV" in os.environ or "SM_MODEL_DIR" in os.environ


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """The channels, output folders and hosts, each defaulting to the SageMaker environment."""
    env = os.environ.get
    io = parser.add_argument_group("data and output (defaults from the SageMaker environment)")
    io.add_argument(
        "--manifest",
        "--train",
        dest="train",
        default=env("SM_CHANNEL_TRAIN"),
        help=(
            "manifest CSV, a folder holding manifest.csv, or a <label>/<images> tree "
            "(SM_CHANNEL_TRAIN)"
        ),
    )
    io.add_argument(
        "--valid",
        default=env("SM_CHANNEL_VALID", env("SM_CHANNEL_VALIDATION")),
        help="validation channel, same forms (SM_CHANNEL_VALID or SM_CHANNEL_VALIDATION); "
        "default: the manifest's valid rows",
    )
    io.add_argument(
        "--unlabelled",
        default=env("SM_CHANNEL_UNLABELLED"),
        help="a folder of the lab's unlabelled images (any nesting; SM_CHANNEL_UNLABELLED): the "
        "probe standardises its features by them too and, with self_training, learns from the "
        "ones it names with confidence",
    )
    io.add_argument(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        default=env("SM_MODEL_DIR"),
        help="where the model artefact is written (SM_MODEL_DIR)",
    )
    io.add_argument(
        "--output_data_dir",
        "--output-data-dir",
        dest="output_data_dir",
        default=env("SM_OUTPUT_DATA_DIR"),
        help="where per-epoch metrics are written (SM_OUTPUT_DATA_DIR)",
    )
    default_checkpoints = str(_base_dir() / "checkpoints") if _in_sagemaker() else None
    io.add_argument(
        "--checkpoint_dir",
        "--checkpoint-dir",
        dest="checkpoint_dir",
        default=default_checkpoints,
        help="checkpoint every epoch here and resume from it (SageMaker: <base>/checkpoints)",
    )
    io.add_argument(
        "--hosts",
        type=json.loads,
        default=json.loads(env("SM_HOSTS", "[]")),
        help="JSON list of hosts (SM_HOSTS); more than one trains data-parallel",
    )
    io.add_argument(
        "--current_host",
        "--current-host",
        dest="current_host",
        default=env("SM_CURRENT_HOST"),
        help="this host's name (SM_CURRENT_HOST)",
    )
    io.add_argument("--force", action="store_true", help="replace a model already in --model-dir")


def _add_folder_channel_options(parser: argparse.ArgumentParser) -> None:
    """How a channel without manifest.csv is labelled and grouped."""
    rules = parser.add_argument_group(
        "folder channels (a channel without manifest.csv is read as `flystage organise` reads a "
        "folder)"
    )
    rules.add_argument(
        "--label_regex",
        "--label-regex",
        dest="label_regex",
        type=regex_text,
        default=None,
        help="regex with a named group 'label', searched in each image's path below the channel",
    )
    rules.add_argument(
        "--label_level",
        "--label-level",
        dest="label_level",
        type=integer,
        default=None,
        help="take the label from the N-th folder up (1 = the image's own folder); default: the "
        "nearest folder that looks like a stage (refused when that is a guess)",
    )
    rules.add_argument(
        "--group_regex",
        "--group-regex",
        dest="group_regex",
        type=regex_text,
        default=None,
        help="regex with a named group 'group' on each image's path below the channel, e.g. "
        "'^(?P<group>[^/]+)/'; needed to draw the validation split from a folder channel",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``flystage train`` and of the SageMaker program (hyperparameters with
    underscores; hyphen aliases accepted). Paths default to the SageMaker environment."""
    _add_data_options(parser)
    _add_folder_channel_options(parser)
    add_config_options(parser)


def option_groups() -> list[tuple[str, str, list[Option]]]:
    """The hyperparameters as ``flystage train`` groups them: (title, description, options),
    one group per config object, defaults and helps from the configs."""
    defaults = TrainConfig()
    return [
        (
            "training hyperparameters",
            "the model, how it is trained, and the run (TrainConfig)",
            list(field_options(defaults, {"preprocess", "augment"})),
        ),
        (
            "preprocessing",
            "how every image becomes the model input, in training and in serving alike "
            "(PreprocessConfig, stored in the model)",
            list(field_options(defaults.preprocess)),
        ),
        (
            "augmentation",
            "random changes to each training image; every p_* is a per-image probability "
            "(AugmentConfig)",
            list(field_options(defaults.augment)),
        ),
    ]


def hyperparameters_markdown() -> str:
    """The hyperparameters table of docs/hyperparameters.md: one section per group."""
    return "\n".join(
        f"### {title}\n\n{description[0].upper()}{description[1:]}.\n\n{markdown_table(options)}"
        for title, description, options in option_groups()
    )


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig, PreprocessConfig and AugmentConfig field, plus
    ``--preprocess``/``--augment`` for a whole config; ``config_from_args`` reads them back.
    Shared by ``flystage train`` and every command that trains (``crossval``)."""
    for title, description, options in option_groups():
        add_options(parser.add_argument_group(title, description), options)
    parser.add_argument(
        "--preprocess",
        dest="preprocess_json",
        type=mapping,
        default=None,
        help="the whole preprocessing config as JSON (single options override it)",
    )
    parser.add_argument(
        "--augment",
        dest="augment_json",
        type=_augment_mapping,
        default=None,
        help="the whole augmentation config as JSON, or 'off' (single options override it)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed options: defaults, then JSON configs, then single options."""
    defaults = TrainConfig()
    top = dataclass_values(defaults, args)
    try:
        top["preprocess"] = PreprocessConfig.from_dict(
            dataclass_values(defaults.preprocess, args, args.preprocess_json)
        )
        top["augment"] = AugmentConfig.from_dict(
            dataclass_values(defaults.augment, args, args.augment_json)
        )
        if not top["threads"]:
            top["threads"] = int(os.environ.get("SM_NUM_CPUS", 0))
        return TrainConfig(**top)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad hyperparameter: {exc}") from exc


def _init_distributed(
    hosts: list[str], current_host: str | None, log: Callable[[str], None]
) -> tuple[int, int]:
    """Join the process group when there is more than one host: master = the first host of the
    sorted list (``FLYSTAGE_MASTER_ADDR`` overrides its address), port ``FLYSTAGE_DIST_PORT``."""
    hosts = sorted(hosts)
    if len(hosts) <= 1:
        return 0, 1
    if current_host not in hosts:
        raise UsageError(
            f"current host {current_host!r} is not in the hosts {hosts} (SM_CURRENT_HOST, SM_HOSTS)"
        )
    rank, world = hosts.index(current_host), len(hosts)
    master = os.environ.get("FLYSTAGE_MASTER_ADDR", hosts[0])
    port = int(os.environ.get("FLYSTAGE_DIST_PORT", DEFAULT_DIST_PORT))
    timeout = datetime.timedelta(
        seconds=float(os.environ.get("FLYSTAGE_DIST_TIMEOUT", DEFAULT_DIST_TIMEOUT_S))
    )
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.environ.get("SM_NETWORK_INTERFACE_NAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["SM_NETWORK_INTERFACE_NAME"]
    log(f"host={current_host} rank={rank} world_size={world}: joining tcp://{master}:{port} (gloo)")
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world, timeout=timeout
    )
    return rank, world


def _write_history(
    output_dir: Path, history: list[dict[str, float]], best: dict[str, float]
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)
    (output_dir / "metrics.json").write_text(
        json.dumps({"best": best, "history": history}, indent=2) + "\n"
    )


def _write_failure(message: str) -> Path | None:
    """``<base>/output/failure``: SageMaker shows its first 1024 characters as FailureReason."""
    if not _in_sagemaker():
        return None
    path = _base_dir() / "output" / "failure"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(message)
    except OSError:
        return None
    return path


def _log(line: str) -> None:
    print(line, flush=True)


def _refuse_existing_model(model_dir: str, force: bool) -> None:
    """Every flystage command refuses to replace results without --force; a model too."""
    from flystage.artefact import METADATA_FILE, ONNX_FILE

    if force or not any((Path(model_dir) / name).exists() for name in (ONNX_FILE, METADATA_FILE)):
        return
    try:  # the best-so-far model of a stopped run is provisional: its restart replaces it
        if "stopped" in json.loads((Path(model_dir) / METADATA_FILE).read_text(encoding="utf-8")):
            return
    except (OSError, ValueError):
        pass
    raise UsageError(
        f"{model_dir} already holds a model; choose another --model-dir or pass --force to "
        "replace it"
    )


def _save(
    args: argparse.Namespace,
    result: FitResult,
    config: TrainConfig,
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    manifest: Path | None,
    world: int,
    stopped: str | None = None,
) -> None:
    """The model artefact (and the history) of a finished or a stopped run."""
    from flystage.training.export import save_artefact  # needs onnx: imported only where used

    extra = {
        "train_config": config.to_dict(),
        "train_images": len(train_records),
        "valid_images": len(valid_records),
        "world_size": world,
    }
    if result.pseudo_labels:
        extra["pseudo_labelled_images"] = len(result.pseudo_labels)
    if stopped:
        extra["stopped"] = stopped
    _log(saved_model_line(result.best))
    save_artefact(
        args.model_dir,
        result.model,
        config.arch,
        result.labels,
        config.preprocess,
        metrics=result.best,
        manifest_sha256=manifest_sha256(manifest) if manifest else None,
        spec=result.spec,
        extra=extra,
    )
    _log(
        f"model artefact written to {args.model_dir}"
        + (" (best model so far of a stopped run)" if stopped else "")
    )
    if config.int8 and not stopped:  # a stopped run's provisional model stays float
        from flystage.training.quantise import add_int8_for_run

        add_int8_for_run(
            args.model_dir,
            config.preprocess,
            result.labels,
            train_records,
            valid_records,
            config.seed,
            _log,
            threads=config.threads or None,
        )
    elif config.int8:
        _log("int8: not made for the provisional model of a stopped run")
    if args.output_data_dir and result.history:
        _write_history(Path(args.output_data_dir), result.history, result.best)


def _unlabelled_images(
    folder: str | None, train_records: Sequence[Record], valid_records: Sequence[Record]
) -> list[Path]:
    """Every image under ``folder`` (as ``flystage organise`` finds them) that is not a
    training or validation image; [] without a folder."""
    if not folder:
        return []
    if not Path(folder).is_dir():
        raise UsageError(f"--unlabelled {folder}: not a folder; give a folder of images")
    labelled = {r.path.resolve() for r in (*train_records, *valid_records)}
    images, _ = iter_images([folder])
    found = [p for p in images if p.resolve() not in labelled]
    if not found:
        raise DataError(
            f"--unlabelled {folder}: no images there besides the labelled ones (looked for "
            ".tif/.tiff/.png/.bmp/.jpg/.jpeg)"
        )
    _log(f"unlabelled: {len(found)} images from {folder}")
    return found


def _note_unused_by_probe(args: argparse.Namespace, config: TrainConfig) -> None:
    """Say which given hyperparameters the exactly solved probe does not use."""
    solved = [
        name
        for name in ("learning_rate", "batch_size", "epochs")
        if getattr(args, name, None) is not None
    ]
    if (
        solved
        and all(config.mode_of(a) == "probe" for a in config.member_archs)
        and config.probe_solver == "lbfgs"
    ):
        # A tuning job over these would train the same model every trial: say so in its log.
        _log(
            f"note: {', '.join(solved)} not used: the probe's head is solved exactly "
            "(probe_solver=lbfgs); tune probe_l2, or train with probe_solver=sgd or "
            "mode=finetune"
        )


def _report_failure(exc: Exception) -> None:
    """Write the failure file and say on stderr why training failed (with the traceback
    unless it is a usage or data error)."""
    cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = f"{cause}\n\n{traceback.format_exc()}"
    where = _write_failure(text)
    print(
        f"training failed: {cause}" + (f" (traceback in {where})" if where else ""),
        file=sys.stderr,
        flush=True,
    )
    if not isinstance(exc, (UsageError, DataError)):
        traceback.print_exc()


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments; 0 on success, ``EXIT_STOPPED`` when stopped with a
    checkpoint, 1 on an error (traceback in ``<base>/output/failure`` under SageMaker)."""
    previous_handler = signal.getsignal(signal.SIGTERM)
    STOP.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())
    try:
        config = config_from_args(args)
        _note_unused_by_probe(args, config)
        if not args.train:
            raise UsageError("no training data: give --manifest (or set SM_CHANNEL_TRAIN)")
        if not args.model_dir:
            raise UsageError("no model dir: give --model-dir (or set SM_MODEL_DIR)")
        _refuse_existing_model(args.model_dir, args.force)
        if config.threads:
            torch.set_num_threads(config.threads)
        rank, world = _init_distributed(args.hosts, args.current_host, _log)
        rules = FolderRules(args.label_regex, args.label_level, args.group_regex)
        train_records, valid_records, manifest = split_channels(
            args.train, args.valid, seed=config.seed, rules=rules, log=_log
        )
        _log(data_summary(train_records, valid_records))
        unlabelled = _unlabelled_images(args.unlabelled, train_records, valid_records)
        result = train_model(
            train_records,
            valid_records,
            config,
            work_dir=args.checkpoint_dir,
            log=_log,
            unlabelled=unlabelled,
        )
        _log(
            f"host={args.current_host or 'local'} rank={rank} world_size={world} "
            f"samples={result.samples_seen}"
        )
        if rank == 0:
            _save(args, result, config, train_records, valid_records, manifest, world)
        if world > 1:
            dist.barrier()  # nobody leaves before rank 0 has written the artefact
        return 0
    except TrainingStopped as exc:
        if exc.result is not None and _dist_info()[0] == 0 and args.model_dir:
            _save(
                args,
                exc.result,
                config,
                train_records,
                valid_records,
                manifest,
                world,
                stopped=f"{exc} (best epoch {exc.result.best['epoch']} so far)",
            )
        _log(f"{exc}; run again with the same checkpoint dir to resume")
        _write_failure(
            f"{exc}: checkpoint {exc.checkpoint}; run again with the same checkpoint dir to "
            "resume\n"
        )
        return EXIT_STOPPED
    except Exception as exc:
        _report_failure(exc)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_handler)


def main(argv: list[str] | None = None) -> int:
    """The SageMaker training program: ``train_flystage.py --key value ...``."""
    parser = ArgumentParser(
        prog="train_flystage.py", description="Train a flystage stage classifier."
    )
    configure_parser(parser)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        where = _write_failure(f"{exc}\n\n{parser.format_usage()}")
        print(
            f"training failed: {exc}" + (f" (written to {where})" if where else ""),
            file=sys.stderr,
            flush=True,
        )
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
