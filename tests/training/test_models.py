"""Every arch builds and runs on grey and RGB non-square input; pretrained loading is honest."""

from __future__ import annotations

import pytest
import torch

from flystage.training.backbones import WeightsUnavailableError
from flystage.training.families import archs
from flystage.training.models import build_model, count_parameters
from flystage.training.torchvision_nets import BUILDERS, weights_cache_path

ARCHS = archs()

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_non_square(arch: str, channels: int) -> None:
    model = build_model(arch, num_classes=6, channels=channels).eval()
    x = torch.rand(2, channels, 40, 104)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 6)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # The two images differ, so must their logits (the input reaches the head). In train mode:
    # untrained eval-mode BatchNorm (unit running variance) can shrink activations to ~1e-8.
    model.train()
    logits = model(x)
    assert not torch.allclose(logits[0], logits[1])
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_required_archs_present_and_sizes_distinct() -> None:
    required = {
        "resnet18",
        "resnet34",
        "resnet50",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_b0",
    }
    assert required <= set(ARCHS)
    # The two HOG networks share their weights' shapes (one only averages over the turn).
    counts = {
        arch: count_parameters(build_model(arch, 6, 3)) for arch in ARCHS if arch != "hognet_turn"
    }
    assert len(set(counts.values())) == len(counts), counts
    assert (
        counts["mobilenet_v3_small"] < counts["resnet18"] < counts["resnet34"] < counts["resnet50"]
    )


def test_normalisation_inside_model() -> None:
    model = build_model("resnet18", 4, 3)
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    grey = build_model("resnet18", 4, 1)
    assert grey.mean.shape == (1, 1, 1, 1)
    # The buffers belong to the state dict, so the artefact and its ONNX export carry them.
    assert {"mean", "std"} <= set(grey.state_dict())


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown arch 'resnet7'.*resnet18"):
        build_model("resnet7", 6, 3)
    with pytest.raises(ValueError, match="channels must be 1"):
        build_model("resnet18", 6, 2)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("small_cnn", 6, 3, pretrained=True)


def test_pretrained_unavailable_fails_fast_and_clearly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet18", 6, 1, pretrained=True)
    message = str(info.value)
    assert str(weights_cache_path("resnet18")) in message
    assert "pretrained=false" in message and "--download resnet18" in message


def test_pretrained_from_hub_cache_grey_sums_rgb_kernels(tmp_path, monkeypatch) -> None:
    """With the weights file in the torch hub cache (as baked into the train image) no network
    is needed; a grey model's first conv is the sum of the RGB kernels."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = BUILDERS["resnet18"](weights=None)
    path = weights_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    grey = build_model("resnet18", 6, 1, pretrained=True)
    expected = reference.conv1.weight.sum(dim=1, keepdim=True)
    assert torch.equal(grey.backbone.conv1.weight, expected)
    assert torch.equal(grey.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert grey.backbone.fc.out_features == 6
    rgb = build_model("resnet18", 6, 3, pretrained=True)
    assert torch.equal(rgb.backbone.conv1.weight, reference.conv1.weight)


def test_hognet_turn_is_invariant_to_the_180_degree_turn_and_hognet_is_not() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 160)
    x[:, :, :, :40] = 0  # an asymmetric image
    turned = torch.flip(x, dims=(2, 3))
    invariant = build_model("hognet_turn", 6, 1).eval()
    plain = build_model("hognet", 6, 1).eval()
    plain.load_state_dict(invariant.state_dict())
    with torch.no_grad():
        assert torch.allclose(invariant(x), invariant(turned), atol=1e-5)
        assert not torch.allclose(plain(x), plain(turned), atol=1e-5)


@pytest.mark.parametrize(
    "arch, stem, first_stages, unfrozen",
    [
        (
            "resnet18",
            ["backbone.conv1", "backbone.bn1"],
            ["backbone.layer1", "backbone.layer2"],
            "backbone.layer3",
        ),
        (
            "mobilenet_v3_small",
            ["backbone.features.0"],
            ["backbone.features.1", "backbone.features.2"],
            "backbone.features.3",
        ),
        (
            "efficientnet_b0",
            ["backbone.features.0"],
            ["backbone.features.1", "backbone.features.2"],
            "backbone.features.3",
        ),
        (
            "efficientnet_lite0",
            ["net.conv_stem", "net.bn1"],
            ["net.blocks.0", "net.blocks.1"],
            "net.blocks.2",
        ),
    ],
)
def test_freeze_backbone_freezes_the_stem_and_first_stages_never_the_head(
    arch, stem, first_stages, unfrozen
) -> None:
    from flystage.training.models import freeze_backbone

    model = build_model(arch, 6, 1)
    backbone, head = freeze_backbone(model, 2)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    for prefix in stem + first_stages:
        owned = [name for name, _ in model.named_parameters() if name.startswith(prefix + ".")]
        assert owned and set(owned) <= frozen, prefix
    assert not any(name.startswith(unfrozen + ".") for name in frozen)
    assert head and all(p.requires_grad for p in head) and len(head) == 2  # the new Linear
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in backbone} | {id(p) for p in head} == trainable
    assert not {id(p) for p in backbone} & {id(p) for p in head}
    # freeze_stages 0: the stem only.
    model = build_model(arch, 6, 1)
    freeze_backbone(model, 0)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(any(name.startswith(prefix + ".") for prefix in stem) for name in frozen)
