"""flystage.reading: reading every format the lab meets, and bad files."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from flystage.image_checks import ImageError
from flystage.imaging import PreprocessConfig, load
from flystage.reading import read_image
from imaging_helpers import LAB_HEIGHT, LAB_WIDTH, SIZE, dim_embryo, encode, tiff_bytes


@pytest.fixture(scope="module")
def lab_image() -> np.ndarray:
    return dim_embryo()


@pytest.fixture
def lab_tiff(tmp_path: Path, lab_image: np.ndarray) -> Path:
    path = tmp_path / "embryo.tif"
    tifffile.imwrite(path, lab_image)
    return path


# ---- reading ---------------------------------------------------------------------------------


def test_reads_lab_16bit_tiff_unchanged(lab_tiff: Path, lab_image: np.ndarray) -> None:
    out = read_image(lab_tiff)
    assert out.shape == (LAB_HEIGHT, LAB_WIDTH) and out.dtype == np.uint16
    np.testing.assert_array_equal(out, lab_image)
    assert 100 <= out.min() and out.max() <= 900


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.uint16, np.float32, np.int16, np.uint32, np.float64]
)
def test_tiff_pixel_types(dtype) -> None:
    img = (np.arange(40 * 60).reshape(40, 60) % 250).astype(dtype)
    out = read_image(tiff_bytes(img))
    expected = dtype if dtype in (np.uint8, np.uint16, np.float32) else np.float32
    assert out.dtype == expected
    np.testing.assert_array_equal(out, img.astype(expected))


def test_multipage_tiff_page_choice_and_range(tmp_path: Path) -> None:
    pages = np.stack([np.full((30, 50), 10 * (i + 1), np.uint16) for i in range(3)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, pages, photometric="minisblack")
    assert read_image(path).max() == 10
    assert read_image(path, page=2).max() == 30
    with pytest.raises(ImageError, match=r"stack\.tif.*page 3.*3 pages \(0 to 2\)"):
        read_image(path, page=3)
    # load() takes the page from the config
    a = load(path, PreprocessConfig(**SIZE, page=0, mask=False, align=False, crop=False))
    assert a.shape == (1, 128, 320)
    with pytest.raises(ImageError, match="3 pages"):
        load(path, PreprocessConfig(page=5))


def test_lzw_tiff_from_fiji_or_opencv(tmp_path: Path) -> None:
    """LZW is the usual TIFF compression; tifffile alone cannot decode it (OpenCV can)."""
    pages = [dim_embryo(60, 150, seed=i) for i in range(3)]
    ok, buf = cv2.imencodemulti(".tif", pages)  # OpenCV writes LZW
    assert ok and tifffile.TiffFile(io.BytesIO(buf.tobytes())).pages[0].compression == 5
    path = tmp_path / "lzw.tif"
    path.write_bytes(buf.tobytes())
    np.testing.assert_array_equal(read_image(path, page=2), pages[2])
    with pytest.raises(ImageError, match="3 pages"):
        read_image(path, page=3)
    rgb = np.zeros((20, 30, 3), np.uint16)
    rgb[..., 0] = 40000  # red
    ok, buf = cv2.imencode(".tif", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(buf.tobytes())
    assert out.dtype == np.uint16 and out[..., 0].min() == 40000 and out[..., 1:].max() == 0


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_rgb_tiff(planar: str) -> None:
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 200  # red
    data = tiff_bytes(
        img if planar == "contig" else np.moveaxis(img, -1, 0),
        photometric="rgb",
        planarconfig=planar,
    )
    out = read_image(data)
    assert out.shape == (20, 30, 3)
    assert out[..., 0].min() == 200 and out[..., 1:].max() == 0


@pytest.mark.parametrize("ext", [".png", ".bmp", ".jpg"])
@pytest.mark.parametrize("colour", [False, True])
def test_opencv_formats_grey_and_rgb(tmp_path: Path, ext: str, colour: bool) -> None:
    img = np.zeros((40, 100, 3), np.uint8)
    img[:, :50] = (220, 30, 30)  # red half, in RGB
    img = img if colour else img[..., 0]
    path = tmp_path / f"x{ext}"
    path.write_bytes(encode(img, ext))
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == img.shape
    tol = 12 if ext == ".jpg" else 0
    assert np.abs(out.astype(int) - img.astype(int))[5:-5, 5:45].max() <= tol
    if colour:
        assert out[20, 10, 0] > 200 and out[20, 10, 2] < 50  # RGB, not OpenCV's BGR


def test_png_16bit_and_rgba(tmp_path: Path) -> None:
    img16 = (np.arange(50 * 70).reshape(50, 70) * 17).astype(np.uint16)
    out = read_image(encode(img16, ".png"))
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, img16)
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 2] = 255  # blue
    rgba[..., 3] = 128
    out = read_image(encode(rgba, ".png"))
    assert out.shape == (10, 20, 3) and out[..., 2].min() == 255 and out[..., :2].max() == 0


def test_format_comes_from_content_not_extension(tmp_path: Path, lab_image: np.ndarray) -> None:
    path = tmp_path / "really_a_png.tif"
    path.write_bytes(encode(lab_image, ".png"))
    np.testing.assert_array_equal(read_image(path), lab_image)


def test_bytes_input_matches_path(lab_tiff: Path) -> None:
    np.testing.assert_array_equal(read_image(lab_tiff.read_bytes()), read_image(lab_tiff))
    np.testing.assert_array_equal(
        read_image(bytearray(lab_tiff.read_bytes())), read_image(lab_tiff)
    )


# ---- bad files -------------------------------------------------------------------------------


def _truncate(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _bad_files(lab_image: np.ndarray) -> dict[str, bytes]:
    png = encode(lab_image, ".png")
    jpg = encode((lab_image // 4).astype(np.uint8), ".jpg")
    bmp = encode((lab_image // 4).astype(np.uint8), ".bmp")
    tif = tiff_bytes(lab_image)
    return {
        "empty.tif": b"",
        "text.tif": b"stage,label\nembryo 1, 11-12\n",
        "corrupt.tif": tif[:8] + b"\xff" * 200,
        "truncated.tif": _truncate(tif),
        "corrupt.png": png[:40] + bytes(range(256)) * 4,
        "truncated.png": _truncate(png),
        "truncated.jpg": _truncate(jpg),
        "truncated.bmp": _truncate(bmp),
        "animation.gif": b"GIF89a" + b"\x00" * 100,
    }


@pytest.mark.parametrize("filename", list(_bad_files(np.zeros((2, 2), np.uint16))))
def test_bad_file_raises_image_error_naming_it(
    tmp_path: Path, lab_image: np.ndarray, filename: str
) -> None:
    path = tmp_path / filename
    path.write_bytes(_bad_files(lab_image)[filename])
    with pytest.raises(ImageError) as info:
        read_image(path)
    message = str(info.value)
    assert str(path) in message
    # says what to do
    assert any(word in message for word in ("copy it again", "save it as", "re-export", "re-save"))
    # bytes input is named by `name`
    with pytest.raises(ImageError, match="upload-7"):
        read_image(path.read_bytes(), name="upload-7")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        read_image(tmp_path / "nope.tif")
    with pytest.raises(ImageError, match="not a file"):
        read_image(tmp_path)


def test_image_error_is_a_value_error() -> None:
    assert issubclass(ImageError, ValueError)


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    return png[:16] + struct.pack(">II", width, height) + png[24:]


def test_decompression_bomb_and_zero_size_refused_before_decoding() -> None:
    png = encode(np.zeros((10, 10), np.uint8), ".png")
    with pytest.raises(ImageError, match="40000x40000 pixels is more than the limit"):
        read_image(_patch_png_size(png, 40000, 40000), name="bomb.png")
    with pytest.raises(ImageError, match="zero size"):
        read_image(_patch_png_size(png, 0, 10), name="empty.png")
    with pytest.raises(ImageError, match="limit"):
        read_image(tiff_bytes(np.zeros((100, 100), np.uint8)), max_pixels=5000)
    with pytest.raises(ImageError, match="limit"):
        read_image(encode(np.zeros((100, 100), np.uint8), ".jpg"), max_pixels=5000)
    assert read_image(tiff_bytes(np.zeros((100, 100), np.uint8)), max_pixels=10000).shape == (
        100,
        100,
    )


def test_decoded_size_is_limited_before_decoding_not_only_pixels() -> None:
    # 1000 x 1000 float64 RGB: 1 MP (far under the pixel limit), 23 MiB decoded, a few KB zlib.
    bomb = io.BytesIO()
    tifffile.imwrite(
        bomb, np.zeros((1000, 1000, 3), np.float64), photometric="rgb", compression="zlib"
    )
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(
        ImageError, match=r"23 MiB decoded, more than the limit of 20 MiB.*FLYSTAGE_MAX_DECODED_MB"
    ):
        read_image(bomb.getvalue(), name="bomb.tif", max_decoded_mb=20)
    assert read_image(bomb.getvalue(), max_decoded_mb=24).dtype == np.float32
    # OpenCV formats: bounded by 4 channels of 1 byte, or 2 bytes for a 16-bit PNG.
    png16 = encode(np.zeros((1024, 1024), np.uint16), ".png")
    with pytest.raises(ImageError, match="8 MiB decoded"):
        read_image(png16, max_decoded_mb=7)
    assert read_image(png16, max_decoded_mb=8).shape == (1024, 1024)
    with pytest.raises(ImageError, match="4 MiB decoded"):
        read_image(encode(np.zeros((1024, 1024), np.uint8), ".jpg"), max_decoded_mb=3)


def test_page_beyond_single_page_formats() -> None:
    with pytest.raises(ImageError, match="only one page"):
        read_image(encode(np.zeros((10, 10), np.uint8), ".png"), page=1, name="a.png")
