"""The backbone-family table: the built-in families keep the rules they had, and a toy family
registered here alone (no other module edited) is configured, trained by the training program,
exported, predicted with, explained by Grad-CAM and fine-tuned like the built-in ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flystage.training import families, kinds
from flystage.training.families import BackboneFamily, family_of, register, unregister

torch.set_num_threads(1)


class ToyNet(nn.Module):
    """Two strided convs, pooled, and a linear head: ``(N, C, H, W)`` -> logits ``(N, K)``."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 4, 3, stride=2, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stage(self.stem(x))))


class ToyFeatures(nn.Module):
    """ToyNet without its head: ``(N, C, H, W)`` -> ``(N, 8)``."""

    def __init__(self, channels: int):
        super().__init__()
        net = ToyNet(channels, 2)
        self.stem, self.stage, self.pool = net.stem, net.stage, net.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage(self.stem(x)))


def toy_features(arch: str, channels: int, **_probe_options) -> tuple[nn.Module, int]:
    return ToyFeatures(channels), 8


TOY = BackboneFamily(
    "toy",
    "toy networks",
    ("toy",),
    build=lambda arch, num_classes, channels, pretrained: ToyNet(channels, num_classes),
    features=toy_features,
    freeze=lambda model, stages: [model.stem, model.stage][: 1 + stages],
    cam_layer=lambda module: module.stage,
)


@pytest.fixture
def toy():
    """The toy family, registered for one test and removed after it."""
    register(TOY)
    try:
        yield TOY
    finally:
        unregister(TOY.name)


def test_the_built_in_families_keep_their_modes_and_archs() -> None:
    from flystage.training.backbones import LITE_WEIGHTS
    from flystage.training.small_cnn import WIDTHS
    from flystage.training.torchvision_nets import BUILDERS

    assert families.archs()[:2] == ("hognet", "hognet_turn")
    assert families.LITE.archs == tuple(LITE_WEIGHTS)
    assert families.TORCHVISION.archs == tuple(BUILDERS)
    assert families.SMALL_CNN.archs == tuple(WIDTHS)
    # The rule mode=auto had before the table: probe the EfficientNet-Lites and pretrained
    # torchvision archs, train the rest in full.
    for arch in families.archs():
        for pretrained in (False, True):
            probed = arch in families.LITE.archs or (pretrained and family_of(arch).pretrained)
            expected = "probe" if probed else "full"
            assert kinds.mode_of("auto", arch, pretrained) == expected, (arch, pretrained)
    assert kinds.mode_of("auto", "no_such_arch", True) == "full"  # the tuner's fallback
    assert families.HOG.modes == ("full", "probe")
    assert families.SMALL_CNN.modes == ("full",)
    assert families.LITE.modes == families.TORCHVISION.modes == ("full", "probe", "finetune")
    assert not families.HOG.pretrained and families.LITE.pretrained


def test_the_weights_hook_says_where_the_weights_are(tmp_path, monkeypatch) -> None:
    from flystage.training.backbones import weights_path
    from flystage.training.torchvision_nets import weights_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert families.TORCHVISION.weights("resnet18") == weights_cache_path("resnet18")
    assert str(families.TORCHVISION.weights("resnet18")).startswith(str(tmp_path))
    assert families.LITE.weights("efficientnet_lite0") == weights_path("efficientnet_lite0")


def test_register_refuses_a_taken_name_or_arch_and_unregister_restores(toy) -> None:
    assert "toy" in families.archs() and family_of("toy") is toy
    with pytest.raises(ValueError, match="taken"):
        register(toy)
    with pytest.raises(ValueError, match="taken"):
        register(BackboneFamily("other", "others", ("resnet18",), build=toy.build))
    with pytest.raises(ValueError, match="auto mode 'probe'"):
        BackboneFamily("bad", "bad ones", ("bad",), build=toy.build, auto_mode="probe")
    unregister("toy")
    try:
        assert "toy" not in families.archs()
        with pytest.raises(ValueError, match="unknown arch 'toy'.*small_cnn"):
            family_of("toy")
    finally:
        register(toy)  # the fixture removes it again


