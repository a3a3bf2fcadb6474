"""Local stand-ins for AWS in the cloud tests: moto in server mode (a real HTTP API on
loopback) and Debian's docker-registry standing in for ECR.

Fake credentials are set only in the test's environment (monkeypatch), never on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from flystage.cloud.session import Api
from flystage.cloud.settings import Settings

REGION = "eu-west-1"
# moto's fixed account id; a placeholder, not a real account.
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/flystage-test"
BUCKET = "flystage-test"

# A Docker v2 schema 2 manifest (the only kind SageMaker runs) and its digest, as ECR names it.
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "digest": "sha256:" + "0" * 64,
            "size": 1,
            "mediaType": "application/vnd.docker.container.image.v1+json",
        },
        "layers": [],
    }
)
DIGEST = "sha256:" + hashlib.sha256(MANIFEST.encode()).hexdigest()
# Jobs name the pushed images by digest.
TRAIN_URI = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/flystage-train@{DIGEST}"
SERVE_URI = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/flystage-serve@{DIGEST}"


def put_images(
    api, manifest: str = MANIFEST, tag: str = "img-000000000000", media_type: str = ""
) -> None:
    """Both repositories in moto's ECR with ``manifest`` under ``tag``, recorded in the state
    file as `make push` leaves them."""
    from flystage.cloud.ecr import record_push

    digest = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    media = {"imageManifestMediaType": media_type} if media_type else {}
    for repo in ("flystage-train", "flystage-serve"):
        api.call("ecr", "create_repository", repositoryName=repo)
        api.call(
            "ecr",
            "put_image",
            repositoryName=repo,
            imageManifest=manifest,
            imageTag=tag,
            imageDigest=digest,
            **media,
        )
        record_push(api.settings, f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/{repo}", tag, digest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    """Until ``url`` answers at all (any HTTP status)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="session")
def moto_url():
    """A moto server on 127.0.0.1:<free port> for the whole session."""
    from moto.server import ThreadedMotoServer

    # One log line per request would bury the test output.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/")
    yield url
    server.stop()


def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials moto accepts, in this test's environment only; no config files read."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def aws(moto_url, monkeypatch, tmp_path) -> tuple[Api, Settings]:
    """(Api, Settings) against a freshly reset moto, with the bucket created."""
    fake_credentials(monkeypatch)
    urllib.request.urlopen(
        urllib.request.Request(moto_url + "/moto-api/reset", method="POST"), timeout=10
    )
    settings = Settings(
        region=REGION,
        role_arn=ROLE,
        bucket=BUCKET,
        endpoint_url=moto_url,
        state_file=str(tmp_path / "state.json"),
        poll_s=1,
    )
    api = Api(settings)
    api.call(
        "s3",
        "create_bucket",
        Bucket=BUCKET,
        CreateBucketConfiguration={"LocationConstraint": REGION},
    )
    return api, settings


# ---- a local registry standing in for ECR ---------------------------------------------------

REGISTRY_CONFIG = """version: 0.1
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: false
  maintenance:
    readonly:
      enabled: {readonly}
http:
  addr: 127.0.0.1:{port}
"""


def docker_client():
    """The Docker engine, or a test failure saying how to start it."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as err:
        pytest.fail(
            f"Docker engine not reachable ({err}): "
            "start it with `dockerd >/var/log/dockerd.log 2>&1 &`"
        )
    return client


@pytest.fixture
def start_registry(tmp_path):
    """Start ``docker-registry serve`` on 127.0.0.1:<free port>: ``start(readonly=False)``
    returns ``127.0.0.1:<port>``; a read-only registry refuses every push."""
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    if not Path(binary).exists():
        pytest.fail(
            "docker-registry not installed: apt-get install docker-registry (the CI installs it)"
        )
    procs = []

    def start(readonly: bool = False) -> str:
        port = free_port()
        config = tmp_path / f"registry-{port}.yml"
        config.write_text(
            REGISTRY_CONFIG.format(
                root=tmp_path / f"registry-{port}", port=port, readonly=str(readonly).lower()
            )
        )
        log = open(tmp_path / f"registry-{port}.log", "wb")
        procs.append(
            (
                subprocess.Popen(
                    [binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
        wait_http(f"http://127.0.0.1:{port}/v2/")
        return f"127.0.0.1:{port}"

    yield start
    for proc, log in procs:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def tiny_image(client, tag: str, tmp_path: Path):
    """A one-file image made with ``docker import`` (no registry pull), tagged ``tag``."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = f"flystage push test {tag} {time.time()}\n".encode()
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    repository, _, version = tag.partition(":")
    client.api.import_image_from_data(
        buf.getvalue(), repository=repository, tag=version or "latest"
    )
    return client.images.get(tag)


