"""predict: a real tiny ONNX model on a folder of images; CSV/JSON, errors, rename and undo."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from artefact_helpers import LABELS, make_artefact, tiny_config, write_image
from flystage import cli
from flystage.imaging import load
from flystage.predictor import Prediction, Predictor, softmax, top_k
from flystage.rename import is_renamed, renamed_path, safe_label


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    make_artefact(d)
    return d


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Images as a lab leaves them: nested, mixed formats, a corrupt file, strays."""
    root = tmp_path / "new_images"
    write_image(root / "embryo1.tif", seed=1)
    write_image(root / "embryo2.png", seed=2)
    write_image(root / "day2" / "embryo3.TIF", seed=3)
    write_image(root / "day2" / "embryo4.jpg", seed=4)
    (root / "day2" / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 20)  # a truncated TIFF
    (root / "day2" / "notes.txt").write_text("stray")
    write_image(root / ".ipynb_checkpoints" / "embryo1-checkpoint.png", seed=9)
    return root


def predict(*args: str) -> int:
    return cli.main(["predict", *map(str, args)])


def predict_rename(folder: Path, model_dir: Path, out: Path, undo: Path) -> int:
    """Predict the folder into out and rename its images, recording each rename in undo."""
    return predict(folder, "--model", model_dir, "--out", out, "--rename", "--undo-manifest", undo)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_softmax_and_top_k():
    probs = softmax(np.array([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 0.0, -1000.0]], np.float32))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        probs[0], np.exp([0, 1, 2, 3]) / np.exp([0, 1, 2, 3]).sum(), rtol=1e-6
    )
    top = top_k(probs, LABELS, k=3)
    assert [label for label, _ in top[0]] == ["9-10", "7-8", "4-6"]
    assert [label for label, _ in top[1]][:2] == [
        "1-3",
        "4-6",
    ]  # a tie lists the earlier stage first
    assert len(top_k(probs, LABELS, k=10)[0]) == 4


def test_predictor_matches_torch_on_preprocessed_images(model_dir: Path, folder: Path):
    import torch

    from artefact_helpers import tiny_model

    predictor = Predictor(model_dir, threads=1)
    batch = np.stack([load(p, tiny_config()) for p in sorted(folder.glob("embryo*"))])
    probs = predictor.predict_arrays(batch)
    with torch.no_grad():
        want = torch.softmax(tiny_model()(torch.from_numpy(batch)), dim=1).numpy()
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert not np.allclose(probs[0], probs[1])  # the images really differ
    with pytest.raises(ValueError, match=r"float32 \(N, 1, 32, 80\)"):
        predictor.predict_arrays(batch.astype(np.float64))


def test_predict_sources_paths_bytes_and_errors(model_dir: Path, folder: Path):
    predictor = Predictor(model_dir, threads=1)
    tif = folder / "embryo1.tif"
    preds = predictor.predict_sources(
        [tif, tif.read_bytes(), b"not an image at all"], k=2, names=["a", "b", "c"]
    )
    assert [p.source for p in preds] == ["a", "b", "c"]
    assert preds[0].top == preds[1].top and len(preds[0].top) == 2 and preds[0].error is None
    assert preds[2].top == [] and "c" in preds[2].error
    assert preds[0].top[0][1] >= preds[0].top[1][1]


