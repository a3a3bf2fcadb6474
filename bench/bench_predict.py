"""Benchmark `flystage predict` over a folder of 200 images with the ONNX model.

    python bench/bench_predict.py [--model DIR] [--source synthetic|bdgp] [--images 200]

Images: by default synthetic 1110x420 16-bit greyscale TIFFs shaped like the lab's (a dim
elliptical embryo with faint stripes on a dark noisy background), or BDGP's 320x128 RGB BMPs
copied (cycled) into a temporary folder. Model: ``--model DIR``, or else an UNTRAINED model
of the training defaults (``TrainConfig().arch`` and ``.preprocess``) exported with
``save_artefact`` (speed does not depend on the weights; the output says which).

Measures, on this machine:
- ``images_per_s``: the real command, ``python -m flystage predict FOLDER --model DIR``, end
  to end (process start, model load, reading, preprocessing, inference, CSV/JSON);
- ``steady_images_per_s``: the same loop in-process after loading (``predict_files``);
- ``model_images_per_s``: onnxruntime alone on preprocessed batches, one batch at a time.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from serving_helpers import default_artefact  # noqa: E402

BDGP = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))


def lab_like_tiff(path: Path, seed: int, height: int = 420, width: int = 1110) -> None:
    """A dim 16-bit embryo image like the lab's (values in the low hundreds to ~2000)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(150, 15, (height, width))
    mask = np.zeros((height, width), np.uint8)
    angle = float(rng.uniform(-20, 20))
    cv2.ellipse(
        mask,
        (width // 2, height // 2),
        (int(width * 0.38), int(height * 0.3)),
        angle,
        0,
        360,
        1,
        -1,
    )
    stripes = 1 + 0.4 * np.sin(np.arange(width) / rng.uniform(6, 20))[None, :]
    img += mask.astype(np.float64) * rng.uniform(600, 1800) * stripes
    tifffile.imwrite(path, np.clip(img, 0, 65535).astype(np.uint16))


def make_folder(folder: Path, source: str, n: int) -> str:
    folder.mkdir(parents=True)
    if source == "synthetic":
        for i in range(n):
            lab_like_tiff(folder / f"embryo{i:03d}.tif", seed=i)
        return f"{n} synthetic 1110x420 16-bit greyscale TIFFs"
    files = sorted(BDGP.rglob("*.bmp"))
    if not files:
        sys.exit(f"no BDGP images under {BDGP}: set FLYSTAGE_DATA")
    for i in range(n):
        shutil.copy(files[i % len(files)], folder / f"bdgp{i:03d}.bmp")
    return f"{n} BDGP 320x128 RGB BMPs (copies of the {len(files)} originals, cycled)"


def default_model(model_dir: Path) -> str:
    default_artefact(model_dir, ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"])
    return (
        "an untrained model of the training defaults (TrainConfig().architecture()), "
        "exported by save_artefact"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="model directory (default: an untrained default model)"
    )
    parser.add_argument("--source", choices=["synthetic", "bdgp"], default="synthetic")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--workers", type=int, default=2, help="batches in flight (flystage predict's default 2)"
    )
    parser.add_argument(
        "--threads", type=int, help="onnxruntime threads per batch (default: cores / workers)"
    )
    args = parser.parse_args(argv)

    from flystage.imaging import load
    from flystage.organise import iter_images
    from flystage.predict import Predictor, predict_files

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        images = make_folder(folder, args.source, args.images)
        model_dir, model = args.model, f"given: {args.model}"
        if model_dir is None:
            model_dir = tmp / "model"
            model = default_model(model_dir)

        command = [
            sys.executable,
            "-m",
            "flystage",
            "predict",
            str(folder),
            "--model",
            str(model_dir),
            "--out",
            str(tmp / "preds.csv"),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
        ]
        if args.threads:
            command += ["--threads", str(args.threads)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        end_to_end = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"flystage predict failed ({result.returncode}):\n{result.stderr}")

        threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
        predictor = Predictor(model_dir, threads=threads)
        paths, _ = iter_images([folder])
        start = time.perf_counter()
        predictions = predict_files(
            predictor,
            paths,
            root=folder,
            batch_size=args.batch_size,
            progress=False,
            workers=args.workers,
        )
        steady = time.perf_counter() - start
        assert all(p.error is None for p in predictions)

        batch = np.stack([load(p, predictor.config) for p in paths[: args.batch_size]])
        predictor.predict_arrays(batch)  # warm-up
        rounds = max(1, args.images // len(batch))
        start = time.perf_counter()
        for _ in range(rounds):
            predictor.predict_arrays(batch)
        model_only = time.perf_counter() - start

    print(
        json.dumps(
            {
                "bench": "predict",
                "images": images,
                "model": model,
                "arch": predictor.metadata.arch,
                "input_shape": list(predictor.metadata.input_shape),
                "batch_size": args.batch_size,
                "workers": args.workers,
                "threads_per_batch": threads,
                "cpus": os.cpu_count(),
                "n": len(paths),
                "seconds": round(end_to_end, 3),
                "images_per_s": round(len(paths) / end_to_end, 2),
                "steady_images_per_s": round(len(paths) / steady, 2),
                "model_images_per_s": round(rounds * len(batch) / model_only, 2),
                "command": " ".join(["flystage", *command[3:]]),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
