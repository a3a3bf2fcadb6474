"""The training configuration: ``TrainConfig``, every hyperparameter with its default, its
one-line help and its checks (change defaults here only), and the options made from it.

``option_groups`` feeds ``flystage train --help`` and ``hyperparameters_markdown`` (the table in
docs/hyperparameters.md); ``add_config_options`` and ``config_from_args`` are shared by every
command that trains (``flystage train``, ``crossval``, the benches).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from flystage.augment import AugmentConfig
from flystage.imaging import PreprocessConfig
from flystage.options import (
    Option,
    UsageError,
    add_options,
    dataclass_values,
    field_options,
    mapping,
    markdown_table,
    option,
)
from flystage.training import families, kinds
from flystage.training.backbones import DEFAULT_TAPS
from flystage.training.data import BALANCE_MODES, CACHE_DTYPES
from flystage.training.kinds import MODES, PROBE_SOLVERS
from flystage.training.models import PROBE_FLIPS

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "onecycle")


@dataclass
class TrainConfig:
    """Every training hyperparameter, its default and its one-line help (field metadata: the
    ``--help`` of ``flystage train`` and the table in docs/hyperparameters.md)."""

    # Measured held out by gene on BDGP and on a lab-like copy (docs/accuracy.md): a linear
    # probe on EfficientNet-Lite2's pooled stages 1-6, solved exactly, beats every model
    # trained from scratch, fine-tuning and the ensembles tried, in seconds per fold.
    arch: str = option(
        kinds.DEFAULT_ARCH,
        f"model architecture: {', '.join(families.archs())}; the EfficientNet-Lites are "
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
    # Measured on the default probe (docs/speed.md): half the float graph's CPU time per image,
    # top-1 unchanged on 97.9 % of BDGP images; cross-validated top-1 +1.6 points [+0.0, +5.7]
    # on BDGP, -0.9 [-1.9, +0.7] on lab-like copies (flystage.training.quantise).
    int8: bool = option(
        True,
        "after training, also save model-int8.onnx: the model quantised to int8 (calibrated on "
        "up to 64 training images), kept only if on the validation images it loses at most one "
        "correct top-1 and one correct top-3 answer against the float model and names the float "
        "model's top-1 stage on at least 95 % of the validation and calibration images; predict "
        "and serve then run it (--precision float overrides)",
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
        # Read from the family table now, not at import: a family may be registered later.
        archs = families.archs()
        trainable = families.archs_for(self.mode)
        checks = [
            (self.arch in archs, f"arch {self.arch!r}: choose one of {', '.join(archs)}"),
            (
                all(a in archs for a in self.ensemble_archs),
                f"ensemble_archs {self.ensemble_archs}: choose from {', '.join(archs)}",
            ),
            (self.mode in MODES, f"mode {self.mode!r}: choose one of {MODES}"),
            (
                self.mode == "auto" or all(a in trainable for a in self.member_archs),
                f"mode {self.mode} needs archs whose family trains it ({', '.join(trainable)})",
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
            if families.family_of(spec["arch"]).columns:
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


def _augment_mapping(text: str) -> dict[str, Any]:
    if text.strip().strip('"').lower() in ("off", "none", "false"):
        return AugmentConfig.off().to_dict()
    return mapping(text)


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
