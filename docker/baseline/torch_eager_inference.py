"""Benchmark-only: the usual PyTorch serving pattern, for comparison with the serve image.

sagemaker-inference's default handler service runs this module (``SAGEMAKER_PROGRAM``), as
the PyTorch serving containers run a user's ``inference.py``: ``model_fn`` loads
``weights.pt`` in torch eager mode; each request is decoded and preprocessed by the same
flystage code as in the serve image, then run with ``torch.no_grad()``. Torch keeps its own
thread count unless ``BASELINE_TORCH_THREADS`` is set.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from flystage.artefact import load_metadata
from flystage.image_checks import ImageError
from flystage.imaging import load
from flystage.predictor import top_k
from flystage.serving import codec
from flystage.training.export import load_torch_model

if os.environ.get("BASELINE_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["BASELINE_TORCH_THREADS"]))


def model_fn(model_dir):
    metadata = load_metadata(model_dir)
    return {
        "model": load_torch_model(model_dir),
        "metadata": metadata,
        "info": {"arch": metadata.arch, "runtime": "torch-eager"},
    }


def input_fn(input_data, content_type):
    return codec.decode_request(input_data, content_type)


def predict_fn(request, model):
    start = time.perf_counter()
    metadata = model["metadata"]
    try:
        batch = np.stack(
            [
                load(image, metadata.preprocess, name=name)
                for image, name in zip(request.images, request.names)
            ]
        )
    except ImageError as exc:
        raise codec.RequestError(400, str(exc)) from None
    with torch.no_grad():
        probs = torch.softmax(model["model"](torch.from_numpy(batch)), dim=1).numpy()
    predictions = [
        {
            "file": name,
            "top": [{"stage": s, "probability": round(p, 6)} for s, p in top],
            "error": None,
        }
        for name, top in zip(request.names, top_k(probs, metadata.labels, request.k))
    ]
    return predictions, model["info"], {"predict": (time.perf_counter() - start) * 1000}


def output_fn(prediction, accept):
    return codec.encode_response(*prediction), "application/json"
