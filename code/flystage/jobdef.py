"""The training job definition shared by local mode and SageMaker.

Local mode (``local/``) and the cloud targets read the same hyperparameters, tuning ranges
and metric regexes from here, so what is proven locally is what runs on SageMaker.
"""

from __future__ import annotations

import re

# The training program prints one line per epoch, for example
#   epoch=3 train_loss=0.8123 valid_loss=0.4100 valid_top1=0.8200 valid_top3=0.9700
# SageMaker scans the job log with these regexes; the local tuner uses the same ones.
METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": "train:loss", "Regex": r"epoch=\d+ train_loss=([0-9.]+)"},
    {"Name": "valid:loss", "Regex": r"epoch=\d+ .*valid_loss=([0-9.]+)"},
    {"Name": "valid:top1", "Regex": r"epoch=\d+ .*valid_top1=([0-9.]+)"},
    {"Name": "valid:top3", "Regex": r"epoch=\d+ .*valid_top3=([0-9.]+)"},
]
OBJECTIVE_METRIC = "valid:top3"

# What the lab tunes: learning rate on a log scale, batch size from a fixed set.
TUNING_RANGES: dict[str, dict] = {
    "ContinuousParameterRanges": [
        {"Name": "learning_rate", "MinValue": "0.001", "MaxValue": "0.1", "ScalingType": "Logarithmic"},
    ],
    "CategoricalParameterRanges": [
        {"Name": "batch_size", "Values": ["32", "64", "128", "256"]},
    ],
    "IntegerParameterRanges": [],
}


def metric_regex(name: str) -> re.Pattern[str]:
    """The compiled regex of metric ``name`` (for example ``valid:top3``)."""
    for definition in METRIC_DEFINITIONS:
        if definition["Name"] == name:
            return re.compile(definition["Regex"])
    raise KeyError(f"no metric named {name!r}; known: {[d['Name'] for d in METRIC_DEFINITIONS]}")


def read_metric(log: str, name: str = OBJECTIVE_METRIC) -> list[float]:
    """Every value of metric ``name`` in a job log, in order (as SageMaker would chart them)."""
    return [float(m.group(1)) for m in metric_regex(name).finditer(log)]
