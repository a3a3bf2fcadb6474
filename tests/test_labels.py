"""Label and group rules: an image's path or a labels CSV -> its stage label and its group."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from flystage.labels import (
    DEFAULT_LABEL_PATTERN,
    NOT_UTF8,
    LabelRules,
    compile_named_pattern,
    default_label_level,
    label_and_group,
    label_records,
    parse_label_map,
    parse_label_set,
    read_labels_csv,
    stage_levels,
)
from flystage.organise_error import OrganiseError
from test_organise import touch

FOLDER_RE = re.compile(DEFAULT_LABEL_PATTERN)


def rules(**fields) -> LabelRules:
    """Label rules with nothing set but ``fields`` (the nearest stage-like folder labels)."""
    base = dict(
        table=None,
        label_re=None,
        group_re=None,
        folder_re=FOLDER_RE,
        label_level=None,
        absolute_groups=False,
    )
    return LabelRules(**{**base, **fields})


def test_label_and_group_from_a_label_regex(tmp_path: Path):
    root = tmp_path / "flat"
    label_regex = r"stage(?P<label>\d+)\.tif$"
    rules_ = LabelRules(
        None, re.compile(label_regex), None, re.compile(DEFAULT_LABEL_PATTERN), None, False
    )
    assert label_and_group(root, root / "E2" / "E2_stage5.tif", rules_) == ("5", "E2/E2_stage5.tif")
    assert label_and_group(root, root / "E2" / "x.tif", rules_) == (None, "E2/x.tif")


def test_label_and_group_from_folders_groups_and_a_table(tmp_path: Path):
    root = tmp_path / "lab"
    image = root / "embryo3" / "stage 9-10" / "a.tif"
    # The nearest stage-like folder, and the path below the scanned folder as the group.
    assert label_and_group(root, image, rules()) == ("stage 9-10", "embryo3/stage 9-10/a.tif")
    assert label_and_group(root, image, rules(label_level=2))[0] == "embryo3"
    assert label_and_group(root, root / "misc" / "b.tif", rules())[0] is None
    # A group regex that misses gives no group (never a guess); more folders: absolute groups.
    by_embryo = rules(group_re=re.compile(r"^(?P<group>embryo\d+)/"))
    assert label_and_group(root, image, by_embryo) == ("stage 9-10", "embryo3")
    assert label_and_group(root, root / "x" / "9-10" / "c.tif", by_embryo) == ("9-10", None)
    assert label_and_group(root, image, rules(absolute_groups=True))[1] == image.as_posix()
    # A table's label wins; its group too, unless empty (then the group rules apply).
    table = {image: ("11-12", "e3"), root / "d.tif": ("13-16", None)}
    assert label_and_group(root, image, rules(table=table)) == ("11-12", "e3")
    assert label_and_group(root, root / "d.tif", rules(table=table)) == ("13-16", "d.tif")


def test_read_labels_csv_resolves_paths_and_reads_groups(tmp_path: Path):
    table = tmp_path / "labels.csv"
    table.write_text("path,stage,embryo\nimgs/a.png, 4-6 ,e1\n/abs/b.png,13-16,\n")
    read = read_labels_csv(table, "stage", "embryo")
    assert read == {
        (tmp_path / "imgs" / "a.png").resolve(): ("4-6", "e1"),
        Path("/abs/b.png"): ("13-16", None),
    }
    # Without the group column every group is None.
    without = read_labels_csv(table, "stage", "group")
    assert set(without.values()) == {("4-6", None), ("13-16", None)}
    with pytest.raises(OrganiseError, match="labels CSV not found"):
        read_labels_csv(tmp_path / "nope.csv", "label", "group")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "path,label,group\nimgs/img0.png,4-6,e0\nimgs/img1.png\n",
            r"line 3: no value for column\(s\) \['label', 'group'\]",
        ),
        ("path,label,group\nimgs/img0.png,4-6\n", r"line 2: no value for column\(s\) \['group'\]"),
        (
            "path,label\nimgs/img0.png,4-6,extra\n",
            "line 2: more values than the header has columns",
        ),
        ("path,label\n,4-6\n", "line 2: empty path"),
        (
            'path,label\n"imgs/img0.png,4-6\n',
            r"no value for column\(s\) \['label'\]",
        ),  # unclosed quote
    ],
)
def test_malformed_labels_csv_names_the_file_and_line(tmp_path: Path, text: str, message: str):
    for i in range(2):
        touch(tmp_path / "imgs" / f"img{i}.png")
    table = tmp_path / "labels.csv"
    table.write_text(text)
    with pytest.raises(OrganiseError, match=message) as info:
        read_labels_csv(table, "label", "group")
    assert str(table) in str(info.value)


def test_map_keep_drop_and_patterns_say_what_to_do():
    assert parse_label_map(["stage 11 = 11-12", "misc=13-16"]) == {
        "stage 11": "11-12",
        "misc": "13-16",
    }
    for bad in ("11-12", "=x", "x="):
        with pytest.raises(OrganiseError, match="write it as OLD=NEW"):
            parse_label_map([bad])
    assert parse_label_set(None) is None
    assert parse_label_set(" 1-3, 4-6 ,,") == {"1-3", "4-6"}
    assert compile_named_pattern(r"(?P<label>\d+)", "label", "--label-regex").pattern == (
        r"(?P<label>\d+)"
    )
    with pytest.raises(OrganiseError, match=r"--group-regex .* named group \(\?P<group>"):
        compile_named_pattern(r"(\d+)", "group", "--group-regex")
    with pytest.raises(OrganiseError, match="--label-regex .* not a valid regular expression"):
        compile_named_pattern("stage([", "label", "--label-regex")


def test_default_label_level_takes_a_sure_rule_or_refuses_a_guess(tmp_path: Path):
    root = tmp_path / "lab"

    def found(*rels: str) -> list[tuple[Path, Path]]:
        return [(root, root / rel) for rel in rels]

    assert stage_levels(root / "03" / "9-10" / "x.tif", root, FOLDER_RE) == [1, 2]
    assert stage_levels(root / "g" / "st13" / "x.tif", root, FOLDER_RE) == [1]
    # Some folder looks like a stage: the nearest one, image by image.
    assert default_label_level(found("gene/9-10/x.tif", "gene/other/y.tif"), FOLDER_RE) is None
    # <label>/<images> without stage-like names: that folder.
    assert default_label_level(found("early/x.tif", "late/y.tif"), FOLDER_RE) == 1
    with pytest.raises(OrganiseError, match=r"ambiguous label level: 1 image\(s\) lie below more"):
        default_label_level(found("03/9-10/x.tif", "gene/4-6/y.tif"), FOLDER_RE)
    with pytest.raises(OrganiseError, match=r"level 1: 2 name\(s\) \(early, late\); level 2"):
        default_label_level(found("dif/early/x.tif", "eve/late/y.tif"), FOLDER_RE)


def test_label_records_maps_filters_and_lists_what_is_left_out(tmp_path: Path):
    root = tmp_path / "lab"
    odd = Path(os.fsdecode(os.fsencode(root / "1-3") + b"/caf\xe9.tif"))
    pairs = [
        (root, root / rel)
        for rel in ("1-3/a.tif", "stage 11/b.tif", "13-16/c.tif", "misc/d.tif", "x/4-6/e.tif")
    ] + [(root, odd)]
    ignored: Counter = Counter()
    out = label_records(
        pairs,
        rules(group_re=re.compile(r"^(?P<group>[^/]+)/")),
        ignored,
        mapping={"stage 11": "11-12"},
        drop={"13-16"},
    )
    assert [(r.path.name, r.label, r.group, r.split) for r in out.records] == [
        ("a.tif", "1-3", "1-3", "train"),
        ("b.tif", "11-12", "stage 11", "train"),
        ("e.tif", "4-6", "x", "train"),
    ]
    assert out.mapped == {"stage 11 -> 11-12": 1} and out.dropped == {"13-16": 1}
    assert [p.name for p in out.unlabelled] == ["d.tif"]
    assert out.not_utf8 == [odd] and ignored == {NOT_UTF8: 1}
    kept = label_records(pairs[:3], rules(), Counter(), keep={"1-3"})
    assert [r.label for r in kept.records] == ["1-3"]
    assert kept.dropped == {"stage 11": 1, "13-16": 1}
    # A group regex that misses is listed, not guessed; an image outside the table is counted.
    missed = label_records(pairs[:1], rules(group_re=re.compile(r"^(?P<group>E\d)/")), Counter())
    assert missed.unmatched_groups == [root / "1-3" / "a.tif"] and not missed.records
    ignored = Counter()
    table = {root / "1-3" / "a.tif": ("1-3", "g")}
    in_table = label_records(pairs[:2], rules(table=table), ignored)
    assert [(r.label, r.group) for r in in_table.records] == [("1-3", "g")]
    assert ignored == {"not in the labels CSV": 1}
