"""Tiny synthetic embryo sets for the training tests (data, train, SageMaker contract)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from flystage.manifest import Record, file_sha1, write_manifest

LABELS = ("1-3", "4-6", "7-8")
# Tiny model input: training steps take milliseconds.
TINY_PREPROCESS = {"height": 32, "width": 80, "channels": 1}
# The same tiny run on the command line (train, crossval, the SageMaker entry point).
TINY_ARGS = (
    "--arch small_cnn --batch_size 8 --threads 1 --height 32 --width 80 --channels 1".split()
)


def train_command(*args) -> list[str]:
    """The argv that runs ``flystage train`` with args in a fresh Python (as a job does)."""
    return [sys.executable, "-m", "flystage", "train", *map(str, args)]


def tiny_config(**changes):
    """A ``TrainConfig`` for a tiny small_cnn run (3 epochs, one thread); ``changes`` override.
    (flystage.training is imported here: the torch-free tests import this module too.)"""
    from flystage.imaging import PreprocessConfig
    from flystage.training.config import TrainConfig

    base = dict(
        arch="small_cnn",
        epochs=3,
        batch_size=8,
        learning_rate=0.003,
        threads=1,
        preprocess=PreprocessConfig(**TINY_PREPROCESS),
    )
    return TrainConfig(**(base | changes))


def embryo_image(label_index: int, seed: int, height: int = 84, width: int = 220) -> np.ndarray:
    """A grey uint8 ``(height, width)`` picture: a bright ellipse on black, with
    ``2 + 2 * label_index`` dark bands across it (the class), at a jittered position."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), np.uint8)
    cx = width // 2 + int(rng.integers(-10, 11))
    cy = height // 2 + int(rng.integers(-5, 6))
    axes = (int(width * 0.38), int(height * 0.33))
    cv2.ellipse(image, (cx, cy), axes, float(rng.uniform(-8, 8)), 0, 360, 200, -1)
    bands = 2 + 2 * label_index
    for i in range(bands):
        x = cx - axes[0] + int((i + 0.5) * 2 * axes[0] / bands)
        cv2.line(image, (x, 0), (x, height - 1), 60, 3)
    noise = rng.normal(0, 8, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def make_tree(root: Path, per_class: int = 4, labels=LABELS, seed: int = 0) -> list[Path]:
    """``root/<label>/<label>_<i>.png`` images; returns their paths."""
    paths = []
    for k, label in enumerate(labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = root / label / f"{label}_{i}.png"
            cv2.imwrite(str(path), embryo_image(k, seed * 10_000 + k * 100 + i))
            paths.append(path)
    return paths


def make_manifest_set(
    root: Path, train_per_class: int = 4, valid_per_class: int = 2, labels=LABELS
) -> Path:
    """A tree plus ``root/manifest.csv``: the first ``train_per_class`` images of each label
    are train, the rest valid; every image its own group. Returns the manifest path."""
    make_tree(root, train_per_class + valid_per_class, labels)
    records = []
    for label in labels:
        for i in range(train_per_class + valid_per_class):
            path = root / label / f"{label}_{i}.png"
            split = "train" if i < train_per_class else "valid"
            records.append(Record(path, label, f"{label}_{i}", split, file_sha1(path)))
    return write_manifest(records, root / "manifest.csv")


def copy_bdgp_subset(
    bdgp_root: Path, dest: Path, per_stage: int = 3, stages=("4-6", "11-12", "13-16"), skip: int = 0
) -> Path:
    """Copy real BDGP images into ``dest/<stage>/`` (a channel tree): of each stage, the
    ``per_stage`` images after the first ``skip`` (by path)."""
    for stage in stages:
        found = sorted(bdgp_root.glob(f"*/{stage}/*.bmp"))[skip : skip + per_stage]
        assert len(found) == per_stage, f"BDGP has fewer than {per_stage} images of {stage}"
        (dest / stage).mkdir(parents=True, exist_ok=True)
        for path in found:
            shutil.copy2(path, dest / stage / f"{path.parent.parent.name}_{path.name}")
    return dest


def bdgp_records(
    bdgp_root: Path,
    train_per_stage: int = 4,
    valid_per_stage: int = 2,
    stages=("4-6", "11-12", "13-16"),
) -> tuple[list[Record], list[Record]]:
    """Train and valid records of real BDGP images, read in place: of each stage, the first
    ``train_per_stage`` images (by path) to train on and the next ``valid_per_stage`` to
    validate."""
    train, valid = [], []
    for stage in stages:
        found = sorted(bdgp_root.glob(f"*/{stage}/*.bmp"))[: train_per_stage + valid_per_stage]
        assert len(found) == train_per_stage + valid_per_stage, (
            f"BDGP has too few images of {stage}"
        )
        for i, path in enumerate(found):
            split = "train" if i < train_per_stage else "valid"
            record = Record(path, stage, path.parent.parent.name, split, file_sha1(path))
            (train if split == "train" else valid).append(record)
    return train, valid


def count_extracted(monkeypatch) -> list[int]:
    """Watch the linear probe's feature extraction: returns a list that gets the number of
    images of every ``flystage.training.probe.extract`` call (which still runs as it is)."""
    import flystage.training.probe

    counts: list[int] = []
    real_extract = flystage.training.probe.extract

    def counting_extract(features, images, batch_size=32):
        counts.append(len(images))
        return real_extract(features, images, batch_size)

    monkeypatch.setattr(flystage.training.probe, "extract", counting_extract)
    return counts


# Five small BDGP genes (63 images, every stage): the SDK and folder-channel tests' set.
BDGP_GENES = ("DNaseII", "Dms", "Dmn", "Dif", "dhd")


def copy_bdgp_genes(bdgp_root: Path, dest: Path, genes=BDGP_GENES) -> Path:
    """BDGP genes as a lab shares them, ``dest/<gene>/<stage>/<image>.bmp``; returns ``dest``."""
    for gene in genes:
        shutil.copytree(bdgp_root / gene, dest / gene)
    return dest
