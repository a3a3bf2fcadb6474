"""A corpus of hostile inputs for every flystage reader, built in memory or under a temporary
folder.

Used by tests/test_hostile_inputs.py and by bench/hostile_report.py (the figures of issue 8):

- :func:`image_bytes_cases`: malformed, truncated, zero-size, huge-declared, bomb and
  wrong-magic images (TIFF, PNG, JPEG, BMP) as bytes;
- :func:`image_file_cases`: the same on disk, plus empty files, folders, FIFOs, symbolic-link
  loops, dangling links and odd (non-UTF-8, newline, very long) names;
- :func:`csv_cases`: hostile CSV text for the manifest, labels-CSV and undo-manifest readers;
- :func:`metadata_cases`, :func:`weights_cases`, :func:`tar_cases`: tampered model artefacts;
- :func:`http_cases`: bad ``/invocations`` requests for the real serve container.

Every case says what the reader must answer: ``"error"`` (its one clear error type, or a 4xx)
or ``"ok"`` (valid content under an odd name must still be read).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import signal
import stat
import struct
import tarfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

# ---- images ---------------------------------------------------------------------------------


def small_image(height: int = 24, width: int = 40, dtype=np.uint16, seed: int = 0) -> np.ndarray:
    """A small dim embryo-like frame (varied, so that it is never blank)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(200, 20, (height, width))
    image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] += 600
    top = np.iinfo(dtype).max
    return np.clip(image if dtype != np.uint8 else image / 4, 0, top).astype(dtype)


def tiff_of(image: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **kwargs)
    return buffer.getvalue()


def opencv_of(image: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok, ext
    return data.tobytes()


@cache
def valid_images() -> dict[str, bytes]:
    """One small valid file per format (the seeds of truncation, flips and splicing)."""
    eight = small_image(dtype=np.uint8)
    return {
        "tiff": tiff_of(small_image()),
        "tiff-zlib": tiff_of(small_image(), compression="zlib"),
        "png": opencv_of(eight, ".png"),
        "jpeg": opencv_of(eight, ".jpg"),
        "bmp": opencv_of(eight, ".bmp"),
    }


def _tiff_ifd(
    width: int,
    height: int,
    strips: list[bytes],
    rows_per_strip: int,
    *,
    samples: int = 1,
    bits: int = 16,
    sample_format: int = 1,
    compression: int = 1,
    next_ifd: int = 0,
) -> bytes:
    """A little-endian baseline TIFF written by hand, so that any tag can lie."""
    entries: list[tuple[int, int, list[int]]] = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [bits] * samples),
        (259, 3, [compression]),
        (262, 3, [2 if samples == 3 else 1]),
        (273, 4, [0] * len(strips)),
        (277, 3, [samples]),
        (278, 4, [rows_per_strip]),
        (279, 4, [len(s) for s in strips]),
        (284, 3, [1]),
        (339, 3, [sample_format] * samples),
    ]
    header = 8
    ifd_size = 2 + 12 * len(entries) + 4
    extra = bytearray()
    extra_at = header + ifd_size

    def place(values: list[int], kind: int) -> tuple[int, bytes]:
        fmt = "<" + ("H" if kind == 3 else "I") * len(values)
        packed = struct.pack(fmt, *values)
        if len(packed) <= 4:
            return 0, packed.ljust(4, b"\0")
        offset = extra_at + len(extra)
        extra.extend(packed)
        return offset, struct.pack("<I", offset)

    # Pixel data goes after the IFD and its arrays; compute array sizes first.
    array_bytes = sum(
        len(v) * (2 if k == 3 else 4) for _, k, v in entries if len(v) * (2 if k == 3 else 4) > 4
    )
    data_at = extra_at + array_bytes
    offsets, at = [], data_at
    for strip in strips:
        offsets.append(at)
        at += len(strip)
    entries[5] = (273, 4, offsets)
    ifd = bytearray(struct.pack("<H", len(entries)))
    for tag, kind, values in entries:
        _, value = place(values, kind)
        ifd += struct.pack("<HHI", tag, kind, len(values)) + value
    ifd += struct.pack("<I", next_ifd)
    return b"II*\x00" + struct.pack("<I", header) + bytes(ifd) + bytes(extra) + b"".join(strips)


