"""The manifest: the CSV (``path,label,group,split,sha1``) that ``flystage organise`` writes
and every later stage reads; see ``docs/architecture.md``.

``Record`` is one row; ``read_manifest``/``write_manifest`` are the one reader and writer;
``sort_labels`` is the stage order of labels; ``file_sha1``/``manifest_sha256`` the hashes;
``ManifestError`` the one error. No torch, and nothing of organise (which imports this).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flystage.errors import FlystageError
from flystage.files import CsvWriter, atomic_write

SPLITS = ("train", "valid", "test")
MANIFEST_COLUMNS = ("path", "label", "group", "split", "sha1")


class ManifestError(FlystageError, ValueError):
    """A manifest that cannot be read or written, or a path that cannot be used; the message
    says what to do. ``flystage.organise_error.OrganiseError`` is one too."""


@dataclass
class Record:
    """One image of a manifest. ``path`` is absolute once read or organised."""

    path: Path
    label: str
    group: str
    split: str
    sha1: str
    extra: dict[str, str] = field(default_factory=dict)


# ---- paths and hashes ------------------------------------------------------------------------


def is_utf8(text: str | Path) -> bool:
    """False for a path or text whose bytes are not UTF-8 (Python holds them as surrogate
    escapes)."""
    try:
        str(text).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: str | Path) -> str:
    """``path`` as text safe to print or write: bytes that are not UTF-8 shown as ``\\xe9``."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def file_sha1(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-1 of a file's bytes (exact-duplicate detection; matches BDGP's labels.csv)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def real_path(path: str | Path, error: type[ManifestError] = ManifestError) -> Path:
    """``path`` made absolute with ``~`` expanded and links resolved, like ``Path.resolve()`` but
    never raising on a link loop (left as it is: it is then no file); ``error`` for an unknown
    ``~user`` or a NUL byte (organise passes ``OrganiseError`` for its own inputs)."""
    text = os.fspath(path)
    if "\0" in text:
        raise error(f"{printable_path(text)!r}: a path cannot contain a NUL byte")
    try:
        return Path(os.path.realpath(Path(text).expanduser()))
    except RuntimeError as exc:  # ~user that does not exist
        raise error(f"{text!r}: {exc}") from None


def cell_path(text: str, where: str, error: type[ManifestError] = ManifestError) -> Path:
    """The path in a CSV cell, ``~`` expanded (not resolved); ``error`` naming ``where`` (file
    and line) for a NUL byte or an unknown ``~user``."""
    if "\0" in text:
        raise error(f"{where}: the path {text!r} contains a NUL byte")
    try:
        return Path(text).expanduser()
    except RuntimeError as exc:
        raise error(f"{where}: cannot expand {text!r} ({exc})") from None


