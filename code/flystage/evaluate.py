"""Score a model on a manifest split: top-1/top-3 accuracy, how far off in stages the top-1
is, per-stage recall and precision, 95 % intervals (a bootstrap over groups), a confusion
matrix picture and a JSON report.

``flystage evaluate --model DIR --manifest M [--split test] --out DIR`` runs the artefact's
ONNX model (onnxruntime, the same path as serving) and writes ``report.json``,
``confusion.png`` and ``coverage.png`` (top-1 accuracy of the images whose top-1 probability
reaches a threshold, against the threshold and against the share of images accepted: what
``flystage predict --unsure-below P`` leaves for a biologist to look at); the report keeps
every image's probabilities (``predictions``) so that ``flystage compare`` can pair two
reports image by image. ``evaluate_probs`` is the pure scoring function: cross-validation
pools its folds' probabilities and calls it once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from flystage.bootstrap import (
    LEVEL,
    N_BOOT,
    bootstrap_intervals,
    describe,
    group_index,
    image_terms,
    metrics_of_sums,
    ranking,
)
from flystage.bootstrap import json_float as _num
from flystage.calibrate import THRESHOLDS, coverage_table, expected_calibration_error
from flystage.files import atomic_path, atomic_write
from flystage.imaging import load
from flystage.manifest import SPLITS, ManifestError, Record, manifest_sha256, read_manifest
from flystage.options import UsageError
from flystage.predictor import Predictor


def topk_accuracy(probs: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Fraction of rows of ``probs`` ``(N, K)`` whose target index is among the k highest."""
    probs, targets = np.asarray(probs), np.asarray(targets, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(targets):
        raise ValueError(
            f"probs must be (N, K) and targets (N,), got {probs.shape} and {targets.shape}"
        )
    if len(targets) == 0:
        return float("nan")
    # The same ranking as predict's top-k (stable: ties go to the earlier stage), so the
    # score matches what a user reads in the predictions CSV; a constant model scores low.
    order = np.argsort(-probs, axis=1, kind="stable")[:, : max(1, k)]
    return float(np.mean((order == targets[:, None]).any(axis=1)))


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(targets, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return cm


def recall_precision(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class recall (row-wise) and precision (column-wise) of a confusion matrix.

    A class with no true images has recall NaN; one never predicted has precision NaN.
    """
    cm = np.asarray(cm, dtype=np.float64)
    diag = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = diag / cm.sum(axis=1)
        precision = diag / cm.sum(axis=0)
    return recall, precision


def topk_contiguous(probs: np.ndarray, k: int = 3) -> float:
    """Share of rows of ``probs`` ``(N, K)`` whose k most probable classes are neighbours in
    class order (e.g. 4-6, 7-8, 9-10); NaN when K < k or N = 0. An ordinal model should name
    a run of stages, not stages scattered over the embryo's development."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < k or len(probs) == 0:
        return float("nan")
    top = ranking(probs)[:, :k]
    return float(np.mean(top.max(axis=1) - top.min(axis=1) == k - 1))


# The report's interval keys, in the order a reader meets them.
INTERVAL_KEYS = ("top1", "top3", "ece", "within1", "mae")


def evaluate_probs(
    probs: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[str] | None = None,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores of probabilities ``(N, K)`` against target indices ``(N,)`` (``labels[i]`` = class i,
    labels in stage order).

    Returns a JSON-safe dict: ``n``, ``top1``, ``top3``, ``within1`` (top-1 at most one stage
    from the truth), ``mae`` (mean |top-1 - truth| in label-list steps), ``top3_contiguous``
    (share whose top 3 are neighbouring stages; None for fewer than 3 labels),
    ``mean_recall``, ``labels``, ``per_stage`` {label: recall, precision, support} (None where
    undefined), ``confusion`` (rows true, columns predicted), ``ece`` (expected calibration
    error), ``coverage`` (per top-1 probability threshold: share of images at or above it and
    their top-1 accuracy; :func:`flystage.calibrate.coverage_table`), ``intervals`` (95 %
    [lo, hi] of top1, top3, ece, within1 and mae; None without images or with ``n_boot=0``)
    and ``bootstrap`` (how: :mod:`flystage.bootstrap`). The intervals resample whole
    ``groups`` (N group names: gene, embryo, session; None: each image its own group),
    ``n_boot`` times from ``np.random.default_rng(seed)``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    labels = list(labels)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(
            f"probs must be (N, {len(labels)}) for {len(labels)} labels, got {probs.shape}"
        )
    if len(targets) and (targets.min() < 0 or targets.max() >= len(labels)):
        raise ValueError(f"targets must be class indices in [0, {len(labels)})")
    cm = confusion_matrix(targets, ranking(probs)[:, 0], len(labels))
    recall, precision = recall_precision(cm)
    support = cm.sum(axis=1)
    terms = image_terms(probs, targets)
    ordinal = metrics_of_sums(terms.sum(axis=0), len(targets))
    if len(targets) and n_boot:
        drawn, bootstrap = bootstrap_intervals(terms, groups, n_boot=n_boot, seed=seed)
        intervals = {key: [_num(drawn[key][0]), _num(drawn[key][1])] for key in INTERVAL_KEYS}
    else:
        intervals = dict.fromkeys(INTERVAL_KEYS)
        bootstrap = describe(0, LEVEL, group_index(groups, len(targets))[1])
    return {
        "n": int(len(targets)),
        "top1": _num(topk_accuracy(probs, targets, 1)),
        "top3": _num(topk_accuracy(probs, targets, 3)),
        "within1": _num(ordinal["within1"]),
        "mae": _num(ordinal["mae"]),
        "top3_contiguous": _num(topk_contiguous(probs, 3)),
        # Mean over stages present: what a lab gets across stages, whatever their frequency.
        "mean_recall": _num(np.nanmean(recall)) if np.any(support) else None,
        "labels": labels,
        "per_stage": {
            label: {
                "recall": _num(recall[i]),
                "precision": _num(precision[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion": cm.tolist(),
        "ece": _num(expected_calibration_error(probs, targets)),
        "coverage": coverage_table(probs, targets),
        "intervals": intervals,
        "bootstrap": bootstrap,
    }


def predictions_of(
    records: Sequence[Record], probs: np.ndarray, groups: Sequence[str]
) -> list[dict[str, Any]]:
    """The report's per-image entries (``path``, ``group``, ``label``, ``probs`` rounded to 6
    places) of ``records`` scored as the rows of ``probs`` ``(N, K)``: what ``flystage
    compare`` pairs two reports by."""
    return [
        {
            "path": str(r.path),
            "group": str(group),
            "label": r.label,
            "probs": [round(float(p), 6) for p in row],
        }
        for r, group, row in zip(records, groups, np.asarray(probs, dtype=np.float64))
    ]


@contextmanager
def _png(path: str | Path, **subplots: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(**subplots)`` on the Agg backend (files only, never a display); the
    figure is saved to ``path`` as a PNG when the block ends, and closed whatever happens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(dpi=120, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        with atomic_path(path, fsync=False) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def plot_confusion(
    cm: np.ndarray, labels: Sequence[str], path: str | Path, title: str | None = None
) -> Path:
    """Save the confusion matrix as a PNG: counts in the cells, rows true, columns predicted."""
    cm = np.asarray(cm)
    k = len(labels)
    with _png(path, figsize=(1.0 + 0.7 * k, 0.8 + 0.6 * k)) as (fig, ax):
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
        ax.set_xticks(range(k), labels, rotation=45, ha="right")
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted stage")
        ax.set_ylabel("true stage")
        if title:
            ax.set_title(title)
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > threshold else "black",
                )
    return Path(path)


def coverage_curve(probs: np.ndarray, targets: np.ndarray, steps: int = 100) -> list[dict]:
    """:func:`~flystage.calibrate.coverage_table` at ``steps`` + 1 thresholds from 0 to 1: the
    whole curve that :func:`plot_coverage` draws (threshold 0 accepts every image)."""
    return coverage_table(probs, targets, [round(t, 4) for t in np.linspace(0.0, 1.0, steps + 1)])


def _plot_against_threshold(ax: Any, covered: list, answered: list, marked: list) -> None:
    """Left panel of :func:`plot_coverage`: accuracy and share accepted against the threshold,
    the marked thresholds as points."""
    lines = (
        (answered, "accuracy", {"color": "tab:blue"}, "top-1 accuracy of the accepted images"),
        (covered, "coverage", {"color": "tab:orange", "ls": "--"}, "share of images accepted"),
    )
    for rows, key, style, label in lines:
        ax.plot([r["threshold"] for r in rows], [r[key] for r in rows], lw=2, label=label, **style)
    for _, key, style, _ in lines:
        ax.plot(
            [r["threshold"] for r in marked], [r[key] for r in marked], "o", color=style["color"]
        )
    ax.set_xlabel("threshold: accept when the top-1 probability reaches it")
    ax.set_xlim(0.0, 1.0)
    ax.legend(loc="lower left", fontsize=8)


def _plot_accuracy_against_coverage(ax: Any, answered: list, marked: list) -> None:
    """Right panel of :func:`plot_coverage`: accuracy against the share accepted, one marker
    per marked threshold, named in a legend."""
    import matplotlib

    ax.plot(
        [r["coverage"] for r in answered],
        [r["accuracy"] for r in answered],
        color="tab:blue",
        lw=2,
    )
    # One marker per threshold, named in a legend (labels beside the points collide when
    # thresholds accept the same images, as they do on a small split).
    shades = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(1, len(marked))))
    for r, shade in zip(marked, shades):
        ax.plot(
            r["coverage"],
            r["accuracy"],
            "o",
            ms=7,
            color=shade,
            markeredgecolor="black",
            markeredgewidth=0.5,
            label=(
                f"p >= {r['threshold']:.2f}: {100 * r['coverage']:.0f} % of images, top-1 "
                f"{100 * r['accuracy']:.0f} %"
            ),
        )
    if marked:
        ax.legend(loc="lower left", fontsize=7, title="accept when", title_fontsize=7)
    ax.set_xlabel("share of images accepted (coverage)")
    ax.set_ylabel("top-1 accuracy of the accepted images")
    ax.set_xlim(-0.02, 1.02)


def plot_coverage(
    curve: Sequence[dict],
    path: str | Path,
    marks: Sequence[dict] | None = None,
    title: str | None = None,
) -> Path:
    """Save the accuracy/coverage trade-off of accepting answers above a top-1 probability.

    ``curve`` and ``marks`` are rows of :func:`~flystage.calibrate.coverage_table`
    (``threshold``, ``coverage``, ``n``, ``accuracy``): ``curve`` a dense sweep
    (:func:`coverage_curve`), ``marks`` the report's thresholds, drawn as points named in a legend
    (default: the rows of ``curve`` at :data:`~flystage.calibrate.THRESHOLDS`). Left panel:
    against the threshold, the top-1 accuracy of the accepted images and the share accepted.
    Right panel: top-1 accuracy against the share accepted.
    """
    curve = sorted(curve, key=lambda r: r["threshold"])
    if marks is None:
        marks = [r for r in curve if any(abs(r["threshold"] - t) < 1e-9 for t in THRESHOLDS)]
    covered = [r for r in curve if r["coverage"] is not None]
    answered = [r for r in covered if r["accuracy"] is not None]  # at least one image accepted
    marked = [r for r in marks if r["coverage"] is not None and r["accuracy"] is not None]
    with _png(path, ncols=2, figsize=(10.5, 4.2)) as (fig, (left, right)):
        _plot_against_threshold(left, covered, answered, marked)
        _plot_accuracy_against_coverage(right, answered, marked)
        for ax in (left, right):
            ax.set_ylim(-0.02, 1.05)
            ax.grid(alpha=0.3)
        left.set_ylabel("share")
        if title:
            fig.suptitle(title)
    return Path(path)


def interval_text(report: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    """`` [lo, hi]`` of ``report["intervals"][key]`` times ``scale``; empty when the report has
    none (older reports, no images)."""
    interval = (report.get("intervals") or {}).get(key)
    if not interval or None in interval:
        return ""
    lo, hi = (scale * x for x in interval)
    return f" [{lo:.{digits}f}, {hi:.{digits}f}]"


def coverage_text(report: dict[str, Any]) -> list[str]:
    """The calibration lines of a report: ECE (and the model's temperature), then per threshold
    the share of images whose top-1 probability reaches it and their top-1 accuracy."""
    lines = []
    if report.get("ece") is not None:
        metrics = (report.get("model") or {}).get("metrics") or {}
        temperature = metrics.get("temperature") if isinstance(metrics, dict) else None
        fitted = (
            f"; temperature {temperature:.2f} fitted on the valid split"
            if isinstance(temperature, (int, float))
            else ""
        )
        lines.append(
            f"calibration: ECE {report['ece']:.3f}{interval_text(report, 'ece', 1.0, 3)} (0 = "
            f"top-1 probabilities match top-1 accuracy{fitted})"
        )
    rows = report.get("coverage") or []
    if rows:
        lines.append("accepting the answers whose top-1 probability p reaches a threshold:")
    for r in rows:
        share = "n/a" if r["coverage"] is None else f"{100 * r['coverage']:3.0f} %"
        accuracy = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:3.0f} %"
        lines.append(
            f"  p >= {r['threshold']:.2f}: {share} of images ({r['n']} of {report['n']}), top-1 "
            f"{accuracy}"
        )
    return lines


def report_text(report: dict[str, Any]) -> str:
    """A few readable lines: accuracy and stage error with their 95 % intervals
    (``top-1 78.8% [72.5, 84.5]``), recall/precision/support per stage, then calibration (ECE)
    and coverage (``p >= 0.80:  62 % of images (37 of 60), top-1  97 %``)."""

    def pct(x: float | None) -> str:
        return "   n/a" if x is None else f"{100 * x:5.1f}%"

    figures = [("top-1", "top1"), ("top-3", "top3"), ("within one stage", "within1")]
    lines = [
        "   ".join(
            [f"images {report['n']}"]
            + [
                f"{name} {pct(report[key]).strip()}{interval_text(report, key)}"
                for name, key in figures
                if key in report
            ]
        )
    ]
    ordinal = []
    if report.get("mae") is not None:
        ordinal.append(
            f"mean stage error {report['mae']:.2f}{interval_text(report, 'mae', 1.0, 2)} stages"
        )
    if report.get("top3_contiguous") is not None:
        ordinal.append(f"top-3 neighbouring stages {pct(report['top3_contiguous']).strip()}")
    bootstrap = report.get("bootstrap") or {}
    if bootstrap.get("resamples") and report.get("intervals", {}).get("top1"):
        ordinal.append(
            f"(brackets: {100 * bootstrap['level']:.0f} % intervals, {bootstrap['resamples']} "
            f"resamples of the {bootstrap['n_groups']} groups)"
        )
    if ordinal:
        lines.append("   ".join(ordinal))
    width = max(len("stage"), *(len(label) for label in report["labels"]))
    lines.append(f"{'stage':>{width}}  recall  precision  support")
    for label, s in report["per_stage"].items():
        lines.append(
            f"{label:>{width}}  {pct(s['recall'])}     {pct(s['precision'])}  {s['support']:7d}"
        )
    lines += coverage_text(report)
    return "\n".join(lines)


def evaluate_manifest(
    model_dir: str | Path,
    manifest: str | Path,
    split: str = "test",
    batch_size: int = 32,
    threads: int | None = None,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Run the model on one split of a manifest; returns (report, probs (N, K), targets (N,))."""
    predictor = Predictor(model_dir, threads=threads)
    labels = predictor.labels
    records = read_manifest(manifest)
    if split != "all":
        records = [r for r in records if r.split == split]
    if not records:
        raise ManifestError(f"{manifest}: no images in split {split!r}; choose another --split")
    unknown = sorted({r.label for r in records} - set(labels))
    if unknown:
        raise ManifestError(
            f"{manifest}: label(s) {unknown} are not among the model's labels {labels}; map them "
            "with organise --map"
        )
    groups = [r.group for r in records]
    index = {label: i for i, label in enumerate(labels)}
    targets = np.array([index[r.label] for r in records], dtype=np.int64)
    chunks = []
    for start in range(0, len(records), batch_size):
        batch = np.stack(
            [load(r.path, predictor.config) for r in records[start : start + batch_size]]
        )
        chunks.append(predictor.predict_arrays(batch))
    probs = np.concatenate(chunks)
    report = evaluate_probs(probs, targets, labels, groups)
    md = predictor.metadata
    report.update(
        split=split,
        manifest=str(Path(manifest).resolve()),
        manifest_sha256=manifest_sha256(manifest),
        model={"model_dir": str(Path(model_dir).resolve()), **md.to_dict()},
        # Whether the model was trained on this manifest; evaluating on a split it was not
        # trained from is fine, this only makes it visible.
        same_manifest_as_training=md.manifest_sha256 == manifest_sha256(manifest),
        predictions=predictions_of(records, probs, groups),
    )
    return report, probs, targets


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", type=Path, required=True, help="model directory (model.onnx + metadata.json)"
    )
    parser.add_argument(
        "--manifest", type=Path, required=True, help="manifest CSV from `flystage organise`"
    )
    parser.add_argument(
        "--split",
        choices=[*SPLITS, "all"],
        default="test",
        help="which split to score (default test)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for report.json, confusion.png and coverage.png",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing report in --out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    parser.add_argument(
        "--html",
        action="store_true",
        help="also write report.html: one self-contained page (figures, "
        "per-stage table, thumbnails of the worst errors) to email or open offline",
    )


def run(args: argparse.Namespace) -> int:
    report_path, png_path, coverage_path = (
        args.out / name for name in ("report.json", "confusion.png", "coverage.png")
    )
    if not args.force and any(p.exists() for p in (report_path, png_path, coverage_path)):
        raise UsageError(f"{args.out} already holds a report; choose another --out or pass --force")
    report, probs, targets = evaluate_manifest(
        args.model, args.manifest, args.split, args.batch_size, args.threads
    )
    args.out.mkdir(parents=True, exist_ok=True)
    title = f"{args.split} split, n={report['n']}"
    plot_confusion(np.array(report["confusion"]), report["labels"], png_path, title=title)
    plot_coverage(
        coverage_curve(probs, targets),
        coverage_path,
        marks=report["coverage"],
        title=title + (f", ECE {report['ece']:.3f}" if report.get("ece") is not None else ""),
    )
    with atomic_write(report_path) as f:
        f.write(json.dumps(report, indent=2) + "\n")
    print(report_text(report))
    print(f"wrote {report_path}, {png_path} and {coverage_path}")
    if args.html:
        from flystage.evaluate_html import write_html
        from flystage.imaging import PreprocessConfig

        # The same records, in the same order, as evaluate_manifest scored.
        records = [
            r for r in read_manifest(args.manifest) if args.split == "all" or r.split == args.split
        ]
        config = PreprocessConfig.from_dict(report["model"]["preprocess"])
        page = write_html(
            args.out / "report.html",
            report,
            probs,
            targets,
            records,
            config,
            png_path,
            coverage_path,
        )
        print(f"wrote {page}")
    return 0
