"""Turn a CreateTrainingJob request into the ``/opt/ml`` tree that each host's container sees.

SageMaker hands a training container its job through files: hyperparameters (strings, as
the API takes them), the channels and how they are fed, and the cluster (which host am I,
who are the others). This module writes exactly those files from the same request dict that
``boto3.client("sagemaker").create_training_job(**request)`` would send, so a job proven here
is the job sent to the cloud. Channel data comes from local folders: a ``file://`` S3Uri in
the request (as the SageMaker Python SDK's local mode allows) or an explicit override.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

from flystage_local import LocalModeError

# Where SageMaker mounts the checkpoint folder when CheckpointConfig.LocalPath is not given.
DEFAULT_CHECKPOINT_PATH = "/opt/ml/checkpoints"
# The container side of the folders every host gets; the keys name the host tree's folders.
CONTAINER_MOUNTS = {"input": "/opt/ml/input", "model": "/opt/ml/model", "output": "/opt/ml/output"}
# The interface SageMaker names in resourceconfig.json; Docker's bridge gives each container eth0.
NETWORK_INTERFACE = "eth0"
# Input modes whose data the container reads as ordinary files.
FILE_MODES = ("File", "FastFile")


def host_names(instance_count: int) -> list[str]:
    """SageMaker's host names for a cluster: ``algo-1`` .. ``algo-N``."""
    if instance_count < 1:
        raise LocalModeError(f"ResourceConfig.InstanceCount is {instance_count}; give 1 or more")
    return [f"algo-{i}" for i in range(1, instance_count + 1)]


def request_hosts(request: Mapping) -> list[str]:
    """The host names of the request's cluster (``ResourceConfig.InstanceCount``)."""
    return host_names(int(request.get("ResourceConfig", {}).get("InstanceCount", 1)))


def hyperparameters_json(request: Mapping) -> dict[str, str]:
    """``hyperparameters.json``: the request's HyperParameters, strings as SageMaker requires."""
    hps = dict(request.get("HyperParameters") or {})
    wrong = {k: v for k, v in hps.items() if not isinstance(k, str) or not isinstance(v, str)}
    if wrong:
        # The API rejects non-string values; failing here keeps local and cloud alike.
        raise LocalModeError(
            f"HyperParameters must map strings to strings, as CreateTrainingJob requires; "
            f"these are not: {wrong!r} (write numbers as text, e.g. '0.01')"
        )
    return hps


def input_data_config(request: Mapping) -> dict[str, dict[str, str]]:
    """``inputdataconfig.json``: channel name -> content type, input mode, distribution."""
    default_mode = request.get("AlgorithmSpecification", {}).get("TrainingInputMode", "File")
    config: dict[str, dict[str, str]] = {}
    for channel in request.get("InputDataConfig") or []:
        name = channel["ChannelName"]
        source = channel.get("DataSource", {}).get("S3DataSource", {})
        mode = channel.get("InputMode", default_mode)
        distribution = source.get("S3DataDistributionType", "FullyReplicated")
        if mode not in FILE_MODES:
            raise LocalModeError(
                f"channel {name!r}: InputMode {mode!r} is not supported locally; use 'File'"
            )
        if distribution != "FullyReplicated":
            raise LocalModeError(
                f"channel {name!r}: S3DataDistributionType {distribution!r} "
                "is not supported locally; "
                "local mode gives every host the whole channel (FullyReplicated)"
            )
        entry = {
            "TrainingInputMode": mode,
            "S3DistributionType": distribution,
            "RecordWrapperType": "None",
        }
        if "ContentType" in channel:
            entry["ContentType"] = channel["ContentType"]
        config[name] = entry
    return config


def resource_config(request: Mapping, host: str, hosts: list[str]) -> dict:
    """``resourceconfig.json`` of ``host``, in the shape SageMaker writes for one instance group."""
    instance_type = request.get("ResourceConfig", {}).get("InstanceType", "local")
    return {
        "current_host": host,
        "current_instance_type": instance_type,
        "current_group_name": "homogeneousCluster",
        "hosts": sorted(hosts),
        "instance_groups": [
            {
                "instance_group_name": "homogeneousCluster",
                "instance_type": instance_type,
                "hosts": sorted(hosts),
            }
        ],
        "network_interface_name": NETWORK_INTERFACE,
    }


