"""`make aws-check`: every request of every target (a captured dry run), mapped to the IAM
actions and resources it needs, checked against the generated policies with a small evaluator.

The evaluator's rules are tested on their own; the check passes for the generated policies of
the defaults and of a lab's own names, and fails, naming the request, when one action or
resource is taken away, or when the old way (the checked-in files filled in with sed) is used
for an endpoint or role with another name."""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flystage.cloud import check
from flystage.cloud.check import Need, allows
from flystage.cloud.dryrun import request_json
from flystage.cloud.policies import policies
from flystage.cloud.settings import CloudError, Settings

REPO = Path(__file__).resolve().parents[1]
ACCOUNT = "111122223333"  # AWS's documented example account
LAB = Settings(
    region="us-east-1",
    role_arn=f"arn:aws:iam::{ACCOUNT}:role/service-role/lab-sm-exec",
    bucket="lab-bucket",
    prefix="fly",
    endpoint_name="lab-flystage",
    train_repository="lab-train",
    serve_repository="lab-serve",
    tags={"project": "flystage", "owner": "lab-7"},
)


@pytest.fixture(scope="module")
def captured() -> dict[str, tuple[Settings, list]]:
    """The captured requests of every target, for the defaults and for LAB."""
    return {"default": check.capture(Settings()), "lab": check.capture(LAB)}


def refusals(settings: Settings, requests: list, documents: dict) -> list[tuple]:
    return check.check(settings, requests, documents, io.StringIO())


# ---- the evaluator --------------------------------------------------------------------------


def test_wildcards_are_iams_not_regex_or_fnmatch():
    assert check.like("arn:aws:s3:::b/p/*", "arn:aws:s3:::b/p/x/y.png")
    assert check.like("a?c", "abc") and not check.like("a?c", "ac")
    assert not check.like("a.c", "abc")  # a dot is a dot
    assert check.like("[ab]", "[ab]") and not check.like("[ab]", "a")  # no character classes
    assert check.arn_like("arn:aws:sagemaker:eu-west-1:1:*", "arn:aws:sagemaker:eu-west-1:1:x/y")
    # ArnLike matches part by part: a * does not swallow the colons.
    assert not check.arn_like("arn:aws:sagemaker:*", "arn:aws:sagemaker:eu-west-1:1:x")


