"""The image formats flystage reads: one table, consulted by reading (:mod:`flystage.reading`),
the folder walk (:mod:`flystage.organise`), the serve codec and the client.

An :class:`ImageFormat` says how a file is recognised (magic bytes at its start: a file's name
is never trusted for reading), which file names count as images when a folder is walked
(suffixes), which MIME types name it on the wire (the first is the one the client sends), and
how it is decoded. Adding a format is one :func:`register` call; the table starts with TIFF,
PNG, BMP and JPEG.

Standard library only: organise and the control plane consult the table without loading
numpy or OpenCV; the built-in decoders (:mod:`flystage.decoders`) are imported at the first
image decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np

    from flystage.image_checks import Limits

__all__ = [
    "HEAD_BYTES",
    "Decoder",
    "ImageFormat",
    "table",
    "register",
    "unregister",
    "sniff",
    "by_suffix",
    "by_mime_type",
    "mime_types",
    "supported",
    "suffix_text",
    "describe_unknown",
]

# How many first bytes of a file recognise its format: every magic fits in them.
HEAD_BYTES = 16

# decode(source, page, label, limits) -> (H, W) or (H, W, C) array: source is the file's bytes
# (for a multi-page format, its bytes or its path), page the page wanted (0 for single-page
# formats), label the file's name for messages; flystage.decoders describes the contract.
Decoder = Callable[["bytes | Path", int, str, "Limits"], "np.ndarray"]


@dataclass(frozen=True)
class ImageFormat:
    """One image format.

    Attributes
    ----------
    name : str
        Lower-case key (``"tiff"``); upper-cased it names the format in messages.
    magic : tuple of bytes
        The prefixes a file of this format starts with (any one of them; at most
        :data:`HEAD_BYTES` long).
    suffixes : tuple of str
        Lower-case file name suffixes with the dot (``".tif"``): what counts as an image of
        this format when a folder is walked.
    mime_types : tuple of str
        Lower-case MIME types the server accepts for it; the first is the one the client sends.
    decode : Decoder
        Reads the format to an array (:data:`Decoder`).
    multi_page : bool
        Whether a file can hold several pages (then ``decode`` gets the page asked for).
    """

    name: str
    magic: tuple[bytes, ...]
    suffixes: tuple[str, ...]
    mime_types: tuple[str, ...]
    decode: Decoder
    multi_page: bool = False

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.lower():
            raise ValueError(f"an image format's name must be lower case, not {self.name!r}")
        if not self.magic or not all(0 < len(m) <= HEAD_BYTES for m in self.magic):
            raise ValueError(f"{self.name}: magic prefixes must be 1 to {HEAD_BYTES} bytes")
        if not self.suffixes or not all(
            s.startswith(".") and s == s.lower() for s in self.suffixes
        ):
            raise ValueError(f"{self.name}: suffixes must be lower case with the dot (.tif)")
        if not self.mime_types or not all("/" in t and t == t.lower() for t in self.mime_types):
            raise ValueError(f"{self.name}: MIME types must be lower case type/subtype")

    @property
    def label(self) -> str:
        """The format's name in messages: ``"TIFF"``."""
        return self.name.upper()

    @property
    def mime_type(self) -> str:
        """The MIME type a client sends for it."""
        return self.mime_types[0]


def _builtin(name: str) -> Decoder:
    """``flystage.decoders.<name>``, imported at its first call (the table stays light)."""

    def decode(source: Any, page: int, label: str, limits: Any) -> Any:
        from flystage import decoders

        return getattr(decoders, name)(source, page, label, limits)

    decode.__name__ = decode.__qualname__ = name
    return decode


# Their order is the order formats are listed in messages ("TIFF, PNG, BMP or JPEG").
_TABLE: list[ImageFormat] = [
    ImageFormat(
        "tiff",
        (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),  # both byte orders; then BigTIFF
        (".tif", ".tiff"),
        ("image/tiff",),
        _builtin("decode_tiff"),
        multi_page=True,
    ),
    ImageFormat("png", (b"\x89PNG\r\n\x1a\n",), (".png",), ("image/png",), _builtin("decode_png")),
    ImageFormat("bmp", (b"BM",), (".bmp",), ("image/bmp",), _builtin("decode_bmp")),
    ImageFormat(
        "jpeg", (b"\xff\xd8\xff",), (".jpg", ".jpeg"), ("image/jpeg",), _builtin("decode_jpeg")
    ),
]

# Formats recognised only to say what they are.
_UNSUPPORTED_MAGIC = [
    (b"GIF8", "GIF"),
    (b"RIFF", "WebP/RIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
]


def table() -> tuple[ImageFormat, ...]:
    """The registered formats, in their order."""
    return tuple(_TABLE)


def register(fmt: ImageFormat) -> ImageFormat:
    """Add ``fmt`` to the table (after the others) and return it.

    Raises ValueError when its name, a suffix or a MIME type is taken, or when one of its
    magic prefixes and another format's could start the same file: a file has one format.
    """
    for other in _TABLE:
        if other.name == fmt.name:
            raise ValueError(f"an image format named {fmt.name!r} is registered already")
        clash = (
            [m for m in fmt.magic for o in other.magic if m.startswith(o) or o.startswith(m)]
            + sorted(set(fmt.suffixes) & set(other.suffixes))
            + sorted(set(fmt.mime_types) & set(other.mime_types))
        )
        if clash:
            raise ValueError(f"{fmt.name}: {clash[0]!r} already belongs to {other.name}")
    _TABLE.append(fmt)
    return fmt


def unregister(name: str) -> ImageFormat:
    """Remove the format called ``name`` from the table and return it (KeyError if none)."""
    for i, fmt in enumerate(_TABLE):
        if fmt.name == name:
            return _TABLE.pop(i)
    raise KeyError(f"no image format named {name!r}")


def sniff(head: bytes) -> ImageFormat | None:
    """The format of a file from its first bytes (:data:`HEAD_BYTES` are enough), or None."""
    for fmt in _TABLE:
        if head.startswith(fmt.magic):
            return fmt
    return None


def by_suffix(suffix: str) -> ImageFormat | None:
    """The format whose files end in ``suffix`` (``".TIF"``: any case), or None."""
    suffix = suffix.lower()
    return next((fmt for fmt in _TABLE if suffix in fmt.suffixes), None)


def by_mime_type(media_type: str) -> ImageFormat | None:
    """The format named by ``media_type`` (``"image/tiff"``, no parameters; any case), or None."""
    media_type = media_type.lower()
    return next((fmt for fmt in _TABLE if media_type in fmt.mime_types), None)


def mime_types() -> frozenset[str]:
    """Every MIME type of every format."""
    return frozenset(t for fmt in _TABLE for t in fmt.mime_types)


def supported() -> str:
    """The formats for people: ``"TIFF, PNG, BMP or JPEG"``."""
    labels = [fmt.label for fmt in _TABLE]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"


def suffix_text() -> str:
    """The suffixes a folder walk takes as images, for messages: ``".tif/.tiff/.png/..."``."""
    return "/".join(s for fmt in _TABLE for s in fmt.suffixes)


def describe_unknown(head: bytes) -> str:
    """What a file whose first bytes ``head`` match no format is, as a clause for a message."""
    for magic, kind in _UNSUPPORTED_MAGIC:
        if head.startswith(magic):
            return f"it is a {kind} file, which is not supported"
    if head[:64].strip() and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:64]):
        return "it is a text file, not an image"
    return "its content is not a recognised image format"
