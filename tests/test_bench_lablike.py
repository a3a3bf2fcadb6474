"""bench/make_lablike.py, the lab-like copies of BDGP, and bench/bench_accuracy.py, which
measures the default model on BDGP, on those copies (seeds pooled) and on bdgp-stages15."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from flystage.imaging import PreprocessConfig, foreground_mask, load, stretch_contrast
from flystage.manifest import file_sha1
from flystage.reading import read_image

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str, as_name: str):
    """bench/<name>.py, imported once under as_name (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(as_name, REPO / "bench" / f"{name}.py")
    module = sys.modules.setdefault(as_name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


make_lablike_module = bench_module("make_lablike", "make_lablike")
make_lablike = make_lablike_module.make_lablike
lablike_image = make_lablike_module.lablike_image
LablikeConfig = make_lablike_module.LablikeConfig
LablikeError = make_lablike_module.LablikeError
# How the benchmarks read BDGP (and the lab-like copy): labels.csv's stage range, by gene.
# Imported as "common", the name bench_accuracy.py imports it by.
read_by_gene = bench_module("common", "common").read_by_gene
bench_accuracy = bench_module("bench_accuracy", "bench_accuracy")

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
    draws = json.loads((lablike / "lablike.json").read_text())["images"]
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
        # Dim: under 3000 of 65535 (the widest ranges' brightest pixel is about 2,700).
        assert image.max() < 3000
        # Embryo bright on a dark background: the frame's median is the background (within
        # the illumination ramp), the brightest pixels rise about `contrast` above it.
        drawn = draws[row["path"]]
        background = np.median(image)
        assert abs(background - drawn["background"]) <= 0.3 * drawn["background"], row["path"]
        assert np.percentile(image, 99.9) - background > 0.5 * drawn["contrast"], row["path"]


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


def test_each_image_draws_its_brightness_noise_focus_and_background(bdgp_root: Path) -> None:
    """Per-image draws cover their documented ranges, and the frame shows what was drawn."""
    config = LablikeConfig()
    rgb = read_image(bdgp_root / ONLY[1])
    drawn = []
    for i in range(40):
        image, d = lablike_image(rgb, np.random.default_rng([3, i]), config)
        drawn.append(d)
        frame = image.astype(np.float32)
        # The noise: what a flat patch far from the embryo keeps after its smooth part is gone.
        far = frame[:, :100] if d["left"] > 400 else frame[:, -100:]
        grain = far - cv2.GaussianBlur(far, (0, 0), 5)
        assert 0.7 * d["noise"] < grain[10:-10, 10:-10].std() < 1.15 * d["noise"] + 1, d
        # The background level, lit by the ramp: one side brighter by about `gradient`.
        assert (
            abs(np.median(far) - d["background"]) < (0.5 * d["gradient"] + 0.05) * d["background"]
        ), d
    for name in ("background", "contrast", "noise", "blur", "gradient"):
        low, high = getattr(config, name)
        values = [d[name] for d in drawn]
        assert low <= min(values) and max(values) <= high, name
        # Spread over the range, not stuck at one value.
        assert max(values) - min(values) > 0.6 * (high - low), (name, values)

    # Focus: a sharp frame's embryo edge is steeper than a blurred one's.
    def steepest(blur: float) -> float:
        narrow = dataclasses.replace(config, blur=(blur, blur), noise=(0.0, 0.0))
        image, _ = lablike_image(rgb, np.random.default_rng(0), narrow)
        return float(np.abs(np.diff(image.astype(np.float32), axis=1)).max())

    assert steepest(0.0) > 2 * steepest(3.0)


def test_config_refuses_bad_ranges() -> None:
    with pytest.raises(LablikeError, match="noise"):
        LablikeConfig(noise=(10.0, 5.0))
    with pytest.raises(LablikeError, match="gradient"):
        LablikeConfig(gradient=(0.0, 2.5))
    with pytest.raises(LablikeError, match="16 bits"):
        LablikeConfig(contrast=(300.0, 70000.0))


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


# ---- bench_accuracy.py -----------------------------------------------------------------------


def test_model_options_are_parsed_as_flystage_train_parses_them() -> None:
    argv = bench_accuracy.train_arguments(["probe_l2=0.3"], "--feature_taps 1,2,3 --height 128", 1)
    config = bench_accuracy.config_of(argv)
    assert config.probe_l2 == 0.3 and config.feature_taps == (1, 2, 3)
    assert config.preprocess.height == 128 and config.threads == 1
    assert bench_accuracy.config_changes(config) == {
        "probe_l2": 0.3,
        "feature_taps": (1, 2, 3),
        "preprocess.height": 128,
    }
    assert bench_accuracy.config_changes(bench_accuracy.config_of([])) == {}
    # A misspelt or abbreviated name, a bad value, a pair without "=": refused, never ignored.
    for sets, text in ((["probe=0.3"], None), (["probe_l2=abc"], None), (["probe_l2"], None)):
        with pytest.raises(bench_accuracy.BenchError):
            bench_accuracy.config_of(bench_accuracy.train_arguments(sets, text, 0))


def _seed_report(seed: int, rng: np.random.Generator) -> dict:
    """A leave-one-gene-out report of one lab-like seed: 3 genes x 4 images, 3 labels."""
    labels = ["1-3", "4-6", "7-8"]
    predictions = [
        {
            "path": f"seed{seed}/{gene}/{labels[i % 3]}/{i}.tif",
            "group": gene,
            "label": labels[i % 3],
            "probs": list(rng.dirichlet(np.ones(3))),
        }
        for gene in ("geneA", "geneB", "geneC")
        for i in range(4)
    ]
    return {
        "labels": labels,
        "protocol": "leave-one-group-out",
        "group_column": "group",
        "folds": [{"group": g, "n_test": 4} for g in ("geneA", "geneB", "geneC")],
        "valid_fraction": 0.05,
        "config": {},
        "seconds": 1.0,
        "predictions": predictions,
    }


def test_seeds_pool_into_one_report_whose_groups_are_genes() -> None:
    rng = np.random.default_rng(0)
    reports = {seed: _seed_report(seed, rng) for seed in (0, 1, 2)}
    pooled = bench_accuracy.pool(reports)
    predictions = [p for r in reports.values() for p in r["predictions"]]
    assert pooled["n"] == 36 and pooled["seeds"] == [0, 1, 2]
    assert pooled["predictions"] == predictions
    # Scored once over every seed's predictions, resampling genes (3), not seed x gene (9).
    labels = pooled["labels"]
    expected = bench_accuracy.evaluate_probs(
        np.array([p["probs"] for p in predictions]),
        np.array([labels.index(p["label"]) for p in predictions]),
        labels,
        [p["group"] for p in predictions],
    )
    for key in ("top1", "top3", "ece", "within1", "mae", "intervals", "confusion"):
        assert pooled[key] == expected[key], key
    assert pooled["bootstrap"]["n_groups"] == 3
    assert [(f["seed"], f["group"]) for f in pooled["folds"]][:4] == [
        (0, "geneA"),
        (0, "geneB"),
        (0, "geneC"),
        (1, "geneA"),
    ]


def test_stages15_is_read_one_embryo_per_group_labels_from_folders(stages15_root: Path) -> None:
    records = bench_accuracy.read_stages15(stages15_root)
    rows = _rows(stages15_root / "labels.csv")
    assert len(records) == len(rows) == 2994
    assert sorted({r.label for r in records}) == [f"c{i:02d}" for i in range(1, 16)]
    assert len({r.group for r in records}) == len(records)
    # The folder's class is labels.csv's class.
    by_path = {r.path.relative_to(stages15_root).as_posix(): r.label for r in records}
    assert all(by_path[row["path"]] == f"c{int(row['class']):02d}" for row in rows)


def test_bench_refuses_what_cannot_run(tmp_path: Path, capsys) -> None:
    assert bench_accuracy.main(["--dataset", "stages15", "--lablike"]) == 2
    assert "--dataset bdgp" in capsys.readouterr().err
    assert bench_accuracy.main(["--data", str(tmp_path)]) == 2
    assert "FLYSTAGE_DATA" in capsys.readouterr().err
    assert bench_accuracy.main(["--dataset", "stages15", "--data", str(tmp_path)]) == 2
    assert "FLYSTAGE_STAGES15" in capsys.readouterr().err
    assert bench_accuracy.main(["--set", "probe=1"]) == 2
    assert "not a training option: --probe 1" in capsys.readouterr().err


TINY_TRAIN = "--arch small_cnn --batch_size 8 --threads 1 --height 32 --width 80 --epochs 2"


def test_lablike_bench_pools_seeds_with_paths_relative_to_the_data(
    bdgp_root: Path, tmp_path: Path, capsys
) -> None:
    """A small real run: two seeds, one held-out gene, a tiny model."""
    out = tmp_path / "run"
    argv = ["--data", str(bdgp_root), "--lablike", "--lablike-seeds", "0,1", "--folds", "Dif"]
    assert bench_accuracy.main([*argv, "--out", str(out), "--train-args", TINY_TRAIN]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["data"] == "lablike" and line["protocol"].startswith("leave-one-gene-out")
    assert line["lablike"]["seeds"] == [0, 1] and line["arch"] == "small_cnn"
    for key in ("top1", "top3", "ece", "within1", "mae"):
        lo, hi = line[f"{key}_ci"]
        assert lo <= line[key] <= hi, key
    assert line["config_changes"]["arch"] == "small_cnn"
    report = json.loads((out / "report.json").read_text())
    held_out = sorted(r["path"] for r in _rows(bdgp_root / "labels.csv") if r["gene"] == "Dif")
    assert report["n"] == line["n_images"] == 2 * len(held_out)
    # Each seed's copy of every held-out image, by its path in the copy: seed<N>/ + BDGP's
    # path as a .tif; group = gene in both seeds, so the intervals resample genes.
    for seed in (0, 1):
        paths = sorted(
            p["path"].removeprefix(f"seed{seed}/")
            for p in report["predictions"]
            if p["path"].startswith(f"seed{seed}/")
        )
        assert paths == [Path(p).with_suffix(".tif").as_posix() for p in held_out]
    assert {p["group"] for p in report["predictions"]} == {"Dif"}
    # Another run's report pairs with it image by image.
    from flystage.compare import compare_reports

    assert compare_reports(report, report)["n_paired"] == report["n"]
