"""The serving code in-process: settings, request decoding, and the handler service as
multi-model-server's worker runs it (its real Context and RequestProcessor), on a small model
trained here. The same code in the real container: tests/test_images.py."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import os
import shutil
import threading
from http import HTTPStatus
from pathlib import Path

import numpy as np
import pytest

from flystage.predictor import Predictor
from flystage.serving import codec, entrypoint, model_watch, settings
from serving_helpers import (
    IMAGE_TYPES,
    handler_service,
    image_body,
    invoke,
    lab_image,
    tiff_bytes,
    train_artefact,
)

# ---- settings --------------------------------------------------------------------------------


def test_defaults_use_one_worker_per_cpu_with_one_thread_each():
    s = settings.resolve({}, cpus=4)
    assert (s.workers, s.threads) == (4, 1)
    assert s.timeout_seconds == 60 and s.max_payload_mb == 6


def test_fewer_workers_get_the_spare_cores_as_threads():
    s = settings.resolve({settings.WORKERS: "2"}, cpus=4)
    assert (s.workers, s.threads) == (2, 2)
    assert settings.resolve({settings.WORKERS: "3"}, cpus=4).threads == 1


def test_apply_writes_every_setting_for_the_model_server():
    env = {settings.TIMEOUT_SECONDS: "30"}
    settings.apply(env, cpus=2)
    assert env[settings.WORKERS] == "2" and env[settings.THREADS] == "1"
    assert env[settings.TIMEOUT_SECONDS] == "30" and env[settings.MAX_PAYLOAD_MB] == "6"


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_setting_is_refused_with_its_name(value):
    with pytest.raises(settings.SettingsError, match=settings.WORKERS):
        settings.resolve({settings.WORKERS: value}, cpus=2)


def test_cgroup_quota_caps_the_cpus(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert settings.available_cpus(tmp_path) <= 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert settings._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert settings.available_cpus(tmp_path) == 1


# ---- request decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", sorted(codec.raw_types()) + ["Image/TIFF; charset=binary"])
def test_raw_body_is_one_image(content_type):
    request = codec.decode_request(bytearray(b"II*\x00data"), content_type)
    assert request.images == [b"II*\x00data"] and request.k == 3


def test_json_single_batch_list_and_k():
    one = base64.b64encode(b"abc").decode()
    assert codec.decode_request(json.dumps({"image": one, "k": 2}), "application/json").k == 2
    batch = codec.decode_request(
        json.dumps({"instances": [one, {"image": one}]}), "application/json"
    )
    assert batch.images == [b"abc", b"abc"] and batch.names == ["instances[0]", "instances[1]"]
    assert len(codec.decode_request(json.dumps([one] * 3), "application/json").images) == 3


def test_k_from_custom_attributes_header():
    headers = {"X-Amzn-SageMaker-Custom-Attributes": "trace=1; k=5"}
    assert codec.decode_request(b"x", "image/png", headers, num_labels=6).k == 5


def test_a_body_over_the_payload_limit_is_413_naming_the_setting():
    for content_type, body in (
        ("image/tiff", b"II*\x00" + b"\x00" * 2000),
        ("application/json", '{"image": "' + "A" * 2000 + '"}'),
    ):
        with pytest.raises(codec.RequestError) as caught:
            codec.decode_request(body, content_type, max_bytes=1000)
        assert caught.value.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        assert "SAGEMAKER_MAX_PAYLOAD_IN_MB" in caught.value.message
    assert codec.decode_request(b"II*\x00", "image/tiff", max_bytes=4).images == [b"II*\x00"]


def test_the_model_server_s_own_body_limit_is_above_flystage_s():
    # Bodies between the two limits get flystage's JSON 413; only far larger ones meet the
    # server's bare 413, which keeps any body from filling the Java front end's memory.
    env: dict[str, str] = {settings.MAX_PAYLOAD_MB: "6"}
    applied = settings.apply(env, cpus=2)
    assert (
        int(env[settings.TRANSPORT_LIMIT])
        == settings.TRANSPORT_FACTOR * 6 * 2**20
        > applied.max_payload_bytes
    )
    assert env[settings.MAX_DECODED_MB] == str(settings.DEFAULT_MAX_DECODED_MB)


@pytest.mark.parametrize(
    "body, content_type, headers, status, words",
    [
        (b"x", "text/plain", {}, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "not supported"),
        (b"x", None, {}, HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "not supported"),
        (b"", "image/tiff", {}, HTTPStatus.BAD_REQUEST, "empty"),
        ("{not json", "application/json", {}, HTTPStatus.BAD_REQUEST, "cannot be parsed"),
        (
            "[" * 100_000 + "]" * 100_000,
            "application/json",
            {},
            HTTPStatus.BAD_REQUEST,
            "nested too deeply",
        ),
        ('{"picture": "x"}', "application/json", {}, HTTPStatus.BAD_REQUEST, 'no "image"'),
        ('{"image": "***"}', "application/json", {}, HTTPStatus.BAD_REQUEST, "base64"),
        ('{"image": 7}', "application/json", {}, HTTPStatus.BAD_REQUEST, "base64 string"),
        ('{"instances": []}', "application/json", {}, HTTPStatus.BAD_REQUEST, "no images"),
        ('{"instances": "abc"}', "application/json", {}, HTTPStatus.BAD_REQUEST, "must be a list"),
        ('"abc"', "application/json", {}, HTTPStatus.BAD_REQUEST, "object or list"),
        (
            json.dumps(["YQ=="] * 17),
            "application/json",
            {},
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            "at most 16",
        ),
        (
            '{"image": "YQ==", "k": 0}',
            "application/json",
            {},
            HTTPStatus.BAD_REQUEST,
            "out of range",
        ),
        (
            '{"image": "YQ==", "k": 7}',
            "application/json",
            {},
            HTTPStatus.BAD_REQUEST,
            "out of range",
        ),
        (
            '{"image": "YQ==", "k": true}',
            "application/json",
            {},
            HTTPStatus.BAD_REQUEST,
            "whole number",
        ),
        (
            b"x",
            "image/png",
            {"x-amzn-sagemaker-custom-attributes": "k=three"},
            HTTPStatus.BAD_REQUEST,
            "whole number",
        ),
    ],
)
def test_bad_requests_are_4xx_with_a_clear_message(body, content_type, headers, status, words):
    with pytest.raises(codec.RequestError) as caught:
        codec.decode_request(body, content_type, headers, num_labels=6)
    assert caught.value.status_code == status
    assert words in caught.value.message


def test_accept_other_than_json_is_406():
    codec.check_accept("application/json, text/plain")
    codec.check_accept("*/*")
    with pytest.raises(codec.RequestError) as caught:
        codec.check_accept("text/csv")
    assert caught.value.status_code == HTTPStatus.NOT_ACCEPTABLE


# ---- the handler service, as a multi-model-server worker runs it ------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bdgp_root) -> Path:
    folder = tmp_path_factory.mktemp("served-model")
    train_artefact(folder, bdgp_root)
    return folder


@pytest.fixture(scope="module")
def service(model_dir):
    return handler_service(model_dir)


@pytest.mark.parametrize(
    "ext, content_type",
    [*IMAGE_TYPES, (".png", "application/octet-stream")],
)
def test_handler_answers_top3_with_model_and_timing(service, model_dir, ext, content_type):
    body = image_body(ext, seed=3)
    status, answer = invoke(service, body, content_type)
    assert status == 200, answer
    (prediction,) = answer["predictions"]
    expected = Predictor(model_dir, threads=1).predict_sources([body], k=3, names=["request body"])[
        0
    ]
    assert [t["stage"] for t in prediction["top"]] == [s for s, _ in expected.top]
    assert np.allclose(
        [t["probability"] for t in prediction["top"]], [p for _, p in expected.top], atol=1e-5
    )
    assert answer["model"]["arch"] == "small_cnn" and len(answer["model"]["version"]) == 16
    assert answer["timing_ms"]["total"] >= answer["timing_ms"]["predict"] > 0


def test_handler_batch_and_k_by_header(service):
    one = base64.b64encode(tiff_bytes(lab_image(seed=1))).decode()
    body = json.dumps({"instances": [one, one]}).encode()
    status, answer = invoke(
        service, body, "application/json", {"X-Amzn-SageMaker-Custom-Attributes": "k=5"}
    )
    assert status == 200, answer
    assert [len(p["top"]) for p in answer["predictions"]] == [5, 5]
    assert answer["predictions"][0]["top"] == answer["predictions"][1]["top"]


@pytest.mark.parametrize(
    "body, content_type, status, words",
    [
        (b"", "image/tiff", 400, "empty"),
        (b"just some text, not an image", "image/png", 400, "not an image"),
        (None, "image/tiff", 400, "request body"),  # truncated TIFF, filled in below
        (b"\xff\xfe{", "application/json", 400, "UTF-8"),
        (b"<xml/>", "application/xml", 415, "not supported"),
    ],
)
def test_handler_bad_input_is_json_4xx_and_the_next_request_works(
    service, body, content_type, status, words
):
    if body is None:
        whole = tiff_bytes(lab_image())
        body = whole[: len(whole) // 3]
    got, answer = invoke(service, body, content_type)
    assert got == status and words in answer["error"], answer
    got, answer = invoke(service, tiff_bytes(lab_image()), "image/tiff")
    assert got == 200, answer


def test_handler_refuses_an_image_over_the_pixel_limit(service, monkeypatch):
    import flystage.image_checks

    monkeypatch.setattr(flystage.image_checks, "MAX_PIXELS", 100_000)
    got, answer = invoke(service, tiff_bytes(lab_image()), "image/tiff")
    assert got == 400 and "more than the limit" in answer["error"], answer


# ---- the entrypoint's model check -------------------------------------------------------------


@pytest.fixture
def saved_environ():
    """serve() writes its settings into os.environ for the model server; put it back after."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_serve_refuses_a_missing_model_before_starting_the_server(
    tmp_path, monkeypatch, caplog, saved_environ
):
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    with caplog.at_level(logging.ERROR):
        assert entrypoint.serve() == entrypoint.EXIT_BAD_MODEL
    assert "NOT SERVING" in caplog.text and str(tmp_path / "model") in caplog.text


