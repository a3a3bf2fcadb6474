"""Accuracy benchmark: cross-validation on BDGP, its lab-like copies, or BDGP stage by stage.

Run by ``make bench-accuracy [DATA=bdgp|stages15] [LABLIKE=1]``. Three protocols, each with
the toolkit's defaults (``TrainConfig()``: the pretrained Lite2 probe) unless ``--set`` or
``--train-args`` change them:

``--dataset bdgp`` (default)
    leave-one-gene-out on the 193 BDGP images (``--data``, default ``$FLYSTAGE_DATA``, else
    ``<repo>/../shared/data/bdgp-insitu``): one model per held-out gene (8 folds), labels the
    6 stage ranges of ``labels.csv``.
``--dataset bdgp --lablike``
    the same on lab-like copies of those images (``bench/make_lablike.py``: dim 1110x420
    16-bit grey TIFFs, each image at its own angle, place, brightness, noise, focus and
    background), one copy per seed of ``--lablike-seeds`` (default 0,1,2), the held-out
    predictions of all seeds pooled into one report. A gene stays one group across seeds (the
    copies show the same embryos), so the intervals resample genes.
``--dataset stages15``
    stratified 5-fold cross-validation (``--k-folds``) on the 2,994 80x32 images of
    ``bdgp-stages15`` (``--data``, default ``$FLYSTAGE_STAGES15``, else
    ``<repo>/../shared/data/bdgp-stages15``), labels c01...c15 from the folder names, each
    image its own group (every image is a different embryo).

Each scores the pooled held-out predictions once, prints one line per fold, and as its last
line one JSON object: ``top1``, ``top3``, ``ece``, ``within1``, ``mae`` and their 95 %
intervals ``top1_ci`` ... ``mae_ci`` (a bootstrap over groups); with ``int8`` on (the default)
each fold's model is also quantised as training quantises it, and ``int8_top1``,
``int8_top3``, ``int8_top1_ci``, ``int8_top3_ci``, ``int8_minus_float_top1`` (and ``_ci``,
paired over the same groups), ``int8_top1_changed_images`` (images whose top-1 correctness
differs from the float model's), ``int8_minus_float_top1_images`` (net correct images), the
same for top-3, ``int8_kept_folds`` and ``int8_seconds`` follow; ``protocol``, ``data``
("bdgp", "lablike" or "stages15"), ``seconds``, ``arch``, ``mode``, ``input``, ``coverage``,
``per_fold``, ``per_stage_recall``, ``config_changes`` (every setting that differs from the
defaults) and more. ``--out DIR`` (default ``runs/bench-accuracy[-lablike|-stages15]``) gets
``report.json`` (its ``predictions[].path`` relative to the data folder, ``seed<N>/`` in
front for lab-like copies, so that two runs compare image by image with ``flystage compare
A/report.json B/report.json``) and ``confusion.png``.

Model options, parsed exactly as ``flystage train`` parses them:
``--set probe_l2=0.3 --set feature_taps=1,2,3`` or ``--train-args "--probe_l2 0.3"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import DATA, REPO, read_by_gene
from flystage.evaluate import evaluate_probs
from flystage.manifest import Record, read_manifest, write_manifest
from flystage.options import UsageError
from flystage.organise import organise
from flystage.training.config import TrainConfig, add_config_options, config_from_args
from flystage.training.crossval import (
    UNLABELLED_PROTOCOLS,
    crossval,
    pooled_int8,
    pooled_pseudo,
    write_report,
)
from flystage.training.folds import CrossvalError
from make_lablike import LablikeConfig, LablikeError, make_lablike

STAGES15 = Path(
    os.environ.get("FLYSTAGE_STAGES15", REPO.parent / "shared" / "data" / "bdgp-stages15")
)
# HOG + logistic regression on grey 160x64, leave-one-gene-out (bdgp-insitu's README).
BASELINE = {"top1": 0.632, "top3": 0.896}
GOAL = {"top1": 0.85, "top3": 0.98}  # issue 7, on BDGP's stage ranges
SCORES = ("top1", "top3", "ece", "within1", "mae")
Log = Callable[[str], None]


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says what to do."""


# ---- the model's settings ----------------------------------------------------------------


