"""make deploy / teardown against moto's SageMaker over HTTP; the update path (moto lacks
UpdateEndpoint) on botocore's Stubber."""

from __future__ import annotations

import datetime as dt
import io
import re

import pytest
from botocore.stub import ANY, Stubber

from cloud_helpers import ACCOUNT, BUCKET, REGION, SERVE_URI, aws, moto_url, put_images  # noqa: F401 (fixtures)
from flystage.cloud import hosting
from flystage.cloud.settings import CloudError
from flystage.cloud.state import read_state, update_state

ARN = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model/flystage-model"
MODEL = f"s3://{BUCKET}/flystage/output/flystage-train-1/output/model.tar.gz"


def listing(api) -> tuple[list, list, list]:
    sm = "sagemaker"
    return (
        [m["ModelName"] for m in api.call(sm, "list_models")["Models"]],
        [c["EndpointConfigName"] for c in api.call(sm, "list_endpoint_configs")["EndpointConfigs"]],
        [e["EndpointName"] for e in api.call(sm, "list_endpoints")["Endpoints"]],
    )


LAB = [{"Key": "project", "Value": "someone-else"}]


def make_endpoint(api, settings, name: str, tags: list[list]) -> None:
    """A model ``<name>-model``, config ``<name>-config`` and endpoint ``name`` made straight
    through moto, tagged ``tags`` = [model tags, config tags, endpoint tags]."""
    model_tags, config_tags, endpoint_tags = tags
    sm = "sagemaker"
    api.call(
        sm,
        "create_model",
        ModelName=f"{name}-model",
        ExecutionRoleArn=settings.role_arn,
        Tags=model_tags,
        PrimaryContainer={"Image": SERVE_URI, "ModelDataUrl": MODEL},
    )
    api.call(
        sm,
        "create_endpoint_config",
        EndpointConfigName=f"{name}-config",
        Tags=config_tags,
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": f"{name}-model",
                "InstanceType": "ml.m5.xlarge",
                "InitialInstanceCount": 1,
            }
        ],
    )
    api.call(
        sm,
        "create_endpoint",
        EndpointName=name,
        EndpointConfigName=f"{name}-config",
        Tags=endpoint_tags,
    )


def test_deploy_then_teardown_through_moto(aws):
    api, settings = aws
    api.out = io.StringIO()
    put_images(api)
    api.call(
        "s3",
        "put_object",
        Bucket=BUCKET,
        Key="flystage/output/flystage-train-1/output/model.tar.gz",
        Body=b"x",
    )
    # The model of the last training job (make train recorded it).
    api.call(
        "sagemaker",
        "create_training_job",
        TrainingJobName="flystage-train-1",
        RoleArn=settings.role_arn,
        AlgorithmSpecification={"TrainingImage": "x", "TrainingInputMode": "File"},
        OutputDataConfig={"S3OutputPath": f"s3://{BUCKET}/flystage/output"},
        ResourceConfig={"InstanceType": "ml.m5.xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        StoppingCondition={"MaxRuntimeInSeconds": 60},
    )
    update_state(settings.state_file, training_job="flystage-train-1")
    assert hosting.deploy(api, settings) == "flystage"

    [model], [config], [endpoint] = listing(api)
    described = api.call("sagemaker", "describe_model", ModelName=model)
    assert described["PrimaryContainer"]["Image"] == SERVE_URI
    assert described["PrimaryContainer"]["ModelDataUrl"] == MODEL
    assert described["ExecutionRoleArn"] == settings.role_arn
    [variant] = api.call("sagemaker", "describe_endpoint_config", EndpointConfigName=config)[
        "ProductionVariants"
    ]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == (
        model,
        "ml.m5.xlarge",
        1,
    )
    assert (
        api.call("sagemaker", "describe_endpoint", EndpointName="flystage")["EndpointStatus"]
        == "InService"
    )
    assert "endpoint flystage is InService" in api.out.getvalue()

    deleted = hosting.teardown(api, settings)
    assert deleted == ["flystage", config, model]
    assert listing(api) == ([], [], [])
    # Never the data: the model artefact and the images stay in S3, the images in ECR.
    assert api.call(
        "s3",
        "head_object",
        Bucket=BUCKET,
        Key="flystage/output/flystage-train-1/output/model.tar.gz",
    )
    assert len(api.call("ecr", "describe_repositories")["repositories"]) == 2
    # A second teardown finds nothing and says so.
    assert hosting.teardown(api, settings) == []
    assert "no endpoint flystage: nothing to delete" in api.out.getvalue()


def test_serverless_endpoint_config(aws):
    api, settings = aws
    api.out = io.StringIO()
    put_images(api)
    hosting.deploy(
        api,
        settings.replace(serverless=True, serverless_memory_mb=4096, serverless_max_concurrency=2),
        MODEL,
    )
    [_], [config], [_] = listing(api)
    [variant] = api.call("sagemaker", "describe_endpoint_config", EndpointConfigName=config)[
        "ProductionVariants"
    ]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 2}
    assert "InstanceType" not in variant


