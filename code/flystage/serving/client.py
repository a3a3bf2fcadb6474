"""The client side of ``/invocations``: what a caller sends, and how it reads the answer.

One path for every remote predictor: the SageMaker endpoint (:mod:`flystage.cloud.hosting`),
a local serve container (local mode) and the SageMaker Python SDK's Predictor
(:mod:`flystage.sagemaker`). Each gives :func:`predict_each` its own ``send(body, k)``; reading
the files, naming the images and turning one image's failure into its own error row are the
same for all. The other half of the format is :mod:`flystage.serving.codec` (server side).
Needs neither torch nor the serving toolkit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

# The format table is standard library only: the control plane and flystage.sagemaker import
# this module, and the image stack (OpenCV, numpy) is no part of what they need.
from flystage import formats

if TYPE_CHECKING:
    from flystage.predictor import Prediction, Source

# For bytes of no format in the table: the server sniffs them and says what they are.
UNKNOWN_TYPE = "application/octet-stream"

# send(body, k) -> top-k [(stage, probability), ...]; raises ValueError for that image only.
Send = Callable[[bytes, int], list[tuple[str, float]]]


class AnswerError(Exception):
    """The server answered something that is not the serve image's JSON (wrong server?)."""


def content_type(body: bytes) -> str:
    """The image's MIME type from its magic bytes (the server checks them again)."""
    fmt = formats.sniff(body[: formats.HEAD_BYTES])
    return fmt.mime_type if fmt is not None else UNKNOWN_TYPE


def parse_top(payload: Any) -> list[tuple[str, float]]:
    """The serve image's JSON answer for one image -> ``[(stage, probability), ...]``, best first.

    The answer is ``{"predictions": [{"file", "top": [{"stage", "probability"}], "error"}], ...}``
    (:func:`flystage.serving.codec.encode_response`); an image the model could not read carries
    ``error`` instead, raised here as ValueError. Anything else raises :class:`AnswerError`.
    """
    try:
        item = payload["predictions"][0] if "predictions" in payload else payload
        if item.get("error"):
            raise ValueError(item["error"])
        return [(str(t["stage"]), float(t["probability"])) for t in item["top"]]
    except (TypeError, KeyError, IndexError, AttributeError):
        raise AnswerError(f"unexpected answer from the model: {str(payload)[:300]}") from None


def parse_answer(raw: bytes | str) -> list[tuple[str, float]]:
    """:func:`parse_top` of a raw JSON body; an error body (``{"error", "status"}``, a 4xx)
    raises ValueError with the server's message."""
    try:
        payload = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except (UnicodeDecodeError, ValueError):
        raise AnswerError(f"the answer is not JSON: {bytes(raw)[:300]!r}") from None
    if isinstance(payload, dict) and payload.get("error") and "predictions" not in payload:
        raise ValueError(f"HTTP {payload.get('status', '?')}: {payload['error']}")
    return parse_top(payload)


def read_body(source: Source) -> bytes:
    """An image's bytes: the source itself, or its file's content (OSError if unreadable)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    return Path(source).read_bytes()


def predict_each(
    sources: Sequence[Source],
    send: Send,
    k: int = 3,
    names: Sequence[str] | None = None,
    concurrency: int = 1,
) -> list[Prediction]:
    """Top-k for each source through ``send``, in order; an unreadable file or a ValueError
    from ``send`` is that image's ``error`` and the others go on. Other exceptions (the server
    is gone, no permission) propagate: they would fail every image alike."""
    from flystage.predictor import Prediction, source_name

    names = list(names) if names is not None else [source_name(s, i) for i, s in enumerate(sources)]

    def one(item: tuple[Source, str]) -> Prediction:
        source, name = item
        try:
            body = read_body(source)
        except OSError as exc:
            return Prediction(name, error=f"{name}: cannot read ({exc.strerror}); check the file")
        try:
            return Prediction(name, top=send(body, k)[:k])
        except ValueError as exc:
            return Prediction(name, error=f"{name}: {exc}")

    if concurrency <= 1:
        return [one(item) for item in zip(sources, names)]
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, zip(sources, names)))
