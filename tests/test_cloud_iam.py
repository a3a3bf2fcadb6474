"""The IAM policies cover every AWS call the cloud code makes, and nothing names a real
account: the operations are read from the code itself, so a new call without its permission
fails here. The operator may write S3 only where the code writes (data/, batch/), checked by
moto evaluating the filled-in policy on signed requests; the execution role's trust policy
carries aws:SourceAccount/aws:SourceArn conditions naming the account."""

from __future__ import annotations

import json
import re
from pathlib import Path

import botocore.session
import pytest

from cloud_helpers import aws, moto_url  # noqa: F401 (fixtures)
from flystage.cloud import policies as generator
from flystage.cloud.policies import PLACEHOLDER_SETTINGS, render
from flystage.cloud.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CLOUD = REPO / "code" / "flystage" / "cloud"
# The modules that send requests (policies.py and check.py only describe them).
SOURCES = sorted(set(CLOUD.glob("*.py")) - {CLOUD / "policies.py", CLOUD / "check.py"})
IAM = REPO / "iam"

S3_ACTIONS = {
    "get_bucket_location": "s3:GetBucketLocation",
    "head_object": "s3:GetObject",
    "get_object": "s3:GetObject",
    "put_object": "s3:PutObject",
    "upload_file": "s3:PutObject",
}
WAITERS = {
    "training_job_completed_or_stopped": "sagemaker:DescribeTrainingJob",
    "endpoint_in_service": "sagemaker:DescribeEndpoint",
    "endpoint_deleted": "sagemaker:DescribeEndpoint",
    "transform_job_completed_or_stopped": "sagemaker:DescribeTransformJob",
}
# What `docker push` asks ECR for, beyond the token.
PUSH = {
    "ecr:BatchCheckLayerAvailability",
    "ecr:InitiateLayerUpload",
    "ecr:UploadLayerPart",
    "ecr:CompleteLayerUpload",
    "ecr:PutImage",
}


def camel(op: str) -> str:
    return "".join(part.capitalize() for part in op.split("_"))


def code_actions() -> set[str]:
    """IAM actions of every api.call / client call / waiter in flystage.cloud."""
    text = "\n".join(p.read_text() for p in SOURCES)
    actions = set()
    for service, op in re.findall(r'api\.call\(\s*"([a-z0-9-]+)",\s*"([a-z_0-9]+)"', text):
        if service == "docker":
            continue
        prefix = (
            "sagemaker" if service == "sagemaker-runtime" else service
        )  # one IAM prefix for both
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
    # Each module's own _describe(api, "<operation>", ...) helper: ECR's and SageMaker's.
    for module, service in (("ecr.py", "ecr"), ("hosting.py", "sagemaker")):
        for op in re.findall(r'_describe\(\s*api,\s*"([a-z_]+)"', (CLOUD / module).read_text()):
            actions.add(f"{service}:{camel(op)}")
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
    assert {
        "sagemaker:CreateTrainingJob",
        "sagemaker:UpdateEndpoint",
        "ecr:CreateRepository",
        "s3:PutObject",
        "sagemaker:InvokeEndpoint",
        "sagemaker:DescribeTransformJob",
    } <= found
    operator = allowed(policies["operator-policy"])
    missing = (found | PUSH | {"iam:PassRole", "sagemaker:AddTags"}) - operator
    assert not missing, f"add to iam/operator-policy.json: {sorted(missing)}"
    # Least privilege: nothing the code does not need, and never a delete of data or images.
    extra = (
        operator
        - found
        - PUSH
        - {
            "iam:PassRole",
            "sagemaker:AddTags",
            "ecr:TagResource",
            "ecr:BatchGetImage",
            "s3:AbortMultipartUpload",
        }
    )
    assert not extra, f"iam/operator-policy.json allows calls the code never makes: {sorted(extra)}"
    assert not any(
        a in operator for a in ("s3:DeleteObject", "ecr:BatchDeleteImage", "ecr:DeleteRepository")
    )
    assert not any("*" in a for a in operator)


def test_every_policy_action_exists(policies):
    session = botocore.session.get_session()
    operations = {
        prefix: set(session.get_service_model(service).operation_names)
        for prefix, service in (("sagemaker", "sagemaker"), ("ecr", "ecr"))
    }
    operations["sagemaker"] |= set(session.get_service_model("sagemaker-runtime").operation_names)
    known = {
        "s3:GetObject",
        "s3:PutObject",
        "s3:ListBucket",
        "s3:GetBucketLocation",
        "s3:AbortMultipartUpload",
        "iam:PassRole",
        "sts:AssumeRole",
        "logs:CreateLogGroup",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "logs:DescribeLogStreams",
        "cloudwatch:PutMetricData",
    }
    for name, policy in policies.items():
        for action in allowed(policy):
            prefix, _, op = action.partition(":")
            assert action in known or op in operations.get(prefix, ()), (
                f"{name}: unknown action {action}"
            )


