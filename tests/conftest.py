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
