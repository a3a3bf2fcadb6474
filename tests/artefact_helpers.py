"""Test helpers: synthetic embryo images and a tiny real model artefact (torch -> ONNX)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

LABELS = ["1-3", "4-6", "7-8", "9-10"]


def embryo(height: int = 42, width: int = 111, seed: int = 0, dtype=np.uint16) -> np.ndarray:
    """A dim elliptical "embryo" with faint stripes on a dark noisy background (lab-like)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(200, 20, (height, width))
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(
        mask, (width // 2, height // 2), (int(width * 0.4), int(height * 0.35)), 0, 0, 360, 1, -1
    )
    stripes = 1 + 0.5 * np.sin(np.arange(width) / (2 + seed % 5))[None, :]
    img += mask.astype(np.float64) * (600 + 150 * (seed % 4)) * stripes
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    return np.clip(img if dtype != np.uint8 else img / 8, 0, top).astype(dtype)


def write_image(path: Path, seed: int) -> Path:
    """A small image file; the format follows the suffix (.tif 16-bit, .png/.bmp/.jpg 8-bit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(path, embryo(seed=seed))
    else:
        ok = cv2.imwrite(str(path), embryo(seed=seed, dtype=np.uint8))
        assert ok, path
    return path


def tiny_model(channels: int = 1, num_classes: int = len(LABELS), seed: int = 0):
    """A few-parameter CNN with the models' contract: (N, C, H, W) in [0, 1] -> logits (N, K)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )
    with torch.no_grad():
        # Larger weights than the default init, so the probabilities differ between images.
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def tiny_config():
    from flystage.imaging import PreprocessConfig

    return PreprocessConfig(height=32, width=80, channels=1)


def make_artefact(model_dir: Path, labels=LABELS, manifest_sha256: str | None = "0" * 64):
    """Save ``tiny_model`` as a real artefact; returns (model, metadata)."""
    import torch

    torch.set_num_threads(1)
    from flystage.training.export import save_artefact

    model = tiny_model(num_classes=len(labels))
    metadata = save_artefact(
        model_dir, model, "tiny", labels, tiny_config(), {"valid_top3": 0.5}, manifest_sha256
    )
    return model, metadata
