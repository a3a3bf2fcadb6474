"""`flystage predict --precision`: a really trained model's int8 graph is what predict runs by
default; float on request; a model without one still works; int8 is never silently float."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flystage import cli
from flystage.artefact import INT8_FILE, METADATA_FILE, load_metadata


@pytest.fixture(scope="module")
def images(bdgp_root: Path, tmp_path_factory) -> Path:
    """The 193 real BDGP images, in one folder (the model was trained on 66 of them)."""
    folder = tmp_path_factory.mktemp("new")
    for path in sorted(bdgp_root.glob("*/*/*.bmp")):
        shutil.copy(path, folder / f"{path.parent.parent.name}_{path.parent.name}_{path.name}")
    return folder


def predict(folder: Path, model: Path, out: Path, *options: str) -> tuple[int, dict]:
    code = cli.main(["predict", str(folder), "--model", str(model), "--out", str(out), *options])
    json_path = out.with_suffix(".json")
    return code, json.loads(json_path.read_text()) if json_path.exists() else {}


def top1(answer: dict) -> list[str]:
    return [p["top"][0]["stage"] for p in answer["predictions"]]


def test_predict_runs_the_int8_graph_when_the_model_has_one(
    int8_model: Path, images: Path, tmp_path: Path
):
    code, auto = predict(images, int8_model, tmp_path / "auto.csv")
    assert code == 0 and auto["model"]["precision"] == "int8"
    code, float_ = predict(images, int8_model, tmp_path / "float.csv", "--precision", "float")
    assert code == 0 and float_["model"]["precision"] == "float"
    code, int8 = predict(images, int8_model, tmp_path / "int8.csv", "--precision", "int8")
    assert code == 0 and top1(int8) == top1(auto)
    same = sum(a == b for a, b in zip(top1(auto), top1(float_)))
    assert same >= 0.95 * len(top1(auto)), f"int8 and float agree on {same} of {len(top1(auto))}"
    # Not the same numbers: a different graph really ran.
    assert [p["top"][0]["probability"] for p in auto["predictions"]] != [
        p["top"][0]["probability"] for p in float_["predictions"]
    ]


def test_a_model_without_an_int8_graph_runs_float_and_refuses_int8(
    int8_model: Path, images: Path, tmp_path: Path, capsys
):
    model = shutil.copytree(
        int8_model, tmp_path / "model", ignore=shutil.ignore_patterns(INT8_FILE)
    )
    raw = json.loads((model / METADATA_FILE).read_text())
    raw.pop("int8")  # as a model saved before int8 graphs existed
    (model / METADATA_FILE).write_text(json.dumps(raw))
    code, auto = predict(images, model, tmp_path / "auto.csv")
    assert code == 0 and auto["model"]["precision"] == "float"
    capsys.readouterr()
    code, _ = predict(images, model, tmp_path / "int8.csv", "--precision", "int8")
    assert code == 2
    assert "no int8 model" in capsys.readouterr().err
    assert not (tmp_path / "int8.csv").exists()


def test_a_tampered_int8_graph_is_refused_not_run(
    int8_model: Path, images: Path, tmp_path: Path, capsys
):
    model = shutil.copytree(int8_model, tmp_path / "model")
    shutil.copy(model / "model.onnx", model / INT8_FILE)  # any other graph under its name
    assert load_metadata(model).extra["int8"]["kept"]
    code, _ = predict(images, model, tmp_path / "p.csv")
    assert code == 2
    assert "SHA-256 differs" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
