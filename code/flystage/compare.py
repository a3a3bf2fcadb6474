"""Compare two models image by image: paired differences with bootstrap intervals over groups.

``flystage compare REPORT_A REPORT_B [--json] [--resamples N] [--seed S]`` reads two
``report.json`` files (``flystage evaluate``, ``flystage crossval``, ``bench/bench_accuracy.py
--out``), pairs their images by path and prints, for top-1, top-3, within one stage, mean stage
error and ECE: A, B, the difference B - A and its 95 % interval. Each bootstrap resample draws
whole groups once and scores both models on that same draw (:func:`flystage.bootstrap.
paired_bootstrap`), so what the models share (a hard gene, an easy session) cancels: two
models can differ clearly even when their separate intervals overlap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from flystage.bootstrap import (
    LEVEL,
    LOWER_IS_BETTER,
    METRICS,
    N_BOOT,
    image_terms,
    json_float,
    paired_bootstrap,
)
from flystage.errors import FlystageError

# What each score is called in the table, and whether it prints as a percentage.
NAMES = {
    "top1": ("top-1", True),
    "top3": ("top-3", True),
    "within1": ("within one stage", True),
    "mae": ("mean stage error", False),
    "ece": ("ECE", False),
}


class CompareError(FlystageError, ValueError):
    """Two reports that cannot be compared; the message says what to do."""


def load_report(path: str | Path) -> dict[str, Any]:
    """A report.json with per-image ``predictions`` and ``labels``; CompareError otherwise."""
    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompareError(
            f"{path}: not found; give the report.json of `flystage evaluate` or `flystage crossval`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("labels"), list):
        raise CompareError(
            f"{path}: not a flystage report (no label list); give the report.json of "
            "`flystage evaluate` or `flystage crossval`"
        )
    if not report.get("predictions"):
        raise CompareError(
            f"{path}: the report has no per-image predictions to pair; write it again with "
            "this version's `flystage evaluate` (its older reports kept only the totals) or "
            "`flystage crossval`"
        )
    return report


def _by_path(report: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The report's predictions keyed by path; refuses repeats and malformed entries."""
    labels, out = report["labels"], {}
    for p in report["predictions"]:
        if not isinstance(p, dict) or not {"path", "label", "probs"} <= set(p):
            raise CompareError(f"report {name}: a prediction without path, label or probs: {p!r}")
        if p["path"] in out:
            raise CompareError(f"report {name}: image {p['path']} is scored twice")
        if p["label"] not in labels or len(p["probs"]) != len(labels):
            raise CompareError(
                f"report {name}: {p['path']}: label {p['label']!r} or its {len(p['probs'])} "
                f"probabilities do not fit the report's labels {labels}"
            )
        out[p["path"]] = p
    return out


