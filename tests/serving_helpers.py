"""Test and benchmark helpers for serving: a small trained artefact, and lab-like request bodies."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import tifffile

# Small model input: a real artefact that trains in seconds on 2 cores.
TINY_HEIGHT, TINY_WIDTH = 32, 80


def bdgp_records(bdgp_root: Path, train_per_stage: int = 3, valid_per_stage: int = 1):
    """(train, valid) Records: the first images of every stage, grouped by gene, from labels.csv."""
    from flystage.manifest import Record

    by_stage: dict[str, list[dict[str, str]]] = {}
    with open(bdgp_root / "labels.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_stage.setdefault(row["stage_range"], []).append(row)
    train, valid = [], []
    for stage, rows in sorted(by_stage.items()):
        for i, row in enumerate(rows[: train_per_stage + valid_per_stage]):
            split = "train" if i < train_per_stage else "valid"
            record = Record(bdgp_root / row["path"], stage, row["gene"], split, row["sha1"])
            (train if split == "train" else valid).append(record)
    return train, valid


def train_artefact(model_dir: Path, bdgp_root: Path, epochs: int = 1):
    """Train a small CNN on a few real BDGP images with ``flystage.training.loop.fit`` and save
    the artefact."""
    import torch

    from flystage.imaging import PreprocessConfig
    from flystage.training.config import TrainConfig
    from flystage.training.export import save_artefact
    from flystage.training.loop import fit

    torch.set_num_threads(1)
    train, valid = bdgp_records(bdgp_root)
    config = TrainConfig(
        arch="small_cnn",
        epochs=epochs,
        batch_size=8,
        threads=1,
        patience=0,
        preprocess=PreprocessConfig(height=TINY_HEIGHT, width=TINY_WIDTH, channels=1),
    )
    result = fit(train, valid, config, log=lambda line: None)
    return save_artefact(
        model_dir, result.model, config.arch, result.labels, config.preprocess, result.best
    )


def default_artefact(model_dir: Path, labels: list[str]):
    """The default architecture and input size (``TrainConfig()``), untrained: for speed figures
    only."""
    import torch

    from flystage.training.config import TrainConfig
    from flystage.training.export import save_artefact
    from flystage.training.models import build_from_spec

    torch.manual_seed(0)
    config = TrainConfig()
    spec = config.architecture()
    model = build_from_spec(spec, len(labels), config.preprocess.channels).eval()
    return save_artefact(
        model_dir, model, config.arch, labels, config.preprocess, {"note": "untrained"}, spec=spec
    )


def lab_image(height: int = 420, width: int = 1110, seed: int = 0) -> np.ndarray:
    """A dim 16-bit fluorescence-like embryo (the lab's 1110 x 420 TIFFs): uint16 ``(H, W)``."""
    rng = np.random.default_rng(seed)
    image = rng.normal(300, 30, (height, width))
    mask = np.zeros((height, width), np.uint8)
    cv2.ellipse(
        mask,
        (width // 2, height // 2),
        (int(width * 0.4), int(height * 0.33)),
        5 * seed,
        0,
        360,
        1,
        -1,
    )
    stripes = 1 + 0.4 * np.sin(np.arange(width) / (6 + seed % 7))[None, :]
    image += mask.astype(np.float64) * (1500 + 200 * (seed % 5)) * stripes
    return np.clip(image, 0, 65535).astype(np.uint16)


def tiff_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image)
    return buffer.getvalue()


def encoded(image: np.ndarray, ext: str) -> bytes:
    """``image`` as an 8-bit ``.png``/``.jpg``/``.bmp`` file's bytes."""
    eight = (
        (image / max(1, int(image.max())) * 255).astype(np.uint8)
        if image.dtype != np.uint8
        else image
    )
    ok, data = cv2.imencode(ext, eight)
    if not ok:
        raise ValueError(f"OpenCV cannot encode {ext}")
    return data.tobytes()


# Each image format the server reads, with its own content type (extension, content type).
IMAGE_TYPES = [
    (".tif", "image/tiff"),
    (".png", "image/png"),
    (".jpg", "image/jpeg"),
    (".bmp", "image/bmp"),
]


def image_body(ext: str, seed: int) -> bytes:
    """A lab-like image as a request body: a 16-bit TIFF for ``.tif``, else 8-bit ``ext``."""
    image = lab_image(seed=seed)
    return tiff_bytes(image) if ext == ".tif" else encoded(image, ext)


@contextlib.contextmanager
def healthy_serve_container(model_dir: Path, image: str, environment: dict | None = None):
    """The serve image on model_dir with one model-server worker (and ``environment``), once
    /ping answers 200 (three minutes at most); removed on leaving, also when it never became
    healthy."""
    from flystage.serving.container import start_serve_container

    one_worker = {"SAGEMAKER_MODEL_SERVER_WORKERS": "1", **(environment or {})}
    with start_serve_container(model_dir, image, environment=one_worker) as container:
        container.wait_healthy(timeout=180)
        yield container


def handler_service(model_dir: Path):
    """(HandlerService, Context) for ``model_dir``, initialised with MMS's own Context as the
    model server's worker does."""
    from mms.context import Context

    from flystage.serving.handler_service import HandlerService

    handler = HandlerService()
    context = Context("model", str(model_dir), None, 1, None, "1.1.11")
    handler.initialize(context)
    return handler, context


def invoke(service, body, content_type: str, headers=None) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of ``body`` sent to ``service`` (:func:`handler_service`)."""
    from mms.context import RequestProcessor

    handler, context = service
    context.request_processor = [
        RequestProcessor({"Content-Type": content_type, **(headers or {})})
    ]
    # The toolkit decodes JSON bodies to str before input_fn; everything else stays bytes.
    answer = handler.handle([{"body": bytearray(body)}], context)
    return context.get_response_status(0)[0], json.loads(answer[0])
