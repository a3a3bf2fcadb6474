"""make upload against moto's S3 over HTTP: layout, rewritten manifest, checksum skip,
multipart, never deleting; and the bucket checks."""

from __future__ import annotations

import csv
import hashlib
import io

import numpy as np
import pytest
import tifffile

from cloud_helpers import BUCKET, aws, moto_url  # noqa: F401 (fixtures)
from flystage.cloud.s3 import check_bucket, upload_dataset
from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError
from flystage.manifest import Record, file_sha1, write_manifest
from train_helpers import make_manifest_set


@pytest.fixture
def dataset(tmp_path):
    """A manifest with images below it, plus one big 16-bit TIFF elsewhere (multipart)."""
    manifest = make_manifest_set(tmp_path / "set", train_per_class=2, valid_per_class=1)
    big = tmp_path / "elsewhere" / "scope" / "big.tif"
    big.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tifffile.imwrite(big, rng.integers(0, 4096, (1536, 2048), dtype=np.uint16))  # 6.3 MB
    from flystage.manifest import read_manifest

    records = read_manifest(manifest) + [Record(big, "1-3", "big", "train", file_sha1(big))]
    write_manifest(records, manifest, force=True)
    return manifest, big


def objects(api: Api, prefix: str) -> dict[str, dict]:
    pages = api.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def test_upload_layout_skip_and_multipart(aws, dataset):
    api, settings = aws
    manifest, big = dataset
    first = upload_dataset(api, settings, manifest, multipart_threshold=1 << 20, progress=False)
    stored = objects(api, "flystage/data/")
    assert first.uri == f"s3://{BUCKET}/flystage/data/"
    assert sorted(first.uploaded) == sorted(stored) and not first.skipped and not first.replaced
    # Images keyed below the folder common to all of them (one lies outside the manifest's).
    assert len(stored) == 1 + 9 + 1  # manifest, 9 set images, the big TIFF
    # The big file went up in parts (a multipart ETag ends in -<parts>), the small ones whole.
    big_key = "flystage/data/images/elsewhere/scope/big.tif"
    assert stored[big_key]["ETag"].strip('"').endswith("-2")
    assert "-" not in stored["flystage/data/images/set/1-3/1-3_0.png"]["ETag"]
    # Every object carries its SHA-256, and holds the bytes of its file.
    head = api.call("s3", "head_object", Bucket=BUCKET, Key=big_key)
    assert head["Metadata"]["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
    body = api.call("s3", "get_object", Bucket=BUCKET, Key=big_key)["Body"].read()
    assert body == big.read_bytes()
    # The uploaded manifest points at the uploaded images, relative to itself.
    text = (
        api.call("s3", "get_object", Bucket=BUCKET, Key="flystage/data/manifest.csv")["Body"]
        .read()
        .decode()
    )
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {f"flystage/data/{r['path']}" for r in rows} == set(stored) - {
        "flystage/data/manifest.csv"
    }
    assert all(not r["path"].startswith("/") for r in rows)
    assert {r["sha1"] for r in rows} == {r["sha1"] for r in csv.DictReader(manifest.open())}

    # A second run uploads nothing.
    second = upload_dataset(api, settings, manifest, multipart_threshold=1 << 20, progress=False)
    assert not second.uploaded and not second.replaced and sorted(second.skipped) == sorted(stored)
    assert objects(api, "flystage/data/") == stored

    # A changed image is replaced; an object that is not ours is kept (never deleted).
    (manifest.parent / "1-3" / "1-3_0.png").write_bytes(big.read_bytes()[:1000] + b"changed")
    api.call(
        "s3", "put_object", Bucket=BUCKET, Key="flystage/data/images/notes.txt", Body=b"lab notes"
    )
    third = upload_dataset(api, settings, manifest, multipart_threshold=1 << 20, progress=False)
    assert third.replaced == ["flystage/data/images/set/1-3/1-3_0.png"] and not third.uploaded
    assert "flystage/data/images/notes.txt" in objects(api, "flystage/data/")


def test_object_uploaded_by_something_else_is_compared_by_etag(aws, dataset):
    api, settings = aws
    manifest, _ = dataset
    image = manifest.parent / "4-6" / "4-6_1.png"
    api.call(
        "s3",
        "put_object",
        Bucket=BUCKET,
        Key="flystage/data/images/set/4-6/4-6_1.png",
        Body=image.read_bytes(),
    )
    report = upload_dataset(api, settings, manifest, progress=False)
    assert report.skipped == ["flystage/data/images/set/4-6/4-6_1.png"]


def test_bucket_checks(aws, moto_url):
    api, settings = aws
    check_bucket(api, settings)
    with pytest.raises(
        CloudError,
        match="does not exist: create it with `aws s3 mb s3://no-such-bucket --region eu-west-1`",
    ):
        check_bucket(api, settings.replace(bucket="no-such-bucket"))
    far = Api(settings.replace(region="ap-southeast-2"))
    far.call(
        "s3",
        "create_bucket",
        Bucket="far-bucket",
        CreateBucketConfiguration={"LocationConstraint": "ap-southeast-2"},
    )
    with pytest.raises(CloudError, match="in another region|is in ap-southeast-2"):
        check_bucket(api, settings.replace(bucket="far-bucket"))


def test_missing_manifest_image_is_a_manifest_error(aws, tmp_path):
    from flystage.manifest import ManifestError

    api, settings = aws
    manifest = make_manifest_set(tmp_path / "set", train_per_class=1, valid_per_class=1)
    (manifest.parent / "1-3" / "1-3_0.png").unlink()
    with pytest.raises(ManifestError, match="1-3_0.png"):
        upload_dataset(api, settings, manifest, progress=False)
    assert objects(api, "flystage/") == {}
