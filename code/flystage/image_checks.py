"""What every image decoder raises and checks: :class:`ImageError` and the decompression bomb
limits, checked from a file's header before its pixels are decoded.

Standard library only, below both the decoders (:mod:`flystage.decoders`, or a format's own)
and :mod:`flystage.reading`, so neither imports the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from flystage.errors import FlystageError

__all__ = [
    "ImageError",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_DECODED_MB",
    "MAX_PIXELS",
    "MAX_DECODED_MB",
    "Limits",
    "limits",
    "check_size",
]

# One default for the command line and the serve image (the environment variables change
# both). No embryo image is anywhere near 100 MP, yet a 36 MP camera frame of a whole slide is
# fine. Pixels alone do not bound memory: a 25 MP float64 RGB TIFF is 572 MiB decoded and zlib
# squeezes it into 600 KB, so the decoded size (samples x bytes per sample) has its own limit,
# checked from the header before decoding. 512 MiB holds a 100 MP 16-bit grey or 8-bit RGB
# image; decoding and preprocessing take about 3 times the decoded size at their peak.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_DECODED_MB = 512
MAX_PIXELS = int(os.environ.get("FLYSTAGE_MAX_PIXELS", DEFAULT_MAX_PIXELS))
MAX_DECODED_MB = int(os.environ.get("FLYSTAGE_MAX_DECODED_MB", DEFAULT_MAX_DECODED_MB))


class ImageError(FlystageError, ValueError):
    """An image that cannot be read: missing, empty, truncated, corrupt, unsupported, too large.

    The message names the file (or the ``name`` given for bytes) and says what to do.
    """


@dataclass(frozen=True)
class Limits:
    """The largest image a decoder may decode: ``pixels`` (height x width) and
    ``decoded_bytes`` (samples x bytes per sample)."""

    pixels: int
    decoded_bytes: int


def limits(max_pixels: int | None = None, max_decoded_mb: int | None = None) -> Limits:
    """:class:`Limits` of ``max_pixels`` and ``max_decoded_mb`` (MiB); each omitted one is
    :data:`MAX_PIXELS` or :data:`MAX_DECODED_MB`, read at the call (tests lower them)."""
    return Limits(
        MAX_PIXELS if max_pixels is None else int(max_pixels),
        (MAX_DECODED_MB if max_decoded_mb is None else int(max_decoded_mb)) * 2**20,
    )


def check_size(height: int, width: int, label: str, limit: Limits, decoded_bytes: int = 0) -> None:
    """Refuse, before decoding, an image whose header promises too many pixels or bytes.

    ``label`` names the file in the message; ``decoded_bytes`` is the decoded size the header
    promises (0: only the pixel count is checked).
    """
    if height <= 0 or width <= 0:
        raise ImageError(
            f"{label}: the image has zero size ({width}x{height} pixels); re-export it"
        )
    if height * width > limit.pixels:
        raise ImageError(
            f"{label}: {width}x{height} pixels is more than the limit of {limit.pixels:,} pixels "
            "(a guard against decompression bombs); downscale the image, or raise "
            "FLYSTAGE_MAX_PIXELS if it is genuine"
        )
    if decoded_bytes > limit.decoded_bytes:
        raise ImageError(
            f"{label}: {width}x{height} pixels would take {decoded_bytes / 2**20:,.0f} MiB "
            f"decoded, more than the limit of {limit.decoded_bytes / 2**20:,.0f} MiB (a guard "
            "against decompression bombs); save it as 8- or 16-bit, or downscale it, or raise "
            "FLYSTAGE_MAX_DECODED_MB if it is genuine"
        )
