"""``make aws-check``: every request the targets send, checked against the IAM policies.

Each target runs as a dry run whose requests are captured (nothing is sent, no credentials
are needed), with example values where only AWS could answer (``<account-id>``, the last
jobs' names). Each request is mapped to the IAM actions and resources it needs:

- the operator's: ``service:Operation`` on the resource the request names (plus
  ``iam:PassRole`` of a role it hands over and ``sagemaker:AddTags`` when it tags);
- the execution role's, for what SageMaker then does on the job's behalf: read its input
  and model data, write its output and checkpoints, pull its image, write logs and metrics;
- the trust policy's: SageMaker assuming the role for this account's resource.

These are evaluated against the generated policies (``flystage.cloud.policies``), or the ones
in ``--policies DIR``; any request they do not allow is named, and the exit status is 1.
The mapping is generic (botocore's operation names, request fields such as ``S3Uri``,
``RoleArn``, ``Image``), so a new request is checked without changing this module.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flystage.cloud import policies as pol
from flystage.cloud.dryrun import DryRunApi
from flystage.cloud.hosting import derived_name
from flystage.cloud.s3 import parse_s3_uri
from flystage.cloud.settings import CloudError, Settings

TARGETS = ("push", "upload", "tune", "train", "deploy", "predict", "batch-predict", "teardown")
# AWS's documented example account (no one's): used when role_arn is not set.
EXAMPLE_ACCOUNT = "111122223333"
EXAMPLE = {
    "region": "eu-west-1",
    "role_arn": f"arn:aws:iam::{EXAMPLE_ACCOUNT}:role/flystage-sagemaker",
    "bucket": "example-flystage-bucket",
}
EXAMPLE_STAMP = "20260101-000000"
EXAMPLE_JOBS = {
    "tuning_job": f"{pol.JOB_PREFIX}tune-{EXAMPLE_STAMP}",
    "training_job": f"{pol.JOB_PREFIX}train-{EXAMPLE_STAMP}",
}
# S3 operations whose IAM action is not s3:<Operation>.
S3_ACTIONS = {
    "HeadObject": "s3:GetObject",
    "HeadBucket": "s3:ListBucket",
    "ListObjectsV2": "s3:ListBucket",
    "ListObjects": "s3:ListBucket",
    "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject",
}
# boto3's transfer methods and the docker SDK's push: what they ask AWS for.
PSEUDO = {
    ("s3", "upload_file"): ["s3:PutObject"],
    ("s3", "download_file"): ["s3:GetObject"],
    ("docker", "push"): [
        "ecr:BatchCheckLayerAvailability",
        "ecr:InitiateLayerUpload",
        "ecr:UploadLayerPart",
        "ecr:CompleteLayerUpload",
        "ecr:PutImage",
    ],
}
# Where SageMaker writes a created resource's logs and metrics (/aws/sagemaker/<group>).
LOG_GROUPS = {
    "TrainingJob": "TrainingJobs",
    "HyperParameterTuningJob": "TrainingJobs",
    "TransformJob": "TransformJobs",
    "Endpoint": "Endpoints",
}


@dataclasses.dataclass(frozen=True)
class Need:
    """One permission a request needs: who (operator, role, trust), action, resource,
    request context (condition keys)."""

    who: str
    action: str
    resource: str
    context: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.context)
        return f"{self.who:<8} {self.action} {self.resource}{extra}"


@dataclasses.dataclass
class Request:
    target: str
    service: str
    operation: str
    request: dict[str, Any]

    def title(self) -> str:
        return f"{self.target}: {self.service} {self.operation}"


# ---- a small IAM evaluator: Allow/Deny, wildcards, the condition operators the policies use --


def like(pattern: str, value: str) -> bool:
    """IAM's wildcard match: ``*`` any run of characters, ``?`` one; nothing else special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def arn_like(pattern: str, value: str) -> bool:
    """ArnLike: each of the six colon-separated parts matched on its own."""
    parts, values = pattern.split(":", 5), value.split(":", 5)
    return len(parts) == len(values) == 6 and all(map(like, parts, values))


OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "StringEquals": lambda expected, actual: expected == actual,
    "StringLike": like,
    "ArnLike": arn_like,
    "ArnEquals": lambda expected, actual: expected == actual,
}


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _conditions_hold(condition: Mapping[str, Any], context: Mapping[str, str]) -> bool:
    for operator, block in condition.items():
        if operator not in OPERATORS:
            raise CloudError(f"the check does not evaluate the condition operator {operator}")
        for key, expected in block.items():
            actual = context.get(key)
            if actual is None or not any(OPERATORS[operator](e, actual) for e in _listed(expected)):
                return False
    return True


