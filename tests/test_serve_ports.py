"""What SageMaker asks of the serve container besides /ping and /invocations, on the real image.

``SAGEMAKER_SAFE_PORT_RANGE``: with the variable set (as SageMaker sets it for multi-container
endpoints), the model server's management API and the model watch use a port in the range,
nothing listens on 8081, and the container serves as usual. ``GET /execution-parameters``: what
a batch transform job that was not told how many requests to send asks the container."""

from __future__ import annotations

import os

import pytest

docker = pytest.importorskip("docker")
requests = pytest.importorskip("requests")

from artefact_helpers import make_artefact  # noqa: E402
from flystage.serving.container import start_serve_container  # noqa: E402
from serving_helpers import image_body  # noqa: E402

SERVE_IMAGE = os.environ.get("SERVE_IMAGE", "flystage-serve:latest")
pytestmark = [pytest.mark.docker]

# Ports in LISTEN state (0A) from the kernel's tables: the serve image has no ss or netstat.
LISTENING = (
    "import sys\n"
    "ports = set()\n"
    "for table in ('/proc/net/tcp', '/proc/net/tcp6'):\n"
    "    for line in open(table).read().splitlines()[1:]:\n"
    "        fields = line.split()\n"
    "        if fields[3] == '0A':\n"
    "            ports.add(int(fields[1].rsplit(':', 1)[1], 16))\n"
    "print(' '.join(map(str, sorted(ports))))\n"
)


@pytest.fixture
def model_dir(tmp_path):
    try:
        docker.from_env().images.get(SERVE_IMAGE)
    except docker.errors.DockerException:
        pytest.fail(f"{SERVE_IMAGE} not built: run `make images` first")
    make_artefact(tmp_path / "model")
    return tmp_path / "model"


def invoke(server) -> None:
    answer = requests.post(
        f"{server.url}/invocations",
        data=image_body(".png", 0),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert answer.status_code == 200 and answer.json()["predictions"][0]["top"], answer.text


def test_management_api_and_model_watch_use_the_safe_port_range(model_dir):
    environment = {
        "SAGEMAKER_SAFE_PORT_RANGE": "10000-10999",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",
    }
    with start_serve_container(model_dir, SERVE_IMAGE, environment=environment) as server:
        server.wait_healthy(timeout=180)
        invoke(server)
        listing = server.container.exec_run(["python", "-c", LISTENING])
        ports = {int(p) for p in listing.output.decode().split()}
        assert 8080 in ports and 8081 not in ports, ports
        assert ports - {8080} == {10000}, ports
        assert "management API on http://127.0.0.1:10000" in server.logs()
        # The model watch asks the same address: a model unregistered there ends the container.
        unregister = (
            "import urllib.request as u; u.urlopen(u.Request("
            "'http://127.0.0.1:10000/models/model', method='DELETE'), timeout=30)"
        )
        result = server.container.exec_run(["python", "-c", unregister])
        assert result.exit_code == 0, result.output.decode("utf-8", "replace")[-2000:]
        assert server.wait_exit(timeout=30) == 3, server.logs(30)


def test_execution_parameters_for_batch_transform(model_dir):
    """One request per worker, the body limit the container enforces, one image per request;
    their product within SageMaker's 100 MB (so 2 x 80 MB becomes 2 x 50 MB)."""
    environment = {"SAGEMAKER_MODEL_SERVER_WORKERS": "2", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "80"}
    with start_serve_container(model_dir, SERVE_IMAGE, environment=environment) as server:
        server.wait_healthy(timeout=180)
        answer = requests.get(f"{server.url}/execution-parameters", timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.json() == {
            "MaxConcurrentTransforms": 2,
            "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": 50,
        }
        invoke(server)
