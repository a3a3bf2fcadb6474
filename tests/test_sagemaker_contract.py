"""The training program under the real sagemaker-training toolkit (its ``train`` command), in a
full SageMaker directory tree under ``SAGEMAKER_BASE_DIR``, on real BDGP images: one host, a
failing job, and two hosts training data-parallel over loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flystage.artefact import check_artefact
from flystage.jobdef import METRIC_DEFINITIONS, read_epoch_metric, read_metric
from train_helpers import copy_bdgp_subset

REPO = Path(__file__).resolve().parents[1]
PROGRAM = REPO / "docker" / "train" / "train_flystage.py"
TRAIN_COMMAND = Path(sys.executable).parent / "train"  # sagemaker-training's console script
STAGES = ("4-6", "11-12", "13-16")
# As SageMaker sends them: every value a JSON-encoded string.
HYPERPARAMETERS = {
    "arch": '"small_cnn"',
    "epochs": "2",
    "batch_size": "8",
    "learning_rate": "0.003",
    "preprocess": '{"height": 32, "width": 80, "channels": 1}',
    "threads": "1",
    "pretrained": '"false"',
}
TIMEOUT_S = 300
pytestmark = pytest.mark.slow  # every test runs the toolkit in subprocesses


def sagemaker_tree(
    base: Path,
    hyperparameters: dict[str, str],
    hosts=("algo-1",),
    current="algo-1",
    channels: dict[str, Path] | None = None,
) -> Path:
    """A SageMaker container's /opt/ml, as the platform lays it out, under ``base``."""
    config = base / "input" / "config"
    config.mkdir(parents=True)
    for folder in ("model", "output/data", "code", "checkpoints"):
        (base / folder).mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": current, "hosts": list(hosts), "network_interface_name": "lo"})
    )
    channels = channels or {}
    (config / "inputdataconfig.json").write_text(
        json.dumps(
            {
                name: {
                    "TrainingInputMode": "File",
                    "S3DistributionType": "FullyReplicated",
                    "RecordWrapperType": "None",
                }
                for name in channels
            }
        )
    )
    for name, source in channels.items():
        shutil.copytree(source, base / "input" / "data" / name)
    shutil.copy2(PROGRAM, base / "code" / PROGRAM.name)
    return base


def toolkit_env(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    env.update(
        SAGEMAKER_BASE_DIR=str(base),
        SAGEMAKER_PROGRAM=PROGRAM.name,
        SM_STUDIO_LOCAL_MODE="true",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def run_train(base: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TRAIN_COMMAND)],
        env=toolkit_env(base, **extra),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=base,
    )


@pytest.fixture(scope="module")
def channels(bdgp_root: Path, tmp_path_factory) -> dict[str, Path]:
    """Real BDGP images in channel trees: 4 per stage to train, 2 others per stage to validate."""
    root = tmp_path_factory.mktemp("channels")
    return {
        "train": copy_bdgp_subset(bdgp_root, root / "train", per_stage=4, stages=STAGES),
        "valid": copy_bdgp_subset(bdgp_root, root / "valid", per_stage=2, stages=STAGES, skip=4),
    }


def test_one_host_writes_the_artefact(tmp_path: Path, channels) -> None:
    assert TRAIN_COMMAND.is_file(), (
        f"sagemaker-training's train command not found at {TRAIN_COMMAND}"
    )
    base = sagemaker_tree(tmp_path / "opt-ml", HYPERPARAMETERS, channels=channels)
    done = run_train(base)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    # Every metric definition SageMaker will use finds one value per epoch in the real log.
    for definition in METRIC_DEFINITIONS:
        assert len(read_epoch_metric(log, definition["Name"])) == 2, definition
    metadata = check_artefact(base / "model")
    assert metadata.labels == list(STAGES) and metadata.arch == "small_cnn"
    assert metadata.preprocess.height == 32 and metadata.preprocess.width == 80
    assert (base / "output" / "success").is_file() and not (base / "output" / "failure").exists()
    assert (base / "output" / "data" / "metrics.json").is_file()
    assert (base / "checkpoints" / "checkpoint.pt").is_file()  # the platform's checkpoint path


