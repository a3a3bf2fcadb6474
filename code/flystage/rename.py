"""``--rename``: the top-k stages appended to each file name, with an undo manifest; and undo.

``embryo12.tif -> embryo12__s11-12_s13-16_s9-10.tif``, after writing the old and new names
to the undo manifest (CSV ``old,new``). Symbolic links are skipped: neither they nor their
targets are renamed. A file is never renamed over another one.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flystage.files import CsvWriter, csv_safe, csv_unsafe, open_new, rename_no_replace
from flystage.predictor import Prediction, is_unsure

# What --rename appends: "__s<label>_s<label>_s<label>" before the suffix.
RENAMED_RE = re.compile(r"__s[A-Za-z0-9.+-]+(?:_s[A-Za-z0-9.+-]+)*$")
UNDO_COLUMNS = ("old", "new")


def safe_label(label: str) -> str:
    """A label fit for a file name part: letters, digits, ``.``, ``+`` and ``-`` only (``_``
    separates stages)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", label).strip("-") or "x"


def renamed_path(path: Path, labels: Sequence[str]) -> Path:
    """``embryo12.tif`` + (11-12, 13-16, 9-10) -> ``embryo12__s11-12_s13-16_s9-10.tif``."""
    tag = "_".join(f"s{safe_label(label)}" for label in labels)
    return path.with_name(f"{path.stem}__{tag}{path.suffix}")


def is_renamed(path: Path) -> bool:
    """True when the file name already ends with a ``__s..._s...`` stage tag."""
    return bool(RENAMED_RE.search(path.stem))


LINK_SKIPPED = "symbolic link: not renamed, nor its target (which may be outside the folder)"


@dataclass
class RenameReport:
    renamed: list[tuple[Path, Path]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, why)
    problems: int = 0  # skips the user should look at (not "already renamed" or "no prediction")
    unsure: list[Path] = field(
        default_factory=list
    )  # kept their names on purpose (listed in the CSV)
    links: int = 0  # symbolic links, skipped on purpose (never renamed, nor their targets)

    def skip(self, path: Path, why: str, problem: bool = True) -> None:
        self.skipped.append((path, why))
        self.problems += int(problem)

    def move(self, src: Path, dst: Path) -> None:
        """Rename ``src`` to ``dst`` unless ``dst`` exists; record either outcome."""
        try:
            rename_no_replace(src, dst)
        except FileExistsError:
            self.skip(src, f"{dst.name} already exists")
        except OSError as exc:
            self.skip(src, f"cannot rename: {exc.strerror or exc}")
        else:
            self.renamed.append((src, dst))

    def text(self) -> str:
        kept = (
            f", left {len(self.unsure)} unsure image(s) under their own names"
            if self.unsure
            else ""
        )
        links = f" ({self.links} symbolic link(s), never renamed)" if self.links else ""
        lines = [f"renamed {len(self.renamed)} file(s), skipped {len(self.skipped)}{links}{kept}"]
        lines += [f"  skipped {p}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


def rename_files(
    paths: Sequence[Path],
    predictions: Sequence[Prediction],
    undo_path: str | Path,
    k: int = 3,
    unsure_below: float | None = None,
) -> RenameReport:
    """Append the top-k stages to each file name; write each old->new pair to ``undo_path`` first.

    Never replaces an existing file, skips files already renamed or without a prediction.
    Symbolic links are skipped (counted in ``report.links``, not a problem): renaming through
    a link would rename a file outside the scanned folder and leave the link dangling.
    With ``unsure_below``, an image whose top-1 probability is below it keeps its name
    (counted in ``report.unsure``, not a problem): a name carries only answers the lab accepts.
    The undo manifest (CSV ``old,new``, absolute paths) is flushed before each rename, so a
    crash leaves it valid; it must not exist yet. File names that are not UTF-8 are written
    as their own bytes, so undo restores them exactly.
    """
    report = RenameReport()
    undo_path = Path(undo_path)
    with open_new(undo_path, force=False, errors="surrogateescape") as f:
        writer = CsvWriter(f)
        writer.writerow(UNDO_COLUMNS)
        f.flush()
        for path, prediction in zip(paths, predictions):
            # Not resolve(): that would follow a link to its target, which may be anywhere.
            path = Path(os.path.abspath(path))
            if path.is_symlink():
                report.skip(path, LINK_SKIPPED, problem=False)
                report.links += 1
                continue
            if is_renamed(path):
                report.skip(path, "already renamed", problem=False)
                continue
            if prediction.error or not prediction.top:
                report.skip(path, "no prediction (unreadable image)")
                continue
            if is_unsure(prediction, unsure_below):
                report.unsure.append(path)
                continue
            target = renamed_path(path, [label for label, _ in prediction.top[:k]])
            if os.path.lexists(target):
                report.skip(path, f"{target.name} already exists")
                continue
            writer.writerow([csv_safe(str(path)), csv_safe(str(target))])
            f.flush()
            os.fsync(f.fileno())
            report.move(path, target)
    return report


def undo_renames(undo_path: str | Path) -> RenameReport:
    """Restore the names listed in an undo manifest (last rename first).

    Skips, and reports, files that are no longer at their new name and originals whose name
    has been taken since. When both names are the same file (a rename interrupted between
    its link and its unlink), the new name is removed and the file counts as restored.
    """
    undo_path = Path(undo_path)
    if not undo_path.is_file():
        raise FileNotFoundError(f"{undo_path}: undo manifest not found")
    with open(undo_path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        try:
            if list(reader.fieldnames or []) != list(UNDO_COLUMNS):
                raise ValueError(
                    f"{undo_path}: not an undo manifest (expected columns {','.join(UNDO_COLUMNS)})"
                )
            rows = [
                (Path(csv_unsafe(r["old"])), Path(csv_unsafe(r["new"])))
                for r in reader
                if r["old"] and r["new"]
            ]
        except csv.Error as exc:  # e.g. a field over the csv module's size limit: not one we wrote
            raise ValueError(
                f"{undo_path}: line {reader.line_num}: not a valid undo manifest ({exc})"
            ) from None
    report = RenameReport()
    for old, new in reversed(rows):
        if not os.path.lexists(new):
            if os.path.lexists(old):
                report.skip(new, "already restored", problem=False)
            else:
                report.skip(new, "not found (moved or deleted since the rename)")
        elif os.path.lexists(old):
            if _same_file(old, new):
                # A rename (or an undo) interrupted between link and unlink: both names are
                # the same file, so dropping the new name finishes the undo.
                try:
                    os.unlink(new)
                except OSError as exc:
                    report.skip(
                        new, f"cannot remove this second name of {old.name}: {exc.strerror or exc}"
                    )
                else:
                    report.renamed.append((new, old))
            else:
                report.skip(new, f"{old.name} exists again; restore it by hand")
        else:
            report.move(new, old)
    return report


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are two names of one file (same device and inode, links not
    followed)."""
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
