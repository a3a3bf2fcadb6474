"""docs/notebooks/flystage-sagemaker.ipynb runs, both ways, with nbclient (a real kernel and the
real SageMaker SDK): its local-mode cells on the real images through the SDK's local mode; its
AWS cells against moto's AWS API over HTTP, with what moto received checked against what the
execution role may do (iam/execution-role-policy.json). Tiny: two or three genes, one epoch of
a small network."""

from __future__ import annotations

import base64
import json
import math
import re
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cloud_helpers import BUCKET, REGION, ROLE, aws, moto_url, put_images  # noqa: F401 (fixtures)
from flystage import jobdef
from flystage.cloud.settings import load_settings
from flystage.training.kinds import EXACT_PROBE, training_kind
from sdk_helpers import remove_compose_containers, write_sdk_config

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebooks" / "flystage-sagemaker.ipynb"
GENES = "Dif,dhd,Dms"
# SageMaker's pattern for job, model, endpoint config and endpoint names.
NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


def read_notebook():
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    pytest.importorskip("sagemaker")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def run(nb, env: dict[str, str], monkeypatch) -> str:
    """Execute ``nb`` in a fresh kernel with ``env`` set; returns the text of its outputs."""
    import nbclient

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        # The kernel's own traceback is often empty here: name the error itself.
        pytest.fail(f"{err}\n{err.ename}: {err.evalue}")
    return "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


def test_notebook_cells_say_how_they_run() -> None:
    nb = read_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        first = cell.source.splitlines()[0]
        assert ("local" in tags(cell)) == first.startswith("# Local mode"), cell.source
        assert ("aws" in tags(cell)) == first.startswith("# On AWS"), cell.source
    aws_cells = [c.source for c in code if "aws" in tags(c)]
    assert any("upload_dataset" in s for s in aws_cells) and any(
        "tuner.fit" in s for s in aws_cells
    )
    assert any('instance_type="ml.m5.xlarge"' in s for s in aws_cells)


@pytest.mark.docker
@pytest.mark.slow
def test_notebook_local_cells_run(tmp_path: Path, bdgp_root: Path, monkeypatch) -> None:
    nb = read_notebook()
    nb.cells = [c for c in nb.cells if "aws" not in tags(c)]
    # No AWS config and no region anywhere: local mode must still run.
    for name in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    env = {
        "AWS_CONFIG_FILE": "/dev/null",
        "FLYSTAGE_NOTEBOOK_WORK": str(tmp_path / "work"),
        "FLYSTAGE_DATA": str(bdgp_root),
        "FLYSTAGE_NOTEBOOK_GENES": GENES,
        "FLYSTAGE_NOTEBOOK_QUICK": "1",
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(write_sdk_config(tmp_path / "sdk-config.yaml")),
    }
    try:
        outputs = run(nb, env, monkeypatch)
    finally:
        remove_compose_containers(tmp_path / "work")
    # The tuner searches the default model by what changes it, within its budget.
    assert "ContinuousParameterRanges" in outputs and "'Name': 'probe_l2'" in outputs
    assert f"{jobdef.trial_budget({})} trials over" in outputs
    assert "exit status 0" in outputs
    assert outputs.count("renamed 4 file(s), skipped 0") == 2  # the rename, then its undo


# ---- the AWS cells against moto ---------------------------------------------------------------


