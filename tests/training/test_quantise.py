"""The int8 graph training adds to the artefact: built from a really trained default probe on
real BDGP images, kept only when it answers like the float graph, refused when tampered with,
dropped when the model is saved again, and scored by cross-validation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from flystage.artefact import (
    INT8_FILE,
    ONNX_FILE,
    ArtefactError,
    check_artefact,
    graph_file,
    int8_record,
    load_metadata,
)
from flystage.datasets import bdgp_by_gene
from flystage.manifest import read_manifest, write_manifest
from flystage.training.crossval import crossval, int8_line
from flystage.training.export import load_torch_model, save_artefact
from flystage.training.quantise import (
    CALIBRATION_IMAGES,
    add_int8,
    correct_counts,
    onnx_logits,
    preprocessed,
    stratified_sample,
)
from flystage.training.train import main
from train_helpers import bdgp_records, tiny_config

STAGES = ("1-3", "4-6", "7-8", "9-10", "11-12", "13-16")


@pytest.fixture(scope="module")
def trained(trained_default):
    """The default model trained on real BDGP images (conftest): (model dir, train records,
    valid records, log)."""
    return trained_default


def _copy(model_dir: Path, dest: Path, with_int8: bool = True) -> Path:
    shutil.copytree(
        model_dir, dest, ignore=None if with_int8 else shutil.ignore_patterns(INT8_FILE)
    )
    return dest


def _valid_arrays(model_dir: Path, valid) -> tuple[np.ndarray, np.ndarray]:
    metadata = load_metadata(model_dir)
    index = {label: i for i, label in enumerate(metadata.labels)}
    images = preprocessed([r.path for r in valid], metadata.preprocess)
    return images, np.array([index[r.label] for r in valid])


def test_training_keeps_an_int8_graph_that_answers_like_the_float_one(trained, bdgp_root) -> None:
    model_dir, _, _, log = trained
    metadata = check_artefact(model_dir, strict=True)  # runs both graphs
    record = int8_record(metadata)
    assert record["kept"] is True, record
    assert "int8 graph kept" in log and record["reason"] in log
    assert graph_file(model_dir, metadata, "auto") == (INT8_FILE, "int8")
    # Every second BDGP image (97 of 193, most never seen in training).
    records = bdgp_by_gene(bdgp_root)[::2]
    images = preprocessed([r.path for r in records], metadata.preprocess)
    float_top1 = onnx_logits(model_dir, ONNX_FILE, images, 2).argmax(1)
    int8_top1 = onnx_logits(model_dir, INT8_FILE, images, 2).argmax(1)
    agreement = float(np.mean(float_top1 == int8_top1))
    assert agreement >= 0.95, f"int8 top-1 agrees with float on only {agreement:.3f}"


def test_the_record_counts_what_both_graphs_answer(trained) -> None:
    model_dir, train, valid, _ = trained
    record = int8_record(load_metadata(model_dir))
    images, targets = _valid_arrays(model_dir, valid)
    float_logits = onnx_logits(model_dir, ONNX_FILE, images)
    int8_logits = onnx_logits(model_dir, INT8_FILE, images)
    assert (record["float_top1_correct"], record["float_top3_correct"]) == correct_counts(
        float_logits, targets
    )
    assert (record["int8_top1_correct"], record["int8_top3_correct"]) == correct_counts(
        int8_logits, targets
    )
    assert record["top1_agreement"] == pytest.approx(
        np.mean(float_logits.argmax(1) == int8_logits.argmax(1)), abs=1e-6
    )
    assert record["valid_images"] == len(valid) == 18
    assert record["calibration_images"] == min(CALIBRATION_IMAGES, len(train)) == 64
    assert record["format"] == "QDQ" and record["seconds"] > 0


def test_the_head_and_the_padding_arithmetic_stay_float(trained) -> None:
    model_dir = trained[0]
    graph = onnx.load(str(model_dir / INT8_FILE)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_ops = [n for n in graph.node if n.op_type in ("Gemm", "MatMul", "Sub", "Div", "Mul")]
    assert [n.op_type for n in float_ops].count("Gemm") == 1
    quantised_inputs = [n.name for n in float_ops if dequantized & set(n.input)]
    assert quantised_inputs == [], f"nodes fed by int8 tensors: {quantised_inputs}"
    initializers = {i.name: i for i in graph.initializer}
    for name in ("model.mean", "model.std", "model.head.weight", "temperature"):
        assert initializers[name].data_type == onnx.TensorProto.FLOAT, name
    convs = [n for n in graph.node if n.op_type == "Conv"]
    float_convs = [n.name for n in convs if n.input[0] not in dequantized]
    # The stem sees the image itself (a dim 16-bit frame would keep 256 grey levels): float.
    assert len(float_convs) == 1 and "conv_stem" in float_convs[0], float_convs
    assert all(any(i in dequantized for i in n.input) for n in convs if n.name not in float_convs)


def test_a_graph_that_fails_the_rule_is_not_kept(trained, tmp_path: Path) -> None:
    model_dir, train, valid, _ = trained
    copy = _copy(model_dir, tmp_path / "model", with_int8=False)
    images, targets = _valid_arrays(copy, valid)
    # Only images whose stage the float graph ranks in its top 3: the int8 graph cannot get
    # more of them right, so a rule demanding one more correct answer must reject it.
    in_top3 = (
        np.argsort(-onnx_logits(copy, ONNX_FILE, images), axis=1)[:, :3] == targets[:, None]
    ).any(1)
    calibration = preprocessed([r.path for r in train[:8]], load_metadata(copy).preprocess)
    lines: list[str] = []
    record = add_int8(
        copy, calibration, images[in_top3], targets[in_top3], lines.append, allowed_loss=-1
    )
    assert record["kept"] is False and "float graph kept" in record["reason"]
    assert record["float_top3_correct"] == int(in_top3.sum())
    assert lines == [
        f"{record['reason']} ({int(in_top3.sum())} valid images, {record['seconds']} s)"
    ]
    assert "sha256" not in record and not (copy / INT8_FILE).exists()
    metadata = load_metadata(copy)
    assert int8_record(metadata) == record
    assert graph_file(copy, metadata, "auto") == (ONNX_FILE, "float")
    with pytest.raises(ArtefactError, match="no int8 model"):
        graph_file(copy, metadata, "int8")


def test_a_graph_that_answers_too_differently_is_not_kept(trained, tmp_path: Path) -> None:
    model_dir, train, valid, _ = trained
    copy = _copy(model_dir, tmp_path / "model", with_int8=False)
    images, targets = _valid_arrays(copy, valid)
    calibration = preprocessed([r.path for r in train[:8]], load_metadata(copy).preprocess)
    # Demanding more agreement than there can be: the counts pass, the agreement fails.
    record = add_int8(copy, calibration, images, targets, lambda _: None, min_agreement=1.01)
    assert record["kept"] is False and "answers too differently" in record["reason"]
    assert record["checked_images"] == len(images) + len(calibration)
    assert 0.9 <= record["checked_top1_agreement"] <= 1.0
    assert not (copy / INT8_FILE).exists()
    # The same model under the default rule is kept: the agreement is the only thing refused.
    assert add_int8(copy, calibration, images, targets, lambda _: None)["kept"] is True


def test_a_failed_quantisation_leaves_the_float_model_as_it_was(trained, tmp_path: Path) -> None:
    model_dir, _, valid, _ = trained
    copy = _copy(model_dir, tmp_path / "model")
    before = (copy / ONNX_FILE).read_bytes()
    images, targets = _valid_arrays(copy, valid)
    # Three-channel calibration images for a one-channel model: onnxruntime refuses them.
    record = add_int8(copy, np.zeros((4, 3, 96, 240), np.float32), images, targets, lambda _: None)
    assert record["kept"] is False and "quantising to int8 failed" in record["reason"]
    assert not (copy / INT8_FILE).exists() and (copy / ONNX_FILE).read_bytes() == before
    assert graph_file(copy, check_artefact(copy), "auto") == (ONNX_FILE, "float")


def test_a_tampered_int8_graph_is_refused(trained, tmp_path: Path) -> None:
    copy = _copy(trained[0], tmp_path / "model")
    data = bytearray((copy / INT8_FILE).read_bytes())
    data[-1] ^= 1
    (copy / INT8_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="SHA-256"):
        graph_file(copy, load_metadata(copy), "int8")


def test_saving_the_model_again_drops_its_int8_graph(trained, tmp_path: Path) -> None:
    copy = _copy(trained[0], tmp_path / "model")
    metadata = load_metadata(copy)
    save_artefact(
        copy,
        load_torch_model(copy),
        metadata.arch,
        metadata.labels,
        metadata.preprocess,
        spec=metadata.extra["model"],
    )
    assert not (copy / INT8_FILE).exists()
    resaved = load_metadata(copy)
    assert int8_record(resaved) == {}
    assert graph_file(copy, resaved, "auto") == (ONNX_FILE, "float")


def test_the_calibration_sample_takes_the_labels_in_turn() -> None:
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 7
    chosen = stratified_sample(labels, 9, seed=0)
    assert sorted(labels[i] for i in chosen) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    assert stratified_sample(labels, 9, seed=0) == chosen != stratified_sample(labels, 9, seed=1)
    assert sorted(stratified_sample(labels, 100, seed=0)) == list(range(20))


def test_crossval_scores_each_folds_int8_graph(bdgp_root: Path) -> None:
    """Three genes, a tiny CNN: every fold's model exported, quantised and scored."""
    torch.set_num_threads(2)
    genes = ("DNaseII", "Dms", "Dmn")
    records = [r for r in bdgp_by_gene(bdgp_root) if r.group in genes]
    config = tiny_config(epochs=2)
    assert config.int8  # the default
    report = crossval(records, config, "group", log=lambda line: None)
    int8 = report["int8"]
    folds = report["folds"]
    assert len(folds) == 3 and int8["folds"] == 3 and int8["failed_folds"] == 0
    assert all(f["int8_seconds"] > 0 for f in folds)
    index = {label: i for i, label in enumerate(report["labels"])}
    targets = np.array([index[p["label"]] for p in report["predictions"]])
    float_hit = np.array([np.argmax(p["probs"]) for p in report["predictions"]]) == targets
    int8_hit = np.array([np.argmax(p["int8_probs"]) for p in report["predictions"]]) == targets
    assert int8["top1"] == pytest.approx(int8_hit.mean(), abs=1e-6)
    assert int8["top1_changed_images"] == int((float_hit != int8_hit).sum())
    assert int8["top1_changed_images"] == sum(f["int8_top1_changed"] for f in folds)
    assert int8["minus_float_top1_images"] == int(int8_hit.sum() - float_hit.sum())
    assert int8["top1_ci"][0] <= int8["top1"] <= int8["top1_ci"][1]
    assert int8["top3_ci"][0] <= int8["top3"] <= int8["top3_ci"][1]
    assert json.loads(json.dumps(report))["int8"] == int8
    assert f"top-1 right/wrong differs from float on {int8['top1_changed_images']} images" in (
        int8_line(int8)
    )
