"""Organise lab image folders into one manifest CSV with a grouped, stratified split.

``flystage organise FOLDER [FOLDER ...] --out manifest.csv`` walks the folders as a lab
shares them (nested, mixed formats, stray files, notebook checkpoint folders), takes each
image's stage label from its folder name, a filename pattern or a CSV, maps and drops labels,
removes exact duplicates by content hash, and splits into train/valid/test so that every group
(an embryo, a gene, a session) lies in one split only.

Here: the folder walk, :func:`organise` (walk, label, de-duplicate, split), its report and the
command. The label and group rules are :mod:`flystage.labels`, the split
:mod:`flystage.splitting`. The manifest it writes (``path,label,group,split,sha1``) is the
contract every later stage reads: ``flystage.manifest``; see ``docs/architecture.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flystage import formats
from flystage.labels import (
    DEFAULT_LABEL_PATTERN,
    NOT_UTF8,
    LabelRules,
    compile_named_pattern,
    default_label_level,
    label_records,
    parse_label_map,
    parse_label_set,
    read_labels_csv,
)
from flystage.manifest import (
    SPLITS,
    Record,
    file_sha1,
    printable_path,
    real_path,
    sort_labels,
    write_manifest,
)
from flystage.organise_error import OrganiseError
from flystage.splitting import DEFAULT_FRACTIONS, SPLIT_MODES, assign_splits

# Folders a lab's tools leave behind that never hold training images.
JUNK_FOLDERS = {".ipynb_checkpoints": "checkpoint folder", "__MACOSX": "__MACOSX folder"}


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


@dataclass(frozen=True)
class OrganiseOptions:
    """How :func:`organise` labels, groups, filters and splits images (``flystage organise``'s
    options); validated on construction (``OrganiseError`` naming the option).

    Labels come from ``labels_csv`` if given (its ``label_column``), else ``label_regex``
    (named group ``label``, searched in the path relative to its scanned folder), else the
    folder name (the ``label_level``-th parent, or the nearest ancestor matching
    ``label_pattern``; when the latter is a guess,
    :func:`flystage.labels.default_label_level` refuses).
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
            compile_named_pattern(self.label_regex, "label", "--label-regex")
            if self.label_regex
            else None
        )
        group_re = (
            compile_named_pattern(self.group_regex, "group", "--group-regex")
            if self.group_regex
            else None
        )
        try:
            folder_re = re.compile(self.label_pattern)
        except re.error as exc:
            raise OrganiseError(
                f"--label-pattern {self.label_pattern!r} is not a valid regular expression: {exc}"
            ) from None
        return label_re, group_re, folder_re


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
        read_labels_csv(
            real_path(options.labels_csv, OrganiseError), options.label_column, options.group_column
        )
        if options.labels_csv
        else None
    )

    found, ignored = _scan(folders)
    if not found:
        raise OrganiseError(
            f"no images ({formats.suffix_text()}) under {', '.join(map(str, folders))}; "
            f"ignored: {dict(ignored) or 'nothing'}"
        )
    label_level = options.label_level
    if table is None and label_re is None and label_level is None:
        label_level = default_label_level(found, folder_re)
    rules = LabelRules(
        table, label_re, group_re, folder_re, label_level, absolute_groups=len(folders) != 1
    )
    labelled = label_records(
        found, rules, ignored, mapping=options.mapping, keep=options.keep, drop=options.drop
    )

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
    assign_splits(records, options.split, options.fractions, options.seed)
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
        raise OrganiseError(
            f"--fractions {args.fractions!r}: give three numbers such as 0.7,0.15,0.15"
        ) from None
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
        mapping=parse_label_map(args.map),
        keep=parse_label_set(args.keep),
        drop=parse_label_set(args.drop),
        split=args.split,
        fractions=fractions,
        seed=args.seed,
    )
    result = organise(args.folders, options)
    out = write_manifest(result.records, args.out, force=args.force)
    print(report_text(result))
    print(
        f"wrote {out} ({len(result.records)} images, {len({r.group for r in result.records})} "
        "groups)"
    )
    return 0
