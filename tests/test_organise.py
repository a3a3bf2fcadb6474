"""organise: scanning lab folders, labelling through organise's options, duplicates, the report
and the command; the label rules are tested in test_labels.py, the split in test_splitting.py."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from flystage import cli
from flystage.manifest import read_manifest, sort_labels, write_manifest
from flystage.organise import OrganiseOptions, iter_images, organise
from flystage.organise_error import OrganiseError


def touch(path: Path, content: str | bytes | None = None) -> Path:
    """A file with distinct content (organise only hashes files; it never decodes them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content if content is not None else f"image {path.as_posix()}"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture
def lab_tree(tmp_path: Path) -> Path:
    """A folder as a lab emails it: nested stages, strays, hidden and checkpoint folders."""
    root = tmp_path / "from_lab"
    for stage, n in (("stage 11-12", 3), ("13-16", 2), ("9-10", 2)):
        for i in range(n):
            touch(root / "session1" / stage / f"embryo{i}.TIF")
    touch(root / "session2" / "13-16" / "e7.png")
    touch(root / "session2" / "13-16" / "e8.jpeg")
    touch(root / "session2" / "13-16" / "notes.txt")
    touch(root / "session2" / "Thumbs.db")
    touch(root / ".ipynb_checkpoints" / "13-16" / "e7-checkpoint.png")
    touch(root / "session1" / ".hidden" / "x.png")
    touch(root / "session1" / ".DS_Store")
    touch(root / "__MACOSX" / "session1" / "._embryo0.TIF")
    touch(root / "session2" / "misc" / "unlabelled.bmp")
    return root


def test_iter_images_keeps_images_and_counts_what_it_ignores(lab_tree: Path):
    paths, ignored = iter_images([lab_tree])
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["embryo0.TIF", "embryo1.TIF", "embryo2.TIF"]
        + ["embryo0.TIF", "embryo1.TIF"] * 2
        + ["e7.png", "e8.jpeg", "unlabelled.bmp"]
    )
    assert ignored == Counter(
        {
            "not an image (.txt)": 1,
            "not an image (.db)": 1,
            "in checkpoint folder": 1,
            "in hidden folder": 1,
            "hidden file": 1,
            "in __MACOSX folder": 1,
        }
    )
    assert len(set(paths)) == len(paths) and iter_images([lab_tree])[0] == paths  # stable order
    # A single image path is accepted as is.
    one, _ = iter_images([paths[0]])
    assert one == [paths[0].resolve()]


def test_folder_labels_and_unlabelled_report(lab_tree: Path):
    result = organise([lab_tree], split="none")
    labels = Counter(r.label for r in result.records)
    assert labels == {"stage 11-12": 3, "13-16": 4, "9-10": 2}
    assert [p.name for p in result.unlabelled] == ["unlabelled.bmp"]
    assert {r.split for r in result.records} == {"train"}
    # Without a group, every image is its own group.
    assert len({r.group for r in result.records}) == len(result.records)


def test_label_level_map_keep_and_drop(lab_tree: Path):
    result = organise(
        [lab_tree], label_level=1, mapping={"stage 11-12": "11-12", "misc": "13-16"}, split="none"
    )
    assert Counter(r.label for r in result.records) == {"11-12": 3, "13-16": 5, "9-10": 2}
    assert result.mapped == {"stage 11-12 -> 11-12": 3, "misc -> 13-16": 1}
    kept = organise(
        [lab_tree], mapping={"stage 11-12": "11-12"}, keep={"11-12", "13-16"}, split="none"
    )
    assert set(r.label for r in kept.records) == {"11-12", "13-16"}
    assert kept.dropped == {"9-10": 2}
    dropped = organise([lab_tree], drop={"13-16"}, split="none")
    assert "13-16" not in {r.label for r in dropped.records} and dropped.dropped == {"13-16": 4}


def test_duplicates_kept_once_and_conflicts_dropped(tmp_path: Path):
    root = tmp_path / "d"
    touch(root / "1-3" / "a.png", "same bytes")
    touch(root / "1-3" / "copy_of_a.png", "same bytes")
    touch(root / "4-6" / "b.png", "conflict bytes")
    touch(root / "7-8" / "b_again.png", "conflict bytes")
    touch(root / "7-8" / "c.png")
    result = organise([root], split="none")
    assert sorted(r.path.name for r in result.records) == ["a.png", "c.png"]
    assert [(k.name, [r.name for r in removed]) for k, removed in result.duplicates] == [
        ("a.png", ["copy_of_a.png"])
    ]
    assert len(result.conflicts) == 1
    assert sorted((p.name, label) for p, label in result.conflicts[0][1]) == [
        ("b.png", "4-6"),
        ("b_again.png", "7-8"),
    ]
    assert all(r.sha1 == hashlib.sha1(r.path.read_bytes()).hexdigest() for r in result.records)


