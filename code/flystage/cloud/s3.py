"""Upload the organised dataset (a manifest and its images) to S3, idempotently.

Layout under ``s3://bucket/prefix/data/``: ``manifest.csv`` and ``images/<path>``, the
manifest's paths rewritten relative to it, so the training channel ``train`` (that prefix)
is a self-contained copy. Objects carry their SHA-256 in metadata (``x-amz-meta-sha256``);
an object already there with the same checksum is skipped. Nothing is ever deleted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings

MANIFEST_KEY = "manifest.csv"
MULTIPART_THRESHOLD = 64 * 1024 * 1024


def file_digests(path: Path, chunk: int = 1 << 20) -> tuple[str, str]:
    """(sha256, md5) hex digests of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> (bucket, key prefix)."""
    if not uri.startswith("s3://"):
        raise CloudError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


# The folders under the prefix that the execution role may read (iam/execution-role-policy.json,
# statement ReadDataModelsCheckpointsBatchInput).
ROLE_READS = ("data", "output", "checkpoints", "batch")


def check_role_can_read(settings: Settings, uri: str, what: str) -> None:
    """CloudError unless the execution role may read ``uri``: under ``s3://bucket/prefix/``
    one of ROLE_READS, or under a URI of ``role_read_uris`` (where the policy was extended).
    Checked before any request, so a job is never paid for only to fail on AccessDenied."""
    allowed = [settings.s3_uri(folder) for folder in ROLE_READS]
    allowed += [u.strip().rstrip("/") for u in settings.role_read_uris.split(",") if u.strip()]
    if any((uri.rstrip("/") + "/").startswith(a + "/") for a in allowed):
        return
    bucket, key = parse_s3_uri(uri)
    # The copy goes under batch/: the operator may write only data/ and batch/
    # (iam/operator-policy.json), never output/ or checkpoints/, and data/ is the training channel.
    if key.endswith(".tar.gz"):
        arn, copy = (
            f"arn:aws:s3:::{bucket}/{key}",
            f"aws s3 cp {uri} {settings.s3_uri('batch', 'imported', 'model.tar.gz')}",
        )
    else:
        arn = f"arn:aws:s3:::{bucket}/{key.rstrip('/')}/*"
        copy = f"aws s3 cp --recursive {uri.rstrip('/')}/ {settings.s3_uri('batch', 'imported')}/"
    raise CloudError(
        f"{what} {uri}: the execution role may read only under "
        f"s3://{settings.bucket}/{settings.prefix}/{{{','.join(ROLE_READS)}}}/ "
        f"(iam/execution-role-policy.json): copy it there (`{copy}`), or add {arn} to the "
        "ReadDataModelsCheckpointsBatchInput statement of iam/execution-role-policy.json (and "
        "its prefix to the s3:ListBucket condition), update the role, and list the URI in "
        "role_read_uris (FLYSTAGE_ROLE_READ_URIS)"
    )


def check_bucket(api: Api, settings: Settings) -> None:
    """CloudError unless the bucket exists, is reachable, and is in the jobs' region.

    GetBucketLocation needs only ``s3:GetBucketLocation``, not the right to list the bucket.
    """
    settings.require("bucket")
    if api.dry_run:
        return
    try:
        response = api.call("s3", "get_bucket_location", Bucket=settings.bucket)
    except CloudError as err:
        code = api.error_code(err)
        if code in ("NoSuchBucket", "404", "NotFound"):
            raise CloudError(
                f"bucket {settings.bucket} does not exist: create it with "
                f"`aws s3 mb s3://{settings.bucket} --region {api.region}` or fix `bucket`"
            ) from None
        if code in ("AccessDenied", "403"):
            raise CloudError(
                f"no access to bucket {settings.bucket}: it belongs to another account, or the "
                "operator lacks s3:GetBucketLocation (iam/operator-policy.json)"
            ) from None
        raise
    # us-east-1 is reported as no constraint, and old eu-west-1 buckets as "EU".
    bucket_region = {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(
        response.get("LocationConstraint"), response.get("LocationConstraint")
    )
    if bucket_region != api.region:
        raise CloudError(
            f"bucket {settings.bucket} is in {bucket_region}, the jobs run in {api.region}: "
            "SageMaker jobs must read a bucket in their own region; set region to the bucket's, "
            "or use a bucket in this region"
        )


@dataclass
class Plan:
    """Files to upload: (local path, key, sha256, md5, size)."""

    files: list[tuple[Path, str, str, str, int]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f[4] for f in self.files)


@dataclass
class UploadReport:
    uploaded: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    uri: str = ""


def _image_keys(paths: list[Path], manifest_dir: Path) -> dict[Path, str]:
    """An ``images/...`` key per image: its path below the manifest's folder or, when some
    images lie elsewhere, below the common folder of all images (so keys never collide)."""
    if all(p.is_relative_to(manifest_dir) for p in paths):
        root = manifest_dir
    else:
        root = Path(os.path.commonpath([p.parent for p in paths]))
    return {p: "images/" + p.relative_to(root).as_posix() for p in paths}


def plan_dataset(manifest: str | Path, staging: Path) -> Plan:
    """Read the manifest, write its S3 copy (paths relative to it) into ``staging``, and list
    every file to upload under the data prefix."""
    from flystage.manifest import read_manifest, write_manifest

    manifest = Path(manifest).expanduser().resolve()
    records = read_manifest(manifest)
    keys = _image_keys(sorted({r.path for r in records}), manifest.parent)
    staged = []
    for r in records:
        staged.append(
            type(r)(staging / keys[r.path], r.label, r.group, r.split, r.sha1, dict(r.extra))
        )
    copy = write_manifest(staged, staging / MANIFEST_KEY, force=True)
    plan = Plan()
    for path, key in [(copy, MANIFEST_KEY), *sorted(keys.items(), key=lambda kv: kv[1])]:
        sha, md5 = file_digests(path)
        plan.files.append((path, key, sha, md5, path.stat().st_size))
    return plan


def _remote_matches(api: Api, bucket: str, key: str, sha: str, md5: str) -> bool | None:
    """True if the object exists with this content, False if it differs, None if absent."""
    try:
        head = api.call("s3", "head_object", Bucket=bucket, Key=key)
    except CloudError as err:
        # Without s3:ListBucket, S3 answers a missing key with 403 instead of 404; the operator
        # policy grants GetObject on the prefix, so 403 here means "not there" (PutObject then
        # fails with a clear error if the operator may not write either).
        if api.error_code(err) in ("404", "NoSuchKey", "NotFound", "403"):
            return None
        raise
    if "sha256" in head.get("Metadata", {}):
        return head["Metadata"]["sha256"] == sha
    # Uploaded by something else: a single-part ETag is the MD5 of the content.
    return head.get("ETag", "").strip('"') == md5


def upload_files(
    api: Api,
    plan: Plan,
    bucket: str,
    prefix: str,
    *,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    progress: bool = True,
    report: UploadReport | None = None,
) -> UploadReport:
    """Upload ``plan``'s files to ``s3://bucket/prefix/<key>``, skipping objects already
    there with the same checksum; files above ``multipart_threshold`` go in parts."""
    from boto3.s3.transfer import TransferConfig
    from tqdm import tqdm

    report = report or UploadReport(uri=f"s3://{bucket}/{prefix}/")
    config = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=max(5 << 20, multipart_threshold),
    )
    with tqdm(
        total=plan.total_bytes,
        unit="B",
        unit_scale=True,
        desc="upload",
        disable=not progress or api.dry_run,
    ) as bar:
        for path, key, sha, md5, size in plan.files:
            key = f"{prefix}/{key}" if prefix else key
            extra = {"Metadata": {"sha256": sha}}
            if api.dry_run:
                api.call(
                    "s3", "upload_file", Filename=str(path), Bucket=bucket, Key=key, ExtraArgs=extra
                )
                report.uploaded.append(key)
                continue
            match = _remote_matches(api, bucket, key, sha, md5)
            if match:
                report.skipped.append(key)
                bar.update(size)
                continue
            try:
                api.client("s3").upload_file(
                    str(path), bucket, key, ExtraArgs=extra, Config=config, Callback=bar.update
                )
            except Exception as err:  # boto3's S3UploadFailedError wraps the ClientError
                raise CloudError(f"upload of {path} to s3://{bucket}/{key} failed: {err}") from err
            (report.replaced if match is False else report.uploaded).append(key)
    return report


def upload_dataset(
    api: Api,
    settings: Settings,
    manifest: str | Path,
    *,
    multipart_threshold: int = MULTIPART_THRESHOLD,
    progress: bool = True,
) -> UploadReport:
    """Upload the manifest and its images to ``s3://bucket/prefix/data/``; returns what was
    uploaded, replaced (same key, new content) and skipped (same checksum)."""
    check_bucket(api, settings)
    bucket, prefix = parse_s3_uri(settings.s3_uri("data"))
    with tempfile.TemporaryDirectory(prefix="flystage-upload-") as tmp:
        plan = plan_dataset(manifest, Path(tmp))
        return upload_files(
            api, plan, bucket, prefix, multipart_threshold=multipart_threshold, progress=progress
        )


def plan_folder(paths: list[Path], root: Path) -> Plan:
    """Upload plan for image files, keyed by their path below ``root``."""
    plan = Plan()
    for path in paths:
        sha, md5 = file_digests(path)
        plan.files.append((path, path.relative_to(root).as_posix(), sha, md5, path.stat().st_size))
    return plan
