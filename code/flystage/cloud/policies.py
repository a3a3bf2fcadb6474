"""The three IAM policies of the cloud targets, generated from the settings.

``flystage cloud policies [--out DIR]`` writes them with the real region, account and role
(from ``role_arn``), bucket, prefix, repositories, endpoint name and tags:

- ``execution-role-policy.json``: what SageMaker may do as the execution role (read the data,
  write models and checkpoints, pull the two images, write logs and metrics);
- ``execution-role-trust.json``: who may assume it (SageMaker, for this account only);
- ``operator-policy.json``: the person or CI running the targets.

The checked-in ``iam/*.json`` are this module's output for ``PLACEHOLDER_SETTINGS``
(ACCOUNT_ID, REGION, BUCKET, PREFIX in place of the real values; a test keeps them identical),
and ``flystage cloud check`` (``make aws-check``) checks the requests every target sends
against what this module generates.
"""

from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from flystage.cloud.hosting import derived_name
from flystage.cloud.s3 import ROLE_READS, parse_s3_uri
from flystage.cloud.settings import CloudError, Settings
from flystage.cloud.training import job_name
from flystage.files import atomic_write

VERSION = "2012-10-17"
SAGEMAKER_PRINCIPAL = "sagemaker.amazonaws.com"
# What the checked-in iam/*.json are generated from: the defaults, with the four values every
# lab has its own of left as placeholders, and the role name docs/aws.md suggests.
PLACEHOLDER_SETTINGS = Settings(
    region="REGION",
    role_arn="arn:aws:iam::ACCOUNT_ID:role/flystage-sagemaker",
    bucket="BUCKET",
    prefix="PREFIX",
)
FILES = ("execution-role-policy", "execution-role-trust", "operator-policy")
# Every job name starts so (training.job_name): flystage-tune-..., flystage-train-..., ...
JOB_PREFIX = job_name("kind").partition("kind")[0]
# A stamp of the length deploy puts into model and config names (hosting.derived_name).
_STAMP = job_name("x").removeprefix(JOB_PREFIX + "x-")

# The operator's SageMaker calls on the jobs, models and endpoint the targets name.
OPERATOR_SAGEMAKER = [
    "sagemaker:CreateHyperParameterTuningJob",
    "sagemaker:DescribeHyperParameterTuningJob",
    "sagemaker:CreateTrainingJob",
    "sagemaker:DescribeTrainingJob",
    "sagemaker:CreateModel",
    "sagemaker:DescribeModel",
    "sagemaker:CreateEndpointConfig",
    "sagemaker:DescribeEndpointConfig",
    "sagemaker:CreateEndpoint",
    "sagemaker:DescribeEndpoint",
    "sagemaker:InvokeEndpoint",
    "sagemaker:CreateTransformJob",
    "sagemaker:DescribeTransformJob",
    "sagemaker:AddTags",
    "sagemaker:ListTags",
]
# Changing or deleting: only what carries every flystage tag (as teardown and deploy check).
OPERATOR_SAGEMAKER_TAGGED = [
    "sagemaker:UpdateEndpoint",
    "sagemaker:DeleteEndpoint",
    "sagemaker:DeleteEndpointConfig",
    "sagemaker:DeleteModel",
]
OPERATOR_ECR = [
    "ecr:CreateRepository",
    "ecr:DescribeRepositories",
    "ecr:DescribeImages",
    "ecr:TagResource",
    "ecr:GetLifecyclePolicy",
    "ecr:PutLifecyclePolicy",
    # docker push (BatchGetImage also serves `make push`'s "already in ECR?" question).
    "ecr:BatchCheckLayerAvailability",
    "ecr:InitiateLayerUpload",
    "ecr:UploadLayerPart",
    "ecr:CompleteLayerUpload",
    "ecr:PutImage",
    "ecr:BatchGetImage",
]
ECR_PULL = ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"]
# The folders under the prefix the execution role reads: the dataset, the lab's unlabelled
# images (train --unlabelled), and what it writes (s3.ROLE_READS is what model data and batch
# input may name).
ROLE_READ_FOLDERS = ("data", "unlabelled", *ROLE_READS[1:])
# The folders under the prefix the execution role writes: models, checkpoints, batch answers.
ROLE_WRITES = ("output", "checkpoints", "batch")
# The operator writes only the dataset (make upload) and a batch-predict folder's input.
OPERATOR_WRITES = ("data", "batch")


