"""The model artefact: the directory SageMaker tars as ``model.tar.gz``.

It holds everything serving needs and nothing else:

- ``model.onnx``: input ``image`` float32 ``(N, C, H, W)`` in [0, 1] (dynamic batch), output
  ``logits`` ``(N, K)``; checked against torch when saved.
- ``model-int8.onnx`` (optional): the same graph statically quantised to int8 (weights per
  channel, activations calibrated on training images), written by training only when it
  answers like ``model.onnx`` on the validation images; ``metadata.json``'s ``int8`` says
  which graph was kept and why, and holds this file's SHA-256.
- ``weights.pt``: ``{"arch", "labels", "channels", "spec", "state_dict"}`` for torch users
  (fine-tuning, the eager baseline).
- ``metadata.json``: ``format_version``, ``flystage_version``, ``arch``, ``labels`` (output
  order), ``preprocess`` (``PreprocessConfig.to_dict()``), ``input_shape`` ``[C, H, W]``,
  ``metrics``, ``manifest_sha256``, ``created`` and export details.

This module reads and checks it with numpy and onnxruntime only (the serve image has no
torch); :mod:`flystage.training.export` writes it from a torch model and rebuilds that model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flystage import __version__
from flystage.errors import FlystageError
from flystage.imaging import PreprocessConfig

FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
# Which graph predict and serve run: the int8 one when the artefact has it ("auto"), or a
# given one ("int8" without the file is an error, not a silent float).
PRECISIONS = ("auto", "float", "int8")
WEIGHTS_FILE = "weights.pt"
METADATA_FILE = "metadata.json"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17
# Everything a model directory may hold when served: what save_artefact writes. Anything else
# (a code/ folder would go on the server's PYTHONPATH, code/requirements.txt be pip-installed)
# is refused by check_artefact(strict=True).
ARTEFACT_FILES = frozenset({ONNX_FILE, INT8_FILE, WEIGHTS_FILE, METADATA_FILE})


_CORE_FIELDS = frozenset(
    {
        "format_version",
        "flystage_version",
        "arch",
        "labels",
        "preprocess",
        "input_shape",
        "metrics",
        "manifest_sha256",
        "created",
    }
)


class ArtefactError(FlystageError, ValueError):
    """A model directory that is missing, incomplete or inconsistent; the message says what to
    do."""


@dataclass(frozen=True)
class Metadata:
    """``metadata.json`` of a model artefact, parsed. ``labels[i]`` is output index i."""

    format_version: int
    flystage_version: str
    arch: str
    labels: list[str]
    preprocess: PreprocessConfig
    input_shape: tuple[int, int, int]  # (C, H, W) of the model input
    metrics: dict[str, Any]
    manifest_sha256: str | None
    created: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "flystage_version": self.flystage_version,
            "arch": self.arch,
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_dict(),
            "input_shape": list(self.input_shape),
            "metrics": self.metrics,
            "manifest_sha256": self.manifest_sha256,
            "created": self.created,
            **{k: v for k, v in self.extra.items() if k not in _CORE_FIELDS},
        }


def model_input_shape(config: PreprocessConfig) -> tuple[int, int, int]:
    return (int(config.channels), int(config.height), int(config.width))


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` of a tampered value, cut short enough for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_metadata(model_dir: str | Path) -> Metadata:
    """Parse and check ``metadata.json`` of a model directory (files present, fields valid).

    Raises ``ArtefactError`` naming the directory for a missing directory or file, and naming
    ``metadata.json`` for bad JSON, missing fields, a field of the wrong type (labels not a
    list of distinct strings, ``preprocess`` not an object, ``input_shape`` not three
    integers, ...), an unknown format version, or a preprocessing config that does not match
    ``input_shape``. ``check_artefact`` also opens the ONNX model.
    """
    model_dir = Path(model_dir)
    raw = _read_metadata_json(model_dir)
    where = model_dir / METADATA_FILE
    labels = _checked_labels(where, raw)
    config, shape = _checked_preprocess(where, raw)
    metrics = raw.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise ArtefactError(
            f"{where}: 'metrics' must be a JSON object, not {short_repr(metrics)}; re-export the "
            "model"
        )
    manifest_hash = raw.get("manifest_sha256")
    if manifest_hash is not None and not isinstance(manifest_hash, str):
        raise ArtefactError(
            f"{where}: 'manifest_sha256' must be a string or null, not {short_repr(manifest_hash)}"
        )
    for key in ("flystage_version", "created"):
        if key in raw and not isinstance(raw[key], str):
            raise ArtefactError(
                f"{where}: {key!r} must be a string, not {short_repr(raw[key])}; re-export the "
                "model"
            )
    return Metadata(
        format_version=raw["format_version"],
        flystage_version=str(raw.get("flystage_version", "")),
        arch=str(raw["arch"]),
        labels=list(labels),
        preprocess=config,
        input_shape=shape,
        metrics=metrics or {},
        manifest_sha256=manifest_hash,
        created=str(raw.get("created", "")),
        extra={k: v for k, v in raw.items() if k not in _CORE_FIELDS},
    )


def _read_metadata_json(model_dir: Path) -> dict[str, Any]:
    """``metadata.json`` of ``model_dir`` as a JSON object holding the required fields
    (``ArtefactError`` for a missing directory or file, bad JSON, or an absent field)."""
    if not model_dir.is_dir():
        raise ArtefactError(
            f"{model_dir}: no such model directory; train a model or unpack model.tar.gz there"
        )
    missing = [name for name in (ONNX_FILE, METADATA_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise ArtefactError(
            f"{model_dir}: missing {', '.join(missing)}; a model directory holds {ONNX_FILE}, "
            f"{WEIGHTS_FILE} and {METADATA_FILE} (written by `flystage train`)"
        )
    try:
        raw = json.loads((model_dir / METADATA_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtefactError(
            f"{model_dir / METADATA_FILE}: not valid JSON ({exc}); re-export the model"
        ) from None
    except RecursionError:  # arrays or objects nested thousands deep: tampered, not ours
        raise ArtefactError(
            f"{model_dir / METADATA_FILE}: JSON nested too deeply; re-export the model"
        ) from None
    if not isinstance(raw, dict):
        raise ArtefactError(
            f"{model_dir / METADATA_FILE}: expected a JSON object; re-export the model"
        )
    required = ("format_version", "arch", "labels", "preprocess")
    absent = [key for key in required if key not in raw]
    if absent:
        raise ArtefactError(
            f"{model_dir / METADATA_FILE}: missing field(s) {absent}; re-export the model"
        )
    return raw


def _checked_labels(where: Path, raw: dict[str, Any]) -> list[str]:
    """The labels of ``raw`` after checking its format version and arch."""
    version = raw["format_version"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtefactError(
            f"{where}: format_version {version!r}, this flystage "
            f"{__version__} reads {FORMAT_VERSION}; use the matching flystage version or re-export"
        )
    if not isinstance(raw["arch"], str) or not raw["arch"]:
        raise ArtefactError(
            f"{where}: 'arch' must be a non-empty string, not {short_repr(raw['arch'])}; "
            "re-export the model"
        )
    labels = raw["labels"]
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(label, str) and label for label in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ArtefactError(
            f"{where}: 'labels' must be a non-empty list of distinct labels (non-empty strings), "
            f"not {short_repr(labels)}; re-export the model"
        )
    return labels


def _checked_preprocess(
    where: Path, raw: dict[str, Any]
) -> tuple[PreprocessConfig, tuple[int, int, int]]:
    """The preprocessing config of ``raw`` and its input shape, which ``input_shape`` (if
    given) must equal."""
    if not isinstance(raw["preprocess"], dict):
        raise ArtefactError(
            f"{where}: bad 'preprocess' settings (expected a JSON object, not "
            f"{short_repr(raw['preprocess'])}); re-export the model"
        )
    try:
        config = PreprocessConfig.from_dict(raw["preprocess"])
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtefactError(
            f"{where}: bad 'preprocess' settings ({exc}); re-export the model"
        ) from None
    shape = model_input_shape(config)
    if "input_shape" in raw:
        given = raw["input_shape"]
        if not isinstance(given, list) or len(given) != 3 or not all(type(d) is int for d in given):
            raise ArtefactError(
                f"{where}: 'input_shape' must be a list of three integers [C, H, W], not "
                f"{short_repr(given)}; re-export the model"
            )
        if tuple(given) != shape:
            raise ArtefactError(
                f"{where}: input_shape {given} does not match the preprocess settings {list(shape)}"
            )
    return config, shape


def int8_record(metadata: Metadata) -> dict[str, Any]:
    """``metadata.json``'s ``int8`` object (``{}`` for a model saved without one)."""
    record = metadata.extra.get("int8")
    return record if isinstance(record, dict) else {}