def test_label_regex_and_group_regex(tmp_path: Path):
    root = tmp_path / "flat"
    for emb in ("E1", "E2", "E3"):
        for stage in (5, 11):
            touch(root / emb / f"{emb}_t{stage}_stage{stage}.tif")
    result = organise(
        [root],
        label_regex=r"stage(?P<label>\d+)\.tif$",
        group_regex=r"^(?P<group>E\d)/",
        split="none",
    )
    assert Counter(r.label for r in result.records) == {"5": 3, "11": 3}
    assert Counter(r.group for r in result.records) == {"E1": 2, "E2": 2, "E3": 2}
    with pytest.raises(OrganiseError, match="did not match 6 image"):
        organise([root], label_regex=r"stage(?P<label>\d+)", group_regex=r"^(?P<group>X\d)/")
    with pytest.raises(OrganiseError, match=r"named group \(\?P<label>"):
        organise([root], label_regex=r"stage(\d+)")


def test_options_are_validated_and_one_object_or_keywords(tmp_path: Path):
    """OrganiseOptions refuses a bad option when made, before any folder is walked; organise
    takes it whole, and keyword arguments named like its fields replace those fields."""
    for bad, message in [
        (dict(split="random"), "use 'stratified' or 'none'"),
        (dict(label_level=0), "1 is the image's own folder"),
        (dict(label_regex="stage(["), "--label-regex .* not a valid regular expression"),
        (dict(group_regex="^(?P<embryo>E\\d)/"), r"named group \(\?P<group>"),
        (dict(label_pattern="(("), "--label-pattern .* not a valid regular expression"),
    ]:
        with pytest.raises(OrganiseError, match=message):
            OrganiseOptions(**bad)
    root = tmp_path / "flat"
    for emb in ("E1", "E2"):
        touch(root / emb / f"{emb}_stage5.tif")
    options = OrganiseOptions(
        label_regex=r"stage(?P<label>\d+)\.tif$", group_regex=r"^(?P<group>E\d)/", split="none"
    )
    by_object = organise([root], options)
    assert [(r.label, r.group) for r in by_object.records] == [("5", "E1"), ("5", "E2")]
    assert organise([root], options, group_regex=None).records[0].group == "E1/E1_stage5.tif"


def test_labels_csv_with_groups(tmp_path: Path):
    root = tmp_path / "imgs"
    for i in range(6):
        touch(root / f"img{i}.png")
    touch(root / "not_listed.png")
    table = tmp_path / "labels.csv"
    rows = [
        {"path": f"imgs/img{i}.png", "stage": "4-6" if i % 2 else "13-16", "embryo": f"e{i // 2}"}
        for i in range(6)
    ]
    rows.append({"path": "imgs/gone.png", "stage": "4-6", "embryo": "e9"})
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "stage", "embryo"])
        w.writeheader()
        w.writerows(rows)
    result = organise(
        [root], labels_csv=table, label_column="stage", group_column="embryo", split="none"
    )
    assert len(result.records) == 6
    assert result.ignored["not in the labels CSV"] == 1
    assert {r.path.name: (r.label, r.group) for r in result.records}["img3.png"] == ("4-6", "e1")
    with pytest.raises(OrganiseError, match=r"missing column\(s\) \['label'\]"):
        organise([root], labels_csv=table)


