"""The serve image on a local model artefact, and an HTTP predictor that talks to it.

``start_server`` unpacks a ``model.tar.gz`` (as SageMaker unpacks it into ``/opt/ml/model``),
starts ``IMAGE serve`` with that folder mounted read-only and port 8080 published on
127.0.0.1, and waits until ``GET /ping`` answers 200. ``ContainerPredictor`` sends images to
``POST /invocations`` and plugs into :mod:`flystage.predictor`'s folder loop,
:mod:`flystage.outputs` and :mod:`flystage.rename`.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from flystage.predictor import Prediction, Source
from flystage.serving.client import AnswerError, content_type, parse_answer, predict_each
from flystage.serving.container import ContainerError, ServeContainer
from flystage_local import LocalModeError, containers

SERVER_NAME = "flystage-local-serve"
DEFAULT_PORT = 8080
# SageMaker gives a container 4 minutes to answer /ping; locally a healthy start takes seconds.
DEFAULT_START_TIMEOUT = 120.0
# SageMaker's invocation timeout (seconds).
INVOKE_TIMEOUT = 60.0


def unpack_model(archive: str | Path, models_root: str | Path) -> Path:
    """Unpack ``archive`` into ``models_root/<sha256 prefix>/`` (reused if already there)."""
    archive = Path(archive).expanduser().resolve()
    if not archive.is_file():
        raise LocalModeError(
            f"{archive}: model artefact not found; train one with `make local-train`"
        )
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    target = Path(models_root).resolve() / digest
    # The marker sits beside the folder: the folder itself is exactly what the server sees.
    done = target.with_name(f"{digest}.from")
    if done.is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)  # a half unpack from an interrupted run
    target.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # filter="data": no absolute paths, links out of the folder or device files.
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise LocalModeError(
            f"{archive}: not a readable model.tar.gz ({exc}); train again or give another MODEL"
        ) from None
    done.write_text(str(archive) + "\n", encoding="utf-8")
    return target


def server_url(port: int = DEFAULT_PORT) -> str:
    return f"http://127.0.0.1:{port}"


def start_server(
    model: str | Path,
    image: str,
    models_root: str | Path,
    port: int = DEFAULT_PORT,
    timeout: float = DEFAULT_START_TIMEOUT,
    environment: dict[str, str] | None = None,
    name: str = SERVER_NAME,
) -> tuple[str, float]:
    """Start the serve image on ``model`` (a model.tar.gz or an unpacked model folder).

    Returns the server's URL and the seconds from ``docker run`` to healthy. A container that
    does not become healthy is removed, and its log is in the error.
    """
    model = Path(model)
    model_dir = model if model.is_dir() else unpack_model(model, models_root)
    client = containers.connect()
    containers.require_image(client, image)
    if containers.find_container(client, name):
        raise LocalModeError(
            f"a local server ({name}) already exists; `make local-stop` removes it"
        )
    started = time.monotonic()
    container = containers.start_server(client, image, name, model_dir, port, environment or {})
    # The serve image's own waiter: /ping until 200, or the container's log if it exits.
    server = ServeContainer(container, started, server_url(port))
    try:
        seconds = server.wait_healthy(timeout)
    except ContainerError as exc:
        container.remove(force=True)
        raise LocalModeError(
            f"the serve container on {model_dir} did not become healthy: {exc}"
        ) from None
    return server.url, seconds


class ContainerPredictor:
    """A ``flystage.predictor.SourcePredictor`` over HTTP: one ``POST /invocations`` per image."""

    def __init__(self, url: str = server_url(), timeout: float = INVOKE_TIMEOUT):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()

    def check(self) -> None:
        """Raise LocalModeError unless the server answers /ping with 200."""
        try:
            response = self.session.get(f"{self.url}/ping", timeout=5)
        except requests.RequestException as exc:
            raise LocalModeError(
                f"no server at {self.url} ({exc.__class__.__name__}); "
                "start one with `make local-serve`"
            ) from None
        if response.status_code != 200:
            raise LocalModeError(
                f"the server at {self.url} is not healthy (/ping {response.status_code}): "
                f"{response.text[:500]}"
            )

    def send(self, body: bytes, k: int) -> list[tuple[str, float]]:
        """Top-k for one image's bytes; ValueError with the server's message on a 4xx."""
        try:
            response = self.session.post(
                f"{self.url}/invocations",
                data=body,
                headers={
                    "Content-Type": content_type(body),
                    "Accept": "application/json",
                    "X-Amzn-SageMaker-Custom-Attributes": f"k={k}",
                },
                timeout=self.timeout,
            )
            if response.status_code != 200:
                try:
                    parse_answer(
                        response.content
                    )  # flystage's JSON error: ValueError with its message
                except AnswerError:
                    pass
                # Not flystage's JSON (the model server's own 413 for a huge body, a proxy's page).
                raise ValueError(
                    f"HTTP {response.status_code}: {response.text.strip()[:500] or response.reason}"
                )
            return parse_answer(response.content)
        except requests.RequestException as exc:
            raise LocalModeError(f"lost the server at {self.url}: {exc}") from None
        except AnswerError as exc:
            raise LocalModeError(f"{self.url}: HTTP {response.status_code}: {exc}") from None

    def predict_sources(
        self, sources: Sequence[Source], k: int = 3, names: Sequence[str] | None = None
    ) -> list[Prediction]:
        return predict_each(sources, self.send, k, names)
