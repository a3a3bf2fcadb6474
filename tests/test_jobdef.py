"""The job definition: the CreateTrainingJob request, and the metric regexes against the
lines the real training program prints."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from flystage import jobdef
from flystage.cloud.settings import Settings
from train_helpers import make_manifest_set, train_command

SIX_STAGES = ("1-3", "4-6", "7-8", "9-10", "11-12", "13-16")
ROLE = "arn:aws:iam::000000000000:role/flystage-test"


def test_training_job_request_shape():
    settings = Settings(
        bucket="lab", role_arn=ROLE, instance_count=2, spot=True, max_runtime_s=600, max_wait_s=1200
    )
    request = jobdef.training_job_request(
        settings,
        "img:1",
        {"learning_rate": 0.01, "arch": "small_cnn", "pretrained": False, "epochs": 3},
        {"train": "s3://lab/flystage/data/"},
        job_name="flystage-train-1",
    )
    assert request["HyperParameters"] == {
        "learning_rate": "0.01",
        "arch": "small_cnn",
        "pretrained": "false",
        "epochs": "3",
    }
    assert request["AlgorithmSpecification"] == {
        "TrainingImage": "img:1",
        "TrainingInputMode": "File",
        "MetricDefinitions": jobdef.METRIC_DEFINITIONS,
    }
    assert request["ResourceConfig"] == {
        "InstanceType": "ml.m5.xlarge",
        "InstanceCount": 2,
        "VolumeSizeInGB": 30,
    }
    assert request["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 600,
        "MaxWaitTimeInSeconds": 1200,
    }
    assert request["EnableManagedSpotTraining"] is True
    assert request["CheckpointConfig"] == {
        "S3Uri": "s3://lab/flystage/checkpoints/flystage-train-1",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert request["OutputDataConfig"] == {"S3OutputPath": "s3://lab/flystage/output"}
    [channel] = request["InputDataConfig"]
    assert (
        channel["ChannelName"] == "train"
        and channel["DataSource"]["S3DataSource"]["S3Uri"] == "s3://lab/flystage/data/"
    )
    # The request is valid for botocore's model of CreateTrainingJob.
    import botocore.session
    from botocore.validate import validate_parameters

    model = botocore.session.get_session().get_service_model("sagemaker")
    validate_parameters(request, model.operation_model("CreateTrainingJob").input_shape)


def test_on_demand_job_has_no_checkpoint_or_wait_and_local_mode_needs_no_bucket():
    request = jobdef.training_job_request(
        Settings(),
        "flystage-train:latest",
        {},
        {"train": "file:///data"},
        job_name="local-1",
        output_uri="file:///out",
    )
    assert (
        "CheckpointConfig" not in request
        and "MaxWaitTimeInSeconds" not in request["StoppingCondition"]
    )
    assert request["EnableManagedSpotTraining"] is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"job_name": "bad_name"}, "letters, digits and dashes"),
        ({"job_name": "ok", "channels": {}}, "at least one input channel"),
        ({"job_name": "ok", "channels": {"train": "/data"}}, "neither an s3:// nor a file://"),
        ({"job_name": "ok", "hyperparameters": {"learning-rate": 1}}, "underscores"),
    ],
)
def test_bad_requests_are_refused(kwargs, message):
    args = {"hyperparameters": {}, "channels": {"train": "s3://b/p/"}} | kwargs
    with pytest.raises(ValueError, match=message):
        jobdef.training_job_request(
            Settings(bucket="b"), "img", args.pop("hyperparameters"), args.pop("channels"), **args
        )


@pytest.fixture(scope="module")
def train_log(tmp_path_factory) -> tuple[str, dict]:
    """The stdout+stderr of a real three-epoch run of the training program (as SageMaker sees
    the job log), and the metrics it stored in the artefact. Six stages, so that top-3 is not
    always 1; with this seed its best epoch is not its last (checked below)."""
    root = tmp_path_factory.mktemp("jobdef-train")
    manifest = make_manifest_set(root / "set", labels=SIX_STAGES)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    small = "--arch small_cnn --epochs 3 --height 32 --width 80 --threads 1 --batch_size 4".split()
    result = subprocess.run(
        train_command("--manifest", manifest, "--model_dir", root / "model", *small),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    metadata = json.loads((root / "model" / "metadata.json").read_text())
    return result.stdout, metadata["metrics"]


def test_metric_regexes_read_the_training_program_log(train_log):
    log, best = train_log
    values = {
        d["Name"]: jobdef.read_epoch_metric(log, d["Name"]) for d in jobdef.METRIC_DEFINITIONS
    }
    # One value per epoch and per metric, nothing from the other lines of the log.
    assert {name: len(v) for name, v in values.items()} == {
        d["Name"]: 3 for d in jobdef.METRIC_DEFINITIONS
    }
    # The best epoch's line carries the values the program stored in its artefact.
    i = best["epoch"] - 1
    assert values["valid:top3"][i] == pytest.approx(best["valid_top3"], abs=1e-4)
    assert values["valid:top1"][i] == pytest.approx(best["valid_top1"], abs=1e-4)
    assert values["valid:loss"][i] == pytest.approx(best["valid_loss"], abs=1e-4)
    assert values["train:loss"][i] == pytest.approx(best["train_loss"], abs=1e-4)
    assert jobdef.read_epoch_metric(log) == values[jobdef.OBJECTIVE_METRIC]


def test_the_last_objective_value_is_the_saved_models(train_log):
    """SageMaker ranks a tuning trial by the objective's last value: it must be the saved
    model's (the best epoch), not the last epoch's."""
    log, best = train_log
    per_epoch = jobdef.read_epoch_metric(log)
    assert best["epoch"] < len(per_epoch), "this run's best epoch should not be its last"
    assert per_epoch[-1] != pytest.approx(best["valid_top3"], abs=1e-4)  # so the test can fail
    for definition in jobdef.METRIC_DEFINITIONS:
        last = jobdef.read_metric(log, definition["Name"])[-1]
        key = definition["Name"].replace(":", "_")  # valid:top3 -> valid_top3
        assert last == pytest.approx(best[key], abs=1e-4), definition["Name"]
