"""flystage.augment: the on-the-fly transform and the offline `flystage augment` command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from flystage.augment import (
    LAB_ANGLES,
    AugmentConfig,
    Augmenter,
    augment_split,
    build_train_transform,
    rotate_fitted,
    rotate_full,
    sample_rng,
)
from flystage.cli import main as flystage_main
from flystage.imaging import PreprocessConfig, preprocess
from flystage.manifest import Record, file_sha1, read_manifest, write_manifest
from flystage.reading import read_image
from imaging_helpers import SIZE, brightfield_embryo, dim_embryo, encode, foreground_box

# Every op but the flips, each drawn with this probability.
OPS = ("p_angle", "p_rotation", "p_affine", "p_intensity", "p_blur", "p_noise", "p_erase")


@pytest.fixture(scope="module")
def model_input() -> np.ndarray:
    return preprocess(dim_embryo(), PreprocessConfig(**SIZE))


def only(**kwargs) -> AugmentConfig:
    """A config with every op off except those given."""
    return AugmentConfig.from_dict({**AugmentConfig.off().to_dict(), **kwargs})


# ---- config ----------------------------------------------------------------------------------


def test_config_round_trips_through_json_and_rejects_unknown_keys() -> None:
    cfg = AugmentConfig(angles=(180,), p_hflip=0.5, max_noise=0.1)
    again = AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.angles == (180.0,)
    with pytest.raises(ValueError, match="unknown augmentation setting.*'mixup'"):
        AugmentConfig.from_dict({"mixup": 0.2})
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(p_blur=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(max_rotation=-1)


def test_flips_are_off_by_default() -> None:
    cfg = AugmentConfig()
    assert cfg.p_hflip == 0.0 and cfg.p_vflip == 0.0
    assert cfg.angles == (180.0,)  # the turn that matters once images are aligned


# ---- the transform ---------------------------------------------------------------------------


def test_deterministic_given_a_seed(model_input: np.ndarray) -> None:
    a, b, c = (build_train_transform(AugmentConfig(), seed=s) for s in (7, 7, 8))
    runs_a = [a(model_input) for _ in range(6)]
    runs_b = [b(model_input) for _ in range(6)]
    runs_c = [c(model_input) for _ in range(6)]
    for x, y in zip(runs_a, runs_b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(runs_a, runs_c))
    # a per-sample generator gives the same result whatever the augmenter's own state
    np.testing.assert_array_equal(
        a(model_input, sample_rng(1, 2, 3)), c(model_input, sample_rng(1, 2, 3))
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_dtype_range(channels: int) -> None:
    image = preprocess(
        brightfield_embryo(), PreprocessConfig(channels=channels, height=64, width=160)
    )
    strong = AugmentConfig(**dict.fromkeys(OPS, 1), p_hflip=0.5, p_vflip=0.5, max_gain=0.9)
    aug = Augmenter(strong, seed=0)
    for _ in range(20):
        out = aug(image)
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_off_is_the_identity(model_input: np.ndarray) -> None:
    np.testing.assert_array_equal(Augmenter(AugmentConfig.off())(model_input), model_input)


@pytest.mark.parametrize(
    "op",
    [{op: 1.0} for op in (*OPS, "p_hflip", "p_vflip")],
    ids=lambda d: next(iter(d)),
)
def test_each_op_changes_the_image(model_input: np.ndarray, op: dict) -> None:
    aug = Augmenter(only(**op), seed=3)
    changed = [np.abs(aug(model_input) - model_input).mean() for _ in range(3)]
    assert min(changed) > 1e-3, changed


def test_noise_and_erasing_keep_the_background_black(model_input: np.ndarray) -> None:
    background = model_input == 0
    out = Augmenter(only(p_noise=1.0, max_noise=0.2, p_erase=1.0), seed=0)(model_input)
    assert out[background].max() == 0.0
    assert (out[~background] == 0).mean() > 0.01  # a patch erased on the embryo


@pytest.mark.parametrize("angle", LAB_ANGLES)
def test_large_rotations_keep_the_whole_embryo(model_input: np.ndarray, angle: float) -> None:
    out = rotate_fitted(model_input, angle)
    h, w = foreground_box(out[0], 0.02)
    h0, w0 = foreground_box(model_input[0], 0.02)
    assert out[0, 0, :].max() < 0.02 and out[0, -1, :].max() < 0.02  # not cut at top/bottom
    assert out[0, :, 0].max() < 0.02 and out[0, :, -1].max() < 0.02
    if angle in (90.0, 270.0):
        assert h > w and h >= 0.9 * out.shape[1]  # upright, shrunk to fit the height
    if angle == 180.0:
        assert abs(w - w0) <= 2 and abs(h - h0) <= 2  # fits as it is: no shrinking
        # head to tail: a mark at the top left ends at the bottom right
        marked = model_input.copy()
        marked[:, 40:60, 40:70] = 1.0
        turned = rotate_fitted(marked, 180.0)
        assert turned[0, 70:86, 252:278].min() > 0.9 and turned[0, 40:60, 40:70].max() < 0.9


def test_torch_tensors_come_back_as_tensors(model_input: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    out = Augmenter(AugmentConfig(), seed=0)(torch.from_numpy(model_input))
    assert (
        isinstance(out, torch.Tensor)
        and out.dtype == torch.float32
        and tuple(out.shape) == model_input.shape
    )
    np.testing.assert_array_equal(out.numpy(), Augmenter(AugmentConfig(), seed=0)(model_input))


def test_rotate_full_is_exact_at_right_angles_and_keeps_dtype() -> None:
    img = (np.arange(6 * 10).reshape(6, 10) * 1000).astype(np.uint16)
    np.testing.assert_array_equal(rotate_full(img, 90), np.rot90(img))
    np.testing.assert_array_equal(rotate_full(img, 270), np.rot90(img, 3))
    out = rotate_full(img, 45, fill=7)
    assert out.dtype == np.uint16 and out.shape == (12, 12) and out[0, 0] == 7
    rgb = np.zeros((20, 50, 3), np.uint8)
    assert rotate_full(rgb, 135, fill=(255, 255, 255)).shape == (50, 50, 3)


# ---- the offline command ---------------------------------------------------------------------


@pytest.fixture
def small_manifest(tmp_path: Path) -> Path:
    """A manifest of five small images in two splits: 16-bit TIFF, RGB PNG, 8-bit BMP."""
    data = tmp_path / "data"
    files = {
        "s1/11-12/a.tif": (tifffile.imwrite, dim_embryo(60, 150, seed=1)),
        "s1/13-16/b.png": (None, encode(brightfield_embryo(40, 100), ".png")),
        "s2/11-12/a.tif": (tifffile.imwrite, dim_embryo(60, 150, seed=2)),  # same stem, same label
        "s3/11-12/c.bmp": (None, encode((dim_embryo(60, 150) // 4).astype(np.uint8), ".bmp")),
        "s9/13-16/d.tif": (tifffile.imwrite, dim_embryo(60, 150, seed=3)),
    }
    records = []
    for rel, (writer, content) in files.items():
        path = data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        writer(path, content) if writer else path.write_bytes(content)
        group = rel.split("/")[0]
        split = "valid" if group == "s9" else "train"
        records.append(Record(path, rel.split("/")[1], group, split, file_sha1(path)))
    return write_manifest(records, data / "manifest.csv")


def augment_args(manifest: Path, split: str, out: Path, *extra: str) -> list[str]:
    """``flystage augment`` arguments: one split of the manifest into out."""
    return ["augment", "--manifest", str(manifest), "--split", split, "--out", str(out), *extra]


def test_offline_augment_writes_one_split(tmp_path: Path, small_manifest: Path) -> None:
    out = tmp_path / "aug"
    code = flystage_main(augment_args(small_manifest, "train", out, "--angles", "90", "180", "45"))
    assert code == 0
    records = read_manifest(out / "manifest.csv")
    assert len(records) == 4 * 4  # four train images, original + three angles
    assert {r.split for r in records} == {"train"}
    assert not any(
        "d" == Path(r.extra["source"]).stem for r in records
    )  # the valid image stayed out
    assert all(str(r.path).startswith(str(out / "train")) for r in records)
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert not any(Path(row["path"]).is_absolute() for row in rows)  # relative to DIR
    assert all(file_sha1(r.path) == r.sha1 for r in records)
    # two sources named a.tif with the same label: both kept, told apart by their hash
    a_files = sorted(p.name for p in (out / "train" / "11-12").glob("a*.png"))
    assert len(a_files) == 8
    data = small_manifest.parent
    by_source = {
        (Path(r.extra["source"]).relative_to(data).as_posix(), r.extra["angle"]): r for r in records
    }
    # the 16-bit TIFF stays 16-bit; 90 degrees turns 60x150 into 150x60; 45 enlarges the canvas
    original = read_image(by_source[("s1/11-12/a.tif", "0")].path)
    assert original.dtype == np.uint16 and original.shape == (60, 150)
    np.testing.assert_array_equal(
        original, tifffile.imread(small_manifest.parent / "s1/11-12/a.tif")
    )
    assert read_image(by_source[("s1/11-12/a.tif", "90")].path).shape == (150, 60)
    assert read_image(by_source[("s1/11-12/a.tif", "45")].path).shape[0] > 100
    assert (
        by_source[("s1/11-12/a.tif", "90")].label == "11-12"
        and by_source[("s1/11-12/a.tif", "90")].group == "s1"
    )
    rgb = [
        r for r in records if Path(r.extra["source"]).suffix == ".png" and r.extra["angle"] == "45"
    ][0]
    corners = read_image(rgb.path)[:3, :3]
    assert corners.min() > 240  # the white background fills the new corners, not black


def test_offline_augment_8bit_option(tmp_path: Path, small_manifest: Path) -> None:
    manifest, failures = augment_split(
        small_manifest, "valid", tmp_path / "aug8", angles=(180,), eight_bit=True, progress=False
    )
    assert not failures
    records = read_manifest(manifest)
    assert len(records) == 2
    for r in records:
        image = read_image(r.path)
        assert image.dtype == np.uint8 and image.max() == 255


def test_offline_augment_never_overwrites(tmp_path: Path, small_manifest: Path, capsys) -> None:
    out = tmp_path / "aug"
    out.mkdir()
    keep = out / "notes.txt"
    keep.write_text("mine")
    args = augment_args(small_manifest, "train", out, "--angles", "90")
    assert flystage_main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert keep.read_text() == "mine" and sorted(out.iterdir()) == [keep]

    # an interrupted run: finish it with --resume; existing outputs are kept as they are
    keep.unlink()
    first = augment_split(small_manifest, "train", out, angles=(90,), progress=False)[0]
    victim = sorted((out / "train").rglob("*_rot090.png"))[0]
    stamp = victim.stat().st_mtime_ns
    other = sorted((out / "train").rglob("*.png"))[-1]
    other.unlink()
    first.unlink()
    assert flystage_main(args + ["--resume"]) == 0
    assert victim.stat().st_mtime_ns == stamp and other.exists()
    assert len(read_manifest(out / "manifest.csv")) == 8

    # never two splits in one folder
    assert flystage_main(augment_args(small_manifest, "valid", out, "--resume")) == 2
    assert "one split only" in capsys.readouterr().err


def test_offline_augment_skips_unreadable_images_and_says_so(
    tmp_path: Path, small_manifest: Path, capsys
) -> None:
    broken = small_manifest.parent / "s3/11-12/c.bmp"
    broken.write_bytes(broken.read_bytes()[:100])
    out = tmp_path / "aug"
    args = augment_args(small_manifest, "train", out, "--angles", "180")
    assert flystage_main(args) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and str(broken) in err
    assert len(read_manifest(out / "manifest.csv")) == 3 * 2


def test_an_output_already_there_is_a_flystage_error_and_a_file_exists_error(tmp_path: Path):
    from flystage.augment import _write_png
    from flystage.errors import FlystageError
    from flystage.files import OutputExistsError

    path = tmp_path / "a.png"
    image = np.zeros((4, 4), np.uint8)
    _write_png(path, image)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="a.png already exists; it is never repl") as info:
        _write_png(path, image + 1)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, FlystageError)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]  # no .partial
