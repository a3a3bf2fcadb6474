"""evaluate: metrics on hand-made probabilities, the confusion PNG, and a real model on a
manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from artefact_helpers import LABELS, make_artefact, write_image
from flystage import cli
from flystage.bootstrap import image_terms, metrics_of_sums, resampled_sums
from flystage.calibrate import expected_calibration_error
from flystage.evaluate import (
    confusion_matrix,
    coverage_curve,
    evaluate_manifest,
    evaluate_probs,
    plot_confusion,
    plot_coverage,
    recall_precision,
    report_text,
    topk_accuracy,
    topk_contiguous,
)
from flystage.manifest import ManifestError, Record, write_manifest
from flystage.predictor import Predictor

# Four images, three classes; targets 0, 0, 2, 1.
PROBS = np.array(
    [
        [0.5, 0.3, 0.2],  # predicted 0, true 0: top-1 hit
        [0.1, 0.2, 0.7],  # predicted 2, true 0: the true class is last
        [0.3, 0.4, 0.3],  # predicted 1, true 2: a tie with class 0, which ranks first
        [0.2, 0.6, 0.2],  # predicted 1, true 1: top-1 hit
    ]
)
TARGETS = np.array([0, 0, 2, 1])


def test_topk_accuracy_known_answers():
    assert topk_accuracy(PROBS, TARGETS, 1) == 0.5
    assert topk_accuracy(PROBS, TARGETS, 2) == 0.5  # row 2's true class loses the tie at rank 2
    assert topk_accuracy(PROBS, TARGETS, 3) == 1.0
    assert topk_accuracy(PROBS, TARGETS, 10) == 1.0
    # A constant model is not rewarded for ties.
    assert topk_accuracy(np.full((3, 4), 0.25), np.array([3, 3, 3]), 1) == 0.0
    with pytest.raises(ValueError):
        topk_accuracy(PROBS, TARGETS[:3], 1)


def test_confusion_recall_precision_known_answers():
    cm = confusion_matrix(TARGETS, PROBS.argmax(axis=1), 3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 0]]
    recall, precision = recall_precision(cm)
    np.testing.assert_allclose(recall, [0.5, 1.0, 0.0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 0.0])
    recall, precision = recall_precision(np.array([[2, 0], [0, 0]]))
    assert recall[0] == 1.0 and np.isnan(recall[1]) and np.isnan(precision[1])


def test_evaluate_probs_report():
    report = evaluate_probs(PROBS, TARGETS, ["1-3", "4-6", "7-8"])
    assert report["n"] == 4 and report["top1"] == 0.5 and report["top3"] == 1.0
    assert report["mean_recall"] == 0.5
    assert report["per_stage"]["1-3"] == {"recall": 0.5, "precision": 1.0, "support": 2}
    assert report["per_stage"]["7-8"] == {"recall": 0.0, "precision": 0.0, "support": 1}
    assert report["confusion"] == [[1, 0, 1], [0, 1, 0], [0, 1, 0]]
    json.dumps(report)  # JSON-safe
    absent = evaluate_probs(PROBS[:2], TARGETS[:2], ["1-3", "4-6", "7-8"])
    assert absent["per_stage"]["4-6"] == {"recall": None, "precision": None, "support": 0}
    text = report_text(absent)
    assert "top-1 50.0%" in text and "n/a" in text
    lines = report_text(report).splitlines()
    lo, hi = (100 * x for x in report["intervals"]["top1"])
    assert lines[0].startswith(f"images 4   top-1 50.0% [{lo:.1f}, {hi:.1f}]   top-3 100.0% [")
    assert "within one stage 75.0% [" in lines[0]
    assert lines[1].startswith("mean stage error 0.75 [")
    assert "2000 resamples of the 4 groups" in lines[1]
    with pytest.raises(ValueError, match="for 2 labels"):
        evaluate_probs(PROBS, TARGETS, ["a", "b"])


def test_stage_distance_and_contiguity_by_hand():
    # Top-1 0, 2, 1, 1 against truth 0, 0, 2, 1: stage errors 0, 2, 1, 0.
    report = evaluate_probs(PROBS, TARGETS, ["1-3", "4-6", "7-8"])
    assert report["within1"] == 0.75 and report["mae"] == 0.75
    assert report["top3_contiguous"] == 1.0  # three labels: any top 3 is all of them
    five = np.array(
        [
            [0.5, 0.2, 0.15, 0.1, 0.05],  # top 3: 0, 1, 2 (neighbours)
            [0.4, 0.05, 0.25, 0.1, 0.2],  # 0, 2, 4: scattered
            [0.05, 0.2, 0.4, 0.25, 0.1],  # 2, 3, 1: neighbours in another order
            [0.3, 0.25, 0.05, 0.3, 0.1],  # 0 and 3 tie (0 ranks first), then 1: 0, 3, 1
        ]
    )
    assert topk_contiguous(five, 3) == 0.5
    report = evaluate_probs(five, np.array([4, 4, 0, 1]), ["1", "2", "3", "4", "5"])
    # Top-1 0, 0, 2, 0 against truth 4, 4, 0, 1: errors 4, 4, 2, 1.
    assert report["within1"] == 0.25 and report["mae"] == 2.75
    assert report["top3_contiguous"] == 0.5
    two = evaluate_probs(np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([1, 1]), ["a", "b"])
    assert two["top3_contiguous"] is None and two["within1"] == 1.0 and two["mae"] == 0.5
    json.dumps(two)


def _grouped(n_groups: int, per_group: int, seed: int, correlated: bool = False):
    """Probabilities of 5 ordered stages for n_groups x per_group images, right about 70 % of
    the time; with ``correlated`` every image of a group gets the group's row and truth."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    units = n_groups if correlated else n
    targets = rng.integers(0, 5, units)
    top1 = np.where(rng.random(units) < 0.7, targets, (targets + rng.integers(1, 5, units)) % 5)
    probs = rng.dirichlet(np.ones(5), units) * 0.4
    probs[np.arange(units), top1] += 0.6
    if correlated:
        probs, targets = np.repeat(probs, per_group, axis=0), np.repeat(targets, per_group)
    groups = [f"g{i // per_group}" for i in range(n)]
    return probs, targets, groups