def pair_predictions(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The images both reports scored, in report A's order.

    Returns ``paths``, ``probs_a`` and ``probs_b`` ``(M, K)`` float64, ``targets`` ``(M,)``
    int64, ``groups`` (report A's group of each image; the path when it has none),
    ``only_a``, ``only_b`` (counts of unpaired images) and ``notes``.
    """
    if a["labels"] != b["labels"]:
        raise CompareError(
            f"the reports' label lists differ: A {a['labels']}, B {b['labels']}; compare models "
            "that name the same stages (map the labels with `flystage organise --map` and "
            "evaluate both on the same manifest)"
        )
    pa, pb = _by_path(a, "A"), _by_path(b, "B")
    paths = [path for path in pa if path in pb]
    if not paths:
        raise CompareError(
            f"no image is in both reports (A scored {len(pa)}, B {len(pb)}, e.g. "
            f"{next(iter(pa))} and {next(iter(pb))}); evaluate both models on the same "
            "manifest and split"
        )
    relabelled = [path for path in paths if pa[path]["label"] != pb[path]["label"]]
    if relabelled:
        path = relabelled[0]
        raise CompareError(
            f"{len(relabelled)} image(s) have a different true label in the two reports (e.g. "
            f"{path}: A {pa[path]['label']!r}, B {pb[path]['label']!r}); evaluate both models "
            "on the same manifest"
        )
    notes = []
    only_a, only_b = len(pa) - len(paths), len(pb) - len(paths)
    if only_a or only_b:
        notes.append(
            f"paired {len(paths)} images; left out {only_a} only in A and {only_b} only in B"
        )
    groups = [str(pa[path].get("group", path)) for path in paths]
    regrouped = sum(g != str(pb[path].get("group", path)) for g, path in zip(groups, paths))
    if regrouped:
        notes.append(f"{regrouped} image(s) are in another group in B; resampling A's groups")
    index = {label: i for i, label in enumerate(a["labels"])}
    return {
        "paths": paths,
        "probs_a": np.array([pa[path]["probs"] for path in paths], dtype=np.float64),
        "probs_b": np.array([pb[path]["probs"] for path in paths], dtype=np.float64),
        "targets": np.array([index[pa[path]["label"]] for path in paths], dtype=np.int64),
        "groups": groups,
        "only_a": only_a,
        "only_b": only_b,
        "notes": notes,
    }


def verdict(metric: str, interval: list[float]) -> str:
    """Which model the interval of B - A favours, if it excludes 0."""
    lo, hi = interval
    if lo <= 0.0 <= hi:
        return "no difference shown: interval includes 0"
    b_higher = lo > 0.0
    b_better = b_higher != (metric in LOWER_IS_BETTER)
    return f"{'B' if b_better else 'A'} better: interval excludes 0"


def compare_reports(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any]:
    """Report B against report A on the images both scored (JSON-safe).

    Returns ``labels``, ``n_paired``, ``only_in_a``, ``only_in_b``, ``metrics`` (per score in
    :data:`flystage.bootstrap.METRICS`: ``a``, ``b``, ``difference`` = b - a, ``interval``
    [lo, hi] of the difference, ``verdict``), ``bootstrap`` (method, resamples, level,
    n_groups, seed) and ``notes``.
    """
    paired = pair_predictions(a, b)
    scores, bootstrap = paired_bootstrap(
        image_terms(paired["probs_a"], paired["targets"]),
        image_terms(paired["probs_b"], paired["targets"]),
        paired["groups"],
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
    metrics = {}
    for name in METRICS:
        s = scores[name]
        interval = [json_float(s["interval"][0]), json_float(s["interval"][1])]
        metrics[name] = {
            "a": json_float(s["a"]),
            "b": json_float(s["b"]),
            "difference": json_float(s["difference"]),
            "interval": interval,
            "verdict": verdict(name, interval),
        }
    return {
        "labels": a["labels"],
        "n_paired": len(paired["paths"]),
        "only_in_a": paired["only_a"],
        "only_in_b": paired["only_b"],
        "metrics": metrics,
        "bootstrap": {**bootstrap, "seed": seed},
        "notes": paired["notes"],
    }


def comparison_text(result: dict[str, Any]) -> str:
    """The table: one line per score with A, B, B - A, its interval and the verdict;
    percentages for shares, differences in percentage points."""
    boot = result["bootstrap"]
    lines = [f"A: {result['a']}", f"B: {result['b']}"] if "a" in result else []
    lines.append(
        f"{result['n_paired']} images paired, {boot['n_groups']} groups; "
        f"{100 * boot['level']:.0f} % intervals of B - A: paired {boot['method']}, "
        f"{boot['resamples']} resamples, seed {boot['seed']}"
    )
    lines += [f"note: {note}" for note in result["notes"]]
    lines.append(f"{'':16}  {'A':>7}  {'B':>7}  {'B - A':>7}  {'interval':<16}  verdict")
    for name, m in result["metrics"].items():
        label, share = NAMES[name]
        scale, unit, digits = (100.0, "%", 1) if share else (1.0, "", 3)
        lo, hi = (scale * x for x in m["interval"])
        lines.append(
            f"{label:16}  {scale * m['a']:>6.{digits}f}{unit or ' '}  "
            f"{scale * m['b']:>6.{digits}f}{unit or ' '}  "
            f"{scale * m['difference']:>+7.{digits}f}  "
            f"{f'[{lo:+.{digits}f}, {hi:+.{digits}f}]':<16}  {m['verdict']}"
        )
    lines.append("shares in %, their differences in percentage points; stage error in stages")
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("report_a", type=Path, metavar="REPORT_A", help="report.json of model A")
    parser.add_argument(
        "report_b", type=Path, metavar="REPORT_B", help="report.json of model B (differences B - A)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--resamples",
        type=int,
        default=N_BOOT,
        help="bootstrap resamples of the groups (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.resamples < 1:
        raise CompareError(f"--resamples {args.resamples}: give at least 1, e.g. 2000")
    result = compare_reports(
        load_report(args.report_a),
        load_report(args.report_b),
        n_boot=args.resamples,
        seed=args.seed,
    )
    result = {"a": str(args.report_a), "b": str(args.report_b), **result}
    print(json.dumps(result) if args.json else comparison_text(result))
    return 0
