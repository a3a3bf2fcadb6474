"""Cross-validation by group: the honest accuracy on a small data set.

With a few hundred images a single train/valid/test split is noise, and when the group (a
gene, an embryo, a session) is confounded with the stage, a random split flatters the model.
``crossval`` trains one model per group with that group held out, predicts the held-out
group's images, pools the held-out probabilities of all folds and scores them once
(``flystage.evaluate.evaluate_probs``), so every image is scored by a model that never saw
its group.

With many groups (thousands of images, each its own embryo) one model per group is too many:
``k`` folds hold out about 1/k of the groups each, stratified by label. How the folds and
their validation groups are drawn: :mod:`flystage.training.folds`.

``flystage crossval --manifest M --out DIR [--k-folds K] [training options]`` writes
``report.json`` and ``confusion.png``; the training options are those of ``flystage train``.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flystage.bootstrap import bootstrap_intervals, image_terms, paired_bootstrap
from flystage.calibrate import softmax
from flystage.evaluate import (
    evaluate_probs,
    plot_confusion,
    predictions_of,
    report_text,
    topk_accuracy,
)
from flystage.files import atomic_write
from flystage.manifest import Record, manifest_sha256, read_manifest, sort_labels
from flystage.training.config import TrainConfig, add_config_options, config_from_args
from flystage.training.data import ImageCache, to_float
from flystage.training.ensemble import train_model
from flystage.training.folds import (
    VALID_FRACTION,
    CrossvalError,
    Fold,
    group_of,
    plan_folds,
)

PROTOCOL = "leave-one-group-out"


def kfold_protocol(k: int) -> str:
    """The report's ``protocol`` for ``k`` folds."""
    return f"stratified {k}-fold"


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Softmax probabilities ``(N, K)`` float64 of cached images ``(N, C, H, W)``."""
    model.eval()
    chunks = [
        torch.softmax(model(to_float(images[i : i + batch_size])), dim=1).double().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0))


def _fold_report(
    fold: Any,
    group_column: str,
    probs: np.ndarray,
    targets: np.ndarray,
    result: Any,
    seconds: float,
) -> dict[str, Any]:
    """One fold's line of the report: its images, scores and training."""
    return {
        "group": fold.group,
        "n_test": len(fold.test),
        "n_train": len(fold.train),
        "n_valid": len(fold.valid),
        "valid_groups": sorted({group_of(r, group_column) for r in fold.valid}),
        "top1": round(topk_accuracy(probs, targets, 1), 6),
        "top3": round(topk_accuracy(probs, targets, 3), 6),
        "best_epoch": int(result.best["epoch"]) if "epoch" in result.best else None,
        "temperature": result.best.get("temperature"),
        "epochs_run": len(result.history),
        "seconds": round(seconds, 1),
    }


def _fold_name(fold: Fold, group_column: str, kfold: bool) -> str:
    return fold.group if kfold else f"{group_column}={fold.group}"


def _fold_start(fold: Fold, group_column: str, kfold: bool) -> str:
    """What a fold holds out and trains on, for the log (a k-fold's groups are too many to
    name)."""
    if not kfold:
        return (
            f"hold out {group_column}={fold.group} ({len(fold.test)} "
            f"images); train {len(fold.train)}, valid {len(fold.valid)} "
            f"({', '.join(sorted({group_of(r, group_column) for r in fold.valid}))})"
        )
    n_groups = len({group_of(r, group_column) for r in fold.test})
    n_valid = len({group_of(r, group_column) for r in fold.valid})
    return (
        f"{fold.group}: hold out {n_groups} {group_column}s ({len(fold.test)} images); "
        f"train {len(fold.train)}, valid {len(fold.valid)} ({n_valid} {group_column}s)"
    )


