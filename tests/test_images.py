"""The real train and serve images in real containers (Docker engine needed; `make images` builds
them, and this module builds any that is missing through docker/build-offline.sh).

The serve container runs a model trained here with flystage.training.loop.fit: good requests of
every content type, every kind of bad request each followed by a good one, honest health on a
missing or broken model, SIGTERM. The train container gets SIGTERM mid-job. No image may carry
credentials.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

docker = pytest.importorskip("docker")
requests = pytest.importorskip("requests")

from flystage.predictor import Predictor  # noqa: E402
from flystage.serving.container import ContainerError, start_serve_container  # noqa: E402
from serving_helpers import (  # noqa: E402
    IMAGE_TYPES,
    bdgp_records,
    healthy_serve_container,
    image_body,
    lab_image,
    tiff_bytes,
    train_artefact,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGE = os.environ.get("TRAIN_IMAGE", "flystage-train:latest")
SERVE_IMAGE = os.environ.get("SERVE_IMAGE", "flystage-serve:latest")
# SageMaker answers within 60 s; a request here takes milliseconds.
TIMEOUT = 60


@pytest.fixture(scope="module")
def client():
    try:
        engine = docker.from_env()
        engine.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no engine
        pytest.fail(f"no Docker engine ({exc}); start dockerd (see .ci/run)")
    return engine


@pytest.fixture(scope="module")
def images(client):
    """Both images; the missing ones are built the documented offline way (cached steps are
    skipped)."""
    missing = [
        name
        for name, tag in (("train", TRAIN_IMAGE), ("serve", SERVE_IMAGE))
        if not _exists(client, tag)
    ]
    if missing:
        env = {
            **os.environ,
            "BUILD_IMAGES": " ".join(missing),
            "TRAIN_IMAGE": TRAIN_IMAGE,
            "SERVE_IMAGE": SERVE_IMAGE,
            "HOST_PYTHON": sys.executable,
        }
        subprocess.run(
            [str(REPO / "docker" / "build-offline.sh"), "all"], check=True, env=env, timeout=3600
        )
    return {"train": TRAIN_IMAGE, "serve": SERVE_IMAGE}


def _exists(client, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bdgp_root) -> Path:
    folder = tmp_path_factory.mktemp("model")
    train_artefact(folder, bdgp_root)
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def server(images, model_dir):
    with healthy_serve_container(model_dir, images["serve"]) as container:
        yield container


def post(
    server, body: bytes, content_type: str | None, headers: dict | None = None
) -> requests.Response:
    all_headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
    return requests.post(
        f"{server.url}/invocations", data=body, headers=all_headers, timeout=TIMEOUT
    )


def good_request(server) -> None:
    response = post(server, tiff_bytes(lab_image(seed=2)), "image/tiff")
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["top"]) == 3


# ---- serving -----------------------------------------------------------------------------------


def test_ping(server):
    assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200


def test_the_management_api_is_not_on_the_inference_port(server):
    """Unregistering the model, listing models or making the server fetch a URL: none of it
    reaches the model server's management API through port 8080."""
    attempts = [
        requests.delete(f"{server.url}/models/model", timeout=TIMEOUT),
        requests.get(f"{server.url}/models", timeout=TIMEOUT),
        requests.post(
            f"{server.url}/models", params={"url": "http://127.0.0.1:9/x.mar"}, timeout=TIMEOUT
        ),
        requests.put(f"{server.url}/models/model", params={"min_worker": "0"}, timeout=TIMEOUT),
    ]
    assert all(r.status_code >= 400 for r in attempts), [
        (r.status_code, r.text[:200]) for r in attempts
    ]
    assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200
    good_request(server)  # the model is still registered and answering


@pytest.mark.parametrize(
    "ext, content_type",
    [*IMAGE_TYPES, (".png", "application/x-image"), (".tif", "application/octet-stream")],
)
def test_raw_image_gets_the_same_top3_as_the_predictor(server, model_dir, ext, content_type):
    body = image_body(ext, seed=5)
    response = post(server, body, content_type)
    assert response.status_code == 200, response.text
    answer = response.json()
    expected = Predictor(model_dir, threads=1).predict_sources([body], k=3)[0]
    got = answer["predictions"][0]["top"]
    assert [t["stage"] for t in got] == [s for s, _ in expected.top]
    assert [t["probability"] for t in got] == pytest.approx([p for _, p in expected.top], abs=1e-5)
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert (
        answer["model"]["labels"] == meta["labels"]
        and answer["model"]["created"] == meta["created"]
    )
    assert answer["timing_ms"]["total"] > 0


