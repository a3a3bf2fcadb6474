"""The predictor: top-k stages for images, with onnxruntime (no torch on this path).

:class:`Predictor` runs a model directory's ONNX graph with the artefact's own preprocessing.
Anything with ``predict_sources(sources, k, names) -> list[Prediction]`` (a
``SourcePredictor``: the local ``Predictor``, or an HTTP client for the serve container or a
SageMaker endpoint) plugs into :func:`predict_files` (a folder's images in batches), the
outputs of :mod:`flystage.outputs`, the renaming of :mod:`flystage.rename` and the command
line of :mod:`flystage.predict`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from flystage.artefact import (
    INPUT_NAME,
    OUTPUT_NAME,
    Metadata,
    check_session,
    graph_file,
    load_metadata,
    open_session,
)
from flystage.image_checks import ImageError
from flystage.imaging import preprocess
from flystage.reading import read_image

Source = str | Path | bytes
# Chosen by bench-predict on 2 cores (docs/speed.md): batches in flight, each on one
# onnxruntime thread, with image reading on its own threads.
DEFAULT_WORKERS = 2
DEFAULT_READERS = 1


@dataclass
class Prediction:
    """The top-k (label, probability) pairs for one image, or the reason it has none."""

    source: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "top": [{"stage": label, "probability": round(p, 6)} for label, p in self.top],
            "error": self.error,
        }


def is_unsure(prediction: Prediction, below: float | None) -> bool | None:
    """Whether the top-1 probability is below ``below``; None without a threshold or a prediction.

    The same cut as the evaluate report's coverage table: an image with ``p >= below`` is
    accepted, so ``--unsure-below 0.8`` marks the images left out of its ``p >= 0.80`` row.
    """
    if below is None or prediction.error or not prediction.top:
        return None
    return prediction.top[0][1] < below


class SourcePredictor(Protocol):
    """Sends a batch of images somewhere and gets the top-k back (local ONNX or remote)."""

    def predict_sources(
        self, sources: Sequence[Source], k: int = 3, names: Sequence[str] | None = None
    ) -> list[Prediction]: ...


# ---- the model -------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits, float32, computed stably in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, labels: Sequence[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """For each row of ``(N, K)`` probabilities, the ``min(k, K)`` best (label, probability)."""
    k = max(1, min(int(k), probs.shape[1]))
    # A stable sort keeps stage order among ties, so equal probabilities list deterministically.
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(labels[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


class Predictor:
    """The artefact's ONNX model on onnxruntime, with the artefact's own preprocessing.

    ``threads`` bounds onnxruntime's intra-op threads (None: all cores). ``precision`` picks
    the graph (:func:`flystage.artefact.graph_file`): ``auto`` runs the int8 graph when training
    kept one; ``self.precision`` and ``self.graph`` say which runs.
    """

    def __init__(self, model_dir: str | Path, threads: int | None = None, precision: str = "auto"):
        self.model_dir = Path(model_dir)
        self.metadata: Metadata = load_metadata(self.model_dir)
        self.graph, self.precision = graph_file(self.model_dir, self.metadata, precision)
        self.session = open_session(self.model_dir, threads, self.graph)
        check_session(self.session, self.metadata, self.model_dir, self.graph)
        self.labels = list(self.metadata.labels)
        self.config = self.metadata.preprocess

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, K)`` float32 for a preprocessed batch float32 ``(N, C, H, W)`` in [0,
        1]."""
        batch = np.asarray(batch)
        expected = tuple(self.metadata.input_shape)
        if batch.dtype != np.float32 or batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(
                f"batch must be float32 (N, {', '.join(map(str, expected))}), got {batch.dtype} "
                f"{batch.shape}"
            )
        if len(batch) == 0:
            return np.zeros((0, len(self.labels)), np.float32)
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})[0]
        return softmax(logits)

    def prepare(self, source: Source, name: str) -> np.ndarray | str:
        """The model input float32 ``(C, H, W)`` in [0, 1] for one image (path or bytes), or why
        there is none: the decoder's error, or ``blank image (...)``.

        A blank image (every pixel NaN, or one value, or no contrast left after preprocessing)
        gets no input: the model would name three stages for nothing, and --rename would put
        them in its name.
        """
        try:
            image = read_image(source, page=self.config.page, name=name)
            blank = blank_reason(image)
            array = None if blank else preprocess(image, self.config)
            if array is not None and float(array.max() - array.min()) == 0.0:
                blank = "no contrast left after preprocessing"
        except ImageError as exc:
            return str(exc)
        if blank:
            return f"{name}: blank image ({blank}); not predicted"
        return array

    def predict_prepared(
        self, prepared: Sequence[np.ndarray | str], names: Sequence[str], k: int = 3
    ) -> list[Prediction]:
        """Predictions for the outputs of :meth:`prepare` (one batch through the model)."""
        predictions = [Prediction(name) for name in names]
        good = [i for i, item in enumerate(prepared) if not isinstance(item, str)]
        for i, item in enumerate(prepared):
            if isinstance(item, str):
                predictions[i].error = item
        if good:
            probs = self.predict_arrays(np.stack([prepared[i] for i in good]))
            for i, top in zip(good, top_k(probs, self.labels, k)):
                predictions[i].top = top
        return predictions

    def predict_sources(
        self, sources: Sequence[Source], k: int = 3, names: Sequence[str] | None = None
    ) -> list[Prediction]:
        """Top-k for each image (path or bytes); an unreadable or blank image gets its ``error``
        instead (:meth:`prepare`); a blank image's row says ``blank image (...)`` and it keeps its
        name."""
        names = (
            list(names) if names is not None else [source_name(s, i) for i, s in enumerate(sources)]
        )
        prepared = [self.prepare(source, name) for source, name in zip(sources, names)]
        return self.predict_prepared(prepared, names, k)


