"""Organise lab image folders into one manifest CSV with a grouped, stratified split.

``flystage organise FOLDER [FOLDER ...] --out manifest.csv`` walks the folders as a lab
shares them (nested, mixed formats, stray files, notebook checkpoint folders), takes each
image's stage label from its folder name, a filename pattern or a CSV, maps and drops labels,
removes exact duplicates by content hash, and splits into train/valid/test so that every group
(an embryo, a gene, a session) lies in one split only.

The manifest it writes (``path,label,group,split,sha1``) is the contract every later stage
reads: ``flystage.manifest``; see ``docs/architecture.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import random
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flystage import formats
from flystage.manifest import (
    SPLITS,
    ManifestError,
    Record,
    cell_path,
    file_sha1,
    is_utf8,
    printable_path,
    real_path,
    sort_labels,
    write_manifest,
)

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
# A folder name that looks like a stage: "11", "13-16", "stage 9-10", "st13", "Stage_4_6".
DEFAULT_LABEL_PATTERN = r"(?i)^(?:stage|st)?[\s_-]*\d{1,2}(?:\s*(?:-|_|to)\s*\d{1,2})?$"
# Folders a lab's tools leave behind that never hold training images.
JUNK_FOLDERS = {".ipynb_checkpoints": "checkpoint folder", "__MACOSX": "__MACOSX folder"}


class OrganiseError(ManifestError):
    """Bad input to organise (folders, labels CSV, label, group and split options); the message
    says what to do. A ``ManifestError``: catching that catches both."""


# ---- scanning ------------------------------------------------------------------------------


def _ignore_reason(name: str, is_dir: bool) -> str | None:
    if name in JUNK_FOLDERS and is_dir:
        return JUNK_FOLDERS[name]
    if name.startswith("."):
        return "hidden folder" if is_dir else "hidden file"
    return None


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


NOT_A_FILE = "not a regular file (a FIFO, a device, or a broken or looping link)"


def _scan(folders: Iterable[str | Path]) -> tuple[list[tuple[Path, Path]], Counter]:
    """(root, image path) pairs in a stable sorted order, and ignored-file counts by reason."""
    found: list[tuple[Path, Path]] = []
    ignored: Counter = Counter()
    for folder in folders:
        root = real_path(folder, OrganiseError)
        if root.is_file():
            # A single file given directly: kept if it is an image.
            if formats.by_suffix(root.suffix) is not None:
                found.append((root.parent, root))
            else:
                ignored[f"not an image ({root.suffix.lower() or 'no suffix'})"] += 1
            continue
        if not root.is_dir():
            raise OrganiseError(f"{root}: no such folder; give the folder that holds the images")
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            kept_dirs = []
            for d in sorted(dirnames):
                reason = _ignore_reason(d, is_dir=True)
                if reason:
                    # Count what we skip, so "where did my images go" has an answer.
                    ignored[f"in {reason}"] += _count_files(here / d)
                else:
                    kept_dirs.append(d)
            dirnames[:] = kept_dirs
            for name in sorted(filenames):
                reason = _ignore_reason(name, is_dir=False)
                suffix = Path(name).suffix.lower()
                if reason:
                    ignored[reason] += 1
                elif formats.by_suffix(suffix) is None:
                    ignored[f"not an image ({suffix or 'no suffix'})"] += 1
                elif not os.path.isfile(here / name):
                    # Reading a FIFO or a device never ends; a broken or looping link cannot be
                    # read.
                    ignored[NOT_A_FILE] += 1
                else:
                    found.append((root, here / name))
    return found, ignored


def iter_images(folders: Iterable[str | Path]) -> tuple[list[Path], Counter]:
    """Every image file under ``folders`` (recursive, sorted), and counts of what was ignored.

    Images are files ending in a suffix of :mod:`flystage.formats`' table (any case):
    .tif/.tiff/.png/.bmp/.jpg/.jpeg unless more formats are registered. Hidden files and
    folders, ``.ipynb_checkpoints`` and ``__MACOSX`` are skipped. A path that is itself an
    image file is kept as is.
    """
    found, ignored = _scan(folders)
    return [path for _, path in found], ignored


NOT_UTF8 = "name not valid UTF-8 (rename it to include it)"


# ---- labels ----------------------------------------------------------------------------------


def _parse_map(pairs: Sequence[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise OrganiseError(
                f"--map {pair!r}: write it as OLD=NEW, for example --map 'stage 11=11-12'"
            )
        mapping[old.strip()] = new.strip()
    return mapping


def _split_list(text: str | None) -> set[str] | None:
    if text is None:
        return None
    return {item.strip() for item in text.split(",") if item.strip()}


def _compile(pattern: str, group: str, option: str) -> re.Pattern[str]:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise OrganiseError(
            f"{option} {pattern!r} is not a valid regular expression: {exc}"
        ) from None
    if group not in regex.groupindex:
        raise OrganiseError(f"{option} {pattern!r} needs a named group (?P<{group}>...)")
    return regex


def _read_labels_csv(
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


# ---- split -----------------------------------------------------------------------------------


def split_groups(
    group_labels: dict[str, Counter], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """Assign each group to a split so that every split's label counts approach its fraction.

    ``group_labels`` maps group -> Counter of labels. Groups are visited largest first (a
    seeded shuffle orders groups of equal size); each goes to the split where it most reduces
    the squared shortfall from the target counts, per label (weighted by 1 / label total, so
    rare stages count as much as common ones) and in total. Returns group -> split.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise OrganiseError(
            f"split fractions {list(fractions)}: give three non-negative numbers, e.g. "
            "0.7,0.15,0.15"
        )
    total_f = sum(fractions)
    fractions = [f / total_f for f in fractions]
    label_totals: Counter = Counter()
    for counts in group_labels.values():
        label_totals.update(counts)
    n = sum(label_totals.values())
    target = [{label: f * t for label, t in label_totals.items()} for f in fractions]
    current: list[Counter] = [Counter() for _ in SPLITS]
    size = [0] * len(SPLITS)

    order = sorted(group_labels)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -sum(group_labels[g].values()))  # stable: shuffle breaks ties

    assignment: dict[str, str] = {}
    for g in order:
        counts = group_labels[g]
        g_size = sum(counts.values())
        best, best_cost = None, math.inf
        for s, f in enumerate(fractions):
            if f == 0:
                continue
            # Change in sum of squared (current - target) if g joins split s.
            cost = sum(
                k * (k + 2 * (current[s][label] - target[s][label])) / label_totals[label]
                for label, k in counts.items()
            )
            cost += g_size * (g_size + 2 * (size[s] - f * n)) / n
            if cost < best_cost - 1e-12:
                best, best_cost = s, cost
        assignment[g] = SPLITS[best]
        current[best].update(counts)
        size[best] += g_size

    # A split with a share must not end up empty when another split can spare a group.
    for s, f in enumerate(fractions):
        members = [g for g, sp in assignment.items() if sp == SPLITS[s]]
        if f > 0 and not members:
            by_split = Counter(assignment.values())
            donor = max(by_split, key=lambda sp: by_split[sp])
            if by_split[donor] > 1:
                smallest = min(
                    (g for g, sp in assignment.items() if sp == donor),
                    key=lambda g: (sum(group_labels[g].values()), order.index(g)),
                )
                assignment[smallest] = SPLITS[s]
    return assignment