def test_execution_role_reads_data_writes_output_pulls_images_logs(policies):
    role = policies["execution-role-policy"]
    by_sid = {s["Sid"]: s for s in role["Statement"]}
    assert (
        "arn:aws:s3:::BUCKET/PREFIX/data/*"
        in by_sid["ReadDataModelsCheckpointsBatchInput"]["Resource"]
    )
    assert (
        "arn:aws:s3:::BUCKET/PREFIX/data/*"
        not in by_sid["WriteModelsCheckpointsBatchOutput"]["Resource"]
    )
    assert {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"} <= allowed(role)
    assert {"logs:PutLogEvents", "cloudwatch:PutMetricData"} <= allowed(role)
    trust = policies["execution-role-trust"]["Statement"][0]
    assert (
        trust["Principal"] == {"Service": "sagemaker.amazonaws.com"}
        and trust["Action"] == "sts:AssumeRole"
    )


def test_no_account_ids_anywhere(policies):
    for path in IAM.glob("*.json"):
        assert not re.search(r"\d{12}", path.read_text()), path
    passrole = next(
        s for s in policies["operator-policy"]["Statement"] if s["Action"] == "iam:PassRole"
    )
    assert passrole["Resource"] == "arn:aws:iam::ACCOUNT_ID:role/flystage-sagemaker"
    assert passrole["Condition"] == {
        "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}
    }


# ---- the S3 keys the operator may write, and the trust policy's conditions -----------------

# The policies `flystage cloud policies` writes for moto's account and the tests' bucket: what
# an operator would attach.
FILLED = Settings(
    region="eu-west-1",
    role_arn="arn:aws:iam::123456789012:role/flystage-sagemaker",
    bucket="flystage-test",
)


def filled(name: str, source_arn: bool = False) -> str:
    return render(generator.policies(FILLED, source_arn=source_arn)[name])


def put_resources(policy: dict) -> list[str]:
    """Every resource s3:PutObject is allowed on."""
    out = []
    for statement in policy["Statement"]:
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        if "s3:PutObject" in actions or "s3:*" in actions:
            resources = statement["Resource"]
            out += [resources] if isinstance(resources, str) else resources
    return out


def test_operator_may_put_only_where_the_code_writes(policies):
    """The code writes under data/ (upload) and batch/<job>/input/ (batch-predict of a folder):
    PutObject on exactly data/* and batch/*, never on the models (output/) or checkpoints."""
    text = "\n".join(p.read_text() for p in SOURCES)
    # What the scan below rests on: every upload goes through upload_files, fed these URIs.
    assert re.findall(r'settings\.s3_uri\("(\w+)"[^)]*\)[^\n]*\n[^\n]*upload_files', text) == [
        "batch"
    ]
    assert 's3_uri("data")' in text and re.search(
        r"upload_files\(\s*api,\s*plan,\s*bucket,\s*prefix", text
    )
    assert (
        len(
            re.findall(
                r"\b(upload_file|upload_fileobj|put_object|copy_object|create_multipart_upload)\b",
                text,
            )
        )
        == 2
    )  # both in upload_files
    assert sorted(put_resources(policies["operator-policy"])) == [
        "arn:aws:s3:::BUCKET/PREFIX/batch/*",
        "arn:aws:s3:::BUCKET/PREFIX/data/*",
    ]


@pytest.fixture
def operator(aws, monkeypatch):
    """(Api, Settings) signed with the keys of an IAM user holding only the filled-in operator
    policy, with moto evaluating IAM policies on every request; moto's auth is switched back
    off afterwards."""
    import urllib.request

    from flystage.cloud.session import Api

    api, settings = aws
    api.call("iam", "create_user", UserName="flystage-operator")
    api.call(
        "iam",
        "put_user_policy",
        UserName="flystage-operator",
        PolicyName="operator",
        PolicyDocument=filled("operator-policy"),
    )
    key = api.call("iam", "create_access_key", UserName="flystage-operator")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])

    def auth(count: str) -> None:
        request = urllib.request.Request(
            settings.endpoint_url + "/moto-api/reset-auth",
            data=count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10)

    auth("0")
    try:
        yield Api(settings), settings
    finally:
        auth("inf")


def test_moto_evaluates_the_operator_policy(operator, tmp_path):
    """Signed as the operator: `make upload` and a batch-predict upload (multipart too) go
    through; overwriting a model or a checkpoint, or any key outside the prefix, is AccessDenied."""
    from flystage.cloud.s3 import plan_folder, upload_dataset, upload_files
    from flystage.cloud.settings import CloudError
    from train_helpers import make_manifest_set

    api, settings = operator
    manifest = make_manifest_set(tmp_path / "set", train_per_class=1, valid_per_class=1)
    report = upload_dataset(api, settings, manifest, progress=False)
    assert report.uploaded and all(k.startswith("flystage/data/") for k in report.uploaded)
    images = sorted(p for p in (tmp_path / "set").rglob("*.png"))
    report = upload_files(
        api,
        plan_folder(images, tmp_path / "set"),
        settings.bucket,
        "flystage/batch/flystage-batch-1/input",
        multipart_threshold=1,
        progress=False,
    )
    assert len(report.uploaded) == len(images)
    assert api.call("s3", "get_object", Bucket=settings.bucket, Key=report.uploaded[0])[
        "Body"
    ].read()
    for key in (
        "flystage/output/flystage-train-1/output/model.tar.gz",
        "flystage/checkpoints/flystage-train-1/checkpoint.pt",
        "flystage/manifest.csv",
        "elsewhere/data/x.png",
    ):
        with pytest.raises(CloudError, match="AccessDenied"):
            api.call("s3", "put_object", Bucket=settings.bucket, Key=key, Body=b"overwritten")


