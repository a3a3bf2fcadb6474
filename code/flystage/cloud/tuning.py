"""A SageMaker hyperparameter tuning job: Bayesian search of what the job's mode uses.

The objective (maximise ``valid:top3``), the metric regexes and the ranges come from
``flystage.jobdef`` (the exact probe's L2 prior and bands for the default model, learning rate
and batch size for the gradient-trained modes, the mode read from the static hyperparameters);
the training part of the request is the training job's own, so a tuning
trial runs exactly what ``make train`` runs. No waiter exists for tuning jobs: we poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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
MAX_WARM_START_PARENTS = 5  # the API's limit


def tuning_job_request(
    settings: Settings,
    image_uri: str,
    static_hyperparameters: Mapping[str, Any],
    *,
    name: str,
    max_jobs: int | None = None,
    parallel_jobs: int | None = None,
    warm_start: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``create_hyper_parameter_tuning_job`` request (keyword arguments); ``warm_start``:
    parent tuning jobs whose trials seed the search (same data and image)."""
    clash = jobdef.tuned_names(static_hyperparameters) & set(static_hyperparameters)
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
    if len(warm_start) > MAX_WARM_START_PARENTS:
        raise CloudError(
            f"warm start from {len(warm_start)} tuning jobs: SageMaker takes at most "
            f"{MAX_WARM_START_PARENTS}; name the best ones"
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
    ranges = jobdef.tuning_ranges(static_hyperparameters)
    request = {
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
            "ParameterRanges": {k: [dict(r) for r in v] for k, v in ranges.items() if v},
            "TrainingJobEarlyStoppingType": "Auto",
        },
        "TrainingJobDefinition": definition,
        "Tags": settings.tag_list(),
    }
    if warm_start:
        request["WarmStartConfig"] = {
            "ParentHyperParameterTuningJobs": [
                {"HyperParameterTuningJobName": parent} for parent in warm_start
            ],
            "WarmStartType": "IdenticalDataAndAlgorithm",
        }
    return request


def trial_limits(
    settings: Settings,
    static_hyperparameters: Mapping[str, Any],
    max_jobs: int | None,
    parallel_jobs: int | None,
) -> tuple[int, int, str | None]:
    """(max jobs, parallel jobs, a note when they were capped): an exact probe's search space
    is small and every point gives the same model again, so a budget beyond
    ``jobdef.trial_budget`` is cut to it rather than paid for."""
    max_jobs = settings.tuning_max_jobs if max_jobs is None else max_jobs
    parallel_jobs = settings.tuning_parallel_jobs if parallel_jobs is None else parallel_jobs
    budget = jobdef.trial_budget(static_hyperparameters)
    if budget is None or max_jobs <= budget:
        return max_jobs, parallel_jobs, None
    names = ", ".join(sorted(jobdef.tuned_names(static_hyperparameters)))
    note = (
        f"max jobs capped from {max_jobs} to {budget}: the default model (an exactly solved probe) "
        f"is deterministic and only {names} change it, so more trials would re-measure the "
        "same models; pass probe_solver=sgd or mode=finetune in HP= to tune learning_rate and "
        "batch_size instead"
    )
    return budget, min(parallel_jobs, budget), note


def check_warm_start(api: Api, request: Mapping[str, Any], parents: Sequence[str]) -> None:
    """Refuse, before anything is created, parents SageMaker would reject for an
    IdenticalDataAndAlgorithm warm start: not finished, another image, other static
    hyperparameters, another objective, or other tuned names."""
    definition = request["TrainingJobDefinition"]
    ours = _static(definition["StaticHyperParameters"])
    tuned = {
        r["Name"]
        for v in request["HyperParameterTuningJobConfig"]["ParameterRanges"].values()
        for r in v
    }
    for parent in parents:
        try:
            described = api.call(
                "sagemaker",
                "describe_hyper_parameter_tuning_job",
                HyperParameterTuningJobName=parent,
            )
        except CloudError as exc:
            raise CloudError(
                f"warm start from {parent}: {exc}; give an existing tuning job"
            ) from exc
        theirs = described.get("TrainingJobDefinition") or {}
        config = described.get("HyperParameterTuningJobConfig") or {}
        their_tuned = {r["Name"] for v in (config.get("ParameterRanges") or {}).values() for r in v}
        problems = [
            (
                described["HyperParameterTuningJobStatus"] not in FINAL_STATES,
                f"it is {described['HyperParameterTuningJobStatus']}: wait until it ends",
            ),
            (
                (theirs.get("AlgorithmSpecification") or {}).get("TrainingImage")
                != definition["AlgorithmSpecification"]["TrainingImage"],
                "it ran another train image (a warm start needs the identical image: push the "
                "image it used, or start a new search without --warm-start)",
            ),
            (
                _static(theirs.get("StaticHyperParameters") or {}) != ours,
                f"its fixed hyperparameters {_static(theirs.get('StaticHyperParameters') or {})} "
                f"differ from these {ours}: give the same HP=",
            ),
            (
                (config.get("HyperParameterTuningJobObjective") or {}).get("MetricName")
                != jobdef.OBJECTIVE_METRIC,
                "it maximised another objective",
            ),
            (
                their_tuned != tuned,
                f"it tuned {sorted(their_tuned)}, this job tunes {sorted(tuned)} (another mode)",
            ),
        ]
        for bad, why in problems:
            if bad:
                raise CloudError(f"cannot warm start from tuning job {parent}: {why}")


def _static(hyperparameters: Mapping[str, str]) -> dict[str, str]:
    """The hyperparameters a user fixed (SageMaker adds its own ``sagemaker_``/``_tuning``)."""
    return {k: v for k, v in hyperparameters.items() if not k.startswith(("sagemaker_", "_tuning"))}


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
    warm_start: Sequence[str] = (),
) -> dict[str, Any] | None:
    """Start the tuning job, wait for it, print the best job. Returns the final description
    (None in a dry run or without ``wait``). ``warm_start``: parent tuning jobs, checked first."""
    settings.require("role_arn", "bucket")
    check_bucket(api, settings)
    name = name or job_name("tune")
    static = static_hyperparameters or {}
    max_jobs, parallel_jobs, note = trial_limits(settings, static, max_jobs, parallel_jobs)
    if note:
        api.say(note)
    request = tuning_job_request(
        settings,
        ecr.image_uri(api, settings, settings.train_repository),
        static,
        name=name,
        max_jobs=max_jobs,
        parallel_jobs=parallel_jobs,
        warm_start=warm_start,
    )
    if warm_start and not api.dry_run:
        check_warm_start(api, request, warm_start)
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