def test_the_config_takes_the_toy_arch_and_its_modes(toy) -> None:
    from flystage.training.config import TrainConfig

    config = TrainConfig(arch="toy")
    assert config.mode_of() == "full"  # the family's auto mode
    assert config.model_spec()["mode"] == "full"
    assert TrainConfig(arch="toy", mode="probe").model_spec() == {
        "arch": "toy",
        "mode": "probe",
        "taps": list(config.feature_taps),
        "hog": False,
        "flips": "turn",  # no "columns": the toy features have no bands
    }
    TrainConfig(arch="toy", mode="finetune")
    # The torch-free tuner resolves the same mode.
    assert kinds.training_kind({"arch": "toy"}) == kinds.GRADIENT
    assert kinds.training_kind({"arch": "toy", "mode": "probe"}) == kinds.EXACT_PROBE
    with pytest.raises(ValueError, match="mode finetune needs archs whose family trains it"):
        TrainConfig(ensemble_archs=("toy", "small_cnn"), mode="finetune")


def test_freeze_backbone_freezes_the_toy_stem_and_stages(toy) -> None:
    from flystage.training.models import build_model, freeze_backbone

    model = build_model("toy", 3, 1)
    backbone, head = freeze_backbone(model, 0)
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert {id(p) for p in backbone} == {id(p) for p in model.stage.parameters()}
    assert {id(p) for p in head} == {id(p) for p in model.head.parameters()}
    model = build_model("toy", 3, 1)
    backbone, _ = freeze_backbone(model, 1)
    assert backbone == [] and all(not p.requires_grad for p in model.stage.parameters())


def test_a_family_without_a_hook_refuses_what_it_cannot_do(toy) -> None:
    from flystage.training.models import build_feature_extractor, build_model, freeze_backbone

    with pytest.raises(ValueError, match="has no pretrained weights"):
        build_model("toy", 3, 1, pretrained=True)
    with pytest.raises(ValueError, match="no pretrained features"):
        build_feature_extractor("small_cnn", 1)
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        freeze_backbone(build_model("small_cnn", 3, 1), 1)


def test_a_toy_probe_is_explained_at_its_family_layer(toy) -> None:
    from flystage.training.gradcam import gradcam, target_layer
    from flystage.training.models import build_feature_extractor
    from flystage.training.probe import ProbeNet

    features, dim = build_feature_extractor("toy", 1, hog=True, flips="turn")
    model = ProbeNet(features, dim, 3).eval()
    # Through the flips and past the appended HOG part to the toy features' layer.
    assert target_layer(model) is features.features.parts[0].stage
    heat = gradcam(model, np.random.default_rng(0).random((1, 32, 80), dtype=np.float32))[0]
    assert heat.shape == (32, 80)


@pytest.mark.slow
def test_the_training_program_trains_exports_predicts_and_explains_a_toy_arch(
    toy, tmp_path: Path
) -> None:
    from flystage.predictor import Predictor
    from flystage.training.gradcam import GradCam, target_layer
    from flystage.training.train import main
    from train_helpers import LABELS, TINY_ARGS, make_manifest_set, make_tree

    manifest = make_manifest_set(tmp_path / "data", train_per_class=4, valid_per_class=2)
    model_dir = tmp_path / "model"
    args = [a if a != "small_cnn" else "toy" for a in TINY_ARGS]
    code = main(
        ["--manifest", str(manifest), "--model_dir", str(model_dir), "--epochs", "2", *args]
    )
    assert code == 0 and (model_dir / "model.onnx").is_file()

    images = make_tree(tmp_path / "unseen", per_class=1, seed=1)
    predictor = Predictor(model_dir, threads=1)
    predictions = predictor.predict_sources(images)
    assert [p.error for p in predictions] == [None] * len(images)
    assert all(p.top[0][0] in LABELS for p in predictions)

    explain = GradCam(model_dir)  # weights.pt rebuilt through the family table
    layer = target_layer(explain.model)
    assert isinstance(layer, nn.Sequential) and isinstance(layer[0], nn.Conv2d)
    array = predictor.prepare(images[0], images[0].name)
    assert explain(array).shape == array.shape[1:]
