"""The review decisions and the reviewed-labels CSV they are saved to.

Every decision rewrites the whole CSV to a temporary file, fsyncs it and renames it over the
old one: a stopped browser or server, or a crash half-way, leaves the previous complete file,
never a torn one. A few thousand rows take milliseconds, so there is no need for an append log.

The CSV is ``path,label,group,predicted,p_predicted,decision,reviewed_at``: the first three
columns are what ``flystage organise --labels-csv`` reads (paths relative to the CSV's folder
when the image lies below it, else absolute), the rest say what the model said and when.
Rows of ``base_labels`` (e.g. the training manifest) come first, so one ``organise`` call can
retrain on the old labels and the corrections together; a reviewed image replaces its base row.
"""

from __future__ import annotations

import csv
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flystage.files import CsvWriter, atomic_write, csv_safe, csv_unsafe
from flystage.review.predictions import Item

COLUMNS = ("path", "label", "group", "predicted", "p_predicted", "decision", "reviewed_at")


@dataclass
class Decision:
    label: str
    decision: str  # "confirmed" (the model's top-1 kept) or "corrected"
    reviewed_at: str


class ReviewStore:
    """Decisions by item index, with an undo history, saved atomically after each change."""

    def __init__(
        self,
        out: str | Path,
        items: Sequence[Item],
        group_regex: str | None = None,
        base_labels: str | Path | None = None,
    ):
        self.out = Path(out).expanduser().absolute()
        self.items = list(items)
        self.group_re = re.compile(group_regex) if group_regex else None
        self.decisions: dict[int, Decision] = {}
        self.history: list[tuple[int, Decision | None]] = []
        self._hashes: dict[int, str] = {}
        # Werkzeug serves requests on threads; one lock keeps decisions and the file in step.
        self.lock = threading.Lock()
        self.base_rows = _read_base(Path(base_labels)) if base_labels else []
        # A reviewed copy of a base image keeps the base row's group (by SHA-1), so a gene or
        # embryo stays on one side of the split.
        self._base_group = {b[3]: b[2] for b in self.base_rows if b[3]}
        self._resume()

    # ---- decisions ---------------------------------------------------------------------------

    def decide(self, index: int, label: str) -> Decision:
        """Record ``label`` for item ``index`` and save; ``confirmed`` when it is the model's
        top-1."""
        item = self.items[index]
        top1 = item.top[0][0] if item.top else None
        decision = Decision(label, "confirmed" if label == top1 else "corrected", _now())
        with self.lock:
            self.history.append((index, self.decisions.get(index)))
            self.decisions[index] = decision
            self._save()
        return decision

    def undo(self) -> int | None:
        """Take back the last decision of this session (restoring the one before); its index, or
        None."""
        with self.lock:
            if not self.history:
                return None
            index, previous = self.history.pop()
            if previous is None:
                self.decisions.pop(index, None)
            else:
                self.decisions[index] = previous
            self._save()
        return index

    def counts(self) -> dict[str, int]:
        values = list(self.decisions.values())
        return {
            "images": len(self.items),
            "reviewed": len(values),
            "corrected": sum(d.decision == "corrected" for d in values),
            "confirmed": sum(d.decision == "confirmed" for d in values),
        }

    # ---- the file ----------------------------------------------------------------------------

    def group(self, item: Item) -> str:
        """The group column: ``group_regex``'s named group ``group`` on the name (empty when it
        does not match), else the name itself: one group per image, as ``organise`` does."""
        if self.group_re is None:
            return item.name
        m = self.group_re.search(item.name)
        return (m.group("group") or "") if m else ""

    def _sha1(self, index: int) -> str:
        if index not in self._hashes:
            from flystage.manifest import file_sha1

            self._hashes[index] = file_sha1(self.items[index].path)
        return self._hashes[index]

    def _cell_path(self, path: Path) -> str:
        try:
            return path.relative_to(self.out.parent).as_posix()
        except ValueError:
            return str(path)

    def _save(self) -> None:
        reviewed = {self.items[i].path for i in self.decisions}
        # A reviewed copy of a base image (same bytes, e.g. the demo's "new" images) replaces
        # its base row too: organise would otherwise drop both copies as conflicting labels.
        hashes = {self._sha1(i) for i in self.decisions} if self._base_group else set()
        rows: list[list[str]] = []
        for base in self.base_rows:
            if Path(base[0]) not in reviewed and base[3] not in hashes:
                rows.append([self._cell_path(Path(base[0])), base[1], base[2], "", "", "base", ""])
        for index in sorted(self.decisions):
            item, d = self.items[index], self.decisions[index]
            predicted, p = (item.top[0][0], f"{item.top[0][1]:.4f}") if item.top else ("", "")
            group = self._base_group.get(self._sha1(index)) if self._base_group else None
            rows.append(
                [
                    self._cell_path(item.path),
                    d.label,
                    group or self.group(item),
                    predicted,
                    p,
                    d.decision,
                    d.reviewed_at,
                ]
            )
        with atomic_write(self.out) as f:
            writer = CsvWriter(f)
            writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow([csv_safe(c) for c in row])
        # The rename itself is durable only once the folder is synced.
        fd = os.open(self.out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _resume(self) -> None:
        """Pick up the decisions of an earlier session from ``out`` (same images, by path)."""
        if not self.out.is_file():
            return
        by_path = {item.path: item.index for item in self.items}
        with open(self.out, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("decision") not in ("confirmed", "corrected"):
                    continue
                path = Path(csv_unsafe(row["path"]))
                path = path if path.is_absolute() else self.out.parent / path
                index = by_path.get(Path(os.path.abspath(path)))
                if index is not None:
                    self.decisions[index] = Decision(
                        csv_unsafe(row["label"]), row["decision"], row.get("reviewed_at") or ""
                    )


def _read_base(path: Path) -> list[tuple[str, str, str, str]]:
    """(absolute path, label, group, sha1 or "") of a manifest or a labels CSV
    (``path,label[,group]``)."""
    from flystage.manifest import read_manifest

    with open(path, newline="", encoding="utf-8-sig") as f:
        columns = csv.DictReader(f).fieldnames or []
    if "split" in columns:  # a manifest: its own reader resolves and checks the paths
        return [
            (str(r.path), r.label, r.group, r.sha1) for r in read_manifest(path, check_files=False)
        ]
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = []
        for row in csv.DictReader(f):
            p = Path(row["path"]).expanduser()
            p = p if p.is_absolute() else path.parent / p
            rows.append((os.path.abspath(p), row["label"], row.get("group") or "", ""))
    return rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
