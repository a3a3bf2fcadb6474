"""A SageMaker hyperparameter tuning job: Bayesian search of learning rate and batch size.

The objective (maximise ``valid:top3``), the metric regexes and the ranges come from
``flystage.jobdef``; the training part of the request is the training job's own, so a tuning
trial runs exactly what ``make train`` runs. No waiter exists for tuning jobs: we poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from flystage import jobdef
from flystage.cloud import ecr
from flystage.cloud.s3 import check_bucket
from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings
from flystage.cloud.training import data_channels, job_name, start

# TrainingJobDefinition takes these parts of a CreateTrainingJob request as they are.
_SHARED = (
    "RoleArn",
    "InputDataConfig",
    "OutputDataConfig",
    "ResourceConfig",
    "StoppingCondition",
    "EnableManagedSpotTraining",
    "CheckpointConfig",
)
FINAL_STATES = ("Completed", "Failed", "Stopped")


def tuning_job_request(
    settings: Settings,
    image_uri: str,
    static_hyperparameters: Mapping[str, Any],
    *,
    name: str,
    max_jobs: int | None = None,
    parallel_jobs: int | None = None,
) -> dict[str, Any]:
    """The ``create_hyper_parameter_tuning_job`` request (keyword arguments)."""
    clash = jobdef.tuned_names() & set(static_hyperparameters)
    if clash:
        raise CloudError(
            f"hyperparameter(s) {sorted(clash)} are tuned: do not also give them fixed values"
        )
    max_jobs = settings.tuning_max_jobs if max_jobs is None else max_jobs
    parallel_jobs = settings.tuning_parallel_jobs if parallel_jobs is None else parallel_jobs
    if not 1 <= parallel_jobs <= max_jobs:
        raise CloudError(
            f"parallel jobs ({parallel_jobs}) must be between 1 and max jobs ({max_jobs})"
        )
    # No CheckpointConfig for trials: every trial would share the one URI, and one trial must
    # never resume from another's checkpoint. An interrupted spot trial restarts from scratch.
    training = jobdef.training_job_request(
        settings,
        image_uri,
        static_hyperparameters,
        data_channels(settings),
        job_name=name,
        checkpoint_uri="",
    )
    definition = {k: training[k] for k in _SHARED if k in training}
    definition["AlgorithmSpecification"] = training["AlgorithmSpecification"]
    definition["StaticHyperParameters"] = training["HyperParameters"]
    return {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": {
            "Strategy": "Bayesian",
            "HyperParameterTuningJobObjective": {
                "Type": "Maximize",
                "MetricName": jobdef.OBJECTIVE_METRIC,
            },
            "ResourceLimits": {
                "MaxNumberOfTrainingJobs": int(max_jobs),
                "MaxParallelTrainingJobs": int(parallel_jobs),
            },
            "ParameterRanges": {
                k: [dict(r) for r in v] for k, v in jobdef.TUNING_RANGES.items() if v
            },
            "TrainingJobEarlyStoppingType": "Auto",
        },
        "TrainingJobDefinition": definition,
        "Tags": settings.tag_list(),
    }


def status_line(described: Mapping[str, Any]) -> str:
    """One readable line: status, trial counts, the best objective so far."""
    counts = described.get("TrainingJobStatusCounters") or {}
    done = counts.get("Completed", 0)
    failed = counts.get("RetryableError", 0) + counts.get("NonRetryableError", 0)
    line = (
        f"{described['HyperParameterTuningJobName']}: "
        f"{described['HyperParameterTuningJobStatus']}, trials {done} done, "
        f"{counts.get('InProgress', 0)} running, {failed} failed, {counts.get('Stopped', 0)} "
        "stopped"
    )
    best = described.get("BestTrainingJob")
    if best:
        metric = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        line += (
            f"; best {metric.get('MetricName', '?')} = {metric.get('Value', float('nan')):.4f} "
            f"({best['TrainingJobName']})"
        )
    return line


def wait_for_tuning(
    api: Api, name: str, poll_s: float, sleep: Callable[[float], None] = time.sleep
) -> dict[str, Any]:
    """Poll until the tuning job ends, printing a status line whenever it changes."""
    last = None
    while True:
        described = api.call(
            "sagemaker", "describe_hyper_parameter_tuning_job", HyperParameterTuningJobName=name
        )
        line = status_line(described)
        if line != last:
            api.say(time.strftime("%H:%M:%S ") + line)
            last = line
        if described["HyperParameterTuningJobStatus"] in FINAL_STATES:
            return described
        sleep(poll_s)


def tune(
    api: Api,
    settings: Settings,
    static_hyperparameters: Mapping[str, Any] | None = None,
    *,
    max_jobs: int | None = None,
    parallel_jobs: int | None = None,
    wait: bool = True,
    name: str | None = None,
) -> dict[str, Any] | None:
    """Start the tuning job, wait for it, print the best job. Returns the final description
    (None in a dry run or without ``wait``)."""
    settings.require("role_arn", "bucket")
    check_bucket(api, settings)
    name = name or job_name("tune")
    request = tuning_job_request(
        settings,
        ecr.image_uri(api, settings, settings.train_repository),
        static_hyperparameters or {},
        name=name,
        max_jobs=max_jobs,
        parallel_jobs=parallel_jobs,
    )
    if not start(
        api,
        settings,
        "create_hyper_parameter_tuning_job",
        request,
        f"started tuning job {name}",
        tuning_job=name,
    ):
        return None
    if not wait:
        return None
    described = wait_for_tuning(api, name, settings.poll_s)
    best = described.get("BestTrainingJob")
    if described["HyperParameterTuningJobStatus"] != "Completed" and not best:
        raise CloudError(
            f"tuning job {name} {described['HyperParameterTuningJobStatus']}: "
            f"{described.get('FailureReason') or 'no trial succeeded'}; see the trials' logs in "
            "CloudWatch"
        )
    if best:
        metric = best.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        api.say(
            f"best job: {best['TrainingJobName']} {metric.get('MetricName')} = "
            f"{metric.get('Value')}"
        )
        for key, value in sorted(best.get("TunedHyperParameters", {}).items()):
            api.say(f"  {key} = {value}")
    return described
