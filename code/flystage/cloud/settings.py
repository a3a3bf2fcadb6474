"""Settings of the cloud targets: ``flystage.toml`` with ``FLYSTAGE_<NAME>`` overrides.

The file is flat (one ``name = value`` per setting, plus an optional ``[tags]`` table); every
setting can be overridden by an environment variable named ``FLYSTAGE_`` + the setting in
capitals, for example ``FLYSTAGE_REGION`` or ``FLYSTAGE_INSTANCE_COUNT=2``. Tags from the
environment are written ``key=value,key=value``. See ``flystage.toml.example``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomllib

from flystage.errors import FlystageError
from flystage.options import parse_bool


class CloudError(FlystageError, RuntimeError):
    """The one error type of the cloud targets; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the cloud targets need; the defaults are what the lab runs."""

    # Where: region, execution role (assumed by SageMaker), bucket and key prefix.
    region: str = ""
    role_arn: str = ""
    bucket: str = ""
    prefix: str = "flystage"
    # Other s3:// prefixes (comma-separated) the execution role was given read access to; by
    # default it reads only prefix/{data,output,checkpoints,batch}/
    # (iam/execution-role-policy.json).
    role_read_uris: str = ""
    # Images: local tags built by `make images`, and the ECR repositories they go to.
    train_image: str = "flystage-train:latest"
    serve_image: str = "flystage-serve:latest"
    train_repository: str = "flystage-train"
    serve_repository: str = "flystage-serve"
    # Empty: each image is pushed under a tag made from its content (img-<local image ID>), so
    # a tag never names two images. A fixed tag (e.g. "v1") can be pushed once per image into
    # the IMMUTABLE repositories `make push` makes; jobs name the image by digest either way.
    image_tag: str = ""
    # Training and tuning.
    instance_type: str = "ml.m5.xlarge"
    instance_count: int = 1
    volume_size_gb: int = 30
    max_runtime_s: int = 4 * 3600
    spot: bool = False
    # Managed spot training waits at most this long in total (queue + run); >= max_runtime_s.
    max_wait_s: int = 8 * 3600
    tuning_max_jobs: int = 20
    tuning_parallel_jobs: int = 2
    # Hosting and batch transform.
    endpoint_name: str = "flystage"
    endpoint_instance_type: str = "ml.m5.xlarge"
    endpoint_instance_count: int = 1
    serverless: bool = False
    serverless_memory_mb: int = 3072
    serverless_max_concurrency: int = 5
    transform_instance_type: str = "ml.m5.xlarge"
    # Serve workers (= requests in flight) on the transform instance; 0: one per vCPU of its type.
    transform_workers: int = 0
    # Seconds between status lines while waiting for a tuning job.
    poll_s: float = 30.0
    # Tags put on every job, model, endpoint config and endpoint.
    tags: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"project": "flystage"})
    # Stand-ins for tests and private set-ups: one endpoint URL for every AWS service (boto3
    # also honours AWS_ENDPOINT_URL), and a registry host that replaces ECR's proxyEndpoint.
    endpoint_url: str = ""
    registry_override: str = ""
    # Where the pushed images' digests and the last tuning and training jobs are kept between
    # targets (flystage.cloud.state).
    state_file: str = "runs/cloud/state.json"

    # ---- derived names -------------------------------------------------------------------
    def s3_uri(self, *parts: str) -> str:
        """``s3://bucket/prefix/part/...`` (the bucket must be set)."""
        self.require("bucket")
        key = "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))
        return f"s3://{self.bucket}/{key}"

    def tag_list(self) -> list[dict[str, str]]:
        """The tags as SageMaker's ``[{"Key": ..., "Value": ...}]``."""
        return [{"Key": k, "Value": str(v)} for k, v in sorted(self.tags.items())]

    def require(self, *names: str) -> None:
        """Raise CloudError naming each empty setting and how to set it."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            how = "; ".join(
                f"{n} = ... in flystage.toml or FLYSTAGE_{n.upper()}=..." for n in missing
            )
            hints = {
                "role_arn": " (the SageMaker execution role: see iam/execution-role-policy.json)",
                "bucket": " (an S3 bucket in the same region as the jobs)",
                "region": " (for example eu-west-1)",
            }
            extra = "".join(hints.get(n, "") for n in missing)
            raise CloudError(f"missing setting {', '.join(missing)}: set {how}{extra}")
        if "role_arn" in names and not re.fullmatch(
            r"arn:aws[a-z-]*:iam::\d{12}:role/.+", self.role_arn
        ):
            raise CloudError(
                f"role_arn {self.role_arn!r} is not an IAM role ARN: expected "
                "arn:aws:iam::<12-digit account>:role/<name>"
            )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def validate(self) -> Settings:
        """Raise CloudError for values SageMaker would refuse after the first request; the
        same checks whether a value came from the file, the environment or a command option."""
        if self.spot and self.max_wait_s < self.max_runtime_s:
            raise CloudError(
                f"max_wait_s ({self.max_wait_s}) must be >= max_runtime_s ({self.max_runtime_s}) "
                "for managed spot training: raise max_wait_s"
            )
        if self.instance_count < 1:
            raise CloudError(f"instance_count must be >= 1, got {self.instance_count}")
        if len(self.endpoint_name) > 63 or not re.fullmatch(
            r"[a-zA-Z0-9](-*[a-zA-Z0-9])*", self.endpoint_name
        ):
            raise CloudError(
                f"endpoint_name {self.endpoint_name!r}: SageMaker allows 1-63 letters, digits "
                "and hyphens, starting and ending with a letter or digit"
            )
        return self


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, value: Any, source: str) -> Any:
    kind = type(getattr(Settings(), name))
    try:
        if kind is bool:
            return (
                parse_bool(value) if str(value).strip() else False
            )  # FLYSTAGE_SPOT= (empty) is off
        if kind is int:
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        if name == "tags":
            if isinstance(value, Mapping):
                return {str(k): str(v) for k, v in value.items()}
            pairs = [p for p in str(value).split(",") if p.strip()]
            return dict(p.split("=", 1) for p in pairs)
        if not isinstance(value, str):
            raise ValueError(value)
        return value
    except ValueError:
        raise CloudError(
            f"{source}: {name} = {value!r} is not a valid "
            f"{kind.__name__ if name != 'tags' else 'key=value list'}"
        ) from None


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Read ``path`` (default: ``$FLYSTAGE_CONFIG`` or ``./flystage.toml`` if it exists),
    then apply ``FLYSTAGE_<NAME>`` environment overrides. Unknown keys are an error."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    explicit = path is not None or "FLYSTAGE_CONFIG" in environ
    path = Path(path if path is not None else environ.get("FLYSTAGE_CONFIG", "flystage.toml"))
    if path.is_file():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise CloudError(
                f"{path}: not valid TOML ({err}); compare with flystage.toml.example"
            ) from None
        for name, value in raw.items():
            if name not in FIELDS:
                raise CloudError(f"{path}: unknown setting {name!r}; known: {', '.join(FIELDS)}")
            values[name] = _convert(name, value, str(path))
    elif explicit:
        raise CloudError(
            f"settings file {path} not found: copy flystage.toml.example to it and fill it in"
        )
    for name in FIELDS:
        env = f"FLYSTAGE_{name.upper()}"
        if env in environ:
            values[name] = _convert(name, environ[env], f"environment variable {env}")
    return Settings(**values).validate()
