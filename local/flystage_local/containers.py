"""Every Docker SDK call local mode makes: networks, containers, their logs, and clean-up.

Everything created here carries the label ``flystage.local=1`` (plus the job or server it
belongs to), so ``remove_everything`` can find and remove it again whatever happened to the
process that made it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network

from flystage.cloud.ecr import docker_engine
from flystage_local import LocalModeError

LABEL = "flystage.local"
LABEL_JOB = "flystage.local.job"
LABEL_ROLE = "flystage.local.role"


def connect() -> docker.DockerClient:
    """A client of the local Docker engine (DOCKER_HOST etc. as the docker CLI reads them)."""
    return docker_engine(
        lambda exc: LocalModeError(
            f"cannot reach the Docker engine ({exc}); "
            "start it (e.g. `dockerd >/var/log/dockerd.log 2>&1 &`) "
            "and check `docker info`"
        )
    )


def require_image(client: docker.DockerClient, image: str) -> None:
    """Fail early, with what to do, when ``image`` has not been built."""
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise LocalModeError(f"image {image} not found; build it with `make images`") from None


def _labels(job: str, role: str) -> dict[str, str]:
    return {LABEL: "1", LABEL_JOB: job, LABEL_ROLE: role}


def create_network(client: docker.DockerClient, name: str, job: str) -> Network:
    """A user-defined bridge network: containers on it find each other by name and alias."""
    try:
        return client.networks.create(name, driver="bridge", labels=_labels(job, "network"))
    except docker.errors.APIError as exc:
        raise LocalModeError(
            f"cannot create Docker network {name}: {exc.explanation or exc}"
        ) from None


def create_training_container(
    client: docker.DockerClient,
    image: str,
    job: str,
    host: str,
    network: Network,
    mounts: Mapping[Path, str],
    environment: Mapping[str, str],
) -> Container:
    """A created (not started) ``IMAGE train`` container that answers to ``host`` on ``network``.

    ``mounts`` maps host folders to container paths (read-write, as SageMaker's are).
    """
    endpoint = client.api.create_endpoint_config(aliases=[host])
    try:
        return client.containers.create(
            image,
            command="train",
            name=f"{job}-{host}",
            hostname=host,
            network=network.name,
            networking_config={network.name: endpoint},
            volumes={
                str(Path(src).resolve()): {"bind": dst, "mode": "rw"} for src, dst in mounts.items()
            },
            environment=dict(environment),
            labels=_labels(job, "train"),
        )
    except docker.errors.APIError as exc:
        raise LocalModeError(
            f"cannot create the container of {host} for job {job}: {exc.explanation or exc}"
        ) from None


def follow_logs(
    container: Container, prefix: str, write: Callable[[str], None]
) -> threading.Thread:
    """Print the container's log lines, prefixed, while it runs (a daemon thread)."""

    def pump() -> None:
        buffer = b""
        for chunk in container.logs(stream=True, follow=True):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                write(f"{prefix}{line.decode('utf-8', 'replace')}")
        if buffer:
            write(f"{prefix}{buffer.decode('utf-8', 'replace')}")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def wait_for_exit(
    containers: list[Container], deadline: float, stop_grace: int, poll: float = 1.0
) -> tuple[dict[str, int | None], str | None]:
    """Wait until every container has exited, as SageMaker waits for every host.

    Stops the rest when one host fails (a data-parallel peer would otherwise wait for it
    forever) or when ``deadline`` (``time.monotonic()``) passes: SIGTERM, then SIGKILL after
    ``stop_grace`` seconds. Returns container name -> exit code, and why containers were
    stopped (``None`` if nobody was).
    """
    stopped_because = None
    while True:
        codes: dict[str, int | None] = {}
        finished: dict[str, str] = {}
        for c in containers:
            c.reload()
            codes[c.name] = c.attrs["State"]["ExitCode"] if c.status in ("exited", "dead") else None
            finished[c.name] = _sortable_time(c.attrs["State"]["FinishedAt"])
        running = [c for c in containers if codes[c.name] is None]
        # The first host to fail is the cause; the others fail because it went away.
        failed = sorted(
            (name for name, code in codes.items() if code not in (None, 0)), key=finished.get
        )
        if not running:
            if failed and stopped_because != "MaxRuntimeExceeded":
                # Decided again at the end: a killed host can still look "running" for a moment
                # while its peer has already failed for want of it.
                stopped_because = f"{failed[0]} failed"
            return codes, stopped_because
        if stopped_because is None and (failed or time.monotonic() > deadline):
            stopped_because = f"{failed[0]} failed" if failed else "MaxRuntimeExceeded"
            for c in running:
                c.stop(timeout=stop_grace)
        time.sleep(poll)


def _sortable_time(rfc3339: str) -> str:
    """Docker's FinishedAt (RFC 3339, UTC, trailing zeros of the fraction dropped), padded to
    nanoseconds so that it sorts as text."""
    whole, _, fraction = rfc3339.rstrip("Z").partition(".")
    return f"{whole}.{fraction:0<9}"


def container_log(container: Container) -> str:
    """The container's whole log, stdout and stderr interleaved as the job log is."""
    return container.logs(stdout=True, stderr=True).decode("utf-8", "replace")


def remove_job(client: docker.DockerClient, job: str) -> None:
    """Remove a job's containers and network (found by label), running or not."""
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job}"}):
        c.remove(force=True)
    for n in client.networks.list(filters={"label": f"{LABEL_JOB}={job}"}):
        n.remove()


def start_server(
    client: docker.DockerClient,
    image: str,
    name: str,
    model_dir: Path,
    port: int,
    environment: Mapping[str, str],
) -> Container:
    """Start ``IMAGE serve`` with ``model_dir`` at /opt/ml/model and port 8080 on
    127.0.0.1:``port``."""
    try:
        return client.containers.run(
            image,
            command="serve",
            name=name,
            detach=True,
            ports={"8080/tcp": ("127.0.0.1", port)},
            volumes={str(Path(model_dir).resolve()): {"bind": "/opt/ml/model", "mode": "ro"}},
            environment=dict(environment),
            labels=_labels(name, "serve"),
        )
    except docker.errors.APIError as exc:
        raise LocalModeError(
            f"cannot start {image} as {name} on 127.0.0.1:{port}: {exc.explanation or exc} "
            "(is a server already running? `make local-stop` removes it)"
        ) from None


def find_container(client: docker.DockerClient, name: str) -> Container | None:
    """The local-mode container called ``name``, or None."""
    found = client.containers.list(all=True, filters={"label": LABEL, "name": f"^{name}$"})
    return found[0] if found else None


def remove_everything(client: docker.DockerClient) -> tuple[list[str], list[str]]:
    """Remove every container and network local mode made; returns their names."""
    containers = client.containers.list(all=True, filters={"label": LABEL})
    for c in containers:
        c.remove(force=True)
    networks = client.networks.list(filters={"label": LABEL})
    for n in networks:
        n.remove()
    return [c.name for c in containers], [n.name for n in networks]


def labelled(client: docker.DockerClient) -> tuple[list[str], list[str]]:
    """Names of the containers and networks local mode made that still exist."""
    containers = client.containers.list(all=True, filters={"label": LABEL})
    networks = client.networks.list(filters={"label": LABEL})
    return [c.name for c in containers], [n.name for n in networks]
