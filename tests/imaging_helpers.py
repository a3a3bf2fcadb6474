"""Synthetic embryo images for the imaging and augmentation tests (and the benchmark).

The lab's images are 1110x420, 16-bit, and dim: a black background near 100-200 counts out
of 65535 and an embryo a little brighter with faint grey lines up to about 900.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import tifffile

LAB_HEIGHT, LAB_WIDTH = 420, 1110
# The imaging and augmentation tests place marks in pixels of a 128x320 model input.
SIZE = {"height": 128, "width": 320}


def ellipse_mask(
    height: int,
    width: int,
    length: float,
    aspect: float = 2.6,
    angle: float = 0.0,
    centre: tuple[int, int] | None = None,
) -> np.ndarray:
    """A filled ellipse, bool (height, width): long axis ``length`` pixels at ``angle`` degrees."""
    mask = np.zeros((height, width), np.uint8)
    cx, cy = centre or (width // 2, height // 2)
    axes = (int(length / 2), int(length / 2 / aspect))
    # cv2.ellipse's angle turns clockwise as displayed (y points down).
    cv2.ellipse(mask, (cx, cy), axes, angle, 0, 360, 255, thickness=-1)
    return mask > 0


def dim_embryo(
    height: int = LAB_HEIGHT,
    width: int = LAB_WIDTH,
    angle: float = 0.0,
    length: float | None = None,
    aspect: float = 2.6,
    seed: int = 0,
) -> np.ndarray:
    """A lab-like fluorescence image, uint16 (height, width), values about 100-900.

    Background ~150 with noise; the embryo (an ellipse ``aspect``:1) ~300 with concentric
    faint lines ~900.
    """
    rng = np.random.default_rng(seed)
    length = length or 0.7 * min(width, height * aspect)
    img = 150.0 + rng.normal(0.0, 12.0, (height, width))
    body = ellipse_mask(height, width, length, aspect, angle)
    img[body] += 170.0
    lines = np.zeros((height, width), np.uint8)
    for k in range(1, 6):
        axes = (int(length / 2 * k / 6), int(length / 2 / aspect * k / 6))
        cv2.ellipse(lines, (width // 2, height // 2), axes, angle, 0, 360, 255, thickness=2)
    img[lines > 0] = 900.0
    return np.clip(img, 100, 900).astype(np.uint16)


def brightfield_embryo(
    height: int = 128, width: int = 320, angle: float = 0.0, seed: int = 0
) -> np.ndarray:
    """A BDGP-like in situ image, uint8 RGB (height, width, 3): white background, cream
    embryo with a purple stain patch."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 255.0)
    body = ellipse_mask(height, width, 0.85 * width, 2.6, angle)
    img[body] = (225.0, 215.0, 190.0)
    stain = (
        ellipse_mask(height, width, 0.25 * width, 1.5, angle, centre=(width // 3, height // 2))
        & body
    )
    img[stain] = (110.0, 80.0, 170.0)
    img += rng.normal(0.0, 4.0, img.shape) * body[:, :, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def tiff_bytes(image: np.ndarray, **kwargs) -> bytes:
    """``image`` written as a TIFF file's content."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, image, **kwargs)
    return buf.getvalue()


def encode(image: np.ndarray, ext: str) -> bytes:
    """``image`` (grey or RGB) encoded by OpenCV as ``ext`` ('.png', '.bmp', '.jpg')."""
    if image.ndim == 3:
        code = cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR
        image = cv2.cvtColor(image, code)
    ok, buf = cv2.imencode(ext, image)
    assert ok, ext
    return buf.tobytes()


def foreground_box(channel: np.ndarray, threshold: float = 0.05) -> tuple[int, int]:
    """(height, width) of the bounding box of pixels above ``threshold``."""
    ys, xs = np.nonzero(channel > threshold)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