def graph_file(
    model_dir: str | Path, metadata: Metadata, precision: str = "auto"
) -> tuple[str, str]:
    """The ONNX file to run for ``precision`` and the precision it has: ``(file name,
    "float" | "int8")``.

    ``auto`` takes the int8 graph when training kept one (and the file is there), the float
    graph otherwise. ``int8`` on a model without one, or an int8 file whose SHA-256 is not the
    one recorded when it was kept, raises ``ArtefactError`` saying what to do.
    """
    import hashlib

    if precision not in PRECISIONS:
        raise ArtefactError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "float":
        return ONNX_FILE, "float"
    record = int8_record(metadata)
    path = Path(model_dir) / INT8_FILE
    if not record.get("kept") or not path.is_file():
        if precision == "auto":
            return ONNX_FILE, "float"
        why = record.get("reason") or "it was saved without one"
        raise ArtefactError(f"{model_dir}: no int8 model ({why}); use precision float or auto")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != record.get("sha256"):
        raise ArtefactError(
            f"{path}: not the int8 model saved with this {METADATA_FILE} (SHA-256 differs); "
            f"delete it, or re-train the model"
        )
    return INT8_FILE, "int8"


def open_session(model_dir: str | Path, threads: int | None = None, graph: str = ONNX_FILE):
    """An onnxruntime CPU session on ``model_dir/graph``; ``threads`` None = all cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = Path(model_dir) / graph
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
        raise ArtefactError(
            f"{path}: onnxruntime cannot load it ({exc}); re-export the model"
        ) from None


def check_session(
    session: Any, metadata: Metadata, model_dir: str | Path, graph: str = ONNX_FILE
) -> None:
    """Raise ``ArtefactError`` unless the ONNX graph's input/output match the metadata."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    where = Path(model_dir) / graph
    if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
        raise ArtefactError(
            f"{where}: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}', found inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in outputs]}"
        )
    in_shape = inputs[0].shape
    if len(in_shape) != 4 or [d for d in in_shape[1:]] != list(metadata.input_shape):
        raise ArtefactError(
            f"{where}: input shape {in_shape} does not match metadata input_shape "
            f"{list(metadata.input_shape)}"
        )
    out_shape = next(o.shape for o in outputs if o.name == OUTPUT_NAME)
    if len(out_shape) != 2 or out_shape[1] != len(metadata.labels):
        raise ArtefactError(
            f"{where}: the model has {out_shape[-1]} outputs but metadata.json lists "
            f"{len(metadata.labels)} labels; the files come from different models"
        )