def train_arguments(sets: Sequence[str], train_args: str | None, threads: int) -> list[str]:
    """``--set key=value`` pairs and ``--train-args`` text as ``flystage train`` options."""
    argv = []
    for pair in sets:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--set {pair!r}: write it as key=value, e.g. probe_l2=0.3")
        argv += [f"--{key.strip()}", value]
    argv += shlex.split(train_args or "")
    # --threads is the bench's own option too; a --set or --train-args value wins.
    return ([f"--threads={threads}"] if threads else []) + argv


def config_of(argv: Sequence[str]) -> TrainConfig:
    """The TrainConfig that ``flystage train argv`` would train with."""
    # No abbreviations: --set probe=1 must not quietly set probe_l2.
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False, exit_on_error=False)
    add_config_options(parser)
    try:
        args, unknown = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise BenchError(f"--set/--train-args: {exc}") from None
    if unknown:
        raise BenchError(
            f"not a training option: {' '.join(unknown)} (see `flystage train --help`)"
        )
    return config_from_args(args)


def config_changes(config: TrainConfig) -> dict[str, Any]:
    """Every setting that differs from ``TrainConfig()``, nested ones as ``preprocess.x``."""
    ours, default = config.to_dict(), TrainConfig().to_dict()
    changes = {}
    for key, value in ours.items():
        if isinstance(value, dict):
            changes |= {
                f"{key}.{k}": v for k, v in value.items() if v != default.get(key, {}).get(k)
            }
        elif value != default.get(key):
            changes[key] = value
    changes.pop("threads", None)  # how fast, not what is measured
    return changes


# ---- the data sets -----------------------------------------------------------------------


def read_stages15(data: Path) -> list[Record]:
    """The bdgp-stages15 images: label = the class folder (c01...c15), group = the image."""
    return organise(
        [data],
        label_regex=r"(?P<label>c[0-9]{2})/[^/]+$",
        group_regex=r"(?P<group>[^/]+)$",
        split="none",
    ).records


def through_manifest(records: list[Record], tmp: Path) -> list[Record]:
    """The records as ``flystage crossval --manifest`` would read them back."""
    return read_manifest(write_manifest(records, tmp / "manifest.csv"))


def relative_paths(report: dict[str, Any], data: Path, prefix: str = "") -> None:
    """Each prediction's path relative to the data folder (``prefix`` in front), so that two
    runs on copies of the same folder pair their images by path."""
    root = data.resolve()
    for p in report["predictions"]:
        p["path"] = prefix + Path(p["path"]).relative_to(root).as_posix()


