"""Top-k stages for every image in a folder, with onnxruntime (no torch on this path).

``flystage predict FOLDER --model DIR`` writes a CSV (``file, stage_1, p_1, ..., error``) and
a JSON file (which also records the folder and the model, for ``flystage review``);
``--rename`` appends the top-3 to each file name
(``embryo12.tif -> embryo12__s11-12_s13-16_s9-10.tif``) after writing an undo manifest
(symbolic links are skipped: neither they nor their targets are renamed), and
``flystage predict --undo MANIFEST`` restores the names. ``--unsure-below P`` adds a column
``unsure`` (true when the top-1 probability is below P: the images a biologist should look
at) and leaves those images under their own names with ``--rename``.

The loop is split so that the model can live elsewhere: anything with
``predict_sources(sources, k, names) -> list[Prediction]`` (a ``SourcePredictor``: the local
``Predictor`` here, or an HTTP client for the serve container or a SageMaker endpoint) plugs
into ``predict_files``, ``write_csv``/``write_json`` and ``rename_files``/``undo_renames``,
and ``add_output_arguments`` + ``run_with`` give it the same command line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flystage.artefact import (
    INPUT_NAME,
    OUTPUT_NAME,
    PRECISIONS,
    ArtefactError,
    Metadata,
    check_session,
    graph_file,
    load_metadata,
    open_session,
)
from flystage.image_checks import ImageError
from flystage.imaging import preprocess, set_threads
from flystage.organise import iter_images
from flystage.reading import read_image

Source = str | Path | bytes
# Chosen by bench-predict on 2 cores (docs/speed.md): batches in flight, each on one
# onnxruntime thread, with image reading on its own threads.
DEFAULT_WORKERS = 2
DEFAULT_READERS = 1

# What --rename appends: "__s<label>_s<label>_s<label>" before the suffix.
RENAMED_RE = re.compile(r"__s[A-Za-z0-9.+-]+(?:_s[A-Za-z0-9.+-]+)*$")
UNDO_COLUMNS = ("old", "new")
# OWASP's CSV-injection rule: a cell starting with one of these opens as a formula in a
# spreadsheet, so it gets a leading single quote (file names are chosen by whoever sent them).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(cell: Any) -> Any:
    """``cell`` with a leading ``'`` if it is text starting with ``= + - @``, tab or carriage
    return."""
    if isinstance(cell, str) and cell.startswith(FORMULA_START):
        return "'" + cell
    return cell


class _CsvWriter:
    """csv.writer with ``\\n`` lines that also quotes a cell holding a carriage return.

    Python 3.11's writer leaves ``a\\rb`` unquoted when the line ends in ``\\n``, and readers
    then split the row there; such rows are written with every cell quoted.
    """

    def __init__(self, f):
        self.plain = csv.writer(f, lineterminator="\n")
        self.quoted = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row: Sequence[Any]) -> None:
        cr = any(isinstance(c, str) and "\r" in c for c in row)
        (self.quoted if cr else self.plain).writerow(row)


def csv_unsafe(cell: str) -> str:
    """The inverse of :func:`csv_safe` on text it wrote."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_START):
        return cell[1:]
    return cell


@dataclass
class Prediction:
    """The top-k (label, probability) pairs for one image, or the reason it has none."""

    source: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "top": [{"stage": label, "probability": round(p, 6)} for label, p in self.top],
            "error": self.error,
        }


def is_unsure(prediction: Prediction, below: float | None) -> bool | None:
    """Whether the top-1 probability is below ``below``; None without a threshold or a prediction.

    The same cut as the evaluate report's coverage table: an image with ``p >= below`` is
    accepted, so ``--unsure-below 0.8`` marks the images left out of its ``p >= 0.80`` row.
    """
    if below is None or prediction.error or not prediction.top:
        return None
    return prediction.top[0][1] < below


