"""The training job definition shared by local mode and SageMaker.

Local mode (``local/``) and the cloud targets read the same hyperparameters, tuning ranges
and metric regexes from here, so what is proven locally is what runs on SageMaker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from flystage.training.kinds import EXACT_PROBE, training_kind  # torch-free, as this module

# The training program prints one line per epoch, for example
#   epoch=3 train_loss=0.8123 valid_loss=0.4100 valid_top1=0.8200 valid_top3=0.9700
# and, last, the same line for the model it saved (its best epoch), prefixed "saved model: ".
# SageMaker scans the job log with these regexes and ranks a tuning trial by the objective's
# LAST value, so that is the saved model's; the local tuner reads the log the same way.
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": "train:loss", "Regex": r"epoch=\d+ train_loss=([0-9.]+)"},
    {"Name": "valid:loss", "Regex": r"epoch=\d+ .*valid_loss=([0-9.]+)"},
    {"Name": "valid:top1", "Regex": r"epoch=\d+ .*valid_top1=([0-9.]+)"},
    {"Name": "valid:top3", "Regex": r"epoch=\d+ .*valid_top3=([0-9.]+)"},
]
OBJECTIVE_METRIC = "valid:top3"

# What the gradient-trained modes tune (probe_solver=sgd, finetune, full): learning rate on a
# log scale, batch size from a fixed set.
TUNING_RANGES: dict[str, dict] = {
    "ContinuousParameterRanges": [
        {
            "Name": "learning_rate",
            "MinValue": "0.001",
            "MaxValue": "0.1",
            "ScalingType": "Logarithmic",
        },
    ],
    "CategoricalParameterRanges": [
        {"Name": "batch_size", "Values": ["32", "64", "128", "256"]},
    ],
    "IntegerParameterRanges": [],
}


# The default model (the exactly solved probe) has no learning rate or batches: it is tuned by
# its L2 prior, measured best near 1.0 and within a few points from 0.01 to 10 (docs/accuracy.md),
# and by its bands along the embryo (1 or 3 measured; 3 gained 1.7-2.6 points of top-1).
PROBE_TUNING_RANGES: dict[str, list[dict]] = {
    "ContinuousParameterRanges": [
        {"Name": "probe_l2", "MinValue": "0.01", "MaxValue": "10", "ScalingType": "Logarithmic"},
    ],
    "CategoricalParameterRanges": [{"Name": "probe_columns", "Values": ["1", "3"]}],
    "IntegerParameterRanges": [],
}
# An exact probe is deterministic: trials beyond this many per continuous range and category
# re-measure points the search has already pinned down.
EXACT_TRIALS_PER_POINT = 6


def tuning_ranges(static_hyperparameters: Mapping[str, Any] | None = None) -> dict[str, list]:
    """The ranges a tuning job searches for the mode ``static_hyperparameters`` train (resolved
    as TrainConfig resolves it): ``PROBE_TUNING_RANGES`` for the exactly solved probe (the
    default), ``TUNING_RANGES`` (learning rate x batch size) for every gradient-trained mode."""
    exact = training_kind(static_hyperparameters or {}) == EXACT_PROBE
    return PROBE_TUNING_RANGES if exact else TUNING_RANGES


def trial_budget(static_hyperparameters: Mapping[str, Any] | None = None) -> int | None:
    """The most trials worth running for these hyperparameters' mode, or None (no cap): an
    exact probe gives the same model for the same point, so a budget beyond a few trials per
    continuous range and category pays to re-measure the same answer."""
    if training_kind(static_hyperparameters or {}) != EXACT_PROBE:
        return None
    ranges = tuning_ranges(static_hyperparameters)
    points = 1
    for r in ranges.get("CategoricalParameterRanges", []):
        points *= len(r["Values"])
    continuous = len(ranges.get("ContinuousParameterRanges", [])) + len(
        ranges.get("IntegerParameterRanges", [])
    )
    return points * EXACT_TRIALS_PER_POINT * continuous if continuous else points


def tuned_names(static_hyperparameters: Mapping[str, Any] | None = None) -> set[str]:
    """The names of the hyperparameters tuned for the mode ``static_hyperparameters`` train
    (``probe_l2``, ``probe_columns`` for the default exact probe; ``learning_rate``,
    ``batch_size`` for the gradient-trained modes)."""
    ranges = tuning_ranges(static_hyperparameters)
    return {r["Name"] for kind in ranges.values() for r in kind}


def metric_regex(name: str) -> re.Pattern[str]:
    """The compiled regex of metric ``name`` (for example ``valid:top3``)."""
    for definition in METRIC_DEFINITIONS:
        if definition["Name"] == name:
            return re.compile(definition["Regex"])
    raise KeyError(f"no metric named {name!r}; known: {[d['Name'] for d in METRIC_DEFINITIONS]}")


def read_metric(log: str, name: str = OBJECTIVE_METRIC) -> list[float]:
    """Every value of metric ``name`` in a job log, in order (as SageMaker would chart them)."""
    return [float(m.group(1)) for m in metric_regex(name).finditer(log)]


def read_epoch_metric(log: str, name: str = OBJECTIVE_METRIC) -> list[float]:
    """The values of metric ``name`` on the per-epoch lines only (not the saved model's line)."""
    return read_metric(
        "\n".join(line for line in log.splitlines() if line.startswith("epoch=")), name
    )


# ---- the SageMaker requests -------------------------------------------------------------

# The one input channel: a folder (S3 prefix) with manifest.csv and the images it lists,
# paths relative to it (what `make upload` writes and local mode stages).
DATA_CHANNEL = "train"
DATA_MANIFEST = "manifest.csv"
# Where SageMaker mirrors CheckpointConfig.S3Uri inside the container (also its default).
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")


def hyperparameter_strings(hyperparameters: Mapping[str, Any]) -> dict[str, str]:
    """SageMaker takes hyperparameters as strings; the training toolkit JSON-decodes them back.

    Strings pass as they are, booleans become ``"true"``/``"false"`` (the train program parses
    those itself), everything else is JSON (``0.01`` -> ``"0.01"``, ``[1, 2]`` -> ``"[1, 2]"``).
    """
    out = {}
    for key, value in hyperparameters.items():
        if "-" in key:
            raise ValueError(f"hyperparameter {key!r}: use underscores, not dashes, in names")
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def input_data_config(channels: Mapping[str, str]) -> list[dict[str, Any]]:
    """A training job's ``InputDataConfig``: channel name -> ``s3://`` (or local mode's
    ``file://``) URI of its prefix, every instance reading all of it (File mode)."""
    if not channels:
        raise ValueError("a training job needs at least one input channel (for example 'train')")
    for name, uri in channels.items():
        if not uri.startswith(("s3://", "file://")):
            raise ValueError(f"channel {name!r}: {uri!r} is neither an s3:// nor a file:// URI")
    return [
        {
            "ChannelName": name,
            "DataSource": {
                "S3DataSource": {
                    "S3DataType": "S3Prefix",
                    "S3Uri": uri,
                    # Every instance sees the whole data set; the train program shards it.
                    "S3DataDistributionType": "FullyReplicated",
                }
            },
            "InputMode": "File",
        }
        for name, uri in channels.items()
    ]


def training_job_request(
    settings: Any,
    image_uri: str,
    hyperparameters: Mapping[str, Any],
    channels: Mapping[str, str],
    *,
    job_name: str,
    output_uri: str | None = None,
    checkpoint_uri: str | None = None,
) -> dict[str, Any]:
    """The exact ``sagemaker.create_training_job`` request (keyword arguments) for one job.

    This is the single definition of a training job: the cloud ``train`` target sends it,
    the tuning job reuses its parts as its ``TrainingJobDefinition`` (``flystage.cloud.tuning``),
    and local mode turns it into a ``/opt/ml`` tree (HyperParameters ->
    ``input/config/hyperparameters.json``, InputDataConfig -> ``inputdataconfig.json`` and
    ``input/data/<channel>/``, ResourceConfig.InstanceCount -> ``resourceconfig.json`` hosts,
    CheckpointConfig.LocalPath -> the checkpoint folder). Keep the signature stable.

    - ``settings``: a ``flystage.cloud.settings.Settings`` (read: ``role_arn``, ``instance_type``,
      ``instance_count``, ``volume_size_gb``, ``max_runtime_s``, ``spot``, ``max_wait_s``,
      ``tags``, and ``bucket``/``prefix`` when no ``output_uri`` is given). ``Settings()``
      with defaults is fine for local mode (the role is then an empty string).
    - ``image_uri``: the train image (ECR URI, or the local tag in local mode).
    - ``hyperparameters``: name -> value (underscored names; values made strings here).
    - ``channels``: channel name (``train``, ``valid``, ...) -> ``s3://`` URI of its prefix,
      or ``file://`` folder in local mode.
    - ``job_name``: 1-63 letters, digits and dashes (``flystage.cloud.training.job_name``).
    - ``output_uri``: where ``model.tar.gz`` goes; default ``s3://bucket/prefix/output``.
    - ``checkpoint_uri``: default ``s3://bucket/prefix/checkpoints/<job_name>`` when spot
      training is on (spot needs checkpoints to resume), else no CheckpointConfig; ``""``
      means no CheckpointConfig at all.
    """
    if not _JOB_NAME.fullmatch(job_name):
        raise ValueError(f"job name {job_name!r}: use 1-63 letters, digits and dashes")
    inputs = input_data_config(channels)
    if output_uri is None:
        output_uri = settings.s3_uri("output")
    if checkpoint_uri is None and settings.spot:
        checkpoint_uri = settings.s3_uri("checkpoints", job_name)
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": int(settings.max_runtime_s)}
    request: dict[str, Any] = {
        "TrainingJobName": job_name,
        "RoleArn": settings.role_arn,
        "AlgorithmSpecification": {
            "TrainingImage": image_uri,
            "TrainingInputMode": "File",
            "MetricDefinitions": [dict(d) for d in METRIC_DEFINITIONS],
        },
        "HyperParameters": hyperparameter_strings(hyperparameters),
        "InputDataConfig": inputs,
        "OutputDataConfig": {"S3OutputPath": output_uri},
        "ResourceConfig": {
            "InstanceType": settings.instance_type,
            "InstanceCount": int(settings.instance_count),
            "VolumeSizeInGB": int(settings.volume_size_gb),
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": bool(settings.spot),
        "Tags": [{"Key": k, "Value": str(v)} for k, v in sorted(settings.tags.items())],
    }
    if settings.spot:
        stopping["MaxWaitTimeInSeconds"] = int(settings.max_wait_s)
    if checkpoint_uri:
        request["CheckpointConfig"] = {"S3Uri": checkpoint_uri, "LocalPath": CHECKPOINT_LOCAL_PATH}
    return request
