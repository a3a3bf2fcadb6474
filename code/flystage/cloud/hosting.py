"""Host the model on a SageMaker endpoint: deploy and tear down (predicting through it:
:mod:`flystage.cloud.endpoint`).

Deploy = CreateModel (serve image + model.tar.gz) -> CreateEndpointConfig (real-time, or
serverless) -> CreateEndpoint, or UpdateEndpoint when the endpoint exists (then the old
config and model are deleted once the new one is in service); an existing endpoint without
every flystage tag is refused before anything is created. Teardown deletes the endpoint, its
config and its model, each only if it carries flystage's tags; never S3 data or images.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flystage.cloud import ecr
from flystage.cloud.s3 import check_role_can_read
from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings
from flystage.cloud.state import read_state, update_state
from flystage.cloud.training import job_name

VARIANT = "AllTraffic"
# SageMaker's limit on model, endpoint config and endpoint names.
MAX_NAME = 63


def derived_name(endpoint_name: str, kind: str, stamp: str) -> str:
    """``<endpoint_name>-<kind>-<stamp>``, or, when that exceeds SageMaker's 63 characters,
    the endpoint name cut short plus 8 hex digits of its SHA-1: deterministic, and two long
    names that share their beginning still get different names."""
    import hashlib

    tail = f"-{kind}-{stamp}"
    if len(endpoint_name) + len(tail) <= MAX_NAME:
        return endpoint_name + tail
    digest = hashlib.sha1(endpoint_name.encode(), usedforsecurity=False).hexdigest()[:8]
    keep = MAX_NAME - len(tail) - len(digest) - 1
    return f"{endpoint_name[:keep].rstrip('-')}-{digest}{tail}"


def check_model_data(settings: Settings, model_data: str) -> None:
    """CloudError unless ``model_data`` is an s3://.../model.tar.gz the execution role may read."""
    if not model_data.startswith("s3://") or not model_data.endswith(".tar.gz"):
        raise CloudError(
            f"model data {model_data!r}: give the s3://.../model.tar.gz of a training job"
        )
    check_role_can_read(settings, model_data, "model data")


def model_data_uri(api: Api, settings: Settings, model_data: str | None = None) -> str:
    """The model.tar.gz to serve: given, else the artefact of the last training job."""
    if model_data:
        check_model_data(settings, model_data)
        return model_data
    job = read_state(settings.state_file).get("training_job")
    if not job and api.dry_run:
        return "<S3ModelArtifacts of the last training job>"
    if not job:
        raise CloudError(
            f"no training job recorded in {settings.state_file}: run `make train` first, or give "
            "MODEL_DATA=s3://.../model.tar.gz"
        )
    if api.dry_run:
        return f"<S3ModelArtifacts of training job {job}>"
    described = api.call("sagemaker", "describe_training_job", TrainingJobName=job)
    if described["TrainingJobStatus"] != "Completed":
        raise CloudError(
            f"training job {job} is {described['TrainingJobStatus']}, not Completed: nothing to "
            "deploy"
        )
    return described["ModelArtifacts"]["S3ModelArtifacts"]


def model_request(settings: Settings, name: str, image_uri: str, model_data: str) -> dict[str, Any]:
    return {
        "ModelName": name,
        "PrimaryContainer": {"Image": image_uri, "ModelDataUrl": model_data, "Mode": "SingleModel"},
        "ExecutionRoleArn": settings.role_arn,
        "Tags": settings.tag_list(),
    }


def endpoint_config_request(settings: Settings, name: str, model_name: str) -> dict[str, Any]:
    """Real-time on ``endpoint_instance_type`` or, with ``serverless``, a ServerlessConfig."""
    variant: dict[str, Any] = {"VariantName": VARIANT, "ModelName": model_name}
    if settings.serverless:
        variant["ServerlessConfig"] = {
            "MemorySizeInMB": int(settings.serverless_memory_mb),
            "MaxConcurrency": int(settings.serverless_max_concurrency),
        }
    else:
        variant |= {
            "InitialInstanceCount": int(settings.endpoint_instance_count),
            "InstanceType": settings.endpoint_instance_type,
            "InitialVariantWeight": 1.0,
        }
    return {
        "EndpointConfigName": name,
        "ProductionVariants": [variant],
        "Tags": settings.tag_list(),
    }