def crossval(
    records: Sequence[Record],
    config: TrainConfig,
    group_column: str = "group",
    folds: Sequence[str] | None = None,
    *,
    k: int | None = None,
    valid_fraction: float = VALID_FRACTION,
    unlabelled: str = "none",
    log: Callable[[str], None] = print,
    fit_fn: Callable[..., Any] = train_model,
) -> dict[str, Any]:
    """Train and test one model per held-out group (or, with ``k``, per fold of
    :func:`flystage.training.folds.make_kfolds`); score the pooled held-out probabilities.

    Returns a JSON-safe report: ``protocol`` ("leave-one-group-out" or "stratified <k>-fold",
    then also ``k``), ``group_column``, ``n`` ... ``confusion`` of
    :func:`flystage.evaluate.evaluate_probs` over all held-out images, ``folds`` (per fold:
    group (the fold's name for k folds), image counts, valid groups, top-1/top-3, best epoch,
    seconds), ``predictions`` (per image: path, group, label, probabilities), ``config`` and
    ``seconds``. ``unlabelled`` (:data:`UNLABELLED_PROTOCOLS`) gives each fold unlabelled
    images (``flystage.training.unlabelled``): ``held-out``, the fold's own test images
    (transductive: the model sees the images it is scored on, without their stages);
    ``other-group``, one training group's images, taken out of training (never the test
    group); each fold then reports how many took a pseudo-label and how many of those were
    right. ``fit_fn`` is :func:`flystage.training.ensemble.train_model` (replaceable to
    watch what each fold is given).
    """
    t_start = time.perf_counter()
    labels = sort_labels({r.label for r in records})
    index = {label: i for i, label in enumerate(labels)}
    if unlabelled not in UNLABELLED_PROTOCOLS:
        raise CrossvalError(
            f"unlabelled {unlabelled!r}: choose one of {', '.join(UNLABELLED_PROTOCOLS)}"
        )
    plan = plan_folds(records, group_column, folds, k, valid_fraction, config.seed)
    # One cache for every fold: each image is preprocessed once.
    cache = ImageCache(
        config.preprocess, config.cache_dtype, workers=max(1, torch.get_num_threads())
    )
    fold_reports, all_probs, all_targets, predictions = [], [], [], []
    for i, fold in enumerate(plan, 1):
        t0 = time.perf_counter()
        log(f"fold {i}/{len(plan)}: {_fold_start(fold, group_column, k is not None)}")
        fold, extra = _with_unlabelled(fold, unlabelled, group_column, config.seed + i)
        result = fit_fn(
            fold.train,
            fold.valid,
            config,
            log=lambda line: None,
            labels=labels,
            image_cache=cache,
            **({"unlabelled": [r.path for r in extra]} if extra else {}),
        )
        probs = predict_probs(result.model, cache.get([r.path for r in fold.test]))
        targets = np.array([index[r.label] for r in fold.test], dtype=np.int64)
        int8_probs, int8_fold = (
            int8_of_fold(result, fold, cache, labels, config, probs, targets)
            if config.int8
            else (None, {})
        )
        seconds = time.perf_counter() - t0
        fold_reports.append(_fold_report(fold, group_column, probs, targets, result, seconds))
        fold_reports[-1].update(int8_fold)
        if extra:
            fold_reports[-1].update(_pseudo_report(extra, result, group_column))
        log(
            f"fold {i}/{len(plan)}: {_fold_name(fold, group_column, k is not None)} "
            f"top1={fold_reports[-1]['top1']:.3f} top3={fold_reports[-1]['top3']:.3f} "
            f"best_epoch={fold_reports[-1]['best_epoch']} "
            f"T={fold_reports[-1]['temperature'] or 1:.2f} {seconds:.0f} s"
            + (
                f" (int8 top1={int8_fold['int8_top1']:.3f} top3={int8_fold['int8_top3']:.3f}, "
                f"{int8_fold['int8_seconds']:.0f} s of them)"
                if int8_fold
                else ""
            )
        )
        all_probs.append(probs)
        all_targets.append(targets)
        # Each image's own group (in leave-one-group-out, the fold's): what the intervals
        # resample.
        fold_predictions = predictions_of(
            fold.test, probs, [group_of(r, group_column) for r in fold.test]
        )
        if int8_probs is not None:
            for entry, row in zip(fold_predictions, int8_probs):
                entry["int8_probs"] = [round(float(p), 6) for p in row]
        predictions += fold_predictions
    # Intervals resample whole held-out groups, the unit the folds hold out.
    report = evaluate_probs(
        np.concatenate(all_probs),
        np.concatenate(all_targets),
        labels,
        [p["group"] for p in predictions],
    )
    report.update(
        protocol=PROTOCOL if k is None else kfold_protocol(k),
        **({} if k is None else {"k": k}),
        group_column=group_column,
        folds=fold_reports,
        valid_fraction=valid_fraction,
        config=config.to_dict(),
        seconds=round(time.perf_counter() - t_start, 1),
        predictions=predictions,
    )
    if unlabelled != "none":
        report["unlabelled"] = pooled_pseudo(unlabelled, fold_reports)
    if config.int8:
        report["int8"] = pooled_int8(predictions, labels, fold_reports)
    return report


