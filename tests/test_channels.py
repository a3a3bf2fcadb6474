"""The SageMaker channel reader: manifest channels, folder trees read by organise's rules,
the grouped validation split, and the errors that name the channel."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from flystage.channels import (
    DataError,
    FolderRules,
    data_summary,
    read_channel,
    records_from_folder,
    split_channels,
)
from train_helpers import LABELS, embryo_image, make_manifest_set, make_tree


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_manifest_set(tmp_path_factory.mktemp("set"), train_per_class=4, valid_per_class=2)


def test_folder_tree_channel(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", per_class=5)
    (tmp_path / "train" / "notes.txt").write_text("not an image")
    records = records_from_folder(tmp_path / "train", split="valid")
    assert len(records) == 15 and {r.split for r in records} == {"valid"}
    assert Counter(r.label for r in records) == {label: 5 for label in LABELS}
    assert all(r.path.parent.name == r.label for r in records)

    # A tree alone is split 80/20 by group, stratified, every label on both sides; without a
    # group rule that split is refused (every image its own group could leak copies).
    with pytest.raises(
        DataError, match=r"^no group rule for the validation split of folder channel .*group_regex"
    ):
        split_channels(tmp_path / "train")
    rules = FolderRules(
        group_regex=r"_(?P<group>\d)\.png$"
    )  # <label>_<i>.png: the i-th embryo of each stage
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
                cv2.imwrite(
                    str(root / gene / stage / f"{i}.png"), embryo_image(k, 1000 * g + 10 * k + i)
                )
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
    with pytest.raises(
        DataError,
        match=r"channel train .*ambiguous label level: 12 image\(s\) lie below more than one "
        r"folder that looks like a stage.*level 1 '1-3', level 2 '03'.*label_level",
    ):
        read_channel(root, "train")
    records = records_from_folder(root, rules=FolderRules(label_level=1))
    assert {r.label for r in records} == set(LABELS)
    # No stage-like names, two folder levels: which level is the label?
    deep = _gene_stage_tree(tmp_path / "deep", genes=("a", "b"), stages=("early", "late"))
    with pytest.raises(
        DataError,
        match=r"no folder name looks like a stage .*level 1: 2 name\(s\) \(early, late\); "
        r"level 2: 2 name\(s\) \(a, b\)",
    ):
        split_channels(deep, rules=FolderRules(group_regex="^(?P<group>[^/]+)/"))
    # One level of any names is a <label>/<images> tree: nothing to guess.
    flat = tmp_path / "flat"
    make_tree(flat, per_class=2, labels=("early", "late"))
    assert {r.label for r in records_from_folder(flat)} == {"early", "late"}


def test_channel_reader_needs_no_torch() -> None:
    """The channel reader is organise's rules and a manifest reader: it imports with torch
    unimportable."""
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import flystage.channels"
    subprocess.run([sys.executable, "-c", code], check=True)