def blank_reason(image: np.ndarray) -> str | None:
    """Why a decoded image holds nothing to stage (all NaN/infinite, or one value), or None."""
    if image.size == 0:
        return "no pixels"
    values = image
    if image.dtype.kind in "fc":
        finite = np.isfinite(image)
        if not finite.any():
            return "every pixel is NaN or infinite"
        if not finite.all():
            values = image[finite]
    lo, hi = values.min(), values.max()
    if lo == hi:
        return f"every pixel is {lo.item():g}"
    return None


def source_name(source: Source, index: int) -> str:
    """What to call a source in outputs and errors: its path, or ``<image i>`` for bytes."""
    return f"<image {index}>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


# ---- folders ---------------------------------------------------------------------------------


def predict_files(
    predictor: SourcePredictor,
    paths: Sequence[Path],
    root: Path | None = None,
    k: int = 3,
    batch_size: int = 16,
    progress: bool | None = None,
    workers: int = 1,
    readers: int = 1,
) -> list[Prediction]:
    """Predictions for ``paths`` in batches, in order, named relative to ``root``.

    A local :class:`Predictor` runs as a pipeline (:func:`flystage.batches.pipelined_batches`):
    ``readers`` threads decode and preprocess ahead while ``workers`` batches run the model. A
    remote predictor gets ``workers`` batches in flight at once. A tqdm bar with images/s shows
    on a terminal.
    """
    from tqdm import tqdm

    names = [_relative_name(p, root) for p in paths]
    if hasattr(predictor, "prepare") and hasattr(predictor, "predict_prepared"):
        from flystage.batches import pipelined_batches

        batches = pipelined_batches(
            predictor, paths, names, k, batch_size, workers=workers, readers=readers
        )
    else:
        batches = _remote_batches(predictor, paths, names, k, batch_size, workers)
    out: list[Prediction] = []
    # disable=None: a bar on a terminal, silence in logs and CI.
    with tqdm(
        total=len(paths), unit="img", disable=None if progress is None else not progress
    ) as bar:
        for batch in batches:
            out.extend(batch)
            bar.update(len(batch))
    return out


def _remote_batches(
    predictor: SourcePredictor,
    paths: Sequence[Path],
    names: Sequence[str],
    k: int,
    batch_size: int,
    workers: int,
) -> Iterator[list[Prediction]]:
    """Batches sent ``workers`` at a time (requests overlap), yielded in order."""
    from concurrent.futures import ThreadPoolExecutor

    step = max(1, batch_size)
    chunks = [slice(start, start + step) for start in range(0, len(paths), step)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = []
        for i, chunk in enumerate(chunks):
            pending.append(
                pool.submit(predictor.predict_sources, list(paths[chunk]), k=k, names=names[chunk])
            )
            # Collect in order, with at most `workers` + 1 batches in memory.
            while pending and (len(pending) > max(1, workers) or i == len(chunks) - 1):
                yield pending.pop(0).result()


def _relative_name(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def describe_model(predictor: Predictor) -> dict[str, Any]:
    """The predictions JSON's ``"model"`` block for a local model: which one answered.

    ``model_dir`` is absolute, so ``flystage review`` finds the model from any folder.
    """
    md = predictor.metadata
    return {
        "model_dir": str(predictor.model_dir.expanduser().resolve()),
        "arch": md.arch,
        "precision": predictor.precision,
        "labels": md.labels,
        "flystage_version": md.flystage_version,
        "created": md.created,
        "manifest_sha256": md.manifest_sha256,
    }
