"""make predict through sagemaker-runtime.invoke_endpoint against the real serve container.

moto cannot carry binary bodies, so boto3's sagemaker-runtime client is pointed at a
loopback stand-in of the runtime API (``cloud_helpers.RuntimeProxy``) in front of the real
``flystage-serve`` container: the request is serialised, sent, answered and parsed by the
same client code as against AWS. The answers must equal the local onnxruntime Predictor's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from artefact_helpers import make_artefact, write_image
from cloud_helpers import (  # fixtures are used as test parameters
    BUCKET,
    REGION,
    RuntimeProxy,
    aws,
    docker_client,
    fake_credentials,
    free_port,
    moto_url,
)
from flystage.cloud.endpoint import EndpointPredictor
from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings
from flystage.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
from flystage_local import serving  # noqa: E402

SERVE_IMAGE = os.environ.get("SERVE_IMAGE", "flystage-serve:latest")
pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """(runtime URL, model dir): the serve image on a tiny real artefact, behind the proxy."""
    client = docker_client()
    try:
        client.images.get(SERVE_IMAGE)
    except Exception:
        pytest.fail(f"{SERVE_IMAGE} not built: run `make images` first")
    root = tmp_path_factory.mktemp("endpoint")
    make_artefact(root / "model")
    name = f"flystage-cloud-predict-test-{uuid.uuid4().hex[:6]}"
    url, _ = serving.start_server(
        root / "model", SERVE_IMAGE, root / "models", port=free_port(), name=name
    )
    proxy = RuntimeProxy(url, "flystage")
    try:
        yield proxy, root / "model"
    finally:
        proxy.close()
        container = client.containers.list(all=True, filters={"name": f"^{name}$"})
        for c in container:
            c.remove(force=True)


@pytest.fixture
def api(endpoint, monkeypatch, tmp_path):
    fake_credentials(monkeypatch)
    proxy, _ = endpoint
    settings = Settings(
        region=REGION, endpoint_url=proxy.url, state_file=str(tmp_path / "state.json")
    )
    return Api(settings, out=io.StringIO())


@pytest.fixture
def folder(tmp_path):
    folder = tmp_path / "new images"
    for i, name in enumerate(["a/e1.tif", "a/e2.png", "b/e3.bmp", "e4.jpg"]):
        write_image(folder / name, seed=i)
    (folder / "b" / "broken.tif").write_bytes(b"II*\x00 truncated")
    return folder


def test_endpoint_predictor_matches_the_local_model(api, endpoint, folder):
    proxy, model_dir = endpoint
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    names = [p.relative_to(folder).as_posix() for p in paths]
    remote = EndpointPredictor(api, "flystage", concurrency=2).predict_sources(
        paths, k=3, names=names
    )
    local = Predictor(model_dir, threads=1).predict_sources(paths, k=3, names=names)
    by_name = {p.source: p for p in remote}
    for expected in local:
        got = by_name[expected.source]
        if expected.error:
            # The broken TIFF: the container's 4xx came back as ModelError, kept per image.
            assert got.error and got.error.startswith(expected.source) and not got.top
            continue
        assert got.error is None, got.error
        assert [s for s, _ in got.top] == [s for s, _ in expected.top]
        assert [p for _, p in got.top] == pytest.approx([p for _, p in expected.top], abs=1e-4)
    # Each image went as its raw bytes with its own content type and k in the custom attributes.
    sent = {r["headers"]["Content-Type"] for r in proxy.requests[-len(paths) :]}
    assert sent == {"image/tiff", "image/png", "image/bmp", "image/jpeg"}
    assert all(
        r["headers"].get("X-Amzn-SageMaker-Custom-Attributes") == "k=3"
        for r in proxy.requests[-len(paths) :]
    )


def test_unknown_endpoint_is_a_clear_error(api, folder):
    with pytest.raises(
        CloudError, match="ValidationError: Endpoint nowhere not found.*make deploy"
    ):
        EndpointPredictor(api, "nowhere").predict_sources([next(folder.rglob("*.png"))])


def test_make_predict_writes_csv_renames_and_undoes(endpoint, folder, tmp_path, monkeypatch):
    """`make predict DIR=... RENAME=1` and `make predict UNDO=...`, as a user runs them."""
    proxy, _ = endpoint
    fake_credentials(monkeypatch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYSTAGE_")} | {
        "FLYSTAGE_REGION": REGION,
        "FLYSTAGE_ENDPOINT_URL": proxy.url,
        "FLYSTAGE_STATE_FILE": str(tmp_path / "s.json"),
    }

    def make(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["make", "-s", "-C", str(REPO), "predict", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    out = tmp_path / "top3.csv"
    result = make(f"DIR={folder}", "RENAME=1", f"OUT={out}")
    # Exit 1 (make: 2): one image, the broken TIFF, has no prediction; the others are renamed.
    assert result.returncode != 0 and "predicted 4 of 5 image(s)" in result.stdout, result.stderr[
        -2000:
    ]
    rows = {r["file"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a/e1.tif", "a/e2.png", "b/e3.bmp", "e4.jpg", "b/broken.tif"}
    assert rows["b/broken.tif"]["error"] and not rows["a/e1.tif"]["error"]
    assert len(list(folder.rglob("*__s*"))) == 4 and (folder / "b" / "broken.tif").is_file()
    [undo] = tmp_path.glob("top3-undo-*.csv")
    result = make(f"UNDO={undo}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_batch_transform_answers_become_the_predict_csv(aws, endpoint, folder, tmp_path):
    """What batch transform leaves in S3 (one ``<image>.out`` per image: the serve
    container's own answer, produced here by the real container) becomes the same CSV."""
    from flystage.cloud.batch import write_answers

    api, _ = aws
    proxy, model_dir = endpoint
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "broken.tif")
    output = f"s3://{BUCKET}/flystage/batch/job/output"
    for path in paths[1:]:  # the first image has no answer: a record the job could not do
        request = urllib.request.Request(
            f"{proxy.url}/endpoints/flystage/invocations",
            data=path.read_bytes(),
            headers={"Content-Type": "application/x-image"},
            method="POST",
        )
        answer = urllib.request.urlopen(request, timeout=60).read()
        api.call(
            "s3",
            "put_object",
            Bucket=BUCKET,
            Key=f"flystage/batch/job/output/{path.relative_to(folder).as_posix()}.out",
            Body=answer,
        )
    out = tmp_path / "batch.csv"
    write_answers(api, paths, folder, output, out, 3)
    rows = {r["file"]: r for r in csv.DictReader(out.open())}
    local = {
        p.source: p
        for p in Predictor(model_dir, threads=1).predict_sources(
            paths, k=3, names=[p.relative_to(folder).as_posix() for p in paths]
        )
    }
    first = paths[0].relative_to(folder).as_posix()
    assert "no answer from the transform job" in rows[first]["error"]
    for name, prediction in local.items():
        if name != first:
            assert [rows[name][f"stage_{i}"] for i in (1, 2, 3)] == [s for s, _ in prediction.top]


