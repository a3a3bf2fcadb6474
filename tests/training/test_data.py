"""The training dataset: preprocess-once cache, train-only augmentation, balance (channels:
test_channels.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from flystage.augment import AugmentConfig, build_train_transform
from flystage.channels import DataError
from flystage.imaging import PreprocessConfig, load
from flystage.manifest import read_manifest
from flystage.training.data import (
    ImageCache,
    StageDataset,
    WeightedEpochSampler,
    class_weights,
    make_sampler,
)
from train_helpers import LABELS, TINY_PREPROCESS, make_manifest_set, make_tree

torch.set_num_threads(1)
CONFIG = PreprocessConfig(**TINY_PREPROCESS)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_manifest_set(tmp_path_factory.mktemp("set"), train_per_class=4, valid_per_class=2)


@pytest.mark.parametrize("dtype, tolerance", [("uint8", 0.5 / 255 + 1e-6), ("float16", 1e-3)])
def test_cache_matches_preprocessing(manifest: Path, dtype: str, tolerance: float) -> None:
    records = read_manifest(manifest)
    cache = ImageCache(CONFIG, dtype=dtype)
    images = cache.get([r.path for r in records])
    assert images.dtype == np.dtype(dtype)
    assert images.shape == (len(records), 1, 32, 80)
    dataset = StageDataset(records[:3], list(LABELS), cache)
    for i in range(3):
        x, _ = dataset[i]
        assert x.dtype == torch.float32 and x.shape == (1, 32, 80)
        np.testing.assert_allclose(x.numpy(), load(records[i].path, CONFIG), atol=tolerance)


def test_cache_preprocesses_each_image_once(tmp_path: Path) -> None:
    paths = make_tree(tmp_path, per_class=1)
    cache = ImageCache(CONFIG)
    first = cache.get(paths)
    for path in paths:
        path.unlink()  # a second read would fail now
    again = cache.get(list(reversed(paths)))
    assert len(cache) == len(paths)
    np.testing.assert_array_equal(again, first[::-1])


def test_labels_to_indices_in_given_order(manifest: Path) -> None:
    records = read_manifest(manifest)
    labels = ["7-8", "4-6", "1-3"]  # the index follows the list given, whatever it is
    dataset = StageDataset(records, labels, ImageCache(CONFIG))
    assert [labels[t] for t in dataset.targets] == [r.label for r in records]
    with pytest.raises(DataError, match="labels outside.*7-8"):
        StageDataset(records, ["1-3", "4-6"], ImageCache(CONFIG))


def test_augmentation_only_in_train_mode(manifest: Path) -> None:
    records = read_manifest(manifest)[:4]
    # Every augmentation on, so that each draw changes the image.
    augment = AugmentConfig(p_angle=1.0, p_rotation=1.0, p_affine=1.0, p_intensity=1.0)
    dataset = StageDataset(
        records, list(LABELS), ImageCache(CONFIG), build_train_transform(augment), train=True
    )
    torch.manual_seed(0)
    a, _ = dataset[0]
    b, _ = dataset[0]
    assert a.shape == (1, 32, 80) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(dataset[0][0], a)  # reproducible from torch's seed
    dataset.train = False
    plain = torch.from_numpy(dataset.images[0]).float() / 255
    assert torch.equal(dataset[0][0], plain) and torch.equal(dataset[0][0], dataset[0][0])


def test_class_weights() -> None:
    targets = np.array([0] * 6 + [1] * 2 + [2] * 4)
    weights = class_weights(targets, 4)
    # n / (k * count) over the 3 present classes; the absent one gets 0.
    np.testing.assert_allclose(weights.numpy(), [12 / 18, 12 / 6, 12 / 12, 0.0], rtol=1e-6)


def test_weighted_sampler_balances_and_shards() -> None:
    targets = np.array([0] * 90 + [1] * 10)
    sampler = make_sampler(targets, "sampler", seed=3)
    assert isinstance(sampler, WeightedEpochSampler) and len(sampler) == 100
    counts = Counter()
    for epoch in range(30):
        sampler.set_epoch(epoch)
        counts.update(targets[list(sampler)])
    assert 0.4 < counts[1] / 3000 < 0.6  # 10 % of the images, half of the draws
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    # Two ranks: same seed and epoch, interleaved shares of the same draw.
    ranks = [WeightedEpochSampler(targets, 100, rank, 2, seed=3) for rank in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    shares = [list(r) for r in ranks]
    assert len(shares[0]) == len(shares[1]) == 50
    single = WeightedEpochSampler(targets, 100, seed=3)
    single.set_epoch(1)
    merged = [i for pair in zip(*shares) for i in pair]
    assert merged == list(single)


@pytest.mark.parametrize("balance", ["loss", "none"])
def test_plain_sampler_is_a_shuffle(balance: str) -> None:
    targets = np.array([0] * 7 + [1] * 3)
    sampler = make_sampler(targets, balance, seed=1)
    assert isinstance(sampler, DistributedSampler)
    sampler.set_epoch(0)
    order = list(sampler)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    with pytest.raises(ValueError, match="balance must be one of"):
        make_sampler(targets, "oversample")