def _left_archive(path: Path) -> bool:
    """A ``*.tar.gz`` file beside the model: the SageMaker SDK's local mode unpacks
    ``model.tar.gz`` next to itself (and ``output.tar.gz``). Never opened, so harmless."""
    return path.name.endswith(".tar.gz") and path.is_file() and not path.is_symlink()


def check_artefact(
    model_dir: str | Path, threads: int | None = 1, strict: bool = False
) -> Metadata:
    """Load the metadata and the ONNX model, and run one batch; raise ``ArtefactError`` if anything
    is off.

    The serve image calls this (``strict``: nothing but :data:`ARTEFACT_FILES` and archives
    left beside them, no links) before starting its server, so a broken or tampered model never
    reports healthy.
    """
    if strict and Path(model_dir).is_dir():
        entries = sorted(Path(model_dir).iterdir())
        extra = [
            p.name + ("/" if p.is_dir() else "")
            for p in entries
            if p.name not in ARTEFACT_FILES and not _left_archive(p)
        ]
        links = [p.name for p in entries if p.is_symlink()]
        if extra or links:
            raise ArtefactError(
                f"{model_dir}: holds {', '.join(extra + [f'{name} (a link)' for name in links])} "
                "besides the model; a flystage model.tar.gz holds only "
                f"{', '.join(sorted(ARTEFACT_FILES))} (written by `flystage train`): nothing "
                "else is served, installed or imported"
            )
    metadata = load_metadata(model_dir)
    _trial_batch(model_dir, metadata, threads, ONNX_FILE)
    if int8_record(metadata).get("kept"):
        # graph_file checks the int8 graph is there and is the one recorded.
        _trial_batch(model_dir, metadata, threads, graph_file(model_dir, metadata, "int8")[0])
    return metadata


def _trial_batch(
    model_dir: str | Path, metadata: Metadata, threads: int | None, graph: str
) -> None:
    """Open ``graph`` and run a batch of two through it; ``ArtefactError`` if anything is off."""
    where = Path(model_dir) / graph
    session = open_session(model_dir, threads, graph)
    check_session(session, metadata, model_dir, graph)
    batch = np.zeros((2, *metadata.input_shape), dtype=np.float32)
    try:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    except Exception as exc:
        raise ArtefactError(f"{where}: a trial batch failed ({exc}); re-export the model") from None
    if logits.shape != (2, len(metadata.labels)) or not np.all(np.isfinite(logits)):
        raise ArtefactError(
            f"{where}: a trial batch gave shape {logits.shape} or non-finite logits"
        )
