"""Ordinal targets: neighbouring stages share credit, in the exact probe and the epoch loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache, to_float
from flystage.training.ensemble import train_model
from flystage.training.ordinal import OrdinalLoss, ordinal_matrix, ordinal_targets
from flystage.training.probe import L2_REFERENCE_IMAGES, scaled_l2
from serving_helpers import bdgp_records


def test_ordinal_matrix_gives_each_neighbour_half_the_smoothing() -> None:
    m = ordinal_matrix(4, 0.4)
    assert torch.allclose(m.sum(1), torch.ones(4, dtype=torch.float64))
    assert m[1].tolist() == pytest.approx([0.2, 0.6, 0.2, 0.0])
    assert m[0].tolist() == pytest.approx([0.8, 0.2, 0.0, 0.0])  # an end stage: one neighbour
    assert m[3].tolist() == pytest.approx([0.0, 0.0, 0.2, 0.8])
    assert torch.equal(ordinal_matrix(3, 0.0), torch.eye(3, dtype=torch.float64))
    assert ordinal_targets(torch.tensor([2, 0]), 4, 0.4).tolist() == [m[2].tolist(), m[0].tolist()]
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ordinal_matrix(3, 1.0)


def test_ordinal_loss_is_cross_entropy_without_smoothing_and_cheaper_for_a_neighbour() -> None:
    logits = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 5
    plain = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, y)
    assert torch.allclose(OrdinalLoss(5, 0.0, label_smoothing=0.1)(logits, y), plain)
    # Confident in stage 2 when the truth is 1 (a neighbour) or 4 (far): smoothing makes the
    # neighbour's mistake cheaper than the far one's, the plain loss does not.
    confident = torch.tensor([[0.0, 0.0, 8.0, 0.0, 0.0]])
    loss = OrdinalLoss(5, 0.3)
    near, far = loss(confident, torch.tensor([1])), loss(confident, torch.tensor([4]))
    assert near < far - 1.0
    ce = nn.CrossEntropyLoss()
    assert ce(confident, torch.tensor([1])) == pytest.approx(
        ce(confident, torch.tensor([4])).item()
    )


def test_probe_l2_is_a_fixed_prior_scaled_by_the_training_images() -> None:
    assert scaled_l2(1.0, L2_REFERENCE_IMAGES) == 1.0
    assert scaled_l2(1.0, 2000) == pytest.approx(0.1)
    assert scaled_l2(0.5, 100) == pytest.approx(1.0)


def _neighbour_mass(model: nn.Module, records, labels, cache: ImageCache) -> float:
    """Mean probability the model gives the true stage's neighbours on ``records``."""
    with torch.no_grad():
        probs = torch.softmax(model(to_float(cache.get([r.path for r in records]))), 1).numpy()
    y = np.array([labels.index(r.label) for r in records])
    m = ordinal_matrix(len(labels), 0.5).numpy()
    near = (m > 0) & ~np.eye(len(labels), dtype=bool)
    return float(np.mean([probs[i, near[c]].sum() for i, c in enumerate(y)]))


@pytest.mark.parametrize("solver", ["lbfgs", "sgd"])
def test_ordinal_probe_on_real_images_moves_probability_to_neighbouring_stages(
    bdgp_root, solver: str
) -> None:
    torch.set_num_threads(1)
    train, valid = bdgp_records(bdgp_root, train_per_stage=4, valid_per_stage=1)
    labels = sorted({r.label for r in train}, key=lambda s: int(s.split("-")[0]))
    cache = ImageCache(TrainConfig().preprocess)
    masses = []
    for smoothing in (0.0, 0.4):
        config = TrainConfig(
            ordinal_smoothing=smoothing, probe_solver=solver, epochs=3, calibrate=False, threads=1
        )
        result = train_model(
            train, valid, config, log=lambda line: None, labels=labels, image_cache=cache
        )
        masses.append(_neighbour_mass(result.model, train, labels, cache))
    assert masses[1] > masses[0] + 0.05, masses
