"""What the SageMaker SDK tests share: the SDK defaults config that switches its telemetry off,
and the removal of the containers its local mode leaves behind."""

from __future__ import annotations

from pathlib import Path

# The documented opt-out: an SDK defaults config named by SAGEMAKER_USER_CONFIG_OVERRIDE.
SDK_CONFIG = "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"
COMPOSE_DIR_LABEL = "com.docker.compose.project.working_dir"


def write_sdk_config(path: Path) -> Path:
    path.write_text(SDK_CONFIG)
    return path


def remove_compose_containers(container_root: Path) -> int:
    """Remove the containers the SDK's local mode made under ``container_root`` (its
    docker-compose projects live there; finished training jobs stay as exited containers)."""
    import docker

    client = docker.from_env()
    root = str(Path(container_root).resolve())
    removed = 0
    for container in client.containers.list(all=True, filters={"label": COMPOSE_DIR_LABEL}):
        if container.labels.get(COMPOSE_DIR_LABEL, "").startswith(root):
            container.remove(force=True)
            removed += 1
    return removed
