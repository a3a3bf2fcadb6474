"""The lab's unlabelled images in the probe: feature statistics and self-training, on real
BDGP images."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from flystage.options import UsageError
from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache
from flystage.training.ensemble import train_model
from flystage.training.probe import extract
from flystage.training.train import main
from serving_helpers import bdgp_records


@pytest.fixture(scope="module")
def sets(bdgp_root):
    """Training and validation images, and as many others of the same stages, unlabelled."""
    torch.set_num_threads(1)
    train, valid = bdgp_records(bdgp_root, train_per_stage=4, valid_per_stage=2)
    more, _ = bdgp_records(bdgp_root, train_per_stage=10, valid_per_stage=0)
    used = {r.path for r in (*train, *valid)}
    unlabelled = [r for r in more if r.path not in used]
    labels = sorted({r.label for r in train}, key=lambda s: int(s.split("-")[0]))
    return train, valid, unlabelled, labels, ImageCache(TrainConfig().preprocess)


def quiet(line: str) -> None:
    pass


def test_features_are_standardised_by_the_training_and_unlabelled_images(sets) -> None:
    train, valid, unlabelled, labels, cache = sets
    paths = [r.path for r in unlabelled]

    def probe(**changes):
        config = TrainConfig(threads=1, **changes)
        return train_model(
            train, valid, config, log=quiet, labels=labels, image_cache=cache, unlabelled=paths
        )

    result = probe()
    net = result.model.model  # Calibrated(ProbeNet)
    both = extract(net.features, cache.get([r.path for r in train] + paths))
    assert torch.allclose(net.mean, both.mean(0), atol=1e-5)
    alone = probe(unlabelled_standardise=False).model.model
    assert not torch.allclose(alone.mean, net.mean, atol=1e-3)
    # Self-training is on by default when there are unlabelled images, and takes none without.
    assert result.pseudo_labels
    assert probe(self_training=0.0).pseudo_labels == []
    none = train_model(
        train, valid, TrainConfig(threads=1), log=quiet, labels=labels, image_cache=cache
    )
    assert none.pseudo_labels == []


def test_self_training_takes_confident_unlabelled_images_and_logs_the_share(sets) -> None:
    train, valid, unlabelled, labels, cache = sets
    lines: list[str] = []
    result = train_model(
        train,
        valid,
        TrainConfig(threads=1, self_training=0.5),
        log=lines.append,
        labels=labels,
        image_cache=cache,
        unlabelled=[r.path for r in unlabelled],
    )
    taken = result.pseudo_labels
    assert 0 < len(taken) <= len(unlabelled)
    assert all(p.probability >= 0.5 and p.label in labels for p in taken)
    truth = {r.path: r.label for r in unlabelled}
    right = np.mean([truth[p.path] == p.label for p in taken])
    assert right > 1 / len(labels)  # better than chance: the pseudo-labels carry information
    line = next(line for line in lines if line.startswith("self-training:"))
    assert f"{len(taken)} of {len(unlabelled)} unlabelled images" in line
    stricter = train_model(
        train,
        valid,
        TrainConfig(threads=1, self_training=0.95),
        log=quiet,
        labels=labels,
        image_cache=cache,
        unlabelled=[r.path for r in unlabelled],
    )
    assert len(stricter.pseudo_labels) < len(taken)


def test_unlabelled_images_need_the_probe(sets) -> None:
    train, valid, unlabelled, labels, cache = sets
    config = TrainConfig(arch="small_cnn", mode="full", epochs=1, threads=1)
    with pytest.raises(UsageError, match="used by the probe only"):
        train_model(train, valid, config, log=quiet, labels=labels, unlabelled=[unlabelled[0].path])
    with pytest.raises(ValueError, match=r"self_training must be a probability"):
        TrainConfig(self_training=1.5)


def test_train_command_reads_an_unlabelled_folder(sets, tmp_path, capsys) -> None:
    from flystage.manifest import write_manifest

    train, valid, unlabelled, _, _ = sets
    # One group per image: bdgp_records draws a gene's images into both splits.
    records = [dataclasses.replace(r, group=r.path.stem) for r in (*train, *valid)]
    manifest = write_manifest(records, tmp_path / "manifest.csv")
    folder = tmp_path / "lab-images" / "session-1"
    folder.mkdir(parents=True)
    for r in unlabelled[:12]:
        shutil.copy2(r.path, folder / f"{r.label}-{r.path.name}")
    (folder / "notes.txt").write_text("not an image")
    args = ["--manifest", str(manifest), "--model-dir", str(tmp_path / "model"), "--threads", "1"]
    code = main([*args, "--unlabelled", str(tmp_path / "lab-images"), "--self_training", "0.5"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "unlabelled: 12 images from" in out and "self-training:" in out
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["train_config"]["self_training"] == 0.5
    assert metadata["pseudo_labelled_images"] == int(out.split("self-training: ")[1].split()[0])
    code = main([*args, "--force", "--unlabelled", str(tmp_path / "missing")])
    assert code == 1
    assert "--unlabelled" in capsys.readouterr().err
