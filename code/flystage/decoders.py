"""The built-in decoders of :mod:`flystage.formats`' table: TIFF (tifffile) and PNG, BMP and
JPEG (OpenCV).

Each is a :data:`flystage.formats.Decoder`: ``decode(source, page, label, limits)`` with
``source`` the file's bytes (a TIFF's may be its path), ``page`` the page wanted (always 0 for
single-page formats), ``label`` the file's name for messages and ``limits`` the
:class:`~flystage.image_checks.Limits`, checked from the header before anything is decoded. It
returns the image as the library gives it (``flystage.reading`` normalises shape and dtype)
and raises :class:`~flystage.image_checks.ImageError` for damage it finds itself; any other
exception is turned into one by ``read_image``.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import tifffile

from flystage.image_checks import ImageError, Limits, check_size

__all__ = ["decode_tiff", "decode_png", "decode_bmp", "decode_jpeg"]


def decode_tiff(source: Path | bytes, page: int, label: str, limits: Limits) -> np.ndarray:
    """Page ``page`` of a TIFF (8/16/32-bit integer or float, grey or RGB, multi-page, BigTIFF)."""
    fh = io.BytesIO(source) if isinstance(source, bytes) else source
    size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
    with warnings.catch_warnings():
        # tifffile warns (rather than raises) about some damage; we check the damage ourselves.
        warnings.simplefilter("ignore")
        with tifffile.TiffFile(fh) as tif:
            n_pages = len(tif.pages)
            if n_pages == 0:
                raise ImageError(f"{label}: the TIFF has no pages; re-export it")
            if page >= n_pages:
                raise ImageError(
                    f"{label}: page {page} asked for, but the TIFF has {n_pages} "
                    f"page{'s' if n_pages != 1 else ''} (0 to {n_pages - 1}); choose one of those"
                )
            tp = tif.pages[page]
            shape = tuple(int(s) for s in tp.shape)
            if len(shape) < 2 or 0 in shape:
                raise ImageError(
                    f"{label}: page {page} has no pixels (shape {shape}); re-export it"
                )
            height, width = (int(tp.imagelength), int(tp.imagewidth))
            itemsize = (
                tp.dtype.itemsize
                if tp.dtype is not None
                else max(1, (int(tp.bitspersample) + 7) // 8)
            )
            check_size(height, width, label, limits, int(np.prod(shape)) * itemsize)
            if int(np.prod(shape)) > 4 * limits.pixels:
                raise ImageError(f"{label}: page {page} holds {shape} samples, too many to read")
            # A cut-off file: the pixel data would end beyond the end of the file.
            ends = [o + c for o, c in zip(tp.dataoffsets, tp.databytecounts) if c]
            if not ends or max(ends) > size:
                raise ImageError(
                    f"{label}: the TIFF is truncated (its pixel data runs past the end of the "
                    f"{size}-byte file); copy it again from its source"
                )
            try:
                return tp.asarray()
            except (KeyError, ValueError, ImportError) as exc:
                if "imagecodecs" not in str(exc) and not isinstance(exc, ImportError):
                    raise
                codec_error = exc
    # tifffile alone cannot decompress LZW, PackBits or JPEG (it needs the imagecodecs
    # package); OpenCV's libtiff can, so such files - common from Fiji and microscope
    # software - are decoded by OpenCV instead.
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    ok, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if not ok or len(pages) <= page:
        raise ImageError(
            f"{label}: cannot decompress this TIFF ({codec_error}); re-save it uncompressed "
            "or with zlib (Deflate) compression, or install the imagecodecs package"
        )
    arr = pages[page]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return arr


def decode_png(data: bytes, page: int, label: str, limits: Limits) -> np.ndarray:
    """A PNG (8/16-bit, grey, RGB or RGBA)."""
    height, width = _header_size(data, "PNG", label, _png_size)
    # OpenCV decodes to at most 4 channels, 16 bits only for 16-bit PNGs.
    sample_bytes = 2 if len(data) > 24 and data[24] == 16 else 1
    check_size(height, width, label, limits, height * width * 4 * sample_bytes)
    return _decode_with_opencv(data, "PNG", label)


def decode_bmp(data: bytes, page: int, label: str, limits: Limits) -> np.ndarray:
    """A BMP (Windows or OS/2 header)."""
    height, width = _header_size(data, "BMP", label, _bmp_size)
    check_size(height, width, label, limits, height * width * 4)
    declared = struct.unpack_from("<I", data, 2)[0]
    if declared > len(data):
        raise ImageError(
            f"{label}: the BMP is truncated ({len(data)} of {declared} bytes); "
            "copy it again from its source"
        )
    return _decode_with_opencv(data, "BMP", label)


def decode_jpeg(data: bytes, page: int, label: str, limits: Limits) -> np.ndarray:
    """A JPEG (baseline or progressive)."""
    height, width = _header_size(data, "JPEG", label, _jpeg_size)
    check_size(height, width, label, limits, height * width * 4)
    if b"\xff\xd9" not in data[2:]:
        # libjpeg decodes a cut-off JPEG with a grey bottom and only a warning.
        raise ImageError(
            f"{label}: the JPEG is truncated (no end marker); copy it again from its source"
        )
    return _decode_with_opencv(data, "JPEG", label)


def _decode_with_opencv(data: bytes, kind: str, label: str) -> np.ndarray:
    """OpenCV's decoding of ``data``, RGB(A) rather than OpenCV's BGR(A)."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        raise ImageError(
            f"{label}: the {kind} file is corrupt or truncated and could not be decoded; "
            "copy it again from its source"
        )
    if arr.ndim == 3:
        # The rest of flystage works in RGB.
        code = cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
        arr = cv2.cvtColor(arr, code) if arr.shape[2] in (3, 4) else arr
    return arr


def _header_size(
    data: bytes, kind: str, label: str, read: Callable[[bytes], tuple[int, int]]
) -> tuple[int, int]:
    """(height, width) from the header by ``read``, before anything is decoded (bomb guard);
    a header ``read`` cannot parse is an :class:`ImageError`."""
    try:
        return read(data)
    except (struct.error, ValueError) as exc:
        raise ImageError(
            f"{label}: the {kind} header is corrupt or truncated ({exc}); "
            "copy it again from its source"
        ) from exc


def _png_size(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _bmp_size(data: bytes) -> tuple[int, int]:
    header_size = struct.unpack_from("<I", data, 14)[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack_from("<HH", data, 18)
    else:
        width, height = struct.unpack_from("<ii", data, 18)
    return abs(height), width


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the markers to the first start-of-frame."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise ValueError(f"bad marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        seg_len = struct.unpack_from(">H", data, i + 2)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack_from(">HH", data, i + 5)
            return height, width
        i += 2 + seg_len
    raise ValueError("no frame header")
