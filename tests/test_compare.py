"""compare: paired differences of two reports written as `flystage evaluate` writes them, the
paired bootstrap over groups, and the command's refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flystage import cli
from flystage.compare import verdict
from flystage.evaluate import evaluate_probs, predictions_of
from flystage.manifest import Record

LABELS = ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"]
N = 300


def _models(fixed: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets ``(N,)`` and two models' probabilities ``(N, 6)``: A right on 180 images, B the
    same model except right on the ``fixed`` images too (30 of A's 120 errors)."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, len(LABELS), N)
    wrong = rng.permutation(N)[:120]
    top1 = targets.copy()
    top1[wrong] = (targets[wrong] + rng.integers(1, len(LABELS), 120)) % len(LABELS)
    probs_a = 0.4 * rng.dirichlet(np.ones(len(LABELS)), N)
    probs_a[np.arange(N), top1] += 0.6
    probs_b = probs_a.copy()
    chosen = wrong[fixed]
    probs_b[chosen, targets[chosen]] += 1.0  # now the clear top-1
    probs_b[chosen] /= probs_b[chosen].sum(axis=1, keepdims=True)
    return targets, probs_a, probs_b


def _write(path: Path, probs: np.ndarray, targets: np.ndarray, groups: list[str], rows=None):
    """A report.json as `flystage evaluate` writes it, over the images ``rows`` (default all)."""
    rows = np.arange(len(targets)) if rows is None else np.asarray(rows)
    records = [
        Record(Path(f"/lab/img{i:03d}.tif"), LABELS[targets[i]], groups[i], "test", f"{i:040d}")
        for i in rows
    ]
    report = evaluate_probs(probs[rows], targets[rows], LABELS, [groups[i] for i in rows])
    report["predictions"] = predictions_of(records, probs[rows], [groups[i] for i in rows])
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path


def _compare(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = cli.main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def spread(tmp_path: Path):
    """B right on 30 more of 300 images, spread over 60 groups of 5 (genes)."""
    targets, probs_a, probs_b = _models(np.arange(30))
    groups = [f"gene{i % 60:02d}" for i in range(N)]
    return (
        _write(tmp_path / "a.json", probs_a, targets, groups),
        _write(tmp_path / "b.json", probs_b, targets, groups),
        (targets, probs_a, probs_b, groups),
    )


def test_b_right_on_30_more_images_is_shown_better(spread, capsys):
    a, b, _ = spread
    code, out, err = _compare(capsys, a, b, "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result["n_paired"] == N and result["only_in_a"] == result["only_in_b"] == 0
    top1 = result["metrics"]["top1"]
    assert top1["a"] == 0.6 and top1["b"] == 0.7 and top1["difference"] == 0.1
    lo, hi = top1["interval"]
    assert 0.0 < lo < 0.1 < hi < 0.2
    assert top1["verdict"] == "B better: interval excludes 0"
    # The same images right or wrong under both models cancel: the paired interval of the
    # difference is narrower than A's own top-1 interval.
    own = json.loads(a.read_text())["intervals"]["top1"]
    assert hi - lo < own[1] - own[0]
    assert result["bootstrap"] == {
        "method": "percentile bootstrap over groups",
        "resamples": 2000,
        "level": 0.95,
        "n_groups": 60,
        "seed": 0,
    }
    assert set(result["metrics"]) == {"top1", "top3", "within1", "mae", "ece"}
    # The table says the same.
    code, out, _ = _compare(capsys, a, b)
    assert code == 0
    line = next(row for row in out.splitlines() if row.startswith("top-1 "))
    assert line.split()[1:4] == ["60.0%", "70.0%", "+10.0"]
    assert f"[+{100 * lo:.1f}, +{100 * hi:.1f}]" in line
    assert line.endswith("B better: interval excludes 0")
    assert "300 images paired, 60 groups" in out


def test_the_same_gain_in_a_few_groups_is_not_shown(tmp_path: Path, spread, capsys):
    """Thirty more right images that all sit in 3 of 30 genes may be luck of those genes."""
    targets, probs_a, probs_b, _ = spread[2]
    fixed = np.zeros(N, bool)
    # B's extra hits: the 30 images that _models fixed.
    fixed[(probs_b.argmax(axis=1) == targets) & (probs_a.argmax(axis=1) != targets)] = True
    order = np.concatenate([np.flatnonzero(fixed), np.flatnonzero(~fixed)])
    groups = [""] * N
    for rank, i in enumerate(order):
        groups[i] = f"gene{rank // 10:02d}"  # the 30 fixed images fill gene00 to gene02
    a = _write(tmp_path / "ca.json", probs_a, targets, groups)
    b = _write(tmp_path / "cb.json", probs_b, targets, groups)
    code, out, _ = _compare(capsys, a, b, "--json")
    top1 = json.loads(out)["metrics"]["top1"]
    assert code == 0 and top1["difference"] == 0.1
    assert top1["interval"][0] <= 0.0 and top1["verdict"].startswith("no difference shown")
    spread_top1 = json.loads(_compare(capsys, *spread[:2], "--json")[1])["metrics"]["top1"]
    assert np.diff(top1["interval"]) > 2 * np.diff(spread_top1["interval"])


def test_identical_reports_differ_by_exactly_zero(spread, capsys):
    a, _, _ = spread
    code, out, _ = _compare(capsys, a, a, "--json", "--resamples", "300")
    assert code == 0
    result = json.loads(out)
    assert result["bootstrap"]["resamples"] == 300
    for name, m in result["metrics"].items():
        assert m["a"] == m["b"] and m["difference"] == 0.0, name
        assert m["interval"] == [0.0, 0.0], name
        assert m["verdict"] == "no difference shown: interval includes 0", name


def test_a_seed_gives_the_same_answer(spread, capsys):
    a, b, _ = spread
    first = _compare(capsys, a, b, "--json", "--seed", "3")[1]
    assert _compare(capsys, a, b, "--json", "--seed", "3")[1] == first
    other = json.loads(_compare(capsys, a, b, "--json", "--seed", "4")[1])
    assert other["metrics"]["top3"]["interval"] != json.loads(first)["metrics"]["top3"]["interval"]


def test_only_the_shared_images_are_paired(tmp_path: Path, spread, capsys):
    targets, probs_a, probs_b, groups = spread[2]
    # B scored images 50..299 and 10 images A never saw (their paths are A's 0..9 renamed).
    b = _write(tmp_path / "b.json", probs_b, targets, groups, rows=np.arange(50, N))
    report = json.loads(b.read_text())
    extra = json.loads(
        _write(tmp_path / "x.json", probs_b, targets, groups, np.arange(10)).read_text()
    )
    for p in extra["predictions"]:
        p["path"] = p["path"].replace("/lab/", "/other/")
    report["predictions"] += extra["predictions"]
    b.write_text(json.dumps(report), encoding="utf-8")
    a = _write(tmp_path / "a.json", probs_a, targets, groups)
    code, out, _ = _compare(capsys, a, b)
    assert code == 0
    assert "250 images paired" in out
    assert "note: paired 250 images; left out 50 only in A and 10 only in B" in out
    result = json.loads(_compare(capsys, a, b, "--json")[1])
    assert (result["n_paired"], result["only_in_a"], result["only_in_b"]) == (250, 50, 10)
    shared = evaluate_probs(probs_a[50:], targets[50:], LABELS, n_boot=0)
    assert result["metrics"]["top1"]["a"] == shared["top1"]


def test_refusals_say_what_to_do(tmp_path: Path, spread, capsys):
    a, b, (targets, probs_a, _, groups) = spread
    relabelled = json.loads(b.read_text())
    relabelled["labels"] = [*LABELS[:-1], "13-17"]
    (tmp_path / "labels.json").write_text(json.dumps(relabelled))
    code, out, err = _compare(capsys, a, tmp_path / "labels.json")
    assert code == 2 and out == ""
    assert err.startswith("flystage compare: error: the reports' label lists differ")
    assert "--map" in err

    elsewhere = json.loads(b.read_text())
    for p in elsewhere["predictions"]:
        p["path"] = "/elsewhere/" + Path(p["path"]).name
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    code, _, err = _compare(capsys, a, tmp_path / "elsewhere.json")
    assert code == 2 and "error: no image is in both reports (A scored 300, B 300" in err
    assert "same manifest and split" in err

    bare = {k: v for k, v in json.loads(a.read_text()).items() if k != "predictions"}
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    code, _, err = _compare(capsys, tmp_path / "bare.json", b)
    assert code == 2 and "bare.json: the report has no per-image predictions" in err

    truth = json.loads(b.read_text())
    truth["predictions"][0]["label"] = LABELS[(targets[0] + 1) % len(LABELS)]
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    code, _, err = _compare(capsys, a, tmp_path / "truth.json")
    assert code == 2 and "1 image(s) have a different true label" in err

    code, _, err = _compare(capsys, a, tmp_path / "missing.json")
    assert code == 2 and "missing.json: not found" in err
    (tmp_path / "broken.json").write_text("{")
    assert _compare(capsys, a, tmp_path / "broken.json")[0] == 2
    code, _, err = _compare(capsys, a, b, "--resamples", "0")
    assert code == 2 and "--resamples 0" in err


def test_the_installed_command_exits_2_on_a_data_error(spread, tmp_path: Path):
    a, b, _ = spread
    other = json.loads(b.read_text())
    other["labels"] = list(reversed(LABELS))
    (tmp_path / "other.json").write_text(json.dumps(other))
    flystage = Path(sys.executable).parent / "flystage"
    done = subprocess.run(
        [str(flystage), "compare", str(a), str(tmp_path / "other.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "error: the reports' label lists differ" in done.stderr
    ok = subprocess.run(
        [str(flystage), "compare", str(a), str(b), "--resamples", "200"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and "B better: interval excludes 0" in ok.stdout


def test_verdict_reads_the_direction_of_each_score():
    assert verdict("top1", [0.01, 0.05]) == "B better: interval excludes 0"
    assert verdict("top1", [-0.05, -0.01]) == "A better: interval excludes 0"
    assert verdict("mae", [-0.3, -0.1]) == "B better: interval excludes 0"  # B's error smaller
    assert verdict("ece", [0.01, 0.02]) == "A better: interval excludes 0"
    assert verdict("within1", [0.0, 0.0]) == "no difference shown: interval includes 0"
    assert verdict("top3", [-0.01, 0.02]) == "no difference shown: interval includes 0"
