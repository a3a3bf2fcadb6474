"""A folder channel (no manifest.csv) through the real train image, run as SageMaker runs it
(local mode): a BDGP-like ``<gene>/<stage>/<image>`` tree is labelled by stage, as ``flystage
organise`` labels it, the validation split is grouped by ``group_regex``, and a job that would
draw a validation split without a group rule fails with its cause in ``output/failure``.

Needs the Docker engine and the train image of ``make images`` (``TRAIN_IMAGE`` moves it).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from flystage_local import containers, training
from flystage_local.command import build_request
from train_helpers import BDGP_GENES as GENES
from train_helpers import copy_bdgp_genes

TRAIN_IMAGE = os.environ.get("TRAIN_IMAGE", "flystage-train:latest")
TINY = {
    "arch": "small_cnn",
    "epochs": "1",
    "height": "32",
    "width": "80",
    "batch_size": "16",
    "threads": "1",
}
GENE_GROUP = "^(?P<group>[^/]+)/"
pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def gene_stage_tree(tmp_path_factory: pytest.TempPathFactory, bdgp_root: Path) -> Path:
    """Five BDGP genes as they are shared: ``<gene>/<stage>/<image>.bmp`` (63 images)."""
    return copy_bdgp_genes(bdgp_root, tmp_path_factory.mktemp("folder-channel"), GENES)


@pytest.fixture(scope="module")
def engine():
    client = containers.connect()
    containers.require_image(client, TRAIN_IMAGE)
    return client


def _run(channel: Path, runs: Path, name: str, hps: dict[str, str]) -> training.JobResult:
    request = build_request(TRAIN_IMAGE, hps, channel, 1, name, runs)
    return training.run_training_job(request, runs, write=None)


def test_gene_stage_folder_channel_trains_stages_grouped_by_gene(
    engine, gene_stage_tree: Path, tmp_path: Path
) -> None:
    result = _run(gene_stage_tree, tmp_path, "folder-by-gene", {**TINY, "group_regex": GENE_GROUP})
    assert result.status == "Completed", result.failure_reason
    log = result.logs["algo-1"]
    stages = ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"]
    # Before the first epoch: the rule, the labels and the images per label and split.
    assert "labels from the nearest stage-like folder; groups: group_regex" in log
    assert f"labels (6): {', '.join(stages)}" in log
    assert log.index("labels (6)") < log.index("epoch=1 ")
    with tarfile.open(result.model_artefact) as tar:
        metadata = json.load(tar.extractfile("metadata.json"))
    assert metadata["labels"] == stages
    assert not set(metadata["labels"]) & set(GENES)


def test_folder_channel_without_a_group_rule_is_refused(
    engine, gene_stage_tree: Path, tmp_path: Path
) -> None:
    result = _run(gene_stage_tree, tmp_path, "folder-no-group", TINY)
    assert result.status == "Failed"
    failure = (result.folder / "algo-1" / "output" / "failure").read_text()
    assert failure.startswith(
        "no group rule for the validation split of folder channel /opt/ml/input/data/train"
    ), failure[:400]
    assert "group_regex" in result.failure_reason
    assert result.exit_codes["algo-1"] != 0


def test_ambiguous_label_level_is_refused(engine, gene_stage_tree: Path, tmp_path: Path) -> None:
    # Session folders named by number: '03/9-10/x.bmp' has two folders that look like a stage.
    numbered = tmp_path / "numbered"
    for i, gene in enumerate(GENES[:2]):
        shutil.copytree(gene_stage_tree / gene, numbered / f"{i:02d}")
    result = _run(
        numbered, tmp_path / "runs", "folder-ambiguous", {**TINY, "group_regex": GENE_GROUP}
    )
    assert result.status == "Failed"
    failure = (result.folder / "algo-1" / "output" / "failure").read_text()
    assert (
        "ambiguous label level" in failure.splitlines()[0]
        and "label_level" in failure.splitlines()[0]
    ), failure[:400]
