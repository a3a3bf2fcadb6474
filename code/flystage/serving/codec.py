"""Decode an ``/invocations`` request into images, and encode the answer as JSON.

Requests:

- a raw image body with ``Content-Type`` one of :func:`raw_types`: a format's own MIME type
  from :mod:`flystage.formats` (TIFF, PNG, JPEG, BMP) or one of :data:`GENERIC_TYPES` (the
  format is recognised from the bytes, so ``application/octet-stream`` works for all);
- ``application/json``: ``{"image": "<base64>"}``, ``{"instances": [...]}`` or a bare list for a
  small batch, whose items are base64 strings or ``{"image": "<base64>"}``; optional ``"k"``.

``k`` (how many stages to return, default 3) comes from the JSON ``"k"`` or from the SageMaker
custom attributes header (``X-Amzn-SageMaker-Custom-Attributes: k=5``), the one per-request
channel that ``InvokeEndpoint`` passes through. Every problem is a :class:`RequestError`, which
the toolkit turns into a 4xx answer with its message.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from sagemaker_inference.errors import GenericInferenceToolkitError

from flystage import formats

JSON_TYPE = "application/json"
# Raw image bodies of any format (the reader sniffs the bytes), besides each format's own types.
GENERIC_TYPES = frozenset({"application/x-image", "application/octet-stream"})
CUSTOM_ATTRIBUTES = "x-amzn-sagemaker-custom-attributes"
DEFAULT_K = 3


class RequestError(GenericInferenceToolkitError):
    """A request the server cannot answer: the status is a 4xx and the message says what to send."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(int(status), message, HTTPStatus(status).phrase)


@dataclass
class Request:
    """The decoded images (still encoded bytes: decoding them is the model's preprocessing)."""

    images: list[bytes]
    names: list[str]
    k: int
    received: float = field(default_factory=time.perf_counter)


def raw_types() -> frozenset[str]:
    """Every Content-Type of a raw image body: each format's MIME types and the generic ones."""
    return formats.mime_types() | GENERIC_TYPES


