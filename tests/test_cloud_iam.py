"""The IAM policies cover every AWS call the cloud code makes, and nothing names a real
account: the operations are read from the code itself, so a new call without its permission
fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import botocore.session
import pytest

REPO = Path(__file__).resolve().parents[1]
CLOUD = REPO / "code" / "flystage" / "cloud"
IAM = REPO / "iam"

S3_ACTIONS = {"get_bucket_location": "s3:GetBucketLocation", "head_object": "s3:GetObject", "get_object": "s3:GetObject",
              "put_object": "s3:PutObject", "upload_file": "s3:PutObject"}
WAITERS = {"training_job_completed_or_stopped": "sagemaker:DescribeTrainingJob", "endpoint_in_service": "sagemaker:DescribeEndpoint",
           "endpoint_deleted": "sagemaker:DescribeEndpoint", "transform_job_completed_or_stopped": "sagemaker:DescribeTransformJob"}
# What `docker push` asks ECR for, beyond the token.
PUSH = {"ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:PutImage"}


def camel(op: str) -> str:
    return "".join(part.capitalize() for part in op.split("_"))


def code_actions() -> set[str]:
    """IAM actions of every api.call / client call / waiter in flystage.cloud."""
    text = "\n".join(p.read_text() for p in CLOUD.glob("*.py"))
    actions = set()
    for service, op in re.findall(r'api\.call\(\s*"([a-z0-9-]+)",\s*"([a-z_0-9]+)"', text):
        if service == "docker":
            continue
        prefix = "sagemaker" if service == "sagemaker-runtime" else service  # one IAM prefix for both
        actions.add(S3_ACTIONS[op] if service == "s3" else f"{prefix}:{camel(op)}")
    # training.start(api, settings, "<create operation>", ...) sends a SageMaker create call.
    for op in re.findall(r'start\(\s*api,\s*settings,\s*"([a-z_]+)"', text):
        actions.add(f"sagemaker:{camel(op)}")
    for op in re.findall(r'client\("s3"\)\.([a-z_]+)\(', text):
        actions.add(S3_ACTIONS[op])
    if re.search(r'client\("sagemaker-runtime"\)\s*\.invoke_endpoint', text):
        actions.add("sagemaker:InvokeEndpoint")
    for waiter in re.findall(r'api\.wait\(\s*"sagemaker",\s*"([a-z_]+)"', text):
        actions.add(WAITERS[waiter])
    return actions


def allowed(policy: dict) -> set[str]:
    out = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        out |= {actions} if isinstance(actions, str) else set(actions)
    return out


@pytest.fixture(scope="module")
def policies() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in IAM.glob("*.json")}


def test_operator_policy_allows_every_call_the_targets_make(policies):
    found = code_actions()
    # Sanity: the scan sees the calls (a broken regex would make this test vacuous).
    assert {"sagemaker:CreateTrainingJob", "sagemaker:UpdateEndpoint", "ecr:CreateRepository", "s3:PutObject",
            "sagemaker:InvokeEndpoint", "sagemaker:DescribeTransformJob"} <= found
    operator = allowed(policies["operator-policy"])
    missing = (found | PUSH | {"iam:PassRole", "sagemaker:AddTags"}) - operator
    assert not missing, f"add to iam/operator-policy.json: {sorted(missing)}"
    # Least privilege: nothing the code does not need, and never a delete of data or images.
    extra = operator - found - PUSH - {"iam:PassRole", "sagemaker:AddTags", "ecr:TagResource", "ecr:BatchGetImage", "s3:AbortMultipartUpload"}
    assert not extra, f"iam/operator-policy.json allows calls the code never makes: {sorted(extra)}"
    assert not any(a in operator for a in ("s3:DeleteObject", "ecr:BatchDeleteImage", "ecr:DeleteRepository"))
    assert not any("*" in a for a in operator)


def test_every_policy_action_exists(policies):
    session = botocore.session.get_session()
    operations = {prefix: set(session.get_service_model(service).operation_names)
                  for prefix, service in (("sagemaker", "sagemaker"), ("ecr", "ecr"))}
    operations["sagemaker"] |= set(session.get_service_model("sagemaker-runtime").operation_names)
    known = {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:GetBucketLocation", "s3:AbortMultipartUpload", "iam:PassRole",
             "sts:AssumeRole", "logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams",
             "cloudwatch:PutMetricData"}
    for name, policy in policies.items():
        for action in allowed(policy):
            prefix, _, op = action.partition(":")
            assert action in known or op in operations.get(prefix, ()), f"{name}: unknown action {action}"


def test_execution_role_reads_data_writes_output_pulls_images_logs(policies):
    role = policies["execution-role-policy"]
    by_sid = {s["Sid"]: s for s in role["Statement"]}
    assert "arn:aws:s3:::BUCKET/PREFIX/data/*" in by_sid["ReadDataModelsCheckpointsBatchInput"]["Resource"]
    assert "arn:aws:s3:::BUCKET/PREFIX/data/*" not in by_sid["WriteModelsCheckpointsBatchOutput"]["Resource"]
    assert {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= allowed(role)
    assert {"logs:PutLogEvents", "cloudwatch:PutMetricData"} <= allowed(role)
    trust = policies["execution-role-trust"]["Statement"][0]
    assert trust["Principal"] == {"Service": "sagemaker.amazonaws.com"} and trust["Action"] == "sts:AssumeRole"


def test_no_account_ids_anywhere(policies):
    for path in IAM.glob("*.json"):
        assert not re.search(r"\d{12}", path.read_text()), path
    passrole = next(s for s in policies["operator-policy"]["Statement"] if s["Action"] == "iam:PassRole")
    assert passrole["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/flystage-sagemaker"
    assert passrole["Condition"] == {"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}}
