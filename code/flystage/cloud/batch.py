"""Batch transform: top-3 stages for every image under an S3 prefix, without an endpoint.

Creates a model for the job (serve image + model.tar.gz), runs CreateTransformJob with one
image per request (``SingleRecord``, ``SplitType None``), waits, and deletes the job's model
(never its input or output). Given a local folder, the images are uploaded first and the
answers are downloaded into the same top-3 CSV/JSON as ``flystage predict`` writes.

One image SageMaker could not transform fails the whole job, but the other images' answers are
still uploaded: the CSV/JSON is written from them, each image without an answer gets an error
row, and only then is the failure reported.

SageMaker sends a transform instance one request at a time unless told otherwise: the job asks
for one request per serve worker (``MaxConcurrentTransforms``), and the serve image runs one
worker per vCPU. (The serve image also answers ``GET /execution-parameters`` with the same rule,
for jobs that other tools start without the value.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flystage import formats
from flystage.cloud import ecr
from flystage.cloud.hosting import check_model_data, model_data_uri, model_request
from flystage.cloud.s3 import (
    check_bucket,
    check_role_can_read,
    parse_s3_uri,
    plan_folder,
    upload_files,
)
from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings
from flystage.cloud.training import job_name
from flystage.serving.client import AnswerError, parse_top
from flystage.serving.settings import MAX_PAYLOAD_MB as SERVE_PAYLOAD_ENV
from flystage.serving.settings import WORKERS as SERVE_WORKERS_ENV
from flystage.serving.settings import transform_limits

# Batch transform allows bodies up to 100 MB; lab TIFFs are a few MB.
MAX_PAYLOAD_MB = 20
# vCPUs per instance size: SageMaker's CPU families (m4-m7, c4-c7, r5-r7, t2/t3) have 2 in a
# "large", 4 in an "xlarge" and 4 per "Nxlarge", except those listed.
SIZE_VCPUS = {"medium": 2, "large": 2, "xlarge": 4}
VCPUS_EXCEPTIONS = {"ml.c4.8xlarge": 36}
# One content type for every record: the serve image reads the format from the magic bytes.
CONTENT_TYPE = "application/x-image"
LOG_GROUP = "/aws/sagemaker/TransformJobs"


def instance_vcpus(instance_type: str) -> int | None:
    """vCPUs of a SageMaker instance type such as ``ml.m5.xlarge`` (None if unknown)."""
    if instance_type in VCPUS_EXCEPTIONS:
        return VCPUS_EXCEPTIONS[instance_type]
    match = re.fullmatch(r"ml\.[a-z0-9-]+\.(\d*)(medium|large|xlarge)", instance_type)
    if not match:
        return None
    size, unit = match[1], match[2]
    if size and unit != "xlarge":
        return None
    return SIZE_VCPUS[unit] * (int(size) if size else 1)


def transform_concurrency(settings: Settings) -> tuple[int, int, int]:
    """(serve workers, MaxConcurrentTransforms, MaxPayloadInMB) for the transform instance: a
    request in flight per worker, each body limit within SageMaker's 100 MB in total."""
    workers = int(settings.transform_workers) or instance_vcpus(settings.transform_instance_type)
    if not workers or workers < 1:
        raise CloudError(
            f"cannot tell how many vCPUs a {settings.transform_instance_type} has: set "
            "transform_workers = N (its vCPUs) in flystage.toml or FLYSTAGE_TRANSFORM_WORKERS=N"
        )
    return workers, *transform_limits(workers, MAX_PAYLOAD_MB)


def transform_job_request(
    settings: Settings, name: str, model_name: str, input_uri: str, output_uri: str
) -> dict[str, Any]:
    workers, concurrent, payload_mb = transform_concurrency(settings)
    return {
        "TransformJobName": name,
        "ModelName": model_name,
        "BatchStrategy": "SingleRecord",
        "MaxConcurrentTransforms": concurrent,
        "MaxPayloadInMB": payload_mb,
        # The serve image's own body limit and worker count, matched to what the job sends.
        "Environment": {SERVE_WORKERS_ENV: str(workers), SERVE_PAYLOAD_ENV: str(payload_mb)},
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": CONTENT_TYPE,
            "CompressionType": "None",
            "SplitType": "None",
        },
        "TransformOutput": {
            "S3OutputPath": output_uri,
            "Accept": "application/json",
            "AssembleWith": "None",
        },
        "TransformResources": {
            "InstanceType": settings.transform_instance_type,
            "InstanceCount": 1,
        },
        "Tags": settings.tag_list(),
    }


def _local_images(source: str, payload_mb: int) -> tuple[Path, list[Path]]:
    """The folder ``source``, resolved, and the images under it (refused when none, or when
    one is over the job's body limit, which would fail the job)."""
    from flystage.organise import iter_images

    root = Path(source).expanduser().resolve()
    if not root.is_dir():
        raise CloudError(f"{root}: not a folder; give a folder of images or an s3:// prefix")
    local, _ = iter_images([root])
    if not local:
        raise CloudError(f"no images ({formats.suffix_text()}) under {root}")
    for path in local:
        if path.stat().st_size > payload_mb * 2**20:
            raise CloudError(
                f"{path}: {path.stat().st_size / 2**20:.1f} MB, over the transform job's "
                f"{payload_mb} MB per image; predict it with `flystage predict`, or lower "
                "transform_workers (FLYSTAGE_TRANSFORM_WORKERS) for a larger limit"
            )
    return root, local