@pytest.mark.parametrize(
    "case, hyperparameters, channel_names, cause",
    [
        ("empty channel", HYPERPARAMETERS, ("train",), "no images in channel train: "),
        (
            "bad hyperparameter",
            HYPERPARAMETERS | {"optimizer": '"adam"'},
            ("train", "valid"),
            "bad hyperparameter: optimizer 'adam': choose one of",
        ),
        (
            "unknown hyperparameter",
            HYPERPARAMETERS | {"lr": "0.1"},
            ("train", "valid"),
            "bad argument or hyperparameter: unrecognized arguments: --lr 0.1",
        ),
        ("corrupt image", HYPERPARAMETERS, ("train", "valid"), "<the truncated file's path>"),
    ],
)
def test_failing_job_writes_its_cause(
    tmp_path: Path, channels, case, hyperparameters, channel_names, cause
) -> None:
    base = sagemaker_tree(
        tmp_path / "opt-ml", hyperparameters, channels={n: channels[n] for n in channel_names}
    )
    if case == "empty channel":
        shutil.rmtree(base / "input" / "data" / "train")
        (base / "input" / "data" / "train").mkdir()
    if case == "corrupt image":
        corrupt = sorted((base / "input" / "data" / "train").glob("*/*.bmp"))[0]
        corrupt.write_bytes(corrupt.read_bytes()[:100])  # truncated
        cause = f"{corrupt}: the BMP is truncated"
    done = run_train(base)
    assert done.returncode != 0, done.stdout + done.stderr
    failure = (base / "output" / "failure").read_text()
    assert failure.startswith(cause), failure[:500]  # the first line says what went wrong
    assert not (base / "output" / "success").exists()
    assert not any((base / "model").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_train_data_parallel(tmp_path: Path, channels) -> None:
    """Two toolkit processes as algo-1 and algo-2 on loopback: each trains on its half of
    every epoch (their log lines), and only rank 0 (algo-1) writes the artefact."""
    hosts = ("algo-1", "algo-2")
    port = str(_free_port())
    procs = {}
    for host in hosts:
        base = sagemaker_tree(
            tmp_path / host, HYPERPARAMETERS, hosts=hosts, current=host, channels=channels
        )
        env = toolkit_env(
            base,
            FLYSTAGE_MASTER_ADDR="127.0.0.1",
            FLYSTAGE_DIST_PORT=port,
            FLYSTAGE_DIST_TIMEOUT="120",
        )
        procs[host] = subprocess.Popen(
            [str(TRAIN_COMMAND)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=base,
        )
    logs = {}
    try:
        for host, proc in procs.items():
            logs[host] = proc.communicate(timeout=TIMEOUT_S)[0]
    finally:
        for proc in procs.values():
            proc.kill()
    for host, proc in procs.items():
        assert proc.returncode == 0, f"{host}:\n{logs[host]}"
    for rank, host in enumerate(hosts):
        took_part = re.search(
            rf"^host={host} rank={rank} world_size=2 samples=(\d+)$", logs[host], re.M
        )
        assert took_part, logs[host]
        assert int(took_part.group(1)) == 2 * 6  # 12 train images, 2 epochs, half on each host
    # Rank 0 prints the (all-reduced) metrics and writes the artefact; rank 1 neither.
    assert len(read_epoch_metric(logs["algo-1"], "valid:top3")) == 2
    assert read_metric(logs["algo-2"], "valid:top3") == []
    assert check_artefact(tmp_path / "algo-1" / "model").labels == list(STAGES)
    assert not any((tmp_path / "algo-2" / "model").iterdir())


def test_stop_signal_checkpoints_and_the_restart_resumes(tmp_path: Path, channels) -> None:
    """SageMaker stops a job (or spot takes the instance) with SIGTERM to the container, whose
    init (tini -g in our image) passes it to the whole process group: the program finishes
    its step and saves a checkpoint; the restarted job resumes from it."""
    base = sagemaker_tree(
        tmp_path / "opt-ml", HYPERPARAMETERS | {"epochs": "1000"}, channels=channels
    )
    proc = subprocess.Popen(
        [str(TRAIN_COMMAND)],
        env=toolkit_env(base),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=base,
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:  # until the program (which holds the pipe too) has exited
            lines.append(line)
            if line.startswith("epoch=1 "):
                os.killpg(proc.pid, signal.SIGTERM)
    finally:
        proc.wait(timeout=TIMEOUT_S)
    log = "".join(lines)
    assert "SIGTERM: stopped in epoch" in log, log
    saved = torch.load(base / "checkpoints" / "checkpoint.pt", weights_only=True)["epoch"]
    assert saved >= 1
    # The stopped job's model.tar.gz is not empty: the best model so far, marked as stopped.
    assert "stopped by SIGTERM" in check_artefact(base / "model").extra["stopped"]

    # The restarted job (same tree, as SageMaker restores the checkpoint dir) resumes.
    (base / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps(HYPERPARAMETERS | {"epochs": str(saved + 1)})
    )
    (base / "output" / "failure").unlink(missing_ok=True)
    done = run_train(base)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"after epoch {saved}" in done.stdout and f"\nepoch={saved + 1} " in done.stdout
    assert check_artefact(base / "model").labels == list(STAGES)
    assert "stopped" not in check_artefact(base / "model").extra