def media_type(content_type: str | None) -> str:
    """``"Image/TIFF; charset=x"`` -> ``"image/tiff"``; None -> ``""``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_request(
    body: bytes | bytearray | str | None,
    content_type: str | None,
    headers: Mapping[str, str] | None = None,
    num_labels: int = 6,
    max_batch: int = 16,
    max_bytes: int | None = None,
) -> Request:
    """Turn an ``/invocations`` body into a :class:`Request`; raise :class:`RequestError` if bad.

    ``max_bytes``: the body limit (SAGEMAKER_MAX_PAYLOAD_IN_MB); a longer body is a 413.
    """
    kind = media_type(content_type)
    raw = kind in GENERIC_TYPES or formats.by_mime_type(kind) is not None
    if not raw and kind != JSON_TYPE:
        raise RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type or '(none)'!r} is not supported; send an image as one of "
            f"{', '.join(sorted(raw_types()))}, or JSON ({JSON_TYPE}) with base64 images",
        )
    if body is None or len(body) == 0:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "the request body is empty; send the image's bytes or JSON with a base64 image",
        )
    if max_bytes is not None and len(body) > max_bytes:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"the request body is {len(body) / 2**20:.1f} MiB, over the limit of "
            f"{max_bytes / 2**20:g} MiB (SAGEMAKER_MAX_PAYLOAD_IN_MB); send fewer images per "
            "request, or smaller ones",
        )
    header_k = _k_from_headers(headers or {})
    if raw:
        try:
            # A text body stands for bytes only as latin-1 (one character per byte).
            data = body.encode("latin-1") if isinstance(body, str) else bytes(body)
        except UnicodeEncodeError:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"the body is text, not the bytes of an image ({content_type}); send the image "
                "file's bytes",
            ) from None
        return Request([data], ["request body"], _check_k(header_k, num_labels))
    images, names, json_k = _decode_json(body, max_batch)
    return Request(images, names, _check_k(json_k if json_k is not None else header_k, num_labels))


def _decode_json(
    body: bytes | bytearray | str, max_batch: int
) -> tuple[list[bytes], list[str], Any]:
    try:
        text = body if isinstance(body, str) else bytes(body).decode("utf-8")
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f'the JSON body cannot be parsed ({exc}); send {{"image": "<base64>"}}',
        ) from None
    except RecursionError:  # deeply nested arrays or objects: a stranger's body, not a server fault
        raise RequestError(
            HTTPStatus.BAD_REQUEST, 'the JSON body is nested too deeply; send {"image": "<base64>"}'
        ) from None
    k = None
    if isinstance(document, dict):
        k = document.get("k")
        if "image" in document:
            items, names = [document["image"]], ["image"]
        elif "instances" in document:
            items = document["instances"]
            if not isinstance(items, list):
                raise RequestError(
                    HTTPStatus.BAD_REQUEST, '"instances" must be a list of base64 images'
                )
            names = [f"instances[{i}]" for i in range(len(items))]
        else:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f'the JSON object has no "image" or "instances" (keys: {sorted(document)[:10]}); '
                'send {"image": "<base64>"} or {"instances": ["<base64>", ...]}',
            )
    elif isinstance(document, list):
        items, names = document, [f"[{i}]" for i in range(len(document))]
    else:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"expected a JSON object or list, not {type(document).__name__}"
        )
    if not items:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the request has no images; send at least one")
    if len(items) > max_batch:
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{len(items)} images in one request; send at most {max_batch} (FLYSTAGE_MAX_BATCH)",
        )
    return [_b64_image(item, name) for item, name in zip(items, names)], names, k


def _b64_image(item: Any, name: str) -> bytes:
    if isinstance(item, dict) and "image" in item:
        item = item["image"]
    if not isinstance(item, str):
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"{name}: expected a base64 string, not {type(item).__name__}"
        )
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"{name}: not valid base64; encode the image file's bytes with base64",
        ) from None
    if not data:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"{name}: the image is empty; send the image file's bytes"
        )
    return data


def _k_from_headers(headers: Mapping[str, str]) -> Any:
    """``k`` from ``X-Amzn-SageMaker-Custom-Attributes: k=5`` (``;`` or ``,`` separate items)."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == CUSTOM_ATTRIBUTES and isinstance(value, str):
            for item in value.replace(",", ";").split(";"):
                name, _, raw = item.partition("=")
                if name.strip().lower() == "k":
                    return raw.strip()
    return None


def _check_k(k: Any, num_labels: int) -> int:
    if k is None:
        return min(DEFAULT_K, num_labels)
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"k={k!r}: expected a whole number from 1 to {num_labels}"
        )
    try:
        value = int(k)
    except ValueError:
        raise RequestError(
            HTTPStatus.BAD_REQUEST, f"k={k!r}: expected a whole number from 1 to {num_labels}"
        ) from None
    if not 1 <= value <= num_labels:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            f"k={value}: out of range; this model knows {num_labels} stages, so ask for 1 to "
            f"{num_labels}",
        )
    return value


def check_accept(accept: str | None) -> None:
    """Only JSON answers exist; raise 406 for an Accept header that excludes them."""
    wanted = [media_type(part) for part in (accept or "").split(",") if part.strip()]
    if wanted and not any(w in (JSON_TYPE, "*/*", "application/*") for w in wanted):
        raise RequestError(
            HTTPStatus.NOT_ACCEPTABLE, f"Accept {accept!r}: this server answers {JSON_TYPE} only"
        )


def encode_response(
    predictions: Sequence[dict[str, Any]], model: Mapping[str, Any], timing_ms: Mapping[str, float]
) -> str:
    """``{"predictions": [{"file", "top": [{"stage", "probability"}], "error"}], "model",
    "timing_ms"}``."""
    return json.dumps(
        {
            "predictions": list(predictions),
            "model": dict(model),
            "timing_ms": {name: round(value, 3) for name, value in timing_ms.items()},
        }
    )


def error_body(status: int, message: str) -> str:
    return json.dumps({"error": message, "status": status})
