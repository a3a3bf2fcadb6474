"""Every AWS make target with DRY_RUN=1: the exact requests as JSON, no credentials, no
AWS; and the command line's errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from train_helpers import make_manifest_set

REPO = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::000000000000:role/flystage-test"


def no_aws_env(tmp_path: Path) -> dict[str, str]:
    """An environment with no AWS credentials or config at all, and our settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLYSTAGE_"))}
    env |= {
        "HOME": str(tmp_path),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "FLYSTAGE_REGION": "eu-west-1",
        "FLYSTAGE_BUCKET": "lab-bucket",
        "FLYSTAGE_ROLE_ARN": ROLE,
        "FLYSTAGE_STATE_FILE": str(tmp_path / "state.json"),
        "FLYSTAGE_DATA": os.environ.get(
            "FLYSTAGE_DATA", str(REPO.parent / "shared" / "data" / "bdgp-insitu")
        ),
    }
    return env


def json_stream(text: str) -> list[dict]:
    decoder, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def make(target: str, tmp_path: Path, **variables: str) -> list[dict]:
    args = ["make", "-s", "-C", str(REPO), target, "DRY_RUN=1", f"RUNS={tmp_path / 'runs'}"]
    args += [f"{k}={v}" for k, v in variables.items()]
    result = subprocess.run(
        args, capture_output=True, text=True, env=no_aws_env(tmp_path), timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json_stream(result.stdout)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_manifest_set(
        tmp_path_factory.mktemp("dry") / "set", train_per_class=1, valid_per_class=1
    ).parent


def operations(calls: list[dict]) -> list[str]:
    return [f"{c['service']}.{c['operation']}" for c in calls]


def test_push_dry_run(tmp_path):
    calls = make("push", tmp_path)
    assert operations(calls) == [
        "ecr.create_repository",
        "ecr.put_lifecycle_policy",
        "ecr.create_repository",
        "ecr.put_lifecycle_policy",
        "ecr.get_authorization_token",
        "docker.push",
        "docker.push",
    ]
    assert calls[0]["request"]["imageTagMutability"] == "IMMUTABLE"
    assert (
        calls[5]["request"]["repository"]
        == "<account-id>.dkr.ecr.eu-west-1.amazonaws.com/flystage-train"
    )


def test_upload_dry_run_lists_every_file(tmp_path, images):
    calls = make("upload", tmp_path, MANIFEST=str(images / "manifest.csv"))
    keys = [c["request"]["Key"] for c in calls]
    assert keys[0] == "flystage/data/manifest.csv" and len(keys) == 1 + 6
    assert all(
        c["request"]["Bucket"] == "lab-bucket"
        and len(c["request"]["ExtraArgs"]["Metadata"]["sha256"]) == 64
        for c in calls
    )


def test_tune_train_deploy_teardown_dry_runs(tmp_path):
    [tune] = make("tune", tmp_path, MAX_JOBS="8", PARALLEL_JOBS="4", HP="epochs=40")
    config = tune["request"]["HyperParameterTuningJobConfig"]
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 8, "MaxParallelTrainingJobs": 4}
    assert tune["request"]["TrainingJobDefinition"]["StaticHyperParameters"] == {"epochs": "40"}

    [train] = make(
        "train",
        tmp_path,
        INSTANCE_COUNT="2",
        SPOT="1",
        HP="learning_rate=0.01 batch_size=64",
        UNLABELLED="s3://lab-bucket/flystage/unlabelled",
    )
    request = train["request"]
    unlabelled = {c["ChannelName"]: c for c in request["InputDataConfig"]}["unlabelled"]
    assert (
        unlabelled["DataSource"]["S3DataSource"]["S3Uri"] == "s3://lab-bucket/flystage/unlabelled/"
    )
    assert (
        request["ResourceConfig"]["InstanceCount"] == 2
        and request["EnableManagedSpotTraining"] is True
    )
    assert request["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert request["HyperParameters"] == {"learning_rate": "0.01", "batch_size": "64"}

    deploy = make(
        "deploy",
        tmp_path,
        SERVERLESS="1",
        MODEL_DATA="s3://lab-bucket/flystage/output/j/output/model.tar.gz",
    )
    assert operations(deploy) == [
        # Is there an endpoint of that name, and does it carry flystage's tags?
        "sagemaker.describe_endpoint",
        "sagemaker.list_tags",
        "sagemaker.create_model",
        "sagemaker.create_endpoint_config",
        "sagemaker.create_endpoint",
    ]
    assert "ServerlessConfig" in deploy[3]["request"]["ProductionVariants"][0]

    teardown = make("teardown", tmp_path)
    assert [op for op in operations(teardown) if "delete" in op] == [
        "sagemaker.delete_endpoint",
        "sagemaker.delete_endpoint_config",
        "sagemaker.delete_model",
    ]
    # Each is deleted only if it carries flystage's tags.
    assert operations(teardown).count("sagemaker.list_tags") == 3


def test_predict_and_batch_dry_runs(tmp_path, images):
    calls = make("predict", tmp_path, DIR=str(images))
    assert len(calls) == 6 and {c["request"]["ContentType"] for c in calls} == {"image/png"}
    assert calls[0]["request"]["Body"].endswith(" bytes>")
    assert not (tmp_path / "runs" / "cloud").exists()  # a dry run writes no CSV
    batch = make("batch-predict", tmp_path, S3="s3://lab-bucket/flystage/batch/new/")
    assert operations(batch) == [
        "sagemaker.create_model",
        "sagemaker.create_transform_job",
        "sagemaker.delete_model",
    ]


def test_missing_settings_and_bad_arguments_are_clear(tmp_path):
    env = no_aws_env(tmp_path)
    del env["FLYSTAGE_ROLE_ARN"]
    result = subprocess.run(
        ["make", "-s", "-C", str(REPO), "train", "DRY_RUN=1", "HP=epochs=1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert (
        result.returncode != 0
        and "missing setting role_arn" in result.stderr
        and "FLYSTAGE_ROLE_ARN" in result.stderr
    )
    result = subprocess.run(
        ["make", "-s", "-C", str(REPO), "predict", "DRY_RUN=1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode != 0 and "give DIR=folder" in result.stderr