def test_serve_refuses_a_corrupt_onnx(tmp_path, monkeypatch, caplog, model_dir, saved_environ):
    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("metadata.json", "weights.pt"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    (broken / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes()[:1000])
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    with caplog.at_level(logging.ERROR):
        assert entrypoint.serve() == entrypoint.EXIT_BAD_MODEL
    assert "model.onnx" in caplog.text


def test_serve_refuses_bad_settings(tmp_path, monkeypatch, saved_environ):
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(settings.WORKERS, "zero")
    assert entrypoint.serve() == entrypoint.EXIT_BAD_SETTINGS


# ---- the model watch ---------------------------------------------------------------------------


class _Listing(http.server.BaseHTTPRequestHandler):
    """A management API that lists whatever ``models`` the test sets (a real HTTP server)."""

    models: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server's API
        body = json.dumps({"models": type(self).models}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


def test_model_watch_calls_on_lost_once_the_registered_model_disappears():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Listing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    lost = threading.Event()
    try:
        _Listing.models = []
        assert model_watch.model_registered(url) is False
        _Listing.models = [{"modelName": "model", "modelUrl": "/opt/ml/model"}]
        assert model_watch.model_registered(url) is True
        watch = model_watch.ModelWatch(url, on_lost=lost.set, interval=0.05, misses=2)
        watch.start()
        assert not lost.wait(0.5)  # registered: no alarm
        _Listing.models = []
        assert lost.wait(5) and watch.lost
        watch.join(5)
        assert not watch.is_alive()
    finally:
        server.shutdown()
    # A server that does not answer is unknown, not "no model".
    assert model_watch.model_registered(url, timeout=0.5) is None


# ---- the management API's port -----------------------------------------------------------------


def test_management_port_is_8081_unless_sagemaker_gives_a_safe_range():
    assert settings.management_port({}) == 8081
    assert settings.management_port({settings.SAFE_PORT_RANGE: " 10000 - 10999 "}) == 10000
    # 8080 is the inference port, never the management API's.
    assert settings.management_port({settings.SAFE_PORT_RANGE: "8080-8082"}) == 8081


def test_management_port_skips_a_port_in_use():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert settings.management_port({settings.SAFE_PORT_RANGE: f"{port}-{port + 1}"}) == (
            port + 1
        )
        with pytest.raises(settings.SettingsError, match="no free port"):
            settings.management_port({settings.SAFE_PORT_RANGE: f"{port}-{port}"})


@pytest.mark.parametrize("value", ["10000", "10000:10999", "10999-10000", "0-10", "9-70000", "a-b"])
def test_malformed_safe_port_range_is_refused_with_its_name(value):
    with pytest.raises(settings.SettingsError, match=f"SAGEMAKER_SAFE_PORT_RANGE='{value}'"):
        settings.management_port({settings.SAFE_PORT_RANGE: value})


def test_serve_refuses_a_malformed_safe_port_range(tmp_path, monkeypatch, caplog, saved_environ):
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(settings.SAFE_PORT_RANGE, "10000:10999")
    with caplog.at_level(logging.ERROR):
        assert entrypoint.serve() == entrypoint.EXIT_BAD_SETTINGS
    assert "SAGEMAKER_SAFE_PORT_RANGE='10000:10999'" in caplog.text


# ---- GET /execution-parameters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "payload_mb", "expected"),
    [(1, 6, (1, 6)), (4, 6, (4, 6)), (2, 80, (2, 50)), (36, 6, (16, 6)), (1, 200, (1, 100))],
)
def test_execution_parameters_stay_within_sagemaker_s_100_mb(workers, payload_mb, expected):
    env = {settings.WORKERS: str(workers), settings.MAX_PAYLOAD_MB: str(payload_mb)}
    served = settings.apply(env, cpus=workers)
    answer = json.loads(env[settings.EXECUTION_PARAMETERS])
    assert (
        answer
        == served.execution_parameters()
        == {
            "MaxConcurrentTransforms": expected[0],
            "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": expected[1],
        }
    )
    # Never more than the container takes, nor more requests than workers.
    assert answer["MaxPayloadInMB"] <= served.max_payload_mb
    assert answer["MaxConcurrentTransforms"] <= served.workers


# ---- precision: the int8 graph of a really trained model -------------------------------------


@pytest.mark.parametrize("value", ["int4", "fp16", "1"])
def test_bad_precision_is_refused_with_its_name(value):
    with pytest.raises(settings.SettingsError, match=settings.PRECISION):
        settings.resolve({settings.PRECISION: value}, cpus=2)


def test_precision_defaults_to_auto_and_reaches_the_workers():
    env = {settings.PRECISION: " Float "}
    assert settings.apply(env, cpus=2).precision == "float"
    assert env[settings.PRECISION] == "float"
    assert settings.resolve({}, cpus=2).precision == "auto"


@pytest.mark.parametrize("precision, runs", [(None, "int8"), ("float", "float"), ("int8", "int8")])
def test_the_worker_runs_the_graph_the_setting_picks(int8_model, monkeypatch, precision, runs):
    if precision:
        monkeypatch.setenv(settings.PRECISION, precision)
    else:
        monkeypatch.delenv(settings.PRECISION, raising=False)
    status, answer = invoke(handler_service(int8_model), image_body(".tif", seed=5), "image/tiff")
    assert status == 200, answer
    assert answer["model"]["precision"] == runs
    graph = int8_model / ("model-int8.onnx" if runs == "int8" else "model.onnx")
    assert answer["model"]["version"] == hashlib.sha256(graph.read_bytes()).hexdigest()[:16]


def test_serve_refuses_int8_for_a_model_without_one(
    tmp_path, monkeypatch, caplog, model_dir, saved_environ
):
    shutil.copytree(model_dir, tmp_path / "model")
    monkeypatch.setenv("SAGEMAKER_BASE_DIR", str(tmp_path))
    monkeypatch.setenv(settings.PRECISION, "int8")
    with caplog.at_level(logging.ERROR):
        assert entrypoint.serve() == entrypoint.EXIT_BAD_MODEL
    assert "no int8 model" in caplog.text and "NOT SERVING" in caplog.text