def current_endpoint(api: Api, name: str) -> dict[str, Any] | None:
    """DescribeEndpoint, or None if there is no such endpoint."""
    try:
        return api.call("sagemaker", "describe_endpoint", EndpointName=name)
    except CloudError as err:
        # SageMaker answers a missing endpoint with a ValidationException "Could not find endpoint".
        if api.error_code(err) == "ValidationException" and "ould not find" in str(err):
            return None
        raise


def _describe(api: Api, operation: str, **request: Any) -> dict[str, Any] | None:
    """A SageMaker Describe* call, or None if the resource does not exist."""
    try:
        return api.call("sagemaker", operation, **request)
    except CloudError as err:
        if api.error_code(err) == "ValidationException":
            return None
        raise


def _config_variants(api: Api, config_name: str) -> list[dict[str, Any]]:
    """The ProductionVariants of an endpoint config ([] if it is gone)."""
    config = _describe(api, "describe_endpoint_config", EndpointConfigName=config_name)
    return config["ProductionVariants"] if config else []


def _delete_config_and_models(api: Api, config_name: str, models: list[str]) -> None:
    api.call("sagemaker", "delete_endpoint_config", EndpointConfigName=config_name)
    api.say(f"deleted endpoint config {config_name}")
    for model in models:
        api.call("sagemaker", "delete_model", ModelName=model)
        api.say(f"deleted model {model}")


def _check_ours(api: Api, settings: Settings, arn: str) -> None:
    """Refuse to update an endpoint that does not carry every flystage tag: it may be someone
    else's, and `make teardown` would leave what replaced it behind."""
    name = settings.endpoint_name
    if not settings.tags:
        raise CloudError(
            f"endpoint {name} exists and tags is empty: deploy replaces only an endpoint that "
            "carries flystage's tags; set the [tags] it was deployed with (default: project = "
            '"flystage")'
        )
    if carries_tags(api, settings.tags, arn):
        return
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(settings.tags.items()))
    tag_args = " ".join(f"Key={k},Value={v}" for k, v in sorted(settings.tags.items()))
    raise CloudError(
        f"endpoint {name} exists and does not carry flystage's tags ({wanted}): deploy replaces "
        "only an endpoint flystage created, and nothing was created. Deploy under another "
        f"endpoint_name (FLYSTAGE_ENDPOINT_NAME=...); or, if it is yours, delete it by hand "
        f"(aws sagemaker delete-endpoint --endpoint-name {name}: `make teardown` leaves it "
        f"alone); or, for flystage to manage it, tag it (aws sagemaker add-tags --resource-arn "
        f"{arn} --tags {tag_args})"
    )


def _check_updatable(
    api: Api, settings: Settings, existing: dict[str, Any] | None
) -> tuple[str | None, list[str]]:
    """Refuse a deploy onto an endpoint that cannot be updated (not flystage's, Failed, not
    InService, or instance-based when serverless is asked). Returns the endpoint's current
    config and its models (None, [] when there is no endpoint yet)."""
    if existing is None:
        return None, []
    _check_ours(api, settings, existing["EndpointArn"])
    if existing["EndpointStatus"] == "Failed":
        raise CloudError(
            f"endpoint {settings.endpoint_name} is Failed "
            f"({existing.get('FailureReason', 'no reason given')}) and cannot be updated: run "
            "`make teardown`, then `make deploy`"
        )
    if existing["EndpointStatus"] != "InService":
        raise CloudError(
            f"endpoint {settings.endpoint_name} is {existing['EndpointStatus']}: wait until it "
            "is InService before deploying again"
        )
    old_config = existing["EndpointConfigName"]
    old_variants = _config_variants(api, old_config)
    # SageMaker cannot turn an instance-based endpoint into a serverless one: the update
    # would fail after the model and config exist.
    if settings.serverless and any("ServerlessConfig" not in v for v in old_variants):
        raise CloudError(
            f"endpoint {settings.endpoint_name} runs on instances and SageMaker cannot "
            "update it to serverless: run `make teardown` first, or deploy under another "
            "endpoint_name (FLYSTAGE_ENDPOINT_NAME=...)"
        )
    old_models = [v["ModelName"] for v in old_variants]
    return old_config, old_models


