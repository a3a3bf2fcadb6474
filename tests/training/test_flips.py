"""probe_flips: the probe's features averaged over flips of the image, on real BDGP images: the
features and the trained model's probabilities do not change when the image is flipped, the
ONNX graph does the averaging as torch does, the artefact reloads with its flips, and Grad-CAM
maps every flipped copy back onto the image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flystage.artefact import INPUT_NAME, METADATA_FILE, OUTPUT_NAME, open_session
from flystage.training.backbones import LiteFeatures
from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache, to_float
from flystage.training.ensemble import train_model
from flystage.training.export import load_torch_model, save_artefact
from flystage.training.gradcam import GradCam, gradcam, target_layer
from flystage.training.models import (
    PROBE_FLIPS,
    FlipAverage,
    build_feature_extractor,
    build_from_spec,
)
from serving_helpers import bdgp_records

torch.set_num_threads(1)
FLIPS = ((3,), (2,), (2, 3))  # left-right, up-down, the 180-degree turn


def _real_images(bdgp_root, per_stage: int = 1) -> torch.Tensor:
    """Preprocessed real BDGP images ``(N, 1, 96, 240)`` in [0, 1], as the default model sees
    them (one per stage range by default)."""
    train, _ = bdgp_records(bdgp_root, train_per_stage=per_stage, valid_per_stage=0)
    return to_float(ImageCache(TrainConfig().preprocess).get([r.path for r in train]))


@pytest.mark.parametrize("flips", list(PROBE_FLIPS))
def test_features_are_invariant_to_exactly_their_flips(bdgp_root, flips: str) -> None:
    x = _real_images(bdgp_root)[:3]
    features, dim = build_feature_extractor("efficientnet_lite2", 1, flips=flips)
    assert isinstance(features, FlipAverage) == (flips != "none")
    with torch.no_grad():
        plain = features(x)
        assert plain.shape == (3, dim)
        for dims in FLIPS:
            diff = (features(torch.flip(x, dims)) - plain).abs().max().item()
            if dims in PROBE_FLIPS[flips]:
                assert diff < 1e-5, (flips, dims, diff)
            else:  # embryos are not symmetric: a flip outside the set changes the features
                assert diff > 1e-2, (flips, dims, diff)


def test_an_unknown_flips_value_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="probe_flips 'sideways': choose one of none, turn, all"):
        TrainConfig(probe_flips="sideways")
    with pytest.raises(ValueError, match="choose one of none, turn, all"):
        build_feature_extractor("hognet", 1, flips="sideways")
    # A spec saved before probe_flips existed rebuilds without flips.
    old = build_from_spec({"arch": "efficientnet_lite2", "mode": "probe"}, 6, 1)
    assert isinstance(old.features, LiteFeatures)


@pytest.fixture(scope="module", params=["turn", "all"])
def flip_artefact(request, bdgp_root, tmp_path_factory):
    """(flips, trained model, artefact dir): the default probe with ``probe_flips``, trained on
    3 real images per stage range (calibrated on 1 more each) and saved as ``flystage train``
    saves it."""
    flips = request.param
    train, valid = bdgp_records(bdgp_root, train_per_stage=3, valid_per_stage=1)
    labels = sorted({r.label for r in train}, key=lambda s: int(s.split("-")[0]))
    config = TrainConfig(probe_flips=flips, threads=1)
    result = train_model(train, valid, config, log=lambda line: None, labels=labels)
    assert result.spec["flips"] == flips
    model_dir = tmp_path_factory.mktemp(f"flips-{flips}")
    save_artefact(model_dir, result.model, config.arch, labels, config.preprocess, spec=result.spec)
    return flips, result.model, model_dir


def test_trained_model_gives_an_image_and_its_flips_the_same_probabilities_in_onnx(
    flip_artefact, bdgp_root
) -> None:
    flips, model, model_dir = flip_artefact
    x = _real_images(bdgp_root, per_stage=2)
    session = open_session(model_dir, threads=1)

    def onnx_probs(images: torch.Tensor) -> np.ndarray:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
        return torch.softmax(torch.from_numpy(logits), 1).numpy()

    with torch.no_grad():
        torch_logits = model(x).numpy()
    assert np.abs(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0] - torch_logits).max() < (
        1e-4
    )
    probs = onnx_probs(x)
    assert probs.max(1).min() < 0.99  # not saturated: equal probabilities are a real check
    for dims in FLIPS:
        diff = np.abs(onnx_probs(torch.flip(x, dims)) - probs).max()
        if dims in PROBE_FLIPS[flips]:
            assert diff < 1e-5, (flips, dims, diff)
        else:
            assert diff > 1e-3, (flips, dims, diff)
    # The mirror image (left-right) is one of "all"'s flips.
    assert flips != "all" or np.abs(onnx_probs(torch.flip(x, (3,))) - probs).max() < 1e-5


def test_the_artefact_reloads_with_its_flips(flip_artefact, bdgp_root) -> None:
    flips, model, model_dir = flip_artefact
    reloaded = load_torch_model(model_dir)
    features = reloaded.model.features  # Calibrated(ProbeNet)
    assert isinstance(features, FlipAverage) and features.flips == flips
    assert isinstance(features.features, LiteFeatures)
    metadata = json.loads((model_dir / METADATA_FILE).read_text(encoding="utf-8"))
    assert metadata["model"]["flips"] == flips
    x = _real_images(bdgp_root)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model(x), atol=1e-6)


def test_gradcam_maps_every_flipped_copy_back_onto_the_image(flip_artefact, bdgp_root) -> None:
    flips, _, model_dir = flip_artefact
    explain = GradCam(model_dir)
    assert target_layer(explain.model) is explain.model.model.features.features.blocks[-1]
    image = _real_images(bdgp_root)[2].numpy()
    heat, cls, _ = gradcam(explain.model, image)
    assert heat.std() > 0.01
    # The model is invariant to its flips, so the map of a flipped image is the flipped map;
    # a map read off the unflipped copy alone would not be.
    for dims in PROBE_FLIPS[flips][1:]:
        flipped = np.ascontiguousarray(np.flip(image, [d - 1 for d in dims]))  # (C, H, W)
        heat_of_flipped, cls_of_flipped, _ = gradcam(explain.model, flipped)
        assert cls_of_flipped == cls
        expected = np.flip(heat, [d - 2 for d in dims])
        assert np.abs(heat_of_flipped - expected).max() < 1e-3, (flips, dims)