def int8_of_fold(
    result: Any,
    fold: Fold,
    cache: ImageCache,
    labels: Sequence[str],
    config: TrainConfig,
    probs: np.ndarray,
    targets: np.ndarray,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The fold's model as training would save it, quantised (:mod:`flystage.training.quantise`,
    calibrated on a label-stratified sample of the fold's training images) and run by
    onnxruntime on the test images: its probabilities ``(n, K)`` and the fold's int8 entries
    (top-1/top-3, images whose top-1/top-3 correctness differs from the float model's
    ``probs``, whether training's rule would keep it on the fold's valid images, seconds).

    When quantising fails the float probabilities stand in (what the artefact would serve)
    and ``int8_error`` says why."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        int8_probs, out["int8_kept"] = _quantised_fold(result, fold, cache, labels, config)
    except Exception as exc:  # the quantiser's errors are untyped; the fold's float result stands
        int8_probs = probs
        out.update(int8_kept=False, int8_error=str(exc).splitlines()[0] if str(exc) else repr(exc))
    float_terms, int8_terms = image_terms(probs, targets), image_terms(int8_probs, targets)
    out.update(
        int8_top1=round(float(int8_terms[:, 0].mean()), 6),
        int8_top3=round(float(int8_terms[:, 1].mean()), 6),
        int8_top1_changed=int((float_terms[:, 0] != int8_terms[:, 0]).sum()),
        int8_top3_changed=int((float_terms[:, 1] != int8_terms[:, 1]).sum()),
        int8_seconds=round(time.perf_counter() - t0, 1),
    )
    return int8_probs, out


def int8_line(int8: dict[str, Any]) -> str:
    """One line of :func:`pooled_int8`'s figures for the command's output."""
    return (
        f"int8 graphs: top1 {int8['top1']:.3f} [{int8['top1_ci'][0]:.3f}, "
        f"{int8['top1_ci'][1]:.3f}], top3 {int8['top3']:.3f} [{int8['top3_ci'][0]:.3f}, "
        f"{int8['top3_ci'][1]:.3f}]; top-1 right/wrong differs from float on "
        f"{int8['top1_changed_images']} images (net {int8['minus_float_top1_images']:+d}), "
        f"top-3 on {int8['top3_changed_images']} (net {int8['minus_float_top3_images']:+d}); "
        f"kept by training's rule in {int8['kept_folds']}/{int8['folds']} folds, "
        f"{int8['seconds']:.0f} s"
    )


def _quantised_fold(
    result: Any, fold: Fold, cache: ImageCache, labels: Sequence[str], config: TrainConfig
) -> tuple[np.ndarray, bool]:
    """The int8 graph's probabilities on the fold's test images, and whether training's keep
    rule would keep it on the fold's valid images."""
    from flystage.artefact import INT8_FILE, ONNX_FILE
    from flystage.training import quantise as q
    from flystage.training.export import save_artefact

    def images(records: Sequence[Record]) -> np.ndarray:
        return to_float(cache.get([r.path for r in records])).numpy()

    threads = config.threads or None
    chosen = q.stratified_sample([r.label for r in fold.train], q.CALIBRATION_IMAGES, config.seed)
    index = {label: i for i, label in enumerate(labels)}
    valid_targets = np.array([index[r.label] for r in fold.valid], dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="flystage-fold-int8-") as tmp:
        save_artefact(tmp, result.model, config.arch, labels, config.preprocess, spec=result.spec)
        calibration = images([fold.train[i] for i in chosen])
        q.quantise(Path(tmp) / ONNX_FILE, Path(tmp) / INT8_FILE, calibration)
        test_logits = q.onnx_logits(tmp, INT8_FILE, images(fold.test), threads)
        valid = images(fold.valid)
        kept, _ = q.keep_decision(
            *(
                q.correct_counts(q.onnx_logits(tmp, graph, valid, threads), valid_targets)
                for graph in (ONNX_FILE, INT8_FILE)
            ),
            agreement=q.agreement_check(
                tmp, INT8_FILE, np.concatenate([valid, calibration]), threads
            ),
        )
    return softmax(test_logits), kept


def pooled_int8(
    predictions: Sequence[dict[str, Any]],
    labels: Sequence[str],
    fold_reports: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The int8 graphs' pooled held-out scores, from the predictions' ``probs`` (float) and
    ``int8_probs``: ``top1``/``top3`` with 95 % bootstrap intervals over the predictions'
    groups (as the float figures), ``minus_float`` (int8 - float per score with the paired
    interval), images whose top-1/top-3 correctness differs (``top1_changed_images``, ...) and
    the net change in correct images, folds whose graph training would keep, seconds."""
    index = {label: i for i, label in enumerate(labels)}
    targets = np.array([index[p["label"]] for p in predictions], dtype=np.int64)
    groups = [p["group"] for p in predictions]
    float_terms = image_terms(np.array([p["probs"] for p in predictions]), targets)
    int8_terms = image_terms(np.array([p["int8_probs"] for p in predictions]), targets)
    drawn, _ = bootstrap_intervals(int8_terms, groups)
    paired, _ = paired_bootstrap(float_terms, int8_terms, groups)
    out: dict[str, Any] = {"n": len(predictions)}
    for j, key in enumerate(("top1", "top3")):
        out[key] = round(float(int8_terms[:, j].mean()), 6)
        out[f"{key}_ci"] = [round(float(v), 6) for v in drawn[key]]
        out[f"minus_float_{key}"] = round(paired[key]["difference"], 6)
        out[f"minus_float_{key}_ci"] = [round(float(v), 6) for v in paired[key]["interval"]]
        out[f"{key}_changed_images"] = int((float_terms[:, j] != int8_terms[:, j]).sum())
        out[f"minus_float_{key}_images"] = int(int8_terms[:, j].sum() - float_terms[:, j].sum())
    from flystage.training.quantise import CALIBRATION_IMAGES

    out.update(
        calibration_images=CALIBRATION_IMAGES,
        kept_folds=sum(bool(f.get("int8_kept")) for f in fold_reports),
        failed_folds=sum("int8_error" in f for f in fold_reports),
        folds=len(fold_reports),
        seconds=round(sum(f.get("int8_seconds", 0.0) for f in fold_reports), 1),
    )
    return out


UNLABELLED_PROTOCOLS = ("none", "held-out", "other-group")


def _with_unlabelled(
    fold: Fold, protocol: str, group_column: str, seed: int
) -> tuple[Fold, list[Record]]:
    """The fold as trained under an unlabelled-images protocol, and its unlabelled records."""
    if protocol == "held-out":
        return fold, list(fold.test)
    if protocol == "other-group":
        groups = sorted({group_of(r, group_column) for r in fold.train})
        if len(groups) < 2:
            raise CrossvalError(
                "unlabelled other-group needs at least 2 training groups per fold, one to keep"
            )
        chosen = random.Random(seed).choice(groups)
        keep = [r for r in fold.train if group_of(r, group_column) != chosen]
        hidden = [r for r in fold.train if group_of(r, group_column) == chosen]
        return Fold(fold.group, keep, fold.valid, fold.test), hidden
    return fold, []


def _pseudo_report(extra: Sequence[Record], result: Any, group_column: str) -> dict[str, Any]:
    """A fold's unlabelled images: how many, which groups, how many took a pseudo-label and the
    share of those that name the true stage (known here, never to training)."""
    truth = {Path(r.path): r.label for r in extra}
    taken = result.pseudo_labels
    right = sum(truth.get(Path(p.path)) == p.label for p in taken)
    return {
        "unlabelled_images": len(extra),
        "unlabelled_groups": sorted({group_of(r, group_column) for r in extra}),
        "pseudo_labelled": len(taken),
        "pseudo_right": int(right),
    }


def pooled_pseudo(protocol: str, fold_reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    unlabelled = sum(f.get("unlabelled_images", 0) for f in fold_reports)
    taken = sum(f.get("pseudo_labelled", 0) for f in fold_reports)
    right = sum(f.get("pseudo_right", 0) for f in fold_reports)
    return {
        "protocol": protocol,
        "transductive": protocol == "held-out",
        "images": unlabelled,
        "pseudo_labelled": taken,
        "pseudo_share": round(taken / unlabelled, 6) if unlabelled else None,
        "pseudo_accuracy": round(right / taken, 6) if taken else None,
    }


# ---- command line ----------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--manifest",
        type=Path,
        required=True,
        help="manifest CSV from `flystage organise` (every split is used)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for report.json and confusion.png"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing report in --out")
    parser.add_argument(
        "--group-column",
        default="group",
        help="manifest column whose values are held out one at a time (default group)",
    )
    parser.add_argument("--folds", help="comma-separated groups to hold out (default: every group)")
    parser.add_argument(
        "--k-folds",
        type=int,
        metavar="K",
        help="instead of one fold per group, K folds of whole groups stratified by label "
        "(for many groups, e.g. one per embryo)",
    )
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=VALID_FRACTION,
        help=(
            "share of each fold's training images (whole groups) used to choose the best epoch "
            "(default %(default)s)"
        ),
    )
    parser.add_argument(
        "--unlabelled",
        choices=UNLABELLED_PROTOCOLS,
        default="none",
        help="give each fold unlabelled images (train's --unlabelled): held-out = the fold's own "
        "test images without their stages (transductive), other-group = one training group, "
        "taken out of training; default none",
    )
    # The training options of `flystage train`, with the same names and defaults.
    add_config_options(parser)


def write_report(report: dict[str, Any], out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """``report.json`` and ``confusion.png`` in ``out``; refuses to replace them unless
    ``force``."""
    out = Path(out)
    report_path, png_path = out / "report.json", out / "confusion.png"
    if not force and (report_path.exists() or png_path.exists()):
        raise CrossvalError(f"{out} already holds a report; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    title = f"{report['protocol']} ({report['group_column']}), n={report['n']}"
    plot_confusion(np.array(report["confusion"]), report["labels"], png_path, title=title)
    with atomic_write(report_path) as f:
        f.write(json.dumps(report, indent=2) + "\n")
    return report_path, png_path


def run(args: argparse.Namespace) -> int:
    if not args.force and (
        (args.out / "report.json").exists() or (args.out / "confusion.png").exists()
    ):
        raise CrossvalError(
            f"{args.out} already holds a report; choose another --out or pass --force"
        )
    if args.k_folds is not None and args.folds:
        raise CrossvalError("--folds names groups to hold out; with --k-folds, leave it out")
    if not 0.0 < args.valid_fraction < 1.0:
        raise CrossvalError(
            f"--valid-fraction {args.valid_fraction}: give a share between 0 and 1, e.g. 0.15"
        )
    config = config_from_args(args)
    if config.threads:
        torch.set_num_threads(config.threads)
    records = read_manifest(args.manifest)
    folds = [g.strip() for g in args.folds.split(",") if g.strip()] if args.folds else None
    report = crossval(
        records,
        config,
        args.group_column,
        folds,
        k=args.k_folds,
        valid_fraction=args.valid_fraction,
        unlabelled=args.unlabelled,
        log=lambda line: print(line, flush=True),
    )
    report["manifest"] = str(args.manifest.resolve())
    report["manifest_sha256"] = manifest_sha256(args.manifest)
    report_path, png_path = write_report(report, args.out, args.force)
    print(report_text(report))
    if "int8" in report:
        print(int8_line(report["int8"]))
    print(f"pooled over {len(report['folds'])} folds in {report['seconds']:.0f} s")
    print(f"wrote {report_path} and {png_path}")
    return 0
