"""make predict's endpoint client on botocore's Stubber: an image over the payload limit,
throttling and ModelNotReady give that image an error row (after retries with backoff) and
the run goes on. (The answers themselves are checked against the real serve container in
test_cloud_predict.py.)"""

from __future__ import annotations

import io
import json

import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from cloud_helpers import REGION, fake_credentials
from flystage.cloud.endpoint import EndpointPredictor
from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings

PNG = b"\x89PNG\r\n\x1a\n"


def answer() -> dict:
    body = json.dumps(
        {"predictions": [{"file": "x", "top": [{"stage": "s1", "probability": 0.9}]}]}
    ).encode()
    return {"Body": StreamingBody(io.BytesIO(body), len(body)), "ContentType": "application/json"}


@pytest.fixture
def api(monkeypatch, tmp_path) -> Api:
    fake_credentials(monkeypatch)
    # Nothing listens there: every answer comes from the Stubber.
    return Api(
        Settings(
            region=REGION, endpoint_url="http://127.0.0.1:9", state_file=str(tmp_path / "s.json")
        ),
        out=io.StringIO(),
    )


def test_oversized_and_throttled_images_get_an_error_row_and_the_run_goes_on(api):
    sleeps: list[float] = []
    predictor = EndpointPredictor(
        api, "flystage", concurrency=1, retries=3, backoff_s=0.5, sleep=sleeps.append
    )
    sources = [PNG + b"a", PNG + b"\0" * (6 * 2**20), PNG + b"c", PNG + b"d", PNG + b"e"]
    names = ["ok.png", "big.png", "not-ready.png", "throttled.png", "last.png"]
    with Stubber(api.client("sagemaker-runtime")) as stub:
        stub.add_response("invoke_endpoint", answer())  # ok.png; big.png is never sent
        stub.add_client_error("invoke_endpoint", "ModelNotReadyException", "model is loading", 429)
        stub.add_client_error("invoke_endpoint", "ModelNotReadyException", "model is loading", 429)
        stub.add_response("invoke_endpoint", answer())  # not-ready.png on its 3rd try
        for _ in range(4):  # throttled.png: every try
            stub.add_client_error("invoke_endpoint", "ThrottlingException", "Rate exceeded", 400)
        stub.add_response("invoke_endpoint", answer())  # last.png
        results = predictor.predict_sources(sources, k=3, names=names)
        stub.assert_no_pending_responses()
    by_name = {p.source: p for p in results}
    assert [by_name[n].top for n in ("ok.png", "not-ready.png", "last.png")] == [[("s1", 0.9)]] * 3
    assert (
        "over the 6 MB request limit of a real-time endpoint: not sent; use `make batch-predict`"
        in by_name["big.png"].error
    )
    assert (
        "still answered ThrottlingException (Rate exceeded) after 4 tries"
        in by_name["throttled.png"].error
    )
    assert sleeps == [0.5, 1.0, 0.5, 1.0, 2.0]  # exponential backoff, per image


def test_serverless_limit_is_4_mb_and_other_errors_still_stop_the_run(api):
    predictor = EndpointPredictor(api, "flystage", concurrency=1, serverless=True)
    [result] = predictor.predict_sources([PNG + b"\0" * (4 * 2**20 + 1)], names=["big.png"])
    assert "over the 4 MB request limit of a serverless endpoint" in result.error
    with Stubber(api.client("sagemaker-runtime")) as stub:
        stub.add_client_error(
            "invoke_endpoint", "ValidationError", "Endpoint flystage not found.", 400
        )
        with pytest.raises(
            CloudError, match="ValidationError: Endpoint flystage not found.*make deploy"
        ):
            predictor.predict_sources([PNG + b"a"])
