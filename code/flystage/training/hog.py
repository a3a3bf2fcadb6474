"""The HOG family: histograms of oriented gradients as fixed tensor operations, with a linear
classifier (``hognet``, ``hognet_turn``) or as a linear probe's features.

No weights to learn in the features and no convolutional feature map (Grad-CAM cannot explain
them; occlusion can).
"""

from __future__ import annotations

import torch
from torch import nn


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


class HOGVector(nn.Module):
    """:class:`HOGFeatures` flattened: ``(N, C, H, W)`` -> ``(N, bins * cells)``."""

    def __init__(self):
        super().__init__()
        self.hog = HOGFeatures()
        self.dim = 9 * 8 * 20

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hog(x).flatten(1)


def build_classifier(arch: str, num_classes: int, channels: int, pretrained: bool) -> nn.Module:
    """``hognet``, or ``hognet_turn`` (logits averaged over the 180-degree turn); any channels."""
    return HOGNet(num_classes, turn_invariant=arch == "hognet_turn")


def build_features(arch: str, channels: int, **_probe_options) -> tuple[nn.Module, int]:
    """The HOG features flattened, and their size (no probe option applies)."""
    features = HOGVector()
    return features, features.dim
