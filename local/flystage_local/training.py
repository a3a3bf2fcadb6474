"""Run one training job locally, from its CreateTrainingJob request, as SageMaker would.

For each host (``algo-1`` .. ``algo-N``) a real ``/opt/ml`` tree is written
(:mod:`flystage_local.jobtree`) and the train image runs ``train`` with that tree's
``input``, ``model``, ``output`` and checkpoint folders mounted where SageMaker mounts them,
every host on the job's own Docker bridge network under its host name. When the containers
have exited, the job folder holds what SageMaker would leave in S3 and report:

    <jobs_root>/<job-name>/
        request.json          the CreateTrainingJob request that was run
        algo-1/ ...           each host's /opt/ml tree, as the container left it
        logs/algo-1.log ...   each host's log (stdout and stderr)
        model.tar.gz          model/ of the hosts (the first host's files win), if not Failed
        output/               success or failure (the job's FailureReason), data/
        output.tar.gz         output/data/ of the hosts, as SageMaker uploads it
        job.json              status, failure reason, final metrics, exit codes, seconds
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flystage.jobdef import METRIC_DEFINITIONS, read_metric
from flystage_local import LocalModeError, containers, jobtree

# SageMaker keeps the first 1024 characters of output/failure as the job's FailureReason.
FAILURE_REASON_CHARS = 1024
# SageMaker's grace between SIGTERM and SIGKILL when it stops a job.
STOP_GRACE_SECONDS = 120


@dataclass
class JobResult:
    """What DescribeTrainingJob would say about a finished local job, and where its files are."""

    name: str
    folder: Path
    status: str  # Completed, Failed or Stopped
    failure_reason: str | None
    exit_codes: dict[str, int | None]
    seconds: float
    model_artefact: Path | None
    logs: dict[str, str] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status == "Completed"

    def describe(self) -> dict:
        """JSON-safe summary (``job.json``), in DescribeTrainingJob's words where they exist."""
        info = asdict(self)
        info.pop("logs")
        info["folder"] = str(self.folder)
        info["model_artefact"] = str(self.model_artefact) if self.model_artefact else None
        return info


def final_metrics(log: str) -> dict[str, float]:
    """The last value of every metric in ``METRIC_DEFINITIONS`` found in ``log``."""
    found = {}
    for definition in METRIC_DEFINITIONS:
        values = read_metric(log, definition["Name"])
        if values:
            found[definition["Name"]] = values[-1]
    return found


def _mounts(request: Mapping, tree: Path) -> dict[Path, str]:
    mounts = {tree / name: target for name, target in jobtree.CONTAINER_MOUNTS.items()}
    mounts[jobtree.checkpoint_folder(request, tree)] = jobtree.checkpoint_path(request)
    return mounts


def _tar_folder(folder: Path, archive: Path) -> Path:
    # Members relative to the folder, as SageMaker's model.tar.gz has them (no leading dir).
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def _merge(hosts: list[str], folder: Path, part: str, into: Path) -> None:
    """Copy ``<host>/<part>`` of every host into ``into``; the first host is copied last, so it
    wins."""
    into.mkdir(parents=True, exist_ok=True)
    for host in reversed(hosts):
        source = folder / host / part
        if source.is_dir():
            shutil.copytree(source, into, dirs_exist_ok=True)


def _failure_reason(
    folder: Path, hosts: list[str], codes: dict[str, int | None], cause: str | None
) -> str | None:
    """The job's FailureReason: the failing host's ``output/failure``, or what is known."""

    def written(host: str) -> str | None:
        path = folder / host / "output" / "failure"
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    others = next((text for h in hosts if (text := written(h))), None)
    if cause == "MaxRuntimeExceeded":
        reason = "MaxRuntimeExceeded: the job ran longer than StoppingCondition.MaxRuntimeInSeconds"
        return (reason + (f"; the program wrote: {others}" if others else ""))[
            :FAILURE_REASON_CHARS
        ]
    # The host that failed first caused the stop; the others may only have lost their peer.
    failed = [h for h in hosts if codes.get(h) not in (0, None)]
    first = next(
        (h for h in hosts if cause and cause.startswith(f"{h} ")), failed[0] if failed else None
    )
    if first is None:
        return others[:FAILURE_REASON_CHARS] if others else None
    if text := written(first):
        return text[:FAILURE_REASON_CHARS]
    reason = f"AlgorithmError: {first} exited with code {codes[first]} and wrote no output/failure"
    return (reason + (f"; another host wrote: {others}" if others else ""))[:FAILURE_REASON_CHARS]


