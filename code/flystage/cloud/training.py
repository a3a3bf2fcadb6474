"""A SageMaker training job on the train image: create, wait, summarise.

The request itself is ``flystage.jobdef.training_job_request`` (shared with local mode and
the tuning job); this module names the job, finds the hyperparameters (given, or the best of
the last tuning job), sends it and reports the metrics and the model artefact.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flystage import jobdef
from flystage.cloud import ecr
from flystage.cloud.s3 import check_bucket
from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings
from flystage.cloud.state import read_state, update_state


def job_name(kind: str, now: float | None = None) -> str:
    """``flystage-<kind>-YYYYmmdd-HHMMSS`` (UTC): unique per second, sortable, <= 32 chars
    for short kinds (tuning job names are limited to 32)."""
    return f"flystage-{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def data_channels(settings: Settings, unlabelled: str | None = None) -> dict[str, str]:
    """The job's channels: the uploaded dataset (``make upload``) and, when given, the
    ``s3://`` prefix of the lab's unlabelled images as the channel ``unlabelled``."""
    channels = {jobdef.DATA_CHANNEL: settings.s3_uri("data") + "/"}
    if unlabelled:
        if not unlabelled.startswith("s3://"):
            raise CloudError(
                f"--unlabelled {unlabelled}: give the s3:// prefix of the unlabelled images, "
                f"{settings.s3_uri('unlabelled')}/ (which the execution role may read: upload "
                f"them with `aws s3 sync FOLDER {settings.s3_uri('unlabelled')}/`)"
            )
        channels[UNLABELLED_CHANNEL] = unlabelled.rstrip("/") + "/"
    return channels


# The training program reads it as SM_CHANNEL_UNLABELLED (flystage train --unlabelled).
UNLABELLED_CHANNEL = "unlabelled"


def parse_hyperparameters(pairs: list[str] | None) -> dict[str, str]:
    """``["learning_rate=0.01", "epochs=30"]`` -> dict; values stay strings (as SageMaker's)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CloudError(
                f"hyperparameter {pair!r}: write it as name=value (for example learning_rate=0.01)"
            )
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def best_hyperparameters(
    api: Api, settings: Settings, tuning_job: str | None = None
) -> dict[str, str]:
    """The tuned hyperparameters of the best job of ``tuning_job`` (default: the last one
    started by ``make tune``). Empty in a dry run (shown as a placeholder note)."""
    tuning_job = tuning_job or read_state(settings.state_file).get("tuning_job")
    if not tuning_job and api.dry_run:
        tuning_job = "<the last tuning job>"
    if not tuning_job:
        raise CloudError(
            f"no tuning job recorded in {settings.state_file}: run `make tune` first, or give "
            "hyperparameters (HP='learning_rate=0.01 batch_size=64')"
        )
    if api.dry_run:
        api.say(
            f"# hyperparameters: the best of tuning job {tuning_job} (read from AWS when not a "
            "dry run)"
        )
        return {}
    described = api.call(
        "sagemaker", "describe_hyper_parameter_tuning_job", HyperParameterTuningJobName=tuning_job
    )
    best = described.get("BestTrainingJob")
    if not best:
        raise CloudError(
            f"tuning job {tuning_job} ({described['HyperParameterTuningJobStatus']}) has no best "
            "job yet: wait for it (`make tune` prints its status) or give hyperparameters"
        )
    static = (described.get("TrainingJobDefinition") or {}).get("StaticHyperParameters") or {}
    tuned = best["TunedHyperParameters"]
    # What a flystage tuning job tunes depends on the mode its fixed hyperparameters train.
    expected = jobdef.tuned_names(static)
    if set(tuned) != expected:
        raise CloudError(
            f"the best job of tuning job {tuning_job} tuned {sorted(tuned)}, not "
            f"{sorted(expected)}: it is not a flystage tuning job; give TUNING_JOB=<name> or "
            "hyperparameters"
        )
    api.say(f"best job of {tuning_job}: {best['TrainingJobName']} {tuned}")
    # The best job ran with the static values plus the tuned ones.
    return {
        **{k: v for k, v in static.items() if not k.startswith(("sagemaker_", "_tuning"))},
        **tuned,
    }


def start(
    api: Api,
    settings: Settings,
    operation: str,
    request: Mapping[str, Any],
    message: str,
    **state: str,
) -> bool:
    """Send a create request, record ``state`` (job names) and say ``message``; False in a
    dry run (nothing started, nothing to wait for)."""
    api.call("sagemaker", operation, **request)
    if api.dry_run:
        return False
    update_state(settings.state_file, **state)
    api.say(message)
    return True


def summarise(described: Mapping[str, Any]) -> list[str]:
    """Readable lines about a finished training job: status, metrics, time, artefact."""
    lines = [f"training job {described['TrainingJobName']}: {described['TrainingJobStatus']}"]
    if described.get("FailureReason"):
        lines.append(f"  failure: {described['FailureReason']}")
    for metric in described.get("FinalMetricDataList") or []:
        lines.append(f"  {metric['MetricName']} = {metric['Value']:.4f}")
    if described.get("BillableTimeInSeconds") is not None:
        lines.append(
            f"  billable {described['BillableTimeInSeconds']} s of "
            f"{described.get('TrainingTimeInSeconds', '?')} s"
        )
    artefact = (described.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    if artefact:
        lines.append(f"  model: {artefact}")
    return lines


def train(
    api: Api,
    settings: Settings,
    hyperparameters: Mapping[str, str] | None = None,
    *,
    tuning_job: str | None = None,
    wait: bool = True,
    name: str | None = None,
    unlabelled: str | None = None,
) -> dict[str, Any] | None:
    """Start a training job with ``hyperparameters`` (None: the best of the tuning job) and
    wait for it. Returns the final DescribeTrainingJob (None in a dry run or without wait)."""
    settings.require("role_arn", "bucket")
    check_bucket(api, settings)
    hps = (
        dict(hyperparameters)
        if hyperparameters is not None
        else best_hyperparameters(api, settings, tuning_job)
    )
    name = name or job_name("train")
    request = jobdef.training_job_request(
        settings,
        ecr.image_uri(api, settings, settings.train_repository),
        hps,
        data_channels(settings, unlabelled),
        job_name=name,
    )
    message = (
        f"started training job {name} ({settings.instance_count} x {settings.instance_type}, "
        f"spot {settings.spot})"
    )
    if (
        not start(api, settings, "create_training_job", request, message, training_job=name)
        or not wait
    ):
        return None
    try:
        api.wait(
            "sagemaker", "training_job_completed_or_stopped", settings.poll_s, TrainingJobName=name
        )
    except CloudError:
        pass  # a failed job ends the waiter with an error; the description below says why
    described = api.call("sagemaker", "describe_training_job", TrainingJobName=name)
    for line in summarise(described):
        api.say(line)
    if described["TrainingJobStatus"] != "Completed":
        raise CloudError(
            f"training job {name} {described['TrainingJobStatus']}: "
            f"{described.get('FailureReason', 'no reason given')}; its log is in CloudWatch "
            "under /aws/sagemaker/TrainingJobs"
        )
    return described
