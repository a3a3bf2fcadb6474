"""predict against hostile folders: formula file names, odd bytes in names, links, interrupted
renames, blank images."""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import pytest

from artefact_helpers import make_artefact, write_image
from flystage import cli
from flystage.predict import PredictError, add_output_arguments, run_with
from flystage.predictor import Prediction


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    make_artefact(d)
    return d


def predict(*args) -> int:
    return cli.main(["predict", *map(str, args)])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Counting:
    """A predictor that answers a fixed top-3 and counts its calls."""

    def __init__(self):
        self.calls = 0

    def predict_sources(self, sources, k=3, names=None):
        self.calls += 1
        return [Prediction(n, [("13-16", 0.9), ("11-12", 0.08), ("9-10", 0.02)][:k]) for n in names]


def run_remote(predictor, *argv) -> int:
    parser = argparse.ArgumentParser()
    add_output_arguments(parser)
    return run_with(predictor, parser.parse_args([str(a) for a in argv]))


def usage_error(predictor, *argv) -> str:
    """The message of the PredictError (exit code 2) that ``run_remote`` raises."""
    with pytest.raises(PredictError) as raised:
        run_remote(predictor, *argv)
    assert raised.value.exit_code == 2
    return str(raised.value)


# ---- item 7: CSV injection, and an unwritable undo manifest ----------------------------------

FORMULA_NAMES = [
    "=HYPERLINK(1).tif",
    "+1+1.png",
    "-2+3.tif",
    "@SUM(1).tif",
    "\tcmd.tif",
    "\rcmd.tif",
]