def test_cli_writes_manifest_and_refuses_to_overwrite(lab_tree: Path, tmp_path: Path, capsys):
    out = tmp_path / "m.csv"
    assert cli.main(["organise", str(lab_tree), "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "1 in checkpoint folder" in printed and "no label found for 1 image" in printed
    assert "wrote" in printed and len(read_manifest(out)) == 9
    before = out.read_bytes()
    assert cli.main(["organise", str(lab_tree), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert (
        cli.main(["organise", str(lab_tree), "--out", str(out), "--force", "--split", "none"]) == 0
    )
    assert {r.split for r in read_manifest(out)} == {"train"}


# ---- the real BDGP images ---------------------------------------------------------------------

GENE = r"^(?P<group>[^/]+)/"


def test_bdgp_by_gene(bdgp_root: Path, tmp_path: Path):
    result = organise([bdgp_root], group_regex=GENE, seed=0)
    records = result.records
    assert len(records) == 193
    assert len({r.group for r in records}) == 8
    assert sort_labels(r.label for r in records) == ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"]
    assert Counter(r.label for r in records) == {
        "1-3": 14,
        "4-6": 41,
        "7-8": 27,
        "9-10": 17,
        "11-12": 45,
        "13-16": 49,
    }
    assert result.ignored == {
        "not an image (.csv)": 1,
        "not an image (.md)": 1,
        "not an image (no suffix)": 1,
    }
    # The gene is the group, and a gene never spans two splits.
    assert all(r.group == r.path.relative_to(bdgp_root.resolve()).parts[0] for r in records)
    splits_of = defaultdict(set)
    for r in records:
        splits_of[r.group].add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    # Reasonable stratification: train holds most images and every stage; valid and test exist.
    per_split = Counter(r.split for r in records)
    assert (
        0.55 <= per_split["train"] / 193 <= 0.85
        and per_split["valid"] > 0
        and per_split["test"] > 0
    )
    assert {r.label for r in records if r.split == "train"} == set(
        Counter(r.label for r in records)
    )
    # The sha1 column agrees with the dataset's own labels.csv.
    listed = {row["path"]: row["sha1"] for row in csv.DictReader(open(bdgp_root / "labels.csv"))}
    assert {r.path.relative_to(bdgp_root.resolve()).as_posix(): r.sha1 for r in records} == listed
    # Deterministic: the same seed gives the same manifest, byte for byte.
    a = write_manifest(records, tmp_path / "a.csv")
    b = write_manifest(organise([bdgp_root], group_regex=GENE, seed=0).records, tmp_path / "b.csv")
    assert a.read_bytes() == b.read_bytes()


def test_bdgp_labels_csv_matches_folder_labels(bdgp_root: Path):
    by_csv = organise(
        [bdgp_root],
        labels_csv=bdgp_root / "labels.csv",
        label_column="stage_range",
        group_column="gene",
    )
    by_folder = organise([bdgp_root], group_regex=GENE)
    assert [(r.path, r.label, r.group, r.split) for r in by_csv.records] == [
        (r.path, r.label, r.group, r.split) for r in by_folder.records
    ]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--map", "11-12"], "write it as OLD=NEW"),
        (["--fractions", "0.7,x,0.1"], "give three numbers"),
        (["--fractions", "0.7,0.3"], "give three non-negative numbers"),
        (["--label-level", "0"], "1 is the image's own folder"),
        (["--group-regex", "(?P<group>[unclosed"], "not a valid regular expression"),
    ],
)
def test_cli_bad_options_say_what_to_do(lab_tree: Path, tmp_path: Path, capsys, options, message):
    out = tmp_path / "m.csv"
    assert cli.main(["organise", str(lab_tree), "--out", str(out), *options]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_several_folders_and_a_missing_one(lab_tree: Path, tmp_path: Path):
    other = tmp_path / "second_lab"
    touch(other / "9-10" / "x.tif")
    result = organise([lab_tree, other], split="none")
    assert len(result.records) == 10
    assert len({r.group for r in result.records}) == 10  # absolute paths: unique across folders
    with pytest.raises(OrganiseError, match="no such folder"):
        organise([tmp_path / "nope"])
    empty = tmp_path / "empty"
    touch(empty / "readme.txt")
    with pytest.raises(
        OrganiseError, match=r"no images .* ignored: \{'not an image \(.txt\)': 1\}"
    ):
        organise([empty])


# ---- malformed inputs (issue 8) -------------------------------------------------------------


def test_labels_csv_not_utf8_and_short_row_through_the_cli(tmp_path: Path, capsys):
    touch(tmp_path / "imgs" / "img0.png")
    table = tmp_path / "labels.csv"
    table.write_bytes(b"path,label\nimgs/img0.png,st\xe9\n")
    with pytest.raises(OrganiseError, match="not UTF-8"):
        organise([tmp_path / "imgs"], labels_csv=table)
    table.write_text("path,label,group\nimgs/img0.png\n")
    out = tmp_path / "m.csv"
    assert (
        cli.main(
            ["organise", str(tmp_path / "imgs"), "--labels-csv", str(table), "--out", str(out)]
        )
        == 2
    )
    assert f"{table}: line 2: no value" in capsys.readouterr().err
    assert not out.exists()


def test_names_not_utf8_are_skipped_counted_and_listed(tmp_path: Path, capsys):
    root = tmp_path / "lab"
    touch(root / "1-3" / "ok.tif")
    touch(root / "1-3" / "other.tif")
    odd = Path(
        os.fsdecode(os.fsencode(root / "1-3") + b"/caf\xe9.tif")
    )  # Latin-1 name on a UTF-8 system
    touch(odd, b"odd file")
    odd_folder = Path(os.fsdecode(os.fsencode(root) + b"/s\xe9ance/4-6"))  # a folder name, too
    touch(odd_folder / "x.tif", b"odd folder")
    result = organise([root], split="none")
    assert sorted(r.path.name for r in result.records) == ["ok.tif", "other.tif"]
    assert result.ignored == {"name not valid UTF-8 (rename it to include it)": 2}
    assert sorted(result.not_utf8) == sorted([odd, odd_folder / "x.tif"])
    out = tmp_path / "out" / "m.csv"
    assert cli.main(["organise", str(root), "--out", str(out), "--split", "none"]) == 0
    printed = capsys.readouterr().out
    assert "2 name not valid UTF-8" in printed and "caf\\xe9.tif: name not valid UTF-8" in printed
    assert len(read_manifest(out)) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.csv"]  # no temporary file left
    # Nothing but such names: a clear error, no manifest, no temporary file.
    only = tmp_path / "only"
    touch(Path(os.fsdecode(os.fsencode(only / "1-3") + b"/\xff.png")), b"only")
    out2 = tmp_path / "out2" / "m.csv"
    assert cli.main(["organise", str(only), "--out", str(out2)]) == 2
    assert "1 with a name not valid UTF-8" in capsys.readouterr().err
    assert not out2.parent.exists() or list(out2.parent.iterdir()) == []
