"""Read a predictions file (CSV or JSON from ``flystage predict``, local mode or the cloud)
and find every image it lists on disk.

The file is the only source of paths the review server ever opens: requests name an image by
its index in this list, never by a path. Images that ``flystage predict --rename`` renamed are
followed through the undo manifest written beside the predictions; images that cannot be
found make the whole file refused, since reviewing half a folder would silently drop labels.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flystage.artefact import METADATA_FILE
from flystage.errors import FlystageError
from flystage.files import csv_unsafe
from flystage.rename import UNDO_COLUMNS


class PredictionsError(FlystageError, ValueError):
    """A predictions file that cannot be reviewed; the message says what to do."""


@dataclass
class Item:
    """One image to review: its name in the predictions file, where it is now, what the model
    said."""

    index: int
    name: str
    path: Path
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    unsure: bool | None = None

    @property
    def p1(self) -> float:
        """Top-1 probability; -1 for an image without a prediction (those sort first: look at
        them)."""
        return self.top[0][1] if self.top else -1.0


@dataclass
class PredictionsFile:
    """What a predictions file holds: the rows, and the model block and the predicted folder a
    JSON file records (else empty, None)."""

    path: Path
    rows: list[dict[str, Any]]
    model: dict[str, Any]
    images: Path | None = None


def read_predictions(path: str | Path) -> PredictionsFile:
    """Rows ``{"file", "top": [(stage, p)], "error", "unsure"}`` of a predictions CSV or JSON.

    The JSON beside a CSV (same name, ``.json``) is read for its model block (labels, model
    folder) and the predicted folder when present: the CSV alone names neither.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(
            f"{path}: predictions file not found (write one with `flystage predict FOLDER "
            "--model DIR`)"
        )
    if path.suffix.lower() == ".json":
        return _read_json(path)
    rows = _read_csv(path)
    sibling = path.with_suffix(".json")
    if not sibling.is_file():
        return PredictionsFile(path, rows, {})
    recorded = _read_json(sibling)
    return PredictionsFile(path, rows, recorded.model, recorded.images)


def _read_json(path: Path) -> PredictionsFile:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        rows = []
        for entry in document["predictions"]:
            top = [(str(t["stage"]), float(t["probability"])) for t in entry.get("top") or []]
            rows.append(
                {
                    "file": str(entry["file"]),
                    "top": top,
                    "error": entry.get("error"),
                    "unsure": entry.get("unsure"),
                }
            )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PredictionsError(f"{path}: not a flystage predictions JSON ({exc})") from None
    except RecursionError:  # arrays nested thousands deep: not a file flystage wrote
        raise PredictionsError(
            f"{path}: not a flystage predictions JSON (nested too deeply)"
        ) from None
    model = document.get("model") if isinstance(document.get("model"), dict) else {}
    images = document.get("images")
    return PredictionsFile(path, rows, model, Path(images) if isinstance(images, str) else None)


def recorded_model(predictions: PredictionsFile) -> Path | None:
    """The model directory the predictions were made with (``model_dir`` in the JSON), or None
    when they name none (a remote predictor, or a CSV without its JSON).

    A named model that is no longer there is refused: reviewing with another model's labels
    and preprocessing would be a silent mistake.
    """
    named = predictions.model.get("model_dir")
    if not isinstance(named, str) or not named:
        return None
    model = Path(named).expanduser()
    if not (model / METADATA_FILE).is_file():
        raise PredictionsError(
            f"{predictions.path}: the model these predictions were made with ({model}) is no "
            "longer there; give its directory with --model DIR"
        )
    return model


def _read_csv(path: Path) -> list[dict[str, Any]]:
    flags = {"true": True, "false": False}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "file" not in columns or "stage_1" not in columns:
                raise PredictionsError(
                    f"{path}: not a flystage predictions CSV (columns file, stage_1, p_1, ..., "
                    f"error; found {columns})"
                )
            k = sum(1 for c in columns if c.startswith("stage_"))
            rows = []
            for row in reader:
                top = []
                for i in range(1, k + 1):
                    stage, p = csv_unsafe(row.get(f"stage_{i}") or ""), row.get(f"p_{i}") or ""
                    if stage and p:
                        top.append((stage, float(p)))
                rows.append(
                    {
                        "file": csv_unsafe(row["file"]),
                        "top": top,
                        "error": csv_unsafe(row.get("error") or "") or None,
                        "unsure": flags.get((row.get("unsure") or "").lower()),
                    }
                )
    except (UnicodeDecodeError, ValueError, csv.Error) as exc:
        if isinstance(exc, PredictionsError):
            raise
        raise PredictionsError(f"{path}: not a readable predictions CSV ({exc})") from None
    return rows


