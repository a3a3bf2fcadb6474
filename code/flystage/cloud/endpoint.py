"""Predict through a deployed SageMaker endpoint: one ``invoke_endpoint`` per image.

:class:`EndpointPredictor` is a :class:`flystage.predictor.SourcePredictor`, so a folder goes
through the same CSV/JSON outputs and ``--rename`` as ``flystage predict`` (:func:`predict_folder`).
"""

from __future__ import annotations

import argparse
from typing import Any

from flystage.cloud.session import Api
from flystage.cloud.settings import CloudError, Settings
from flystage.options import UsageError
from flystage.serving.client import AnswerError, content_type, parse_top, predict_each

# invoke_endpoint's request payload limit, in MB (2**20 bytes).
PAYLOAD_LIMIT_MB = {"real-time": 6, "serverless": 4}
# Errors that say "not now" (throttled, model still loading, busy): retried with backoff,
# then recorded for that image only.
RETRYABLE = {
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "ModelNotReadyException",
    "ServiceUnavailable",
}


class EndpointPredictor:
    """A ``flystage.predictor.SourcePredictor`` backed by ``sagemaker-runtime.invoke_endpoint``.

    Each image is sent as its raw bytes with its MIME type. An image over the endpoint's
    payload limit is not sent; throttling and ModelNotReady are retried ``retries`` times with
    exponential backoff. Those, and an image the server rejects (4xx, ``ModelError``), get a
    per-image error and the run goes on; other failures (no such endpoint, no permission)
    raise CloudError.
    """

    def __init__(
        self,
        api: Api,
        endpoint_name: str,
        concurrency: int = 4,
        *,
        serverless: bool = False,
        retries: int = 5,
        backoff_s: float = 0.5,
        sleep=None,
    ) -> None:
        import time

        self.api = api
        self.endpoint_name = endpoint_name
        self.concurrency = max(1, concurrency)
        self.kind = "serverless" if serverless else "real-time"
        self.max_payload = PAYLOAD_LIMIT_MB[self.kind] * 2**20
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.sleep = sleep or time.sleep

    def request(self, body: bytes, k: int = 3) -> dict[str, Any]:
        """The ``invoke_endpoint`` request for one image."""
        return {
            "EndpointName": self.endpoint_name,
            "ContentType": content_type(body),
            "Accept": "application/json",
            "CustomAttributes": f"k={k}",
            "Body": body,
        }

    def invoke(self, body: bytes, k: int) -> list[tuple[str, float]]:
        import json

        from botocore.exceptions import BotoCoreError, ClientError

        if len(body) > self.max_payload:
            raise ValueError(
                f"{len(body) / 2**20:.1f} MB is over the {PAYLOAD_LIMIT_MB[self.kind]} MB "
                f"request limit of a {self.kind} endpoint: not sent; use `make batch-predict` "
                "(up to 100 MB per image) or a smaller file"
            )
        for attempt in range(self.retries + 1):
            try:
                response = self.api.client("sagemaker-runtime").invoke_endpoint(
                    **self.request(body, k)
                )
                break
            except ClientError as err:
                error = err.response.get("Error", {})
                code, message = error.get("Code"), error.get("Message")
                if code == "ModelError":
                    # The container answered 4xx/5xx: its own message says what was wrong.
                    raise ValueError(
                        err.response.get("OriginalMessage") or message or str(err)
                    ) from None
                if code in RETRYABLE:
                    if attempt < self.retries:
                        self.sleep(min(self.backoff_s * 2**attempt, 30.0))
                        continue
                    raise ValueError(
                        f"endpoint {self.endpoint_name} still answered {code} ({message}) after "
                        f"{self.retries + 1} tries: run again for the images with this error, or "
                        "raise the endpoint's instance count or concurrency"
                    ) from None
                if code == "ValidationError" and "payload" in str(message).lower():
                    raise ValueError(f"{code}: {message}") from None
                raise CloudError(
                    f"invoke_endpoint {self.endpoint_name} failed: {code}: {message}"
                    " (is the endpoint deployed and InService? `make deploy`)"
                ) from None
            except BotoCoreError as err:
                raise CloudError(f"invoke_endpoint {self.endpoint_name} failed: {err}") from None
        try:
            return parse_top(json.loads(response["Body"].read()))[:k]
        except AnswerError as exc:
            raise CloudError(f"endpoint {self.endpoint_name}: {exc}") from None

    def predict_sources(self, sources, k: int = 3, names=None):
        self.api.client("sagemaker-runtime")  # made once here: creating clients is not thread-safe
        return predict_each(sources, self.invoke, k, names, concurrency=self.concurrency)


def predict_folder(api: Api, settings: Settings, args: argparse.Namespace) -> int:
    """`flystage cloud predict`: the top-k stages of every image in ``args.folder`` through
    the endpoint, written as `flystage predict` writes them (``--undo`` undoes a rename); a
    dry run sends one request per image to the capturing API."""
    from flystage.predict import run_undo, run_with

    if args.undo:
        return run_undo(args.undo)
    if args.folder is None:
        raise UsageError("give a FOLDER of images (DIR=...) or --undo MANIFEST")
    predictor = EndpointPredictor(
        api, settings.endpoint_name, concurrency=args.concurrency, serverless=settings.serverless
    )
    if args.dry_run:
        from flystage.organise import iter_images

        paths, _ = iter_images([args.folder.expanduser().resolve()])
        for path in paths:
            api.call(
                "sagemaker-runtime",
                "invoke_endpoint",
                **predictor.request(path.read_bytes(), args.k),
            )
        return 0
    return run_with(
        predictor, args, model_info={"endpoint": settings.endpoint_name, "region": api.region}
    )
