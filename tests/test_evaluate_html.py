"""flystage evaluate --html: one self-contained page with the figures and the worst errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from artefact_helpers import write_image
from flystage.evaluate import evaluate_probs, plot_confusion
from flystage.evaluate_html import worst_errors, write_html
from flystage.imaging import PreprocessConfig
from flystage.manifest import Record

LABELS = ["1-3", "4-6", "7-8"]


def test_worst_errors_most_confident_first() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    targets = np.array([0, 0, 1, 1])  # rows 1, 2 and 3 are wrong, with p 0.7, 0.8 and 0.6
    assert worst_errors(probs, targets) == [2, 1, 3]


@pytest.mark.parametrize("calibrated", [True, False])
def test_page_is_self_contained(tmp_path: Path, calibrated: bool) -> None:
    records = [
        Record(write_image(tmp_path / f"e{i}<x>.tif", seed=i), LABELS[i % 3], f"g{i}", "test", "")
        for i in range(6)
    ]
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=6)
    targets = np.array([i % 3 for i in range(6)])
    report = evaluate_probs(probs, targets, LABELS)
    report["model"] = {"arch": "tiny", "metrics": {"temperature": 1.3} if calibrated else {}}
    confusion = plot_confusion(np.array(report["confusion"]), LABELS, tmp_path / "confusion.png")
    coverage = plot_confusion(np.eye(3), LABELS, tmp_path / "coverage.png")  # any PNG will do here
    page = write_html(
        tmp_path / "report.html",
        report,
        probs,
        targets,
        records,
        PreprocessConfig(height=32, width=80),
        confusion,
        coverage,
    ).read_text(encoding="utf-8")
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(
        s.startswith("data:image/png;base64,") for s in sources
    )  # nothing to fetch
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    n_errors = int((probs.argmax(1) != targets).sum())
    assert len(sources) == 1 + int(calibrated) + min(n_errors, 12)
    assert ("not calibrated" in page) != calibrated
    assert "<x>" not in page  # file names are escaped
    for label in LABELS:
        assert f"<td>{label}</td>" in page