def _width(interval):
    return interval[1] - interval[0]


def test_intervals_hold_the_estimate_and_narrow_with_more_groups():
    labels = ["1", "2", "3", "4", "5"]
    probs, targets, groups = _grouped(20, 5, seed=1)
    few = evaluate_probs(probs, targets, labels, groups)
    probs, targets, groups = _grouped(400, 5, seed=1)
    many = evaluate_probs(probs, targets, labels, groups)
    for report in (few, many):
        assert set(report["intervals"]) == {"top1", "top3", "ece", "within1", "mae"}
        for key, (lo, hi) in report["intervals"].items():
            assert lo <= report[key] <= hi, key
        assert 0.0 <= report["intervals"]["top1"][0] < report["intervals"]["top1"][1] <= 1.0
    for key in ("top1", "top3", "within1", "mae", "ece"):
        assert _width(many["intervals"][key]) < 0.5 * _width(few["intervals"][key]), key
    assert few["bootstrap"] == {
        "method": "percentile bootstrap over groups",
        "resamples": 2000,
        "level": 0.95,
        "n_groups": 20,
    }
    json.dumps(many)
    # All right: nothing to resample away.
    sure = evaluate_probs(np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 2, 0]), ["a", "b", "c"])
    assert sure["intervals"]["top1"] == [1.0, 1.0] and sure["intervals"]["mae"] == [0.0, 0.0]


def test_cluster_bootstrap_is_wider_when_images_of_a_group_agree():
    # 40 groups of 10 identical images: 40 independent answers, not 400.
    probs, targets, groups = _grouped(40, 10, seed=2, correlated=True)
    labels = ["1", "2", "3", "4", "5"]
    by_group = evaluate_probs(probs, targets, labels, groups)
    by_image = evaluate_probs(probs, targets, labels)
    assert by_group["top1"] == by_image["top1"]
    assert by_group["bootstrap"]["n_groups"] == 40 and by_image["bootstrap"]["n_groups"] == 400
    # About sqrt(10) wider; well above 2 for any seed.
    for key in ("top1", "within1", "mae"):
        assert _width(by_group["intervals"][key]) > 2.0 * _width(by_image["intervals"][key]), key


def test_intervals_are_deterministic_for_a_seed():
    probs, targets, groups = _grouped(30, 4, seed=3)
    labels = ["1", "2", "3", "4", "5"]
    first = evaluate_probs(probs, targets, labels, groups, seed=7)
    assert evaluate_probs(probs, targets, labels, groups, seed=7) == first
    assert evaluate_probs(probs, targets, labels, groups, seed=8)["intervals"] != first["intervals"]
    fewer = evaluate_probs(probs, targets, labels, groups, n_boot=100)
    assert fewer["bootstrap"]["resamples"] == 100
    off = evaluate_probs(probs, targets, labels, groups, n_boot=0)
    assert off["intervals"]["top1"] is None and off["bootstrap"]["resamples"] == 0
    assert off["top1"] == first["top1"]
    with pytest.raises(ValueError, match="each of the 120 images"):
        evaluate_probs(probs, targets, labels, groups[:-1])
    # The positional signature of old still works and ignores nothing.
    assert evaluate_probs(probs, targets, labels)["n"] == 120