def arn_like(pattern: str, arn: str) -> bool:
    """IAM's ArnLike: each of the six colon-separated parts matched on its own (* and ?)."""
    from fnmatch import fnmatchcase

    parts, values = pattern.split(":", 5), arn.split(":", 5)
    return len(parts) == len(values) == 6 and all(fnmatchcase(v, p) for p, v in zip(parts, values))


def test_execution_role_trust_has_confused_deputy_conditions(aws):
    """SageMaker may assume the role only for this account (aws:SourceAccount, always) and,
    with --source-arn, only for this account's SageMaker resources in the region. The filled-in
    trust policy is a valid role in moto, and moto's evaluator refuses another account."""
    from moto.iam.access_control import IAMPolicy, PermissionResult

    api, _ = aws
    default = json.loads(filled("execution-role-trust"))["Statement"][0]["Condition"]
    assert default == {"StringEquals": {"aws:SourceAccount": "123456789012"}}
    account, region = "123456789012", "eu-west-1"
    document = filled("execution-role-trust", source_arn=True)
    trust = json.loads(document)
    (statement,) = trust["Statement"]
    assert (
        statement["Principal"] == {"Service": "sagemaker.amazonaws.com"}
        and statement["Action"] == "sts:AssumeRole"
    )
    assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": account}
    source_arn = statement["Condition"]["ArnLike"]["aws:SourceArn"]
    assert source_arn == f"arn:aws:sagemaker:{region}:{account}:*"
    for resource in (
        "training-job/flystage-train-1",
        "hyper-parameter-tuning-job/flystage-tune-1",
        "transform-job/flystage-batch-1",
        "endpoint/flystage",
    ):
        assert arn_like(source_arn, f"arn:aws:sagemaker:{region}:{account}:{resource}")
    assert not arn_like(source_arn, f"arn:aws:sagemaker:{region}:210987654321:training-job/x")
    assert not arn_like(source_arn, f"arn:aws:glue:{region}:{account}:job/x")
    role = api.call(
        "iam", "create_role", RoleName="flystage-sagemaker", AssumeRolePolicyDocument=document
    )["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Condition"] == statement["Condition"]
    policy = IAMPolicy(document)
    ours = {
        "aws:SourceAccount": account,
        "aws:SourceArn": f"arn:aws:sagemaker:{region}:{account}:training-job/x",
    }
    assert (
        policy.is_action_permitted("sts:AssumeRole", incoming_condition_values=ours)
        == PermissionResult.PERMITTED
    )
    theirs = {
        "aws:SourceAccount": "210987654321",
        "aws:SourceArn": f"arn:aws:sagemaker:{region}:210987654321:training-job/x",
    }
    assert (
        policy.is_action_permitted("sts:AssumeRole", incoming_condition_values=theirs)
        == PermissionResult.DENIED
    )


def test_checked_in_policies_are_the_generators_output():
    """iam/*.json are `flystage cloud policies` for the placeholder settings, byte for byte:
    edit the generator (flystage/cloud/policies.py), never the files."""
    generated = generator.policies(PLACEHOLDER_SETTINGS)
    assert sorted(generated) == sorted(p.stem for p in IAM.glob("*.json"))
    for stem, policy in generated.items():
        assert (IAM / f"{stem}.json").read_text() == render(policy), (
            f"iam/{stem}.json differs from the generator's output: regenerate it"
        )


def test_generated_policies_name_the_settings_not_the_defaults():
    """Another endpoint, role, repositories, prefix and tags appear in the policies; nothing of
    the defaults the old hand-written operator policy hard-coded is left."""
    lab = FILLED.replace(
        role_arn="arn:aws:iam::123456789012:role/service-role/lab-sm-exec",
        prefix="lab/fly",
        endpoint_name="Lab-Stages",
        train_repository="lab-train",
        serve_repository="lab-serve",
        tags={"owner": "lab-7"},
    )
    text = "".join(render(p) for p in generator.policies(lab).values())
    for wanted in (
        "role/service-role/lab-sm-exec",
        ":endpoint/lab-stages",  # SageMaker ARNs are lower case
        "endpoint-config/lab-stages-config-*",
        "model/lab-stages-model-*",
        "repository/lab-train",
        "flystage-test/lab/fly/data/*",
        '"aws:ResourceTag/owner": "lab-7"',
    ):
        assert wanted in text, wanted
    for gone in ("flystage-sagemaker", "endpoint/flystage", "repository/flystage-", "/flystage/"):
        assert gone not in text, gone
