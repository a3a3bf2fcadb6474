"""flystage.image_checks: the limits every decoder checks before decoding."""

from __future__ import annotations

import pytest

from flystage import image_checks
from flystage.image_checks import ImageError, Limits, check_size, limits


def test_limits_default_to_the_module_settings_read_at_the_call(monkeypatch):
    assert limits() == Limits(image_checks.MAX_PIXELS, image_checks.MAX_DECODED_MB * 2**20)
    monkeypatch.setattr(image_checks, "MAX_PIXELS", 10)
    assert limits().pixels == 10
    assert limits(max_pixels=7, max_decoded_mb=2) == Limits(7, 2 * 2**20)


def test_check_size_names_the_file_and_the_setting_to_raise():
    limit = Limits(pixels=100, decoded_bytes=1000)
    check_size(10, 10, "a.png", limit, decoded_bytes=1000)  # at the limits: fine
    with pytest.raises(ImageError, match=r"a\.png: 11x10 pixels .*FLYSTAGE_MAX_PIXELS"):
        check_size(10, 11, "a.png", limit)
    with pytest.raises(ImageError, match=r"b\.tif: .*FLYSTAGE_MAX_DECODED_MB"):
        check_size(10, 10, "b.tif", limit, decoded_bytes=1001)
    with pytest.raises(ImageError, match="zero size"):
        check_size(0, 10, "c.bmp", limit)
    assert issubclass(ImageError, ValueError)