def test_deploy_needs_a_model(aws):
    api, settings = aws
    with pytest.raises(CloudError, match="run `make train` first, or give MODEL_DATA"):
        hosting.deploy(api, settings)
    with pytest.raises(CloudError, match="give the s3://.../model.tar.gz"):
        hosting.deploy(api, settings, "s3://bucket/model")


def old_config(**variant) -> dict:
    """DescribeEndpointConfig of the endpoint's current (instance-based) config."""
    return {
        "EndpointConfigName": "flystage-config-old",
        "EndpointConfigArn": ARN,
        "CreationTime": dt.datetime(2025, 1, 1),
        "ProductionVariants": [
            {"VariantName": "AllTraffic", "ModelName": "flystage-model-old", **variant}
        ],
    }


def described_endpoint(arn: str, config: str, status: str) -> dict:
    """DescribeEndpoint of the endpoint "flystage" (its ARN, current config and status)."""
    when = dt.datetime(2025, 1, 1)
    return {
        "EndpointName": "flystage",
        "EndpointArn": arn,
        "EndpointConfigName": config,
        "EndpointStatus": status,
        "CreationTime": when,
        "LastModifiedTime": when,
    }


def test_redeploy_updates_the_endpoint_and_removes_the_old_model(aws):
    api, settings = aws
    api.out = io.StringIO()
    settings = settings.replace(registry_override="registry.example:5000", image_tag="latest")
    client = api.client("sagemaker")
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/flystage"
    endpoint = described_endpoint(arn, "flystage-config-old", "InService")
    with Stubber(client) as stub:
        stub.add_response("describe_endpoint", endpoint, {"EndpointName": "flystage"})
        stub.add_response("list_tags", {"Tags": settings.tag_list()}, {"ResourceArn": arn})
        stub.add_response(
            "describe_endpoint_config", old_config(), {"EndpointConfigName": "flystage-config-old"}
        )
        stub.add_response(
            "create_model",
            {"ModelArn": ARN},
            {
                "ModelName": ANY,
                "ExecutionRoleArn": settings.role_arn,
                "Tags": settings.tag_list(),
                "PrimaryContainer": {
                    "Image": "registry.example:5000/flystage-serve:latest",
                    "ModelDataUrl": MODEL,
                    "Mode": "SingleModel",
                },
            },
        )
        stub.add_response(
            "create_endpoint_config",
            {"EndpointConfigArn": ARN},
            {"EndpointConfigName": ANY, "ProductionVariants": ANY, "Tags": ANY},
        )
        stub.add_response(
            "update_endpoint",
            {"EndpointArn": arn},
            {"EndpointName": "flystage", "EndpointConfigName": ANY},
        )
        stub.add_response(
            "describe_endpoint",
            endpoint | {"EndpointConfigName": "new"},
            {"EndpointName": "flystage"},
        )
        stub.add_response(
            "delete_endpoint_config", {}, {"EndpointConfigName": "flystage-config-old"}
        )
        stub.add_response("delete_model", {}, {"ModelName": "flystage-model-old"})
        hosting.deploy(api, settings, MODEL)
        stub.assert_no_pending_responses()
    state = read_state(settings.state_file)
    assert state["model"].startswith("flystage-model-") and state["endpoint_config"].startswith(
        "flystage-config-"
    )


def test_redeploy_while_updating_is_refused(aws):
    api, settings = aws
    settings = settings.replace(registry_override="registry.example:5000", image_tag="latest")
    client = api.client("sagemaker")
    endpoint = described_endpoint(ARN, "c", "Updating")
    ours = {"Tags": settings.tag_list()}
    with Stubber(client) as stub:
        stub.add_response("describe_endpoint", endpoint, {"EndpointName": "flystage"})
        stub.add_response("list_tags", ours, {"ResourceArn": ARN})
        with pytest.raises(
            CloudError, match="endpoint flystage is Updating: wait until it is InService"
        ):
            hosting.deploy(api, settings, MODEL)
        stub.add_response(
            "describe_endpoint",
            endpoint | {"EndpointStatus": "Failed", "FailureReason": "ping timed out"},
            {"EndpointName": "flystage"},
        )
        stub.add_response("list_tags", ours, {"ResourceArn": ARN})
        with pytest.raises(
            CloudError,
            match=r"Failed \(ping timed out\) and cannot be updated: run `make teardown`",
        ):
            hosting.deploy(api, settings, MODEL)
        # Nothing was created for either refused deploy.
        stub.assert_no_pending_responses()