def _applies(statement: Mapping[str, Any], need: Need, principal: dict | None) -> bool:
    if "NotAction" in statement or "NotResource" in statement:
        raise CloudError("the check does not evaluate NotAction/NotResource")
    if not any(like(a.lower(), need.action.lower()) for a in _listed(statement["Action"])):
        return False
    if "Resource" in statement and not any(
        like(r, need.resource) for r in _listed(statement["Resource"])
    ):
        return False
    if principal is not None and statement.get("Principal") != principal:
        return False
    return _conditions_hold(statement.get("Condition", {}), dict(need.context))


def allows(policy: Mapping[str, Any], need: Need, principal: dict | None = None) -> bool:
    """Whether ``policy`` allows ``need``: an applicable Allow and no applicable Deny
    (implicit deny otherwise)."""
    applicable = [s for s in _listed(policy["Statement"]) if _applies(s, need, principal)]
    return any(s["Effect"] == "Allow" for s in applicable) and not any(
        s["Effect"] == "Deny" for s in applicable
    )


# ---- requests -> needs -------------------------------------------------------------------


def _pascal(service: str, operation: str) -> str:
    """botocore's operation name (``CreateTrainingJob``) of a method (``create_training_job``)."""
    import botocore.session
    from botocore import xform_name

    model = botocore.session.get_session().get_service_model(service)
    for name in model.operation_names:
        if xform_name(name) == operation:
            return name
    raise CloudError(f"{service} has no operation {operation} (botocore {botocore.__version__})")


