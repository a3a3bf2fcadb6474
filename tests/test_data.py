"""The training dataset: preprocess-once cache, train-only augmentation, balance, channels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from flystage.augment import AugmentConfig, build_train_transform
from flystage.data import (
    DataError,
    FolderRules,
    ImageCache,
    StageDataset,
    WeightedEpochSampler,
    class_weights,
    data_summary,
    make_sampler,
    read_channel,
    records_from_folder,
    split_channels,
)
from flystage.imaging import PreprocessConfig, load
from flystage.organise import read_manifest
from train_helpers import LABELS, TINY_PREPROCESS, embryo_image, make_manifest_set, make_tree

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
    dataset = StageDataset(records, list(LABELS), ImageCache(CONFIG), build_train_transform(augment), train=True)
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


def test_folder_tree_channel(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", per_class=5)
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    records = records_from_folder(tmp_path / "train", split="valid")
    assert len(records) == 15 and {r.split for r in records} == {"valid"}
    assert Counter(r.label for r in records) == {label: 5 for label in LABELS}
    assert all(r.path.parent.name == r.label for r in records)

    # A tree alone is split 80/20 by group, stratified, every label on both sides; without a
    # group rule that split is refused (every image its own group could leak copies).
    with pytest.raises(DataError, match=r"^no group rule for the validation split of folder channel .*group_regex"):
        split_channels(tmp_path / "train")
    rules = FolderRules(group_regex=r"_(?P<group>\d)\.png$")  # <label>_<i>.png: the i-th embryo of each stage
    train, valid, manifest = split_channels(tmp_path / "train", rules=rules)
    assert manifest is None and len(train) + len(valid) == 15
    assert {r.label for r in train} == {r.label for r in valid} == set(LABELS)
    assert not {r.group for r in train} & {r.group for r in valid}

    # With a valid channel, the whole tree trains.
    make_tree(tmp_path / "valid", per_class=1, seed=1)
    train, valid, _ = split_channels(tmp_path / "train", tmp_path / "valid")
    assert len(train) == 15 and len(valid) == 3


def test_manifest_channel(manifest: Path) -> None:
    records, found = read_channel(manifest.parent, "train")
    assert found == manifest and len(records) == 18
    train, valid, found = split_channels(manifest.parent)
    assert found == manifest
    assert (len(train), len(valid)) == (12, 6)
    assert {r.split for r in train} == {"train"} and {r.split for r in valid} == {"valid"}


def test_empty_or_missing_channel_is_clear(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^no images in channel train: .*empty"):
        split_channels(tmp_path / "empty")
    with pytest.raises(DataError, match=r"^no images in channel valid: .*absent does not exist"):
        read_channel(tmp_path / "absent", "valid")
    make_tree(tmp_path / "t", per_class=2)
    (tmp_path / "t" / "manifest.csv").write_text("path,label\nx.png,1-3\n")
    with pytest.raises(DataError, match="channel train: .*missing column"):
        split_channels(tmp_path / "t")


def _gene_stage_tree(root: Path, genes=("Dif", "Dl", "disco", "dhd"), stages=LABELS, per=2) -> Path:
    """A ``<gene>/<stage>/<image>`` tree like BDGP's, every image distinct."""
    import cv2

    for g, gene in enumerate(genes):
        for k, stage in enumerate(stages):
            (root / gene / stage).mkdir(parents=True)
            for i in range(per):
                cv2.imwrite(str(root / gene / stage / f"{i}.png"), embryo_image(k, 1000 * g + 10 * k + i))
    return root


def test_gene_stage_tree_is_read_like_organise(tmp_path: Path) -> None:
    """A <gene>/<stage>/ tree: labels are the stages (the nearest stage-like folder, as
    `flystage organise` reads it), never the genes; group_regex keeps each gene on one side."""
    root = _gene_stage_tree(tmp_path / "channel")
    records, manifest = read_channel(root, "train")
    assert manifest is None and Counter(r.label for r in records) == {label: 8 for label in LABELS}
    rules = FolderRules(group_regex=r"^(?P<group>[^/]+)/")
    lines: list[str] = []
    train, valid, _ = split_channels(root, rules=rules, log=lines.append)
    assert {r.label for r in train} | {r.label for r in valid} == set(LABELS)
    assert {r.group for r in train}.isdisjoint({r.group for r in valid}) and valid
    assert {r.group for r in train} | {r.group for r in valid} == {"Dif", "Dl", "disco", "dhd"}
    assert "groups: group_regex" in lines[0]
    summary = data_summary(train, valid)
    assert summary.splitlines()[0] == f"labels (3): {', '.join(LABELS)}"
    assert "train" in summary and "valid" in summary
    # label_level and label_regex choose other folders, as in organise.
    genes = records_from_folder(root, rules=FolderRules(label_level=2))
    assert {r.label for r in genes} == {"Dif", "Dl", "disco", "dhd"}
    by_regex = records_from_folder(root, rules=FolderRules(label_regex=r"/(?P<label>[0-9-]+)/"))
    assert Counter(r.label for r in by_regex) == Counter(r.label for r in records)


def test_ambiguous_label_level_is_refused(tmp_path: Path) -> None:
    # Two stage-like folders above one image: which is the stage?
    root = _gene_stage_tree(tmp_path / "two", genes=("03", "04"))
    with pytest.raises(DataError, match=r"channel train .*ambiguous label level: 12 image\(s\) lie below more than one "
                                        r"folder that looks like a stage.*level 1 '1-3', level 2 '03'.*label_level"):
        read_channel(root, "train")
    records = records_from_folder(root, rules=FolderRules(label_level=1))
    assert {r.label for r in records} == set(LABELS)
    # No stage-like names, two folder levels: which level is the label?
    deep = _gene_stage_tree(tmp_path / "deep", genes=("a", "b"), stages=("early", "late"))
    with pytest.raises(DataError, match=r"no folder name looks like a stage .*level 1: 2 name\(s\) \(early, late\); "
                                        r"level 2: 2 name\(s\) \(a, b\)"):
        split_channels(deep, rules=FolderRules(group_regex="^(?P<group>[^/]+)/"))
    # One level of any names is a <label>/<images> tree: nothing to guess.
    flat = tmp_path / "flat"
    make_tree(flat, per_class=2, labels=("early", "late"))
    assert {r.label for r in records_from_folder(flat)} == {"early", "late"}
