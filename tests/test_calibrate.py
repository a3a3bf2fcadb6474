"""Temperature scaling, expected calibration error and the coverage table, on synthetic
models whose calibration is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from flystage.calibrate import (
    coverage_table,
    expected_calibration_error,
    fit_temperature,
    nll,
    softmax,
)


def calibrated_set(n: int = 20_000, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets drawn from softmax(logits): a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, k))
    probs = softmax(logits)
    targets = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return logits, targets


def test_softmax_and_nll_by_hand() -> None:
    logits = np.array([[0.0, np.log(3.0)], [2.0, 2.0]])
    np.testing.assert_allclose(softmax(logits), [[0.25, 0.75], [0.5, 0.5]])
    np.testing.assert_allclose(
        softmax(logits, temperature=2.0)[0], [1 / (1 + np.sqrt(3)), np.sqrt(3) / (1 + np.sqrt(3))]
    )
    assert nll(logits, np.array([1, 0])) == pytest.approx(-(np.log(0.75) + np.log(0.5)) / 2)


def test_temperature_undoes_overconfidence_and_lowers_the_nll() -> None:
    logits, targets = calibrated_set()
    assert fit_temperature(logits, targets) == pytest.approx(1.0, abs=0.05)
    overconfident = 5.0 * logits
    t = fit_temperature(overconfident, targets)
    assert t == pytest.approx(5.0, rel=0.05)
    assert nll(overconfident, targets, t) < nll(overconfident, targets) - 0.5
    assert nll(overconfident, targets, t) == pytest.approx(nll(logits, targets), abs=0.01)
    # The fitted T is the NLL's minimum: a little either side is worse.
    assert nll(overconfident, targets, t) < min(
        nll(overconfident, targets, t * 0.9), nll(overconfident, targets, t * 1.1)
    )
    # Underconfident logits are sharpened (T < 1); ranking, so accuracy, never changes.
    assert fit_temperature(logits / 4.0, targets) == pytest.approx(0.25, rel=0.05)
    assert np.array_equal(softmax(overconfident, t).argmax(1), overconfident.argmax(1))


def test_temperature_on_no_images_and_the_prior_on_a_few() -> None:
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
    # Ten images, every answer right with a margin: the NLL alone keeps falling as T shrinks,
    # down to the bound (a model sure of everything) ...
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]] * 5)
    targets = np.array([0, 1] * 5)
    assert fit_temperature(logits, targets, prior_sd=0.0, bounds=(0.1, 10.0)) == pytest.approx(
        0.1, rel=1e-3
    )
    # ... the prior on log T (SD 0.5) holds it near 1: the minimum of NLL + (log T)^2 / (2 SD^2 n).
    t = fit_temperature(logits, targets)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 20_001))
    objective = [
        nll(logits, targets, g) + np.log(g) ** 2 / (2 * 0.5**2) / len(targets) for g in grid
    ]
    assert t == pytest.approx(grid[int(np.argmin(objective))], rel=1e-3)
    assert 0.5 < t < 1.0


def test_ece_small_when_calibrated_large_when_overconfident() -> None:
    logits, targets = calibrated_set()
    calibrated = expected_calibration_error(softmax(logits), targets)
    overconfident = expected_calibration_error(softmax(5.0 * logits), targets)
    assert calibrated < 0.015
    assert overconfident > 0.1
    t = fit_temperature(5.0 * logits, targets)
    assert expected_calibration_error(softmax(5.0 * logits, t), targets) < 0.02


def test_ece_by_hand() -> None:
    # Bin [0.9, 1.0): 2 images at 0.95, one right -> |0.5 - 0.95| = 0.45, weight 2/4.
    # Bin [0.6, 0.7): 2 images at 0.6, both right -> |1.0 - 0.6| = 0.4, weight 2/4.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6], [0.6, 0.4]])
    targets = np.array([0, 1, 1, 0])
    assert expected_calibration_error(probs, targets) == pytest.approx(0.5 * 0.45 + 0.5 * 0.4)
    # Confidence 1.0 falls into the last bin, not past it.
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == pytest.approx(0.0)
    assert np.isnan(expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int)))


def test_coverage_table_by_hand() -> None:
    probs = np.array(
        [
            [0.97, 0.02, 0.01],  # right
            [0.05, 0.91, 0.04],  # wrong (target 0)
            [0.10, 0.10, 0.80],  # right
            [0.30, 0.65, 0.05],  # right
            [0.40, 0.35, 0.25],  # wrong (target 2)
        ]
    )
    targets = np.array([0, 0, 2, 1, 2])
    rows = coverage_table(probs, targets, thresholds=(0.5, 0.8, 0.95, 0.99))
    assert rows == [
        {"threshold": 0.5, "coverage": 0.8, "n": 4, "accuracy": 0.75},
        {"threshold": 0.8, "coverage": 0.6, "n": 3, "accuracy": round(2 / 3, 4)},
        {"threshold": 0.95, "coverage": 0.2, "n": 1, "accuracy": 1.0},
        {"threshold": 0.99, "coverage": 0.0, "n": 0, "accuracy": None},
    ]
    empty = coverage_table(np.zeros((0, 3)), np.zeros(0, int), thresholds=(0.5,))
    assert empty == [{"threshold": 0.5, "coverage": None, "n": 0, "accuracy": None}]
