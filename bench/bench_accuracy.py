"""Accuracy benchmark: leave-one-gene-out cross-validation on the BDGP images or a lab-like copy.

Run by ``make bench-accuracy`` (``LABLIKE=1``, or ``make bench-accuracy-lablike``, for the
lab-like copy). Organises ``--data`` (default ``$FLYSTAGE_DATA``, else
``<repo>/../shared/data/bdgp-insitu``) by gene into a temporary manifest, trains one model per
held-out gene with the toolkit's defaults (``TrainConfig()``: the pretrained Lite2 probe), scores
the pooled held-out predictions, prints one line per fold, and as its last line one JSON
object: ``data`` ("bdgp" or "lablike"), ``top1``, ``top3``, ``ece``, ``coverage``,
``protocol``, ``folds``, ``seconds``, ``n_images``, ``arch``, ``mode``, ``ensemble``,
``ensemble_archs``, ``input`` and the per-fold figures. ``--out DIR`` also keeps report.json
and confusion.png.

``--lablike`` first writes the lab-like copy of ``--data`` (``bench/make_lablike.py``: dim
1110x420 16-bit grey TIFFs, embryo bright on black at a random angle and position, seeded by
``--lablike-seed``) into a temporary folder and runs the same protocol on it, so the default
model is measured on images like the lab's as well as on BDGP's colour images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from common import DATA, read_by_gene
from flystage.organise import read_manifest, write_manifest
from flystage.training.crossval import crossval, write_report
from flystage.training.train import TrainConfig
from make_lablike import LablikeConfig, LablikeError, make_lablike

BASELINE = {"top1": 0.632, "top3": 0.896}  # HOG + logistic regression, same protocol (data README)
GOAL = {"top1": 0.85, "top3": 0.98}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="the bdgp-insitu folder (default: $FLYSTAGE_DATA, else ../shared/data/bdgp-insitu)",
    )
    parser.add_argument(
        "--lablike",
        action="store_true",
        help="benchmark a lab-like copy of --data "
        "(dim 16-bit grey TIFFs at random angles; bench/make_lablike.py)",
    )
    parser.add_argument(
        "--lablike-seed", type=int, default=0, help="seed of the lab-like copy (default 0)"
    )
    parser.add_argument("--out", type=Path, help="also write report.json and confusion.png here")
    parser.add_argument("--folds", help="comma-separated genes to hold out (default: all 8)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads "
        "(default 0: torch's choice; 1 is much faster on a busy machine, same result)",
    )
    args = parser.parse_args(argv)
    if not (args.data / "labels.csv").is_file():
        print(
            f"error: BDGP images not found at {args.data}: "
            "set FLYSTAGE_DATA (or --data) to the bdgp-insitu folder",
            file=sys.stderr,
        )
        return 2

    t0 = time.perf_counter()
    config = TrainConfig(threads=args.threads)
    if config.threads:
        torch.set_num_threads(config.threads)
    lablike = LablikeConfig() if args.lablike else None
    with tempfile.TemporaryDirectory(prefix="flystage-bench-") as tmp:
        data = args.data
        if lablike:
            data = Path(tmp) / "lablike"
            try:
                make_lablike(
                    args.data,
                    data,
                    seed=args.lablike_seed,
                    config=lablike,
                    log=lambda line: print(line, flush=True),
                )
            except LablikeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        # Labels and genes from the data set's own CSV; every image "train": crossval splits.
        manifest = write_manifest(read_by_gene(data), Path(tmp) / "manifest.csv")
        records = read_manifest(manifest)
        folds = args.folds.split(",") if args.folds else None
        print(
            f"leave-one-gene-out on {len(records)} images of "
            f"{len({r.group for r in records})} genes from {data}; "
            f"{config.arch}, input {config.preprocess.channels}x"
            f"{config.preprocess.height}x{config.preprocess.width}, "
            f"{config.epochs} epochs, {torch.get_num_threads()} threads",
            flush=True,
        )
        report = crossval(records, config, "group", folds, log=lambda line: print(line, flush=True))
    if args.out:
        write_report(report, args.out, force=True)
    p = config.preprocess
    summary = {
        "benchmark": "accuracy",
        "data": "lablike" if lablike else "bdgp",
        "data_dir": str(args.data.resolve()),
        "protocol": "leave-one-gene-out",
        "top1": report["top1"],
        "top3": report["top3"],
        "ece": report["ece"],
        "coverage": report["coverage"],
        "mean_recall": report["mean_recall"],
        "folds": len(report["folds"]),
        "n_images": report["n"],
        "seconds": round(time.perf_counter() - t0, 1),
        "arch": config.arch,
        "mode": config.mode_of(),
        "ensemble": config.ensemble,
        "ensemble_archs": list(config.ensemble_archs),
        "pretrained": config.pretrained,
        "input": f"{p.channels}x{p.height}x{p.width}",
        "epochs": config.epochs,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "lablike": {"seed": args.lablike_seed, **asdict(lablike)} if lablike else None,
        "baseline": BASELINE,
        "goal": GOAL,
        "per_fold": [
            {k: f[k] for k in ("group", "n_test", "top1", "top3", "best_epoch", "seconds")}
            for f in report["folds"]
        ],
        "per_stage_recall": {label: s["recall"] for label, s in report["per_stage"].items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
