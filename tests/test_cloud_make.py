"""The make targets themselves, in the order a new user runs them, against the local
stand-ins: moto's HTTP API for ECR/S3/SageMaker and docker-registry for ECR's registry.
(`make predict` runs against the real serve container in test_cloud_predict.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest

from cloud_helpers import (  # fixtures are used as test parameters
    BUCKET,
    REGION,
    ROLE,
    aws,
    docker_client,
    moto_url,
    start_registry,
    tiny_image,
)
from flystage.cloud.state import read_state
from train_helpers import make_manifest_set

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.docker


def test_push_upload_tune_train_deploy_batch_teardown(aws, moto_url, start_registry, tmp_path):
    api, settings = aws
    client = docker_client()
    suffix = uuid.uuid4().hex[:8]
    images = [
        tiny_image(client, f"flystage-make-test-{role}:{suffix}", tmp_path)
        for role in ("train", "serve")
    ]
    registry = start_registry()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYSTAGE_")} | {
        "FLYSTAGE_REGION": REGION,
        "FLYSTAGE_ROLE_ARN": ROLE,
        "FLYSTAGE_BUCKET": BUCKET,
        "FLYSTAGE_ENDPOINT_URL": moto_url,
        "FLYSTAGE_REGISTRY_OVERRIDE": registry,
        "FLYSTAGE_POLL_S": "1",
        "FLYSTAGE_TRAIN_IMAGE": f"flystage-make-test-train:{suffix}",
        "FLYSTAGE_SERVE_IMAGE": f"flystage-make-test-serve:{suffix}",
        "FLYSTAGE_STATE_FILE": settings.state_file,
    }

    def make(*args: str) -> str:
        result = subprocess.run(
            ["make", "-s", "-C", str(REPO), *args, f"RUNS={tmp_path / 'runs'}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 0, (
            f"make {args}: {result.stdout[-1500:]}\n{result.stderr[-1500:]}"
        )
        return result.stdout + result.stderr

    try:
        out = make("push")
        # Each image is named by the digest the push recorded.
        pushed = read_state(settings.state_file)["images"]
        train_uri = f"{registry}/flystage-train@{pushed[f'{registry}/flystage-train']['digest']}"
        serve_uri = f"{registry}/flystage-serve@{pushed[f'{registry}/flystage-serve']['digest']}"
        assert train_uri in out and serve_uri in out
        catalog = json.load(urllib.request.urlopen(f"http://{registry}/v2/_catalog", timeout=10))[
            "repositories"
        ]
        assert sorted(catalog) == ["flystage-serve", "flystage-train"]

        manifest = make_manifest_set(tmp_path / "set", train_per_class=2, valid_per_class=1)
        assert "uploaded 10, replaced 0, unchanged 0" in make("upload", f"MANIFEST={manifest}")
        assert "uploaded 0, replaced 0, unchanged 10" in make("upload", f"MANIFEST={manifest}")

        out = make("tune", "MAX_JOBS=4", "PARALLEL_JOBS=2", "HP=epochs=5")
        tuning_job = read_state(settings.state_file)["tuning_job"]
        assert f"{tuning_job}: Completed" in out
        described = api.call(
            "sagemaker",
            "describe_hyper_parameter_tuning_job",
            HyperParameterTuningJobName=tuning_job,
        )
        assert (
            described["TrainingJobDefinition"]["AlgorithmSpecification"]["TrainingImage"]
            == train_uri
        )

        out = make("train", "INSTANCE_COUNT=2", "SPOT=1", "HP=learning_rate=0.01 batch_size=64")
        job = read_state(settings.state_file)["training_job"]
        described = api.call("sagemaker", "describe_training_job", TrainingJobName=job)
        assert (
            described["ResourceConfig"]["InstanceCount"] == 2
            and described["EnableManagedSpotTraining"] is True
        )
        model = described["ModelArtifacts"]["S3ModelArtifacts"]
        assert f"model: {model}" in out

        assert "endpoint flystage is InService" in make("deploy")
        assert (
            api.call(
                "sagemaker", "describe_model", ModelName=read_state(settings.state_file)["model"]
            )["PrimaryContainer"]["ModelDataUrl"]
            == model
        )

        out = make("batch-predict", f"S3=s3://{BUCKET}/flystage/data/images/")
        assert "started transform job flystage-batch-" in out

        make("teardown")
        assert api.call("sagemaker", "list_endpoints")["Endpoints"] == []
        assert api.call("sagemaker", "list_models")["Models"] == []
        # The data and the images are still there.
        assert (
            api.call("s3", "list_objects_v2", Bucket=BUCKET, Prefix="flystage/data/")["KeyCount"]
            == 10
        )
        assert {
            r["repositoryName"] for r in api.call("ecr", "describe_repositories")["repositories"]
        } == {"flystage-train", "flystage-serve"}
    finally:
        for image in images:
            for tag in client.images.get(image.id).tags:
                client.images.remove(tag, force=True)
