"""Start a serve container on a model folder, wait until it is healthy, stop it (tests, benchmarks).

Uses the docker SDK (``pip install docker``; not in the serve image). The model folder is
mounted read-only at ``/opt/ml/model``, as SageMaker unpacks ``model.tar.gz`` there, and port
8080 is published on 127.0.0.1 only (a free port unless one is given).

    with start_serve_container("flystage-serve:latest", "model/") as server:
        seconds = server.wait_healthy()
        requests.post(server.url + "/invocations", data=tiff,
                      headers={"Content-Type": "image/tiff"})
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flystage.errors import FlystageError

SERVE_IMAGE = "flystage-serve:latest"
CONTAINER_PORT = "8080/tcp"


class ContainerError(FlystageError, RuntimeError):
    """A serve container that exited or did not become healthy; the message carries its log."""


@dataclass
class ServeContainer:
    container: Any  # docker.models.containers.Container
    started: float  # time.monotonic() just before `docker run`
    url: str = ""
    healthy_after: float | None = field(default=None)

    def logs(self, tail: int | str = "all") -> str:
        return self.container.logs(tail=tail).decode("utf-8", "replace")

    def status(self) -> str:
        self.container.reload()
        return self.container.status

    def exit_code(self) -> int | None:
        self.container.reload()
        return (
            self.container.attrs["State"]["ExitCode"]
            if self.container.status in ("exited", "dead")
            else None
        )

    def ping(self, timeout: float = 2.0) -> int | None:
        """``GET /ping``'s status, or None when nothing answers."""
        import requests

        try:
            return requests.get(f"{self.url}/ping", timeout=timeout).status_code
        except requests.RequestException:
            return None

    def wait_healthy(self, timeout: float = 120.0, interval: float = 0.1) -> float:
        """Seconds from ``docker run`` to the first ``/ping`` 200; ContainerError if it exits or
        times out."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.ping() == 200:
                self.healthy_after = time.monotonic() - self.started
                return self.healthy_after
            if self.status() in ("exited", "dead"):
                raise ContainerError(
                    f"the serve container exited with status {self.exit_code()} before it was "
                    f"healthy; its log:\n{self.logs(200)}"
                )
            time.sleep(interval)
        raise ContainerError(
            f"the serve container was not healthy within {timeout:.0f} s; its "
            f"log:\n{self.logs(200)}"
        )

    def wait_exit(self, timeout: float = 60.0) -> int | None:
        """The exit status once the container has stopped by itself, or None after ``timeout``."""
        try:
            return int(self.container.wait(timeout=timeout)["StatusCode"])
        except Exception:  # noqa: BLE001 - the SDK raises a requests timeout of its own kind
            return None

    def stop(self, timeout: int = 30) -> tuple[float, int | None]:
        """``docker stop`` (SIGTERM, SIGKILL after ``timeout`` s): the seconds it took and the exit
        status."""
        start = time.monotonic()
        self.container.stop(timeout=timeout)
        seconds = time.monotonic() - start
        return seconds, self.exit_code()

    def remove(self) -> None:
        self.container.remove(force=True)

    def __enter__(self) -> ServeContainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def start_serve_container(
    model_dir: str | Path | None,
    image: str = SERVE_IMAGE,
    *,
    environment: Mapping[str, str] | None = None,
    port: int | None = None,
    name: str | None = None,
    command: Sequence[str] = ("serve",),
    client: Any = None,
) -> ServeContainer:
    """Run ``image`` with ``model_dir`` (None: no model) at /opt/ml/model, port 8080 on
    127.0.0.1."""
    import docker

    client = client or docker.from_env()
    volumes = {}
    if model_dir is not None:
        volumes[str(Path(model_dir).resolve())] = {"bind": "/opt/ml/model", "mode": "ro"}
    started = time.monotonic()
    container = client.containers.run(
        image,
        list(command),
        detach=True,
        name=name,
        environment=dict(environment or {}),
        volumes=volumes,
        ports={CONTAINER_PORT: ("127.0.0.1", port)},
        labels={"flystage.role": "serve-test"},
    )
    server = ServeContainer(container, started)
    container.reload()
    bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(CONTAINER_PORT) or []
    if bindings:
        server.url = f"http://127.0.0.1:{bindings[0]['HostPort']}"
    return server
