"""Label and group rules: how an image's path (or a labels CSV) becomes its stage label and
its group, for ``flystage organise`` (:mod:`flystage.organise`).

A label comes from a labels CSV, a regex with a named group ``label`` searched in the path
below the scanned folder, or a folder name (a given level, or the nearest folder that looks
like a stage); a group from the CSV, a regex with a named group ``group``, or the path itself.
Bad rules raise ``OrganiseError``. No torch.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flystage.manifest import Record, cell_path, is_utf8, printable_path, real_path
from flystage.organise_error import OrganiseError

# A folder name that looks like a stage: "11", "13-16", "stage 9-10", "st13", "Stage_4_6".
DEFAULT_LABEL_PATTERN = r"(?i)^(?:stage|st)?[\s_-]*\d{1,2}(?:\s*(?:-|_|to)\s*\d{1,2})?$"
NOT_UTF8 = "name not valid UTF-8 (rename it to include it)"


# ---- options and the labels CSV --------------------------------------------------------------


def parse_label_map(pairs: Sequence[str]) -> dict[str, str]:
    """``--map`` values ``OLD=NEW`` as old label -> new label."""
    mapping = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise OrganiseError(
                f"--map {pair!r}: write it as OLD=NEW, for example --map 'stage 11=11-12'"
            )
        mapping[old.strip()] = new.strip()
    return mapping


def parse_label_set(text: str | None) -> set[str] | None:
    """A ``--keep``/``--drop`` value, comma-separated labels, as a set (``None`` if not given)."""
    if text is None:
        return None
    return {item.strip() for item in text.split(",") if item.strip()}


def compile_named_pattern(pattern: str, group: str, option: str) -> re.Pattern[str]:
    """``pattern`` compiled; ``OrganiseError`` naming ``option`` if it does not compile or has
    no named group ``group``."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise OrganiseError(
            f"{option} {pattern!r} is not a valid regular expression: {exc}"
        ) from None
    if group not in regex.groupindex:
        raise OrganiseError(f"{option} {pattern!r} needs a named group (?P<{group}>...)")
    return regex


def read_labels_csv(
    csv_path: Path, label_column: str, group_column: str
) -> dict[Path, tuple[str, str | None]]:
    """Absolute image path -> (label, group or None) from a CSV with path,label[,group]."""
    if not os.path.isfile(csv_path):
        raise OrganiseError(f"{csv_path}: labels CSV not found")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in ("path", label_column) if c not in columns]
            if missing:
                raise OrganiseError(
                    f"{csv_path}: missing column(s) {missing}; it has {columns}. Give a CSV with "
                    "path,label[,group] or name the columns with --label-column/--group-column"
                )
            table = {}
            for row in reader:
                # A short row leaves its last columns None: say where, do not guess.
                short = [c for c in columns if row.get(c) is None]
                if short or None in row:
                    what = (
                        f"no value for column(s) {short}"
                        if short
                        else "more values than the header has columns"
                    )
                    raise OrganiseError(
                        f"{csv_path}: line {reader.line_num}: {what}; every row needs "
                        f"{len(columns)} comma-separated values ({','.join(columns)})"
                    )
                if not row["path"].strip():
                    raise OrganiseError(f"{csv_path}: line {reader.line_num}: empty path")
                path = cell_path(
                    row["path"].strip(), f"{csv_path}: line {reader.line_num}", OrganiseError
                )
                path = real_path(
                    path if path.is_absolute() else csv_path.parent / path, OrganiseError
                )
                group = (row.get(group_column) or None) if group_column in columns else None
                table[path] = (row[label_column].strip(), group)
    except UnicodeDecodeError as exc:
        raise OrganiseError(
            f"{csv_path}: not UTF-8 text ({exc}); save the labels CSV as UTF-8"
        ) from None
    except csv.Error as exc:
        raise OrganiseError(
            f"{csv_path}: line {reader.line_num}: not a valid CSV ({exc})"
        ) from None
    return table


# ---- folder names as labels -----------------------------------------------------------------


def stage_levels(path: Path, root: Path, pattern: re.Pattern[str]) -> list[int]:
    """Levels (1 = the image's own folder, 2 its parent, ...) of the folders from the image up
    to and including the scanned folder ``root`` whose names look like a stage, nearest first."""
    levels = []
    for level, parent in enumerate(path.parents, start=1):
        if pattern.match(parent.name):
            levels.append(level)
        if parent == root:
            break
    return levels


def _folder_label(
    path: Path, root: Path, level: int | None, pattern: re.Pattern[str]
) -> str | None:
    parents = list(path.parents)
    if level is not None:
        return parents[level - 1].name if level <= len(parents) else None
    levels = stage_levels(path, root, pattern)  # nearest first
    return parents[levels[0] - 1].name if levels else None


def _level_names(found: Sequence[tuple[Path, Path]], most: int = 4) -> str:
    """What each folder level holds, e.g. ``level 1: 6 names (1-3, 4-6, ...); level 2: 11 names
    (Dif, ...)``."""
    names: dict[int, set[str]] = defaultdict(set)
    for root, path in found:
        for level, parent in enumerate(path.parents, start=1):
            if parent == root:
                break
            names[level].add(parent.name)
    return (
        "; ".join(
            f"level {level}: {len(n)} name(s) "
            f"({', '.join(sorted(n)[:most])}{', ...' if len(n) > most else ''})"
            for level, n in sorted(names.items())
        )
        or "no folders below the scanned folder"
    )