def renamed_paths(
    predictions: Path, undo_manifests: Sequence[Path] | None = None
) -> dict[Path, Path]:
    """Old absolute path -> new path from ``--rename``'s undo manifests (later renames win).

    Without an explicit list, the manifests beside the predictions file
    (``<stem>-undo-<date>.csv``, what ``flystage predict --rename`` writes) are used.
    """
    if undo_manifests is None:
        undo_manifests = sorted(predictions.parent.glob(f"{predictions.stem}-undo-*.csv"))
    moved: dict[Path, Path] = {}
    for manifest in undo_manifests:
        try:
            with open(manifest, newline="", encoding="utf-8", errors="surrogateescape") as f:
                reader = csv.DictReader(f)
                if list(reader.fieldnames or []) != list(UNDO_COLUMNS):
                    continue
                for row in reader:
                    if row["old"] and row["new"]:
                        moved[Path(csv_unsafe(row["old"]))] = Path(csv_unsafe(row["new"]))
        except (OSError, csv.Error):
            continue
    return moved


def _root_from_renames(moved: dict[Path, Path], rows: Sequence[dict[str, Any]]) -> Path | None:
    """The predicted folder, read off the undo manifest: the old path of a renamed image minus
    its name in the predictions (``/x/new-images/a.bmp`` - ``a.bmp``)."""
    for row in rows:
        name = row["file"]
        if os.path.isabs(name):
            continue
        for old in moved:
            if old.as_posix().endswith("/" + name):
                return Path(old.as_posix()[: -len(name) - 1])
    return None


def resolve_items(
    predictions: PredictionsFile,
    images: str | Path | None = None,
    undo_manifests: Sequence[Path] | None = None,
    unsure_below: float | None = None,
) -> list[Item]:
    """Every row as an :class:`Item` whose ``path`` exists; raise if any image is missing.

    Relative names are looked up under ``images`` (the folder given to ``flystage predict``;
    default: the folder the predictions JSON records, refused if it is gone; for a file that
    records none, the folder read off the undo manifests, else the predictions file's folder),
    then through the rename undo manifests.
    ``unsure_below`` marks images whose top-1 probability is below it when the file carries
    no ``unsure`` column.
    """
    moved = renamed_paths(predictions.path, undo_manifests)
    if images:
        root = Path(images).expanduser().resolve()
    elif predictions.images is not None:
        root = predictions.images
        if not root.is_dir():
            raise PredictionsError(
                f"{predictions.path}: the folder that was predicted ({root}) is no longer there; "
                "give the folder where the images are now with --images FOLDER"
            )
    else:
        root = _root_from_renames(moved, predictions.rows) or predictions.path.parent.resolve()
    items, missing = [], []
    for index, row in enumerate(predictions.rows):
        name = row["file"]
        candidate = Path(name) if os.path.isabs(name) else root / name
        candidate = Path(os.path.abspath(candidate))
        # os.path.isfile: a name too long for the file system is simply not found (Path.is_file
        # raises).
        if not os.path.isfile(candidate) and candidate in moved:
            candidate = moved[candidate]
        if not os.path.isfile(candidate):
            missing.append(name)
            continue
        unsure = row["unsure"]
        if unsure is None and unsure_below is not None and row["top"]:
            unsure = row["top"][0][1] < unsure_below
        items.append(Item(index, name, candidate, list(row["top"]), row["error"], unsure))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise PredictionsError(
            f"{predictions.path}: {len(missing)} of {len(predictions.rows)} image(s) are no "
            f"longer where the predictions say ({shown}; looked under {root}). Give the folder "
            "that was predicted with --images FOLDER, restore moved files (renames by `flystage "
            "predict --rename` are followed through its undo manifest), or predict again"
        )
    if not items:
        raise PredictionsError(f"{predictions.path}: no predictions to review")
    return items