def _run_transform_job(
    api: Api, settings: Settings, name: str, model_name: str, input_uri: str, output_uri: str
) -> dict[str, Any] | None:
    """Start the transform job and wait for it; its description (None in a dry run)."""
    api.call(
        "sagemaker",
        "create_transform_job",
        **transform_job_request(settings, name, model_name, input_uri, output_uri),
    )
    api.say(f"started transform job {name}: {input_uri} -> {output_uri}")
    try:
        api.wait(
            "sagemaker",
            "transform_job_completed_or_stopped",
            settings.poll_s,
            TransformJobName=name,
        )
    except CloudError:
        pass  # the description says why
    if api.dry_run:
        return None
    return api.call("sagemaker", "describe_transform_job", TransformJobName=name)


def job_log(settings: Settings, name: str) -> str:
    """Where a transform job's container log is, and the command that shows it."""
    return (
        f"its log is in CloudWatch, log group {LOG_GROUP}, streams {name}/... "
        f"(`aws logs tail {LOG_GROUP} --log-stream-name-prefix {name} --region "
        f"{settings.region}`)"
    )


def _failure(
    settings: Settings,
    described: dict[str, Any],
    output_uri: str,
    missing: int | None,
    total: int,
    out_csv: Path | None,
) -> CloudError:
    """The error for a job that did not answer every image, once the answers are saved."""
    name = described["TransformJobName"]
    status = described["TransformJobStatus"]
    reason = described.get("FailureReason") or "no reason given"
    if missing is None:
        saved = f"the answers it made are in {output_uri}/ (an image without <image>.out failed)"
    else:
        saved = (
            f"{missing} of {total} image(s) have no answer: error rows in {out_csv} and "
            f"{Path(out_csv).with_suffix('.json')}, which hold the others' answers"
        )
    return CloudError(
        f"transform job {name} {status} ({reason}); {saved}; {job_log(settings, name)}"
    )


def batch_predict(
    api: Api,
    settings: Settings,
    source: str,
    *,
    model_data: str | None = None,
    out_csv: Path | None = None,
    k: int = 3,
    force: bool = False,
) -> str:
    """Run a transform job over ``source`` (an s3:// prefix, or a local folder uploaded to
    ``prefix/batch/<job>/input``); returns the output S3 URI. With a local folder and
    ``out_csv``, also writes the top-k CSV/JSON from the job's answers (an existing one is
    refused before anything is sent, unless ``force``), also when some images failed; then a
    job that did not answer every image is a CloudError."""
    if out_csv is not None and not force:
        for path in (Path(out_csv), Path(out_csv).with_suffix(".json")):
            if path.exists():
                raise CloudError(
                    f"{path} already exists; choose another --out (OUT=) or pass --force to "
                    "replace it"
                )
    settings.require("role_arn", "bucket")
    _, _, payload_mb = transform_concurrency(settings)
    # What the execution role cannot read would fail inside the paid job: check first.
    if model_data:
        check_model_data(settings, model_data)
    if source.startswith("s3://"):
        check_role_can_read(settings, source, "batch input")
    check_bucket(api, settings)
    name = job_name("batch")
    local: list[Path] = []
    root = None
    if source.startswith("s3://"):
        input_uri = source
    else:
        root, local = _local_images(source, payload_mb)
        input_uri = settings.s3_uri("batch", name, "input")
        upload_files(api, plan_folder(local, root), *parse_s3_uri(input_uri))
    output_uri = settings.s3_uri("batch", name, "output")
    model_name = f"{name}-model"
    api.call(
        "sagemaker",
        "create_model",
        **model_request(
            settings,
            model_name,
            ecr.image_uri(api, settings, settings.serve_repository),
            model_data_uri(api, settings, model_data),
        ),
    )
    try:
        described = _run_transform_job(api, settings, name, model_name, input_uri, output_uri)
    finally:
        api.call("sagemaker", "delete_model", ModelName=model_name)
    api.say(f"answers in {output_uri}/ (one <image>.out JSON per image)")
    if described is None:
        return output_uri
    missing = None
    if local and out_csv is not None:
        missing = write_answers(api, local, root, output_uri, out_csv, k, force=force, job=name)
    if described["TransformJobStatus"] != "Completed" or missing:
        raise _failure(settings, described, output_uri, missing, len(local), out_csv)
    return output_uri


def _answer(api: Api, bucket: str, key: str, k: int) -> list[tuple[str, float]]:
    body = api.call("s3", "get_object", Bucket=bucket, Key=key)["Body"].read()
    return parse_top(json.loads(body))[:k]


def write_answers(
    api: Api,
    paths: list[Path],
    root: Path,
    output_uri: str,
    out_csv: Path,
    k: int,
    *,
    force: bool = False,
    job: str = "",
) -> int:
    """Download ``<key>.out`` for each image and write the predict CSV/JSON; an image without
    a readable answer gets an error row. Returns how many have none."""
    from flystage.outputs import write_csv, write_json
    from flystage.predictor import Prediction

    bucket, prefix = parse_s3_uri(output_uri)
    predictions = []
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            predictions.append(
                Prediction(name, top=_answer(api, bucket, f"{prefix}/{name}.out", k))
            )
        except (CloudError, AnswerError, ValueError) as err:
            why = (
                "the job failed on it"
                if isinstance(err, CloudError) and api.error_code(err) in ("NoSuchKey", "404")
                else str(err)
            )
            predictions.append(
                Prediction(
                    name,
                    error=f"{name}: no answer from the transform job {job} ({why}); see the "
                    "job's log for why, or predict it alone with `flystage predict`",
                )
            )
    write_csv(predictions, out_csv, k=k, force=force)
    write_json(predictions, out_csv.with_suffix(".json"), force=force, images=root)
    api.say(f"wrote {out_csv} and {out_csv.with_suffix('.json')}")
    return sum(p.error is not None for p in predictions)
