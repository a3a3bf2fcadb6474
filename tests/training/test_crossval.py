"""Leave-one-group-out cross-validation: real (tiny) training on synthetic groups."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from flystage.cli import main as cli_main
from flystage.datasets import bdgp_by_gene
from flystage.evaluate import evaluate_probs
from flystage.manifest import Record, file_sha1, read_manifest, write_manifest
from flystage.training.config import TrainConfig
from flystage.training.crossval import crossval
from flystage.training.ensemble import train_model
from flystage.training.folds import CrossvalError, inner_validation_groups, make_folds, make_kfolds
from flystage.training.probe import cached_features
from train_helpers import LABELS, count_extracted, embryo_image
from train_helpers import TINY_ARGS as TINY_TRAIN_ARGS
from train_helpers import tiny_config as tiny_train_config

torch.set_num_threads(1)
GROUPS = ("geneA", "geneB", "geneC")
# Crossval's tiny runs: two epochs on the command line, six without early stopping in code.
TINY_ARGS = [*TINY_TRAIN_ARGS, "--epochs", "2"]


def tiny_config(**changes) -> TrainConfig:
    return tiny_train_config(**({"epochs": 6, "patience": 0} | changes))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """3 groups x 3 labels x 3 images: ``<group>/<label>/<i>.png`` and a manifest whose
    group column is the gene (as BDGP organised by gene)."""
    root = tmp_path_factory.mktemp("groups")
    records = []
    for g, group in enumerate(GROUPS):
        for k, label in enumerate(LABELS):
            (root / group / label).mkdir(parents=True)
            for i in range(3):
                path = root / group / label / f"{i}.png"
                cv2.imwrite(str(path), embryo_image(k, 1000 * g + 10 * k + i))
                records.append(Record(path, label, group, "train", file_sha1(path)))
    return write_manifest(records, root / "manifest.csv")


@pytest.fixture(scope="module")
def watched_run(manifest: Path):
    """One real cross-validation, with every call of ``train_model`` (what crossval trains
    by default, as ``flystage train`` does) recorded (records as given)."""
    calls = []

    def watching_fit(train_records, valid_records, config, **kwargs):
        calls.append((list(train_records), list(valid_records)))
        return train_model(train_records, valid_records, config, **kwargs)

    records = read_manifest(manifest)
    report = crossval(records, tiny_config(), "group", log=lambda line: None, fit_fn=watching_fit)
    return records, report, calls


def test_each_group_is_held_out_once_and_never_trained_on(watched_run) -> None:
    records, report, calls = watched_run
    assert [f["group"] for f in report["folds"]] == sorted(GROUPS)
    assert len(calls) == len(GROUPS)
    for fold, (train_records, valid_records) in zip(report["folds"], calls):
        held_out = {r.path for r in records if r.group == fold["group"]}
        given = {r.path for r in train_records} | {r.path for r in valid_records}
        assert not held_out & given, (
            f"fold {fold['group']} trained or validated on its held-out images"
        )
        # Validation is made of whole training groups, distinct from the training groups.
        assert {r.group for r in train_records}.isdisjoint({r.group for r in valid_records})
        assert valid_records and train_records
        assert fold["n_test"] == len(held_out) and fold["n_train"] == len(train_records)
        # Each fold's model is calibrated on its own validation groups (the default).
        assert isinstance(fold["temperature"], float) and fold["temperature"] > 0
        assert 1 <= fold["best_epoch"] <= fold["epochs_run"] == 6
    # Every image is scored exactly once, by the fold that held its group out.
    scored = [p["path"] for p in report["predictions"]]
    assert sorted(scored) == sorted(str(r.path) for r in records)
    by_path = {str(r.path): r.group for r in records}
    assert all(by_path[p["path"]] == p["group"] for p in report["predictions"])


def test_pooled_metrics_equal_evaluate_on_pooled_probabilities(watched_run) -> None:
    _, report, _ = watched_run
    labels = report["labels"]
    assert labels == list(LABELS)
    probs = np.array([p["probs"] for p in report["predictions"]])
    targets = np.array([labels.index(p["label"]) for p in report["predictions"]])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    expected = evaluate_probs(probs, targets, labels)
    for key in ("n", "top1", "top3", "confusion", "per_stage", "mean_recall"):
        assert report[key] == expected[key], key
    assert report["protocol"] == "leave-one-group-out"
    # Per-fold top-1 weighted by fold size is the pooled top-1.
    weighted = sum(f["top1"] * f["n_test"] for f in report["folds"]) / report["n"]
    assert weighted == pytest.approx(report["top1"], abs=1e-5)


def test_inner_validation_takes_whole_groups_near_the_fraction() -> None:
    groups = {"a": 70, "b": 24, "c": 9, "d": 31, "e": 10, "f": 11, "g": 9, "h": 28}
    for seed in range(10):
        chosen = inner_validation_groups(groups, 0.15, seed)
        share = sum(groups[g] for g in chosen) / sum(groups.values())
        assert 0.05 <= share <= 0.25 and "a" not in chosen
        assert chosen == inner_validation_groups(groups, 0.15, seed)  # deterministic
    # Never every group: one is left to train on; a lone group cannot validate.
    assert len(inner_validation_groups({"x": 5, "y": 5}, 0.9, 0)) == 1
    with pytest.raises(CrossvalError, match="at least 2 training groups"):
        inner_validation_groups({"x": 5}, 0.15, 0)


def test_bad_folds_and_too_few_groups_are_refused(manifest: Path) -> None:
    records = read_manifest(manifest)
    with pytest.raises(CrossvalError, match="geneZ"):
        make_folds(records, folds=["geneZ"])
    with pytest.raises(CrossvalError, match="at least 3 groups"):
        make_folds([r for r in records if r.group != "geneA"])
    with pytest.raises(CrossvalError, match="no column 'embryo'"):
        make_folds(records, group_column="embryo")


def run_crossval(manifest: Path, out: Path, *extra: str) -> int:
    """``flystage crossval`` on the manifest into out, a tiny run; returns the exit code."""
    return cli_main(
        ["crossval", "--manifest", str(manifest), "--out", str(out), *extra, *TINY_ARGS]
    )


def test_command_writes_report_and_never_overwrites(manifest: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cv"
    assert run_crossval(manifest, out, "--folds", "geneA,geneC") == 0
    report = json.loads((out / "report.json").read_text())
    assert [f["group"] for f in report["folds"]] == ["geneA", "geneC"]
    assert report["n"] == 18 and report["config"]["epochs"] == 2
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-3" in capsys.readouterr().out
    before = (out / "report.json").read_bytes()
    assert run_crossval(manifest, out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
    assert run_crossval(manifest, tmp_path / "x", "--group-column", "embryo") == 2
    assert "no column 'embryo'" in capsys.readouterr().err


def test_probe_folds_share_every_feature_row(manifest: Path, monkeypatch) -> None:
    """A linear probe computes each image's features once per augmentation draw for the
    whole cross-validation, not once per fold."""
    extracted = count_extracted(monkeypatch)
    requested: set[tuple[str, int]] = set()

    def watching_cached(features, key, cache, paths, draw, transform, seed):
        requested.update((str(p), draw) for p in paths)
        return cached_features(features, key, cache, paths, draw, transform, seed)

    monkeypatch.setattr("flystage.training.modes.cached_features", watching_cached)
    records = read_manifest(manifest)
    config = tiny_config(arch="hognet", mode="probe", epochs=3, augment_draws=2)
    report = crossval(records, config, "group", log=lambda line: None)
    assert len(report["folds"]) == len(GROUPS) and report["n"] == len(records)
    # Every (image, draw) some fold asked for, computed exactly once.
    assert sum(extracted) == len(requested)
    # Training images are wanted augmented too (draws 1 and 2), valid images clean only.
    assert {draw for _, draw in requested} == {0, 1, 2}
    assert len(requested) > len(records)


# ---- k folds ---------------------------------------------------------------------------------


def embryo_records(counts: dict[str, int], seed: int = 0) -> list[Record]:
    """One record per embryo (its own group), ``counts[label]`` of each label, in a shuffled
    order (no image files: the plan reads only labels and groups)."""
    records = [
        Record(Path(f"/x/{label}/e{i}.png"), label, f"{label}-e{i}", "train", "")
        for label, n in counts.items()
        for i in range(n)
    ]
    random.Random(seed).shuffle(records)
    return records


def assert_partition(records: list[Record], plan) -> None:
    """Every record tested exactly once; within a fold, train, valid and test are disjoint,
    share no group, and hold every record."""
    tested = Counter(r.path for fold in plan for r in fold.test)
    assert tested == Counter(r.path for r in records), "a record tested twice or never"
    for fold in plan:
        sides = [{r.group for r in part} for part in (fold.train, fold.valid, fold.test)]
        assert all(sides), f"{fold.group} has an empty side"
        assert sides[0].isdisjoint(sides[1]) and sides[0].isdisjoint(sides[2])
        assert sides[1].isdisjoint(sides[2]), f"{fold.group}: a group validated and tested"
        paths = sorted(r.path for part in (fold.train, fold.valid, fold.test) for r in part)
        assert paths == sorted(r.path for r in records)


def test_kfold_plan_is_a_stratified_k_fold_for_one_image_per_group() -> None:
    counts = {"c01": 23, "c02": 17, "c03": 20, "c04": 9, "c05": 31, "c06": 12}
    records = embryo_records(counts)
    plan = make_kfolds(records, 5, valid_fraction=0.1, seed=0)
    assert [f.group for f in plan] == [f"fold{i}" for i in range(1, 6)]
    assert_partition(records, plan)
    # Strata balanced: every label within one image across folds, and the folds' sizes too.
    for label in counts:
        per_fold = [sum(r.label == label for r in fold.test) for fold in plan]
        assert max(per_fold) - min(per_fold) <= 1, (label, per_fold)
    sizes = [len(fold.test) for fold in plan]
    assert max(sizes) - min(sizes) <= 1, sizes
    # Validation: a stratified tenth of each fold's training images, every label in it.
    for fold in plan:
        for label in counts:
            valid = sum(r.label == label for r in fold.valid)
            rest = valid + sum(r.label == label for r in fold.train)
            assert abs(valid - 0.1 * rest) <= 0.5 and valid >= 1, (fold.group, label, valid)
    # Seeded: the same plan for the same seed and records in another order, another for
    # another seed.
    again = make_kfolds(embryo_records(counts, seed=7), 5, valid_fraction=0.1, seed=0)
    assert [[r.path for r in f.test] for f in again] == [[r.path for r in f.test] for f in plan]
    other = make_kfolds(records, 5, valid_fraction=0.1, seed=1)
    assert [[r.path for r in f.test] for f in other] != [[r.path for r in f.test] for f in plan]


def test_kfold_plan_keeps_groups_of_several_images_whole() -> None:
    rng = random.Random(3)
    records = [
        Record(Path(f"/x/g{g}/{i}.png"), rng.choice(LABELS), f"g{g}", "train", "")
        for g in range(40)
        for i in range(rng.randint(1, 4))
    ]
    plan = make_kfolds(records, 4, valid_fraction=0.15, seed=2)
    assert_partition(records, plan)
    sizes = [len(fold.test) for fold in plan]
    assert max(sizes) <= 1.5 * min(sizes), sizes


def test_kfold_plan_refuses_too_few_groups_and_bad_k() -> None:
    records = embryo_records({"c01": 3, "c02": 3})
    with pytest.raises(CrossvalError, match="k >= 2"):
        make_kfolds(records, 1)
    with pytest.raises(CrossvalError, match="at least 7 groups"):
        make_kfolds(records, 5)
    with pytest.raises(CrossvalError, match="no column 'embryo'"):
        make_kfolds(records, 2, group_column="embryo")


@pytest.fixture(scope="module")
def embryo_manifest(manifest: Path) -> Path:
    """The synthetic images, each its own group (one embryo per image)."""
    records = [
        dataclasses.replace(r, group=f"{r.group}-{r.label}-{r.path.stem}")
        for r in read_manifest(manifest)
    ]
    return write_manifest(records, manifest.parent / "embryos.csv")


def test_command_k_folds_pools_every_image_once_by_its_own_group(
    embryo_manifest: Path, tmp_path: Path, capsys
) -> None:
    records = read_manifest(embryo_manifest)
    assert run_crossval(embryo_manifest, tmp_path / "cv", "--k-folds", "3") == 0
    out = capsys.readouterr().out
    assert "fold 1/3: fold1: hold out 9 groups (9 images)" in out
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    assert report["protocol"] == "stratified 3-fold" and report["k"] == 3
    assert [f["group"] for f in report["folds"]] == ["fold1", "fold2", "fold3"]
    assert [f["n_test"] for f in report["folds"]] == [9, 9, 9]
    # Every image scored once, under its own group: the intervals resample images.
    by_path = {str(r.path): r.group for r in records}
    assert sorted(p["path"] for p in report["predictions"]) == sorted(by_path)
    assert all(p["group"] == by_path[p["path"]] for p in report["predictions"])
    assert report["bootstrap"]["n_groups"] == len(records)
    assert all(len(report["intervals"][key]) == 2 for key in ("top1", "top3", "ece"))
    # Held-out groups are chosen by the folds, so --folds cannot name them too.
    assert run_crossval(embryo_manifest, tmp_path / "x", "--k-folds", "3", "--folds", "a") == 2
    assert "--folds" in capsys.readouterr().err


# ---- unlabelled images -----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["held-out", "other-group"])
def test_unlabelled_protocols_give_each_fold_images_it_never_trains_on(
    bdgp_root: Path, protocol: str
) -> None:
    calls = []

    def watching_fit(train_records, valid_records, config, **kwargs):
        calls.append((list(train_records), list(valid_records), kwargs.get("unlabelled")))
        return train_model(train_records, valid_records, config, **kwargs)

    records = bdgp_by_gene(bdgp_root)
    config = TrainConfig(threads=1, self_training=0.8)
    report = crossval(
        records,
        config,
        folds=["Dif", "dhd"],
        unlabelled=protocol,
        log=lambda line: None,
        fit_fn=watching_fit,
    )
    by_path = {r.path: r for r in records}
    for fold, (train, valid, unlabelled) in zip(report["folds"], calls):
        test = {r.path for r in records if r.group == fold["group"]}
        hidden = {by_path[p].group for p in unlabelled}
        assert unlabelled and fold["unlabelled_images"] == len(unlabelled)
        if protocol == "held-out":
            assert set(unlabelled) == test
        else:  # one training gene, out of training, never the test or a validation gene
            assert len(hidden) == 1 and fold["group"] not in hidden
            assert not hidden & {r.group for r in (*train, *valid)}
        assert 0 <= fold["pseudo_right"] <= fold["pseudo_labelled"] <= len(unlabelled)
    pooled = report["unlabelled"]
    assert pooled["protocol"] == protocol and pooled["transductive"] == (protocol == "held-out")
    assert pooled["pseudo_labelled"] == sum(f["pseudo_labelled"] for f in report["folds"]) > 0
    assert 0.0 <= pooled["pseudo_accuracy"] <= 1.0
    with pytest.raises(CrossvalError, match="choose one of none, held-out, other-group"):
        crossval(records, config, unlabelled="sideways", log=lambda line: None)