def role_parts(settings: Settings) -> tuple[str, str]:
    """(partition, account) of ``role_arn``; CloudError when it is not a role ARN."""
    match = re.fullmatch(r"arn:(aws[a-z-]*):iam::([^:]+):role/.+", settings.role_arn)
    if not match:
        raise CloudError(
            f"role_arn {settings.role_arn!r} is not an IAM role ARN: expected "
            "arn:aws:iam::<12-digit account>:role/<name>"
        )
    return match.group(1), match.group(2)


def arn(settings: Settings, service: str, resource: str, *, region: bool = True) -> str:
    """``arn:<partition>:<service>:<region>:<account>:<resource>``."""
    partition, account = role_parts(settings)
    return f"arn:{partition}:{service}:{settings.region if region else ''}:{account}:{resource}"


def s3_arn(settings: Settings, key: str = "") -> str:
    partition, _ = role_parts(settings)
    return f"arn:{partition}:s3:::{settings.bucket}" + (f"/{key}" if key else "")


def repository_arns(settings: Settings) -> list[str]:
    return [
        arn(settings, "ecr", f"repository/{r}")
        for r in (settings.train_repository, settings.serve_repository)
    ]


def hosted_patterns(settings: Settings, kind: str) -> list[str]:
    """Name patterns of deploy's ``<endpoint>-<kind>-<stamp>`` (hosting.derived_name) and, for
    models, of batch-predict's ``flystage-batch-...-model``; lower case, as SageMaker ARNs are.
    A pattern another one covers is left out."""
    name = derived_name(settings.endpoint_name, kind, _STAMP)
    patterns = {name[: -len(_STAMP)].lower() + "*"}
    if kind == "model":
        patterns.add(f"{JOB_PREFIX}*")
    return sorted(p for p in patterns if not any(q != p and fnmatchcase(p, q) for q in patterns))


def job_resources(settings: Settings) -> list[str]:
    jobs = ("hyper-parameter-tuning-job", "training-job", "transform-job")
    return [arn(settings, "sagemaker", f"{kind}/{JOB_PREFIX}*") for kind in jobs]


def hosted_resources(settings: Settings) -> list[str]:
    """The models, endpoint configs and the endpoint that deploy and batch-predict name."""
    return (
        [arn(settings, "sagemaker", f"model/{p}") for p in hosted_patterns(settings, "model")]
        + [
            arn(settings, "sagemaker", f"endpoint-config/{p}")
            for p in hosted_patterns(settings, "config")
        ]
        # The SDK's Model.deploy (the notebook) names the config after the endpoint.
        + [arn(settings, "sagemaker", f"endpoint-config/{settings.endpoint_name.lower()}")]
        + [arn(settings, "sagemaker", f"endpoint/{settings.endpoint_name.lower()}")]
    )


def _statement(sid: str, action: Any, resource: Any, condition: dict | None = None) -> dict:
    out = {"Sid": sid, "Effect": "Allow", "Action": action, "Resource": resource}
    return out | ({"Condition": condition} if condition else {})


def _prefixes(settings: Settings, folders: tuple[str, ...]) -> list[str]:
    return [f"{settings.prefix}/{folder}/*" for folder in folders]


def _extra_reads(settings: Settings) -> list[tuple[str, str]]:
    """(bucket, key prefix) of each ``role_read_uris`` entry."""
    return [
        parse_s3_uri(u.strip().rstrip("/")) for u in settings.role_read_uris.split(",") if u.strip()
    ]


def execution_role_policy(settings: Settings) -> dict:
    """What SageMaker does as the execution role for the jobs, models and endpoint."""
    partition, _ = role_parts(settings)
    extra = _extra_reads(settings)
    reads = [s3_arn(settings, k) for k in _prefixes(settings, ROLE_READ_FOLDERS)]
    reads += [f"arn:{partition}:s3:::{b}/{k}/*" for b, k in extra]
    statements = [
        _statement(
            "ListOnlyTheProjectPrefix",
            "s3:ListBucket",
            s3_arn(settings),
            {"StringLike": {"s3:prefix": [f"{settings.prefix}/*"]}},
        )
    ]
    for bucket in sorted({b for b, _ in extra}):
        statements.append(
            _statement(
                f"ListRoleReadUris{len(statements)}",
                "s3:ListBucket",
                f"arn:{partition}:s3:::{bucket}",
                {"StringLike": {"s3:prefix": [f"{k}/*" for b, k in extra if b == bucket]}},
            )
        )
    statements += [
        _statement("ReadDataModelsCheckpointsBatchInput", "s3:GetObject", reads),
        _statement(
            "WriteModelsCheckpointsBatchOutput",
            ["s3:PutObject", "s3:AbortMultipartUpload"],
            [s3_arn(settings, k) for k in _prefixes(settings, ROLE_WRITES)],
        ),
        _statement("PullTheTrainAndServeImages", ECR_PULL, repository_arns(settings)),
        _statement("EcrTokenHasNoResource", "ecr:GetAuthorizationToken", "*"),
        _statement(
            "JobAndEndpointLogs",
            [
                "logs:CreateLogGroup",
                "logs:CreateLogStream",
                "logs:PutLogEvents",
                "logs:DescribeLogStreams",
            ],
            [
                arn(settings, "logs", "log-group:/aws/sagemaker/*"),
                arn(settings, "logs", "log-group:/aws/sagemaker/*:log-stream:*"),
            ],
        ),
        _statement(
            "MetricsFromTheMetricDefinitions",
            "cloudwatch:PutMetricData",
            "*",
            {"StringLike": {"cloudwatch:namespace": "/aws/sagemaker/*"}},
        ),
    ]
    return {"Version": VERSION, "Statement": statements}


