"""bench/make_lablike.py: the lab-like copy of BDGP that bench_accuracy.py --lablike measures."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from flystage.imaging import PreprocessConfig, foreground_mask, load, read_image, stretch_contrast
from flystage.organise import file_sha1

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str, as_name: str):
    """bench/<name>.py, imported once under as_name (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(as_name, REPO / "bench" / f"{name}.py")
    module = sys.modules.setdefault(as_name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


make_lablike_module = bench_module("make_lablike", "make_lablike")
make_lablike = make_lablike_module.make_lablike
LablikeError = make_lablike_module.LablikeError
# How the benchmarks read BDGP (and the lab-like copy): labels.csv's stage range, by gene.
read_by_gene = bench_module("common", "bench_common").read_by_gene

# Four genes, four stage ranges.
ONLY = [
    "Dif/1-3/insitu30436.bmp",
    "Dl/7-8/insitu77531.bmp",
    "disco/11-12/insitu22523.bmp",
    "Dms/13-16/insitu67027.bmp",
]


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def lablike(bdgp_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lablike") / "set"
    make_lablike(bdgp_root, out, seed=3, only=ONLY)
    return out


def test_writes_dim_16_bit_frames_in_bdgp_layout(lablike: Path, bdgp_root: Path) -> None:
    rows = _rows(lablike / "labels.csv")
    source = {r["path"]: r for r in _rows(bdgp_root / "labels.csv")}
    assert sorted(r["path"] for r in rows) == sorted(
        Path(p).with_suffix(".tif").as_posix() for p in ONLY
    )
    assert list(rows[0]) == ["path", "gene", "stage_range", "image_id", "sha1"]
    for row in rows:
        original = source[Path(row["path"]).with_suffix(".bmp").as_posix()]
        assert (row["gene"], row["stage_range"], row["image_id"]) == (
            original["gene"],
            original["stage_range"],
            original["image_id"],
        )
        path = lablike / row["path"]
        assert row["sha1"] == file_sha1(path)
        image = tifffile.imread(path)
        assert image.dtype == np.uint16 and image.shape == (420, 1110)
        low, high = np.percentile(image, [1, 99.9])
        assert 100 < low < 250 and 800 < high < 1600, (low, high)  # dim: ~2 % of the 16-bit range
        assert image.max() < 2000
        # Embryo bright on a dark background: the corners are background.
        assert np.median(image[:20, :20]) < np.percentile(image, 95) - 300


def test_organise_reads_it_as_it_reads_bdgp(lablike: Path) -> None:
    got = sorted(
        (r.path.relative_to(lablike).as_posix(), r.label, r.group) for r in read_by_gene(lablike)
    )
    assert got == sorted(
        (Path(p).with_suffix(".tif").as_posix(), p.split("/")[1], p.split("/")[0]) for p in ONLY
    )


def test_deterministic_for_a_seed_and_independent_of_the_other_images(
    lablike: Path, bdgp_root: Path, tmp_path: Path
) -> None:
    again = make_lablike(bdgp_root, tmp_path / "again", seed=3, only=ONLY[1:3])
    first = {r["path"]: r for r in _rows(lablike / "labels.csv")}
    assert _rows(again) and all(r == first[r["path"]] for r in _rows(again))
    other = make_lablike(bdgp_root, tmp_path / "other", seed=4, only=ONLY[:1])
    assert _rows(other)[0]["sha1"] != first[_rows(other)[0]["path"]]["sha1"]


def test_turns_only_unless_mirror_asked(lablike: Path) -> None:
    draws = json.loads((lablike / "lablike.json").read_text())
    assert draws["seed"] == 3 and draws["config"]["mirror"] is False
    assert not any(d["mirror"] for d in draws["images"].values())
    assert all(-180 <= d["angle"] <= 180 for d in draws["images"].values())


def test_refuses_to_overwrite(lablike: Path, bdgp_root: Path, tmp_path: Path) -> None:
    before = _rows(lablike / "labels.csv")
    with pytest.raises(LablikeError, match="not empty"):
        make_lablike(bdgp_root, lablike, seed=5, only=ONLY[:1])
    assert _rows(lablike / "labels.csv") == before
    # Never into the source folder (a copy of one image here, so a failure cannot touch the data).
    source = tmp_path / "source"
    (source / Path(ONLY[0]).parent).mkdir(parents=True)
    (source / ONLY[0]).write_bytes((bdgp_root / ONLY[0]).read_bytes())
    row = next(r for r in _rows(bdgp_root / "labels.csv") if r["path"] == ONLY[0])
    with open(source / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    with pytest.raises(LablikeError, match="inside the source"):
        make_lablike(source, source / "lablike")
    assert not (source / "lablike").exists()
    (source / ONLY[0]).write_bytes((bdgp_root / ONLY[1]).read_bytes())
    with pytest.raises(LablikeError, match="SHA-1 differs"):
        make_lablike(source, tmp_path / "from-changed")
    # An empty folder is fine, and --force replaces.
    (tmp_path / "empty").mkdir()
    make_lablike(bdgp_root, tmp_path / "empty", only=ONLY[:1])
    forced = make_lablike(bdgp_root, tmp_path / "empty", seed=5, only=ONLY[:1], force=True)
    assert _rows(forced)[0]["sha1"] == file_sha1(tmp_path / "empty" / _rows(forced)[0]["path"])


def test_preprocessing_recovers_a_horizontal_embryo(lablike: Path) -> None:
    config = PreprocessConfig(height=128, width=320)
    for row in _rows(lablike / "labels.csv"):
        path = lablike / row["path"]
        # The mask finds the embryo, not the whole frame (its fallback when it finds none).
        mask = foreground_mask(stretch_contrast(read_image(path)))
        assert 0.05 < mask.mean() < 0.3, mask.mean()
        x = load(path, config)
        assert x.shape == (1, 128, 320)
        body = (x[0] > 0.05).astype(np.uint8)
        _, _, width, height = cv2.boundingRect(body)
        assert width > 200 and width > 2.0 * height, (row["path"], width, height)
        moments = cv2.moments(body, binaryImage=True)
        angle = 0.5 * np.degrees(np.arctan2(2 * moments["mu11"], moments["mu20"] - moments["mu02"]))
        assert abs(angle) < 5, (row["path"], angle)
