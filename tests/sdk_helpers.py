"""What the SageMaker SDK tests share: the SDK defaults config that switches its telemetry off,
and the removal of the containers its local mode leaves behind."""

from __future__ import annotations

from pathlib import Path

from flystage.sagemaker import remove_local_containers as remove_compose_containers  # noqa: F401

# The documented opt-out: an SDK defaults config named by SAGEMAKER_USER_CONFIG_OVERRIDE.
SDK_CONFIG = (
    "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"
)


def write_sdk_config(path: Path) -> Path:
    path.write_text(SDK_CONFIG)
    return path
