"""Training data: manifest records -> preprocessed, cached, augmented tensors.

Every image is read and preprocessed once (:func:`flystage.imaging.load`) into an in-memory
cache (uint8 by default: 1/255 steps are far below the noise of the augmentations, and it
takes a quarter of the memory of float32); augmentation (:mod:`flystage.augment`) then runs
on the fly per sample, in training mode only.

Also here: class balance (loss weights or a weighted sampler), and the SageMaker channel
reader (a folder with ``manifest.csv``, or a folder tree labelled and grouped by the rules of
``flystage organise``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from flystage.imaging import PreprocessConfig, load
from flystage.organise import (
    ManifestError, OrganiseResult, Record, organise, read_manifest, report_lines, sort_labels, summary_table,
)

BALANCE_MODES = ("loss", "sampler", "none")
CACHE_DTYPES = ("uint8", "float16")
MANIFEST_NAME = "manifest.csv"


class DataError(ValueError):
    """Training data that cannot be used; the message names the channel or file."""


# ---- the image cache ---------------------------------------------------------------------


class ImageCache:
    """Preprocessed images by path, for one :class:`PreprocessConfig`.

    ``get(paths)`` returns ``(N, C, H, W)`` arrays of ``dtype`` (uint8 = round(255 x), or
    float16 = x), preprocessing only the paths not seen before, in ``workers`` threads
    (OpenCV releases the GIL). One cache can serve many datasets (cross-validation folds).
    """

    def __init__(self, config: PreprocessConfig, dtype: str = "uint8", workers: int = 2):
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, not {dtype!r}")
        self.config = config
        self.dtype = np.dtype(dtype)
        self.workers = max(1, workers)
        self._images: dict[Path, np.ndarray] = {}
        # Results derived from the cached images that callers share too (a linear probe's
        # features per image and augmentation draw), by a key of their own.
        self.derived: dict[Any, dict] = {}

    def _encode(self, path: Path) -> np.ndarray:
        x = load(path, self.config)
        if self.dtype == np.uint8:
            return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        return x.astype(np.float16)

    def get(self, paths: Sequence[Path]) -> np.ndarray:
        todo = [p for p in dict.fromkeys(map(Path, paths)) if p not in self._images]
        if todo:
            with ThreadPoolExecutor(self.workers) as pool:
                for path, array in zip(todo, pool.map(self._encode, todo)):
                    self._images[path] = array
        shape = (0, self.config.channels, self.config.height, self.config.width)
        return np.stack([self._images[Path(p)] for p in paths]) if paths else np.zeros(shape, self.dtype)

    def __len__(self) -> int:
        return len(self._images)


def to_float(images: np.ndarray) -> torch.Tensor:
    """Cached ``uint8``/``float16`` images -> float32 tensor in [0, 1], same shape."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


# ---- the dataset -------------------------------------------------------------------------


class StageDataset(Dataset):
    """Records as ``(image, label index)`` pairs: image float32 ``(C, H, W)`` in [0, 1].

    ``labels`` is the ordered label list (output index i is ``labels[i]``). ``transform``
    (:func:`flystage.augment.build_train_transform`: ``transform(image, rng)``) is applied
    per sample only while ``train`` is true, so the same dataset can be scored unaugmented.
    Each sample's numpy generator is seeded from torch's generator, which the DataLoader
    seeds per worker and the training loop per epoch: every draw differs (also the repeats
    of a weighted sampler), and a run is reproducible.
    """

    def __init__(
        self,
        records: Sequence[Record],
        labels: Sequence[str],
        cache: ImageCache,
        transform: Callable[[torch.Tensor, np.random.Generator], torch.Tensor] | None = None,
        train: bool = False,
    ):
        index = {label: i for i, label in enumerate(labels)}
        unknown = [r for r in records if r.label not in index]
        if unknown:
            raise DataError(
                f"{len(unknown)} image(s) have labels outside {list(labels)}, e.g. "
                f"{unknown[0].path} ({unknown[0].label!r}); train with those labels or drop the images"
            )
        self.records = list(records)
        self.labels = list(labels)
        self.targets = np.array([index[r.label] for r in self.records], dtype=np.int64)
        self.images = cache.get([r.path for r in self.records])
        self.transform = transform
        self.train = train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = to_float(self.images[i])
        if self.train and self.transform is not None:
            rng = np.random.default_rng(int(torch.randint(0, 2**63 - 1, ()).item()))
            x = self.transform(x, rng)
        return x, int(self.targets[i])


