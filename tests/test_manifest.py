"""manifest: the one reader and writer of manifest CSVs, the label order and the hashes."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest

from flystage.manifest import (
    ManifestError,
    Record,
    manifest_sha256,
    read_manifest,
    sort_labels,
    write_manifest,
)
from test_organise import touch


def test_sort_labels_in_stage_order():
    assert sort_labels(["13-16", "1-3", "9-10", "11-12", "4-6", "7-8", "4-6"]) == [
        "1-3",
        "4-6",
        "7-8",
        "9-10",
        "11-12",
        "13-16",
    ]
    assert sort_labels(["stage 17", "stage 2", "unknown", "stage 10"]) == [
        "stage 2",
        "stage 10",
        "stage 17",
        "unknown",
    ]


def test_manifest_round_trip_relative_and_absolute(tmp_path: Path):
    inside = touch(tmp_path / "data" / "1-3" / "a.png")
    outside = touch(tmp_path / "elsewhere" / "b.png")
    records = [
        Record(inside, "1-3", "g1", "train", "aa", {"note": "x"}),
        Record(outside, "4-6", "g2", "test", "bb"),
    ]
    manifest = write_manifest(records, tmp_path / "data" / "manifest.csv")
    rows = list(csv.DictReader(open(manifest)))
    assert rows[0]["path"] == "1-3/a.png"  # below the manifest's folder: relative
    assert rows[1]["path"] == str(outside.resolve())  # elsewhere: absolute
    assert list(rows[0]) == ["path", "label", "group", "split", "sha1", "note"]
    back = read_manifest(manifest)
    assert [(r.path, r.label, r.group, r.split, r.sha1) for r in back] == [
        (inside.resolve(), "1-3", "g1", "train", "aa"),
        (outside.resolve(), "4-6", "g2", "test", "bb"),
    ]
    assert back[0].extra == {"note": "x"}
    assert manifest_sha256(manifest) == hashlib.sha256(manifest.read_bytes()).hexdigest()
    with pytest.raises(ManifestError, match="already exists"):
        write_manifest(records, manifest)
    write_manifest(records[:1], manifest, force=True)
    assert len(read_manifest(manifest)) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,label,split\na.png,1-3,train\n", r"missing column\(s\) \['group', 'sha1'\]"),
        ("path,label,group,split,sha1\n", "no rows"),
        (
            "path,label,group,split,sha1\na.png,1-3,g,training,x\n",
            "split must be one of train, valid, test; found line 2: 'training'",
        ),
        (
            "path,label,group,split,sha1\nmissing.png,1-3,g,train,x\n",
            r"1 image\(s\) listed but not found",
        ),
        (
            "path,label,group,split,sha1\na.png,1-3,g,train,x\na.png,1-3,g,test,x\n",
            "more than one split",
        ),
    ],
)
def test_read_manifest_errors(tmp_path: Path, text: str, message: str):
    touch(tmp_path / "a.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(manifest)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


def test_write_manifest_leaves_no_partial_or_temporary_file(tmp_path: Path, monkeypatch):
    good = touch(tmp_path / "a.png")
    manifest = write_manifest([Record(good, "1-3", "g", "train", "aa")], tmp_path / "m.csv")
    before = manifest.read_bytes()
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"))
    with pytest.raises(ManifestError, match=r"caf\\xe9.png: not valid UTF-8"):
        write_manifest(
            [Record(good, "1-3", "g", "train", "aa"), Record(odd, "1-3", "h", "test", "bb")],
            manifest,
            force=True,
        )
    assert manifest.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.png",
        "m.csv",
    ]

    class Failing:
        """A disk that fills up after the header line."""

        def __init__(self, f, **kwargs):
            self.f = f

        def writerow(self, row):
            if row[0] != "path":
                raise OSError(28, "No space left on device")
            self.f.write(",".join(row) + "\n")

        def writerows(self, rows):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(csv, "writer", Failing)
    with pytest.raises(OSError, match="No space left"):
        write_manifest([Record(good, "4-6", "g", "train", "cc")], manifest, force=True)
    assert manifest.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.png",
        "m.csv",
    ]
    with pytest.raises(OSError, match="No space left"):
        write_manifest([Record(good, "4-6", "g", "train", "cc")], tmp_path / "new.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "m.csv"]


SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.mark.parametrize(
    "rows, message",
    [
        # The same file twice, under two spellings, in train and test (groups differ).
        (
            ["a.png,1-3,g1,train,", "sub/../a.png,1-3,g2,test,"],
            r"line 2 \(train: .*a.png\) and line 3 \(test: .*a.png\) are the same file",
        ),
        # The same file by absolute path and by relative path.
        (
            ["a.png,1-3,g1,valid,", "{abs},1-3,g2,test,"],
            "line 2 .* and line 3 .* are the same file",
        ),
        # Two files with identical content (same SHA-1 in the column), train and valid.
        (
            [
                f"a.png,1-3,g1,train,{SHA_A}",
                f"b.png,1-3,g2,train,{SHA_B}",
                f"c.png,1-3,g3,valid,{SHA_A.upper()}",
            ],
            (
                r"line 2 \(train: .*a.png\) and line 4 \(valid: .*c.png\) "
                r"are the same SHA-1 aaaaaaaaaaaa"
            ),
        ),
        # '..' out of the manifest's folder.
        (
            ["../outside.png,1-3,g1,train,"],
            r"leave the manifest's folder .* line 2: '../outside.png'",
        ),
        (
            ["sub/../../outside.png,1-3,g1,train,", "a.png,1-3,g2,test,"],
            r"line 2: 'sub/../../outside.png'",
        ),
        # A short row.
        (["a.png,1-3,g1"], r"line 2: no value for column\(s\) \['split', 'sha1'\]"),
    ],
)
def test_read_manifest_refuses_leaks_and_escapes(tmp_path: Path, rows: list[str], message: str):
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png", "sub/keep.png"):
        touch(data / name)
    touch(tmp_path / "outside.png")
    manifest = data / "manifest.csv"
    text = (
        "\n".join(["path,label,group,split,sha1", *rows]).replace("{abs}", str(data / "a.png"))
        + "\n"
    )
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=message) as info:
        read_manifest(manifest)
    assert str(manifest) in str(info.value)


def test_read_manifest_accepts_repeats_within_a_split_and_absolute_paths(tmp_path: Path):
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "sub/c.png"):
        touch(data / name)
    elsewhere = touch(tmp_path / "elsewhere" / "d.png")
    manifest = data / "manifest.csv"
    manifest.write_text(
        "path,label,group,split,sha1\n"
        f"a.png,1-3,g1,train,{SHA_A}\n"
        f"sub/../a.png,1-3,g1,train,{SHA_A}\n"  # a repeat in one split: not a leak
        "sub/./c.png,4-6,g2,test,x\n"  # placeholders are not SHA-1s: never compared
        "b.png,4-6,g3,valid,x\n"
        f"{elsewhere},1-3,g4,test,\n"  # absolute paths stay allowed
    )
    records = read_manifest(manifest)
    assert [r.split for r in records] == ["train", "train", "test", "valid", "test"]
    assert records[-1].path == elsewhere


def test_read_manifest_not_utf8(tmp_path: Path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"path,label,group,split,sha1\ncaf\xe9.png,1-3,g,train,\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(manifest)