@cache
def float64_rgb_bomb(size: int = 5000, rows_per_strip: int = 50) -> bytes:
    """Issue 8's bomb: a ``size`` x ``size`` float64 RGB zlib TIFF (25 MP: inside the pixel
    limit) that decodes to 600 MB, in about 600 KB; one zero strip compressed once and repeated."""
    strip = zlib.compress(bytes(rows_per_strip * size * 3 * 8), 9)
    strips = [strip] * (size // rows_per_strip)
    return _tiff_ifd(
        size, size, strips, rows_per_strip, samples=3, bits=64, sample_format=3, compression=8
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_of(
    width: int, height: int, idat: bytes | None = None, bit_depth: int = 8, colour: int = 0
) -> bytes:
    """A PNG with a chosen IHDR (valid CRCs) and IDAT (default: all-zero rows, streamed into
    zlib)."""
    if idat is None:
        compressor = zlib.compressobj(9)
        row = bytes(1 + width * (bit_depth // 8) * (3 if colour == 2 else 1))
        parts = [compressor.compress(row) for _ in range(height)]
        idat = b"".join(parts) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_with_size(jpeg: bytes, height: int, width: int) -> bytes:
    """The JPEG with its start-of-frame header claiming ``height`` x ``width``."""
    data = bytearray(jpeg)
    i = 2
    while i + 9 < len(data):
        marker = data[i + 1]
        length = struct.unpack_from(">H", data, i + 2)[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no SOF")


def _bmp_with_size(bmp: bytes, width: int, height: int) -> bytes:
    data = bytearray(bmp)
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def _tiff_with_size(width: int, height: int) -> bytes:
    return _tiff_ifd(width, height, [bytes(64)], max(height, 1))


def _multipage(*pages: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tif:
        for page in pages:
            tif.write(page, contiguous=False)
    return buffer.getvalue()


@dataclass
class ImageCase:
    name: str
    data: bytes
    expect: str = "error"  # "error": ImageError; "ok": read; "any": either, never another exception
    page: int = 0
    bomb: bool = False


def image_bytes_cases(include_bombs: bool = True) -> list[ImageCase]:
    """Every byte-level hostile image, with what ``read_image`` must answer."""
    v = valid_images()
    cases: list[ImageCase] = []
    for kind, data in v.items():
        cases.append(ImageCase(f"{kind}: valid", data, "ok"))
        for cut in (
            len(data) // 2,
            len(data) - 1 if kind != "bmp" else len(data) - 2,
            40,
            16,
            8,
            4,
            2,
            1,
        ):
            if kind in ("tiff", "tiff-zlib") and cut == len(data) - 1:
                continue  # tifffile's trailing IFD padding: a cut of one byte may be harmless
            cases.append(ImageCase(f"{kind}: truncated to {cut} bytes", data[:cut]))
        head = data[:4] if kind.startswith("tiff") else data[:2]
        cases.append(
            ImageCase(
                f"{kind}: magic then random bytes", head + np.random.default_rng(1).bytes(600)
            )
        )
        cases.append(ImageCase(f"{kind}: magic then zeros", head + bytes(600)))
        cases.append(ImageCase(f"{kind}: magic then 0xff", head + b"\xff" * 600))
        cases.append(ImageCase(f"{kind}: asks for page 3 of 1", data, page=3))
        cases.append(ImageCase(f"{kind}: asks for page -1", data, page=-1))
    cases += [
        ImageCase("empty", b""),
        ImageCase("one NUL byte", b"\0"),
        ImageCase("text", b"stage,11-12\nembryo,7\n"),
        ImageCase("GIF", b"GIF89a" + bytes(100)),
        ImageCase("PDF", b"%PDF-1.7\n" + bytes(100)),
        ImageCase("ZIP", b"PK\x03\x04" + bytes(100)),
        ImageCase("gzip of a TIFF", zlib.compress(v["tiff"])),
        ImageCase("HTML", b"<html><script>alert(1)</script></html>"),
        ImageCase("PNG signature, JPEG body", b"\x89PNG\r\n\x1a\n" + v["jpeg"][2:]),
        ImageCase("TIFF magic, PNG body", b"II*\x00" + v["png"][8:]),
        ImageCase("big-endian TIFF magic, little-endian body", b"MM\x00*" + v["tiff"][4:]),
        ImageCase("BigTIFF magic, classic body", b"II+\x00" + v["tiff"][4:]),
        ImageCase("JPEG markers only", b"\xff\xd8\xff\xd9"),
        ImageCase("JPEG: SOI then EOI inside garbage", b"\xff\xd8\xff" + bytes(50) + b"\xff\xd9"),
        ImageCase("BMP: header only", v["bmp"][:54]),
        ImageCase(
            "BMP: declared size larger than file",
            v["bmp"][:2] + struct.pack("<I", 10**9) + v["bmp"][6:],
        ),
        ImageCase(
            "BMP: OS/2 header size 12", v["bmp"][:14] + struct.pack("<I", 12) + v["bmp"][18:]
        ),
        # zero size
        ImageCase("PNG: 0 x 0", png_of(0, 0, idat=zlib.compress(b""))),
        ImageCase("PNG: 0 x 100", png_of(0, 100, idat=zlib.compress(b""))),
        ImageCase("JPEG: 0 x 0 frame", _jpeg_with_size(v["jpeg"], 0, 0)),
        ImageCase("BMP: 0 x 0", _bmp_with_size(v["bmp"], 0, 0)),
        ImageCase("BMP: negative width", _bmp_with_size(v["bmp"], -40, 24)),
        ImageCase("TIFF: 0 x 0", _tiff_with_size(0, 0)),
        ImageCase("TIFF: 0 x 100", _tiff_with_size(0, 100)),
        # huge declared dimensions, tiny files
        ImageCase(
            "PNG: declares 2^31-1 x 2^31-1",
            png_of(2**31 - 1, 2**31 - 1, idat=zlib.compress(b"\0" * 64)),
        ),
        ImageCase(
            "PNG: declares 100000 x 100000",
            png_of(100_000, 100_000, idat=zlib.compress(b"\0" * 64)),
        ),
        ImageCase("JPEG: declares 65535 x 65535", _jpeg_with_size(v["jpeg"], 65535, 65535)),
        ImageCase("BMP: declares 2^31-1 x 2^31-1", _bmp_with_size(v["bmp"], 2**31 - 1, 2**31 - 1)),
        ImageCase("BMP: declares -2^31 height", _bmp_with_size(v["bmp"], 40, -(2**31))),
        ImageCase("TIFF: declares 4294967295 x 4294967295", _tiff_with_size(2**32 - 1, 2**32 - 1)),
        ImageCase("TIFF: declares 100000 x 100000", _tiff_with_size(100_000, 100_000)),
        ImageCase(
            "TIFF: strip offset past the end", _tiff_ifd(40, 24, [bytes(40 * 24 * 2)], 24)[:-100]
        ),
        ImageCase(
            "TIFF: IFD points to itself",
            _tiff_ifd(40, 24, [bytes(40 * 24 * 2)], 24, next_ifd=8),
            "ok",
        ),
        ImageCase(
            "TIFF: IFD offset past the end", b"II*\x00" + struct.pack("<I", 10**9) + bytes(100)
        ),
        ImageCase("TIFF: IFD offset 0 (no pages)", b"II*\x00" + struct.pack("<I", 0) + bytes(100)),
        ImageCase(
            "TIFF: 65535 tags declared", b"II*\x00" + struct.pack("<IH", 8, 65535) + bytes(200)
        ),
        ImageCase(
            "TIFF: zlib strip of garbage",
            _tiff_ifd(40, 24, [b"\x78\x9c" + b"\x13" * 200], 24, compression=8),
        ),
        ImageCase(
            "TIFF: unknown compression 60000",
            _tiff_ifd(40, 24, [bytes(1920)], 24, compression=60000),
        ),
        ImageCase("TIFF: 1-bit samples", _tiff_ifd(40, 24, [bytes(120)], 24, bits=1), "ok"),
        ImageCase("TIFF: 12-bit samples", _tiff_ifd(40, 24, [bytes(1440)], 24, bits=12)),
        ImageCase(
            "TIFF: complex samples",
            _tiff_ifd(40, 24, [bytes(40 * 24 * 8)], 24, bits=64, sample_format=6),
        ),
        # multi-page oddities
        ImageCase(
            "TIFF: 3 pages of different sizes, page 2",
            _multipage(small_image(), small_image(8, 8), small_image(64, 16)),
            "ok",
            page=2,
        ),
        ImageCase(
            "TIFF: 3 pages, page 3",
            _multipage(small_image(), small_image(8, 8), small_image(64, 16)),
            page=3,
        ),
        ImageCase(
            "TIFF: a 5-D hyperstack",
            tiff_of(np.zeros((2, 3, 4, 8, 8), np.uint16), photometric="minisblack"),
            "any",
        ),
        ImageCase("TIFF: 1 x 1 x 1 stack", tiff_of(np.zeros((1, 1, 1), np.uint16)), "ok"),
        ImageCase(
            "TIFF: RGBA float32",
            tiff_of(np.random.default_rng(0).random((8, 8, 4), np.float32), photometric="rgb"),
            "ok",
        ),
        ImageCase(
            "TIFF: 7 samples per pixel",
            tiff_of(np.zeros((8, 8, 7), np.uint8), planarconfig="contig", photometric="minisblack"),
        ),
        ImageCase("TIFF: 1 x 100000 strip", tiff_of(np.zeros((1, 100_000), np.uint8)), "ok"),
        # bombs: tiny files, huge images
        ImageCase("PNG bomb: 10001 x 10000 zeros (over 100 MP)", png_of(10_001, 10_000), bomb=True),
    ]
    if include_bombs:
        # 64 MP (inside the 100 MP default) but 1.4 GiB decoded (over the 512 MiB
        # FLYSTAGE_MAX_DECODED_MB), from about 1 MB: refused from the header.
        cases.append(
            ImageCase(
                "TIFF bomb: 8000 x 8000 float64 RGB zlib (1.4 GiB decoded)",
                float64_rgb_bomb(8000),
                bomb=True,
            )
        )
    return cases


@dataclass
class FileCase:
    name: str
    path: Path
    expect: str = "error"


def image_file_cases(root: Path) -> list[FileCase]:
    """Hostile image files under ``root``: every byte case plus what only a file system can do."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[FileCase] = []
    for i, case in enumerate(image_bytes_cases(include_bombs=False)):
        if case.page != 0:
            continue
        path = root / f"bytes-{i:03d}.tif"
        path.write_bytes(case.data)
        cases.append(FileCase(f"file: {case.name}", path, case.expect))
    good = valid_images()["tiff"]
    (root / "a folder.tif").mkdir(exist_ok=True)
    cases.append(FileCase("a folder named .tif", root / "a folder.tif"))
    cases.append(FileCase("missing file", root / "missing.tif"))
    empty = root / "empty.tif"
    empty.write_bytes(b"")
    cases.append(FileCase("empty file", empty))
    loop = root / "loop.tif"
    if not os.path.lexists(loop):
        os.symlink("loop.tif", loop)
    cases.append(FileCase("symbolic-link loop", loop))
    a, b = root / "ping.tif", root / "pong.tif"
    for src, dst in ((a, "pong.tif"), (b, "ping.tif")):
        if not os.path.lexists(src):
            os.symlink(dst, src)
    cases.append(FileCase("two links pointing at each other", a))
    dangling = root / "dangling.tif"
    if not os.path.lexists(dangling):
        os.symlink("nowhere/at/all.tif", dangling)
    cases.append(FileCase("dangling link", dangling))
    fifo = root / "fifo.tif"
    if not os.path.lexists(fifo):
        os.mkfifo(fifo)
    cases.append(FileCase("a FIFO (would block a naive open)", fifo))
    cases.append(FileCase("a character device", Path("/dev/zero")))
    cases.append(FileCase("a path through a file", root / "empty.tif" / "x.tif"))
    # Valid content under odd names: read normally.
    odd = {
        "non-UTF-8 name": os.fsdecode(b"caf\xe9-\xff.tif"),
        "newline in name": "two\nlines.tif",
        "leading dash": "-rf.tif",
        "formula name": "=cmd()+1.tif",
        "name of 250 bytes": "e" * 246 + ".tif",
        "spaces and unicode": "émbryo 12 ✓.tif",
        "no suffix": "embryo",
        "PNG named .tif": "really-a-png.tif",
    }
    for label, name in odd.items():
        path = root / name
        path.write_bytes(valid_images()["png"] if "PNG" in label else good)
        cases.append(FileCase(f"valid image, {label}", path, "ok"))
    link = root / "link-to-valid.tif"
    if not os.path.lexists(link):
        os.symlink(root / "embryo", link)
    cases.append(FileCase("link to a valid image", link, "ok"))
    return cases


# ---- mutations (hypothesis) -------------------------------------------------------------------


def flip_bits(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for p in positions:
        out[(p // 8) % len(out)] ^= 1 << (p % 8)
    return bytes(out)


def splice(a: bytes, b: bytes, cut_a: int, cut_b: int) -> bytes:
    return a[: cut_a % (len(a) + 1)] + b[cut_b % (len(b) + 1) :]


# ---- CSV ------------------------------------------------------------------------------------

MANIFEST_HEADER = "path,label,group,split,sha1\n"
LABELS_HEADER = "path,label,group\n"
UNDO_HEADER = "old,new\n"


@dataclass
class CsvCase:
    name: str
    data: bytes


def csv_cases(header: str, row: Callable[[str], str]) -> list[CsvCase]:
    """Hostile CSV files for a reader with ``header``; ``row(path)`` writes one row naming
    ``path``."""
    h = header.encode()
    good = row("img.tif").encode()
    columns = header.count(",") + 1
    return [
        CsvCase("empty file", b""),
        CsvCase("BOM only", b"\xef\xbb\xbf"),
        CsvCase("header only", h),
        CsvCase("random bytes", np.random.default_rng(2).bytes(4000)),
        CsvCase("Latin-1 text", h + row("caf\u00e9.tif").encode("latin-1")),
        CsvCase("UTF-16 with BOM", (header + row("img.tif")).encode("utf-16")),
        CsvCase("NUL bytes in a path", h + row("a\x00b.tif").encode()),
        CsvCase("a field of 200000 characters", h + row("a" * 200_000 + ".tif").encode()),
        CsvCase("unterminated quote", h + b'"img.tif,1,g' + b"\n"),
        CsvCase("quote in the middle", h + b'im"g.tif' + good[7:]),
        CsvCase("lone carriage returns", (header + row("img.tif")).replace("\n", "\r").encode()),
        CsvCase("short row", h + b"img.tif\n"),
        CsvCase("long row", h + good.rstrip(b"\n") + b",x,y,z\n"),
        CsvCase(
            "10000 columns in the header",
            b",".join([b"c%d" % i for i in range(10_000)]) + b"\n" + good,
        ),
        CsvCase("duplicate header columns", h.rstrip(b"\n") + b"," + h),
        CsvCase("header in another case", h.upper() + good),
        CsvCase("a path of '~nobody-at-all/img.tif'", h + row("~nobody-at-all/img.tif").encode()),
        CsvCase("a path that is a symbolic-link loop", h + row("loop.tif").encode()),
        CsvCase("a path through '..' out of the folder", h + row("../../../etc/passwd").encode()),
        CsvCase("an absolute path to a device", h + row("/dev/zero").encode()),
        CsvCase("an empty path", h + row("").encode()),
        CsvCase("a path of 5000 characters", h + row("d/" * 2500 + "x.tif").encode()),
        CsvCase("formula cells", h + ",".join(["=1+1"] * columns).encode() + b"\n"),
        CsvCase("only commas", h + b"," * (columns - 1) + b"\n"),
        CsvCase("20000 short rows", h + b"img.tif\n" * 20_000),
    ]


# ---- model artefact ---------------------------------------------------------------------------


def metadata_cases(good: dict[str, Any]) -> list[tuple[str, bytes]]:
    """Tampered ``metadata.json`` contents, from the good one."""

    def edit(**changes: Any) -> bytes:
        data = json.loads(json.dumps(good))
        for key, value in changes.items():
            if value is _DELETE:
                data.pop(key, None)
            else:
                data[key] = value
        return json.dumps(data).encode()

    def edit_pre(**changes: Any) -> bytes:
        data = json.loads(json.dumps(good))
        data["preprocess"].update(changes)
        return json.dumps(data).encode()

    cases = [
        ("empty", b""),
        ("not JSON", b'{"labels": '),
        ("not UTF-8", b'{"arch": "\xff\xfe"}'),
        ("UTF-16", json.dumps(good).encode("utf-16")),
        ("a JSON list", b"[1, 2, 3]"),
        ("a JSON string", b'"model"'),
        ("null", b"null"),
        ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000),
        ("an object nested 100000 deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("random bytes", np.random.default_rng(3).bytes(2000)),
        (
            "NaN and Infinity",
            json.dumps(good).replace('"format_version": 1', '"format_version": NaN').encode(),
        ),
        ("format_version 1.0", edit(format_version=1.0)),
        ("format_version true", edit(format_version=True)),
        (
            "format_version 10**400",
            json.dumps(good)
            .replace('"format_version": 1', '"format_version": 1' + "0" * 400)
            .encode(),
        ),
        ("arch a number", edit(arch=5)),
        ("arch empty", edit(arch="")),
        ("arch a dict", edit(arch={"__class__": "os.system"})),
        ("labels a string", edit(labels="1-3,4-6")),
        ("labels empty", edit(labels=[])),
        ("labels with a number", edit(labels=["1-3", 4])),
        ("labels with null", edit(labels=["1-3", None])),
        ("labels repeated", edit(labels=["1-3", "1-3"])),
        ("labels nested lists", edit(labels=[["1-3"], ["4-6"]])),
        ("labels missing", edit(labels=_DELETE)),
        ("preprocess a list", edit(preprocess=[32, 80])),
        ("preprocess null", edit(preprocess=None)),
        ("preprocess height a string", edit_pre(height="32")),
        ("preprocess height negative", edit_pre(height=-32)),
        ("preprocess height 10**30 (mismatches input_shape)", edit_pre(height=10**30)),
        ("preprocess height a float", edit_pre(height=32.5)),
        ("preprocess channels 2", edit_pre(channels=2)),
        ("preprocess unknown key", edit_pre(evil="x")),
        (
            "preprocess margin NaN",
            json.dumps(good).replace('"margin": ', '"margin": NaN, "x_margin": ').encode(),
        ),
        ("input_shape 5", edit(input_shape=5)),
        ("input_shape strings", edit(input_shape=["1", "32", "80"])),
        ("input_shape four numbers", edit(input_shape=[1, 32, 80, 1])),
        ("input_shape wrong", edit(input_shape=[3, 32, 80])),
        ("input_shape booleans", edit(input_shape=[True, 32, 80])),
        ("metrics a list", edit(metrics=[1, 2])),
        ("manifest_sha256 a number", edit(manifest_sha256=5)),
        ("created a number", edit(created=20260101)),
        ("flystage_version a list", edit(flystage_version=["0.1"])),
    ]
    return cases


_DELETE = object()


def weights_cases(good: bytes) -> list[tuple[str, bytes]]:
    """Tampered ``weights.pt`` contents, from the good one (a torch zip file)."""
    import pickle

    import torch

    def saved(obj: Any) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch /tmp/flystage-hostile-weights-ran",))

    return [
        ("empty", b""),
        ("random bytes", np.random.default_rng(4).bytes(5000)),
        ("truncated to half", good[: len(good) // 2]),
        ("a ZIP with junk", b"PK\x03\x04" + bytes(200)),
        ("a plain pickle that runs a command", pickle.dumps(Evil())),
        ("a torch file that runs a command", saved({"state_dict": Evil()})),
        ("a list", saved([1, 2, 3])),
        ("a tensor", saved(torch.zeros(3))),
        ("a dict without state_dict", saved({"arch": "tiny"})),
        ("state_dict a list", saved({"state_dict": [1]})),
        ("labels a string", saved({"state_dict": {}, "labels": "ab", "channels": 1})),
        ("channels 7", saved({"state_dict": {}, "labels": ["a", "b"], "channels": 7})),
        ("channels true", saved({"state_dict": {}, "labels": ["a", "b"], "channels": True})),
        (
            "spec nested 100 deep",
            saved({"state_dict": {}, "labels": ["a", "b"], "channels": 1, "spec": _nested(100)}),
        ),
        (
            "unknown arch",
            saved(
                {
                    "state_dict": {},
                    "labels": ["a", "b"],
                    "channels": 1,
                    "spec": {"arch": "no-such-net"},
                }
            ),
        ),
        (
            "tensors of the wrong shape",
            saved(
                {
                    "state_dict": {"0.weight": torch.zeros(1)},
                    "labels": ["a", "b"],
                    "channels": 1,
                    "spec": {"arch": "small_cnn"},
                }
            ),
        ),
    ]


def _nested(depth: int) -> dict:
    spec: dict = {"arch": "small_cnn"}
    for _ in range(depth):
        spec = {"members": [spec]}
    return spec


WEIGHTS_MARKER = Path("/tmp/flystage-hostile-weights-ran")


@dataclass
class TarCase:
    name: str
    data: bytes


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode, info.mtime = (
        kind,
        size,
        link,
        mode,
        int(time.time()),
    )
    return info


def tar_cases(model_files: dict[str, bytes], outside: Path) -> list[TarCase]:
    """Hostile ``model.tar.gz`` files: the good model files plus one hostile member each.

    ``outside`` is a folder the archive tries to reach (it must stay untouched)."""
    good = [(_info(name, size=len(data)), data) for name, data in sorted(model_files.items())]
    victim = str(outside / "victim.txt")
    payload = b"#!/bin/sh\necho pwned\n"

    def with_member(info: tarfile.TarInfo, content: bytes | None = None) -> bytes:
        return _tar(good + [(info, content)])

    # A member that declares 8 GiB and holds 512 bytes (tarfile will not write one: by hand).
    huge = _info("model.onnx", size=2**33).tobuf(format=tarfile.GNU_FORMAT) + bytes(512)
    return [
        TarCase(
            "symlink to an absolute path outside",
            with_member(_info("model.onnx.link", tarfile.SYMTYPE, link=victim)),
        ),
        TarCase(
            "symlink climbing out with ..",
            with_member(_info("up", tarfile.SYMTYPE, link="../../../../" + victim)),
        ),
        TarCase(
            "symlink then a file written through it",
            _tar(
                good
                + [
                    (_info("escape", tarfile.SYMTYPE, link=str(outside)), None),
                    (_info("escape/victim.txt", size=len(payload)), payload),
                ]
            ),
        ),
        TarCase(
            "hard link to a file outside", with_member(_info("hard", tarfile.LNKTYPE, link=victim))
        ),
        TarCase("absolute member path", with_member(_info(victim, size=len(payload)), payload)),
        TarCase(
            "member path with ..",
            with_member(_info("../../../../" + victim.lstrip("/"), size=len(payload)), payload),
        ),
        TarCase("character device", with_member(_info("zero", tarfile.CHRTYPE))),
        TarCase("block device", with_member(_info("sda", tarfile.BLKTYPE))),
        TarCase("FIFO", with_member(_info("fifo", tarfile.FIFOTYPE))),
        TarCase(
            "setuid executable",
            with_member(_info("run.sh", size=len(payload), mode=0o4755), payload),
        ),
        TarCase(
            "a code/ folder", with_member(_info("code/inference.py", size=len(payload)), payload)
        ),
        TarCase(
            "a 64 MiB member of zeros (a gzip bomb, 64 KiB packed)",
            with_member(_info("pad.bin", size=64 << 20), bytes(64 << 20)),
        ),
        TarCase("declares an 8 GiB member, truncated", gzip.compress(huge)),
        TarCase("truncated gzip", _tar(good)[: len(_tar(good)) // 2]),
        TarCase("not gzip", b"model.onnx weights.pt metadata.json\n"),
        TarCase("empty file", b""),
        TarCase("plain (not gzipped) tar", _tar(good, mode="w")),
        TarCase("an empty archive", _tar([])),
        TarCase(
            "metadata.json is a folder",
            _tar(
                [(_info("metadata.json", tarfile.DIRTYPE, mode=0o755), None)]
                + [m for m in good if m[0].name != "metadata.json"]
            ),
        ),
    ]


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry below ``folder`` (links not followed): name -> (inode, size, first bytes)."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            head = b""
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    head = f.read(64)
            state[os.fsencode(path.relative_to(folder)).decode("latin-1")] = (
                st.st_ino,
                st.st_size,
                head,
            )
    return state


# ---- HTTP -----------------------------------------------------------------------------------


@dataclass
class HttpCase:
    name: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/invocations"
    bomb: bool = False


def _b64_json(data: bytes, **extra: Any) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode(), **extra}).encode()


def http_cases(max_payload_mb: int = 6) -> list[HttpCase]:
    """Bad ``/invocations`` requests; each must get a 4xx and leave the server serving."""
    cases = []
    for case in image_bytes_cases(include_bombs=False):
        if case.expect == "ok" or case.page != 0 or not case.data:
            continue
        cases.append(
            HttpCase(
                f"raw {case.name}",
                case.data,
                {"Content-Type": "application/octet-stream"},
                bomb=case.bomb,
            )
        )
    tiff = valid_images()["tiff"]
    cases += [
        # 25 MP (inside the pixel limit), 600 MB decoded, 586 KB sent: issue 8 item 12's bomb.
        HttpCase(
            "TIFF bomb as image/tiff", float64_rgb_bomb(), {"Content-Type": "image/tiff"}, bomb=True
        ),
        HttpCase(
            "TIFF bomb in JSON",
            _b64_json(float64_rgb_bomb()),
            {"Content-Type": "application/json"},
            bomb=True,
        ),
        HttpCase(
            "PNG bomb 10001 x 10000 as image/png",
            png_of(10_001, 10_000),
            {"Content-Type": "image/png"},
            bomb=True,
        ),
        HttpCase(
            "PNG 9000 x 9000 16-bit RGB (81 MP, over the decoded-size limit)",
            png_of(9000, 9000, bit_depth=16, colour=2),
            {"Content-Type": "image/png"},
            bomb=True,
        ),
        HttpCase("empty body", b"", {"Content-Type": "image/tiff"}),
        HttpCase("no Content-Type", tiff),
        HttpCase("text/plain", tiff, {"Content-Type": "text/plain"}),
        HttpCase("text/csv", b"a,b\n1,2\n", {"Content-Type": "text/csv"}),
        HttpCase(
            "multipart/form-data",
            b"--x\r\nContent-Disposition: form-data; name=f\r\n\r\n" + tiff + b"\r\n--x--\r\n",
            {"Content-Type": "multipart/form-data; boundary=x"},
        ),
        HttpCase("Content-Type of 4000 characters", tiff, {"Content-Type": "image/" + "x" * 4000}),
        HttpCase(
            "Content-Type with odd parameters",
            b"not an image",
            {"Content-Type": 'image/tiff; charset="\\"; x=;;;'},
        ),
        HttpCase("JSON: cut short", b'{"image": ', {"Content-Type": "application/json"}),
        HttpCase("JSON: not UTF-8", b'{"image": "\xff\xfe"}', {"Content-Type": "application/json"}),
        HttpCase(
            "JSON: UTF-16",
            json.dumps({"image": "AAAA"}).encode("utf-16"),
            {"Content-Type": "application/json"},
        ),
        HttpCase(
            "JSON: nested 100000 deep",
            b"[" * 100_000 + b"]" * 100_000,
            {"Content-Type": "application/json"},
        ),
        HttpCase(
            "JSON: object nested 50000 deep",
            b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            {"Content-Type": "application/json"},
        ),
        HttpCase(
            "JSON: a number", b"12345678901234567890123456789", {"Content-Type": "application/json"}
        ),
        HttpCase("JSON: null", b"null", {"Content-Type": "application/json"}),
        HttpCase("JSON: NaN", b"NaN", {"Content-Type": "application/json"}),
        HttpCase("JSON: image is a number", b'{"image": 5}', {"Content-Type": "application/json"}),
        HttpCase(
            "JSON: image is a list", b'{"image": ["AAAA"]}', {"Content-Type": "application/json"}
        ),
        HttpCase("JSON: image is empty", b'{"image": ""}', {"Content-Type": "application/json"}),
        HttpCase(
            "JSON: base64 with spaces", b'{"image": "AA AA"}', {"Content-Type": "application/json"}
        ),
        HttpCase("JSON: base64 of text", _b64_json(b"hello"), {"Content-Type": "application/json"}),
        HttpCase(
            "JSON: base64 of a truncated TIFF",
            _b64_json(tiff[:100]),
            {"Content-Type": "application/json"},
        ),
        HttpCase(
            "JSON: instances not a list",
            b'{"instances": "AAAA"}',
            {"Content-Type": "application/json"},
        ),
        HttpCase(
            "JSON: 17 instances",
            json.dumps([base64.b64encode(tiff).decode()] * 17).encode(),
            {"Content-Type": "application/json"},
        ),
        HttpCase("JSON: empty list", b"[]", {"Content-Type": "application/json"}),
        HttpCase(
            "JSON: k a string", _b64_json(tiff, k="three"), {"Content-Type": "application/json"}
        ),
        HttpCase(
            "JSON: k 10**100", _b64_json(tiff, k=10**100), {"Content-Type": "application/json"}
        ),
        HttpCase("JSON: k true", _b64_json(tiff, k=True), {"Content-Type": "application/json"}),
        HttpCase("JSON: k -1", _b64_json(tiff, k=-1), {"Content-Type": "application/json"}),
        HttpCase("JSON: k 1.5", _b64_json(tiff, k=1.5), {"Content-Type": "application/json"}),
        HttpCase(
            "JSON: one good and one bad image",
            json.dumps([base64.b64encode(tiff).decode(), "AAAA"]).encode(),
            {"Content-Type": "application/json"},
        ),
        HttpCase(
            "custom attributes k=abc",
            tiff,
            {"Content-Type": "image/tiff", "X-Amzn-SageMaker-Custom-Attributes": "k=abc"},
        ),
        HttpCase(
            "custom attributes k=0",
            tiff,
            {"Content-Type": "image/tiff", "X-Amzn-SageMaker-Custom-Attributes": "k=0"},
        ),
        HttpCase(
            "custom attributes k=99999999999999999999",
            tiff,
            {
                "Content-Type": "image/tiff",
                "X-Amzn-SageMaker-Custom-Attributes": "k=99999999999999999999",
            },
        ),
        HttpCase(
            "Accept text/csv only", tiff, {"Content-Type": "image/tiff", "Accept": "text/csv"}
        ),
        HttpCase(
            f"body over {max_payload_mb} MB",
            b"II*\x00" + bytes((max_payload_mb + 1) << 20),
            {"Content-Type": "image/tiff"},
        ),
        HttpCase("GET /invocations", b"", method="GET"),
        HttpCase(
            "PUT /invocations", b"II*\x00garbage", {"Content-Type": "image/tiff"}, method="PUT"
        ),
        HttpCase("DELETE /invocations", b"", method="DELETE"),
        HttpCase("unknown path", b"", method="GET", path="/../../etc/passwd"),
        HttpCase(
            "management API: DELETE /models/model", b"", method="DELETE", path="/models/model"
        ),
        HttpCase(
            "management API: POST /models?url=",
            b"",
            method="POST",
            path="/models?url=http://127.0.0.1:9/x.mar",
        ),
    ]
    return cases


# ---- running a case -------------------------------------------------------------------------


class Hang(Exception):
    """A reader that did not answer within its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`Hang` in the main thread after ``seconds`` (SIGALRM; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    kind: str  # "ok" (returned), "error" (the reader's own error), "crash" (anything else), "hang"
    detail: str
    seconds: float

    def fits(self, expect: str) -> bool:
        if self.kind in ("crash", "hang"):
            return False
        return expect == "any" or self.kind == expect


def outcome(
    call: Callable[[], Any], allowed: tuple[type[BaseException], ...], seconds: float = 60
) -> Outcome:
    """Run ``call``; classify what it did. ``allowed`` are the reader's documented errors."""
    start = time.perf_counter()
    try:
        with time_limit(seconds):
            result = call()
    except Hang as exc:
        return Outcome("hang", str(exc), time.perf_counter() - start)
    except allowed as exc:
        return Outcome("error", f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - that is what we are looking for
        return Outcome("crash", f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start)
    return Outcome("ok", type(result).__name__, time.perf_counter() - start)


# ---- the serve container --------------------------------------------------------------------


def worker_pids(container: Any) -> list[int]:
    """Host PIDs of the model server's Python workers (``docker top``)."""
    top = container.top()
    command = top["Titles"].index("CMD")
    pid = top["Titles"].index("PID")
    return sorted(int(p[pid]) for p in top["Processes"] if "model_service_worker" in p[command])


def peak_rss_mib(container: Any, pids: list[int]) -> float | None:
    """The largest VmHWM (peak resident memory over the process's life) among ``pids``, in MiB:
    read from the host's /proc, or inside the container when the host cannot see it."""
    peaks = []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks) if peaks else None


def container_peak_mib(container: Any) -> float | None:
    """The container's peak memory (cgroup v2 memory.peak, or v1 memory.max_usage_in_bytes), MiB."""
    for path in (
        f"/sys/fs/cgroup/memory/docker/{container.id}/memory.max_usage_in_bytes",
        f"/sys/fs/cgroup/system.slice/docker-{container.id}.scope/memory.peak",
    ):
        try:
            return int(Path(path).read_text()) / 2**20
        except (OSError, ValueError):
            continue
    code, out = container.exec_run(
        [
            "sh",
            "-c",
            "cat /sys/fs/cgroup/memory.peak 2>/dev/null || "
            "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes",
        ]
    )
    try:
        return int(out.decode().split()[0]) / 2**20 if code == 0 else None
    except (ValueError, IndexError):
        return None


def restart_count(container: Any) -> int:
    container.reload()
    return int(container.attrs.get("RestartCount", 0))


WORKER_DEATH = (
    "Backend worker process died",
    "Worker disconnected",
    "Load model failed",
    "WORKER_STOPPED",
)


def send(url: str, case: HttpCase, timeout: float = 60) -> tuple[int | None, str]:
    """(status, body) of one request; status None when nothing answered."""
    import requests

    try:
        response = requests.request(
            case.method, url + case.path, data=case.body, headers=case.headers, timeout=timeout
        )
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return response.status_code, response.text


def clear_error_body(status: int | None, body: str) -> bool:
    """A 4xx whose body is the serving JSON ``{"error": message, "status": code}`` without a
    traceback."""
    if status is None or not 400 <= status < 500 or "Traceback" in body:
        return False
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(document, dict)
        and isinstance(document.get("error"), str)
        and document.get("status") == status
    )


# ---- predict --rename on a hostile folder -----------------------------------------------------


def hostile_folder(root: Path, outside: Path) -> None:
    """Images under odd names, unreadable files, links to files ``outside``, a link loop, a FIFO."""
    good, png = valid_images()["tiff"], valid_images()["png"]
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "precious.tif").write_bytes(good)
    (outside / "other.png").write_bytes(png)
    root.mkdir(parents=True, exist_ok=True)
    names = {
        "plain.tif": good,
        "=cmd()+1.tif": good,
        "-rf.tif": good,
        "two\nlines.tif": good,
        os.fsdecode(b"caf\xe9.tif"): good,
        "e" * 240 + ".tif": good,
        "truncated.tif": good[:300],
        "empty.png": b"",
        "text.jpg": b"not an image",
        "sub/deeper/x.png": png,
        "already__s1-3_s4-6_s7-8.tif": good,
    }
    for name, data in names.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink(outside / "precious.tif", root / "link-out.tif")
    os.symlink(outside, root / "dir-link-out")
    os.symlink("loop.tif", root / "loop.tif")
    os.symlink(outside / "gone.tif", root / "dangling.tif")
    os.mkfifo(root / "fifo.tif")


def inodes(folder: Path) -> set[int]:
    """The inodes of the regular files below ``folder`` (links not followed)."""
    found = set()
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            st = os.lstat(Path(dirpath) / name)
            if stat.S_ISREG(st.st_mode):
                found.add(st.st_ino)
    return found


# ---- predictions files (flystage review) --------------------------------------------------------

PREDICTIONS_HEADER = "file,stage_1,p_1,stage_2,p_2,stage_3,p_3,error\n"


def predictions_row(path: str) -> str:
    return f"{path},11-12,0.9,9-10,0.05,13-16,0.05,\n"


def predictions_json_cases() -> list[tuple[str, bytes]]:
    """Tampered predictions JSON (``flystage predict``'s
    ``{"predictions": [...], "model": {...}}``)."""

    def doc(*entries: Any, **extra: Any) -> bytes:
        return json.dumps(
            {"predictions": list(entries), "model": {"labels": ["1-3", "4-6"]}, **extra}
        ).encode()

    top = [{"stage": "11-12", "probability": 0.9}]
    return [
        ("empty", b""),
        ("not JSON", b'{"predictions": '),
        ("not UTF-8", b'{"predictions": [{"file": "\xff"}]}'),
        ("a list", b"[1, 2]"),
        ("null", b"null"),
        ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000),
        (
            "predictions nested 100000 deep",
            b'{"predictions": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        ),
        ("predictions a string", doc().replace(b"[]", b'"x"')),
        ("no predictions", b'{"model": {}}'),
        ("an entry that is a number", doc(5)),
        ("an entry without file", doc({"top": top})),
        ("file a number", doc({"file": 5, "top": top})),
        ("file with a NUL byte", doc({"file": "a\u0000b.tif", "top": top})),
        ("file of 5000 characters", doc({"file": "d/" * 2500 + "x.tif", "top": top})),
        ("file a link loop", doc({"file": "loop.tif", "top": top})),
        ("top a string", doc({"file": "img.tif", "top": "11-12"})),
        (
            "probability a word",
            doc({"file": "img.tif", "top": [{"stage": "11-12", "probability": "high"}]}),
        ),
        (
            "probability NaN",
            doc({"file": "img.tif", "top": [{"stage": "11-12", "probability": float("nan")}]}),
        ),
        (
            "probability 1e999",
            doc({"file": "img.tif", "top": [{"stage": "11-12", "probability": 1e308}]}).replace(
                b"1e+308", b"1e999"
            ),
        ),
        (
            "stage a dict",
            doc({"file": "img.tif", "top": [{"stage": {"x": 1}, "probability": 0.5}]}),
        ),
        ("model a list", doc({"file": "img.tif", "top": top}, model=[1])),
    ]