# ---- class balance -----------------------------------------------------------------------


def class_counts(targets: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(targets, minlength=num_classes)


def class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    """Per-class loss weights ``n / (k * count)`` (1 for every class when balanced); absent
    classes get 0."""
    counts = class_counts(targets, num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


class WeightedEpochSampler(Sampler[int]):
    """Draws ``num_samples`` indices with replacement, each with probability proportional to
    ``1 / count(its class)`` (every class equally often), split across ``world_size`` ranks.

    Like ``DistributedSampler``: the draw depends on ``seed`` and the epoch (``set_epoch``),
    so every rank draws the same sequence and takes its own interleaved share.
    """

    def __init__(self, targets: np.ndarray, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        counts = np.bincount(targets)
        self.weights = torch.tensor(1.0 / counts[targets], dtype=torch.float64)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True, generator=g)
        return iter(drawn[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def make_sampler(
    targets: np.ndarray, balance: str, rank: int = 0, world_size: int = 1, seed: int = 0
) -> WeightedEpochSampler | DistributedSampler:
    """The training sampler: class-balanced draws for ``balance="sampler"``, else a seeded
    shuffle; both shard across ``world_size`` ranks and reshuffle on ``set_epoch``."""
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {BALANCE_MODES}, not {balance!r}")
    if balance == "sampler":
        return WeightedEpochSampler(targets, len(targets), rank, world_size, seed)
    return DistributedSampler(range(len(targets)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)


# ---- SageMaker channels ------------------------------------------------------------------


@dataclass(frozen=True)
class FolderRules:
    """How a folder channel is labelled and grouped: the options of ``flystage organise``
    (:func:`flystage.organise.organise`), given to the training program as the hyperparameters
    ``label_regex``, ``label_level`` and ``group_regex``.

    Without a label option the label is the nearest folder whose name looks like a stage (a
    ``<label>/<images>`` tree of other names: that folder); ``organise`` refuses a guess.
    Without ``group_regex`` every image is its own group, so no validation split is drawn.
    """

    label_regex: str | None = None
    label_level: int | None = None
    group_regex: str | None = None

    def describe(self) -> str:
        if self.label_regex:
            label = f"label_regex {self.label_regex!r}"
        elif self.label_level:
            label = f"label_level {self.label_level}"
        else:
            label = "the nearest stage-like folder"
        group = f"group_regex {self.group_regex!r}" if self.group_regex else "none (each image its own group)"
        return f"labels from {label}; groups: {group}"

    def is_set(self) -> bool:
        return any(v is not None for v in (self.label_regex, self.label_level, self.group_regex))


NO_GROUP_RULE = (
    "no group rule for the validation split of folder channel {channel}: every image would be its own group, so "
    "copies of one embryo (rotated or augmented images, other shots) could land in train and in valid and the "
    "validation metrics would be measured on leaked images. Give the group_regex hyperparameter (a regex with a "
    "named group 'group' on the path below the channel, e.g. '^(?P<group>[^/]+)/' for a <gene>/<stage>/ tree), "
    "or a manifest made by `flystage organise --group-regex ...`, or a valid channel"
)


def organise_folder(root: str | Path, rules: FolderRules = FolderRules(), split: str | None = "train", seed: int = 0,
                    fractions: tuple[float, float, float] = (0.8, 0.2, 0.0)) -> OrganiseResult:
    """A folder channel organised by :func:`flystage.organise.organise` with ``rules`` (nested
    folders, stray files and exact duplicates handled there). ``split`` sets every record's
    split; ``None`` splits by group, stratified by ``fractions`` (train, valid, test), with ``seed``."""
    result = organise(
        [Path(root)],
        label_level=rules.label_level,
        label_regex=rules.label_regex,
        group_regex=rules.group_regex,
        split="stratified" if split is None else "none",
        fractions=fractions,
        seed=seed,
    )
    if split is not None:
        for r in result.records:
            r.split = split
    return result


def records_from_folder(root: str | Path, split: str | None = "train", seed: int = 0,
                        fractions: tuple[float, float, float] = (0.8, 0.2, 0.0),
                        rules: FolderRules = FolderRules()) -> list[Record]:
    """The records of :func:`organise_folder`."""
    return organise_folder(root, rules, split, seed, fractions).records


def _read_folder(channel: Path, name: str, rules: FolderRules, log: Callable[[str], None] | None,
                 split: str | None, seed: int) -> list[Record]:
    result = organise_folder(channel, rules, split=split, seed=seed)
    if log is not None:
        log(f"channel {name}: folder tree {channel}, {rules.describe()}")
        for line in report_lines(result):
            log(f"channel {name}: {line}")
    return result.records


def read_channel(channel: str | Path, name: str, rules: FolderRules = FolderRules(),
                 log: Callable[[str], None] | None = None) -> tuple[list[Record], Path | None]:
    """Every record of a channel folder and its manifest (``None`` for a folder tree).

    A channel is a folder with ``manifest.csv`` (whose ``split`` column says which rows are
    train or valid), a manifest CSV file itself, or a folder tree labelled by ``rules``
    (records get split ``""``: the caller decides). ``log`` gets what organising a tree left out.
    """
    channel = Path(channel)
    if not channel.exists():
        raise DataError(f"no images in channel {name}: {channel} does not exist")
    manifest = channel if channel.is_file() else channel / MANIFEST_NAME
    try:
        if manifest.is_file():
            return read_manifest(manifest), manifest
        if not any(channel.iterdir()):
            raise DataError(f"no images in channel {name}: {channel} is empty (give a {MANIFEST_NAME} or <label>/<images> folders)")
    except ManifestError as exc:
        raise DataError(f"no usable images in channel {name}: {exc}") from exc
    try:
        return _read_folder(channel, name, rules, log, split="", seed=0), None
    except ManifestError as exc:  # the folder rules: ambiguous labels, a group regex that misses
        raise DataError(f"channel {name} ({channel}): {exc}") from exc


def split_channels(
    train_channel: str | Path, valid_channel: str | Path | None = None, seed: int = 0,
    rules: FolderRules = FolderRules(), log: Callable[[str], None] | None = None,
) -> tuple[list[Record], list[Record], Path | None]:
    """Train and valid records from SageMaker channels, and the train manifest (if any).

    - train has a manifest: its ``train`` rows; its ``valid`` rows unless a valid channel is
      given, whose ``valid`` rows (or all rows, if it has none) are used instead.
    - train is a folder tree (labelled and grouped by ``rules``): all of it, with a valid
      channel; without one, a seeded stratified 80/20 split by group, which needs
      ``rules.group_regex`` (refused without: :data:`NO_GROUP_RULE`).
    """
    train_all, manifest = read_channel(train_channel, "train", rules, log)
    if manifest is not None and rules.is_set() and log is not None:
        log(f"note: label_regex/label_level/group_regex not used: channel train has {manifest.name} (its labels and groups are used)")
    if manifest is None and valid_channel is None:
        if not rules.group_regex:
            raise DataError(NO_GROUP_RULE.format(channel=train_channel))
        try:
            records = organise_folder(train_channel, rules, split=None, seed=seed).records
        except ManifestError as exc:
            raise DataError(f"channel train ({train_channel}): {exc}") from exc
        train = [r for r in records if r.split == "train"]
        valid = [r for r in records if r.split == "valid"]
    else:
        train = [r for r in train_all if r.split in ("train", "")]
        valid = [r for r in train_all if r.split == "valid"]
        if valid_channel is not None:
            valid_all, _ = read_channel(valid_channel, "valid", rules, log)
            valid = [r for r in valid_all if r.split == "valid"] or valid_all
    if not train:
        raise DataError(f"no images in channel train: {train_channel} has no rows with split=train")
    if not valid:
        raise DataError(
            f"no validation images: {train_channel} has no rows with split=valid and no valid channel "
            "was given; organise with a valid fraction or add a valid channel"
        )
    return train, valid, manifest


def data_summary(train: Sequence[Record], valid: Sequence[Record]) -> str:
    """The labels (stage order) and, per split, the images per label and the groups:
    :func:`flystage.organise.summary_table` of the train and valid records."""
    records = [dataclasses.replace(r, split="train") for r in train] + [dataclasses.replace(r, split="valid") for r in valid]
    labels = sort_labels(r.label for r in records)
    return f"labels ({len(labels)}): {', '.join(labels)}\n{summary_table(records)}"