@pytest.mark.parametrize("precision", [None, "float"])
def test_the_serve_image_runs_the_int8_graph_unless_told_float(
    images, int8_model, tmp_path, precision
):
    model = shutil.copytree(int8_model, tmp_path / "model")
    model.chmod(0o755)
    body = image_body(".tif", seed=5)
    environment = {"FLYSTAGE_PRECISION": precision} if precision else {}
    with healthy_serve_container(model, images["serve"], environment) as server:
        response = post(server, body, "image/tiff")
    assert response.status_code == 200, response.text
    answer = response.json()
    runs = precision or "int8"
    assert answer["model"]["precision"] == runs
    expected = Predictor(model, threads=1, precision=runs).predict_sources([body], k=3)[0]
    got = answer["predictions"][0]["top"]
    assert [t["stage"] for t in got] == [s for s, _ in expected.top]
    # The image's libraries are its own builds, not the host's (the thread count makes no
    # difference): a float graph answers within 1e-3, an int8 graph's 8-bit steps turn the same
    # tiny input differences into a few thousandths.
    assert [t["probability"] for t in got] == pytest.approx([p for _, p in expected.top], abs=0.01)


def test_json_single_batch_and_k(server):
    one = base64.b64encode(tiff_bytes(lab_image(seed=1))).decode()
    response = post(server, json.dumps({"image": one, "k": 6}).encode(), "application/json")
    assert response.status_code == 200, response.text
    top = response.json()["predictions"][0]["top"]
    assert len(top) == 6 and sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)
    response = post(
        server, json.dumps({"instances": [one, {"image": one}, one]}).encode(), "application/json"
    )
    assert response.status_code == 200, response.text
    assert [p["file"] for p in response.json()["predictions"]] == [
        "instances[0]",
        "instances[1]",
        "instances[2]",
    ]
    response = post(server, json.dumps([one, one]).encode(), "application/json")
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


def test_k_by_custom_attributes_header(server):
    response = post(
        server, tiff_bytes(lab_image()), "image/tiff", {"X-Amzn-SageMaker-Custom-Attributes": "k=2"}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["top"]) == 2


def _truncated_tiff() -> bytes:
    whole = tiff_bytes(lab_image())
    return whole[: len(whole) // 2]


def _float64_bomb() -> bytes:
    import io

    import numpy as np
    import tifffile

    # 5000 x 5000 float64 RGB: inside the pixel limit, 572 MiB decoded, 0.6 MB as zlib TIFF.
    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer, np.zeros((5000, 5000, 3), np.float64), photometric="rgb", compression="zlib"
    )
    return buffer.getvalue()


def _huge_png() -> bytes:
    from hostile_corpus import png_of

    # 10001 x 10000: over the 100 MP default, in a 100 KB file: a decompression bomb.
    return png_of(10_001, 10_000)