def execution_role_trust(settings: Settings, *, source_arn: bool = False) -> dict:
    """SageMaker may assume the role on behalf of this account only (``aws:SourceAccount``);
    ``source_arn`` also requires ``aws:SourceArn`` to name a SageMaker resource of this account
    and region, which fails any AssumeRole where SageMaker does not send that key."""
    _, account = role_parts(settings)
    condition: dict[str, Any] = {"StringEquals": {"aws:SourceAccount": account}}
    if source_arn:
        condition["ArnLike"] = {"aws:SourceArn": arn(settings, "sagemaker", "*")}
    statement = {
        "Sid": "SageMakerAssumesTheExecutionRole",
        "Effect": "Allow",
        "Principal": {"Service": SAGEMAKER_PRINCIPAL},
        "Action": "sts:AssumeRole",
        "Condition": condition,
    }
    return {"Version": VERSION, "Statement": [statement]}


def _tag_condition(settings: Settings) -> dict | None:
    """Every tag of ``tags`` on the resource (what teardown and deploy check with ListTags)."""
    if not settings.tags:
        return None
    return {
        "StringEquals": {f"aws:ResourceTag/{k}": str(v) for k, v in sorted(settings.tags.items())}
    }


def operator_policy(settings: Settings) -> dict:
    """Exactly the calls the targets make, on the resources they name; never a delete of S3
    objects or images, and S3 writes only where the targets write."""
    statements = [
        _statement(
            "SageMakerJobsModelsEndpoints",
            OPERATOR_SAGEMAKER,
            job_resources(settings) + hosted_resources(settings),
        ),
        _statement(
            "UpdateOrDeleteOnlyWhatCarriesTheTags",
            OPERATOR_SAGEMAKER_TAGGED,
            hosted_resources(settings),
            _tag_condition(settings),
        ),
        _statement(
            "HandTheExecutionRoleToSageMakerOnly",
            "iam:PassRole",
            settings.role_arn,
            {"StringEquals": {"iam:PassedToService": SAGEMAKER_PRINCIPAL}},
        ),
        _statement("EcrTokenHasNoResource", "ecr:GetAuthorizationToken", "*"),
        _statement("CreateAndPushTheTwoRepositories", OPERATOR_ECR, repository_arns(settings)),
        _statement("CheckTheBucketRegionWithoutListing", "s3:GetBucketLocation", s3_arn(settings)),
        _statement(
            "ReadUnderThePrefixNeverDelete",
            "s3:GetObject",
            s3_arn(settings, f"{settings.prefix}/*"),
        ),
        _statement(
            "UploadDataAndBatchInputOnlyNeverModelsOrCheckpoints",
            ["s3:PutObject", "s3:AbortMultipartUpload"],
            [s3_arn(settings, k) for k in _prefixes(settings, OPERATOR_WRITES)],
        ),
    ]
    return {"Version": VERSION, "Statement": statements}


def policies(settings: Settings, *, source_arn: bool = False) -> dict[str, dict]:
    """{file stem: policy document} for ``settings``."""
    return {
        "execution-role-policy": execution_role_policy(settings),
        "execution-role-trust": execution_role_trust(settings, source_arn=source_arn),
        "operator-policy": operator_policy(settings),
    }


def render(policy: dict) -> str:
    """The JSON text as written (and checked in): two-space indent, a final newline."""
    return json.dumps(policy, indent=2) + "\n"


def write_policies(settings: Settings, out: Path, *, source_arn: bool = False) -> list[Path]:
    """Write the three policies for ``settings`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, policy in policies(settings, source_arn=source_arn).items():
        path = out / f"{stem}.json"
        with atomic_write(path) as f:
            f.write(render(policy))
        paths.append(path)
    return paths
