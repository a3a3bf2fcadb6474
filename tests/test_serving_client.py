"""The client side of /invocations (flystage.serving.client): one path for the endpoint, local
mode and the SDK's Predictor. Answers here are the serve image's real JSON shapes, made by
flystage.serving.codec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flystage.serving import client, codec


def _answer(stages: list[tuple[str, float]]) -> str:
    top = [{"stage": s, "probability": p} for s, p in stages]
    return codec.encode_response(
        [{"file": "request body", "top": top, "error": None}], {"version": "x"}, {"total": 1.0}
    )


def test_content_type_comes_from_the_bytes():
    assert client.content_type(b"II*\x00rest") == "image/tiff"
    assert client.content_type(b"\x89PNG\r\n\x1a\nrest") == "image/png"
    assert client.content_type(b"\xff\xd8\xffrest") == "image/jpeg"
    assert client.content_type(b"%PDF") == "application/octet-stream"


def test_parse_answer_reads_top_k_errors_and_refuses_other_bodies():
    assert client.parse_answer(_answer([("9-10", 0.8), ("7-8", 0.15)])) == [
        ("9-10", 0.8),
        ("7-8", 0.15),
    ]
    with pytest.raises(ValueError, match="HTTP 400: the file is corrupt"):
        client.parse_answer(codec.error_body(400, "the file is corrupt").encode())
    with pytest.raises(client.AnswerError, match="not JSON"):
        client.parse_answer(b"<html>502 Bad Gateway</html>")
    with pytest.raises(client.AnswerError, match="unexpected answer"):
        client.parse_answer(json.dumps({"predictions": [{"stages": []}]}))


def test_predict_each_gives_each_failure_its_own_row_in_order(tmp_path: Path):
    good = tmp_path / "good.tif"
    good.write_bytes(b"II*\x00good")
    refused = tmp_path / "refused.tif"
    refused.write_bytes(b"II*\x00refused")
    missing = tmp_path / "missing.tif"

    def send(body: bytes, k: int):
        if b"refused" in body:
            raise ValueError("HTTP 400: cannot read it as an image")
        return client.parse_answer(_answer([("1-3", 0.5), ("4-6", 0.3), ("7-8", 0.2)]))

    for concurrency in (1, 3):
        rows = client.predict_each(
            [good, missing, refused, b"II*\x00bytes"], send, k=2, concurrency=concurrency
        )
        assert [r.source for r in rows] == [str(good), str(missing), str(refused), "<image 3>"]
        assert rows[0].top == [("1-3", 0.5), ("4-6", 0.3)] and rows[3].top == rows[0].top
        assert "cannot read" in rows[1].error and "check the file" in rows[1].error
        assert rows[2].error.endswith("HTTP 400: cannot read it as an image")


def test_predict_each_lets_a_lost_server_fail_the_run():
    def send(body: bytes, k: int):
        raise ConnectionError("the server is gone")

    with pytest.raises(ConnectionError):
        client.predict_each([b"II*\x00"], send)