def _create_or_update_endpoint(
    api: Api, settings: Settings, config_name: str, *, update: bool
) -> None:
    """Point the endpoint at ``config_name``: create it (tagged), or update it."""
    if not update:
        api.call(
            "sagemaker",
            "create_endpoint",
            EndpointName=settings.endpoint_name,
            EndpointConfigName=config_name,
            Tags=settings.tag_list(),
        )
    else:
        api.call(
            "sagemaker",
            "update_endpoint",
            EndpointName=settings.endpoint_name,
            EndpointConfigName=config_name,
        )


def _wait_in_service(api: Api, settings: Settings) -> None:
    """Wait until the endpoint is InService; a failure says its status, reason and log."""
    try:
        api.wait(
            "sagemaker", "endpoint_in_service", settings.poll_s, EndpointName=settings.endpoint_name
        )
    except CloudError:
        described = api.call("sagemaker", "describe_endpoint", EndpointName=settings.endpoint_name)
        raise CloudError(
            f"endpoint {settings.endpoint_name} is {described['EndpointStatus']}: "
            f"{described.get('FailureReason', 'no reason given')}; the container log is in "
            f"CloudWatch under /aws/sagemaker/Endpoints/{settings.endpoint_name}"
        ) from None


def deploy(
    api: Api, settings: Settings, model_data: str | None = None, *, wait: bool = True
) -> str:
    """Create (or update) the endpoint ``settings.endpoint_name``; returns its name."""
    settings.require("role_arn")
    model_data = model_data_uri(api, settings, model_data)
    image = ecr.image_uri(api, settings, settings.serve_repository)
    stamp = job_name("x").removeprefix("flystage-x-")
    model_name = derived_name(settings.endpoint_name, "model", stamp)
    config_name = derived_name(settings.endpoint_name, "config", stamp)
    if api.dry_run:
        # What a real deploy asks first: is there an endpoint of that name, and is it ours?
        # (The dry run goes on as if there were none.)
        api.call("sagemaker", "describe_endpoint", EndpointName=settings.endpoint_name)
        api.call("sagemaker", "list_tags", ResourceArn=f"<EndpointArn of {settings.endpoint_name}>")
    existing = None if api.dry_run else current_endpoint(api, settings.endpoint_name)
    # Checked before creating anything, so a refused deploy leaves nothing behind.
    old_config, old_models = _check_updatable(api, settings, existing)
    api.call("sagemaker", "create_model", **model_request(settings, model_name, image, model_data))
    api.call(
        "sagemaker",
        "create_endpoint_config",
        **endpoint_config_request(settings, config_name, model_name),
    )
    _create_or_update_endpoint(api, settings, config_name, update=existing is not None)
    if api.dry_run:
        api.wait(
            "sagemaker", "endpoint_in_service", settings.poll_s, EndpointName=settings.endpoint_name
        )
        return settings.endpoint_name
    update_state(
        settings.state_file,
        endpoint=settings.endpoint_name,
        model=model_name,
        endpoint_config=config_name,
    )
    api.say(
        f"{'updating' if existing else 'creating'} endpoint {settings.endpoint_name} ({model_data})"
    )
    if not wait:
        return settings.endpoint_name
    _wait_in_service(api, settings)
    if existing is not None and old_config != config_name:
        _delete_config_and_models(api, old_config, old_models)
    api.say(f"endpoint {settings.endpoint_name} is InService")
    return settings.endpoint_name


