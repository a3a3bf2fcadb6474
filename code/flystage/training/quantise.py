"""The artefact's int8 graph: ``model.onnx`` statically quantised, kept only when it answers
like the float graph.

:func:`quantise` writes a QDQ copy of a float ONNX model: weights int8 per output channel,
activations uint8 with ranges calibrated (MinMax) on preprocessed images. Only the image data
path of the backbone is quantised (:func:`data_path_nodes`: every ``Conv`` but the stem's, and
the ``Clip`` activations and residual ``Add`` fed by it), chosen by node name; everything else
stays float (the stem, which sees the image itself):
the pooled features, the probe's column-band ``MatMul``, the feature standardisation
(``Sub``/``Div`` on ``mean``/``std``), the head's ``Gemm``, a temperature ``Div``, an
ensemble's averaging, and the "same"-padding arithmetic on the input's shape.

The choices were measured (``make bench-int8-choices``, ``make bench-accuracy [LABLIKE=1]``;
tables in docs/speed.md): with static padding in the export, this graph takes about half the
float graph's CPU time per image (6.2 against 12.9 ms, one thread) and names the float graph's
top-1 stage on 97.9 % of the 193 BDGP images; ``Conv`` alone was slower and agreed less,
Percentile and Entropy calibration no better, more calibration images no better than 64. In
leave-one-gene-out cross-validation int8 changed top-1 by +1.6 points [+0.0, +5.7] on BDGP and
-0.9 [-1.9, +0.7] on the lab-like copies (-3.6 [-5.5, -0.8] with the stem quantised too).

:func:`add_int8` quantises a model directory's graph, scores both graphs on the validation
images and keeps ``model-int8.onnx`` only when it loses at most ``allowed_loss`` correct top-1
and top-3 answers and names the float graph's top-1 on at least ``MIN_AGREEMENT`` of the
validation and calibration images; ``metadata.json``'s ``int8`` records the decision either way
(:func:`flystage.artefact.int8_record`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from flystage.artefact import (
    INPUT_NAME,
    INT8_FILE,
    METADATA_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    model_input_shape,
    open_session,
)
from flystage.files import atomic_path, atomic_write
from flystage.imaging import PreprocessConfig, load

CALIBRATION_IMAGES = 64
INT8_FORMAT = "QDQ"
CALIBRATION_METHOD = "MinMax"
# The op types quantised, and only where they carry the image (data_path_nodes).
QUANT_OP_TYPES = ("Conv", "Add", "Clip")
# Correct answers (top-1, and top-3) the int8 graph may lose against the float graph on the
# validation images and still be kept.
ALLOWED_LOSS = 1
# ... and the share of validation and calibration images together on which its top-1 must be
# the float graph's. A validation split of ten images cannot see a loss of a few points; the
# agreement over some 70 images can: the stem quantised too agreed on 89 % of BDGP and lost
# 3.6 points of lab-like top-1, the default agrees on 98 % (docs/speed.md).
MIN_AGREEMENT = 0.95
# onnxruntime's batch when scoring: the serving batch the speed was measured at.
SCORE_BATCH = 16


def data_path_nodes(model: Any) -> list[str]:
    """Names of the nodes of an ``onnx.ModelProto`` to quantise: every ``Conv`` but the ones
    reading the model input, and every ``Add``/``Clip`` that takes the output of a node already
    chosen (activations, residual sums). The shape arithmetic of "same" padding (``Add``/``Clip``
    on constants) and everything after pooling are never reached, so they stay float.

    The stem convolutions stay float because their input is the image itself: quantised, a dim
    16-bit image would keep 256 grey levels (8 bits of its [0, 1] range) before the first layer.
    Measured on a trained default probe over the 193 BDGP images (one thread, batch 16): top-1
    as float's on 96.4 % with the stem quantised, 97.9 % with it float, at the same speed.
    """
    from_image = {i.name for i in model.graph.input}  # the image, scaled, flipped, sliced
    chosen: list[str] = []
    carrying: set[str] = set()  # tensors on the quantised data path
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        if node.op_type in _PASS_THROUGH and any(i in from_image for i in node.input):
            from_image.update(node.output)
        if node.op_type == "Conv" and node.input[0] not in from_image:
            chosen.append(node.name)
            carrying.update(node.output)
        elif node.op_type in QUANT_OP_TYPES[1:] and any(i in carrying for i in node.input):
            chosen.append(node.name)
            carrying.update(node.output)
    return chosen


# Nodes between the model input and a stem convolution: scaling to [-1, 1], flips, slicing,
# joining the flipped copies into one batch, a constant "same" padding not yet folded away.
_PASS_THROUGH = frozenset(
    {
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Slice",
        "Concat",
        "Expand",
        "Reshape",
        "Transpose",
        "Identity",
        "Pad",
        "Cast",
        "Unsqueeze",
        "Squeeze",
    }
)


class _Batches(CalibrationDataReader):
    """onnxruntime's calibration reader over images ``(N, C, H, W)`` float32, 8 at a time."""

    def __init__(self, images: np.ndarray) -> None:
        self._batches = iter([{INPUT_NAME: images[i : i + 8]} for i in range(0, len(images), 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantise(source: str | Path, dest: str | Path, calibration: np.ndarray) -> None:
    """Write to ``dest`` the QDQ int8 copy of the float ONNX model ``source``, activation
    ranges calibrated on ``calibration`` float32 ``(N, C, H, W)`` in [0, 1] (preprocessed as
    the model's metadata says). Raises ``ValueError`` for no or badly shaped images."""
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or not len(calibration):
        raise ValueError(
            f"calibration images must be a non-empty (N, C, H, W) array, got {calibration.shape}"
        )
    reader = _Batches(calibration)
    with tempfile.TemporaryDirectory(prefix="flystage-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Folds constants and infers shapes (the symbolic pass fails on these exports; the
        # batch axis is the only dynamic one, so onnx's own inference suffices).
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        nodes = data_path_nodes(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(dest),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANT_OP_TYPES),
            nodes_to_quantize=nodes,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def stratified_sample(labels: Sequence[str], n: int, seed: int) -> list[int]:
    """Indices of up to ``n`` of the items whose labels are ``labels``: the labels taken in
    turn (each label's items in a seeded order), so every label is as equally represented as
    its count allows. Sorted."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    queues = [list(rng.permutation(by_label[label])) for label in sorted(by_label)]
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(int(queue.pop(0)))
    return sorted(chosen)


def onnx_logits(
    model_dir: str | Path, graph: str, images: np.ndarray, threads: int | None = None
) -> np.ndarray:
    """Logits ``(N, K)`` float32 of ``model_dir/graph`` on images ``(N, C, H, W)`` float32."""
    session = open_session(model_dir, threads, graph)
    images = np.ascontiguousarray(images, dtype=np.float32)
    out = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + SCORE_BATCH]})[0]
        for i in range(0, len(images), SCORE_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def correct_counts(logits: np.ndarray, targets: np.ndarray) -> tuple[int, int]:
    """Images whose target is the top-1, and among the top-3, of ``logits`` ``(N, K)``
    (ties to the earlier class, as predict ranks)."""
    ranked = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :3]
    targets = np.asarray(targets)[:, None]
    return int((ranked[:, :1] == targets).sum()), int((ranked == targets).any(axis=1).sum())


def keep_decision(
    float_counts: tuple[int, int],
    int8_counts: tuple[int, int],
    allowed_loss: int = ALLOWED_LOSS,
    agreement: float | None = None,
    min_agreement: float = MIN_AGREEMENT,
) -> tuple[bool, str]:
    """Whether the int8 graph is kept, and why: each of its correct top-1 and top-3 counts at
    most ``allowed_loss`` below the float graph's, and its top-1 the float graph's on at least
    ``min_agreement`` of the images checked (``agreement``, when given)."""
    (f1, f3), (q1, q3) = float_counts, int8_counts
    counts = f"top-1 correct {q1} vs float {f1}, top-3 correct {q3} vs float {f3}"
    if agreement is not None:
        counts += f", same top-1 as float on {agreement:.1%} (at least {min_agreement:.0%})"
    if q1 < f1 - allowed_loss or q3 < f3 - allowed_loss:
        return False, (
            f"float graph kept: int8 loses too much ({counts}; at most {allowed_loss} fewer "
            "allowed)"
        )
    if agreement is not None and agreement < min_agreement:
        return False, f"float graph kept: int8 answers too differently ({counts})"
    return True, f"int8 graph kept: {counts} (at most {allowed_loss} fewer allowed)"


def agreement_check(
    model_dir: str | Path,
    graph: str,
    images: np.ndarray,
    threads: int | None = None,
) -> float:
    """The share of ``images`` whose top-1 under ``model_dir/graph`` is ``model.onnx``'s."""
    ours = onnx_logits(model_dir, graph, images, threads).argmax(1)
    return float(np.mean(ours == onnx_logits(model_dir, ONNX_FILE, images, threads).argmax(1)))


def write_int8_record(model_dir: str | Path, record: dict[str, Any]) -> None:
    """Set ``metadata.json``'s ``int8`` to ``record``, atomically (temp file, then replace)."""
    path = Path(model_dir) / METADATA_FILE
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata["int8"] = record
    with atomic_write(path) as f:
        f.write(json.dumps(metadata, indent=2) + "\n")


def add_int8(
    model_dir: str | Path,
    calibration: np.ndarray,
    valid_images: np.ndarray,
    valid_targets: np.ndarray,
    log: Callable[[str], None] = print,
    *,
    allowed_loss: int = ALLOWED_LOSS,
    min_agreement: float = MIN_AGREEMENT,
    threads: int | None = None,
) -> dict[str, Any]:
    """Quantise ``model_dir/model.onnx`` (calibrated on ``calibration`` float32 ``(N, C, H, W)``
    in [0, 1]), score both graphs on ``valid_images`` (same form) against ``valid_targets``
    ``(n,)`` class indices, compare their top-1 on the validation and calibration images
    together, and keep ``model-int8.onnx`` by :func:`keep_decision`.

    Returns the record written to ``metadata.json``'s ``int8`` (kept, reason, sha256 when kept,
    format, image counts, correct counts, top-1 agreement, seconds) and logs one line. No
    int8 file is left unless kept; a failure to quantise leaves the float model as it was and
    is recorded (kept false, the error as the reason).
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    dest = model_dir / INT8_FILE
    record: dict[str, Any] = {
        "format": INT8_FORMAT,
        "calibration_method": CALIBRATION_METHOD,
        "calibration_images": int(len(calibration)),
        "valid_images": int(len(valid_images)),
    }
    # Written under a temporary name, moved into place only when kept (removed otherwise).
    with atomic_path(dest) as partial:
        try:
            if not len(valid_images):
                raise ValueError("no validation images to compare it with the float graph on")
            quantise(model_dir / ONNX_FILE, partial, calibration)
            float_logits = onnx_logits(model_dir, ONNX_FILE, valid_images, threads)
            int8_logits = onnx_logits(model_dir, partial.name, valid_images, threads)
            checked = np.concatenate([valid_images, calibration])
            agreement = agreement_check(model_dir, partial.name, checked, threads)
        except Exception as exc:  # onnxruntime's quantiser raises untyped errors
            partial.unlink(missing_ok=True)
            record.update(_failure(model_dir, exc))
        else:
            float_counts = correct_counts(float_logits, valid_targets)
            int8_counts = correct_counts(int8_logits, valid_targets)
            kept, reason = keep_decision(
                float_counts, int8_counts, allowed_loss, agreement, min_agreement
            )
            record.update(
                kept=kept,
                reason=reason,
                float_top1_correct=float_counts[0],
                int8_top1_correct=int8_counts[0],
                float_top3_correct=float_counts[1],
                int8_top3_correct=int8_counts[1],
                top1_agreement=round(
                    float(np.mean(float_logits.argmax(1) == int8_logits.argmax(1))), 6
                ),
                checked_top1_agreement=round(agreement, 6),
                checked_images=int(len(checked)),
            )
            if kept:
                record["sha256"] = hashlib.sha256(partial.read_bytes()).hexdigest()
            else:
                partial.unlink(missing_ok=True)
                dest.unlink(missing_ok=True)
    return _finish(model_dir, record, t0, log)


def _failure(model_dir: Path, exc: Exception) -> dict[str, Any]:
    """The record of an int8 graph that could not be made; no int8 file is left."""
    (model_dir / INT8_FILE).unlink(missing_ok=True)
    cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return {"kept": False, "reason": f"float graph kept: quantising to int8 failed ({cause})"}


def _finish(
    model_dir: Path, record: dict[str, Any], t0: float, log: Callable[[str], None]
) -> dict[str, Any]:
    record["seconds"] = round(time.perf_counter() - t0, 1)
    write_int8_record(model_dir, record)
    log(f"{record['reason']} ({record.get('valid_images', 0)} valid images, {record['seconds']} s)")
    return record


def preprocessed(paths: Sequence[str | Path], config: PreprocessConfig) -> np.ndarray:
    """Model inputs float32 ``(N, C, H, W)`` in [0, 1] of image files, as predict makes them
    (:func:`flystage.imaging.load`: ``read_image`` then ``preprocess``)."""
    c, h, w = model_input_shape(config)
    if not paths:
        return np.zeros((0, c, h, w), np.float32)
    return np.stack([load(path, config) for path in paths]).astype(np.float32, copy=False)


def add_int8_for_run(
    model_dir: str | Path,
    config: PreprocessConfig,
    labels: Sequence[str],
    train_records: Sequence[Any],
    valid_records: Sequence[Any],
    seed: int,
    log: Callable[[str], None] = print,
    *,
    calibration_images: int = CALIBRATION_IMAGES,
    threads: int | None = None,
) -> dict[str, Any]:
    """:func:`add_int8` for a training run: calibrated on a label-stratified sample
    (:func:`stratified_sample`, ``seed``) of up to ``calibration_images`` training records,
    checked on every validation record (``.path``, ``.label``; ``labels`` = output order)."""
    t0 = time.perf_counter()
    chosen = stratified_sample([r.label for r in train_records], calibration_images, seed)
    index = {label: i for i, label in enumerate(labels)}
    try:
        calibration = preprocessed([train_records[i].path for i in chosen], config)
        valid_images = preprocessed([r.path for r in valid_records], config)
        valid_targets = np.array([index[r.label] for r in valid_records], dtype=np.int64)
    except Exception as exc:  # an image gone since training: the float model stands
        return _finish(Path(model_dir), _failure(Path(model_dir), exc), t0, log)
    return add_int8(model_dir, calibration, valid_images, valid_targets, log, threads=threads)
