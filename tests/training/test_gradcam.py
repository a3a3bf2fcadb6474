"""Grad-CAM on the torch weights: the default probe model saved and reloaded as an artefact, its
map where the embryo is; the target layer of each model kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flystage.imaging import PreprocessConfig
from flystage.training.export import save_artefact
from flystage.training.gradcam import GradCam, GradCamUnavailable, gradcam, target_layer
from flystage.training.models import Calibrated, EnsembleNet, build_feature_extractor, build_model
from flystage.training.probe import ProbeNet, extract, fit_logistic, standardise

torch.set_num_threads(1)
H, W = 64, 160


def left_embryo(striped: bool, seed: int) -> np.ndarray:
    """A bright ellipse in the left half of a dark image (stripes or not: the two classes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    inside = ((yy - H / 2) / (H * 0.35)) ** 2 + ((xx - W / 4) / (W * 0.2)) ** 2 <= 1
    texture = 0.5 + 0.4 * np.sin(xx / 2.0) if striped else np.full((H, W), 0.7)
    img = 0.05 + 0.02 * rng.standard_normal((H, W)) + inside * texture
    return np.clip(img, 0, 1).astype(np.float32)[None]


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
    """A linear probe on pretrained EfficientNet-Lite0 taps, its head fitted on 8 images, saved."""
    features, dim = build_feature_extractor("efficientnet_lite0", 1, (2, 4), pretrained=True)
    images = np.stack([left_embryo(i % 2 == 1, i) for i in range(8)])
    x = extract(features, images)
    y = torch.tensor([i % 2 for i in range(8)])
    model = ProbeNet(features, dim, 2)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    weight, bias = fit_logistic(standardise(x)[0], y, 2, l2=1.0)
    with torch.no_grad():
        model.mean.copy_(mean)
        model.std.copy_(std)
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    model_dir = tmp_path_factory.mktemp("probe")
    spec = {"arch": "efficientnet_lite0", "mode": "probe", "taps": [2, 4]}
    config = PreprocessConfig(height=H, width=W, channels=1)
    save_artefact(
        model_dir, model.eval(), "efficientnet_lite0", ["plain", "striped"], config, spec=spec
    )
    return model_dir


def test_probe_map_is_the_input_size_in_0_1_and_on_the_embryo(probe_dir) -> None:
    explain = GradCam(probe_dir)
    # The deepest tap the head sees: the last kept block stage (taps 2, 4 -> blocks[4]).
    assert target_layer(explain.model) is explain.model.features.blocks[-1]
    assert len(explain.model.features.blocks) == 5
    image = left_embryo(True, 99)
    heat, cls, probs = gradcam(explain.model, image)
    assert heat.shape == (H, W) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert heat.std() > 0.01  # not constant
    assert cls == int(probs.argmax()) and probs.sum() == pytest.approx(1.0, abs=1e-5)
    left = heat[:, : W // 2].sum() / heat.sum()
    assert left > 0.6, f"only {left:.2f} of the map on the embryo's half"
    # A requested class is explained too (another map).
    other = gradcam(explain.model, image, target=1 - cls)[0]
    assert other.shape == (H, W) and not np.allclose(other, heat)
    assert np.array_equal(explain(image), heat)


def test_wrappers_and_models_without_a_conv_map() -> None:
    small = build_model("small_cnn", 3, 1).eval()
    image = np.random.default_rng(0).random((1, 40, 104), dtype=np.float32)
    plain = gradcam(small, image)[0]
    # A temperature scales every gradient alike: the same map.
    assert np.allclose(gradcam(Calibrated(small, 2.0), image)[0], plain, atol=1e-5)
    # An ensemble: one map per member summed; a HOG member is skipped.
    mixed = Calibrated(EnsembleNet([small, build_model("hognet", 3, 1).eval()]), 1.5)
    heat = gradcam(mixed, image)[0]
    assert heat.shape == (40, 104) and 0 <= heat.min() and heat.max() <= 1
    with pytest.raises(GradCamUnavailable, match="HOG"):
        gradcam(build_model("hognet", 3, 1).eval(), image)