def test_a_resample_scores_as_the_drawn_images_would():
    """The summed-terms shortcut gives what scoring the resampled multiset directly gives."""
    probs, targets, groups = _grouped(12, 3, seed=4)
    probs[::5] = np.roll(probs[::5], 2, axis=1)  # errors of 2 stages too
    index = np.unique(groups, return_inverse=True)[1]  # group numbers in sorted-name order
    for seed in range(5):
        sums, counts, n_groups = resampled_sums(image_terms(probs, targets), groups, 1, seed)
        drawn = np.random.default_rng(seed).integers(0, n_groups, size=(1, n_groups))[0]
        rows = np.concatenate([np.flatnonzero(index == g) for g in drawn])
        scores = metrics_of_sums(sums[0], counts[0])
        direct = evaluate_probs(probs[rows], targets[rows], ["1", "2", "3", "4", "5"], n_boot=0)
        assert counts[0] == len(rows)
        for key in ("top1", "top3", "within1", "mae"):
            assert scores[key] == pytest.approx(direct[key], abs=1e-6), key
        assert scores["ece"] == pytest.approx(
            expected_calibration_error(probs[rows], targets[rows])
        )


def test_report_text_prints_ece_and_coverage():
    # Top-1 probabilities 0.5, 0.7, 0.4, 0.6; rows 0 and 3 right, 1 and 2 wrong.
    report = evaluate_probs(PROBS, TARGETS, ["1-3", "4-6", "7-8"])
    assert report["coverage"][:3] == [
        {"threshold": 0.5, "coverage": 0.75, "n": 3, "accuracy": 0.6667},
        {"threshold": 0.6, "coverage": 0.5, "n": 2, "accuracy": 0.5},
        {"threshold": 0.7, "coverage": 0.25, "n": 1, "accuracy": 0.0},
    ]
    lines = report_text(report).splitlines()
    assert f"calibration: ECE {report['ece']:.3f}" in "\n".join(lines)
    assert "  p >= 0.50:  75 % of images (3 of 4), top-1  67 %" in lines
    assert "  p >= 0.60:  50 % of images (2 of 4), top-1  50 %" in lines
    assert "  p >= 0.70:  25 % of images (1 of 4), top-1   0 %" in lines
    assert "  p >= 0.95:   0 % of images (0 of 4), top-1 n/a" in lines
    # The model's fitted temperature is named when the report carries it.
    report["model"] = {"metrics": {"temperature": 1.5}}
    assert "temperature 1.50 fitted on the valid split" in report_text(report)
    # Reports without calibration (older ones) still print.
    old = {k: v for k, v in report.items() if k not in ("ece", "coverage")}
    assert "p >=" not in report_text(old) and "ECE" not in report_text(old)


