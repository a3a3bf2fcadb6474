"""The evaluation report as one self-contained HTML file (``flystage evaluate --html``).

Everything is inside the file (pictures as base64 PNG data, styles inline, no script), so a
lab can email it or open it offline: top-1/top-3, per-stage recall and precision, the
confusion matrix, the coverage/accuracy curve when the model's probabilities are calibrated
(a fitted temperature; without one the curve would promise what the model cannot keep), and
thumbnails of the worst errors: the confident wrong answers, as the model saw the images.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flystage.files import atomic_write, png_bytes
from flystage.image_checks import ImageError
from flystage.imaging import PreprocessConfig, load
from flystage.manifest import Record

WORST = 12  # thumbnails of the most confident errors


def _img(png: bytes, alt: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" style="{css}">'


def worst_errors(probs: np.ndarray, targets: np.ndarray, n: int = WORST) -> list[int]:
    """Indices of wrong top-1 answers, most confident first."""
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != targets)
    return [int(i) for i in wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:n]]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _error_cards(
    probs: np.ndarray,
    targets: np.ndarray,
    records: Sequence[Record],
    config: PreprocessConfig,
    labels: Sequence[str],
) -> list[str]:
    """A figure for each of the worst errors: the image as the model saw it, true and
    predicted stage."""
    esc = html.escape
    cards = []
    for i in worst_errors(probs, targets):
        record, p = records[i], probs[i]
        try:
            picture = _img(
                png_bytes(load(record.path, config, name=str(record.path)), channels_first=True),
                record.path.name,
                "width:100%",
            )
        except (ImageError, ValueError, OSError) as exc:
            picture = f"<p>cannot show: {esc(str(exc))}</p>"
        predicted = int(p.argmax())
        cards.append(
            f"<figure>{picture}<figcaption><b>true {esc(labels[int(targets[i])])}</b>, predicted "
            f"{esc(labels[predicted])} (p "
            f"{p[predicted]:.2f})<br><small>{esc(str(record.path.name))}</small></figcaption></figure>"
        )
    return cards


def _coverage_section(coverage_png: Path | None) -> str:
    """The coverage curve's section, or why there is none (uncalibrated model)."""
    if coverage_png is not None:
        return (
            "<h2>Accepting sure answers</h2><p>Top-1 accuracy of the images whose top-1 "
            "probability reaches a threshold, and the share of images that do (<code>flystage "
            "predict --unsure-below P</code> leaves the rest for a look).</p>"
            + _img(coverage_png.read_bytes(), "coverage and accuracy", "max-width:100%")
        )
    else:
        return (
            "<h2>Accepting sure answers</h2><p>This model's probabilities are not calibrated (no "
            "temperature fitted on a validation split), so no threshold is recommended.</p>"
        )


def _page(report: dict[str, Any], confusion_png: Path, errors: str, coverage: str) -> str:
    """The page's text around its two computed sections (error cards, coverage)."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td>{_pct(s['recall'])}</td><td>{_pct(s['precision'])}</td><td>{s['support']}</td></tr>"
        for label, s in report["per_stage"].items()
    )
    model = report.get("model") or {}
    title = f"flystage evaluation: {report.get('split', '')} split, {report['n']} images"
    other_manifest = (
        ""
        if report.get("same_manifest_as_training", True)
        else " (not the manifest the model was trained on)"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; max-width: 1100px; margin: 1em auto; \
padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; }} \
td, th {{ border: 1px solid #ccc; padding: 3px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.errors {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); \
gap: 12px; }}
figure {{ margin: 0; background: #f3f3f3; padding: 6px; }} figure img {{ background: #000; }}
.big {{ font-size: 1.3em; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p class="big">top-1 <b>{_pct(report["top1"])}</b> \
&nbsp; top-3 <b>{_pct(report["top3"])}</b> \
&nbsp; mean recall {_pct(report.get("mean_recall"))}</p>
<p>Model: {esc(str(model.get("arch", "")))} ({esc(str(model.get("model_dir", "")))}), \
created {esc(str(model.get("created", "")))}.
Manifest: {esc(str(report.get("manifest", "")))}{other_manifest}.</p>
<h2>Per stage</h2>
<table><tr><th>stage</th><th>recall</th><th>precision</th><th>images</th></tr>{rows}</table>
<h2>Confusion matrix</h2>
{_img(confusion_png.read_bytes(), "confusion matrix", "max-width:100%")}
{coverage}
<h2>The worst errors</h2>
<p>The most confident wrong answers, as the model saw the images (its own preprocessing).</p>
<div class="errors">{errors}</div>
</body></html>
"""


def write_html(
    path: Path,
    report: dict[str, Any],
    probs: np.ndarray,
    targets: np.ndarray,
    records: Sequence[Record],
    config: PreprocessConfig,
    confusion_png: Path,
    coverage_png: Path,
) -> Path:
    """Write ``report.html``; the coverage curve only for a calibrated model (a fitted
    temperature)."""
    metrics = (report.get("model") or {}).get("metrics") or {}
    calibrated = isinstance(metrics, dict) and isinstance(metrics.get("temperature"), (int, float))
    cards = _error_cards(probs, targets, records, config, report["labels"])
    errors = "".join(cards) or "<p>No errors on this split.</p>"
    coverage = _coverage_section(coverage_png if calibrated else None)
    text = _page(report, confusion_png, errors, coverage)
    with atomic_write(path) as f:
        f.write(text)
    return path