def test_folder_to_csv_and_json(model_dir: Path, folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "preds.csv"
    assert (
        predict(folder, "--model", model_dir, "--out", out, "--batch-size", 3) == 1
    )  # 1: an unreadable file
    rows = read_csv(out)
    assert list(rows[0]) == ["file", "stage_1", "p_1", "stage_2", "p_2", "stage_3", "p_3", "error"]
    assert sorted(r["file"] for r in rows) == sorted(
        ["embryo1.tif", "embryo2.png", "day2/embryo3.TIF", "day2/embryo4.jpg", "day2/broken.tif"]
    )
    by_file = {r["file"]: r for r in rows}
    broken = by_file.pop("day2/broken.tif")
    assert "broken.tif" in broken["error"] and broken["stage_1"] == ""
    predictor = Predictor(model_dir, threads=1)
    for name, row in by_file.items():
        assert row["error"] == ""
        ps = [float(row[f"p_{i}"]) for i in (1, 2, 3)]
        assert ps == sorted(ps, reverse=True) and sum(ps) <= 1.0001
        want = predictor.predict_sources([folder / name], k=3)[0].top
        assert [row[f"stage_{i}"] for i in (1, 2, 3)] == [label for label, _ in want]
        assert ps == pytest.approx([p for _, p in want], abs=1e-4)
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["n"] == 5 and doc["errors"] == 1 and doc["model"]["labels"] == LABELS
    # What `flystage review` needs, absolute so that it works from any folder.
    assert doc["images"] == str(folder.resolve())
    assert doc["model"]["model_dir"] == str(model_dir.resolve())
    one = next(p for p in doc["predictions"] if p["file"] == "embryo1.tif")
    assert [t["stage"] for t in one["top"]] == [
        by_file["embryo1.tif"][f"stage_{i}"] for i in (1, 2, 3)
    ]
    err = capsys.readouterr().err
    assert "unreadable: day2/broken.tif" in err and "1 in checkpoint folder" in err
    # Existing outputs are never replaced without --force.
    before = out.read_bytes()
    assert predict(folder, "--model", model_dir, "--out", out) == 2
    assert out.read_bytes() == before
    assert predict(folder, "--model", model_dir, "--out", out, "--force", "--k", "2") == 1
    assert "stage_3" not in read_csv(out)[0]


def test_predict_path_never_imports_torch(model_dir: Path, folder: Path, tmp_path: Path):
    code = (
        "import sys\n"
        "from flystage import cli\n"
        f"rc = cli.main(['predict', {str(folder)!r}, '--model', {str(model_dir)!r}, "
        f"'--out', {str(tmp_path / 'p.csv')!r}])\n"
        "from flystage.artefact import check_artefact\n"
        f"check_artefact({str(model_dir)!r})\n"
        "assert rc == 1, rc\n"
        "bad = [m for m in ('torch', 'matplotlib', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_rename_names():
    assert renamed_path(Path("/d/embryo12.tif"), ["11-12", "13-16", "9-10"]) == Path(
        "/d/embryo12__s11-12_s13-16_s9-10.tif"
    )
    assert safe_label("stage 11/12") == "stage-11-12" and safe_label("st_5") == "st-5"
    assert is_renamed(Path("embryo12__s11-12_s13-16_s9-10.tif"))
    assert not is_renamed(Path("embryo12_s11.tif")) and not is_renamed(Path("embryo__12.tif"))


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_rename_twice_and_undo(model_dir: Path, folder: Path, tmp_path: Path, capsys):
    original = snapshot(folder)
    undo = tmp_path / "undo.csv"
    assert predict_rename(folder, model_dir, tmp_path / "p.csv", undo) == 1
    rows = read_csv(tmp_path / "p.csv")
    renamed = snapshot(folder)
    assert sorted(renamed.values()) == sorted(original.values())  # same files, new names
    for row in rows:
        if row["error"]:
            assert row["file"] in renamed  # unreadable: left alone
            continue
        old = Path(row["file"])
        tag = "_".join("s" + row[f"stage_{i}"] for i in (1, 2, 3))
        assert (old.parent / f"{old.stem}__{tag}{old.suffix}").as_posix() in renamed
    undo_rows = read_csv(undo)
    assert len(undo_rows) == 4 and all(Path(r["old"]).is_absolute() for r in undo_rows)
    # A second run predicts the renamed files but renames nothing.
    assert predict_rename(folder, model_dir, tmp_path / "p2.csv", tmp_path / "undo2.csv") == 1
    assert snapshot(folder) == renamed
    assert "already renamed" in capsys.readouterr().out
    assert read_csv(tmp_path / "undo2.csv") == []
    # Undo restores every name.
    assert predict("--undo", undo) == 0
    assert snapshot(folder) == original
    assert predict("--undo", undo) == 0  # twice is harmless: already restored


def test_rename_never_overwrites(model_dir: Path, folder: Path, tmp_path: Path, capsys):
    predictor = Predictor(model_dir, threads=1)
    top = predictor.predict_sources([folder / "embryo1.tif"])[0].top
    squatter = renamed_path(folder / "embryo1.tif", [label for label, _ in top])
    squatter.write_bytes(b"someone else's file")
    assert predict_rename(folder, model_dir, tmp_path / "p.csv", tmp_path / "u.csv") == 1
    assert squatter.read_bytes() == b"someone else's file"
    assert (folder / "embryo1.tif").is_file()
    assert f"{squatter.name} already exists" in capsys.readouterr().out
    assert str(folder / "embryo1.tif") not in {r["old"] for r in read_csv(tmp_path / "u.csv")}


def test_undo_after_a_file_moved_or_its_name_was_taken(
    model_dir: Path, folder: Path, tmp_path: Path, capsys
):
    undo = tmp_path / "undo.csv"
    predict_rename(folder, model_dir, tmp_path / "p.csv", undo)
    rows = read_csv(undo)
    moved_new, taken = Path(rows[0]["new"]), rows[1]
    shutil.move(moved_new, tmp_path / moved_new.name)  # the user moved one file away
    Path(taken["old"]).write_bytes(b"new file with the old name")  # and reused another's old name
    capsys.readouterr()
    assert predict("--undo", undo) == 1
    out = capsys.readouterr().out
    assert "restored 2 file(s), skipped 2" in out
    assert "moved or deleted" in out and "exists again" in out
    assert Path(taken["old"]).read_bytes() == b"new file with the old name"
    assert Path(taken["new"]).is_file()
    for r in rows[2:]:
        assert Path(r["old"]).is_file() and not Path(r["new"]).exists()


def test_undo_manifest_survives_a_crash_mid_rename(
    model_dir: Path, folder: Path, tmp_path: Path, monkeypatch
):
    """Every rename is on disk in the manifest before it happens, so a crash loses nothing."""
    from flystage import rename as rename_module

    calls = []
    real = rename_module.rename_no_replace

    def crash_on_third(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C
        real(src, dst)

    monkeypatch.setattr(rename_module, "rename_no_replace", crash_on_third)
    undo = tmp_path / "undo.csv"
    with pytest.raises(KeyboardInterrupt):
        predict_rename(folder, model_dir, tmp_path / "p.csv", undo)
    monkeypatch.undo()
    assert len(read_csv(undo)) == 3  # two done, the third planned
    assert predict("--undo", undo) == 0
    assert not any(is_renamed(p) for p in folder.rglob("*.*"))


def test_remote_predictor_plugs_into_the_same_loop(folder: Path, tmp_path: Path):
    """Any object with predict_sources (an HTTP client, say) gets the folder loop, outputs and
    rename."""
    import argparse

    from flystage.predict import add_output_arguments, run_with

    class Constant:
        def __init__(self):
            self.batches = []

        def predict_sources(self, sources, k=3, names=None):
            self.batches.append(len(sources))
            return [
                Prediction(n, [("13-16", 0.9), ("11-12", 0.08), ("9-10", 0.02)][:k]) for n in names
            ]

    parser = argparse.ArgumentParser()
    add_output_arguments(parser)
    remote = Constant()
    args = parser.parse_args(
        [
            str(folder),
            "--out",
            str(tmp_path / "r.csv"),
            "--batch-size",
            "2",
            "--rename",
            "--undo-manifest",
            str(tmp_path / "u.csv"),
        ]
    )
    assert run_with(remote, args) == 0
    assert remote.batches == [2, 2, 1]
    # The folder is recorded for `flystage review` whoever predicted it.
    assert json.loads((tmp_path / "r.json").read_text())["images"] == str(folder.resolve())
    assert (folder / "embryo1__s13-16_s11-12_s9-10.tif").is_file()
    assert (folder / "day2" / "broken__s13-16_s11-12_s9-10.tif").is_file()


def test_bad_model_directory_is_a_clear_error(tmp_path: Path, folder: Path, capsys):
    assert predict(folder, "--model", tmp_path / "nope", "--out", tmp_path / "p.csv") == 2
    assert "no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
    assert predict(folder) == 2
    assert os.listdir(tmp_path) == [folder.name]


def test_batches_in_flight_keep_order_and_results(model_dir: Path, folder: Path):
    from flystage.organise import iter_images
    from flystage.predictor import predict_files

    predictor = Predictor(model_dir, threads=1)
    paths, _ = iter_images([folder])
    one = predict_files(predictor, paths, root=folder, batch_size=2, workers=1, progress=False)
    many = predict_files(predictor, paths, root=folder, batch_size=1, workers=3, progress=False)
    assert (
        [p.source for p in many]
        == [p.source for p in one]
        == [p.relative_to(folder).as_posix() for p in paths]
    )
    for a, b in zip(one, many):
        assert a.error == b.error
        assert [label for label, _ in a.top] == [label for label, _ in b.top]
        assert [p for _, p in a.top] == pytest.approx([p for _, p in b.top], abs=1e-5)


# ---- --unsure-below: a model with known probabilities ----------------------------------------

# Logits (SCALE * mean pixel, 0, 0, 0): a faint scratch on an empty frame (mean ~0.02) gets
# ~0.29 for the first stage; an embryo (mean ~0.33) gets ~0.9.
SCALE = 10.0


def known_probability_model():
    import torch

    class MeanToFirstStage(torch.nn.Module):
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3)).unsqueeze(1) * SCALE
            return torch.cat([m, m * 0, m * 0, m * 0], dim=1)

    return MeanToFirstStage().eval()


def expected_top1(path: Path) -> float:
    m = float(load(path, tiny_config()).mean())
    return float(np.exp(SCALE * m) / (np.exp(SCALE * m) + 3))


@pytest.fixture(scope="module")
def known_model(tmp_path_factory) -> Path:
    import torch

    from flystage.training.export import save_artefact

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("known")
    save_artefact(d, known_probability_model(), "mean-to-first", LABELS, tiny_config(), {}, None)
    return d


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Two embryos (top-1 ~0.9) and a faint scratch on an empty frame (top-1 ~0.29)."""
    import tifffile

    root = tmp_path / "mixed"
    write_image(root / "embryo1.tif", seed=1)
    write_image(root / "sub" / "embryo2.png", seed=2)
    faint = np.full((42, 111), 300, np.uint16)
    faint[20, 10:90] = 400
    tifffile.imwrite(root / "faint.tif", faint)
    return root


def test_unsure_below_marks_low_top1_images_in_csv_and_json(
    known_model: Path, mixed: Path, tmp_path: Path, capsys
):
    (mixed / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    out = tmp_path / "p.csv"
    assert (
        predict(mixed, "--model", known_model, "--out", out, "--unsure-below", "0.5") == 1
    )  # 1: the broken file
    rows = {r["file"]: r for r in read_csv(out)}
    assert list(next(iter(rows.values()))) == [
        "file",
        "stage_1",
        "p_1",
        "stage_2",
        "p_2",
        "stage_3",
        "p_3",
        "unsure",
        "error",
    ]
    faint_p1 = Predictor(known_model, threads=1).predict_sources([mixed / "faint.tif"])[0].top[0][1]
    assert 0.25 < faint_p1 < 0.4 and float(rows["faint.tif"]["p_1"]) == pytest.approx(
        expected_top1(mixed / "faint.tif"), abs=1e-4
    )
    assert rows["faint.tif"]["unsure"] == "true"
    for name in ("embryo1.tif", "sub/embryo2.png"):
        p1 = expected_top1(mixed / name)
        assert 0.8 < p1 < 0.99 and float(rows[name]["p_1"]) == pytest.approx(p1, abs=1e-4)
        assert rows[name]["stage_1"] == "1-3" and rows[name]["unsure"] == "false"
    assert rows["broken.tif"]["unsure"] == "" and rows["broken.tif"]["error"]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["unsure_below"] == 0.5 and doc["unsure"] == 1
    assert {p["file"]: p["unsure"] for p in doc["predictions"]} == {
        "faint.tif": True,
        "embryo1.tif": False,
        "sub/embryo2.png": False,
        "broken.tif": None,
    }
    assert "predicted 3 of 4 image(s), 1 unsure (top-1 below 0.5)" in capsys.readouterr().out

    # The cut is the evaluate report's: p >= P is accepted, so the top-1 itself is not unsure.
    assert (
        predict(
            mixed, "--model", known_model, "--out", out, "--force", "--unsure-below", repr(faint_p1)
        )
        == 1
    )
    assert {r["file"]: r["unsure"] for r in read_csv(out)}["faint.tif"] == "false"
    # Above every top-1: all readable images are unsure.
    assert (
        predict(mixed, "--model", known_model, "--out", out, "--force", "--unsure-below", "0.99")
        == 1
    )
    assert sorted(r["unsure"] for r in read_csv(out)) == ["", "true", "true", "true"]
    assert "3 unsure (top-1 below 0.99)" in capsys.readouterr().out
    # Without the option, the outputs keep their shape.
    assert predict(mixed, "--model", known_model, "--out", out, "--force") == 1
    assert "unsure" not in read_csv(out)[0]
    assert "unsure" not in json.loads(out.with_suffix(".json").read_text())
    assert " unsure (top-1 below" not in capsys.readouterr().out


def test_rename_leaves_unsure_images_under_their_names(
    known_model: Path, mixed: Path, tmp_path: Path, capsys
):
    original = snapshot(mixed)
    undo = tmp_path / "undo.csv"
    args = (
        "--out",
        tmp_path / "p.csv",
        "--rename",
        "--undo-manifest",
        undo,
        "--unsure-below",
        "0.5",
    )
    assert (
        predict(mixed, "--model", known_model, *args) == 0
    )  # keeping a name on purpose is no failure
    after = snapshot(mixed)
    assert after["faint.tif"] == original["faint.tif"]
    assert "embryo1.tif" not in after and "sub/embryo2.png" not in after
    assert sorted(after.values()) == sorted(original.values())
    assert [Path(r["old"]).name for r in read_csv(undo)] == ["embryo1.tif", "embryo2.png"]
    out = capsys.readouterr().out
    assert "1 unsure (top-1 below 0.5)" in out
    assert "renamed 2 file(s), skipped 0, left 1 unsure image(s) under their own names" in out
    assert predict("--undo", undo) == 0
    assert snapshot(mixed) == original


def test_unsure_below_must_be_a_probability(known_model: Path, mixed: Path, tmp_path: Path, capsys):
    for bad in ("0", "1", "1.5", "-0.2", "nan", "eighty"):
        with pytest.raises(SystemExit) as exit_info:
            predict(
                mixed, "--model", known_model, "--out", tmp_path / "p.csv", "--unsure-below", bad
            )
        assert exit_info.value.code == 2
        assert "--unsure-below" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(SystemExit):
        predict("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--unsure-below P" in help_text and "unsure images keep their names" in help_text


def test_unsure_below_with_a_remote_predictor(mixed: Path, tmp_path: Path, capsys):
    """The option comes with add_output_arguments, so the endpoint and local container get it
    too."""
    import argparse

    from flystage.predict import add_output_arguments, run_with

    class Remote:
        def predict_sources(self, sources, k=3, names=None):
            return [
                Prediction(n, [("13-16", 0.55 if "faint" in n else 0.9), ("11-12", 0.05)][:k])
                for n in names
            ]

    parser = argparse.ArgumentParser()
    add_output_arguments(parser)
    args = parser.parse_args(
        [
            str(mixed),
            "--out",
            str(tmp_path / "r.csv"),
            "--unsure-below",
            "0.6",
            "--rename",
            "--undo-manifest",
            str(tmp_path / "u.csv"),
        ]
    )
    assert run_with(Remote(), args) == 0
    assert {r["file"]: r["unsure"] for r in read_csv(tmp_path / "r.csv")} == {
        "faint.tif": "true",
        "embryo1.tif": "false",
        "sub/embryo2.png": "false",
    }
    assert (mixed / "faint.tif").is_file() and (mixed / "embryo1__s13-16_s11-12.tif").is_file()