def default_label_level(found: Sequence[tuple[Path, Path]], pattern: re.Pattern[str]) -> int | None:
    """The folder rule when no label option is given: ``None`` (the nearest folder that looks
    like a stage), or 1 for a ``<label>/<images>`` tree in which no folder looks like a stage.

    Raises ``OrganiseError`` when that would be a guess: an image below two stage-like folders
    (``03/9-10/x.tif``: which one is the stage?), or a deeper tree without any stage-like
    folder (``<gene>/<label>/x.tif``: which level is the label?). The message lists what each
    level holds and says to give ``label_level`` or ``label_regex``.
    """
    nested = []
    any_stage = False
    for root, path in found:
        levels = stage_levels(path, root, pattern)
        any_stage = any_stage or bool(levels)
        if len(levels) > 1:
            nested.append((path, levels))
    if nested:
        path, levels = nested[0]
        parents = list(path.parents)
        which = ", ".join(f"level {level} {parents[level - 1].name!r}" for level in levels)
        raise OrganiseError(
            f"ambiguous label level: {len(nested)} image(s) lie below more than one folder that "
            f"looks like a stage, e.g. {printable_path(path)} ({which}). Say which folder is the "
            "label: label_level N (--label-level; 1 = the image's own folder, 2 its parent) or "
            "label_regex (--label-regex)"
        )
    if any_stage:
        return None
    if all(path.parent.parent == root for root, path in found):
        return 1  # <label>/<images>: one folder level, nothing to choose
    raise OrganiseError(
        "ambiguous label level: no folder name looks like a stage (e.g. 9-10, stage 11, st13) "
        f"and the images lie more than one folder deep ({_level_names(found)}). Say which folder "
        "is the label: label_level N (--label-level; 1 = the image's own folder, 2 its parent) "
        "or label_regex (--label-regex)"
    )


# ---- one image's label and group ------------------------------------------------------------


@dataclass(frozen=True)
class LabelRules:
    """One :func:`flystage.organise.organise` call's label and group rules, compiled, for
    :func:`label_and_group`.

    ``table`` is the labels CSV (absolute path -> (label, group or None)); ``label_level`` is
    resolved (``None``: the nearest folder matching ``folder_re``); ``absolute_groups``: more
    than one folder was scanned, so an image without a group rule is grouped by its absolute
    path rather than its path below the scanned folder.
    """

    table: dict[Path, tuple[str, str | None]] | None
    label_re: re.Pattern[str] | None
    group_re: re.Pattern[str] | None
    folder_re: re.Pattern[str]
    label_level: int | None
    absolute_groups: bool


def label_and_group(root: Path, path: Path, rules: LabelRules) -> tuple[str | None, str | None]:
    """The label and group of the image ``path`` found under the scanned folder ``root``.

    The label is ``None`` when no rule finds one (the image is unlabelled); the group is
    ``None`` when ``group_regex`` does not match (never guessed: a guess could leak an embryo
    across splits). The image must be in ``rules.table`` when there is one.
    """
    rel = path.relative_to(root).as_posix()
    csv_group = None
    if rules.table is not None:
        label, csv_group = rules.table[path]
    elif rules.label_re is not None:
        m = rules.label_re.search(rel)
        label = m.group("label") if m and m.group("label") else None
    else:
        label = _folder_label(path, root, rules.label_level, rules.folder_re)
    if csv_group:
        group = csv_group
    elif rules.group_re is not None:
        m = rules.group_re.search(rel)
        group = m.group("group") if m and m.group("group") else None
    else:
        group = path.as_posix() if rules.absolute_groups else rel
    return label or None, group


@dataclass
class LabelledImages:
    """What :func:`label_records` kept and left out."""

    records: list[Record] = field(default_factory=list)
    unlabelled: list[Path] = field(default_factory=list)
    mapped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    unmatched_groups: list[Path] = field(default_factory=list)
    not_utf8: list[Path] = field(default_factory=list)


def label_records(
    found: Sequence[tuple[Path, Path]],
    rules: LabelRules,
    ignored: Counter,
    mapping: dict[str, str] | None = None,
    keep: set[str] | None = None,
    drop: set[str] | None = None,
) -> LabelledImages:
    """Label, map, filter and group every found (scanned folder, image path) pair: ``mapping``
    renames labels, then only ``keep`` (if given) and not ``drop`` stay. What is left out is
    counted in ``ignored`` (not UTF-8, not in the labels CSV) or listed in the result."""
    out = LabelledImages()
    mapping = mapping or {}
    for root, path in found:
        if not is_utf8(path):
            # The manifest is UTF-8 text: a name that is not cannot be written into it (or
            # read back by every later stage). Skipped, counted and listed, never guessed.
            ignored[NOT_UTF8] += 1
            out.not_utf8.append(path)
            continue
        if rules.table is not None and path not in rules.table:
            ignored["not in the labels CSV"] += 1
            continue
        label, group = label_and_group(root, path, rules)
        if not label:
            out.unlabelled.append(path)
            continue
        if label in mapping:
            out.mapped[f"{label} -> {mapping[label]}"] += 1
            label = mapping[label]
        if (keep is not None and label not in keep) or (drop is not None and label in drop):
            out.dropped[label] += 1
            continue
        if group is None:
            out.unmatched_groups.append(path)
            continue
        out.records.append(Record(path=path, label=label, group=group, split="train", sha1=""))
    return out
