""" "What the model looked at": occlusion sensitivity on the ONNX model (no torch needed).

A black patch (the value the preprocessing gives the masked background, so an occluded part
looks like "no embryo here" rather than a new object) slides over the model input; the drop
of the probability of the stage in question at each position is the map. It needs only the
model's forward pass, so it works on every artefact, served or local, and costs one batch of
a few hundred model inputs: computed on request for one image, never for the whole grid.
"""

from __future__ import annotations

import cv2
import numpy as np

from flystage.files import png_bytes
from flystage.predictor import Predictor

OVERLAY_SCALE = 3  # the map is shown larger than the 96 x 240 model input


def occlusion_map(
    predictor: Predictor,
    array: np.ndarray,
    target: int | None = None,
    patch: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Probability drop of class ``target`` (default: the predicted one) per pixel, ``(H, W)``
    float32 >= 0, for one model input ``array`` float32 ``(C, H, W)``. ``patch`` defaults to a
    quarter of the height, ``stride`` to half the patch; each pixel gets the mean drop of the
    patches covering it."""
    c, h, w = array.shape
    patch = patch or max(4, h // 4)
    stride = stride or max(2, patch // 2)
    probs = predictor.predict_arrays(array[None])[0]
    target = int(probs.argmax()) if target is None else target
    base = float(probs[target])
    ys = list(range(0, max(1, h - patch) + 1, stride))
    xs = list(range(0, max(1, w - patch) + 1, stride))
    positions = [(y, x) for y in ys for x in xs]
    drops = np.zeros(len(positions), np.float32)
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        batch = np.repeat(array[None], len(chunk), axis=0)
        for j, (y, x) in enumerate(chunk):
            batch[j, :, y : y + patch, x : x + patch] = 0.0
        drops[start : start + len(chunk)] = base - predictor.predict_arrays(batch)[:, target]
    heat = np.zeros((h, w), np.float32)
    cover = np.zeros((h, w), np.float32)
    for (y, x), d in zip(positions, drops):
        heat[y : y + patch, x : x + patch] += max(0.0, float(d))
        cover[y : y + patch, x : x + patch] += 1.0
    return heat / np.maximum(cover, 1.0)


def overlay_png(array: np.ndarray, heat: np.ndarray) -> bytes:
    """The model input in grey with the map in colour over it (red = the model needed this part)."""
    grey = array.mean(axis=0) if array.shape[0] > 1 else array[0]
    grey8 = np.clip(grey * 255.0, 0, 255).astype(np.uint8)
    peak = float(heat.max())
    norm = (heat / peak) if peak > 0 else heat
    colour = cv2.applyColorMap(np.clip(norm * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(grey8, cv2.COLOR_GRAY2BGR)
    # Blend only where the map says something, so the embryo stays visible elsewhere.
    alpha = (0.6 * norm)[:, :, None]
    blended = (base * (1 - alpha) + colour * alpha).astype(np.uint8)
    h, w = grey.shape
    blended = cv2.resize(
        blended, (w * OVERLAY_SCALE, h * OVERLAY_SCALE), interpolation=cv2.INTER_NEAREST
    )
    return png_bytes(blended[:, :, ::-1])  # OpenCV's colour map is BGR; png_bytes takes RGB