def pool(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One report from the held-out predictions of several seeds' runs (paths already
    prefixed ``seed<N>/``): scores, intervals over the predictions' groups, folds with their
    seed."""
    first = next(iter(reports.values()))
    labels = first["labels"]
    predictions = [p for report in reports.values() for p in report["predictions"]]
    index = {label: i for i, label in enumerate(labels)}
    pooled = evaluate_probs(
        np.array([p["probs"] for p in predictions], dtype=np.float64),
        np.array([index[p["label"]] for p in predictions], dtype=np.int64),
        labels,
        [p["group"] for p in predictions],
    )
    pooled.update(
        protocol=first["protocol"],
        group_column=first["group_column"],
        seeds=list(reports),
        folds=[{**f, "seed": seed} for seed, report in reports.items() for f in report["folds"]],
        valid_fraction=first["valid_fraction"],
        config=first["config"],
        seconds=round(sum(report["seconds"] for report in reports.values()), 1),
        predictions=predictions,
    )
    if "unlabelled" in first:
        pooled["unlabelled"] = pooled_pseudo(first["unlabelled"]["protocol"], pooled["folds"])
    if "int8" in first:
        pooled["int8"] = pooled_int8(predictions, labels, pooled["folds"])
    return pooled


def describe(config: TrainConfig) -> str:
    p = config.preprocess
    return (
        f"{config.arch}, input {p.channels}x{p.height}x{p.width}, {config.epochs} epochs, "
        f"{torch.get_num_threads()} threads"
    )


def leave_one_gene_out(
    data: Path,
    config: TrainConfig,
    folds: list[str] | None,
    tmp: Path,
    log: Log,
    unlabelled: str = "none",
) -> dict[str, Any]:
    """Leave-one-gene-out on a bdgp-insitu folder (or a lab-like copy of one)."""
    tmp.mkdir(parents=True, exist_ok=True)
    # Labels and genes from the data set's own CSV; every image "train": crossval splits.
    records = through_manifest(read_by_gene(data), tmp)
    log(
        f"leave-one-gene-out on {len(records)} images of {len({r.group for r in records})} "
        f"genes from {data}; {describe(config)}"
    )
    return crossval(records, config, "group", folds, unlabelled=unlabelled, log=log)


def run_protocol(args: argparse.Namespace, config: TrainConfig, tmp: Path, log: Log) -> dict:
    """The cross-validation the arguments ask for; its report, paths relative to the data."""
    if args.dataset == "stages15":
        records = through_manifest(read_stages15(args.data), tmp)
        log(
            f"stratified {args.k_folds}-fold on {len(records)} images ({len(records)} embryos) "
            f"from {args.data}; {describe(config)}"
        )
        report = crossval(
            records, config, "group", k=args.k_folds, unlabelled=args.unlabelled, log=log
        )
        relative_paths(report, args.data)
        return report
    if not args.lablike:
        report = leave_one_gene_out(args.data, config, args.folds, tmp, log, args.unlabelled)
        relative_paths(report, args.data)
        return report
    reports = {}
    for seed in args.lablike_seeds:
        copy = tmp / f"seed{seed}"
        make_lablike(args.data, copy, seed=seed, config=LablikeConfig(), log=log)
        reports[seed] = leave_one_gene_out(
            copy, config, args.folds, tmp / f"m{seed}", log, args.unlabelled
        )
        relative_paths(reports[seed], copy, f"seed{seed}/")
    return pool(reports)


# ---- the summary -------------------------------------------------------------------------


def summary(
    args: argparse.Namespace, report: dict[str, Any], config: TrainConfig, seconds: float
) -> dict[str, Any]:
    """The JSON line: scores with their intervals, what was run, on what, how long."""
    data = "lablike" if args.lablike else args.dataset
    intervals = report.get("intervals") or {}
    p = config.preprocess
    return {
        "benchmark": "accuracy",
        "data": data,
        "data_dir": str(args.data.resolve()),
        "protocol": {
            "bdgp": "leave-one-gene-out",
            "lablike": "leave-one-gene-out per lab-like seed, pooled",
        }.get(data, report["protocol"]),
        **{key: report.get(key) for key in SCORES},
        **{f"{key}_ci": intervals.get(key) for key in SCORES},
        "coverage": report["coverage"],
        "mean_recall": report["mean_recall"],
        "top3_contiguous": report.get("top3_contiguous"),
        "folds": len(report["folds"]),
        "n_images": report["n"],
        "seconds": round(seconds, 1),
        "arch": config.arch,
        "mode": config.mode_of(),
        "ensemble": config.ensemble,
        "ensemble_archs": list(config.ensemble_archs),
        "pretrained": config.pretrained,
        "input": f"{p.channels}x{p.height}x{p.width}",
        "epochs": config.epochs,
        "config_changes": config_changes(config),
        # The unlabelled-images protocol, the share that took a pseudo-label and its accuracy.
        "unlabelled": report.get("unlabelled"),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "lablike": (
            {"seeds": args.lablike_seeds, **asdict(LablikeConfig())} if args.lablike else None
        ),
        # The baseline and the goal are BDGP's six stage ranges; stages15 has neither.
        "baseline": BASELINE if data != "stages15" else None,
        "goal": GOAL if data != "stages15" else None,
        # The int8 graph of each fold (TrainConfig.int8): its scores and the images it answers
        # differently from the float model.
        **int8_keys(report.get("int8")),
        "per_fold": [{k: f[k] for k in FOLD_KEYS if k in f} for f in report["folds"]],
        "per_stage_recall": {label: s["recall"] for label, s in report["per_stage"].items()},
    }


FOLD_KEYS = (
    "seed",
    "group",
    "n_test",
    "top1",
    "top3",
    "best_epoch",
    "seconds",
    "int8_top1",
    "int8_top3",
    "int8_top1_changed",
    "int8_top3_changed",
    "int8_kept",
    "int8_seconds",
)


def int8_keys(int8: dict[str, Any] | None) -> dict[str, Any]:
    """The pooled int8 figures (crossval's ``pooled_int8``) as ``int8_<key>`` entries of the
    JSON line; ``{"int8": None}`` when the config trains without an int8 graph."""
    if not int8:
        return {"int8": None}
    return {f"int8_{key}": value for key, value in int8.items() if key != "n"}


# ---- the program -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dataset",
        choices=("bdgp", "stages15"),
        default="bdgp",
        help="bdgp: leave-one-gene-out on bdgp-insitu (default); stages15: stratified k-fold "
        "on bdgp-stages15, 15 classes",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="the data folder (default: $FLYSTAGE_DATA or ../shared/data/bdgp-insitu for bdgp, "
        "$FLYSTAGE_STAGES15 or ../shared/data/bdgp-stages15 for stages15)",
    )
    parser.add_argument(
        "--lablike",
        action="store_true",
        help="bdgp: benchmark lab-like copies of --data instead (bench/make_lablike.py)",
    )
    parser.add_argument(
        "--lablike-seeds",
        type=lambda text: [int(s) for s in text.split(",") if s.strip()],
        default=[0, 1, 2],
        help="seeds of the lab-like copies, pooled into one report (default 0,1,2)",
    )
    parser.add_argument(
        "--unlabelled",
        choices=UNLABELLED_PROTOCOLS,
        default="none",
        help="give each fold unlabelled images: held-out = its own test images without their "
        "stages (transductive), other-group = one training gene taken out of training; use "
        "with --set self_training=0.9 (default none)",
    )
    parser.add_argument("--folds", help="bdgp: comma-separated genes to hold out (default: all 8)")
    parser.add_argument(
        "--k-folds", type=int, default=5, help="stages15: number of folds (default 5)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write report.json and confusion.png here, replacing a previous run's (default "
        "runs/bench-accuracy, -lablike or -stages15 in the repository)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads "
        "(default 0: torch's choice; 1 is much faster on a busy machine, same result)",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a training setting, as `flystage train --KEY VALUE` (repeatable), "
        "e.g. --set probe_l2=0.3",
    )
    parser.add_argument(
        "--train-args",
        help='training options as one string, e.g. "--probe_l2 0.3 --feature_taps 1,2,3"',
    )
    args = parser.parse_args(argv)
    args.folds = [g.strip() for g in args.folds.split(",") if g.strip()] if args.folds else None
    if args.data is None:
        args.data = STAGES15 if args.dataset == "stages15" else DATA
    if args.out is None:
        # Where `make bench-accuracy` keeps each protocol's last report, for flystage compare.
        suffix = "-lablike" if args.lablike else "-stages15" if args.dataset == "stages15" else ""
        args.out = REPO / "runs" / f"bench-accuracy{suffix}"
    return args


def check(args: argparse.Namespace) -> None:
    """Refuse what cannot run, before anything is trained."""
    if args.dataset == "stages15":
        if args.lablike or args.folds:
            raise BenchError("--lablike and --folds are for --dataset bdgp (gene folds)")
        if not (args.data / "labels.csv").is_file():
            raise BenchError(
                f"bdgp-stages15 images not found at {args.data}: "
                "set FLYSTAGE_STAGES15 (or --data) to the bdgp-stages15 folder"
            )
        return
    if not (args.data / "labels.csv").is_file():
        raise BenchError(
            f"BDGP images not found at {args.data}: "
            "set FLYSTAGE_DATA (or --data) to the bdgp-insitu folder"
        )
    if args.lablike and not args.lablike_seeds:
        raise BenchError("--lablike-seeds: give at least one seed, e.g. 0,1,2")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    try:
        check(args)
        config = config_of(train_arguments(args.sets, args.train_args, args.threads))
        if config.threads:
            torch.set_num_threads(config.threads)
        with tempfile.TemporaryDirectory(prefix="flystage-bench-") as tmp:
            report = run_protocol(args, config, Path(tmp), log)
    except (BenchError, CrossvalError, LablikeError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    report["data_dir"] = str(args.data.resolve())
    write_report(report, args.out, force=True)
    print(json.dumps(summary(args, report, config, seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