# ---- organise --------------------------------------------------------------------------------


@dataclass
class OrganiseResult:
    """The records to write and what happened to every file that was left out."""

    records: list[Record]
    ignored: Counter  # reason -> file count (not images, hidden, checkpoints)
    unlabelled: list[Path]
    mapped: Counter  # "old -> new" -> count
    dropped: Counter  # label -> count removed by --keep/--drop
    duplicates: list[tuple[Path, list[Path]]]  # (kept, removed copies with the same label)
    conflicts: list[tuple[str, list[tuple[Path, str]]]]  # (sha1, [(path, label)]) all dropped
    not_utf8: list[Path] = field(default_factory=list)  # skipped: names that are not UTF-8


SPLIT_MODES = ("stratified", "none")


@dataclass(frozen=True)
class OrganiseOptions:
    """How :func:`organise` labels, groups, filters and splits images (``flystage organise``'s
    options); validated on construction (``OrganiseError`` naming the option).

    Labels come from ``labels_csv`` if given (its ``label_column``), else ``label_regex``
    (named group ``label``, searched in the path relative to its scanned folder), else the
    folder name (the ``label_level``-th parent, or the nearest ancestor matching
    ``label_pattern``; when the latter is a guess, :func:`default_label_level` refuses).
    Groups come from the CSV's ``group_column``, else ``group_regex`` (named group ``group``),
    else each image is its own group. ``mapping`` renames labels, then ``keep``/``drop``
    filter them. ``split`` is ``"stratified"`` (by ``fractions`` train, valid, test, group
    order shuffled with ``seed``) or ``"none"`` (all train, for cross-validation).
    """

    label_level: int | None = None
    label_pattern: str = DEFAULT_LABEL_PATTERN
    label_regex: str | None = None
    labels_csv: str | Path | None = None
    label_column: str = "label"
    group_column: str = "group"
    group_regex: str | None = None
    mapping: dict[str, str] | None = None
    keep: set[str] | None = None
    drop: set[str] | None = None
    split: str = "stratified"
    fractions: Sequence[float] = DEFAULT_FRACTIONS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLIT_MODES:
            raise OrganiseError(f"split {self.split!r}: use 'stratified' or 'none'")
        if self.label_level is not None and self.label_level < 1:
            raise OrganiseError(
                f"--label-level {self.label_level}: 1 is the image's own folder, 2 its parent, ..."
            )
        self.patterns()  # every regular expression compiles and has its named group

    def patterns(self) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None, re.Pattern[str]]:
        """The compiled ``label_regex``, ``group_regex`` (``None`` when not given) and
        ``label_pattern``."""
        label_re = (
            _compile(self.label_regex, "label", "--label-regex") if self.label_regex else None
        )
        group_re = (
            _compile(self.group_regex, "group", "--group-regex") if self.group_regex else None
        )
        try:
            folder_re = re.compile(self.label_pattern)
        except re.error as exc:
            raise OrganiseError(
                f"--label-pattern {self.label_pattern!r} is not a valid regular expression: {exc}"
            ) from None
        return label_re, group_re, folder_re


