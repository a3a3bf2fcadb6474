"""flystage.imaging: the preprocessing, step by step and as one pipeline (reading: test_reading)."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError
from pathlib import Path

import cv2
import numpy as np
import pytest

from flystage.imaging import (
    PreprocessConfig,
    align_long_axis,
    crop_to_mask,
    enlarge,
    foreground_mask,
    has_light_background,
    letterbox,
    load,
    preprocess,
    stretch_contrast,
)
from flystage.reading import read_image
from imaging_helpers import (
    LAB_HEIGHT,
    LAB_WIDTH,
    SIZE,
    brightfield_embryo,
    dim_embryo,
    ellipse_mask,
    foreground_box,
)
from test_reading import lab_image, lab_tiff  # the same fixtures

# ---- config ----------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    cfg = PreprocessConfig(height=96, width=240, channels=3, background="light", align=False)
    again = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


def test_config_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown preprocessing setting.*'gamma'"):
        PreprocessConfig.from_dict({"gamma": 2.0})
    for bad in (
        {"channels": 2},
        {"low_percentile": 99, "high_percentile": 1},
        {"background": "grey"},
        {"height": 0},
        {"page": -1},
        {"margin": 3.0},
    ):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)
    with pytest.raises(FrozenInstanceError):
        PreprocessConfig().height = 5  # frozen


# ---- the steps -------------------------------------------------------------------------------


def test_stretch_contrast_maps_percentiles_to_0_and_1() -> None:
    img = np.linspace(100, 900, 200 * 100).reshape(100, 200).astype(np.uint16)
    out = stretch_contrast(img, 1.0, 99.0)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert abs(float(np.mean(out == 0.0)) - 0.01) < 0.005
    assert abs(float(np.median(out)) - 0.5) < 0.01
    inv = stretch_contrast(img, 1.0, 99.0, invert=True)
    assert inv[0, 0] == 1.0 and inv[-1, -1] == 0.0
    assert not stretch_contrast(np.full((5, 5), 7, np.uint16)).any()


def test_light_background_detection() -> None:
    assert has_light_background(brightfield_embryo())
    assert not has_light_background(dim_embryo())
    # an embryo touching all four sides of the frame: the corners still show the background
    assert not has_light_background(dim_embryo(length=LAB_WIDTH, aspect=LAB_WIDTH / LAB_HEIGHT))
    filling = brightfield_embryo()
    filling[ellipse_mask(128, 320, 320, 2.5)] = (225, 215, 190)
    assert has_light_background(filling)


def test_foreground_mask_finds_the_embryo_in_a_dim_image(lab_image: np.ndarray) -> None:
    x = stretch_contrast(lab_image)
    mask = foreground_mask(x)
    truth = ellipse_mask(LAB_HEIGHT, LAB_WIDTH, 0.7 * min(LAB_WIDTH, LAB_HEIGHT * 2.6))
    assert mask.dtype == bool and mask.shape == truth.shape
    # all of the embryo, and only a thin rim of background (the blur's reach) besides
    assert (mask & truth).sum() / truth.sum() > 0.99
    assert mask.sum() / truth.sum() < 1.2


def test_foreground_mask_of_a_blank_image_keeps_everything() -> None:
    assert foreground_mask(np.zeros((50, 80), np.float32)).all()


def test_align_long_axis_turns_a_tilted_ellipse_horizontal() -> None:
    mask = ellipse_mask(300, 300, 240, 2.6, angle=35)
    img = mask.astype(np.float32)
    out, out_mask, angle = align_long_axis(img, mask)
    assert abs(abs(angle) - 35) < 2
    h, w = foreground_box(out)
    assert 2.3 < w / h < 2.9, (w, h)
    assert abs(out_mask.sum() - mask.sum()) / mask.sum() < 0.03  # nothing cut off


def test_crop_to_mask_adds_margin_and_pads() -> None:
    mask = np.zeros((100, 200), bool)
    mask[40:60, 50:150] = True
    img = np.arange(100 * 200, dtype=np.float32).reshape(100, 200)
    out, m = crop_to_mask(img, mask, margin=0.1)
    assert out.shape == (20 + 2 * 2, 100 + 2 * 10) and m.shape == out.shape
    out, m = crop_to_mask(img, mask, margin=1.0)
    assert out.shape == (60, 300)  # padded with 0 beyond the frame
    assert out[:, :50].max() == 0.0 and not m[:, :50].any() and out[:, 50:100].min() > 0


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    img = np.ones((50, 50, 2), np.float32)
    out = letterbox(img, 64, 160)
    assert out.shape == (64, 160, 2) and out.dtype == np.float32
    assert foreground_box(out[..., 0], 0.5) == (64, 64)
    assert out[:, :40].max() == 0.0 and out[:, -40:].max() == 0.0


# ---- the pipeline ----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(128, 320), (64, 160)])
def test_preprocess_shape_dtype_range(
    lab_image: np.ndarray, channels: int, size: tuple[int, int]
) -> None:
    cfg = PreprocessConfig(height=size[0], width=size[1], channels=channels)
    for image in (
        lab_image,
        brightfield_embryo(),
        lab_image.astype(np.float32),
        (lab_image // 4).astype(np.uint8),
    ):
        out = preprocess(image, cfg)
        assert out.shape == (channels, *size) and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0 and out.max() > 0.5


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("crop", [False, True])
def test_preprocess_keeps_the_aspect_ratio(align: bool, crop: bool) -> None:
    image = dim_embryo(aspect=2.6)
    out = preprocess(image, PreprocessConfig(**SIZE, align=align, crop=crop))
    h, w = foreground_box(out[0])
    assert 2.4 < w / h < 2.8, (w, h)
    if crop:  # the embryo fills the input
        assert w > 0.85 * 320


def test_preprocess_mask_zeroes_background_and_keeps_embryo(lab_image: np.ndarray) -> None:
    cfg = PreprocessConfig(**SIZE, align=False, crop=False)
    masked = preprocess(lab_image, cfg)[0]
    unmasked = preprocess(lab_image, PreprocessConfig(**SIZE, align=False, crop=False, mask=False))[
        0
    ]
    # letterboxed 1110x420 -> 320x121; the corners are background
    corner = (slice(10, 30), slice(5, 40))
    assert masked[corner].max() == 0.0
    assert unmasked[corner].mean() > 0.01  # the background noise is there without the mask
    inner = ellipse_mask(128, 320, 150)
    assert masked[inner].mean() > 0.2 and np.mean(masked[inner] > 0) > 0.99


def test_preprocess_aligns_a_tilted_embryo(lab_image: np.ndarray) -> None:
    tilted = dim_embryo(angle=30, length=500)
    h, w = foreground_box(preprocess(tilted, PreprocessConfig(**SIZE, align=True))[0])
    assert 2.3 < w / h < 2.9, (w, h)
    h, w = foreground_box(preprocess(tilted, PreprocessConfig(**SIZE, align=False))[0])
    assert w / h < 2.0, (w, h)


def test_light_background_is_inverted_to_embryo_bright_on_black() -> None:
    image = brightfield_embryo()
    out = preprocess(image, PreprocessConfig(**SIZE, channels=3, align=False, crop=False))
    body = ellipse_mask(128, 320, 0.85 * 320 * 0.9)
    assert out[:, ~ellipse_mask(128, 320, 0.85 * 320 * 1.1)].max() == 0.0
    assert out[:, body].mean() > 0.1
    # the purple stain is brighter than the unstained embryo after inversion
    stain = ellipse_mask(128, 320, 0.2 * 320, 1.5, centre=(320 // 3, 64))
    assert out[:, stain].mean() > out[:, body & ~stain].mean() + 0.3
    forced_dark = preprocess(
        image, PreprocessConfig(**SIZE, channels=3, align=False, crop=False, background="dark")
    )
    assert not np.allclose(forced_dark, out)


def test_preprocess_survives_blank_and_nan_images() -> None:
    assert not preprocess(np.zeros((420, 1110), np.uint16)).any()
    img = dim_embryo().astype(np.float32)
    img[:10] = np.nan
    img[-10:] = np.inf
    out = preprocess(img)
    assert np.isfinite(out).all() and out.max() > 0.5


def test_load_reads_and_preprocesses(lab_tiff: Path, lab_image: np.ndarray) -> None:
    cfg = PreprocessConfig(**SIZE)
    np.testing.assert_array_equal(load(lab_tiff, cfg), preprocess(lab_image, cfg))
    np.testing.assert_array_equal(load(lab_tiff.read_bytes(), cfg), preprocess(lab_image, cfg))


def test_real_bdgp_images_preprocess_sensibly(bdgp_root: Path) -> None:
    paths = sorted(bdgp_root.glob("*/*/*.bmp"))[::40]
    assert len(paths) >= 4
    cfg = PreprocessConfig(**SIZE, channels=3)
    for path in paths:
        raw = read_image(path)
        assert raw.shape == (128, 320, 3) and raw.dtype == np.uint8
        assert has_light_background(raw)
        out = load(path, cfg)
        assert out.shape == (3, 128, 320)
        grey = out.mean(axis=0)
        # background black, the embryo (cropped, aligned) fills most of the frame and is lit
        assert grey[:, :5].max() < 0.05 and grey[:, -5:].max() < 0.05, path
        fg = grey > 0.02
        assert 0.5 < fg.mean() < 0.95, (path, fg.mean())
        h, w = foreground_box(grey, 0.02)
        assert w > 0.85 * 320 and 1.8 < w / h < 3.5, (path, h, w)
        assert grey[fg].mean() > 0.15, path


def test_real_80x32_images_are_preprocessed_at_the_model_inputs_resolution(
    stages15_root: Path,
) -> None:
    """BDGP's 80x32 images, already cropped to the embryo: a sensible 96x240 input, and the
    same one as from a copy twice as large. Before the frame was enlarged first, the crop
    margin was rounded to whole 80x32 pixels and the mask edge was 3 input pixels wide, so
    the two differed by a median RMSE of 0.06."""
    paths = sorted((stages15_root / "images").glob("c*/*.bmp"))[::100]
    assert len(paths) >= 25
    errors = []
    for path in paths:
        raw = read_image(path)
        assert raw.shape == (32, 80) and raw.dtype == np.uint8
        assert has_light_background(raw)
        # The mask keeps the embryo, which fills the frame (an ellipse fills 79 % of its box).
        assert foreground_mask(stretch_contrast(raw, invert=True)).mean() > 0.75, path
        grey = load(path, PreprocessConfig())[0]
        assert grey.shape == (96, 240)
        assert grey[:, :5].max() < 0.05 and grey[:, -5:].max() < 0.05, path
        h, w = foreground_box(grey, 0.02)
        assert w > 0.85 * 240 and 2.0 < w / h < 3.0, (path, h, w)
        assert grey[grey > 0.02].mean() > 0.15, path
        larger = preprocess(cv2.resize(raw, (160, 64), interpolation=cv2.INTER_CUBIC))[0]
        errors.append(float(np.sqrt(np.mean((grey - larger) ** 2))))
    assert np.median(errors) < 0.01 and max(errors) < 0.05, sorted(errors)[-3:]


def test_enlarging_is_bicubic_within_the_input_range() -> None:
    edge = np.zeros((8, 20), np.float32)
    edge[:, 10:] = 1.0
    for image in (edge, (edge * 60000).astype(np.uint16), np.dstack([edge] * 3)):
        out = enlarge(image, 3.0)
        assert out.shape == (24, 60) + image.shape[2:] and out.dtype == image.dtype
        # Bicubic overshoots at a step edge; the result stays within the input's range.
        assert out.min() == image.min() and out.max() == image.max()
    # Sharper than bilinear: the step rises more steeply.
    cubic = enlarge(edge, 6.0)[0]
    linear = cv2.resize(edge, (120, 48), interpolation=cv2.INTER_LINEAR)[0]
    assert np.diff(cubic).max() > 1.1 * np.diff(linear).max()
    # letterbox enlarges the same way, and still shrinks by area averaging.
    np.testing.assert_array_equal(letterbox(edge, 24, 60), enlarge(edge, 3.0))


def test_grey_from_auto_takes_blue_for_brightfield_and_luminance_for_fluorescence() -> None:
    rng = np.random.default_rng(0)
    image = np.full((128, 320, 3), 230, np.uint8)  # a light (brightfield) background
    image[32:96, 40:280] = rng.integers(60, 200, (64, 240, 3), dtype=np.uint8)  # the embryo
    cfg = {"height": 64, "width": 160, "mask": False, "align": False, "crop": False}
    auto = preprocess(image, PreprocessConfig(**cfg))
    assert np.array_equal(auto, preprocess(image, PreprocessConfig(**cfg, grey_from="blue")))
    assert not np.array_equal(
        auto, preprocess(image, PreprocessConfig(**cfg, grey_from="luminance"))
    )
    dark = 255 - image  # fluorescence: dark background
    assert np.array_equal(
        preprocess(dark, PreprocessConfig(**cfg)),
        preprocess(dark, PreprocessConfig(**cfg, grey_from="luminance")),
    )
    with pytest.raises(ValueError, match="grey_from"):
        PreprocessConfig(grey_from="purple")
