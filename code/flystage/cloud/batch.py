"""Batch transform: top-3 stages for every image under an S3 prefix, without an endpoint.

Creates a model for the job (serve image + model.tar.gz), runs CreateTransformJob with one
image per request (``SingleRecord``, ``SplitType None``), waits, and deletes the job's model
(never its input or output). Given a local folder, the images are uploaded first and the
answers are downloaded into the same top-3 CSV/JSON as ``flystage predict`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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

# Batch transform allows bodies up to 100 MB; lab TIFFs are a few MB.
MAX_PAYLOAD_MB = 20
# One content type for every record: the serve image reads the format from the magic bytes.
CONTENT_TYPE = "application/x-image"


def transform_job_request(
    settings: Settings, name: str, model_name: str, input_uri: str, output_uri: str
) -> dict[str, Any]:
    return {
        "TransformJobName": name,
        "ModelName": model_name,
        "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": MAX_PAYLOAD_MB,
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


def _local_images(source: str) -> tuple[Path, list[Path]]:
    """The folder ``source``, resolved, and the images under it (refused when none)."""
    from flystage.organise import iter_images

    root = Path(source).expanduser().resolve()
    if not root.is_dir():
        raise CloudError(f"{root}: not a folder; give a folder of images or an s3:// prefix")
    local, _ = iter_images([root])
    if not local:
        raise CloudError(f"no images (.tif/.tiff/.png/.bmp/.jpg/.jpeg) under {root}")
    return root, local


def _run_transform_job(
    api: Api, settings: Settings, name: str, model_name: str, input_uri: str, output_uri: str
) -> None:
    """Start the transform job and wait for it; raises unless it Completed."""
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
        pass  # the description below says why
    if not api.dry_run:
        described = api.call("sagemaker", "describe_transform_job", TransformJobName=name)
        if described["TransformJobStatus"] != "Completed":
            raise CloudError(
                f"transform job {name} {described['TransformJobStatus']}: "
                f"{described.get('FailureReason', '')}; see /aws/sagemaker/TransformJobs in "
                "CloudWatch"
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
    refused before anything is sent, unless ``force``)."""
    if out_csv is not None and not force:
        for path in (Path(out_csv), Path(out_csv).with_suffix(".json")):
            if path.exists():
                raise CloudError(
                    f"{path} already exists; choose another --out (OUT=) or pass --force to "
                    "replace it"
                )
    settings.require("role_arn", "bucket")
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
        root, local = _local_images(source)
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
        _run_transform_job(api, settings, name, model_name, input_uri, output_uri)
    finally:
        api.call("sagemaker", "delete_model", ModelName=model_name)
    api.say(f"answers in {output_uri}/ (one <image>.out JSON per image)")
    if local and out_csv is not None and not api.dry_run:
        write_answers(api, local, root, output_uri, out_csv, k, force=force)
    return output_uri


def write_answers(
    api: Api,
    paths: list[Path],
    root: Path,
    output_uri: str,
    out_csv: Path,
    k: int,
    *,
    force: bool = False,
) -> None:
    """Download ``<key>.out`` for each image and write the predict CSV/JSON."""
    from flystage.predict import Prediction, write_csv, write_json

    bucket, prefix = parse_s3_uri(output_uri)
    predictions = []
    for path in paths:
        name = path.relative_to(root).as_posix()
        try:
            body = api.call("s3", "get_object", Bucket=bucket, Key=f"{prefix}/{name}.out")[
                "Body"
            ].read()
            predictions.append(Prediction(name, top=parse_top(json.loads(body))[:k]))
        except (CloudError, AnswerError, ValueError) as err:
            predictions.append(
                Prediction(name, error=f"{name}: no answer from the transform job ({err})")
            )
    write_csv(predictions, out_csv, k=k, force=force)
    write_json(predictions, out_csv.with_suffix(".json"), force=force)
    api.say(f"wrote {out_csv} and {out_csv.with_suffix('.json')}")
