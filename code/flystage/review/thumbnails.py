"""Thumbnails made with the toolkit's own preprocessing, cached on disk.

A thumbnail is the model's input for that image (``flystage.imaging.load`` with the model's
``PreprocessConfig``): the biologist sees what the model saw, masked, aligned and cropped,
not a prettier picture. The "original" view is the whole frame with only the contrast
stretched, since the lab's 16-bit TIFFs look black as they are.

Files are keyed by the image's absolute path, size and modification time and the
preprocessing settings, so an edited image or another model never shows a stale picture, and
one cache folder can serve every review session of a user.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import cv2

from flystage.files import atomic_write, png_bytes
from flystage.imaging import PreprocessConfig, load, stretch_contrast
from flystage.reading import read_image

CACHE_VERSION = "1"
ORIGINAL_WIDTH = 900  # wide enough to see an embryo's stripes, small enough to load at once


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flystage" / "thumbnails"


class ThumbnailCache:
    """``thumbnail(path)`` and ``original(path)`` as PNG bytes, made once and kept in ``folder``."""

    def __init__(self, folder: str | Path, config: PreprocessConfig):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._settings = json.dumps(config.to_dict(), sort_keys=True)
        # One lock per file being made: a page request and the warming thread asking for the
        # same thumbnail make it once (on a cold start they would otherwise race for the cores).
        self._making: dict[Path, threading.Lock] = {}
        self._making_lock = threading.Lock()

    def _key(self, path: Path, kind: str) -> Path:
        st = path.stat()
        text = f"{CACHE_VERSION}|{kind}|{path}|{st.st_size}|{st.st_mtime_ns}|{self._settings}"
        digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
        return self.folder / digest[:2] / f"{digest}.png"

    def _cached(self, path: Path, kind: str, make) -> bytes:
        key = self._key(path, kind)
        try:
            return key.read_bytes()
        except FileNotFoundError:
            pass
        with self._making_lock:
            lock = self._making.setdefault(key, threading.Lock())
        try:
            with lock:
                try:
                    return key.read_bytes()  # made by another thread while this one waited
                except FileNotFoundError:
                    return self._make(key, path, make)
        finally:
            with self._making_lock:
                self._making.pop(key, None)

    @staticmethod
    def _make(key: Path, path: Path, make) -> bytes:
        data = make(path)
        # Atomic: a reader never sees half a PNG, and two threads making the same thumbnail
        # both end with a whole file. No fsync: a cache file lost in a crash is made again.
        with atomic_write(key, "wb", fsync=False) as f:
            f.write(data)
        return data

    def thumbnail(self, path: Path) -> bytes:
        """What the model saw: the preprocessed input, as a PNG."""

        def make(p: Path) -> bytes:
            return png_bytes(load(p, self.config, name=str(p)), channels_first=True)

        return self._cached(path, "model-input", make)

    def original(self, path: Path) -> bytes:
        """The whole frame, contrast stretched (percentiles as the model's), at most
        ``ORIGINAL_WIDTH`` wide."""

        def make(p: Path) -> bytes:
            image = read_image(p, page=self.config.page, name=str(p))
            h, w = image.shape[:2]
            if w > ORIGINAL_WIDTH:
                image = cv2.resize(
                    image,
                    (ORIGINAL_WIDTH, max(1, round(h * ORIGINAL_WIDTH / w))),
                    interpolation=cv2.INTER_AREA,
                )
            x = stretch_contrast(image, self.config.low_percentile, self.config.high_percentile)
            return png_bytes(x)

        return self._cached(path, "original", make)

    def warm(self, paths: Iterable[Path], stop: threading.Event | None = None) -> threading.Thread:
        """Make the thumbnails of ``paths`` on a background thread (first pages first), so that
        scrolling later finds them cached; unreadable images are left to the request to report."""

        def work() -> None:
            for path in paths:
                if stop is not None and stop.is_set():
                    return
                try:
                    self.thumbnail(path)
                except (ValueError, OSError):
                    continue

        thread = threading.Thread(target=work, name="flystage-thumbnails", daemon=True)
        thread.start()
        return thread
