"""docs/notebooks/flystage-sagemaker.ipynb runs: its local-mode cells are executed with nbclient
(a real kernel, the real SageMaker SDK in local mode, the real images); its AWS cells (tagged
``aws``) are left out. Tiny: two genes, one epoch of a small network."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdk_helpers import remove_compose_containers, write_sdk_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebooks" / "flystage-sagemaker.ipynb"
pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_notebook_cells_tagged_aws_are_the_cloud_steps() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    aws = [c.source for c in nb.cells if "aws" in c.metadata.get("tags", [])]
    assert any("upload_dataset" in s for s in aws) and any("tuner.fit" in s for s in aws)
    assert any('instance_type="ml.m5.xlarge"' in s for s in aws)


def test_notebook_local_cells_run(tmp_path: Path, bdgp_root: Path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("sagemaker")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if "aws" not in c.metadata.get("tags", [])]
    config = write_sdk_config(tmp_path / "sdk-config.yaml")
    for name, value in {
        "FLYSTAGE_NOTEBOOK_WORK": str(tmp_path / "work"),
        "FLYSTAGE_DATA": str(bdgp_root),
        "FLYSTAGE_NOTEBOOK_GENES": "Dif,dhd,Dms",
        "FLYSTAGE_NOTEBOOK_QUICK": "1",
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(config),
    }.items():
        monkeypatch.setenv(name, value)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    try:
        client.execute()
    finally:
        remove_compose_containers(tmp_path / "work")
    outputs = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "ContinuousParameterRanges" in outputs and "Logarithmic" in outputs
    assert "exit status 0" in outputs
    assert outputs.count("renamed 4 file(s), skipped 0") == 2  # the rename, then its undo
