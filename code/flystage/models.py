"""Stage classifiers: torchvision backbones, a small CNN and a HOG network behind one constructor.

Every model takes ``(N, C, H, W)`` float32 in [0, 1], any height and width (non-square:
embryos are about 2.6:1), with C = 1 (grey) or 3 (RGB), and returns logits
``(N, num_classes)``. Normalisation lives inside the model, so the ONNX export and the
serving code feed the preprocessed image as is.

ImageNet weights come through torchvision's own weights API (``weights="DEFAULT"``): they are
downloaded into the torch hub cache (``$TORCH_HOME``, default ``~/.cache/torch``) once, at
image build time for the train image (``python -m flystage.models --download resnet18``), so
that jobs run with network isolation.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# arch -> torchvision builder; the builder's weights enum comes from torchvision itself.
TORCHVISION_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "mobilenet_v3_small": tvm.mobilenet_v3_small,
    "mobilenet_v3_large": tvm.mobilenet_v3_large,
    "efficientnet_b0": tvm.efficientnet_b0,
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
ARCHS: tuple[str, ...] = tuple(HOG_ARCHS) + tuple(TORCHVISION_ARCHS) + tuple(SMALL_CNN_WIDTHS)

# A download that cannot reach its host must fail, not hang a training job.
DOWNLOAD_TIMEOUT_S = 60.0


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights are neither in the torch hub cache nor downloadable."""


class StageNet(nn.Module):
    """Normalise a [0, 1] image, then run the backbone: ``(N, C, H, W)`` -> logits ``(N, K)``."""

    def __init__(self, backbone: nn.Module, channels: int):
        super().__init__()
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

    def __init__(self, channels: int, num_classes: int, widths: tuple[int, ...], dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for width in widths:
            layers += [_conv_bn_relu(cin, width, 2), _conv_bn_relu(width, width, 1)]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

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
        local = nn.functional.avg_pool2d((hist * hist).sum(1, keepdim=True), 3, 1, 1, count_include_pad=False)
        return hist / (local.sqrt() + 1e-3)


class HOGNet(nn.Module):
    """HOG features, standardised (batch norm), dropout and a linear classifier.

    With ``turn_invariant`` the logits are averaged over the image and its 180-degree turn,
    for images whose embryos may face either way.
    """

    def __init__(self, num_classes: int, bins: int = 9, cells: tuple[int, int] = (8, 20), dropout: float = 0.5,
                 turn_invariant: bool = False):
        super().__init__()
        self.turn_invariant = turn_invariant
        self.features = HOGFeatures(bins, cells)
        size = bins * cells[0] * cells[1]
        self.classifier = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(size), nn.Dropout(dropout),
                                        nn.Linear(size, num_classes))

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
            f"ImageNet weights for {arch} are not in the torch hub cache ({cached}) and could not "
            f"be downloaded from {weights.url} ({type(exc).__name__}: {exc}). Fetch them where a "
            f"network is reachable (python -m flystage.models --download {arch}, e.g. at image "
            f"build time) and set TORCH_HOME to that cache, or train with pretrained=false."
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
        channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None,
    )
    with torch.no_grad():
        if channels == 1:
            # A grey image is R = G = B, so summing the RGB kernels keeps pretrained responses.
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, attr, new)


def build_model(arch: str, num_classes: int, channels: int, pretrained: bool = False) -> nn.Module:
    """A classifier ``(N, channels, H, W)`` float32 in [0, 1] -> logits ``(N, num_classes)``.

    ``arch`` is one of ``ARCHS``; ``pretrained`` loads torchvision's ImageNet weights (not for
    ``small_cnn``) and raises ``WeightsUnavailableError`` if they cannot be had.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), not {channels}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if pretrained and arch not in TORCHVISION_ARCHS:
        raise ValueError(f"{arch} has no pretrained weights: train it with pretrained=false")
    if arch in HOG_ARCHS:
        return HOGNet(num_classes, turn_invariant=arch == "hognet_turn")
    if arch in SMALL_CNN_WIDTHS:
        return StageNet(SmallCNN(channels, num_classes, SMALL_CNN_WIDTHS[arch]), channels)
    backbone = _load_pretrained(arch) if pretrained else TORCHVISION_ARCHS[arch](weights=None)
    _set_input_channels(backbone, channels)
    parent, attr, head = _last_linear(backbone)
    setattr(parent, attr, nn.Linear(head.in_features, num_classes))
    return StageNet(backbone, channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    """``python -m flystage.models --download ARCH ...``: fill the torch hub cache (image builds)."""
    parser = argparse.ArgumentParser(prog="python -m flystage.models", description=main.__doc__)
    parser.add_argument("--download", nargs="+", choices=list(TORCHVISION_ARCHS), metavar="ARCH",
                        required=True, help=f"archs whose ImageNet weights to fetch: {', '.join(TORCHVISION_ARCHS)}")
    args = parser.parse_args(argv)
    for arch in args.download:
        _load_pretrained(arch)
        print(f"{arch}: {weights_cache_path(arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
