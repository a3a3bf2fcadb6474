"""flystage.decoders, called directly as flystage.reading calls them (bytes, or a TIFF's path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flystage.decoders import decode_bmp, decode_jpeg, decode_png, decode_tiff
from flystage.image_checks import ImageError, limits
from imaging_helpers import dim_embryo, encode, tiff_bytes


def test_tiff_from_bytes_and_from_its_path(tmp_path: Path):
    image = dim_embryo(40, 100)
    path = tmp_path / "a.tif"
    path.write_bytes(tiff_bytes(image))
    np.testing.assert_array_equal(decode_tiff(path, 0, "a.tif", limits()), image)
    np.testing.assert_array_equal(decode_tiff(path.read_bytes(), 0, "a.tif", limits()), image)


@pytest.mark.parametrize(
    "decode, ext, kind", [(decode_png, ".png", "PNG"), (decode_bmp, ".bmp", "BMP")]
)
def test_opencv_formats_decode_and_refuse_a_broken_header(decode, ext, kind):
    image = (dim_embryo(40, 100) // 4).astype(np.uint8)
    np.testing.assert_array_equal(decode(encode(image, ext), 0, "x", limits()), image)
    with pytest.raises(ImageError, match=f"up: the {kind} header is corrupt or truncated"):
        decode(encode(image, ext)[:14], 0, "up", limits())


def test_jpeg_size_from_its_frame_header_before_decoding():
    data = encode(np.zeros((30, 70), np.uint8), ".jpg")
    assert decode_jpeg(data, 0, "x", limits()).shape == (30, 70)
    with pytest.raises(ImageError, match="70x30 pixels is more than the limit"):
        decode_jpeg(data, 0, "x", limits(max_pixels=2000))
    with pytest.raises(ImageError, match="no end marker"):
        decode_jpeg(data[:-2], 0, "x", limits())
