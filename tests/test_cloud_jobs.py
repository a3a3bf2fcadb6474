"""make tune / train / batch-predict against moto's SageMaker over HTTP, and the request
shapes moto does not check (or cannot answer) with botocore's Stubber."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from botocore.stub import Stubber

from cloud_helpers import ACCOUNT, BUCKET, REGION, TRAIN_URI, aws, moto_url, put_images  # noqa: F401 (fixtures)
from flystage import jobdef
from flystage.cloud import batch, training, tuning
from flystage.cloud.settings import CloudError
from flystage.cloud.state import read_state, update_state


@pytest.fixture
def out(aws):
    api, _ = aws
    api.out = io.StringIO()
    return api.out


def test_jobs_refuse_an_image_that_was_not_pushed(aws):
    api, settings = aws
    with pytest.raises(
        CloudError,
        match=r"image flystage-train is not in ECR \(eu-west-1\): run `make push` first",
    ):
        training.train(api, settings, {"epochs": "1"})


def test_tune_through_moto(aws, out):
    api, settings = aws
    put_images(api)
    described = tuning.tune(
        api,
        settings,
        {"epochs": 30, "arch": "resnet18"},
        max_jobs=6,
        parallel_jobs=3,
        name="flystage-tune-1",
    )
    # What moto stored is what crossed HTTP.
    config = described["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["HyperParameterTuningJobObjective"] == {
        "Type": "Maximize",
        "MetricName": "valid:top3",
    }
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 3}
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {
            "Name": "learning_rate",
            "MinValue": "0.001",
            "MaxValue": "0.1",
            "ScalingType": "Logarithmic",
        }
    ]
    assert config["ParameterRanges"]["CategoricalParameterRanges"] == [
        {"Name": "batch_size", "Values": ["32", "64", "128", "256"]}
    ]
    definition = described["TrainingJobDefinition"]
    assert definition["AlgorithmSpecification"]["TrainingImage"] == TRAIN_URI
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == jobdef.METRIC_DEFINITIONS
    assert definition["StaticHyperParameters"] == {"epochs": "30", "arch": "resnet18"}
    assert (
        definition["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
        == f"s3://{BUCKET}/flystage/data/"
    )
    assert read_state(settings.state_file)["tuning_job"] == "flystage-tune-1"
    assert "best job:" in out.getvalue() and "flystage-tune-1: Completed" in out.getvalue()


def test_tuned_hyperparameters_cannot_also_be_fixed(aws):
    api, settings = aws
    with pytest.raises(CloudError, match=r"\['probe_l2'\] are tuned"):
        tuning.tuning_job_request(settings, TRAIN_URI, {"probe_l2": "0.1"}, name="t")
    with pytest.raises(CloudError, match=r"\['learning_rate'\] are tuned"):
        tuning.tuning_job_request(
            settings, TRAIN_URI, {"learning_rate": "0.1", "mode": "finetune"}, name="t"
        )
    with pytest.raises(CloudError, match="parallel jobs"):
        tuning.tuning_job_request(settings, TRAIN_URI, {}, name="t", max_jobs=2, parallel_jobs=3)


def tuning_description(status: str, best: bool, counts: dict) -> dict:
    response = {
        "HyperParameterTuningJobName": "flystage-tune-1",
        "HyperParameterTuningJobArn": (
            f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:hyper-parameter-tuning-job/flystage-tune-1"
        ),
        "HyperParameterTuningJobConfig": {
            "Strategy": "Bayesian",
            "ResourceLimits": {"MaxParallelTrainingJobs": 2},
        },
        "TrainingJobDefinition": {
            "AlgorithmSpecification": {"TrainingInputMode": "File"},
            "RoleArn": "arn:aws:iam::000000000000:role/x",
            "OutputDataConfig": {"S3OutputPath": "s3://b/o"},
            "StoppingCondition": {},
            "StaticHyperParameters": {
                "epochs": "30",
                "mode": "finetune",
                "_tuning_objective_metric": "valid:top3",
            },
        },
        "HyperParameterTuningJobStatus": status,
        "CreationTime": dt.datetime(2025, 1, 1),
        "TrainingJobStatusCounters": {
            "Completed": counts.get("done", 0),
            "InProgress": counts.get("running", 0),
            "RetryableError": 0,
            "NonRetryableError": counts.get("failed", 0),
            "Stopped": 0,
        },
        "ObjectiveStatusCounters": {},
    }
    if best:
        response["BestTrainingJob"] = {
            "TrainingJobName": "flystage-tune-1-003-abc",
            "TrainingJobArn": "arn:aws:sagemaker:x",
            "CreationTime": dt.datetime(2025, 1, 1),
            "TrainingJobStatus": "Completed",
            "TunedHyperParameters": {"learning_rate": "0.0123", "batch_size": '"64"'},
            "FinalHyperParameterTuningJobObjectiveMetric": {
                "Type": "Maximize",
                "MetricName": "valid:top3",
                "Value": 0.93,
            },
        }
    return response


def test_tuning_wait_prints_a_line_per_change(aws, out):
    """No waiter exists for tuning jobs; moto finishes at once, so the polling runs on stubs."""
    api, settings = aws
    client = api.client("sagemaker")
    with Stubber(client) as stub:
        request = {"HyperParameterTuningJobName": "flystage-tune-1"}
        stub.add_response(
            "describe_hyper_parameter_tuning_job",
            tuning_description("InProgress", False, {"running": 2}),
            request,
        )
        stub.add_response(
            "describe_hyper_parameter_tuning_job",
            tuning_description("InProgress", False, {"running": 2}),
            request,
        )
        stub.add_response(
            "describe_hyper_parameter_tuning_job",
            tuning_description("InProgress", True, {"done": 1, "running": 1}),
            request,
        )
        stub.add_response(
            "describe_hyper_parameter_tuning_job",
            tuning_description("Completed", True, {"done": 2, "failed": 1}),
            request,
        )
        sleeps = []
        final = tuning.wait_for_tuning(api, "flystage-tune-1", 30, sleep=sleeps.append)
        stub.assert_no_pending_responses()
    lines = out.getvalue().splitlines()
    assert final["HyperParameterTuningJobStatus"] == "Completed" and sleeps == [30, 30, 30]
    assert len(lines) == 3  # the repeated status is not printed again
    assert lines[0].endswith(
        "flystage-tune-1: InProgress, trials 0 done, 2 running, 0 failed, 0 stopped"
    )
    assert lines[2].endswith(
        "Completed, trials 2 done, 0 running, 1 failed, 0 stopped; "
        "best valid:top3 = 0.9300 (flystage-tune-1-003-abc)"
    )


def test_train_through_moto_two_instances_spot_checkpoints(aws, out):
    api, settings = aws
    put_images(api)
    settings = settings.replace(instance_count=2, spot=True, max_runtime_s=3600, max_wait_s=7200)
    described = training.train(
        api, settings, {"learning_rate": "0.01", "batch_size": "64"}, name="flystage-train-1"
    )
    assert described["ResourceConfig"] == {
        "InstanceType": "ml.m5.xlarge",
        "InstanceCount": 2,
        "VolumeSizeInGB": 30,
    }
    assert described["EnableManagedSpotTraining"] is True
    assert described["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/flystage/checkpoints/flystage-train-1",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert described["StoppingCondition"] == {
        "MaxRuntimeInSeconds": 3600,
        "MaxWaitTimeInSeconds": 7200,
    }
    assert described["AlgorithmSpecification"]["TrainingImage"] == TRAIN_URI
    assert described["HyperParameters"] == {"learning_rate": "0.01", "batch_size": "64"}
    model = f"s3://{BUCKET}/flystage/output/flystage-train-1/output/model.tar.gz"
    assert described["ModelArtifacts"]["S3ModelArtifacts"] == model
    text = out.getvalue()
    assert "training job flystage-train-1: Completed" in text and f"model: {model}" in text
    assert read_state(settings.state_file)["training_job"] == "flystage-train-1"


def test_train_with_the_best_of_the_last_tuning_job(aws, out):
    """moto's BestTrainingJob is a fixed placeholder, so this flow runs on stubs, which also
    pin the exact CreateTrainingJob request (MetricDefinitions included: moto rewrites them)."""
    api, settings = aws
    settings = settings.replace(registry_override="registry.example:5000", image_tag="latest")
    update_state(settings.state_file, tuning_job="flystage-tune-1")
    client = api.client("sagemaker")
    image = "registry.example:5000/flystage-train:latest"
    expected = jobdef.training_job_request(
        settings,
        image,
        {"epochs": "30", "mode": "finetune", "learning_rate": "0.0123", "batch_size": '"64"'},
        training.data_channels(settings),
        job_name="flystage-train-2",
    )
    finished = {
        "TrainingJobName": "flystage-train-2",
        "TrainingJobArn": "arn:aws:sagemaker:x",
        "TrainingJobStatus": "Failed",
        "SecondaryStatus": "Failed",
        "FailureReason": "AlgorithmError: see output/failure",
        "AlgorithmSpecification": {"TrainingInputMode": "File"},
        "ModelArtifacts": {"S3ModelArtifacts": "s3://b/m.tar.gz"},
        "ResourceConfig": {
            "InstanceType": "ml.m5.xlarge",
            "InstanceCount": 1,
            "VolumeSizeInGB": 30,
        },
        "StoppingCondition": {},
        "CreationTime": dt.datetime(2025, 1, 1),
        "FinalMetricDataList": [
            {"MetricName": "valid:top3", "Value": 0.5, "Timestamp": dt.datetime(2025, 1, 1)}
        ],
    }
    s3 = api.client("s3")
    with Stubber(client) as stub, Stubber(s3) as s3_stub:
        s3_stub.add_response(
            "get_bucket_location", {"LocationConstraint": REGION}, {"Bucket": BUCKET}
        )
        stub.add_response(
            "describe_hyper_parameter_tuning_job",
            tuning_description("Completed", True, {"done": 3}),
            {"HyperParameterTuningJobName": "flystage-tune-1"},
        )
        stub.add_response(
            "create_training_job", {"TrainingJobArn": "arn:aws:sagemaker:x"}, expected
        )
        stub.add_response(
            "describe_training_job", finished, {"TrainingJobName": "flystage-train-2"}
        )
        stub.add_response(
            "describe_training_job", finished, {"TrainingJobName": "flystage-train-2"}
        )
        with pytest.raises(
            CloudError,
            match="training job flystage-train-2 Failed: AlgorithmError: see output/failure; "
            "its log is in CloudWatch",
        ):
            training.train(api, settings, None, name="flystage-train-2")
        stub.assert_no_pending_responses()
    text = out.getvalue()
    assert (
        "best job of flystage-tune-1: flystage-tune-1-003-abc" in text
        and "valid:top3 = 0.5000" in text
    )


def test_train_without_tuning_or_hyperparameters_says_what_to_do(aws):
    api, settings = aws
    with pytest.raises(CloudError, match="run `make tune` first, or give hyperparameters"):
        training.train(api, settings, None)


def test_parse_hyperparameters():
    assert training.parse_hyperparameters(["learning_rate=0.01", "max-epochs = 3"]) == {
        "learning_rate": "0.01",
        "max_epochs": "3",
    }
    with pytest.raises(CloudError, match="name=value"):
        training.parse_hyperparameters(["0.01"])


def test_batch_transform_through_moto(aws, out, tmp_path):
    api, settings = aws
    put_images(api)
    folder = tmp_path / "new"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "e1.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    (folder / "e2.bmp").write_bytes(b"BM fake")
    model = f"s3://{BUCKET}/flystage/output/job/output/model.tar.gz"
    uri = batch.batch_predict(api, settings, str(folder), model_data=model)
    assert uri.startswith(f"s3://{BUCKET}/flystage/batch/flystage-batch-") and uri.endswith(
        "/output"
    )
    [job] = api.call("sagemaker", "list_transform_jobs")["TransformJobSummaries"]
    described = api.call(
        "sagemaker", "describe_transform_job", TransformJobName=job["TransformJobName"]
    )
    input_uri = uri.removesuffix("/output") + "/input"
    assert described["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == input_uri
    assert described["TransformInput"]["ContentType"] == "application/x-image"
    assert described["TransformOutput"] == {
        "S3OutputPath": uri,
        "Accept": "application/json",
        "AssembleWith": "None",
    }
    assert described["BatchStrategy"] == "SingleRecord"
    # The images went up below the input prefix; the job's own model was deleted afterwards.
    keys = {o["Key"] for o in api.call("s3", "list_objects_v2", Bucket=BUCKET)["Contents"]}
    prefix = input_uri.removeprefix(f"s3://{BUCKET}/")
    assert keys == {f"{prefix}/a/e1.png", f"{prefix}/e2.bmp"}
    assert api.call("sagemaker", "list_models")["Models"] == []


def test_best_job_that_tuned_other_hyperparameters_is_refused(aws):
    """moto's tuning jobs report a placeholder best job tuning a hyperparameter called
    'string': train must not start a job with it."""
    api, settings = aws
    put_images(api)
    tuning.tune(api, settings, name="flystage-tune-9")
    with pytest.raises(
        CloudError,
        match=r"tuned \['string'\], not \['probe_columns', 'probe_l2'\]: "
        "it is not a flystage tuning job",
    ):
        training.train(api, settings, None)
    assert api.call("sagemaker", "list_training_jobs")["TrainingJobSummaries"] == []


def test_spot_tuning_trials_share_no_checkpoints(aws):
    _, settings = aws
    request = tuning.tuning_job_request(
        settings.replace(spot=True), TRAIN_URI, {}, name="flystage-tune-2"
    )
    definition = request["TrainingJobDefinition"]
    assert definition["EnableManagedSpotTraining"] is True and "CheckpointConfig" not in definition
    assert (
        definition["StoppingCondition"]["MaxWaitTimeInSeconds"]
        >= definition["StoppingCondition"]["MaxRuntimeInSeconds"]
    )


def sent(api, monkeypatch) -> list[str]:
    """The operations ``api`` sends from now on (recorded, then sent as usual)."""
    calls, call = [], api.call

    def record(service, operation, **request):
        calls.append(f"{service}.{operation}")
        return call(service, operation, **request)

    monkeypatch.setattr(api, "call", record)
    return calls


def test_batch_predict_refuses_an_existing_out_before_sending_anything(
    aws, out, tmp_path, monkeypatch
):
    api, settings = aws
    put_images(api)
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "e1.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    existing = tmp_path / "top3.csv"
    existing.write_text("the lab's earlier answers\n")
    calls = sent(api, monkeypatch)
    with pytest.raises(
        CloudError, match="top3.csv already exists; choose another --out .* --force"
    ):
        batch.batch_predict(
            api,
            settings,
            str(folder),
            model_data=f"s3://{BUCKET}/flystage/output/j/output/model.tar.gz",
            out_csv=existing,
        )
    assert calls == [] and existing.read_text() == "the lab's earlier answers\n"
    existing.unlink()
    existing.with_suffix(".json").write_text("{}")
    with pytest.raises(CloudError, match=r"top3.json already exists"):
        batch.batch_predict(api, settings, str(folder), out_csv=existing)
    assert calls == []


def test_uris_the_execution_role_cannot_read_are_refused_before_sending(aws, out, monkeypatch):
    """The role reads only prefix/{data,output,checkpoints,batch}/ (iam/execution-role-policy.json):
    a job on anything else would fail with AccessDenied after it was paid for."""
    from flystage.cloud import hosting

    api, settings = aws
    put_images(api)
    calls = sent(api, monkeypatch)
    model = f"s3://{BUCKET}/flystage/output/j/output/model.tar.gz"
    with pytest.raises(
        CloudError,
        match=r"batch input s3://other-bucket/images/: the execution role may read only under "
        rf"s3://{BUCKET}/flystage/\{{data,output,checkpoints,batch\}}/ "
        r"\(iam/execution-role-policy.json\)",
    ):
        batch.batch_predict(api, settings, "s3://other-bucket/images/", model_data=model)
    with pytest.raises(
        CloudError,
        match=r"model data s3://flystage-test/elsewhere/model.tar.gz: .*"
        r"add arn:aws:s3:::flystage-test/elsewhere/model.tar.gz "
        r"to the ReadDataModelsCheckpointsBatchInput",
    ):
        batch.batch_predict(
            api,
            settings,
            f"s3://{BUCKET}/flystage/batch/new/",
            model_data=f"s3://{BUCKET}/elsewhere/model.tar.gz",
        )
    with pytest.raises(CloudError, match="model data .*/flystage-other/.*role_read_uris"):
        hosting.deploy(api, settings, f"s3://{BUCKET}/flystage-other/output/model.tar.gz")
    assert calls == []
    # Where the policy was extended, role_read_uris lets it through.
    extended = settings.replace(
        role_read_uris=f"s3://{BUCKET}/elsewhere/, s3://other-bucket/images"
    )
    uri = batch.batch_predict(
        api,
        extended,
        "s3://other-bucket/images/",
        model_data=f"s3://{BUCKET}/elsewhere/model.tar.gz",
    )
    assert uri.endswith("/output") and "sagemaker.create_transform_job" in calls


PROBE_RANGES = {
    "ContinuousParameterRanges": [
        {"Name": "probe_l2", "MinValue": "0.01", "MaxValue": "10", "ScalingType": "Logarithmic"}
    ],
    "CategoricalParameterRanges": [{"Name": "probe_columns", "Values": ["1", "3"]}],
}
GRADIENT_RANGES = {
    "ContinuousParameterRanges": [
        {
            "Name": "learning_rate",
            "MinValue": "0.001",
            "MaxValue": "0.1",
            "ScalingType": "Logarithmic",
        }
    ],
    "CategoricalParameterRanges": [{"Name": "batch_size", "Values": ["32", "64", "128", "256"]}],
}


def test_default_model_tunes_its_l2_prior_and_bands_within_a_capped_budget(aws, out):
    """The default (an exactly solved probe) ignores learning_rate and batch_size: tuning them
    paid for identical trials. Its search is over probe_l2 and probe_columns, and 20 trials of a
    deterministic fit are cut to what the space needs, with the reason said."""
    api, settings = aws
    put_images(api)
    assert settings.tuning_max_jobs == 20
    described = tuning.tune(api, settings, {"epochs": "5"}, name="flystage-tune-3")
    config = described["HyperParameterTuningJobConfig"]
    assert config["ParameterRanges"] == PROBE_RANGES
    budget = jobdef.trial_budget({})
    assert budget == 12 and config["ResourceLimits"]["MaxNumberOfTrainingJobs"] == budget
    assert f"max jobs capped from 20 to {budget}" in out.getvalue()
    assert "probe_columns, probe_l2 change it" in out.getvalue()


@pytest.mark.parametrize(
    "static",
    [
        {"probe_solver": "sgd"},
        {"mode": "finetune"},
        {"mode": "full"},
        {"arch": "small_cnn"},
        {"arch": "resnet18"},  # mode auto: not pretrained, so trained in full
        {"ensemble_archs": "efficientnet_lite0,small_cnn"},  # one member has epochs
    ],
)
def test_gradient_trained_modes_tune_learning_rate_and_batch_size(aws, static):
    _, settings = aws
    request = tuning.tuning_job_request(settings, TRAIN_URI, static, name="t", max_jobs=20)
    config = request["HyperParameterTuningJobConfig"]
    assert config["ParameterRanges"] == GRADIENT_RANGES
    assert tuning.trial_limits(settings, static, 20, 2) == (20, 2, None)  # stochastic: no cap


@pytest.mark.parametrize(
    "static", [{}, {"arch": "resnet18", "pretrained": "true"}, {"mode": "probe", "arch": "hognet"}]
)
def test_exact_probes_tune_the_prior(aws, static):
    _, settings = aws
    request = tuning.tuning_job_request(settings, TRAIN_URI, static, name="t", max_jobs=6)
    assert request["HyperParameterTuningJobConfig"]["ParameterRanges"] == PROBE_RANGES


def _validate(operation: str, request: dict) -> None:
    """botocore's own check of a request against the SageMaker service model (and the enum
    values, which its validator does not check)."""
    import botocore.session
    from botocore.validate import validate_parameters

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model(operation).input_shape
    validate_parameters(request, shape)
    warm = shape.members["WarmStartConfig"]
    assert request["WarmStartConfig"]["WarmStartType"] in warm.members["WarmStartType"].enum


def test_warm_start_from_a_finished_tuning_job(aws, out, monkeypatch):
    api, settings = aws
    put_images(api)
    tuning.tune(api, settings, {"epochs": "5"}, name="flystage-tune-4")
    requests = []
    call = api.call

    def record(service, operation, **request):
        if operation == "create_hyper_parameter_tuning_job":
            requests.append(request)
        return call(service, operation, **request)

    monkeypatch.setattr(api, "call", record)
    tuning.tune(
        api, settings, {"epochs": "5"}, name="flystage-tune-5", warm_start=["flystage-tune-4"]
    )
    (request,) = requests
    assert request["WarmStartConfig"] == {
        "ParentHyperParameterTuningJobs": [{"HyperParameterTuningJobName": "flystage-tune-4"}],
        "WarmStartType": "IdenticalDataAndAlgorithm",
    }
    _validate("CreateHyperParameterTuningJob", request)


@pytest.mark.parametrize(
    "parent_static, child_static, warm_start, message",
    [
        ({"epochs": "5"}, {"epochs": "6"}, ["flystage-tune-6"], "fixed hyperparameters"),
        ({"epochs": "5"}, {"epochs": "5", "mode": "finetune"}, ["flystage-tune-6"], "differ"),
        ({"epochs": "5"}, {"epochs": "5"}, ["flystage-tune-nope"], "give an existing tuning"),
        ({"epochs": "5"}, {"epochs": "5"}, ["flystage-tune-6"] * 6, "at most 5"),
    ],
)
def test_warm_start_refused_before_a_job_is_created(
    aws, parent_static, child_static, warm_start, message
):
    api, settings = aws
    put_images(api)
    tuning.tune(api, settings, parent_static, name="flystage-tune-6")
    with pytest.raises(CloudError, match=message):
        tuning.tune(api, settings, child_static, name="flystage-tune-7", warm_start=warm_start)
    listed = api.call("sagemaker", "list_hyper_parameter_tuning_jobs")
    assert [
        j["HyperParameterTuningJobName"] for j in listed["HyperParameterTuningJobSummaries"]
    ] == ["flystage-tune-6"]


def test_best_job_of_a_default_probe_search_is_taken(aws, out):
    """train takes probe_l2 and probe_columns from a search of the default model."""
    api, settings = aws
    client = api.client("sagemaker")
    update_state(settings.state_file, tuning_job="flystage-tune-1")
    described = tuning_description("Completed", True, {"done": 3})
    described["TrainingJobDefinition"]["StaticHyperParameters"] = {"epochs": "30"}
    described["BestTrainingJob"]["TunedHyperParameters"] = {
        "probe_l2": "0.3",
        "probe_columns": '"3"',
    }
    with Stubber(client) as stub:
        stub.add_response(
            "describe_hyper_parameter_tuning_job",
            described,
            {"HyperParameterTuningJobName": "flystage-tune-1"},
        )
        best = training.best_hyperparameters(api, settings)
    assert best == {"epochs": "30", "probe_l2": "0.3", "probe_columns": '"3"'}