def _run_containers(
    client,
    name: str,
    image: str,
    hosts: list[str],
    mounts: Mapping[str, dict[Path, str]],
    environment: Mapping[str, str],
    write: Callable[[str], None] | None,
    deadline: float,
    stop_grace: int,
) -> tuple[dict[str, str], dict[str, int | None], str | None]:
    """One container per host on the job's own network, run until every one has exited (or
    ``deadline``, ``time.monotonic()``, has passed); then the job's containers and network are
    removed. Returns each host's log and exit code, and the cause of a stop (a host name, or
    ``MaxRuntimeExceeded``)."""
    try:
        network = containers.create_network(client, f"{name}-net", name)
        running = [
            containers.create_training_container(
                client, image, name, host, network, mounts[host], environment
            )
            for host in hosts
        ]
        for c in running:
            c.start()
        followers = []
        if write is not None:
            for host, c in zip(hosts, running):
                prefix = f"{host} | " if len(hosts) > 1 else ""
                followers.append(containers.follow_logs(c, prefix, write))
        codes_by_name, cause = containers.wait_for_exit(running, deadline, stop_grace)
        for thread in followers:
            thread.join(timeout=5)
        logs = {host: containers.container_log(c) for host, c in zip(hosts, running)}
        codes = {host: codes_by_name[c.name] for host, c in zip(hosts, running)}
        if cause and cause != "MaxRuntimeExceeded":
            cause = cause.replace(f"{name}-", "", 1)  # container name -> host name
    finally:
        containers.remove_job(client, name)
    return logs, codes, cause


def _write_job_outputs(
    folder: Path, hosts: list[str], status: str, reason: str | None
) -> Path | None:
    """The job's ``output/`` (the hosts' output data, one success or failure file) and
    ``output.tar.gz``, and ``model.tar.gz`` unless the job failed (returned, else None)."""
    output = folder / "output"
    _merge(hosts, folder, "output/data", output / "data")
    (output / ("success" if status == "Completed" else "failure")).write_text(
        reason or "", encoding="utf-8"
    )
    _tar_folder(output / "data", folder / "output.tar.gz")
    if status == "Failed":
        return None
    # SageMaker uploads model/ when a job completes or is stopped, not when it fails.
    merged = folder / ".model"
    _merge(hosts, folder, "model", merged)
    artefact = _tar_folder(merged, folder / "model.tar.gz")
    shutil.rmtree(merged)
    return artefact


def run_training_job(
    request: Mapping,
    jobs_root: str | Path,
    channels: Mapping[str, str | Path] | None = None,
    write: Callable[[str], None] | None = print,
    stop_grace: int = STOP_GRACE_SECONDS,
) -> JobResult:
    """Run ``request`` (a CreateTrainingJob request) on the local Docker engine; wait for it.

    ``channels`` overrides the local folder of named channels (else ``file://`` S3Uris).
    ``write`` receives the containers' log lines as they come (prefixed ``algo-N | `` when
    there are several hosts); ``None`` keeps quiet. Raises :class:`LocalModeError` if the job
    cannot start; a job that starts and fails returns a result with status ``Failed``.
    """
    name = request["TrainingJobName"]
    image = request["AlgorithmSpecification"]["TrainingImage"]
    folder = Path(jobs_root).resolve() / name
    if folder.exists():
        raise LocalModeError(f"{folder} already exists: job names are unique, pick another")
    client = containers.connect()
    containers.require_image(client, image)
    sources = jobtree.channel_sources(request, channels)
    hosts = jobtree.request_hosts(request)
    mounts = {host: _mounts(request, folder / host) for host in hosts}
    for host in hosts:
        jobtree.write_host_tree(folder / host, request, host, sources)
    (folder / "request.json").write_text(json.dumps(request, indent=2) + "\n", encoding="utf-8")
    environment = jobtree.container_environment(request, name)
    max_runtime = int(request.get("StoppingCondition", {}).get("MaxRuntimeInSeconds", 86400))

    started = time.monotonic()
    logs, codes, cause = _run_containers(
        client, name, image, hosts, mounts, environment, write, started + max_runtime, stop_grace
    )
    seconds = round(time.monotonic() - started, 1)

    logs_dir = folder / "logs"
    logs_dir.mkdir()
    for host, text in logs.items():
        (logs_dir / f"{host}.log").write_text(text, encoding="utf-8")

    failed = any(code != 0 for code in codes.values()) or any(
        (folder / h / "output" / "failure").is_file() for h in hosts
    )
    status = "Stopped" if cause == "MaxRuntimeExceeded" else ("Failed" if failed else "Completed")
    reason = _failure_reason(folder, hosts, codes, cause) if status != "Completed" else None

    artefact = _write_job_outputs(folder, hosts, status, reason)
    result = JobResult(
        name, folder, status, reason, codes, seconds, artefact, logs, final_metrics(logs[hosts[0]])
    )
    (folder / "job.json").write_text(
        json.dumps(result.describe(), indent=2) + "\n", encoding="utf-8"
    )
    return result


def status_lines(result: JobResult) -> list[str]:
    """A short human report of a finished job: status, metrics, artefact or failure."""
    lines = [
        f"job {result.name}: {result.status} in {result.seconds} s (exit codes {result.exit_codes})"
    ]
    for metric, value in result.final_metrics.items():
        lines.append(f"  {metric} = {value}")
    if result.model_artefact:
        lines.append(f"model artefact: {result.model_artefact}")
    if result.failure_reason:
        lines.append("failure reason (output/failure):")
        lines.extend("  " + line for line in result.failure_reason.rstrip().splitlines())
    lines.append(f"job folder: {result.folder}")
    return lines