def test_coverage_curve_and_plot(tmp_path: Path):
    import matplotlib.image

    curve = coverage_curve(PROBS, TARGETS)
    assert len(curve) == 101 and curve[0]["threshold"] == 0.0 and curve[-1]["threshold"] == 1.0
    assert (
        curve[0]["coverage"] == 1.0 and curve[0]["accuracy"] == 0.5
    )  # threshold 0 accepts all: top-1
    assert next(r for r in curve if r["threshold"] == 0.6) == {
        "threshold": 0.6,
        "coverage": 0.5,
        "n": 2,
        "accuracy": 0.5,
    }
    assert curve[-1] == {"threshold": 1.0, "coverage": 0.0, "n": 0, "accuracy": None}
    path = plot_coverage(curve, tmp_path / "sub" / "coverage.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[1] > pixels.shape[0] > 300  # two panels side by side
    assert pixels[..., :3].std() > 0.05
    # Both curves are drawn: matplotlib's default blue (accuracy) and orange (coverage).
    rgb = (pixels[..., :3] * 255).astype(int)
    for colour in ((31, 119, 180), (255, 127, 14)):
        assert (np.abs(rgb - colour).sum(axis=-1) < 30).sum() > 200, colour
    # From a report's table alone, and with no image accepted anywhere, it still draws.
    plot_coverage(
        evaluate_probs(PROBS, TARGETS, ["1-3", "4-6", "7-8"])["coverage"], tmp_path / "table.png"
    )
    plot_coverage(coverage_curve(np.zeros((0, 3)), np.zeros(0, int)), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").is_file()


def test_plot_confusion_writes_a_real_png(tmp_path: Path):
    import matplotlib.image

    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]])
    path = plot_confusion(cm, ["1-3", "4-6", "7-8"], tmp_path / "sub" / "cm.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real tiny model and a manifest of synthetic images with train and test splits."""
    root = tmp_path_factory.mktemp("eval")
    make_artefact(root / "model")
    records = []
    for i in range(10):
        path = write_image(root / "data" / f"img{i}.{'tif' if i % 2 else 'png'}", seed=i)
        split = "test" if i < 6 else "train"
        records.append(Record(path, LABELS[i % len(LABELS)], f"g{i // 2}", split, f"{i:040d}"))
    manifest = write_manifest(records, root / "data" / "manifest.csv")
    return root / "model", manifest, records


def test_evaluate_manifest_agrees_with_the_predictor(setup):
    model_dir, manifest, records = setup
    report, probs, targets = evaluate_manifest(model_dir, manifest, "test", batch_size=4, threads=1)
    test = [r for r in records if r.split == "test"]
    assert report["n"] == 6 and probs.shape == (6, len(LABELS))
    assert targets.tolist() == [LABELS.index(r.label) for r in test]
    direct = Predictor(model_dir, threads=1).predict_sources([r.path for r in test], k=1)
    assert [LABELS.index(p.top[0][0]) for p in direct] == probs.argmax(axis=1).tolist()
    assert report["top1"] == pytest.approx(np.mean(probs.argmax(axis=1) == targets))
    assert sum(map(sum, report["confusion"])) == 6
    assert report["model"]["labels"] == LABELS and report["split"] == "test"
    assert report["same_manifest_as_training"] is False
    # Every image's probabilities and group, so that two reports can be paired image by image.
    assert [(p["path"], p["group"], p["label"]) for p in report["predictions"]] == [
        (str(r.path), r.group, r.label) for r in test
    ]
    np.testing.assert_allclose([p["probs"] for p in report["predictions"]], probs, atol=1e-6)
    assert report["bootstrap"]["n_groups"] == 3  # g0, g1, g2: two test images each
    assert evaluate_manifest(model_dir, manifest, "all", threads=1)[0]["n"] == 10


def test_evaluate_cli_writes_report_and_png(setup, tmp_path: Path, capsys):
    model_dir, manifest, _ = setup
    out = tmp_path / "report"
    assert (
        cli.main(
            [
                "evaluate",
                "--model",
                str(model_dir),
                "--manifest",
                str(manifest),
                "--out",
                str(out),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "top-1" in printed and "recall" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 6 and set(report["per_stage"]) == set(LABELS)
    assert len(report["predictions"]) == 6 and report["intervals"]["top1"] is not None
    assert len(report["manifest_sha256"]) == 64
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["threshold"] for r in report["coverage"]] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert f"ECE {report['ece']:.3f}" in printed
    for r in report["coverage"]:
        assert f"p >= {r['threshold']:.2f}: " in printed and f"({r['n']} of 6)" in printed
    assert "coverage.png" in printed
    assert (
        cli.main(
            ["evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(out)]
        )
        == 2
    )
    assert "already holds a report" in capsys.readouterr().err
    # A coverage plot alone is a report too: not replaced without --force.
    only = tmp_path / "only"
    only.mkdir()
    (only / "coverage.png").write_bytes(b"mine")
    assert (
        cli.main(
            ["evaluate", "--model", str(model_dir), "--manifest", str(manifest), "--out", str(only)]
        )
        == 2
    )
    assert (only / "coverage.png").read_bytes() == b"mine"


def test_evaluate_refuses_unknown_labels_and_empty_splits(setup, tmp_path: Path):
    model_dir, _, records = setup
    odd = [Record(r.path, "stage 17", r.group, r.split, r.sha1) for r in records]
    manifest = write_manifest(odd, tmp_path / "odd.csv")
    with pytest.raises(ManifestError, match="not among the model's labels"):
        evaluate_manifest(model_dir, manifest, "test", threads=1)
    with pytest.raises(ManifestError, match="no images in split 'valid'"):
        evaluate_manifest(model_dir, manifest, "valid", threads=1)
