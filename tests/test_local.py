"""Local mode: the real train and serve images, run on a small real BDGP subset as SageMaker would.

The tests marked ``docker`` need the Docker engine and the images of ``make images``
(``TRAIN_IMAGE``/``SERVE_IMAGE`` move them). One trained model is shared by the module.
The others check the request -> ``/opt/ml`` conversion and the search design without Docker.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import docker.errors
import pytest

REPO = Path(__file__).resolve().parents[1]

from flystage import jobdef  # noqa: E402
from flystage.cloud.settings import Settings  # noqa: E402
from flystage_local import LocalModeError, channels, containers, jobtree, serving, training, tuning  # noqa: E402
from flystage_local.command import build_request, main  # noqa: E402

TRAIN_IMAGE = os.environ.get("TRAIN_IMAGE", "flystage-train:latest")
SERVE_IMAGE = os.environ.get("SERVE_IMAGE", "flystage-serve:latest")
# Five small genes (63 images): one gene or more in each of train, valid and test.
SUBSET_GENES = ("DNaseII", "Dms", "Dmn", "Dif", "dhd")
# Small enough for seconds per epoch on one core, real enough to train and export.
TINY = {
    "arch": "small_cnn",
    "epochs": "2",
    "height": "32",
    "width": "80",
    "batch_size": "16",
    "threads": "1",
}


def _request(channel: Path, runs: Path, name: str, hps: dict[str, str], instances: int = 1) -> dict:
    return build_request(TRAIN_IMAGE, hps, channel, instances, name, runs)


# ---- without Docker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory, bdgp_root: Path) -> Path:
    """The subset staged as a channel folder (manifest.csv + images), grouped by gene."""
    subset = tmp_path_factory.mktemp("bdgp-subset")
    for gene in SUBSET_GENES:
        shutil.copytree(bdgp_root / gene, subset / gene)
    folder, report = channels.stage_channel([subset], tmp_path_factory.mktemp("channels"))
    assert "staged 63 images" in report
    return folder


def test_channel_is_a_manifest_with_every_split(channel: Path) -> None:
    from flystage.manifest import read_manifest

    records = read_manifest(channel / "manifest.csv")
    assert len(records) == 63
    assert {r.split for r in records} == {"train", "valid", "test"}
    # Grouped by gene: a gene never straddles two splits.
    assert all(len({r.split for r in records if r.group == g}) == 1 for g in SUBSET_GENES)
    assert all(r.path.is_relative_to(channel) for r in records)
    # Staging the same images again reuses the folder.
    again, report = channels.stage_channel([channel / "manifest.csv"], channel.parent)
    assert again == channel and "reusing" in report


def test_request_becomes_sagemaker_host_trees(channel: Path, tmp_path: Path) -> None:
    request = _request(
        channel, tmp_path, "tree-test", {"learning_rate": "0.01", "batch_size": "32"}, instances=2
    )
    assert request == jobdef.training_job_request(
        Settings().replace(instance_count=2),
        TRAIN_IMAGE,
        {"learning_rate": "0.01", "batch_size": "32"},
        {"train": f"file://{channel}"},
        job_name="tree-test",
        output_uri=f"file://{tmp_path / 'tree-test'}",
    )
    sources = jobtree.channel_sources(request)
    for host in ("algo-1", "algo-2"):
        tree = jobtree.write_host_tree(tmp_path / host, request, host, sources)
        config = tree / "input" / "config"
        assert json.loads((config / "hyperparameters.json").read_text()) == {
            "learning_rate": "0.01",
            "batch_size": "32",
        }
        assert json.loads((config / "inputdataconfig.json").read_text()) == {
            "train": {
                "TrainingInputMode": "File",
                "S3DistributionType": "FullyReplicated",
                "RecordWrapperType": "None",
            }
        }
        resource = json.loads((config / "resourceconfig.json").read_text())
        assert resource["current_host"] == host and resource["hosts"] == ["algo-1", "algo-2"]
        assert resource["network_interface_name"] == "eth0"
        assert (tree / "input" / "data" / "train" / "manifest.csv").read_bytes() == (
            channel / "manifest.csv"
        ).read_bytes()
        assert all((tree / d).is_dir() for d in ("model", "output/data", "checkpoints"))
    with pytest.raises(LocalModeError, match="already exists"):
        jobtree.write_host_tree(tmp_path / "algo-1", request, "algo-1", sources)


def test_bad_requests_are_refused_with_what_to_do(channel: Path, tmp_path: Path) -> None:
    request = _request(channel, tmp_path, "bad", {})
    request["HyperParameters"] = {"epochs": 2}
    with pytest.raises(LocalModeError, match="strings"):
        jobtree.hyperparameters_json(request)
    request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"] = "s3://bucket/data"
    with pytest.raises(LocalModeError, match="file:///path"):
        jobtree.channel_sources(request)
    request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3DataDistributionType"] = (
        "ShardedByS3Key"
    )
    with pytest.raises(LocalModeError, match="FullyReplicated"):
        jobtree.input_data_config(request)


def test_unreadable_model_archives_are_refused(tmp_path: Path) -> None:
    with pytest.raises(LocalModeError, match="not found"):
        serving.unpack_model(tmp_path / "missing.tar.gz", tmp_path / "models")
    truncated = tmp_path / "model.tar.gz"
    with tarfile.open(truncated, "w:gz") as tar:
        (tmp_path / "metadata.json").write_text("{}" * 50_000)
        tar.add(tmp_path / "metadata.json", arcname="metadata.json")
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(LocalModeError, match="not a readable model.tar.gz"):
        serving.unpack_model(truncated, tmp_path / "models")


def test_search_design_covers_the_tuning_ranges() -> None:
    dims = tuning.dimensions(jobdef.TUNING_RANGES)
    points = tuning.trial_points(dims, 8, seed=1)
    rates = [float(p["learning_rate"]) for p in points]
    assert all(0.001 <= r <= 0.1 for r in rates)
    # Log scale: as many points below the geometric middle (0.01) as above it, give or take one.
    assert abs(sum(r < 0.01 for r in rates) - 4) <= 1
    assert {p["batch_size"] for p in points} == {"32", "64", "128", "256"}
    assert points == tuning.trial_points(dims, 8, seed=1) != tuning.trial_points(dims, 8, seed=2)


def test_local_search_tunes_what_the_mode_uses(capsys) -> None:
    """The local tuner searches the ranges the SageMaker tuning job gets for the same mode."""
    default = [d.name for d in tuning.dimensions(jobdef.tuning_ranges({}))]
    assert default == ["probe_l2", "probe_columns"]
    for fixed in ({"probe_solver": "sgd"}, {"mode": "finetune"}, {"arch": "small_cnn"}):
        names = [d.name for d in tuning.dimensions(jobdef.tuning_ranges(fixed))]
        assert names == ["learning_rate", "batch_size"], fixed
        assert tuning.trial_count(20, fixed) == 20
    assert tuning.trial_count(20, {}) == jobdef.trial_budget({}) == 12
    assert "TRIALS=20 capped to 12" in capsys.readouterr().out
    with pytest.raises(LocalModeError, match=r"\['probe_l2'\] are tuned"):
        tuning.trial_count(4, {"probe_l2": "1"})


def test_local_tune_refuses_a_fixed_tuned_value_before_any_job(tmp_path: Path, capsys) -> None:
    argv = ["--runs", str(tmp_path), "tune", "--data", str(tmp_path / "none.csv")]
    assert main([*argv, "--hp", "probe_l2=0.5", "--trials", "2"]) == 2
    assert "['probe_l2'] are tuned" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing staged, no job folder


# ---- with Docker and the images ------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    client = containers.connect()
    for image in (TRAIN_IMAGE, SERVE_IMAGE):
        containers.require_image(client, image)
    return client


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def trained(engine, channel: Path, runs: Path) -> training.JobResult:
    """One single-host job on the subset; its model is shared by the serving tests."""
    request = _request(channel, runs, "test-one-host", TINY)
    return training.run_training_job(request, runs, write=None)


@pytest.mark.docker
def test_one_host_job_leaves_model_and_success(trained: training.JobResult) -> None:
    assert trained.status == "Completed", trained.failure_reason
    assert trained.exit_codes == {"algo-1": 0}
    assert (trained.folder / "output" / "success").is_file()
    assert not (trained.folder / "output" / "failure").exists()
    with tarfile.open(trained.model_artefact) as tar:
        assert {"model.onnx", "metadata.json"} <= set(tar.getnames())
    # The metric regexes SageMaker will use read the image's real log: one value per epoch.
    log = (trained.folder / "logs" / "algo-1.log").read_text()
    assert len(jobdef.read_epoch_metric(log, "valid:top3")) == 2
    assert 0.0 <= trained.final_metrics["valid:top3"] <= 1.0
    assert "host=algo-1 rank=0 world_size=1" in log
    described = json.loads((trained.folder / "job.json").read_text())
    assert described["status"] == "Completed" and described["model_artefact"] == str(
        trained.model_artefact
    )


@pytest.mark.docker
def test_two_hosts_train_data_parallel(engine, channel: Path, runs: Path) -> None:
    request = _request(channel, runs, "test-two-hosts", TINY, instances=2)
    result = training.run_training_job(request, runs, write=None)
    assert result.status == "Completed", result.failure_reason
    assert result.exit_codes == {"algo-1": 0, "algo-2": 0}
    # Both hosts joined one process group and each trained on its shard of the images.
    samples = {}
    for rank, host in enumerate(("algo-1", "algo-2")):
        found = re.search(rf"host={host} rank={rank} world_size=2 samples=(\d+)", result.logs[host])
        assert found, result.logs[host][-2000:]
        samples[host] = int(found.group(1))
    assert min(samples.values()) > 0
    for host in ("algo-1", "algo-2"):
        resource = json.loads(
            (result.folder / host / "input/config/resourceconfig.json").read_text()
        )
        assert resource == {**resource, "current_host": host, "hosts": ["algo-1", "algo-2"]}
    assert result.model_artefact and result.model_artefact.is_file()
    # The job's network and containers are gone once it has finished.
    assert not engine.networks.list(filters={"label": f"{containers.LABEL_JOB}=test-two-hosts"})


@pytest.mark.docker
def test_a_host_that_dies_fails_the_job_and_stops_its_peer(
    engine, channel: Path, runs: Path
) -> None:
    """An instance lost mid-training (killed once training runs): the job fails, naming it."""
    endless = {**TINY, "epochs": "5000", "patience": "0"}
    request = _request(channel, runs, "test-host-dies", endless, instances=2)

    def kill_algo_2_once_training() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if "epoch=1 " in engine.containers.get("test-host-dies-algo-1").logs().decode():
                    engine.containers.get("test-host-dies-algo-2").kill()
                    return
            except docker.errors.NotFound:
                continue

    threading.Thread(target=kill_algo_2_once_training, daemon=True).start()
    result = training.run_training_job(request, runs, write=None, stop_grace=20)
    assert result.status == "Failed"
    assert result.exit_codes["algo-2"] == 137 and result.exit_codes["algo-1"] != 0
    assert result.failure_reason.startswith("AlgorithmError: algo-2 exited with code 137")
    assert (result.folder / "output" / "failure").read_text() == result.failure_reason
    assert result.model_artefact is None
    assert not engine.containers.list(
        all=True, filters={"label": f"{containers.LABEL_JOB}=test-host-dies"}
    )


@pytest.mark.docker
def test_failing_job_reports_its_failure(engine, channel: Path, runs: Path) -> None:
    """Through the make target: a bad hyperparameter fails the job, with its reason and exit
    status."""
    env = {**os.environ, "TRAIN_IMAGE": TRAIN_IMAGE}
    done = subprocess.run(
        [
            "make",
            "-s",
            "local-train",
            f"RUNS={runs / 'make'}",
            f"DATA={channel / 'manifest.csv'}",
            "HP=arch=no_such_arch epochs=1 height=32 width=80",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    job = next((runs / "make" / "local").glob("flystage-local-*"))
    failure = (job / "output" / "failure").read_text()
    assert "no_such_arch" in failure
    assert "Failed" in done.stdout and "no_such_arch" in done.stdout
    assert not (job / "model.tar.gz").exists() and not (job / "output" / "success").exists()
    assert json.loads((job / "job.json").read_text())["status"] == "Failed"


@pytest.mark.docker
def test_job_past_its_max_runtime_is_stopped_and_a_rerun_resumes(
    engine, channel: Path, runs: Path
) -> None:
    """SageMaker's spot/time-box flow: stopped at MaxRuntimeInSeconds, checkpoints kept, rerun
    resumes."""
    checkpoints = runs / "kept-checkpoints"
    long = {**TINY, "epochs": "5000", "patience": "0"}  # no early stop: only the runtime ends it
    request = build_request(TRAIN_IMAGE, long, channel, 1, "test-stopped", runs, checkpoints)
    assert request["CheckpointConfig"] == {
        "S3Uri": f"file://{checkpoints}",
        "LocalPath": "/opt/ml/checkpoints",
    }
    # Long enough for a few epochs even on a loaded CI machine (an epoch here takes ~1 s).
    request["StoppingCondition"]["MaxRuntimeInSeconds"] = 45
    stopped = training.run_training_job(request, runs, write=None, stop_grace=30)
    assert stopped.status == "Stopped" and stopped.failure_reason.startswith("MaxRuntimeExceeded")
    assert (stopped.folder / "output" / "failure").is_file()
    assert any(checkpoints.iterdir()), "no checkpoint kept"
    epochs_done = len(jobdef.read_epoch_metric(stopped.logs["algo-1"], "valid:top3"))
    assert 0 < epochs_done < 5000

    again = {**long, "epochs": str(epochs_done + 1)}
    rerun = build_request(TRAIN_IMAGE, again, channel, 1, "test-resumed", runs, checkpoints)
    resumed = training.run_training_job(rerun, runs, write=None)
    assert resumed.status == "Completed", resumed.failure_reason
    assert "resuming from checkpoint" in resumed.logs["algo-1"]
    # Only the epochs the first job did not finish are trained again.
    assert len(jobdef.read_epoch_metric(resumed.logs["algo-1"], "valid:top3")) <= 2


@pytest.mark.docker
def test_tune_reads_each_trials_objective_from_its_log(
    engine, channel: Path, runs: Path, capsys
) -> None:
    fixed = "arch=small_cnn epochs=1 height=32 width=80 threads=1"
    argv = [
        "--runs",
        str(runs / "tune"),
        "tune",
        "--image",
        TRAIN_IMAGE,
        "--trials",
        "2",
        "--data",
        str(channel / "manifest.csv"),
        "--hp",
        fixed,
        "--job-name",
        "test-tune",
    ]
    assert main(argv) == 0
    summary = json.loads((runs / "tune" / "test-tune" / "tuning.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["Completed", "Completed"]
    for trial in summary["trials"]:
        job = runs / "tune" / "test-tune" / trial["job"]
        sent = json.loads((job / "algo-1" / "input/config/hyperparameters.json").read_text())
        assert (
            sent["learning_rate"] == trial["hyperparameters"]["learning_rate"]
            and sent["epochs"] == "1"
        )
        assert sent["_tuning_objective_metric"] == jobdef.OBJECTIVE_METRIC
        assert trial["objective"] == jobdef.read_metric((job / "logs/algo-1.log").read_text())[-1]
    best = max(summary["trials"], key=lambda t: t["objective"])
    assert summary["best"]["objective"] == best["objective"]
    assert "best hyperparameters: learning_rate=" in capsys.readouterr().out


@pytest.mark.docker
def test_tune_of_the_default_probe_searches_its_prior(
    engine, channel: Path, runs: Path, capsys
) -> None:
    fixed = "height=32 width=80 threads=1"
    argv = ["--runs", str(runs / "tune"), "tune", "--image", TRAIN_IMAGE, "--trials", "2"]
    argv += [
        "--data",
        str(channel / "manifest.csv"),
        "--hp",
        fixed,
        "--job-name",
        "test-tune-probe",
    ]
    assert main(argv) == 0
    folder = runs / "tune" / "test-tune-probe"
    summary = json.loads((folder / "tuning.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["Completed", "Completed"]
    for trial in summary["trials"]:
        job = folder / trial["job"]
        sent = json.loads((job / "algo-1" / "input/config/hyperparameters.json").read_text())
        assert set(trial["hyperparameters"]) == {"probe_l2", "probe_columns"}
        assert sent["probe_l2"] == trial["hyperparameters"]["probe_l2"]
        assert "learning_rate" not in sent
        assert trial["objective"] == jobdef.read_metric((job / "logs/algo-1.log").read_text())[-1]
    assert "best hyperparameters: probe_l2=" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.docker
def test_serve_and_predict_a_folder_with_rename_and_undo(
    engine, trained: training.JobResult, bdgp_root: Path, runs: Path, tmp_path: Path
) -> None:
    port = _free_port()
    url, seconds = serving.start_server(
        trained.model_artefact,
        SERVE_IMAGE,
        runs / "models",
        port=port,
        name="flystage-local-serve-test",
    )
    try:
        folder = tmp_path / "new images"
        sources = sorted((bdgp_root / "Dl").rglob("*.bmp"))[:5]
        for i, src in enumerate(sources):
            (folder / f"session{i % 2}").mkdir(parents=True, exist_ok=True)
            shutil.copy(src, folder / f"session{i % 2}" / src.name)
        (folder / "notes.txt").write_text("not an image")
        before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
        out, undo = tmp_path / "top3.csv", tmp_path / "undo.csv"
        assert (
            main(
                [
                    "predict",
                    str(folder),
                    "--port",
                    str(port),
                    "--out",
                    str(out),
                    "--rename",
                    "--undo-manifest",
                    str(undo),
                ]
            )
            == 0
        )
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 5 and not any(r["error"] for r in rows)
        labels = set(
            json.loads((runs / "models").glob("*/metadata.json").__next__().read_text())["labels"]
        )
        assert all({r["stage_1"], r["stage_2"], r["stage_3"]} <= labels for r in rows)
        renamed = sorted(folder.rglob("*__s*.bmp"))
        assert len(renamed) == 5 and (folder / "notes.txt").is_file()
        assert main(["predict", "--undo", str(undo)]) == 0
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    finally:
        container = containers.find_container(engine, "flystage-local-serve-test")
        if container:
            container.remove(force=True)


@pytest.mark.docker
def test_serve_refuses_a_broken_artefact_with_its_log(engine, runs: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(LocalModeError, match="did not become healthy"):
        serving.start_server(
            broken,
            SERVE_IMAGE,
            runs / "models",
            port=_free_port(),
            timeout=60,
            name="flystage-local-serve-broken",
        )
    assert containers.find_container(engine, "flystage-local-serve-broken") is None


@pytest.mark.docker
def test_stop_removes_every_container_and_network(engine) -> None:
    network = containers.create_network(engine, "flystage-local-stop-test-net", "stop-test")
    containers.create_training_container(
        engine, TRAIN_IMAGE, "stop-test", "algo-1", network, {}, {}
    )
    assert {"stop-test-algo-1"} <= set(containers.labelled(engine)[0])
    assert main(["stop"]) == 0
    assert containers.labelled(engine) == ([], [])


def test_local_mode_is_a_command_of_the_installed_package(tmp_path):
    # No PYTHONPATH, not from the repository: what a user with flystage installed runs.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    flystage = Path(sys.executable).with_name("flystage")
    result = subprocess.run(
        [str(flystage), "local", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert all(
        command in result.stdout for command in ("train", "tune", "serve", "predict", "stop")
    )
    stop = subprocess.run(
        [sys.executable, "-m", "flystage", "local", "predict"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stop.returncode == 2 and "give a folder of images" in stop.stderr, stop.stderr
