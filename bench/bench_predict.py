"""Benchmark `flystage predict` over a folder of lab-like TIFFs: float and int8 graphs side by
side, against torch eager on the same weights, with their leave-one-gene-out accuracy.

    python bench/bench_predict.py [--model DIR] [--source synthetic|bdgp] [--images 2000]
        [--no-accuracy]
    make bench-predict

Images: by default synthetic 1110x420 16-bit greyscale TIFFs shaped like the lab's (a dim
elliptical embryo with faint stripes on a dark noisy background), or BDGP's 320x128 RGB BMPs
copied (cycled) into a temporary folder. Model: ``--model DIR``, or else the toolkit's default
model trained on BDGP by ``flystage organise`` + ``flystage train`` (so the artefact holds
the int8 graph training keeps, or says why not).

Measures, on this machine, for each graph (``float``: model.onnx, ``int8``: model-int8.onnx):
- ``images_per_s``: the real command, ``python -m flystage predict FOLDER --model DIR
  --precision P``, from its start to its exit (process start, model load, reading,
  preprocessing, inference, CSV/JSON);
- ``steady_images_per_s``: the same pipeline in-process after loading (``predict_files``);
- ``model_images_per_s``: onnxruntime alone on preprocessed batches, one batch at a time;
- ``same_top1_as_float`` (int8): the share of images whose top-1 stage is the float graph's;
and ``torch_eager``: ``weights.pt`` in torch eager mode, the model alone and the same loop.
``accuracy``: ``bench_accuracy.py`` (leave one gene out on BDGP), float and int8.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from common import DATA as BDGP
from common import REPO, trained_model

GOAL_IMAGES_PER_S = 200


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


def end_to_end(folder: Path, model_dir: Path, out: Path, args: argparse.Namespace, precision: str):
    """Seconds of the real command from its start to its exit, its CPU seconds (all threads),
    and the command."""
    command = [
        sys.executable,
        "-m",
        "flystage",
        "predict",
        str(folder),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--force",
        "--precision",
        precision,
    ]
    for option in ("batch_size", "workers", "readers", "threads"):
        if getattr(args, option):
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"flystage predict failed ({result.returncode}):\n{result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, " ".join(["flystage", *command[3:]])


def onnx_figures(
    model_dir: Path, folder: Path, args: argparse.Namespace, precision: str
) -> dict[str, Any]:
    """The command end to end, the same pipeline in-process after loading, and onnxruntime alone
    on preprocessed batches (one at a time, all cores), for one precision."""
    from flystage.organise import iter_images
    from flystage.predictor import DEFAULT_READERS, DEFAULT_WORKERS, Predictor, predict_files

    paths, _ = iter_images([folder])
    seconds, cpu, command = end_to_end(
        folder, model_dir, folder.parent / "preds.csv", args, precision
    )
    workers = args.workers or DEFAULT_WORKERS
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
    predictor = Predictor(model_dir, threads=threads, precision=precision)
    start = time.perf_counter()
    predictions = predict_files(
        predictor,
        paths,
        root=folder,
        batch_size=args.batch_size,
        progress=False,
        workers=workers,
        readers=args.readers or DEFAULT_READERS,
    )
    steady = time.perf_counter() - start
    assert all(p.error is None for p in predictions), [p.error for p in predictions if p.error]
    batch = np.stack([predictor.prepare(p, p.name) for p in paths[: args.batch_size]])
    alone = Predictor(model_dir, threads=os.cpu_count(), precision=precision)
    return {
        "graph": predictor.graph,
        "images_per_s": round(len(paths) / seconds, 1),
        "seconds": round(seconds, 2),
        # CPU time is steadier than wall time on a shared machine: a neighbour's load on the
        # other hyperthread still shows, but waiting for a core does not.
        "cpu_ms_per_image": round(1000 * cpu / len(paths), 2),
        "steady_images_per_s": round(len(paths) / steady, 1),
        "model_images_per_s": round(throughput(alone.predict_arrays, batch, args.images), 1),
        "command": command,
        "top1": [p.top[0][0] for p in predictions],
    }


def torch_figures(model_dir: Path, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """torch eager on the same weights (weights.pt): the model alone on the same batches, and
    the same preprocessing loop as predict with torch in place of onnxruntime."""
    import torch

    from flystage.organise import iter_images
    from flystage.predictor import Predictor
    from flystage.training.export import load_torch_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_torch_model(model_dir)
    prepare = Predictor(model_dir, threads=1, precision="float").prepare
    paths, _ = iter_images([folder])

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    batch = np.stack([prepare(p, p.name) for p in paths[: args.batch_size]])
    start = time.perf_counter()
    for i in range(0, len(paths), args.batch_size):
        run(np.stack([prepare(p, p.name) for p in paths[i : i + args.batch_size]]))
    loop = time.perf_counter() - start
    return {
        "steady_images_per_s": round(len(paths) / loop, 1),
        "model_images_per_s": round(throughput(run, batch, args.images), 1),
        "torch_version": torch.__version__,
    }


def throughput(run, batch: np.ndarray, images: int) -> float:
    """Images/s of ``run(batch)`` over about ``images`` images, after one warm-up batch."""
    run(batch)
    rounds = max(1, images // len(batch))
    start = time.perf_counter()
    for _ in range(rounds):
        run(batch)
    return rounds * len(batch) / (time.perf_counter() - start)


def logo_accuracy(work: Path) -> dict[str, Any]:
    """Leave-one-gene-out on BDGP with the defaults (bench_accuracy.py): float and int8."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_accuracy.py"), "--out", str(work / "logo")],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"bench_accuracy.py failed ({result.returncode}):\n{result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    keys = ("top1", "top1_ci", "top3", "top3_ci")
    return {
        "protocol": report.get("protocol"),
        "float": {key: report.get(key) for key in keys},
        "int8": {key: report.get(f"int8_{key}") for key in keys},
        "int8_minus_float_images": {
            key: report.get(f"int8_minus_float_{key}_images") for key in ("top1", "top3")
        },
        "seconds": report.get("seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: train the default)")
    parser.add_argument("--source", choices=["synthetic", "bdgp"], default="synthetic")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, help="batches in flight (predict's default)")
    parser.add_argument("--readers", type=int, help="reader threads (predict's default)")
    parser.add_argument("--threads", type=int, help="onnxruntime threads per batch")
    parser.add_argument(
        "--no-accuracy", action="store_true", help="skip the leave-one-gene-out accuracy"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        images = make_folder(folder, args.source, args.images)
        model_dir, model = args.model, f"given: {args.model}"
        if model_dir is None:
            model_dir = tmp / "model"
            model = trained_model(model_dir, tmp)
        from flystage.artefact import int8_record, load_metadata

        metadata = load_metadata(model_dir)
        figures = {"float": onnx_figures(model_dir, folder, args, "float")}
        if int8_record(metadata).get("kept"):
            figures["int8"] = onnx_figures(model_dir, folder, args, "int8")
        tops = {name: f.pop("top1") for name, f in figures.items()}
        if "int8" in figures:
            same = np.mean([a == b for a, b in zip(tops["float"], tops["int8"])])
            figures["int8"]["same_top1_as_float"] = round(float(same), 4)
        figures["torch_eager"] = torch_figures(model_dir, folder, args)
        accuracy = None if args.no_accuracy else logo_accuracy(tmp)
    best = figures.get("int8", figures["float"])
    print(
        json.dumps(
            {
                "bench": "predict",
                "images": images,
                "n": args.images,
                "model": model,
                "arch": metadata.arch,
                "input_shape": list(metadata.input_shape),
                "int8_record": int8_record(metadata) or None,
                "cpus": os.cpu_count(),
                **figures,
                "accuracy": accuracy,
                "goal_images_per_s": GOAL_IMAGES_PER_S,
                "goal_met": best["images_per_s"] >= GOAL_IMAGES_PER_S,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
