"""Writing files safely: whole or not at all, never over a file unless asked; CSV cells that
never open as formulas; PNG bytes.

Every module that writes an output uses :func:`atomic_write` (or :func:`atomic_path` when a
library writes the file by name), so a crash or an error half-way never leaves half a file
under the real name, and :func:`png_bytes` to encode a picture. No torch, and numpy and
OpenCV only when a PNG is made.
"""

from __future__ import annotations

import csv
import os
import secrets
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from flystage.errors import FlystageError

if TYPE_CHECKING:
    import numpy as np

# OWASP's CSV-injection rule: a cell starting with one of these opens as a formula in a
# spreadsheet, so it gets a leading single quote (file names are chosen by whoever sent them).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
REPLACE_HINT = "choose another name or pass --force to replace it"


# ---- CSV -------------------------------------------------------------------------------------


def csv_safe(cell: Any) -> Any:
    """``cell`` with a leading ``'`` if it is text starting with ``= + - @``, tab or carriage
    return."""
    if isinstance(cell, str) and cell.startswith(FORMULA_START):
        return "'" + cell
    return cell


def csv_unsafe(cell: str) -> str:
    """The inverse of :func:`csv_safe` on text it wrote."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_START):
        return cell[1:]
    return cell


class CsvWriter:
    """csv.writer with ``\\n`` lines that also quotes a cell holding a carriage return.

    Python 3.11's writer leaves ``a\\rb`` unquoted when the line ends in ``\\n``, and readers
    then split the row there; such rows are written with every cell quoted. Cells are written
    as given: pass them through :func:`csv_safe` where a spreadsheet may open the file.
    """

    def __init__(self, f: IO[str]):
        self.plain = csv.writer(f, lineterminator="\n")
        self.quoted = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row: Sequence[Any]) -> None:
        cr = any(isinstance(c, str) and "\r" in c for c in row)
        (self.quoted if cr else self.plain).writerow(row)


# ---- new files -------------------------------------------------------------------------------


class OutputExistsError(FlystageError, FileExistsError):
    """A file that is not replaced (without ``force``, or ever); the message says what to do."""


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError rather than replacing ``dst``."""
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


@contextmanager
def atomic_path(
    path: str | Path, *, force: bool = True, fsync: bool = True, hint: str = REPLACE_HINT
) -> Iterator[Path]:
    """A temporary path next to ``path`` for the block to write; moved to ``path`` when the
    block ends without an error, removed otherwise.

    For libraries that write by file name (torch.save, ONNX exporters, quantisers); a block that
    removes the file (an output it decided against) moves nothing. A crash or an error half-way
    leaves no partial ``path``, so a rerun never meets "already exists".
    Without ``force`` an existing ``path`` is never replaced, even one that appears while
    writing: :class:`OutputExistsError` (a FileExistsError) says ``"PATH already exists; " +
    hint``. ``fsync`` makes the content durable before the rename (not worth it for a cache).
    """
    path = Path(path)
    exists = f"{path} already exists; {hint}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force and os.path.lexists(path):
        raise OutputExistsError(exists)
    # A name of its own, so that two writers of one path (threads, processes) never share it.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if not os.path.lexists(tmp):
            return  # the block removed its file: it decided against it, so nothing is moved
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            try:
                rename_no_replace(tmp, path)
            except FileExistsError:
                raise OutputExistsError(exists) from None
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_write(
    path: str | Path,
    mode: str = "w",
    *,
    force: bool = True,
    fsync: bool = True,
    errors: str = "strict",
    hint: str = REPLACE_HINT,
) -> Iterator[IO[Any]]:
    """The open file to write ``path`` through (``mode`` ``"w"``: UTF-8 text, universal
    newlines off; ``"wb"``: bytes), moved into place as :func:`atomic_path` says.

    ``errors`` is the text encoding's error handler (``"surrogateescape"`` writes file names
    that are not UTF-8 as their own bytes).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode {mode!r}: use 'w' (text) or 'wb' (bytes)")
    text = {"newline": "", "encoding": "utf-8", "errors": errors} if mode == "w" else {}
    with atomic_path(path, force=force, fsync=False, hint=hint) as tmp:
        with open(tmp, mode.replace("w", "x"), **text) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def open_new(path: str | Path, force: bool = False, errors: str = "strict") -> IO[str]:
    """``path`` opened for UTF-8 text in place (for a log flushed line by line, which must be
    valid whenever it stops); refuses to replace an existing file unless ``force``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return open(path, "w" if force else "x", newline="", encoding="utf-8", errors=errors)
    except FileExistsError:
        raise OutputExistsError(f"{path} already exists; {REPLACE_HINT}") from None


def unwritable_reason(path: str | Path) -> str | None:
    """Why a file cannot be created at ``path`` (its folder is made if missing), or None.

    Probes with a real temporary file in the folder: permissions, read-only mounts, a file
    where a folder should be and full quotas all show up, whoever runs it.
    """
    path = Path(path)
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


# ---- PNG -------------------------------------------------------------------------------------


def png_bytes(image: np.ndarray, channels_first: bool = False) -> bytes:
    """PNG bytes of ``(H, W)`` grey or ``(H, W, 3)`` RGB (``(C, H, W)`` with C 1 or 3 when
    ``channels_first``).

    uint8 and uint16 are written as they are (16 bits kept); a float image is taken to be in
    [0, 1] (a model input) and rounded to 8 bits. Raises ValueError when OpenCV cannot encode.
    """
    # Here, not at the top: the manifest, the control plane and local mode write files
    # through this module without loading numpy or OpenCV.
    import cv2
    import numpy as np

    if channels_first and image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    if image.dtype.kind == "f":
        image = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if image.ndim == 3:
        image = np.ascontiguousarray(image[:, :, ::-1])  # RGB -> OpenCV's BGR
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("OpenCV could not encode a PNG")
    return data.tobytes()