def manifest_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the manifest file's bytes (recorded in the model artefact)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ---- labels ----------------------------------------------------------------------------------


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Unique labels in stage order: by the first number in the label, then by text.

    ``["13-16", "1-3", "9-10", "4-6"] -> ["1-3", "4-6", "9-10", "13-16"]``; labels without a
    number come last, alphabetically.
    """

    def key(label: str) -> tuple[float, str]:
        m = re.search(r"\d+", label)
        return (int(m.group()) if m else math.inf, label)

    return sorted(set(labels), key=key)


# ---- reading and writing ----------------------------------------------------------------------


def _manifest_path_text(path: Path, folder: Path) -> str:
    try:
        return path.resolve().relative_to(folder).as_posix()
    except ValueError:
        return str(path.resolve())


def write_manifest(records: Sequence[Record], path: str | Path, force: bool = False) -> Path:
    """Write ``records`` as a manifest CSV; image paths below its folder are made relative.

    Refuses (``ManifestError``) to replace an existing file unless ``force``, and refuses text
    that is not valid UTF-8. Written to a temporary file in the same folder and renamed over
    the manifest when complete; on any failure the temporary file is removed, so a crash never
    leaves half a manifest or a stray ``.tmp``. Returns the manifest path.
    """
    path = Path(path).expanduser().resolve()
    if path.exists() and not force:
        raise ManifestError(
            f"{path} already exists; choose another --out or pass --force to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    extra_columns = sorted({k for r in records for k in r.extra} - set(MANIFEST_COLUMNS))
    rows = [
        [_manifest_path_text(r.path, path.parent), r.label, r.group, r.split, r.sha1]
        + [r.extra.get(c, "") for c in extra_columns]
        for r in records
    ]
    for row in rows:
        bad = [cell for cell in row if not is_utf8(cell)]
        if bad:
            raise ManifestError(
                f"{path}: cannot write {printable_path(bad[0])}: not valid UTF-8 (a manifest is "
                "UTF-8 text); rename the file"
            )
    # Whole or not at all: a crash never leaves half a manifest or a stray temporary file.
    with atomic_write(path) as f:
        writer = CsvWriter(f)
        writer.writerow([*MANIFEST_COLUMNS, *extra_columns])
        for row in rows:
            writer.writerow(row)
    return path


def _manifest_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The manifest's columns and its (line number, row) pairs; every column required."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in MANIFEST_COLUMNS if c not in columns]
            if missing:
                raise ManifestError(
                    f"{path}: missing column(s) {missing}; a manifest has "
                    f"{','.join(MANIFEST_COLUMNS)} (make one with `flystage organise`)"
                )
            rows = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{path}: not UTF-8 text ({exc}); a manifest is UTF-8 (make one with `flystage "
            "organise`)"
        ) from None
    except csv.Error as exc:
        raise ManifestError(
            f"{path}: not a valid CSV ({exc}); make one with `flystage organise`"
        ) from None
    return columns, rows


def _refuse_bad_rows(
    path: Path,
    records: list[Record],
    escaping: list[str],
    bad_split: list[str],
    missing_files: list[str],
) -> None:
    """Raise ``ManifestError`` for the rows found wrong, or for a group in two splits."""
    if escaping:
        raise ManifestError(
            f"{path}: relative path(s) that leave the manifest's folder {path.parent} through "
            "'..': "
            + "; ".join(escaping[:10])
            + (f" and {len(escaping) - 10} more" if len(escaping) > 10 else "")
            + (
                ". List images below the manifest's folder, or by absolute path (organise writes "
                "both)"
            )
        )
    if bad_split:
        raise ManifestError(
            f"{path}: split must be one of {', '.join(SPLITS)}; found "
            + "; ".join(bad_split[:10])
            + (f" and {len(bad_split) - 10} more" if len(bad_split) > 10 else "")
        )
    if missing_files:
        raise ManifestError(
            f"{path}: {len(missing_files)} image(s) listed but not found, e.g.\n  "
            + "\n  ".join(missing_files[:10])
            + "\nMove the manifest with its images, or organise again."
        )
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for r in records:
        splits_of_group[r.group].add(r.split)
    leaking = sorted(g for g, s in splits_of_group.items() if len(s) > 1)
    if leaking:
        raise ManifestError(
            f"{path}: group(s) {leaking[:10]} appear in more than one split; organise again"
        )


def read_manifest(path: str | Path, check_files: bool = True) -> list[Record]:
    """Records of a manifest CSV, with image paths resolved against the manifest's folder.

    Raises ``ManifestError`` for a missing file, missing columns, an empty manifest, a short
    row, bad split values, a relative path that leaves the manifest's folder through ``..``,
    (with ``check_files``) images that do not exist, a group in two splits, or one image in
    two splits (the same file once resolved, or the same SHA-1 where the column holds a
    40-digit hex SHA-1); the message names the rows.
    """
    path = real_path(path)
    if not os.path.isfile(path):
        raise ManifestError(f"{path}: manifest not found; make one with `flystage organise`")
    columns, rows = _manifest_rows(path)
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows")
    records, bad_split, missing_files, escaping, lines = [], [], [], [], []
    for line, row in rows:
        short = [c for c in columns if row.get(c) is None]
        if short:
            raise ManifestError(
                f"{path}: line {line}: no value for column(s) {short}; every row needs "
                f"{len(columns)} values"
            )
        image = cell_path(row["path"], f"{path}: line {line}")
        if not image.is_absolute():
            image = path.parent / image
            # Relative paths name images below the manifest's folder; '..' must not lead out.
            if not Path(os.path.normpath(image)).is_relative_to(path.parent):
                escaping.append(f"line {line}: {row['path']!r}")
        if row["split"] not in SPLITS:
            bad_split.append(f"line {line}: {row['split']!r}")
        if not row["label"]:
            raise ManifestError(f"{path}: line {line} has an empty label")
        if check_files and not os.path.isfile(image):
            missing_files.append(str(image))
        extra = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS and k is not None}
        records.append(Record(image, row["label"], row["group"], row["split"], row["sha1"], extra))
        lines.append(line)
    _refuse_bad_rows(path, records, escaping, bad_split, missing_files)
    _refuse_images_in_two_splits(path, records, lines)
    return records


_SHA1 = re.compile(r"[0-9a-f]{40}")


def _refuse_images_in_two_splits(
    path: Path, records: Sequence[Record], lines: Sequence[int]
) -> None:
    """``ManifestError`` naming both rows when one image (the same file once resolved, or the
    same SHA-1 where the column holds one) is listed in two splits: it would be tested on
    what it was trained on. Repeats within one split are left alone."""
    first: dict[tuple[str, str], tuple[int, Record]] = {}
    leaks = []
    for line, r in zip(lines, records):
        keys = [("file", os.path.realpath(r.path))]
        sha1 = r.sha1.strip().lower()
        if _SHA1.fullmatch(sha1):
            keys.append(("sha1", sha1))
        for key in keys:
            seen = first.setdefault(key, (line, r))
            if seen[1].split != r.split:
                other_line, other = seen
                what = "the same file" if key[0] == "file" else f"the same SHA-1 {sha1[:12]}"
                leaks.append(
                    f"line {other_line} ({other.split}: {printable_path(other.path)}) and line "
                    f"{line} ({r.split}: {printable_path(r.path)}) are {what}"
                )
                break
    if leaks:
        raise ManifestError(
            f"{path}: {len(leaks)} image(s) in two splits: "
            + "; ".join(leaks[:5])
            + (f" and {len(leaks) - 5} more" if len(leaks) > 5 else "")
            + (
                ". An image must lie in one split only (else it is tested on what it was trained "
                "on): remove the copies or organise again (organise removes exact duplicates)"
            )
        )
