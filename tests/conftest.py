"""Fixtures shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BDGP = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))
STAGES15 = Path(
    os.environ.get("FLYSTAGE_STAGES15", REPO.parent / "shared" / "data" / "bdgp-stages15")
)

# Importing sagemaker_training or sagemaker_inference without /opt/ml creates
# ~/sagemaker_local as a side effect; point them at a scratch tree instead.
os.environ.setdefault(
    "SAGEMAKER_BASE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "flystage-test-opt-ml")
)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def bdgp_root() -> Path:
    """The real BDGP images (``<gene>/<stage>/<id>.bmp``); the env var FLYSTAGE_DATA moves it."""
    if not (BDGP / "labels.csv").is_file():
        pytest.fail(f"BDGP images not found at {BDGP}: set FLYSTAGE_DATA to the bdgp-insitu folder")
    return BDGP


@pytest.fixture(scope="session")
def stages15_root() -> Path:
    """BDGP's 80x32 grey images staged one by one (``images/cNN/<id>.bmp``, 15 classes); the
    env var FLYSTAGE_STAGES15 moves it. An optional data set: its tests are skipped without it."""
    if not (STAGES15 / "labels.csv").is_file():
        pytest.skip(
            f"bdgp-stages15 images not found at {STAGES15}: set FLYSTAGE_STAGES15 to the "
            "bdgp-stages15 folder to run this test"
        )
    return STAGES15


@pytest.fixture(scope="session")
def trained_default(bdgp_root: Path, tmp_path_factory):
    """``flystage train`` (in this process) of the default model on 11 real BDGP images per
    stage, 3 per stage to validate on: (model dir, train records, valid records, log). Shared
    by every test that needs a really trained model; copy the model before changing it."""
    import contextlib
    import dataclasses
    import io

    from flystage.manifest import read_manifest, write_manifest
    from flystage.training.train import main
    from train_helpers import bdgp_records

    root = tmp_path_factory.mktemp("trained-default")
    stages = ("1-3", "4-6", "7-8", "9-10", "11-12", "13-16")
    train, valid = bdgp_records(bdgp_root, train_per_stage=11, valid_per_stage=3, stages=stages)
    # Each image its own group: a gene may give both training and validation images here.
    manifest = write_manifest(
        [dataclasses.replace(r, group=f"{r.group}/{r.path.stem}") for r in (*train, *valid)],
        root / "manifest.csv",
    )
    model_dir = root / "model"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--manifest", str(manifest), "--model_dir", str(model_dir), "--threads", "2"])
    assert code == 0, out.getvalue()
    train, valid = [
        [r for r in read_manifest(manifest) if r.split == split] for split in ("train", "valid")
    ]
    return model_dir, train, valid, out.getvalue()


@pytest.fixture(scope="session")
def int8_model(trained_default) -> Path:
    """The model directory of ``trained_default``, with the int8 graph training kept: for
    predict and serve tests (copy it before changing it)."""
    from flystage.artefact import int8_record, load_metadata

    model_dir = trained_default[0]
    record = int8_record(load_metadata(model_dir))
    assert record.get("kept"), f"training did not keep the int8 graph: {record}"
    return model_dir