def _teardown_dry_run(api: Api, name: str, wanted: str) -> None:
    """The calls teardown makes, as dry-run calls (what each names is not known yet)."""
    api.call("sagemaker", "describe_endpoint", EndpointName=name)
    api.call("sagemaker", "list_tags", ResourceArn=f"<EndpointArn of {name}>")
    api.call(
        "sagemaker",
        "describe_endpoint_config",
        EndpointConfigName=f"<EndpointConfigName of {name}>",
    )
    api.call("sagemaker", "list_tags", ResourceArn="<EndpointConfigArn of that config>")
    api.call("sagemaker", "delete_endpoint", EndpointName=name)
    api.call(
        "sagemaker",
        "delete_endpoint_config",
        EndpointConfigName=f"<EndpointConfigName of {name}>",
    )
    api.call("sagemaker", "describe_model", ModelName="<ModelName of each variant of that config>")
    api.call("sagemaker", "list_tags", ResourceArn="<ModelArn of that model>")
    api.call("sagemaker", "delete_model", ModelName="<ModelName of each variant of that config>")
    api.say(f"# each is deleted only if it carries the tags {wanted}")


def carries_tags(api: Api, tags: Mapping[str, str], arn: str) -> bool:
    """Whether the SageMaker resource at ``arn`` carries every tag of ``tags`` (ListTags): the
    one ownership rule of deploy and teardown."""
    listed = api.call("sagemaker", "list_tags", ResourceArn=arn).get("Tags", [])
    carried = {t["Key"]: t["Value"] for t in listed}
    return all(carried.get(k) == str(v) for k, v in tags.items())


def _owned(api: Api, tags: dict, wanted: str, kind: str, resource: str, arn: str) -> bool:
    """Whether the resource at ``arn`` carries every tag of ``tags``; says so when not."""
    if carries_tags(api, tags, arn):
        return True
    api.say(
        f"skipped {kind} {resource}: it does not carry flystage's tags ({wanted}); delete it "
        "yourself if it is yours"
    )
    return False


def teardown(api: Api, settings: Settings) -> list[str]:
    """Delete the endpoint, its config and its model(s), each only if it carries every tag
    of ``settings.tags`` (what deploy puts on them); says what it skipped. Returns what was
    deleted."""
    if not settings.tags:
        raise CloudError(
            "tags is empty: teardown deletes only resources that carry flystage's tags; set the "
            '[tags] the endpoint was deployed with (default: project = "flystage")'
        )
    name = settings.endpoint_name
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(settings.tags.items()))
    if api.dry_run:
        _teardown_dry_run(api, name, wanted)
        return []
    deleted: list[str] = []

    owned = functools.partial(_owned, api, settings.tags, wanted)

    existing = current_endpoint(api, name)
    if existing is None:
        api.say(f"no endpoint {name}: nothing to delete")
        state = read_state(settings.state_file)
        # A deploy that failed before CreateEndpoint can leave its config and model behind.
        config_name, model = state.get("endpoint_config"), state.get("model")
        if not config_name or state.get("endpoint") != name:
            return deleted
        config = _describe(api, "describe_endpoint_config", EndpointConfigName=config_name)
        models = (
            [v["ModelName"] for v in config["ProductionVariants"]]
            if config
            else ([model] if model else [])
        )
    else:
        config_name = existing["EndpointConfigName"]
        if not owned("endpoint", name, existing["EndpointArn"]):
            api.say(f"left endpoint config {config_name} and its models as they are")
            return deleted
        config = _describe(api, "describe_endpoint_config", EndpointConfigName=config_name)
        models = [v["ModelName"] for v in config["ProductionVariants"]] if config else []
        api.call("sagemaker", "delete_endpoint", EndpointName=name)
        api.say(f"deleting endpoint {name}")
        api.wait("sagemaker", "endpoint_deleted", min(settings.poll_s, 15), EndpointName=name)
        deleted.append(name)
    if config is not None and owned("endpoint config", config_name, config["EndpointConfigArn"]):
        api.call("sagemaker", "delete_endpoint_config", EndpointConfigName=config_name)
        api.say(f"deleted endpoint config {config_name}")
        deleted.append(config_name)
    for model in models:
        described = _describe(api, "describe_model", ModelName=model)
        if described is not None and owned("model", model, described["ModelArn"]):
            api.call("sagemaker", "delete_model", ModelName=model)
            api.say(f"deleted model {model}")
            deleted.append(model)
    return deleted
