"""The choices behind the int8 graph and the export, measured: the table in docs/speed.md.

    python bench/bench_int8_choices.py [--model DIR]
    make bench-int8-choices

Trains the default model on the 193 BDGP images (``flystage train``; or takes ``--model``),
then, on the same images through the toolkit's preprocessing, for each variant prints one JSON
line: the share of images whose top-1 stage is the float graph's (``same_top1``), the largest
change of a probability (median and 95th percentile over images), the model's CPU time per image
(onnxruntime, one thread, batch 16; best of three rounds, so ratios within one run are what
count on a shared machine) and the seconds to quantise. Variants:

- ``float, dynamic padding``: the graph as torch exported it before ``with_static_padding``;
- ``float``: the artefact's ``model.onnx``;
- ``int8 default``: :func:`flystage.training.quantise.quantise` (Conv + Add + Clip on the data
  path, stem float, MinMax on 64 images);
- ``int8, stem quantised too``, ``int8, Conv only``, ``int8, Percentile``, ``int8, Entropy``,
  ``int8, 193 calibration images``: one choice changed each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from common import DATA, trained_model


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cpu_ms_per_image(s: ort.InferenceSession, batch: np.ndarray, seconds: float = 1.5) -> float:
    """Best of three rounds of CPU time per image (process time: waiting for a busy core is not
    counted)."""
    s.run(None, {"image": batch})
    best = float("inf")
    for _ in range(3):
        start, n = time.process_time(), 0
        while time.process_time() - start < seconds:
            s.run(None, {"image": batch})
            n += len(batch)
        best = min(best, 1000 * (time.process_time() - start) / n)
    return best


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def dynamic_padding_graph(model_dir: Path, dest: Path) -> None:
    """``model.onnx`` as exported before static padding: torch's export of ``weights.pt``."""
    from flystage.artefact import load_metadata
    from flystage.training.export import export_onnx, load_torch_model

    chw = tuple(load_metadata(model_dir).input_shape)
    export_onnx(load_torch_model(model_dir), dest, chw, static_padding=False)


def int8_variant(source: Path, dest: Path, calibration: np.ndarray, change: str) -> float:
    """Quantise ``source`` with the default choices but ``change``; seconds taken."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from flystage.training import quantise

    start = time.perf_counter()
    if change == "default":
        quantise.quantise(source, dest, calibration)
        return time.perf_counter() - start
    prepared = dest.with_suffix(".prepared.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    graph = onnx.load(str(prepared))
    nodes = quantise.data_path_nodes(graph)
    ops, method = list(quantise.QUANT_OP_TYPES), CalibrationMethod.MinMax
    if change == "stem quantised too":
        nodes = [n.name for n in graph.graph.node if n.op_type == "Conv"] + nodes
    elif change == "Conv only":
        ops = ["Conv"]
    elif change == "Percentile":
        method = CalibrationMethod.Percentile
    elif change == "Entropy":
        method = CalibrationMethod.Entropy
    quantize_static(
        str(prepared),
        str(dest),
        quantise._Batches(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=ops,
        nodes_to_quantize=nodes,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=method,
    )
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: train the default)")
    args = parser.parse_args(argv)

    from flystage.artefact import ONNX_FILE, load_metadata
    from flystage.training.quantise import CALIBRATION_IMAGES, preprocessed

    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        tmp = Path(tmp)
        model_dir = args.model or tmp / "model"
        if args.model is None:
            trained_model(model_dir, tmp)
        metadata = load_metadata(model_dir)
        images = preprocessed(sorted(DATA.rglob("*.bmp")), metadata.preprocess)
        rng = np.random.default_rng(0)
        calibration = images[rng.choice(len(images), CALIBRATION_IMAGES, replace=False)]
        reference = session(model_dir / ONNX_FILE).run(None, {"image": images})[0]
        dynamic = tmp / "dynamic.onnx"
        dynamic_padding_graph(model_dir, dynamic)
        variants: dict[str, tuple[Path, float | None]] = {
            "float, dynamic padding": (dynamic, None),
            "float": (model_dir / ONNX_FILE, None),
        }
        for change in (
            "default",
            "stem quantised too",
            "Conv only",
            "Percentile",
            "Entropy",
            "193 calibration images",
        ):
            dest = tmp / f"int8-{len(variants)}.onnx"
            cal = images if change == "193 calibration images" else calibration
            variants[f"int8 {change}" if change == "default" else f"int8, {change}"] = (
                dest,
                int8_variant(model_dir / ONNX_FILE, dest, cal, change),
            )
        for name, (path, seconds) in variants.items():
            s = session(path)
            logits = s.run(None, {"image": images})[0]
            change = np.abs(softmax(logits) - softmax(reference)).max(1)
            row: dict[str, Any] = {
                "variant": name,
                "images": len(images),
                "same_top1": round(float((logits.argmax(1) == reference.argmax(1)).mean()), 4),
                "max_probability_change_median": round(float(np.median(change)), 4),
                "max_probability_change_p95": round(float(np.percentile(change, 95)), 4),
                "cpu_ms_per_image": round(cpu_ms_per_image(s, images[:16]), 2),
                "quantise_s": None if seconds is None else round(seconds, 1),
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