def unsure_threshold(text: str) -> float:
    """argparse type of ``--unsure-below``: a probability strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; give a probability such as 0.8"
        ) from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"{text} is not between 0 and 1 (exclusive); give a probability such as 0.8"
        )
    return value


class SourcePredictor(Protocol):
    """Sends a batch of images somewhere and gets the top-k back (local ONNX or remote)."""

    def predict_sources(
        self, sources: Sequence[Source], k: int = 3, names: Sequence[str] | None = None
    ) -> list[Prediction]: ...


# ---- the model -------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits, float32, computed stably in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, labels: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """For each row of ``(N, K)`` probabilities, the ``min(k, K)`` best (label, probability)."""
    k = max(1, min(int(k), probs.shape[1]))
    # A stable sort keeps stage order among ties, so equal probabilities list deterministically.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(labels[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


class Predictor:
    """The artefact's ONNX model on onnxruntime, with the artefact's own preprocessing.

    ``threads`` bounds onnxruntime's intra-op threads (None: all cores). ``precision`` picks
    the graph (:func:`flystage.artefact.graph_file`): ``auto`` runs the int8 graph when training
    kept one; ``self.precision`` and ``self.graph`` say which runs.
    """

    def __init__(self, model_dir: str | Path, threads: int | None = None, precision: str = "auto"):
        self.model_dir = Path(model_dir)
        self.metadata: Metadata = load_metadata(self.model_dir)
        self.graph, self.precision = graph_file(self.model_dir, self.metadata, precision)
        self.session = open_session(self.model_dir, threads, self.graph)
        check_session(self.session, self.metadata, self.model_dir, self.graph)
        self.labels = list(self.metadata.labels)
        self.config = self.metadata.preprocess

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, K)`` float32 for a preprocessed batch float32 ``(N, C, H, W)`` in [0,
        1]."""
        batch = np.asarray(batch)
        expected = tuple(self.metadata.input_shape)
        if batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(
                f"batch must be float32 (N, {', '.join(map(str, expected))}), got {batch.dtype} "
                f"{batch.shape}"
            )
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})[0]
        return softmax(logits)

    def prepare(self, source: Source, name: str) -> np.ndarray | str:
        """The model input float32 ``(C, H, W)`` in [0, 1] for one image (path or bytes), or why
        there is none: the decoder's error, or ``blank image (...)``.

        A blank image (every pixel NaN, or one value, or no contrast left after preprocessing)
        gets no input: the model would name three stages for nothing, and --rename would put
        them in its name.
        """
        try:
            image = read_image(source, page=self.config.page, name=name)
            blank = blank_reason(image)
            array = None if blank else preprocess(image, self.config)
            if array is not None and float(array.max() - array.min()) == 0.0:
                blank = "no contrast left after preprocessing"
        except ImageError as exc:
            return str(exc)
        if blank:
            return f"{name}: blank image ({blank}); not predicted"
        return array

    def predict_prepared(
        self, prepared: Sequence[np.ndarray | str], names: Sequence[str], k: int = 3
    ) -> list[Prediction]:
        """Predictions for the outputs of :meth:`prepare` (one batch through the model)."""
        predictions = [Prediction(name) for name in names]
        good = [i for i, item in enumerate(prepared) if not isinstance(item, str)]
        for i, item in enumerate(prepared):
            if isinstance(item, str):
                predictions[i].error = item
        if good:
            probs = self.predict_arrays(np.stack([prepared[i] for i in good]))
            for i, top in zip(good, top_k(probs, self.labels, k)):
                predictions[i].top = top
        return predictions

    def predict_sources(
        self, sources: Sequence[Source], k: int = 3, names: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Top-k for each image (path or bytes); an unreadable or blank image gets its ``error``
        instead (:meth:`prepare`); a blank image's row says ``blank image (...)`` and it keeps its
        name."""
        names = (
            list(names) if names is not None else [source_name(s, i) for i, s in enumerate(sources)]
        )
        prepared = [self.prepare(source, name) for source, name in zip(sources, names)]
        return self.predict_prepared(prepared, names, k)


def blank_reason(image: np.ndarray) -> str | None:
    """Why a decoded image holds nothing to stage (all NaN/infinite, or one value), or None."""
    if image.size == 0:
        return "no pixels"
    values = image
    if image.dtype.kind in "fc":
        finite = np.isfinite(image)
        if not finite.any():
            return "every pixel is NaN or infinite"
        if not finite.all():
            values = image[finite]
    lo, hi = values.min(), values.max()
    if lo == hi:
        return f"every pixel is {lo.item():g}"
    return None


def source_name(source: Source, index: int) -> str:
    """What to call a source in outputs and errors: its path, or ``<image i>`` for bytes."""
    return f"<image {index}>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


# ---- folders ---------------------------------------------------------------------------------


def predict_files(
    predictor: SourcePredictor,
    paths: Sequence[Path],
    root: Path | None = None,
    k: int = 3,
    batch_size: int = 16,
    progress: bool | None = None,
    workers: int = 1,
    readers: int = 1,
) -> list[Prediction]:
    """Predictions for ``paths`` in batches, in order, named relative to ``root``.

    A local :class:`Predictor` runs as a pipeline (:func:`flystage.batches.pipelined_batches`):
    ``readers`` threads decode and preprocess ahead while ``workers`` batches run the model. A
    remote predictor gets ``workers`` batches in flight at once. A tqdm bar with images/s shows
    on a terminal.
    """
    from tqdm import tqdm

    names = [_relative_name(p, root) for p in paths]
    if hasattr(predictor, "prepare") and hasattr(predictor, "predict_prepared"):
        from flystage.batches import pipelined_batches

        batches = pipelined_batches(
            predictor, paths, names, k, batch_size, workers=workers, readers=readers
        )
    else:
        batches = _remote_batches(predictor, paths, names, k, batch_size, workers)
    out: list[Prediction] = []
    # disable=None: a bar on a terminal, silence in logs and CI.
    with tqdm(
        total=len(paths), unit="img", disable=None if progress is None else not progress
    ) as bar:
        for batch in batches:
            out.extend(batch)
            bar.update(len(batch))
    return out


def _remote_batches(
    predictor: SourcePredictor,
    paths: Sequence[Path],
    names: Sequence[str],
    k: int,
    batch_size: int,
    workers: int,
) -> Iterator[list[Prediction]]:
    """Batches sent ``workers`` at a time (requests overlap), yielded in order."""
    from concurrent.futures import ThreadPoolExecutor

    step = max(1, batch_size)
    chunks = [slice(start, start + step) for start in range(0, len(paths), step)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = []
        for i, chunk in enumerate(chunks):
            pending.append(
                pool.submit(predictor.predict_sources, list(paths[chunk]), k=k, names=names[chunk])
            )
            # Collect in order, with at most `workers` + 1 batches in memory.
            while pending and (len(pending) > max(1, workers) or i == len(chunks) - 1):
                yield pending.pop(0).result()


def _relative_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def _unwritable(path: Path) -> str | None:
    """Why a file cannot be created at ``path`` (its folder is made if missing), or None.

    Probes with a real temporary file in the folder: permissions, read-only mounts, a file
    where a folder should be and full quotas all show up, whoever runs it.
    """
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            return "it is a folder"
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".flystage-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _open_new(path: Path, force: bool, errors: str = "strict"):
    """Open ``path`` for writing text; refuse to replace an existing file unless ``force``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return open(path, "w" if force else "x", newline="", encoding="utf-8", errors=errors)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; choose another name or pass --force to replace it"
        ) from None


