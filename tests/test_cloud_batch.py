"""Batch transform's concurrency: one request in flight per serve worker on the transform
instance (SageMaker sends one at a time otherwise), within SageMaker's 100 MB payload budget;
the requests go through moto's SageMaker over HTTP, which keeps what it was sent."""

from __future__ import annotations

import io

import pytest

from cloud_helpers import BUCKET, aws, moto_url, put_images  # noqa: F401 (fixtures)
from flystage.cloud import batch
from flystage.cloud.settings import CloudError
from flystage.serving import settings as serving

MODEL = f"s3://{BUCKET}/flystage/output/job/output/model.tar.gz"


def run_batch(api, settings, tmp_path, size: int = 100) -> dict:
    """batch_predict of a two-image folder; moto's description of the job it started."""
    folder = tmp_path / "new"
    folder.mkdir(exist_ok=True)
    (folder / "e1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(size))
    (folder / "e2.bmp").write_bytes(b"BM fake")
    batch.batch_predict(api, settings, str(folder), model_data=MODEL)
    [job] = api.call("sagemaker", "list_transform_jobs")["TransformJobSummaries"]
    return api.call("sagemaker", "describe_transform_job", TransformJobName=job["TransformJobName"])


@pytest.mark.parametrize(
    ("instance_type", "workers", "concurrent", "payload_mb"),
    [
        ("ml.m5.large", 2, 2, 20),
        ("ml.m5.xlarge", 4, 4, 20),  # the default: 4 vCPUs, so 4 serve workers
        ("ml.c5.2xlarge", 8, 8, 12),
        ("ml.c4.8xlarge", 36, 16, 6),  # the 100 MB budget caps concurrency at 16 x 6 MB
    ],
)
def test_one_request_per_serve_worker_within_the_payload_budget(
    aws, tmp_path, instance_type, workers, concurrent, payload_mb
):
    api, settings = aws
    api.out = io.StringIO()
    put_images(api)
    described = run_batch(api, settings.replace(transform_instance_type=instance_type), tmp_path)
    assert described["MaxConcurrentTransforms"] == concurrent
    assert described["MaxPayloadInMB"] == payload_mb
    assert described["MaxConcurrentTransforms"] * described["MaxPayloadInMB"] <= 100
    # The serve image runs that many workers and takes bodies as large as the job sends.
    assert described["Environment"] == {
        serving.WORKERS: str(workers),
        serving.MAX_PAYLOAD_MB: str(payload_mb),
    }
    # What the serve image makes of that environment on the instance's CPUs.
    served = serving.resolve(dict(described["Environment"]), cpus=workers)
    assert served.workers >= concurrent and served.max_payload_mb == payload_mb


def test_transform_workers_setting_overrides_the_table(aws, tmp_path):
    api, settings = aws
    api.out = io.StringIO()
    put_images(api)
    described = run_batch(
        api,
        settings.replace(transform_instance_type="ml.m7i.xlarge", transform_workers=2),
        tmp_path,
    )
    assert (described["MaxConcurrentTransforms"], described["MaxPayloadInMB"]) == (2, 20)


def test_unknown_instance_type_is_refused_before_anything_is_created(aws, tmp_path):
    api, settings = aws
    put_images(api)
    with pytest.raises(CloudError, match="FLYSTAGE_TRANSFORM_WORKERS=N"):
        run_batch(api, settings.replace(transform_instance_type="ml.newfamily.huge"), tmp_path)
    assert api.call("sagemaker", "list_models")["Models"] == []
    assert "Contents" not in api.call("s3", "list_objects_v2", Bucket=BUCKET)


def test_an_image_over_the_job_s_payload_limit_is_refused_before_upload(aws, tmp_path):
    api, settings = aws
    put_images(api)
    with pytest.raises(CloudError, match=r"e1.png: 7.0 MB, over the transform job's 6 MB"):
        run_batch(
            api, settings.replace(transform_instance_type="ml.m5.4xlarge"), tmp_path, 7 * 2**20
        )
    assert "Contents" not in api.call("s3", "list_objects_v2", Bucket=BUCKET)
    assert api.call("sagemaker", "list_transform_jobs")["TransformJobSummaries"] == []


def test_instance_vcpus():
    assert batch.instance_vcpus("ml.m5.xlarge") == 4
    assert batch.instance_vcpus("ml.m5.24xlarge") == 96
    assert batch.instance_vcpus("ml.c5.9xlarge") == 36
    assert batch.instance_vcpus("ml.t2.medium") == 2
    assert batch.instance_vcpus("ml.c4.8xlarge") == 36
    assert (
        batch.instance_vcpus("m5.xlarge") is None and batch.instance_vcpus("ml.m5.2large") is None
    )
