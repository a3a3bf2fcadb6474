"""Accuracy benchmark: leave-one-gene-out cross-validation on the BDGP images.

Run by ``make bench-accuracy``. Organises ``$FLYSTAGE_DATA`` (default
``<repo>/../shared/data/bdgp-insitu``) by gene into a temporary manifest, trains one model per
held-out gene with the toolkit's defaults (``TrainConfig()``: no pretrained weights), scores
the pooled held-out predictions, prints one line per fold, and as its last line one JSON
object: ``top1``, ``top3``, ``protocol``, ``folds``, ``seconds``, ``n_images``, ``arch``,
``input`` and the per-fold figures. ``--out DIR`` also keeps report.json and confusion.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from flystage.crossval import crossval, write_report
from flystage.organise import organise, read_manifest, write_manifest
from flystage.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))
BASELINE = {"top1": 0.632, "top3": 0.896}  # HOG + logistic regression, same protocol (data README)
GOAL = {"top1": 0.85, "top3": 0.98}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write report.json and confusion.png here")
    parser.add_argument("--folds", help="comma-separated genes to hold out (default: all 8)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: torch's choice; 1 is much faster on a busy machine, same result)")
    args = parser.parse_args(argv)
    if not (DATA / "labels.csv").is_file():
        print(f"error: BDGP images not found at {DATA}: set FLYSTAGE_DATA to the bdgp-insitu folder", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    config = TrainConfig(threads=args.threads)
    if config.threads:
        torch.set_num_threads(config.threads)
    with tempfile.TemporaryDirectory(prefix="flystage-bench-") as tmp:
        # Labels and genes from the data set's own CSV; every image "train": crossval splits.
        result = organise([DATA], labels_csv=DATA / "labels.csv", label_column="stage_range",
                          group_column="gene", split="none")
        manifest = write_manifest(result.records, Path(tmp) / "manifest.csv")
        records = read_manifest(manifest)
        folds = args.folds.split(",") if args.folds else None
        print(f"leave-one-gene-out on {len(records)} images of {len({r.group for r in records})} genes from {DATA}; "
              f"{config.arch}, input {config.preprocess.channels}x{config.preprocess.height}x{config.preprocess.width}, "
              f"{config.epochs} epochs, {torch.get_num_threads()} threads", flush=True)
        report = crossval(records, config, "group", folds, log=lambda line: print(line, flush=True))
    if args.out:
        write_report(report, args.out, force=True)
    p = config.preprocess
    summary = {
        "benchmark": "accuracy",
        "protocol": "leave-one-gene-out",
        "top1": report["top1"],
        "top3": report["top3"],
        "mean_recall": report["mean_recall"],
        "folds": len(report["folds"]),
        "n_images": report["n"],
        "seconds": round(time.perf_counter() - t0, 1),
        "arch": config.arch,
        "pretrained": config.pretrained,
        "input": f"{p.channels}x{p.height}x{p.width}",
        "epochs": config.epochs,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "baseline": BASELINE,
        "goal": GOAL,
        "per_fold": [{k: f[k] for k in ("group", "n_test", "top1", "top3", "best_epoch", "seconds")} for f in report["folds"]],
        "per_stage_recall": {label: s["recall"] for label, s in report["per_stage"].items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