def test_deploy_refuses_an_endpoint_without_flystages_tags_and_creates_nothing(aws):
    """An existing endpoint of that name that does not carry every flystage tag (someone
    else's, or one deployed without tags) is not updated: the refusal says what to do, and no
    model or endpoint config is made."""
    api, settings = aws
    api.out = io.StringIO()
    settings = settings.replace(registry_override="registry.example:5000", image_tag="test")
    make_endpoint(api, settings, "flystage", [LAB, LAB, LAB])
    # Carries project=flystage but not the lab's second tag.
    make_endpoint(api, settings, "flystage-lab", [[], [], settings.tag_list()])
    before = listing(api)
    arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/flystage"
    with pytest.raises(
        CloudError,
        match=re.escape(
            "endpoint flystage exists and does not carry flystage's tags (project=flystage): "
            "deploy replaces only an endpoint flystage created, and nothing was created. Deploy "
            "under another endpoint_name (FLYSTAGE_ENDPOINT_NAME=...); or, if it is yours, "
            "delete it by hand (aws sagemaker delete-endpoint --endpoint-name flystage: "
            "`make teardown` leaves it alone); or, for flystage to manage it, tag it (aws "
            f"sagemaker add-tags --resource-arn {arn} --tags Key=project,Value=flystage)"
        ),
    ):
        hosting.deploy(api, settings, MODEL)
    two_tags = settings.replace(
        endpoint_name="flystage-lab", tags={"project": "flystage", "lab": "x"}
    )
    with pytest.raises(
        CloudError, match=r"does not carry flystage's tags \(lab=x, project=flystage\)"
    ):
        hosting.deploy(api, two_tags, MODEL)
    with pytest.raises(CloudError, match="endpoint flystage exists and tags is empty"):
        hosting.deploy(api, settings.replace(tags={}), MODEL)
    assert listing(api) == before
    assert "endpoint" not in read_state(settings.state_file)


def test_serverless_onto_an_instance_endpoint_is_refused_before_creating_anything(aws):
    api, settings = aws
    settings = settings.replace(
        registry_override="registry.example:5000", image_tag="latest", serverless=True
    )
    endpoint = described_endpoint(ARN, "flystage-config-old", "InService")
    with Stubber(api.client("sagemaker")) as stub:
        stub.add_response("describe_endpoint", endpoint, {"EndpointName": "flystage"})
        stub.add_response("list_tags", {"Tags": settings.tag_list()}, {"ResourceArn": ARN})
        stub.add_response(
            "describe_endpoint_config",
            old_config(InstanceType="ml.m5.xlarge", InitialInstanceCount=1),
            {"EndpointConfigName": "flystage-config-old"},
        )
        with pytest.raises(
            CloudError,
            match="runs on instances and SageMaker cannot update it to serverless: "
            "run `make teardown`",
        ):
            hosting.deploy(api, settings, MODEL)
        # No CreateModel / CreateEndpointConfig was sent (the Stubber would have failed on it).
        stub.assert_no_pending_responses()


def test_names_derived_from_a_long_endpoint_name_stay_within_63_characters(aws):
    stamp = "20260101-120000"
    assert hosting.derived_name("flystage", "model", stamp) == f"flystage-model-{stamp}"
    long = "lab-" + "x" * 59
    names = {kind: hosting.derived_name(long, kind, stamp) for kind in ("model", "config")}
    assert all(len(n) <= 63 and n.endswith(f"-{kind}-{stamp}") for kind, n in names.items())
    assert names["model"] == hosting.derived_name(long, "model", stamp)  # deterministic
    assert (
        hosting.derived_name(long[:-1] + "y", "model", stamp) != names["model"]
    )  # same start, other name
    # Through moto: a 63-character endpoint name deploys with every name within the limit.
    api, settings = aws
    api.out = io.StringIO()
    put_images(api)
    hosting.deploy(api, settings.replace(endpoint_name=long), MODEL)
    [model], [config], [endpoint] = listing(api)
    assert endpoint == long and len(model) <= 63 and len(config) <= 63
    with pytest.raises(CloudError, match="endpoint_name .* 1-63 letters"):
        settings.replace(endpoint_name=long + "z").validate()


def test_teardown_deletes_only_what_carries_flystages_tags(aws):
    """An endpoint of the same name that flystage did not deploy stays, and so does a model
    without the tags behind a flystage endpoint; each skip is said."""
    api, settings = aws
    api.out = io.StringIO()
    make_endpoint(api, settings, "flystage", [LAB, LAB, LAB])
    assert hosting.teardown(api, settings) == []
    assert listing(api) == (["flystage-model"], ["flystage-config"], ["flystage"])
    text = api.out.getvalue()
    assert "skipped endpoint flystage: it does not carry flystage's tags (project=flystage)" in text
    assert "left endpoint config flystage-config and its models as they are" in text

    ours = settings.tag_list()
    make_endpoint(api, settings, "flystage-lab", [[], ours, ours])
    assert hosting.teardown(api, settings.replace(endpoint_name="flystage-lab")) == [
        "flystage-lab",
        "flystage-lab-config",
    ]
    assert (
        "skipped model flystage-lab-model: it does not carry flystage's tags" in api.out.getvalue()
    )
    assert "flystage-lab-model" in listing(api)[0]
    with pytest.raises(
        CloudError,
        match="tags is empty: teardown deletes only resources that carry flystage's tags",
    ):
        hosting.teardown(api, settings.replace(tags={}))