def moto_api(url: str, action: str) -> bytes:
    request = urllib.request.Request(f"{url}/moto-api/recorder/{action}", method="POST")
    if action == "download-recording":
        request = urllib.request.Request(f"{url}/moto-api/recorder/{action}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def recorded(url: str) -> list[dict]:
    """What moto received since the recording started: method, path, service and region (from
    the request's SigV4 credential scope), and the JSON body of SageMaker requests."""
    requests = []
    for line in moto_api(url, "download-recording").decode().splitlines():
        entry = json.loads(line)
        scope = re.search(
            r"Credential=[^/]+/\d+/([^/]+)/([^/]+)/", entry["headers"].get("Authorization", "")
        )
        body = entry.get("body") or ""
        if entry.get("body_encoded"):
            body = base64.b64decode(body).decode(errors="replace")
        target = entry["headers"].get("X-Amz-Target", "")
        requests.append(
            {
                "method": entry["method"],
                "path": urllib.parse.urlsplit(entry["url"]).path,
                "region": scope.group(1) if scope else None,
                "service": scope.group(2) if scope else None,
                "operation": target.rpartition(".")[2],
                "body": json.loads(body) if target.startswith("SageMaker.") and body else {},
            }
        )
    return requests


def s3_uris(value) -> list[str]:
    """Every s3:// string anywhere in a request body."""
    if isinstance(value, dict):
        return [u for v in value.values() for u in s3_uris(v)]
    if isinstance(value, list):
        return [u for v in value for u in s3_uris(v)]
    return [value] if isinstance(value, str) and value.startswith("s3://") else []


BEST_POINT = """\
ranges = tuner.hyperparameter_ranges()
point = {r["Name"]: r.get("Values", [r.get("MinValue")])[0] for rs in ranges.values() for r in rs}
best_hyperparameters = {**tuner.estimator.hyperparameters(), **point}
"""


def aws_cells(nb) -> list:
    """The AWS path up to the deploy: the cells not tagged ``local`` before section 6 (the
    predictions: moto's invoke_endpoint cannot take image bytes). The cells that wait for
    hours (tagged ``wait``) are left out; the one that reads the tuned hyperparameters is
    replaced by a cell that sets them as ``best_estimator().hyperparameters()`` gives them:
    the tuner's static ones and a point of its ranges."""
    import nbformat

    cells = []
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## 6."):
            break
        if "local" in tags(cell):
            continue
        if "wait" in tags(cell):
            if "best_hyperparameters =" not in cell.source:
                continue
            cell = nbformat.v4.new_code_cell(BEST_POINT)
        cells.append(cell)
    return cells


@pytest.mark.slow
def test_notebook_aws_cells_write_only_where_the_role_may(
    aws, moto_url, tmp_path: Path, bdgp_root: Path, monkeypatch
) -> None:
    """The AWS cells, run against moto with the real SDK: every request in the settings'
    region although AWS_DEFAULT_REGION says another; the jobs write under
    s3://bucket/prefix/output with Debugger and Profiler off; the SDK never touches its
    default bucket; the endpoint is the settings' endpoint_name with flystage's tags."""
    api, settings = aws
    put_images(api)  # in moto's ECR and the state file, as `make push` leaves them
    nb = read_notebook()
    nb.cells = aws_cells(nb)
    (tmp_path / "flystage.toml").write_text("")
    env = {
        "AWS_ENDPOINT_URL": moto_url,  # every boto3 client of the kernel talks to moto
        "AWS_DEFAULT_REGION": "us-west-2",
        "AWS_REGION": "us-west-2",
        "FLYSTAGE_CONFIG": str(tmp_path / "flystage.toml"),
        "FLYSTAGE_REGION": REGION,
        "FLYSTAGE_ROLE_ARN": ROLE,
        "FLYSTAGE_BUCKET": BUCKET,
        "FLYSTAGE_TAGS": "project=flystage,lab=notebook-test",
        "FLYSTAGE_MAX_RUNTIME_S": "7200",
        "FLYSTAGE_STATE_FILE": settings.state_file,  # where put_images recorded the push
        "FLYSTAGE_NOTEBOOK_WORK": str(tmp_path / "work"),
        "FLYSTAGE_DATA": str(bdgp_root),
        "FLYSTAGE_NOTEBOOK_GENES": GENES,
        "SAGEMAKER_USER_CONFIG_OVERRIDE": str(write_sdk_config(tmp_path / "sdk-config.yaml")),
    }
    monkeypatch.chdir(tmp_path)  # moto writes its recording into the working folder
    moto_api(moto_url, "reset-recording")
    moto_api(moto_url, "start-recording")
    try:
        run(nb, env, monkeypatch)
    finally:
        moto_api(moto_url, "stop-recording")
    requests = recorded(moto_url)
    check_requests(requests)
    sent = {r["operation"]: r["body"] for r in requests if r["service"] == "sagemaker"}
    check_jobs(sent)
    check_tuning(sent, load_settings())
    check_endpoint(api)


def check_requests(requests: list[dict]) -> None:
    """All in the settings' region; S3 only in the project's bucket, never a CreateBucket
    or ListBuckets (the SDK's default bucket), no STS (its account lookup for that bucket);
    ECR only to find the pushed images."""
    assert requests and {r["region"] for r in requests} == {REGION}
    assert {r["service"] for r in requests} <= {"ecr", "s3", "sagemaker"}
    s3 = [r for r in requests if r["service"] == "s3"]
    assert s3 and all(r["path"].split("/")[1] == BUCKET for r in s3), [r["path"] for r in s3]
    assert not [r for r in s3 if r["method"] == "PUT" and r["path"].rstrip("/") == f"/{BUCKET}"]
    puts = [r["path"] for r in s3 if r["method"] == "PUT"]
    assert puts and all(p.startswith(f"/{BUCKET}/flystage/data/") for p in puts)


def check_jobs(sent: dict[str, dict]) -> None:
    """The tuning and training requests: output under prefix/output, no Debugger/Profiler
    output, every S3 URI under the prefix, flystage's names and tags, the settings' runtime."""
    tuning, training = sent["CreateHyperParameterTuningJob"], sent["CreateTrainingJob"]
    output = f"s3://{BUCKET}/flystage/output"
    assert tuning["TrainingJobDefinition"]["OutputDataConfig"]["S3OutputPath"] == output
    assert training["OutputDataConfig"]["S3OutputPath"] == output
    for body in (tuning, training, sent["CreateModel"]):
        assert all(u.startswith(f"s3://{BUCKET}/flystage/") for u in s3_uris(body)), body
    assert not {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerRuleConfigurations"} & set(
        training
    )
    assert training.get("ProfilerConfig", {"DisableProfiler": True}) == {"DisableProfiler": True}
    assert training["StoppingCondition"]["MaxRuntimeInSeconds"] == 7200
    assert training["ResourceConfig"]["InstanceCount"] == 2
    # The pushed image by digest, whose name the SDK would make every job's name from.
    assert "/flystage-train@sha256:" in training["AlgorithmSpecification"]["TrainingImage"]
    names = [
        tuning["HyperParameterTuningJobName"],
        training["TrainingJobName"],
        sent["CreateModel"]["ModelName"],
        sent["CreateEndpointConfig"]["EndpointConfigName"],
        sent["CreateEndpoint"]["EndpointName"],
    ]
    assert all(NAME.fullmatch(n) and n.startswith("flystage") for n in names), names
    wanted = [{"Key": "lab", "Value": "notebook-test"}, {"Key": "project", "Value": "flystage"}]
    for operation in ("CreateHyperParameterTuningJob", "CreateTrainingJob", "CreateModel"):
        assert sorted(sent[operation]["Tags"], key=lambda t: t["Key"]) == wanted, operation


def check_tuning(sent: dict[str, dict], settings) -> None:
    """The tuner searches what changes the model its static hyperparameters train (the
    default, an exactly solved probe, as make tune tunes it), within that model's trial
    budget; the training job then trains that same kind of model."""
    tuning = sent["CreateHyperParameterTuningJob"]
    config = tuning["HyperParameterTuningJobConfig"]
    static = {
        k: v
        for k, v in tuning["TrainingJobDefinition"]["StaticHyperParameters"].items()
        if not k.startswith(("sagemaker_", "_tuning"))
    }
    assert training_kind(static) == EXACT_PROBE, static
    assert config["ParameterRanges"] == jobdef.tuning_ranges(static)
    budget = jobdef.trial_budget(static)
    limits = config["ResourceLimits"]
    assert limits["MaxNumberOfTrainingJobs"] == min(settings.tuning_max_jobs, budget or math.inf)
    assert limits["MaxParallelTrainingJobs"] <= limits["MaxNumberOfTrainingJobs"]
    assert training_kind(sent["CreateTrainingJob"]["HyperParameters"]) == EXACT_PROBE


def check_endpoint(api) -> None:
    """The endpoint is the settings' endpoint_name, and it, its config and its model carry
    flystage's tags (what teardown and deploy look for)."""
    from flystage.cloud.hosting import carries_tags

    tags = {"project": "flystage", "lab": "notebook-test"}
    endpoint = api.call("sagemaker", "describe_endpoint", EndpointName="flystage")
    config = api.call(
        "sagemaker", "describe_endpoint_config", EndpointConfigName=endpoint["EndpointConfigName"]
    )
    [variant] = config["ProductionVariants"]
    model = api.call("sagemaker", "describe_model", ModelName=variant["ModelName"])
    for arn in (endpoint["EndpointArn"], config["EndpointConfigArn"], model["ModelArn"]):
        assert carries_tags(api, tags, arn), arn
    assert model["PrimaryContainer"]["ModelDataUrl"].startswith(f"s3://{BUCKET}/flystage/output/")
    assert model["ExecutionRoleArn"] == ROLE