def _iam_prefix(service: str) -> str:
    """The IAM service prefix: botocore's signing name (sagemaker-runtime signs as sagemaker)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model(service)
    return model.signing_name or model.endpoint_prefix


def operator_actions(service: str, operation: str) -> list[str]:
    """The IAM actions a request needs of its sender."""
    if (service, operation) in PSEUDO:
        return PSEUDO[(service, operation)]
    name = _pascal(service, operation)
    if service == "s3":
        return [S3_ACTIONS.get(name, f"s3:{name}")]
    return [f"{_iam_prefix(service)}:{name}"]


def _noun(operation: str) -> str:
    """``CreateHyperParameterTuningJob`` -> ``HyperParameterTuningJob`` (the verb dropped)."""
    return re.sub(r"^[A-Z][a-z]+", "", operation)


def _kebab(noun: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", noun).lower()


def sagemaker_resource(settings: Settings, operation: str, request: Mapping[str, Any]) -> str:
    """The ARN a SageMaker request acts on: ``ResourceArn``, or the ``<Type>Name`` field whose
    type ends the operation's noun (``TrainingJobName`` for ``DescribeTrainingJob``); names are
    lower case in SageMaker ARNs."""
    if "ResourceArn" in request:
        return request["ResourceArn"]
    noun = _noun(operation)
    kinds = [k[: -len("Name")] for k in request if k.endswith("Name") and noun.endswith(k[:-4])]
    if not kinds:
        return "*"
    kind = max(kinds, key=len)
    return pol.arn(settings, "sagemaker", f"{_kebab(kind)}/{request[kind + 'Name'].lower()}")


def ecr_repository_arn(settings: Settings, image: str) -> str:
    """The repository ARN of ``<account>.dkr.ecr.<region>.amazonaws.com/<repo>[@:]...``."""
    match = re.fullmatch(r"(\d+|[^./]+)\.dkr\.ecr\.([^.]+)\.amazonaws\.com/([^@:]+).*", image)
    if not match:
        return f"<not an ECR image: {image}>"
    partition, _ = pol.role_parts(settings)
    account, region, repository = match.groups()
    return f"arn:{partition}:ecr:{region}:{account}:repository/{repository}"


def _resource(settings: Settings, service: str, operation: str, request: Mapping) -> str:
    if service == "s3":
        key = request.get("Key")
        return pol.s3_arn(settings.replace(bucket=request["Bucket"]), key or "")
    if service == "ecr":
        names = request.get("repositoryNames") or [request.get("repositoryName")]
        return pol.arn(settings, "ecr", f"repository/{names[0]}") if names[0] else "*"
    if service == "docker":
        return ecr_repository_arn(settings, request["repository"])
    if service.startswith("sagemaker"):
        return sagemaker_resource(settings, _pascal(service, operation), request)
    return "*"


def _walk(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) in a nested request."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield path + (key,), item
            yield from _walk(item, path + (key,))
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, path)


def _context(settings: Settings, service: str, operation: str) -> tuple:
    """Condition keys a request carries: the tags of the existing SageMaker resource it names
    (flystage acts only on what carries them: deploy and teardown check with ListTags first)."""
    if service == "sagemaker" and not operation.startswith("create_"):
        return tuple((f"aws:ResourceTag/{k}", str(v)) for k, v in sorted(settings.tags.items()))
    return ()


def operator_needs(settings: Settings, req: Request) -> list[Need]:
    """What the sender of ``req`` must be allowed."""
    resource = _resource(settings, req.service, req.operation, req.request)
    context = _context(settings, req.service, req.operation)
    needs = [
        Need("operator", a, resource, context) for a in operator_actions(req.service, req.operation)
    ]
    if req.service == "ecr" and req.operation == "get_authorization_token":
        needs = [Need("operator", "ecr:GetAuthorizationToken", "*")]
    if req.service == "s3" and not req.request.get("Key") and "Prefix" in req.request:
        needs = [
            dataclasses.replace(n, context=(("s3:prefix", req.request["Prefix"]),)) for n in needs
        ]
    if req.service == "sagemaker" and req.request.get("Tags"):
        needs.append(Need("operator", "sagemaker:AddTags", resource, context))
    for path, value in _walk(req.request):
        if path[-1] in ("RoleArn", "ExecutionRoleArn") and isinstance(value, str):
            passed = (("iam:PassedToService", pol.SAGEMAKER_PRINCIPAL),)
            needs.append(Need("operator", "iam:PassRole", value, passed))
    return needs


def _s3_read(settings: Settings, uri: str, *, list_prefix: bool) -> list[Need]:
    bucket, key = parse_s3_uri(uri)
    base = settings.replace(bucket=bucket)
    obj = key if key.endswith(".tar.gz") else f"{key.rstrip('/')}/example-object"
    needs = [Need("role", "s3:GetObject", pol.s3_arn(base, obj))]
    if list_prefix:
        needs.append(Need("role", "s3:ListBucket", pol.s3_arn(base), (("s3:prefix", key),)))
    return needs


def _s3_write(settings: Settings, uri: str) -> list[Need]:
    bucket, key = parse_s3_uri(uri)
    return [
        Need(
            "role",
            "s3:PutObject",
            pol.s3_arn(settings.replace(bucket=bucket), f"{key.rstrip('/')}/example-object"),
        )
    ]


def _image_needs(settings: Settings, image: str) -> list[Need]:
    repository = ecr_repository_arn(settings, image)
    return [Need("role", a, repository) for a in pol.ECR_PULL] + [
        Need("role", "ecr:GetAuthorizationToken", "*")
    ]


def _data_needs(settings: Settings, path: tuple[str, ...], value: Any) -> list[Need]:
    """What SageMaker does as the role for one request field."""
    field = path[-1]
    if not isinstance(value, str):
        return []
    if field == "S3Uri" and "CheckpointConfig" in path:
        return _s3_read(settings, value, list_prefix=True) + _s3_write(settings, value)
    if field == "S3Uri":
        return _s3_read(settings, value, list_prefix=True)
    if field == "ModelDataUrl":
        return _s3_read(settings, value, list_prefix=not value.endswith(".tar.gz"))
    if field == "S3OutputPath":
        return _s3_write(settings, value)
    if field in ("Image", "TrainingImage"):
        return _image_needs(settings, value)
    return []


def _log_needs(settings: Settings, operation: str, request: Mapping, resource: str) -> list[Need]:
    """Logs and metrics SageMaker writes for a created job or endpoint."""
    noun = _noun(operation)
    group = LOG_GROUPS.get(noun)
    if not operation.startswith("Create") or group is None:
        return []
    name = resource.rsplit("/", 1)[-1]
    log_group = f"/aws/sagemaker/{group}" + (
        f"/{request['EndpointName']}" if noun == "Endpoint" else ""
    )
    return [
        Need("role", "logs:CreateLogGroup", pol.arn(settings, "logs", f"log-group:{log_group}")),
        *(
            Need(
                "role",
                a,
                pol.arn(settings, "logs", f"log-group:{log_group}:log-stream:{name}/algo-1"),
            )
            for a in ("logs:CreateLogStream", "logs:PutLogEvents")
        ),
        Need(
            "role",
            "cloudwatch:PutMetricData",
            "*",
            (("cloudwatch:namespace", f"/aws/sagemaker/{group}"),),
        ),
    ]


def role_needs(settings: Settings, req: Request) -> list[Need]:
    """What the execution role (and its trust policy) must allow for a SageMaker create
    request: assumed by SageMaker, then reading, writing, pulling and logging for the job."""
    if req.service != "sagemaker" or not req.operation.startswith("create_"):
        return []
    operation = _pascal(req.service, req.operation)
    resource = sagemaker_resource(settings, operation, req.request)
    needs = [n for path, value in _walk(req.request) for n in _data_needs(settings, path, value)]
    needs += _log_needs(settings, operation, req.request, resource)
    if needs:  # SageMaker acts as the role: it assumes it for this resource first
        _, account = pol.role_parts(settings)
        context = (("aws:SourceAccount", account), ("aws:SourceArn", resource))
        needs.append(Need("trust", "sts:AssumeRole", pol.SAGEMAKER_PRINCIPAL, context))
    return needs


# ---- capturing the targets' requests -----------------------------------------------------


class CapturingApi(DryRunApi):
    """A dry run that keeps each request (and each waiter's polling request) instead of
    printing it."""

    def __init__(self, settings: Settings) -> None:
        import io

        super().__init__(settings, out=io.StringIO())
        self.target = ""
        self.requests: list[Request] = []
        self.notes: list[str] = []

    def say(self, text: str) -> None:
        self.notes.append(text)

    def call(self, service: str, operation: str, **request: Any) -> None:
        self.requests.append(Request(self.target, service, operation, request))

    def wait(self, service: str, waiter: str, delay: float, **request: Any) -> None:
        """A waiter polls one Describe call (botocore's waiter model names it)."""
        import botocore.session
        from botocore import xform_name

        model = botocore.session.get_session().get_waiter_model(service)
        name = next((n for n in model.waiter_names if xform_name(n) == waiter), None)
        if name is None:
            raise CloudError(f"botocore has no {service} waiter {waiter}")
        self.call(service, xform_name(model.get_waiter(name).operation), **request)


def example_settings(settings: Settings, state_file: Path) -> Settings:
    """``settings`` with example values where region, role or bucket are unset, the stand-ins
    (endpoint_url, registry_override) off, and ``state_file`` naming example jobs."""
    filled = {name: value for name, value in EXAMPLE.items() if not getattr(settings, name)}
    state_file.write_text(json.dumps(EXAMPLE_JOBS), encoding="utf-8")
    return settings.replace(
        **filled, endpoint_url="", registry_override="", state_file=str(state_file)
    )


def _tiny_image_set(root: Path) -> tuple[Path, Path]:
    """(a folder with one small PNG, a manifest naming it): inputs for upload and predict."""
    from PIL import Image

    from flystage.manifest import Record, file_sha1, write_manifest

    folder = root / "images"
    folder.mkdir()
    image = folder / "embryo.png"
    Image.new("L", (8, 8), 128).save(image)
    record = Record(image, "stage-1", "embryo", "train", file_sha1(image))
    return folder, write_manifest([record], root / "manifest.csv")


def _runners(folder: Path, manifest: Path) -> dict[str, Callable[[CapturingApi, Settings], Any]]:
    """Each target as ``make TARGET DRY_RUN=1`` runs it."""
    import argparse

    from flystage.cloud import batch, ecr, hosting, s3, training, tuning
    from flystage.cloud.endpoint import predict_folder

    predict_args = argparse.Namespace(undo=None, folder=folder, k=3, concurrency=1, dry_run=True)
    return {
        "push": ecr.push,
        "upload": lambda api, s: s3.upload_dataset(api, s, manifest, progress=False),
        "tune": tuning.tune,
        "train": training.train,
        "deploy": hosting.deploy,
        "predict": lambda api, s: predict_folder(api, s, predict_args),
        "batch-predict": lambda api, s: batch.batch_predict(api, s, str(folder)),
        "teardown": hosting.teardown,
    }


def capture(
    settings: Settings, targets: tuple[str, ...] = TARGETS
) -> tuple[Settings, list[Request]]:
    """The requests each target sends, with example values (see ``example_settings``, also
    returned) and the dry run's placeholders resolved."""
    with tempfile.TemporaryDirectory(prefix="flystage-check-") as tmp:
        root = Path(tmp)
        settings = example_settings(settings, root / "state.json")
        runners = _runners(*_tiny_image_set(root))
        api = CapturingApi(settings)
        for target in targets:
            api.target = target
            runners[target](api, settings)
    resolve = placeholder_resolver(settings)
    return settings, [dataclasses.replace(r, request=resolve(r.request)) for r in api.requests]


def placeholder_resolver(settings: Settings) -> Callable[[Any], Any]:
    """A function replacing the dry run's ``<placeholders>`` by the example values a real run
    would find; one left over makes its request fail the check, naming it."""
    _, account = pol.role_parts(settings)
    job = EXAMPLE_JOBS["training_job"]
    model_data = settings.s3_uri("output", job, "output", "model.tar.gz")
    endpoint = settings.endpoint_name
    config = derived_name(endpoint, "config", EXAMPLE_STAMP)
    model = derived_name(endpoint, "model", EXAMPLE_STAMP)
    rules = [
        (r"<account-id>", account),
        (r"<digest of the pushed image>", "0" * 64),
        (r"<ID of [^>]+>", "0" * 12),
        (r"<S3ModelArtifacts of [^>]+>", model_data),
        (r"<the last tuning job>", EXAMPLE_JOBS["tuning_job"]),
        (r"<EndpointArn of [^>]+>", pol.arn(settings, "sagemaker", f"endpoint/{endpoint.lower()}")),
        (r"<EndpointConfigName of [^>]+>", config),
        (
            r"<EndpointConfigArn of [^>]+>",
            pol.arn(settings, "sagemaker", f"endpoint-config/{config.lower()}"),
        ),
        (r"<ModelName of [^>]+>", model),
        (r"<ModelArn of [^>]+>", pol.arn(settings, "sagemaker", f"model/{model.lower()}")),
    ]

    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            for pattern, example in rules:
                value = re.sub(pattern, lambda _, e=example: e, value)
            return value
        if isinstance(value, Mapping):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return resolve


# ---- the check -----------------------------------------------------------------------------


def load_policies(
    settings: Settings, directory: Path | None = None, *, source_arn: bool = False
) -> dict[str, dict]:
    """The policies to check against: generated for ``settings``, or read from ``directory``."""
    if directory is None:
        return pol.policies(settings, source_arn=source_arn)
    found = {}
    for stem in pol.FILES:
        path = directory / f"{stem}.json"
        try:
            found[stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise CloudError(
                f"{path}: cannot read the policy ({err}); write the three with "
                f"`flystage cloud policies --out {directory}`"
            ) from None
    return found


def evaluate(settings: Settings, documents: Mapping[str, dict], need: Need) -> bool:
    """Whether the policy ``need.who`` answers to allows it; a placeholder left is refused."""
    if "<" in need.resource:
        return False
    if need.who == "trust":
        return allows(documents["execution-role-trust"], need, {"Service": need.resource})
    name = "operator-policy" if need.who == "operator" else "execution-role-policy"
    return allows(documents[name], need)


def needs_of(settings: Settings, req: Request) -> list[Need]:
    return operator_needs(settings, req) + role_needs(settings, req)


def check(
    settings: Settings, requests: list[Request], documents: Mapping[str, dict], out: Any
) -> list[tuple[Request, Need]]:
    """Print each target's requests and what each needs; returns the refused (request, need)s."""
    refused = []
    target = None
    for req in requests:
        if req.target != target:
            target = req.target
            print(f"== {target}", file=out)
        print(f"  {req.service} {req.operation}", file=out)
        for need in needs_of(settings, req):
            ok = evaluate(settings, documents, need)
            print(f"    {'ok     ' if ok else 'REFUSED'} {need.text()}", file=out)
            if not ok:
                refused.append((req, need))
    return refused


def run_check(
    settings: Settings,
    policies_dir: Path | None = None,
    *,
    source_arn: bool = False,
    out: Any = None,
) -> int:
    """``make aws-check``: 0 when every request is allowed, else 1 (each refusal named)."""
    import sys

    out = out or sys.stdout
    example, requests = capture(settings)
    documents = load_policies(example, policies_dir, source_arn=source_arn)
    refused = check(example, requests, documents, out)
    where = policies_dir or "the policies `flystage cloud policies` writes"
    if not refused:
        print(f"every request of {len(requests)} is allowed by {where}", file=out)
        return 0
    print(f"{len(refused)} permission(s) missing from {where}:", file=out)
    for req, need in refused:
        print(f"  {req.title()} needs {need.text()}", file=out)
    return 1