@dataclass(frozen=True)
class LabelRules:
    """One :func:`organise` call's label and group rules, compiled, for :func:`label_and_group`.

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
class _Labelled:
    """What :func:`_label_records` kept and left out."""

    records: list[Record] = field(default_factory=list)
    unlabelled: list[Path] = field(default_factory=list)
    mapped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    unmatched_groups: list[Path] = field(default_factory=list)
    not_utf8: list[Path] = field(default_factory=list)


def _label_records(
    found: Sequence[tuple[Path, Path]],
    rules: LabelRules,
    options: OrganiseOptions,
    ignored: Counter,
) -> _Labelled:
    """Label, map, filter and group every found image; what is left out is counted in
    ``ignored`` (not UTF-8, not in the labels CSV) or listed in the result."""
    out = _Labelled()
    mapping = options.mapping or {}
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
        if (options.keep is not None and label not in options.keep) or (
            options.drop is not None and label in options.drop
        ):
            out.dropped[label] += 1
            continue
        if group is None:
            out.unmatched_groups.append(path)
            continue
        out.records.append(Record(path=path, label=label, group=group, split="train", sha1=""))
    return out


def _assign_splits(records: Sequence[Record], options: OrganiseOptions) -> None:
    if options.split == "none":
        for r in records:
            r.split = "train"
        return
    per_group: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        per_group[r.group][r.label] += 1
    assignment = split_groups(per_group, options.fractions, options.seed)
    for r in records:
        r.split = assignment[r.group]


def organise(
    folders: Sequence[str | Path], options: OrganiseOptions | None = None, **overrides: Any
) -> OrganiseResult:
    """Scan ``folders`` and return labelled, de-duplicated, split records (nothing is written).

    ``options`` (:class:`OrganiseOptions`, default all defaults) says how; keyword arguments
    named like its fields replace those fields, e.g. ``organise([root], group_regex=...)``.
    """
    options = dataclasses.replace(options or OrganiseOptions(), **overrides)
    label_re, group_re, folder_re = options.patterns()
    table = (
        _read_labels_csv(
            real_path(options.labels_csv, OrganiseError), options.label_column, options.group_column
        )
        if options.labels_csv
        else None
    )

    found, ignored = _scan(folders)
    if not found:
        raise OrganiseError(
            f"no images (.tif/.tiff/.png/.bmp/.jpg/.jpeg) under {', '.join(map(str, folders))}; "
            f"ignored: {dict(ignored) or 'nothing'}"
        )
    label_level = options.label_level
    if table is None and label_re is None and label_level is None:
        label_level = default_label_level(found, folder_re)
    rules = LabelRules(
        table, label_re, group_re, folder_re, label_level, absolute_groups=len(folders) != 1
    )
    labelled = _label_records(found, rules, options, ignored)

    if labelled.unmatched_groups:
        # Guessing a group could leak an embryo across splits: stop and say which files.
        shown = "\n  ".join(str(p) for p in labelled.unmatched_groups[:10])
        raise OrganiseError(
            f"--group-regex {options.group_regex!r} did not match "
            f"{len(labelled.unmatched_groups)} image path(s), e.g.\n  {shown}\nFix the pattern "
            "(it is searched in the path relative to the scanned folder) or move those files."
        )
    if not labelled.records:
        raise OrganiseError(
            f"no labelled images left ({len(labelled.unlabelled)} without a label, dropped "
            f"{dict(labelled.dropped)}"
            + (
                f", {len(labelled.not_utf8)} with a name not valid UTF-8"
                if labelled.not_utf8
                else ""
            )
            + "); check --label-level/--label-regex/--labels-csv and --keep/--drop"
        )

    records, duplicates, conflicts = _deduplicate(labelled.records)
    if not records:
        raise OrganiseError("every image was a duplicate with conflicting labels; nothing to write")
    _assign_splits(records, options)
    return OrganiseResult(
        records,
        ignored,
        labelled.unlabelled,
        labelled.mapped,
        labelled.dropped,
        duplicates,
        conflicts,
        labelled.not_utf8,
    )


def _deduplicate(records: list[Record]) -> tuple[list[Record], list, list]:
    """Keep the first of identical files; drop every copy when copies disagree on the label."""
    by_sha: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        r.sha1 = file_sha1(r.path)
        by_sha[r.sha1].append(r)
    kept, duplicates, conflicts = [], [], []
    for sha1, copies in by_sha.items():
        if len({c.label for c in copies}) > 1:
            conflicts.append((sha1, [(c.path, c.label) for c in copies]))
            continue
        kept.append(copies[0])
        if len(copies) > 1:
            duplicates.append((copies[0].path, [c.path for c in copies[1:]]))
    kept.sort(key=lambda r: r.path.as_posix())
    return kept, duplicates, conflicts


# ---- reporting -------------------------------------------------------------------------------


def summary_table(records: Sequence[Record]) -> str:
    """A text table: one row per split, one column per label (stage order), groups, total."""
    labels = sort_labels(r.label for r in records)
    counts: dict[str, Counter] = defaultdict(Counter)
    groups: dict[str, set[str]] = defaultdict(set)
    for r in records:
        counts[r.split][r.label] += 1
        groups[r.split].add(r.group)
    header = ["split", *labels, "images", "groups"]
    rows = [header]
    for s in SPLITS:
        if counts[s]:
            rows.append(
                [
                    s,
                    *(str(counts[s][label]) for label in labels),
                    str(sum(counts[s].values())),
                    str(len(groups[s])),
                ]
            )
    all_groups = {r.group for r in records}
    rows.append(
        [
            "all",
            *(str(sum(c[label] for c in counts.values())) for label in labels),
            str(len(records)),
            str(len(all_groups)),
        ]
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def report_text(result: OrganiseResult) -> str:
    """What was kept, ignored, mapped, dropped and de-duplicated, in a few lines."""
    return "\n".join([*report_lines(result), summary_table(result.records)])


def report_lines(result: OrganiseResult) -> list[str]:
    """``report_text`` without the table: what was ignored, mapped, dropped and de-duplicated."""
    lines = []
    if result.ignored:
        lines.append(
            "ignored files: " + ", ".join(f"{n} {why}" for why, n in sorted(result.ignored.items()))
        )
    for path in result.not_utf8:
        lines.append(f"skipped: {printable_path(path)}: {NOT_UTF8}")
    if result.unlabelled:
        lines.append(
            f"no label found for {len(result.unlabelled)} image(s), e.g. "
            f"{printable_path(result.unlabelled[0])}"
        )
    for change, n in sorted(result.mapped.items()):
        lines.append(f"mapped {change}: {n}")
    if result.dropped:
        lines.append(
            "dropped out-of-scope labels: "
            + ", ".join(f"{label} ({n})" for label, n in sorted(result.dropped.items()))
        )
    for kept, removed in result.duplicates:
        lines.append(f"duplicate: kept {kept}, removed {', '.join(map(str, removed))}")
    for sha1, copies in result.conflicts:
        lines.append(
            f"conflict: identical files with different labels, all dropped (sha1 {sha1[:12]}): "
            + ", ".join(f"{p} [{label}]" for p, label in copies)
        )
    return lines


# ---- command line ----------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "folders",
        nargs="+",
        type=Path,
        help=(
            "folders to scan recursively; an image whose name is not valid UTF-8 is skipped, "
            "listed and counted in the summary (the manifest is UTF-8: rename such files to "
            "include them)"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("manifest.csv"),
        help="manifest CSV to write (default manifest.csv)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing manifest")
    how = parser.add_argument_group(
        "labels (default: the nearest folder whose name looks like a stage)"
    )
    how.add_argument(
        "--label-level",
        type=int,
        help="take the label from the N-th folder up (1 = the image's own folder)",
    )
    how.add_argument(
        "--label-pattern",
        default=DEFAULT_LABEL_PATTERN,
        help="regex a folder name must match to be a label",
    )
    how.add_argument(
        "--label-regex",
        help="regex with a named group 'label', searched in the path below the scanned folder",
    )
    how.add_argument(
        "--labels-csv",
        type=Path,
        help="CSV with path,label[,group] (paths relative to the CSV's folder)",
    )
    how.add_argument(
        "--label-column", default="label", help="label column of --labels-csv (default label)"
    )
    how.add_argument(
        "--group-column", default="group", help="group column of --labels-csv (default group)"
    )
    how.add_argument(
        "--map", action="append", default=[], metavar="OLD=NEW", help="rename a label (repeatable)"
    )
    how.add_argument(
        "--keep", help="comma-separated labels to keep (after --map); others are dropped"
    )
    how.add_argument("--drop", help="comma-separated labels to drop (after --map)")
    sp = parser.add_argument_group("groups and split")
    sp.add_argument(
        "--group-regex",
        help=(
            "regex with a named group 'group' on the path below the scanned folder, e.g. "
            "'^(?P<group>[^/]+)/'"
        ),
    )
    sp.add_argument(
        "--split",
        choices=["stratified", "none"],
        default="stratified",
        help="'none' marks every image train (for crossval)",
    )
    sp.add_argument(
        "--fractions",
        default="0.7,0.15,0.15",
        help="train,valid,test fractions (default 0.7,0.15,0.15)",
    )
    sp.add_argument("--seed", type=int, default=0, help="seed of the group order (default 0)")


def run(args: argparse.Namespace) -> int:
    try:
        fractions = [float(x) for x in args.fractions.split(",")]
    except ValueError:
        print(
            f"error: --fractions {args.fractions!r}: give three numbers such as 0.7,0.15,0.15",
            file=sys.stderr,
        )
        return 2
    try:
        if args.out.exists() and not args.force:
            raise OrganiseError(
                f"{args.out} already exists; choose another --out or pass --force to replace it"
            )
        options = OrganiseOptions(
            label_level=args.label_level,
            label_pattern=args.label_pattern,
            label_regex=args.label_regex,
            labels_csv=args.labels_csv,
            label_column=args.label_column,
            group_column=args.group_column,
            group_regex=args.group_regex,
            mapping=_parse_map(args.map),
            keep=_split_list(args.keep),
            drop=_split_list(args.drop),
            split=args.split,
            fractions=fractions,
            seed=args.seed,
        )
        result = organise(args.folders, options)
        out = write_manifest(result.records, args.out, force=args.force)
    except ManifestError as exc:  # OrganiseError is one
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report_text(result))
    print(
        f"wrote {out} ({len(result.records)} images, {len({r.group for r in result.records})} "
        "groups)"
    )
    return 0