@pytest.fixture
def transform_on_container(aws, endpoint, monkeypatch):
    """moto's CreateTransformJob (in this process's moto server) made to do SageMaker's work:
    every object under the input prefix goes, as one request with the job's content type and
    accept, to the real serve container; an answer becomes ``<key>.out`` under the output path,
    and any refused object fails the job (status Failed, SageMaker's FailureReason) while the
    other answers stay, as SageMaker leaves them. Only the job's status and outputs are moto's
    own state changed; every call still crosses HTTP."""
    from moto.sagemaker.models import SageMakerModelBackend

    api, _ = aws
    proxy, _ = endpoint
    original = SageMakerModelBackend.create_transform_job

    def transform(job) -> int:
        source = job.transform_input["DataSource"]["S3DataSource"]["S3Uri"]
        bucket, _, prefix = source.removeprefix("s3://").partition("/")
        out_bucket, _, out_prefix = job.transform_output["S3OutputPath"][5:].partition("/")
        failed = 0
        listed = api.call("s3", "list_objects_v2", Bucket=bucket, Prefix=prefix + "/")
        for item in listed.get("Contents", []):
            body = api.call("s3", "get_object", Bucket=bucket, Key=item["Key"])["Body"].read()
            request = urllib.request.Request(
                f"{proxy.url}/endpoints/flystage/invocations",
                data=body,
                headers={
                    "Content-Type": job.transform_input["ContentType"],
                    "Accept": job.transform_output["Accept"],
                },
                method="POST",
            )
            try:
                answer = urllib.request.urlopen(request, timeout=60).read()
            except urllib.error.HTTPError:
                failed += 1
                continue
            name = item["Key"].removeprefix(prefix + "/")
            api.call(
                "s3", "put_object", Bucket=out_bucket, Key=f"{out_prefix}/{name}.out", Body=answer
            )
        return failed

    def create_transform_job(self, *args, **kwargs):
        job = original(self, *args, **kwargs)
        if transform(job):
            job.transform_job_status = "Failed"
            job.failure_reason = "ClientError: See job logs for more information"
        return job

    monkeypatch.setattr(SageMakerModelBackend, "create_transform_job", create_transform_job)


def test_one_bad_image_fails_the_job_but_the_csv_has_every_other_answer(
    aws, endpoint, folder, tmp_path, transform_on_container
):
    """`make batch-predict DIR=...` of a folder with a broken TIFF: SageMaker fails the job but
    uploads the other answers; the CSV/JSON is written from them, the broken image gets an
    error row, and then the failure is reported with the count and where the job's log is."""
    from cloud_helpers import put_images
    from flystage.cloud.batch import batch_predict

    api, settings = aws
    api.out = io.StringIO()
    _, model_dir = endpoint
    put_images(api)
    out = tmp_path / "batch.csv"
    with pytest.raises(CloudError) as failure:
        batch_predict(
            api,
            settings,
            str(folder),
            model_data=f"s3://{BUCKET}/flystage/output/job/output/model.tar.gz",
            out_csv=out,
        )
    rows = {r["file"]: r for r in csv.DictReader(out.open())}
    assert set(rows) == {"a/e1.tif", "a/e2.png", "b/e3.bmp", "e4.jpg", "b/broken.tif"}
    error = rows["b/broken.tif"]["error"]
    assert "no answer from the transform job flystage-batch-" in error
    assert "the job failed on it" in error and "flystage predict" in error
    good = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "broken.tif")
    names = [p.relative_to(folder).as_posix() for p in good]
    for expected in Predictor(model_dir, threads=1).predict_sources(good, k=3, names=names):
        row = rows[expected.source]
        assert not row["error"]
        assert [row[f"stage_{i}"] for i in (1, 2, 3)] == [s for s, _ in expected.top]
    answers = json.loads(out.with_suffix(".json").read_text())
    assert (answers["n"], answers["errors"]) == (5, 1)
    message = str(failure.value)
    assert re.search(
        r"transform job flystage-batch-\S+ Failed \(ClientError: See job logs", message
    )
    assert "1 of 5 image(s) have no answer" in message and str(out) in message
    assert "/aws/sagemaker/TransformJobs" in message and "aws logs tail" in message
    # The job's own model is deleted also when the job failed.
    assert api.call("sagemaker", "list_models")["Models"] == []
