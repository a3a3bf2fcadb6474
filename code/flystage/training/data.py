"""Training data: manifest records -> preprocessed, cached, augmented tensors.

Every image is read and preprocessed once (:func:`flystage.imaging.load`) into an in-memory
cache (uint8 by default: 1/255 steps are far below the noise of the augmentations, and it
takes a quarter of the memory of float32); augmentation (:mod:`flystage.augment`) then runs
on the fly per sample, in training mode only.

Also here: class balance (loss weights or a weighted sampler). The SageMaker channel reader
(a channel folder -> records) is :mod:`flystage.channels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler

from flystage.channels import DataError  # the channel reader's error type is the dataset's too
from flystage.imaging import PreprocessConfig, load
from flystage.manifest import Record

BALANCE_MODES = ("loss", "sampler", "none")
CACHE_DTYPES = ("uint8", "float16")


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
        return (
            np.stack([self._images[Path(p)] for p in paths])
            if paths
            else np.zeros(shape, self.dtype)
        )

    def __len__(self) -> int:
        return len(self._images)


def to_float(images: np.ndarray) -> torch.Tensor:
    """Cached ``uint8``/``float16`` images -> float32 tensor in [0, 1], same shape."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


# ---- the dataset -------------------------------------------------------------------------


def label_indices(records: Sequence[Record], labels: Sequence[str]) -> np.ndarray:
    """The label index of every record (int64), refusing labels outside ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = [r for r in records if r.label not in index]
    if unknown:
        raise DataError(
            f"{len(unknown)} image(s) have labels outside {list(labels)}, e.g. "
            f"{unknown[0].path} ({unknown[0].label!r}); train with those labels or drop the "
            "images"
        )
    return np.array([index[r.label] for r in records], dtype=np.int64)


def gather_rows(compute: Callable[[list], torch.Tensor], items: Sequence[Any]) -> torch.Tensor:
    """``compute(items)``, one row per item, split between the hosts when torch.distributed is
    up: each rank computes ``items[rank::world]`` and every rank gets all rows, in order.

    Every rank must call it with the same items (it is a collective). The shares differ in
    size by one, so they travel as objects (gloo's all_gather needs equal shapes).
    """
    if not (dist.is_available() and dist.is_initialized()) or not items:
        return compute(list(items))
    rank, world = dist.get_rank(), dist.get_world_size()
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, compute(list(items[rank::world])))
    rows: list[Any] = [None] * len(items)
    for r, share in enumerate(shares):
        rows[r::world] = list(share)
    return torch.stack(rows)


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
        self.records = list(records)
        self.labels = list(labels)
        self.targets = label_indices(self.records, self.labels)
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

    def __init__(
        self,
        targets: np.ndarray,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        counts = np.bincount(targets)
        self.weights = torch.tensor(1.0 / counts[targets], dtype=torch.float64)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(
            self.weights, self.per_rank * self.world_size, replacement=True, generator=g
        )
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
    return DistributedSampler(
        range(len(targets)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed
    )
