"""The small-CNN family: VGG-like networks trained from scratch, for small data sets.

No pretrained weights, so no probe and no fine-tuning: mode full only.
"""

from __future__ import annotations

import torch
from torch import nn

from flystage.training.models import StageNet

# arch -> channel widths of its stages.
WIDTHS: dict[str, tuple[int, ...]] = {
    "small_cnn": (32, 64, 128, 256),
}


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


def build_classifier(arch: str, num_classes: int, channels: int, pretrained: bool) -> nn.Module:
    """:class:`SmallCNN` with ``arch``'s widths, behind ImageNet normalisation
    (:class:`StageNet`)."""
    return StageNet(SmallCNN(channels, num_classes, WIDTHS[arch]), channels)


def cam_layer(model: StageNet) -> nn.Module:
    """The last conv-BN-ReLU."""
    return model.backbone.features[-1]
