"""The prediction outputs: a CSV (``file, stage_1, p_1, ..., error``) and a JSON file (which
also records the folder and the model, for ``flystage review``).

Both are written whole or not at all (:func:`flystage.files.atomic_write`), and never over an
existing file unless ``force``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flystage.files import CsvWriter, atomic_write, csv_safe
from flystage.predictor import Prediction, is_unsure


def write_csv(
    predictions: Sequence[Prediction],
    path: str | Path,
    k: int = 3,
    force: bool = False,
    unsure_below: float | None = None,
) -> Path:
    """CSV with ``file, stage_1, p_1, ..., stage_k, p_k, error`` (one row per image).

    With ``unsure_below``, a column ``unsure`` before ``error``: ``true`` when the top-1
    probability is below it, ``false`` otherwise, empty for an unreadable image.
    The CSV is UTF-8: bytes of a file name that are not (``caf\\xe9.tif``) appear as
    ``caf\\udce9.tif``; cells that would open as formulas get a leading ``'`` (:func:`csv_safe`).
    Written to a temporary file and moved into place, so a failure leaves no partial CSV.
    """
    path = Path(path)
    flag = {True: "true", False: "false", None: ""}
    with atomic_write(path, force=force, errors="backslashreplace") as f:
        writer = CsvWriter(f)
        unsure = ["unsure"] if unsure_below is not None else []
        writer.writerow(
            [
                "file",
                *[c for i in range(1, k + 1) for c in (f"stage_{i}", f"p_{i}")],
                *unsure,
                "error",
            ]
        )
        for p in predictions:
            cells = [c for label, prob in p.top[:k] for c in (label, f"{prob:.4f}")]
            cells += [""] * (2 * k - len(cells))
            if unsure_below is not None:
                cells.append(flag[is_unsure(p, unsure_below)])
            writer.writerow([csv_safe(c) for c in (p.source, *cells, p.error or "")])
    return path


def write_json(
    predictions: Sequence[Prediction],
    path: str | Path,
    model: dict[str, Any] | None = None,
    force: bool = False,
    unsure_below: float | None = None,
    images: str | Path | None = None,
) -> Path:
    """JSON ``{"model": {...}, "n": N, "errors": E, "predictions": [{"file", "top", "error"}]}``.

    ``images``: the folder the file names are relative to, recorded as ``"images"`` (absolute)
    so that ``flystage review`` finds the images without being told. With ``unsure_below``,
    also ``"unsure_below": P``, ``"unsure": U`` (how many) and ``"unsure": true/false`` in each
    prediction (null for an unreadable image).
    """
    path = Path(path)
    document = {
        "model": model or {},
        **({"images": str(Path(images).expanduser().resolve())} if images is not None else {}),
        "n": len(predictions),
        "errors": sum(p.error is not None for p in predictions),
        "predictions": [p.to_dict() for p in predictions],
    }
    if unsure_below is not None:
        flags = [is_unsure(p, unsure_below) for p in predictions]
        document.update(unsure_below=unsure_below, unsure=sum(f is True for f in flags))
        for entry, flag in zip(document["predictions"], flags):
            entry["unsure"] = flag
    with atomic_write(path, force=force) as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return path
