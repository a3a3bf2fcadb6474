"""The inference handler that multi-model-server's workers run: model, input, predict, output.

sagemaker-inference's ``Transformer`` calls, for each request,
``input_fn(body, content_type)`` -> ``predict_fn(request, model)`` -> ``output_fn(result, accept)``
after ``model_fn(model_dir)`` and a warm-up once per worker. The model is the artefact's
``model.onnx`` on onnxruntime (:class:`flystage.predictor.Predictor`), with the artefact's own
preprocessing; decoding an image is part of prediction, so an unreadable image is a 400 that
names it. Errors are answered as JSON ``{"error": message, "status": code}``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
from sagemaker_inference import utils
from sagemaker_inference.content_types import JSON, UTF8_TYPES
from sagemaker_inference.default_inference_handler import DefaultInferenceHandler
from sagemaker_inference.errors import BaseInferenceToolkitError
from sagemaker_inference.transformer import Transformer

from flystage.imaging import preprocess, set_threads
from flystage.predictor import Predictor
from flystage.serving import codec, settings

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """What ``model_fn`` loads once per worker."""

    predictor: Predictor
    info: dict[str, Any]
    max_batch: int
    max_bytes: int


def model_info(predictor: Predictor) -> dict[str, Any]:
    """The model facts every answer carries; ``version`` is the SHA-256 prefix of the ONNX graph
    that runs (``precision`` says which: float or int8)."""
    meta = predictor.metadata
    digest = hashlib.sha256((predictor.model_dir / predictor.graph).read_bytes()).hexdigest()
    return {
        "version": digest[:16],
        "precision": predictor.precision,
        "arch": meta.arch,
        "labels": list(meta.labels),
        "flystage_version": meta.flystage_version,
        "created": meta.created,
        "manifest_sha256": meta.manifest_sha256,
    }


def request_headers(context: Any) -> dict[str, str]:
    """The HTTP headers of the current request (MMS passes one request per batch by default)."""
    try:
        return dict(context.request_processor[0].get_request_properties())
    except (AttributeError, IndexError, TypeError):
        return {}


class InferenceHandler(DefaultInferenceHandler):
    """flystage's model, input, predict and output functions (the toolkit's defaults replaced)."""

    def default_model_fn(self, model_dir: str, context: Any = None) -> ServedModel:
        config = settings.resolve()
        predictor = Predictor(model_dir, threads=config.threads, precision=config.precision)
        set_threads(config.threads)  # one CPU's share per worker, OpenCV included
        logger.info(
            "flystage model %s (%s graph %s) loaded from %s (%d onnxruntime threads)",
            predictor.metadata.arch,
            predictor.precision,
            predictor.graph,
            model_dir,
            config.threads,
        )
        return ServedModel(
            predictor, model_info(predictor), config.max_batch, config.max_payload_bytes
        )

    def default_model_warmup_fn(
        self, model_dir: str, model: ServedModel, context: Any = None
    ) -> None:
        # The first run of onnxruntime and of OpenCV's resizers is slow; pay it before the
        # worker takes requests, not on the first request (it would be the p99).
        predictor = model.predictor
        channels, height, width = predictor.metadata.input_shape
        image = np.zeros((height * 2, width * 2), dtype=np.uint16)
        image[height // 2 : height * 3 // 2, width // 2 : width * 3 // 2] = 40000
        predictor.predict_arrays(np.stack([preprocess(image, predictor.config)] * 2))
        # Everything loaded so far lives as long as the worker: out of the collector's sight,
        # a full collection during a request no longer walks it (a source of the slowest
        # requests at concurrency 1; docs/speed.md).
        gc.collect()
        gc.freeze()

    def default_input_fn(
        self, input_data: Any, content_type: str, context: Any = None
    ) -> codec.Request:
        model: ServedModel = self._model  # set by FlystageTransformer.validate_and_initialize
        headers = request_headers(context)
        codec.check_accept(next((v for k, v in headers.items() if k.lower() == "accept"), None))
        return codec.decode_request(
            input_data,
            content_type,
            headers,
            num_labels=len(model.predictor.labels),
            max_batch=model.max_batch,
            max_bytes=model.max_bytes,
        )

    def default_predict_fn(
        self, data: codec.Request, model: ServedModel, context: Any = None
    ) -> dict[str, Any]:
        start = time.perf_counter()
        predictions = model.predictor.predict_sources(data.images, k=data.k, names=data.names)
        errors = [p.error for p in predictions if p.error]
        if errors:
            # One bad image fails the whole request: the client resends the good ones.
            raise codec.RequestError(HTTPStatus.BAD_REQUEST, "; ".join(errors))
        done = time.perf_counter()
        return {
            "predictions": [p.to_dict() for p in predictions],
            "model": model.info,
            "timing_ms": {"predict": (done - start) * 1000, "total": (done - data.received) * 1000},
        }

    def default_output_fn(
        self, prediction: dict[str, Any], accept: str, context: Any = None
    ) -> tuple[str, str]:
        return codec.encode_response(
            prediction["predictions"], prediction["model"], prediction["timing_ms"]
        ), JSON


class FlystageTransformer(Transformer):
    """The toolkit's Transformer, with JSON error bodies and a 400 for non-UTF-8 JSON."""

    def __init__(self) -> None:
        handler = InferenceHandler()
        super().__init__(default_inference_handler=handler)
        self._handler = handler

    def validate_and_initialize(self, model_dir=None, context=None):  # noqa: D102 - toolkit API
        super().validate_and_initialize(model_dir=model_dir, context=context)
        # input_fn needs the model's label count and batch limit.
        self._handler._model = self._model

    def transform(self, data, context):  # noqa: D102 - toolkit API
        for item, processor in zip(data, getattr(context, "request_processor", None) or []):
            content_type = utils.retrieve_content_type_header(processor.get_request_properties())
            body = item.get("body")
            if content_type in UTF8_TYPES and isinstance(body, (bytes, bytearray)):
                try:
                    bytes(body).decode("utf-8")
                except UnicodeDecodeError as exc:
                    error = codec.RequestError(
                        HTTPStatus.BAD_REQUEST,
                        f"the JSON body is not UTF-8 text ({exc}); send UTF-8 JSON",
                    )
                    return self.handle_error(context, error, "")
        return super().transform(data, context)

    @staticmethod
    def handle_error(
        context: Any, inference_exception: BaseInferenceToolkitError, trace: str
    ) -> list[str]:
        status = int(inference_exception.status_code)
        if status >= 500:
            logger.error("request failed: %s\n%s", inference_exception.message, trace)
        else:
            logger.info("request refused (%d): %s", status, inference_exception.message)
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        context.set_response_status(code=status, phrase=phrase)
        context.set_response_content_type(0, JSON)
        return [codec.error_body(status, str(inference_exception.message))]


def response_json(body: Any) -> dict[str, Any]:
    """Parse a handler answer (str or bytes) back to a dict (tests and clients)."""
    return json.loads(body if isinstance(body, str) else bytes(body).decode("utf-8"))