def test_formula_file_names_are_neutralised_in_the_csv(model_dir: Path, tmp_path: Path, capsys):
    root = tmp_path / "imgs"
    for i, name in enumerate(FORMULA_NAMES):
        write_image(root / name, seed=i)
    write_image(root / "plain.tif", seed=7)
    (root / "=broken.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    out, undo = tmp_path / "p.csv", tmp_path / "undo.csv"
    assert (
        predict(root, "--model", model_dir, "--out", out, "--rename", "--undo-manifest", undo) == 1
    )
    rows = read_csv(out)
    files = sorted(r["file"] for r in rows)
    assert files == sorted(["'" + n for n in FORMULA_NAMES] + ["plain.tif", "'=broken.tif"])
    for row in rows:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row
    broken = next(r for r in rows if "broken" in r["file"])
    assert broken["error"]
    # The JSON keeps the real names (no spreadsheet opens it).
    doc = json.loads(out.with_suffix(".json").read_text())
    assert sorted(p["file"] for p in doc["predictions"]) == sorted(
        FORMULA_NAMES + ["plain.tif", "=broken.tif"]
    )
    # The undo manifest (absolute paths) restores every name.
    for row in read_csv(undo):
        assert not row["old"].startswith(("=", "+", "-", "@", "\t", "\r"))
    assert predict("--undo", undo) == 0
    assert sorted(p.name for p in root.iterdir()) == sorted(
        FORMULA_NAMES + ["plain.tif", "=broken.tif"]
    )


def test_help_documents_the_csv_injection_rule(capsys):
    with pytest.raises(SystemExit):
        predict("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "single quote" in text and "CSV-injection" in text


def test_unwritable_undo_manifest_fails_before_any_prediction(
    model_dir: Path, tmp_path: Path, capsys
):
    root = tmp_path / "imgs"
    write_image(root / "embryo1.tif", seed=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    remote = Counting()
    err = usage_error(
        remote,
        root,
        "--out",
        tmp_path / "p.csv",
        "--rename",
        "--undo-manifest",
        blocker / "undo.csv",
    )
    assert remote.calls == 0
    assert "cannot write" in err and "--undo-manifest" in err and str(blocker / "undo.csv") in err
    assert not (tmp_path / "p.csv").exists() and (root / "embryo1.tif").is_file()
    # The same for an undo manifest that names a folder.
    err = usage_error(
        remote, root, "--out", tmp_path / "p.csv", "--rename", "--undo-manifest", tmp_path
    )
    assert remote.calls == 0 and "--undo-manifest" in err
    # And for an unwritable --out.
    err = usage_error(remote, root, "--out", blocker / "p.csv")
    assert remote.calls == 0 and "--out" in err
    # Through the command line the same error is exit code 2 with the message on stderr.
    capsys.readouterr()
    assert predict(root, "--model", model_dir, "--out", blocker / "p.csv") == 2
    err = capsys.readouterr().err
    assert "flystage predict: error: cannot write" in err and "choose another --out" in err


# ---- item 2: file names that are not UTF-8; no partial outputs --------------------------------


def _bytes_name(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(str(folder)), name)))


def test_non_utf8_file_names_are_predicted_renamed_and_restored(
    model_dir: Path, tmp_path: Path, capsys
):
    root = tmp_path / "imgs"
    write_image(root / "a.tif", seed=1)
    write_image(root / "b.png", seed=2)
    os.rename(root / "a.tif", _bytes_name(root, b"caf\xe9.tif"))
    os.rename(root / "b.png", _bytes_name(root, b"caf\xe9.png"))
    _bytes_name(root, b"\xff\xfebroken.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    before = sorted(os.listdir(os.fsencode(str(root))))
    out, undo = tmp_path / "p.csv", tmp_path / "undo.csv"
    assert (
        predict(root, "--model", model_dir, "--out", out, "--rename", "--undo-manifest", undo) == 1
    )  # 1: the broken one
    text = out.read_bytes().decode("utf-8")  # the CSV stays valid UTF-8, the odd bytes escaped
    rows = list(csv.DictReader(text.splitlines()))
    assert sorted(r["file"] for r in rows) == [
        "\\udcff\\udcfebroken.tif",
        "caf\\udce9.png",
        "caf\\udce9.tif",
    ]
    assert [bool(r["error"]) for r in sorted(rows, key=lambda r: r["file"])] == [True, False, False]
    doc = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert doc["n"] == 3 and doc["errors"] == 1
    streams = capsys.readouterr()
    assert "renamed 2 file(s)" in streams.out and "unreadable" in streams.err
    renamed = os.listdir(os.fsencode(str(root)))
    assert sum(b"__s" in n for n in renamed) == 2
    assert predict("--undo", undo) == 0
    assert sorted(os.listdir(os.fsencode(str(root)))) == before


def test_a_failed_write_leaves_no_partial_output(tmp_path: Path):
    from flystage.outputs import write_csv, write_json

    good = [Prediction("a.tif", [("1-3", 0.9), ("4-6", 0.1)])]
    bad = good + [
        Prediction("b.tif", [("1-3", "not a number")])
    ]  # fails after the header and one row
    out = tmp_path / "out" / "p.csv"
    with pytest.raises(ValueError):
        write_csv(bad, out)
    assert os.listdir(out.parent) == []  # neither a half-written CSV nor a temporary file
    write_csv(good, out)  # a rerun does not meet "already exists"
    assert read_csv(out)[0]["file"] == "a.tif"
    # --force: a failed rewrite leaves the earlier file whole.
    before = out.read_bytes()
    with pytest.raises(ValueError):
        write_csv(bad, out, force=True)
    assert out.read_bytes() == before and os.listdir(out.parent) == ["p.csv"]
    with pytest.raises(FileExistsError, match="already exists"):
        write_csv(good, out)
    js = tmp_path / "out" / "p.json"
    with pytest.raises(TypeError):
        write_json(good, js, model={"not json": object()})
    assert sorted(os.listdir(out.parent)) == ["p.csv"]
    write_json(good, js)
    assert json.loads(js.read_text())["n"] == 1


# ---- item 1: --rename never renames outside the folder ---------------------------------------


def test_rename_skips_symbolic_links_and_never_touches_their_targets(tmp_path: Path, capsys):
    root, outside = tmp_path / "imgs", tmp_path / "outside"
    write_image(root / "embryo1.tif", seed=1)
    target = write_image(outside / "precious.tif", seed=2)
    write_image(outside / "sub" / "other.tif", seed=3)
    (root / "link.tif").symlink_to(target)
    (root / "linked-folder").symlink_to(outside / "sub", target_is_directory=True)
    outside_before = sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*"))
    undo = tmp_path / "undo.csv"
    assert (
        run_remote(
            Counting(), root, "--out", tmp_path / "p.csv", "--rename", "--undo-manifest", undo
        )
        == 0
    )
    assert sorted(p.relative_to(outside).as_posix() for p in outside.rglob("*")) == outside_before
    assert (
        (root / "link.tif").is_symlink()
        and (root / "link.tif").resolve() == target
        and target.is_file()
    )
    assert (root / "embryo1__s13-16_s11-12_s9-10.tif").is_file()
    out = capsys.readouterr().out
    assert "renamed 1 file(s), skipped 1 (1 symbolic link(s), never renamed)" in out
    assert "link.tif: symbolic link" in out
    assert [Path(r["old"]).name for r in read_csv(undo)] == ["embryo1.tif"]
    assert predict("--undo", undo) == 0
    assert (
        (root / "embryo1.tif").is_file() and (root / "link.tif").is_symlink() and target.is_file()
    )


def test_help_documents_that_links_are_skipped(capsys):
    with pytest.raises(SystemExit):
        predict("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "Symbolic links are skipped" in text


# ---- item 3: an interruption between link and unlink -----------------------------------------


def test_undo_finishes_a_rename_interrupted_between_link_and_unlink(
    tmp_path: Path, monkeypatch, capsys
):
    from flystage import rename as rename_module

    root = tmp_path / "imgs"
    for i in range(3):
        write_image(root / f"embryo{i}.tif", seed=i)
    original = {p.name: p.read_bytes() for p in root.iterdir()}
    calls = []
    real = rename_module.rename_no_replace

    def interrupted_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            os.link(src, dst)  # the link is made, then the power goes before the unlink
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(rename_module, "rename_no_replace", interrupted_on_second)
    undo = tmp_path / "undo.csv"
    with pytest.raises(KeyboardInterrupt):
        run_remote(
            Counting(), root, "--out", tmp_path / "p.csv", "--rename", "--undo-manifest", undo
        )
    monkeypatch.undo()
    rows = read_csv(undo)
    assert len(rows) == 2 and Path(rows[1]["old"]).exists() and Path(rows[1]["new"]).exists()
    capsys.readouterr()
    assert predict("--undo", undo) == 0
    assert "restored 2 file(s), skipped 0" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in root.iterdir()} == original
    assert predict("--undo", undo) == 0  # a second undo: already restored


# ---- item 8: blank, constant and all-NaN images ----------------------------------------------


def test_blank_constant_and_nan_images_are_flagged_not_predicted_nor_renamed(
    model_dir: Path, tmp_path: Path, capsys
):
    import cv2
    import numpy as np
    import tifffile

    from flystage.predictor import Predictor

    root = tmp_path / "imgs"
    write_image(root / "embryo1.tif", seed=1)
    root.mkdir(exist_ok=True)
    tifffile.imwrite(root / "constant.tif", np.full((42, 111), 300, np.uint16))
    assert cv2.imwrite(str(root / "black.png"), np.zeros((42, 111), np.uint8))
    assert cv2.imwrite(
        str(root / "solid-colour.png"), np.full((42, 111, 3), (10, 200, 90), np.uint8)
    )
    tifffile.imwrite(root / "nan.tif", np.full((42, 111), np.nan, np.float32))
    half = np.full((42, 111), 5.0, np.float32)
    half[:, :50] = np.nan
    tifffile.imwrite(root / "nan-and-constant.tif", half)
    inf = np.full((42, 111), np.inf, np.float32)
    inf[0, 0] = -np.inf
    tifffile.imwrite(root / "infinite.tif", inf)
    blanks = [
        "black.png",
        "constant.tif",
        "infinite.tif",
        "nan-and-constant.tif",
        "nan.tif",
        "solid-colour.png",
    ]
    out, undo = tmp_path / "p.csv", tmp_path / "undo.csv"
    assert (
        predict(
            root,
            "--model",
            model_dir,
            "--out",
            out,
            "--rename",
            "--undo-manifest",
            undo,
            "--unsure-below",
            "0.3",
        )
        == 1
    )
    rows = {r["file"]: r for r in read_csv(out)}
    for name in blanks:
        assert (
            "blank image" in rows[name]["error"]
            and rows[name]["stage_1"] == ""
            and rows[name]["unsure"] == ""
        ), name
        assert (root / name).is_file(), name  # kept its name
    assert "every pixel is 300" in rows["constant.tif"]["error"]
    assert "NaN or infinite" in rows["nan.tif"]["error"]
    assert rows["embryo1.tif"]["error"] == "" and rows["embryo1.tif"]["stage_1"]
    assert [Path(r["old"]).name for r in read_csv(undo)] == ["embryo1.tif"]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["errors"] == len(blanks)
    assert "blank image" in capsys.readouterr().err
    # Bytes too (what the serve container hands the predictor).
    got = Predictor(model_dir, threads=1).predict_sources(
        [(root / "constant.tif").read_bytes()], names=["x"]
    )[0]
    assert got.top == [] and "x: blank image" in got.error