# ---- the SageMaker runtime in front of a real serve container --------------------------------


class RuntimeProxy:
    """A loopback stand-in for the SageMaker runtime API in front of a serve container.

    ``POST /endpoints/<name>/invocations`` goes to the container's ``POST /invocations`` with
    the headers SageMaker passes on (Content-Type, Accept, custom attributes); a container
    error comes back as SageMaker's ``ModelError`` (HTTP 424 with the original status and
    message), an unknown endpoint as a ``ValidationError``, as the real service does.
    """

    def __init__(self, container_url: str, endpoint_name: str) -> None:
        import http.server
        import json
        import threading
        import urllib.error

        proxy = self
        self.requests: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def error(self, status: int, kind: str, fields: dict) -> None:
                self.answer(
                    status,
                    json.dumps(fields).encode(),
                    {"Content-Type": "application/json", "x-amzn-ErrorType": kind},
                )

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "size": len(body)}
                )
                if self.path != f"/endpoints/{endpoint_name}/invocations":
                    return self.error(
                        400,
                        "ValidationError",
                        {"message": f"Endpoint {self.path.split('/')[2]} not found."},
                    )
                passed = {
                    k: self.headers[k]
                    for k in ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes")
                    if k in self.headers
                }
                request = urllib.request.Request(
                    container_url + "/invocations", data=body, headers=passed, method="POST"
                )
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        self.answer(
                            200,
                            response.read(),
                            {
                                "Content-Type": response.headers.get("Content-Type", ""),
                                "x-Amzn-Invoked-Production-Variant": "AllTraffic",
                            },
                        )
                except urllib.error.HTTPError as err:
                    text = err.read().decode(errors="replace")
                    self.error(
                        424,
                        "ModelError",
                        {
                            "ErrorCode": "CLIENT_ERROR_FROM_MODEL"
                            if err.code < 500
                            else "SERVER_ERROR_FROM_MODEL",
                            "Message": (
                                f"Received client error ({err.code}) from primary "
                                f'with message "{text}".'
                            ),
                            "OriginalStatusCode": err.code,
                            "OriginalMessage": text,
                        },
                    )

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def foreign_image(client, tag: str, architecture: str = "arm64", os_name: str = "linux"):
    """A one-file image whose config says ``os_name``/``architecture``, loaded with
    ``docker load`` from a hand-made ``docker save`` tarball (no pull, no emulation): what an
    arm64 laptop's ``docker build`` leaves in its engine."""
    import hashlib
    import io
    import tarfile

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        add(
            tar,
            "hello.txt",
            f"flystage foreign image {tag} {architecture} {time.time()}\n".encode(),
        )
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": architecture,
            "os": os_name,
            **({"variant": "v8"} if architecture == "arm64" else {}),
            "created": "2024-01-01T00:00:00Z",
            "config": {"Cmd": ["/hello.txt"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": "flystage test: hand-made layer"}
            ],
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_dir = hashlib.sha256(layer_bytes).hexdigest()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        add(tar, f"{layer_dir}/layer.tar", layer_bytes)
        add(tar, f"{layer_dir}/VERSION", b"1.0")
        add(tar, config_name, config)
        add(
            tar,
            "manifest.json",
            json.dumps(
                [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{layer_dir}/layer.tar"]}]
            ).encode(),
        )
    client.images.load(archive.getvalue())
    return client.images.get(tag)