BAD_REQUESTS = {
    "empty body": (lambda: b"", "image/tiff", 400, "empty"),
    "not an image": (
        lambda: b"%PDF-1.4 not an image at all",
        "image/png",
        400,
        "cannot read it as an image",
    ),
    "truncated tiff": (_truncated_tiff, "image/tiff", 400, "request body"),
    "corrupt tiff": (lambda: b"II*\x00" + os.urandom(4000), "image/tiff", 400, "request body"),
    "unsupported content type": (lambda: b"a,b\n1,2\n", "text/csv", 415, "not supported"),
    "no content type": (lambda: tiff_bytes(lab_image()), None, 415, "not supported"),
    "too many pixels": (_huge_png, "image/png", 400, "more than the limit"),
    "wrong json": (lambda: b'{"image": ', "application/json", 400, "cannot be parsed"),
    "deeply nested json": (
        lambda: b"[" * 100_000 + b"]" * 100_000,
        "application/json",
        400,
        "nested too deeply",
    ),
    "json without image": (lambda: b'{"img": "x"}', "application/json", 400, 'no "image"'),
    "bad base64": (lambda: b'{"image": "%%%"}', "application/json", 400, "base64"),
    "k out of range": (
        lambda: json.dumps(
            {"image": base64.b64encode(tiff_bytes(lab_image())).decode(), "k": 9}
        ).encode(),
        "application/json",
        400,
        "out of range",
    ),
    "batch too large": (
        lambda: json.dumps(["YQ=="] * 17).encode(),
        "application/json",
        413,
        "at most 16",
    ),
    "payload over the limit": (
        lambda: b"II*\x00" + b"\x00" * (7 * 1024 * 1024),
        "image/tiff",
        413,
        "SAGEMAKER_MAX_PAYLOAD_IN_MB",
    ),
    "zlib bomb under the pixel limit": (_float64_bomb, "image/tiff", 400, "MiB decoded"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_4xx_and_the_server_keeps_serving(server, case):
    make_body, content_type, status, words = BAD_REQUESTS[case]
    response = post(server, make_body(), content_type)
    assert response.status_code == status, response.text[:500]
    if words is not None:
        assert words in response.json()["error"], response.text[:500]
    good_request(server)


def test_no_traceback_reaches_the_client(server):
    response = post(server, b"garbage", "image/tiff")
    assert response.status_code == 400 and "Traceback" not in response.text


def test_serve_image_has_onnxruntime_and_no_torch(client, images):
    # Any command other than `serve` is run as given (here through tini and the entrypoint).
    probe = (
        "import importlib.util as u, sys; "
        "sys.exit(0 if u.find_spec('onnxruntime') and not u.find_spec('torch') else 3)"
    )
    client.containers.run(images["serve"], ["python", "-c", probe], remove=True)


# ---- honest health -------------------------------------------------------------------------------


def _broken_model(tmp_path: Path, model_dir: Path, kind: str) -> Path | None:
    if kind == "missing":
        return None
    broken = tmp_path / kind
    broken.mkdir()
    if kind == "empty":
        return broken
    for name in ("metadata.json", "weights.pt", "model.onnx"):
        shutil.copy(model_dir / name, broken / name)
    if kind == "code folder":  # a model.tar.gz that would run its own code in the server
        (broken / "code").mkdir()
        (broken / "code" / "inference.py").write_text(
            "open('/tmp/ran', 'w').write('yes')\n", encoding="utf-8"
        )
        (broken / "code" / "requirements.txt").write_text("flask\n", encoding="utf-8")
    elif kind == "corrupt onnx":
        (broken / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(2000))
    elif kind == "bad metadata":
        (broken / "metadata.json").write_text('{"labels": ', encoding="utf-8")
    return broken


@pytest.mark.parametrize(
    "kind", ["missing", "empty", "corrupt onnx", "bad metadata", "code folder"]
)
def test_broken_model_exits_nonzero_and_is_never_healthy(images, model_dir, tmp_path, kind):
    folder = _broken_model(tmp_path, model_dir, kind)
    with start_serve_container(folder, images["serve"]) as container:
        pings = []
        code = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and code is None:
            if container.url:
                pings.append(container.ping(timeout=1))
            code = container.exit_code()
            time.sleep(0.2)
        assert code not in (None, 0), f"still running or exited 0; log:\n{container.logs(50)}"
        assert 200 not in pings
        log = container.logs()
        assert "NOT SERVING" in log and "/opt/ml/model" in log, log[-2000:]
        if kind == "code folder":
            assert "code/ besides the model" in log and "pip" not in log.lower(), log[-2000:]
        with pytest.raises(ContainerError, match="exited"):
            container.wait_healthy(timeout=5)


def test_management_api_is_loopback_only_and_a_lost_model_ends_the_container(images, model_dir):
    # multi-model-server's /ping would say 200 with no model; the entrypoint's model watch stops
    # the server instead, so the instance fails its health check and is replaced.
    with start_serve_container(model_dir, images["serve"]) as container:
        container.wait_healthy(timeout=180)
        good_request(container)  # the model is loaded and registered
        unregister = (
            "import urllib.request as u; "
            "u.urlopen(u.Request('http://127.0.0.1:8081/models/model', method='DELETE'), "
            "timeout=30)"
        )
        result = container.container.exec_run(["python", "-c", unregister])
        assert result.exit_code == 0, result.output.decode("utf-8", "replace")[-2000:]
        code = container.wait_exit(timeout=30)
        assert code == 3, f"exit {code}; log:\n{container.logs(30)}"
        assert "no longer registered" in container.logs(20)
        assert container.ping(timeout=1) != 200


def test_serve_container_stops_promptly_on_sigterm(images, model_dir):
    with start_serve_container(model_dir, images["serve"]) as container:
        container.wait_healthy(timeout=180)
        seconds, code = container.stop(timeout=30)
        # docker stop sends SIGKILL after 30 s (exit 137): a prompt stop is well before that.
        assert seconds < 15 and code != 137, (
            f"{seconds:.1f} s, exit {code}; log:\n{container.logs(30)}"
        )


# ---- the train image -----------------------------------------------------------------------------


def _training_tree(root: Path, bdgp_root: Path, epochs: int) -> Path:
    """A one-host /opt/ml tree: config files, a <gene>/<stage>/<image> train channel (grouped by
    gene, so a validation split may be drawn from it), empty model/ and output/."""
    train, valid = bdgp_records(bdgp_root)
    channel = root / "input" / "data" / "train"
    for record in train + valid:
        target = channel / record.group / record.label / record.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(record.path, target)
    config = root / "input" / "config"
    config.mkdir(parents=True)
    hyperparameters = {
        "arch": "small_cnn",
        "epochs": str(epochs),
        "batch_size": "8",
        "height": "32",
        "width": "80",
        "patience": "0",
        "threads": "1",
        "group_regex": "^(?P<group>[^/]+)/",
    }
    (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (config / "inputdataconfig.json").write_text(
        json.dumps(
            {"train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated"}}
        )
    )
    (config / "resourceconfig.json").write_text(
        json.dumps(
            {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}
        )
    )
    for folder in ("model", "output/data", "checkpoints"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def test_train_container_runs_and_stops_promptly_on_sigterm(client, images, bdgp_root, tmp_path):
    tree = _training_tree(tmp_path / "opt-ml", bdgp_root, epochs=1000)
    container = client.containers.run(
        images["train"],
        "train",
        detach=True,
        hostname="algo-1",
        environment={"SM_STUDIO_LOCAL_MODE": "true"},
        # As SageMaker does: the job's folders, not /opt/ml itself (the program is in /opt/ml/code).
        volumes={
            str(tree / part): {"bind": f"/opt/ml/{part}", "mode": "rw"}
            for part in ("input", "model", "output", "checkpoints")
        },
        labels={"flystage.role": "train-test"},
    )
    try:
        deadline = time.monotonic() + 300
        log = ""
        while time.monotonic() < deadline and not re.search(r"epoch=2 ", log):
            container.reload()
            assert container.status == "running", container.logs().decode()[-3000:]
            log = container.logs().decode("utf-8", "replace")
            time.sleep(1)
        assert re.search(r"epoch=2 ", log), log[-3000:]
        start = time.monotonic()
        container.stop(timeout=60)
        seconds = time.monotonic() - start
        container.reload()
        code = container.attrs["State"]["ExitCode"]
        assert seconds < 30 and code != 137, (
            f"{seconds:.1f} s, exit {code}; log:\n{container.logs(tail=30).decode()}"
        )
        # The program itself (not just the toolkit) saw the signal: it checkpointed and said so.
        log = container.logs().decode("utf-8", "replace")
        assert "stopped by SIGTERM" in log, log[-3000:]
        assert "stopped by SIGTERM" in (tree / "output" / "failure").read_text()
    finally:
        container.remove(force=True)


# ---- no secrets ------------------------------------------------------------------------------

SECRET_PATTERNS = [
    re.compile(p)
    for p in (
        r"AKIA[0-9A-Z]{16}",
        r"ASIA[0-9A-Z]{16}",
        r"(?i)aws_secret_access_key",
        r"(?i)aws_session_token",
        r"(?i)password=",
        r"(?i)token=",
    )
]


@pytest.mark.parametrize("which", ["train", "serve"])
def test_image_carries_no_credentials(client, images, which):
    image = client.images.get(images[which])
    env = image.attrs["Config"].get("Env") or []
    history = [step.get("CreatedBy", "") for step in image.history()]
    for text in env + history:
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), f"{images[which]}: {text[:200]}"
    names = {item.split("=", 1)[0] for item in env}
    assert not names & {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "PIP_INDEX_URL",
        "PIP_FIND_LINKS",
    }
    labels = image.attrs["Config"].get("Labels") or {}
    assert labels.get("org.opencontainers.image.title") == f"flystage-{which}"