def channel_sources(
    request: Mapping, overrides: Mapping[str, str | Path] | None = None
) -> dict[str, Path]:
    """Local folder of every channel: ``overrides[name]``, else the channel's ``file://`` S3Uri."""
    overrides = dict(overrides or {})
    sources: dict[str, Path] = {}
    for channel in request.get("InputDataConfig") or []:
        name = channel["ChannelName"]
        uri = channel.get("DataSource", {}).get("S3DataSource", {}).get("S3Uri", "")
        if name in overrides:
            folder = Path(overrides.pop(name))
        elif urlparse(uri).scheme == "file":
            folder = Path(urlparse(uri).path)
        else:
            raise LocalModeError(
                f"channel {name!r} reads {uri or 'nothing'}; local mode needs a local folder: "
                f"give it as file:///path in the request or as a channel override"
            )
        if not folder.is_dir():
            raise LocalModeError(
                f"channel {name!r}: {folder} is not a folder; organise the data into it first"
            )
        sources[name] = folder.resolve()
    if overrides:
        raise LocalModeError(
            f"channel(s) {sorted(overrides)} are not in the request's InputDataConfig"
        )
    return sources


def checkpoint_path(request: Mapping) -> str:
    """Where the container expects its checkpoints (CheckpointConfig.LocalPath)."""
    return (request.get("CheckpointConfig") or {}).get("LocalPath", DEFAULT_CHECKPOINT_PATH)


def checkpoint_folder(request: Mapping, tree: Path) -> Path:
    """The local folder behind the checkpoint path: a ``file://`` CheckpointConfig.S3Uri, which
    outlives the job (as the S3 copy does, so a rerun resumes), else the tree's ``checkpoints/``."""
    uri = (request.get("CheckpointConfig") or {}).get("S3Uri", "")
    if urlparse(uri).scheme == "file":
        folder = Path(urlparse(uri).path)
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    if uri:
        raise LocalModeError(
            f"CheckpointConfig.S3Uri {uri}: local mode keeps checkpoints in a folder; give file:///path"
        )
    return tree / "checkpoints"


def _link_or_copy(src: str, dst: str) -> None:
    # A hard link fills a host's channel instantly; the channel folders are local mode's own
    # staged copies (never the lab's originals), so sharing their inodes is safe.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_host_tree(
    root: str | Path, request: Mapping, host: str, sources: Mapping[str, Path]
) -> Path:
    """Write host ``host``'s ``/opt/ml`` tree under ``root`` (which must not exist) and return it.

    Layout, as SageMaker prepares an instance: ``input/config/{hyperparameters,
    inputdataconfig,resourceconfig}.json``, ``input/data/<channel>/`` (a full copy of each
    channel), and empty ``model/``, ``output/``, ``output/data/`` and ``checkpoints/``.
    """
    root = Path(root)
    if root.exists():
        raise LocalModeError(
            f"{root} already exists; local mode never reuses a job's folder: pick a new job name"
        )
    hosts = request_hosts(request)
    if host not in hosts:
        raise LocalModeError(f"host {host!r} is not one of the request's hosts {hosts}")
    config_dir = root / "input" / "config"
    config_dir.mkdir(parents=True)
    files = {
        "hyperparameters.json": hyperparameters_json(request),
        "inputdataconfig.json": input_data_config(request),
        "resourceconfig.json": resource_config(request, host, hosts),
    }
    for name, content in files.items():
        (config_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    data_dir = root / "input" / "data"
    data_dir.mkdir()
    for name in input_data_config(request):
        shutil.copytree(sources[name], data_dir / name, copy_function=_link_or_copy)
    # The toolkit cannot write output/failure into a missing output/ and then exits 0 on a
    # failed job, so every folder the container writes to exists before it starts.
    for folder in ("model", "output/data", "checkpoints"):
        (root / folder).mkdir(parents=True)
    return root


def container_environment(request: Mapping, job_name: str) -> dict[str, str]:
    """The container's environment: the request's Environment plus the job name SageMaker sets."""
    env = {str(k): str(v) for k, v in (request.get("Environment") or {}).items()}
    env["TRAINING_JOB_NAME"] = job_name
    return env