def test_conditions_allow_deny_and_implicit_deny():
    policy = {
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": "arn:aws:s3:::b",
                "Condition": {"StringLike": {"s3:prefix": ["p/*"]}},
            },
            {"Effect": "Allow", "Action": "s3:Get*", "Resource": "arn:aws:s3:::b/*"},
            {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/secret/*"},
        ]
    }
    listing = Need("role", "s3:ListBucket", "arn:aws:s3:::b", (("s3:prefix", "p/data/"),))
    assert allows(policy, listing)
    assert not allows(
        policy, Need("role", "s3:ListBucket", "arn:aws:s3:::b", (("s3:prefix", "q/"),))
    )
    assert not allows(policy, Need("role", "s3:ListBucket", "arn:aws:s3:::b"))  # key absent
    assert allows(policy, Need("role", "S3:getobject", "arn:aws:s3:::b/x"))  # actions: any case
    assert not allows(policy, Need("role", "s3:GetObject", "arn:aws:s3:::b/secret/x"))
    assert not allows(policy, Need("role", "s3:PutObject", "arn:aws:s3:::b/x"))
    with pytest.raises(CloudError, match="NumericLessThan"):
        allows(
            {
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": "*",
                        "Resource": "*",
                        "Condition": {"NumericLessThan": {"k": "1"}},
                    }
                ]
            },
            Need("role", "s3:GetObject", "x"),
        )


def test_requests_map_to_actions_by_botocore_names():
    """Generic: botocore's operation name, the IAM prefix from its signing name; S3's own."""
    assert check.operator_actions("ecr", "put_lifecycle_policy") == ["ecr:PutLifecyclePolicy"]
    assert check.operator_actions("sagemaker-runtime", "invoke_endpoint") == [
        "sagemaker:InvokeEndpoint"
    ]
    assert check.operator_actions("s3", "head_object") == ["s3:GetObject"]
    assert check.operator_actions("sagemaker", "stop_training_job") == ["sagemaker:StopTrainingJob"]
    with pytest.raises(CloudError, match="no operation"):
        check.operator_actions("sagemaker", "create_nothing")
    arn = check.sagemaker_resource(
        LAB, "ListTrainingJobsForHyperParameterTuningJob", {"HyperParameterTuningJobName": "T-1"}
    )
    assert arn == f"arn:aws:sagemaker:us-east-1:{ACCOUNT}:hyper-parameter-tuning-job/t-1"


# ---- the check ------------------------------------------------------------------------------


def test_every_target_is_captured_with_concrete_resources(captured):
    settings, requests = captured["lab"]
    assert {r.target for r in requests} == set(check.TARGETS)
    text = "".join(request_json(r.service, r.operation, r.request) for r in requests)
    # Only bodies are shown as <N bytes>: every placeholder was given an example value.
    assert re.findall(r"<(?!\d+ bytes>)[^<>]+>", text) == []
    operations = {(r.service, r.operation) for r in requests}
    assert {
        ("docker", "push"),
        ("ecr", "put_lifecycle_policy"),
        ("sagemaker", "create_hyper_parameter_tuning_job"),
        ("sagemaker", "create_training_job"),
        ("sagemaker", "create_endpoint"),
        ("sagemaker", "describe_endpoint"),  # deploy's waiter polls it
        ("sagemaker-runtime", "invoke_endpoint"),
        ("sagemaker", "create_transform_job"),
        ("sagemaker", "delete_endpoint"),
    } <= operations


@pytest.mark.parametrize("which", ["default", "lab"])
def test_generated_policies_allow_every_request(captured, which):
    settings, requests = captured[which]
    assert refusals(settings, requests, policies(settings)) == []
    # And with the opt-in aws:SourceArn condition (SageMaker's resource ARN of this account).
    assert refusals(settings, requests, policies(settings, source_arn=True)) == []


def _without(documents: dict, value: str) -> dict:
    """A copy of the policies with ``value`` taken out of every Action or Resource list."""
    documents = copy.deepcopy(documents)
    holders = [
        statement[field]
        for policy in documents.values()
        for statement in policy["Statement"]
        for field in ("Action", "Resource")
        if isinstance(statement.get(field), list) and value in statement[field]
    ]
    assert holders, f"{value} is in no statement"
    for holder in holders:
        holder.remove(value)
    return documents


LAB_ARN = "us-east-1:111122223333"
# Taken out of LAB's generated policies -> (target, request, action) the check must name.
REMOVALS = {
    "ecr:PutLifecyclePolicy": ("push", "ecr put_lifecycle_policy", "ecr:PutLifecyclePolicy"),
    "ecr:UploadLayerPart": ("push", "docker push", "ecr:UploadLayerPart"),
    "sagemaker:DeleteModel": ("batch-predict", "sagemaker delete_model", "sagemaker:DeleteModel"),
    f"arn:aws:sagemaker:{LAB_ARN}:endpoint/lab-flystage": (
        "predict",
        "sagemaker-runtime invoke_endpoint",
        "sagemaker:InvokeEndpoint",
    ),
    "arn:aws:s3:::lab-bucket/fly/data/*": (
        "train",
        "sagemaker create_training_job",
        "s3:GetObject",
    ),
    "arn:aws:s3:::lab-bucket/fly/batch/*": (
        "batch-predict",
        "sagemaker create_transform_job",
        "s3:PutObject",
    ),
    f"arn:aws:ecr:{LAB_ARN}:repository/lab-serve": (
        "deploy",
        "sagemaker create_model",
        "ecr:BatchGetImage",
    ),
}


@pytest.mark.parametrize("value", sorted(REMOVALS))
def test_one_permission_less_is_named(captured, value):
    settings, requests = captured["lab"]
    documents = _without(policies(settings), value)
    found = {
        (req.target, f"{req.service} {req.operation}", need.action)
        for req, need in refusals(settings, requests, documents)
    }
    assert REMOVALS[value] in found


def flystage_cloud(config: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m flystage cloud --config CONFIG ARGS`` in the config's folder."""
    return subprocess.run(
        [sys.executable, "-m", "flystage", "cloud", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=config.parent,
        timeout=300,
    )


def test_sed_filled_static_policies_refuse_a_lab_endpoint_and_role(tmp_path):
    """The old way (docs: sed over iam/*.json for ACCOUNT_ID, REGION, BUCKET, PREFIX) leaves
    endpoint/flystage and role/flystage-sagemaker: `make aws-check --policies` on them, with
    the lab's endpoint_name and role, exits 1 naming deploy's requests and the PassRole."""
    for path in (REPO / "iam").glob("*.json"):
        text = path.read_text()
        for old, new in (
            ("ACCOUNT_ID", ACCOUNT),
            ("REGION", "us-east-1"),
            ("BUCKET", "lab-bucket"),
            ("PREFIX", "fly"),
        ):
            text = text.replace(old, new)
        (tmp_path / path.name).write_text(text)
    config = tmp_path / "flystage.toml"
    config.write_text(
        'region = "us-east-1"\n'
        f'role_arn = "{LAB.role_arn}"\n'
        'bucket = "lab-bucket"\nprefix = "fly"\nendpoint_name = "lab-flystage"\n'
    )
    run = flystage_cloud(config, "check", "--policies", str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    summary = run.stdout.split("permission(s) missing", 1)[1]
    assert "deploy: sagemaker create_endpoint needs operator sagemaker:CreateEndpoint" in summary
    assert (
        "predict: sagemaker-runtime invoke_endpoint needs operator sagemaker:InvokeEndpoint"
        in summary
    )
    assert "iam:PassRole arn:aws:iam::111122223333:role/service-role/lab-sm-exec" in summary
    # The same settings with the generated policies: everything allowed.
    run = flystage_cloud(config, "check")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "every request of" in run.stdout


def test_policies_command_writes_the_settings_names(tmp_path):
    config = tmp_path / "flystage.toml"
    config.write_text(
        'region = "us-east-1"\n'
        f'role_arn = "{LAB.role_arn}"\n'
        'bucket = "lab-bucket"\nendpoint_name = "lab-flystage"\n'
    )
    run = flystage_cloud(config, "policies", "--out", str(tmp_path / "iam"))
    assert run.returncode == 0, run.stderr
    operator = json.loads((tmp_path / "iam" / "operator-policy.json").read_text())
    passrole = next(s for s in operator["Statement"] if s["Action"] == "iam:PassRole")
    assert passrole["Resource"] == LAB.role_arn
    assert any(
        r.endswith(":endpoint/lab-flystage")
        for s in operator["Statement"]
        for r in s["Resource"]
        if isinstance(s["Resource"], list)
    )
    # Without a role there is nothing to write the policies for: a message saying what to set.
    config.write_text('region = "us-east-1"\nbucket = "b"\n')
    run = flystage_cloud(config, "policies", "--out", str(tmp_path / "none"))
    assert run.returncode == 2 and "role_arn" in run.stderr
    assert not (tmp_path / "none").exists()
