"""The whole model of one training run: ``train_model`` fits every ensemble member with
``flystage.training.loop.fit``, averages their probabilities, fits the temperature on the
validation images and scores the result there."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flystage.calibrate import expected_calibration_error, fit_temperature, nll, softmax
from flystage.manifest import Record
from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache, gather_rows, to_float
from flystage.training.loop import FitResult, dist_info, fit, labels_and_cache
from flystage.training.models import Calibrated, EnsembleNet


@torch.no_grad()
def _logits(model: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    out = [
        model(to_float(images[i : i + batch_size])).double().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0))


def train_model(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    *,
    labels: Sequence[str] | None = None,
    image_cache: ImageCache | None = None,
    unlabelled: Sequence[Path] = (),
) -> FitResult:
    """The whole model of one training run: ``fit`` once per ensemble member (each arch of
    ``config.member_archs`` with ``config.ensemble`` seeds), members' probabilities averaged
    (:class:`flystage.training.models.EnsembleNet`), and, with ``config.calibrate``, a temperature
    fitted on the validation images (:class:`flystage.training.models.Calibrated`).

    Arguments as :func:`fit`; each member checkpoints in ``work_dir/member-<i>`` when there is
    more than one. ``best`` holds the whole model's valid scores and ``temperature``.
    """
    say = log if dist_info()[0] == 0 else (lambda line: None)
    labels, image_cache = labels_and_cache(
        train_records, valid_records, config, labels, image_cache
    )
    members = [
        (arch, config.seed + i) for arch in config.member_archs for i in range(config.ensemble)
    ]
    results = []
    for j, (arch, seed) in enumerate(members):
        member_config = dataclasses.replace(
            config, arch=arch, seed=seed, ensemble=1, ensemble_archs=()
        )
        member_dir = (
            Path(work_dir) / f"member-{j}"
            if work_dir is not None and len(members) > 1
            else work_dir
        )
        t0 = time.perf_counter()
        results.append(
            fit(
                train_records,
                valid_records,
                member_config,
                member_dir,
                log,
                labels=labels,
                image_cache=image_cache,
                unlabelled=unlabelled,
            )
        )
        if len(members) > 1:
            say(
                f"member {j + 1}/{len(members)}: {arch} seed {seed}, best valid_top1="
                f"{results[-1].best['valid_top1']:.4f} in {time.perf_counter() - t0:.1f} s"
            )
    model: nn.Module = (
        results[0].model if len(results) == 1 else EnsembleNet([r.model for r in results]).eval()
    )
    spec = results[0].spec if len(results) == 1 else {"members": [r.spec for r in results]}
    # Each host scores its share of the valid images; every host gets all logits.
    valid_logits = gather_rows(
        lambda paths: torch.from_numpy(_logits(model, image_cache.get(paths))),
        [r.path for r in valid_records],
    ).numpy()
    index = {label: i for i, label in enumerate(labels)}
    valid_targets = np.array([index[r.label] for r in valid_records])
    best = dict(results[0].best) if len(results) == 1 else _ensemble_best(results)
    best.update(_valid_scores(valid_logits, valid_targets, "valid"))
    if config.calibrate:
        temperature = fit_temperature(valid_logits, valid_targets)
        model, spec = Calibrated(model, temperature).eval(), {**spec, "temperature": temperature}
        best["temperature"] = temperature
        best.update(_valid_scores(valid_logits / temperature, valid_targets, "calibrated_valid"))
        say(
            f"calibration: temperature {temperature:.3f} on {len(valid_targets)} valid images, "
            f"valid NLL {best['valid_loss']:.4f} -> {best['calibrated_valid_loss']:.4f}, ECE "
            f"{best['valid_ece']:.4f} -> {best['calibrated_valid_ece']:.4f}"
        )
    history = [dict(entry, member=j) for j, r in enumerate(results) for entry in r.history]
    return FitResult(
        model,
        labels,
        history,
        best,
        config,
        sum(r.samples_seen for r in results),
        spec=spec,
        pseudo_labels=[p for r in results for p in r.pseudo_labels],
    )


def _ensemble_best(results: Sequence[FitResult]) -> dict[str, float]:
    """An ensemble's epoch (its last-trained member's best) and training loss (the members'
    mean at their best epochs), so its saved-model line reads like a single model's."""
    return {
        "epoch": max(r.best["epoch"] for r in results),
        "train_loss": float(np.mean([r.best["train_loss"] for r in results])),
    }


def _valid_scores(logits: np.ndarray, targets: np.ndarray, prefix: str) -> dict[str, float]:
    probs = softmax(logits)
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    return {
        f"{prefix}_loss": nll(logits, targets),
        f"{prefix}_top1": float(np.mean(ranked[:, 0] == targets)),
        f"{prefix}_top3": float(np.mean((ranked == targets[:, None]).any(axis=1))),
        f"{prefix}_ece": expected_calibration_error(probs, targets),
    }
