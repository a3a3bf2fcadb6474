"""Read an image file (or its bytes) of any format in :mod:`flystage.formats`' table to a numpy
array: the format from the content, the decompression bomb limits checked before decoding,
every failure one :class:`~flystage.image_checks.ImageError` naming the file.

Preprocessing the array into the model input is :mod:`flystage.imaging`'s job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flystage import formats
from flystage.image_checks import ImageError, Limits, limits

__all__ = ["read_image"]


def read_image(
    source: str | Path | bytes | bytearray | memoryview,
    page: int = 0,
    name: str | None = None,
    *,
    max_pixels: int | None = None,
    max_decoded_mb: int | None = None,
) -> np.ndarray:
    """Read an image file (or its bytes) to a numpy array.

    The format is recognised from the content (magic bytes), never from the file name.

    Parameters
    ----------
    source : path or bytes
        A file of a format in :mod:`flystage.formats`' table, or its content: TIFF (8/16/32-bit
        integer or float, grey or RGB, multi-page), PNG (8/16-bit, grey, RGB or RGBA), BMP or
        JPEG.
    page : int
        Which page of a multi-page TIFF (0 = first). Other formats have only page 0.
    name : str, optional
        What to call ``source`` in error messages when it is bytes (e.g. the upload's name).
    max_pixels : int, optional
        Refuse images with more pixels than this (default
        :data:`~flystage.image_checks.MAX_PIXELS`, 100 MP).
    max_decoded_mb : int, optional
        Refuse images whose decoded pixel data (samples x bytes per sample, read from the
        header before decoding) would exceed this many MiB (default
        :data:`~flystage.image_checks.MAX_DECODED_MB`).

    Returns
    -------
    image : ndarray
        ``(H, W)`` grey or ``(H, W, 3)`` RGB; dtype uint8, uint16 or float32 (other integer
        types and float64 become float32; alpha is dropped).

    Raises
    ------
    ImageError
        The one error for any image that cannot be read; the message names the file.
    """
    limit = limits(max_pixels, max_decoded_mb)
    data, path, label = _open_source(source, name)
    try:
        image = _decode(data, path, page, label, limit)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(
            f"{label}: too large to decode in memory ({exc}); downscale it first"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - no decoder's own exception may escape
        raise ImageError(
            f"{label}: the file is corrupt or truncated ({type(exc).__name__}: {exc}); "
            f"copy it again from its source or re-save it as {formats.supported()}"
        ) from exc
    return _normalise_array(image, label)


def _open_source(
    source: str | Path | bytes | bytearray | memoryview, name: str | None
) -> tuple[bytes | None, Path | None, str]:
    """(bytes or None, path or None, the name for messages) of ``read_image``'s source; a path
    must be an existing file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None, name or "<image bytes>"
    path = Path(source)
    label = name or str(path)
    if not path.exists():
        raise ImageError(f"{label}: file not found; check the path")
    if not path.is_file():
        raise ImageError(f"{label}: not a file; give the path of an image file")
    return None, path, label


def _decode(
    data: bytes | None, path: Path | None, page: int, label: str, limit: Limits
) -> np.ndarray:
    """The image of ``data`` (or of the file ``path`` when ``data`` is None) by its format's
    decoder, before ``_normalise_array``; decoders' own exceptions escape (``read_image`` wraps
    them)."""
    if data is None:
        with open(path, "rb") as fh:
            head = fh.read(formats.HEAD_BYTES)
    else:
        head = data[: formats.HEAD_BYTES]
    if not head:
        raise ImageError(f"{label}: the file is empty (0 bytes); copy it again from its source")
    fmt = formats.sniff(head)
    if fmt is None:
        raise ImageError(
            f"{label}: cannot read it as an image: {formats.describe_unknown(head)}; "
            f"save it as {formats.supported()}"
        )
    if page < 0:
        raise ImageError(f"{label}: page must be 0 or more, not {page}")
    if fmt.multi_page:
        return fmt.decode(path if data is None else data, page, label, limit)
    if page != 0:
        raise ImageError(
            f"{label}: a {fmt.label} file has only one page (page 0), not page {page}; use page 0"
        )
    if data is None:
        data = path.read_bytes()
    return fmt.decode(data, page, label, limit)


def _normalise_array(arr: np.ndarray, label: str) -> np.ndarray:
    """To (H, W) or (H, W, 3) with dtype uint8, uint16 or float32."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (separate) RGB TIFF
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] == 2:
        arr = arr[:, :, 0]  # grey + alpha
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha dropped: microscopy has no meaningful transparency
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ImageError(
            f"{label}: an image of shape {arr.shape} is neither grey (H, W) nor RGB (H, W, 3); "
            "export one plane (or one page) as a 2-D image"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{label}: the image has zero size {arr.shape}; re-export it")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype not in (np.uint8, np.uint16, np.float32):
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ImageError(
                f"{label}: pixel type {arr.dtype} is not supported; save as 8/16-bit or float"
            )
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)