@contextmanager
def _write_new(path: Path, force: bool, errors: str = "strict"):
    """Write text to a temporary file next to ``path``, then move it into place on success.

    A crash or an error half-way leaves no partial ``path`` (and the temporary file is
    removed), so a rerun never meets "already exists". Without ``force`` an existing
    ``path`` is never replaced, even one that appears while writing.
    """
    exists = f"{path} already exists; choose another name or pass --force to replace it"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force and os.path.lexists(path):
        raise FileExistsError(exists)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", newline="", encoding="utf-8", errors=errors) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                _rename_no_replace(tmp, path)
            except FileExistsError:
                raise FileExistsError(exists) from None
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) shown as ``\\udcXX``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _print(text: str = "", file=None) -> None:
    print(_printable(text), file=file)


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
    with _write_new(path, force, errors="backslashreplace") as f:
        writer = _CsvWriter(f)
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
    with _write_new(path, force) as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return path


# ---- renaming --------------------------------------------------------------------------------


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


def _move_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError rather than replacing ``dst``."""
    _rename_no_replace(src, dst)


def _rename_no_replace(src: Path, dst: Path) -> None:
    try:
        # link() fails if dst exists, atomically; os.rename would silently replace it.
        # follow_symlinks=False: a link is moved as a link, never turned into its target.
        if os.link in os.supports_follow_symlinks:
            os.link(src, dst, follow_symlinks=False)
        else:
            os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links (FAT, some network shares): check, then rename.
        if os.path.lexists(dst):
            raise FileExistsError(dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


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
            _move_no_replace(src, dst)
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
    with _open_new(undo_path, force=False, errors="surrogateescape") as f:
        writer = _CsvWriter(f)
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


# ---- command line ----------------------------------------------------------------------------


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every folder predictor shares (local model, local container, endpoint)."""
    parser.add_argument(
        "folder", nargs="?", type=Path, help="folder of images (searched recursively) or one image"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help=(
            "CSV to write (default predictions.csv). A cell starting with =, +, -, @, a tab or a "
            "carriage return (a file name, say) gets a leading single quote, so a spreadsheet "
            "shows it as text, never as a formula (OWASP's CSV-injection rule)"
        ),
    )
    parser.add_argument(
        "--json", type=Path, help="JSON to write (default: the CSV's name with .json)"
    )
    parser.add_argument("--force", action="store_true", help="replace existing CSV/JSON outputs")
    parser.add_argument("--k", type=int, default=3, help="how many stages per image (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument(
        "--workers", type=int, default=1, help="batches in flight at once (default 1)"
    )
    parser.add_argument(
        "--unsure-below",
        type=unsure_threshold,
        metavar="P",
        help=(
            "add a column 'unsure' (true/false): true when the top-1 probability is below P, a "
            "number between 0 and 1 (default: no column). With --rename, unsure images keep "
            "their names. `flystage evaluate` prints the share of images each threshold accepts "
            "and their accuracy"
        ),
    )
    parser.add_argument(
        "--rename",
        action="store_true",
        help=(
            "append the top-k stages to each file name (not for unsure images, with "
            "--unsure-below). Symbolic links are skipped and reported: neither the link nor its "
            "target is renamed"
        ),
    )
    parser.add_argument(
        "--undo-manifest",
        type=Path,
        help=(
            "where --rename records old->new names (default: next to --out); checked writable "
            "before any prediction"
        ),
    )
    parser.add_argument(
        "--undo",
        type=Path,
        metavar="MANIFEST",
        help="restore the names recorded by an earlier --rename",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_output_arguments(parser)
    parser.add_argument("--model", type=Path, help="model directory (model.onnx + metadata.json)")
    parser.add_argument(
        "--threads", type=int, help="onnxruntime threads per batch (default: cores / workers)"
    )
    parser.add_argument(
        "--readers",
        type=int,
        default=DEFAULT_READERS,
        help=(
            f"threads reading and preprocessing images ahead of the model (default "
            f"{DEFAULT_READERS})"
        ),
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help=(
            "which of the model's graphs to run: auto (default) = the int8 one when training kept "
            "it (it answered like the float one on the validation images; metadata.json's "
            "'int8' says why), else float; int8 = refuse a model without one"
        ),
    )
    # Batches in flight, one onnxruntime thread each (see bench-predict and docs/speed.md).
    parser.set_defaults(workers=DEFAULT_WORKERS)


def run_undo(manifest: Path) -> int:
    try:
        report = undo_renames(manifest)
    except (OSError, ValueError) as exc:
        _print(f"error: {exc}", file=sys.stderr)
        return 2
    _print(report.text().replace("renamed", "restored", 1))
    return 1 if report.problems else 0


def run_with(
    predictor: SourcePredictor, args: argparse.Namespace, model_info: dict[str, Any] | None = None
) -> int:
    """Predict ``args.folder`` with ``predictor``, write CSV/JSON, rename if asked.

    Exit code 0 when every image was predicted (and renamed if asked), 1 when some were not,
    2 for bad usage. ``args.undo`` restores names instead (no predictor call).
    """
    if getattr(args, "undo", None):
        return run_undo(args.undo)
    if args.folder is None:
        _print("error: give the FOLDER of images to predict (or --undo MANIFEST)", file=sys.stderr)
        return 2
    if args.k < 1 or args.batch_size < 1:
        _print("error: --k and --batch-size must be at least 1", file=sys.stderr)
        return 2
    found = _find_images(args.folder)
    if found is None:
        return 2
    folder, paths = found
    outputs = _output_paths(args)
    if outputs is None:
        return 2
    json_path, undo_path = outputs
    root = folder if folder.is_dir() else folder.parent
    predictions = predict_files(
        predictor,
        paths,
        root=root,
        k=args.k,
        batch_size=args.batch_size,
        workers=getattr(args, "workers", 1),
        readers=getattr(args, "readers", 1),
    )
    below = getattr(args, "unsure_below", None)
    write_csv(predictions, args.out, k=args.k, force=args.force, unsure_below=below)
    write_json(
        predictions, json_path, model=model_info, force=args.force, unsure_below=below, images=root
    )
    errors = [p for p in predictions if p.error]
    for p in errors:
        _print(f"unreadable: {p.error}", file=sys.stderr)
    unsure = (
        ""
        if below is None
        else (
            f", {sum(bool(is_unsure(p, below)) for p in predictions)} unsure (top-1 below "
            f"{below:g})"
        )
    )
    _print(
        f"predicted {len(predictions) - len(errors)} of {len(predictions)} image(s){unsure}; "
        f"wrote {args.out} and {json_path}"
    )
    status = 1 if errors else 0
    if args.rename:
        report = rename_files(paths, predictions, undo_path, k=args.k, unsure_below=below)
        _print(report.text())
        _print(f"undo with: flystage predict --undo {undo_path}")
        status = 1 if report.problems or errors else 0
    return status


def _find_images(folder: Path) -> tuple[Path, list[Path]] | None:
    """The resolved ``folder`` and the images under it; None (after printing why) when there
    are none. Ignored files are counted on stderr."""
    folder = folder.expanduser().resolve()
    if not folder.exists():
        _print(f"error: {folder}: no such folder or file", file=sys.stderr)
        return None
    paths, ignored = iter_images([folder])
    if ignored:
        _print(
            "ignored: " + ", ".join(f"{n} {why}" for why, n in sorted(ignored.items())),
            file=sys.stderr,
        )
    if not paths:
        _print(
            f"error: no images (.tif/.tiff/.png/.bmp/.jpg/.jpeg) under {folder}", file=sys.stderr
        )
        return None
    return folder, paths


def _output_paths(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """The JSON and undo-manifest paths, every output checked new (or --force) and writable
    before the first image is predicted; None (after printing why) when one is not."""
    json_path = args.json or args.out.with_suffix(".json")
    for out in (args.out, json_path):
        if out.exists() and not args.force:
            _print(
                f"error: {out} already exists; choose another name or pass --force", file=sys.stderr
            )
            return None
    undo_path = args.undo_manifest or args.out.with_name(
        f"{args.out.stem}-undo-{datetime.now():%Y%m%d-%H%M%S}.csv"
    )
    if args.rename and undo_path.exists():
        _print(
            f"error: {undo_path} already exists; choose another --undo-manifest", file=sys.stderr
        )
        return None
    # Every output must be writable before the first image is predicted, not after all of them.
    checks = [(args.out, "--out"), (json_path, "--json")] + (
        [(undo_path, "--undo-manifest")] if args.rename else []
    )
    for out, option in checks:
        problem = _unwritable(out)
        if problem:
            _print(
                f"error: cannot write {out} ({problem}); choose another {option}", file=sys.stderr
            )
            return None
    return json_path, undo_path


def run(args: argparse.Namespace) -> int:
    if args.undo:
        return run_undo(args.undo)
    if args.folder is None or args.model is None:
        _print("error: give a FOLDER and --model DIR (or --undo MANIFEST)", file=sys.stderr)
        return 2
    try:
        threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
        predictor = Predictor(args.model, threads=threads, precision=args.precision)
        set_threads(threads)
    except ArtefactError as exc:
        _print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_with(predictor, args, describe_model(predictor))


def describe_model(predictor: Predictor) -> dict[str, Any]:
    """The predictions JSON's ``"model"`` block for a local model: which one answered.

    ``model_dir`` is absolute, so ``flystage review`` finds the model from any folder.
    """
    md = predictor.metadata
    return {
        "model_dir": str(predictor.model_dir.expanduser().resolve()),
        "arch": md.arch,
        "precision": predictor.precision,
        "labels": md.labels,
        "flystage_version": md.flystage_version,
        "created": md.created,
        "manifest_sha256": md.manifest_sha256,
    }
