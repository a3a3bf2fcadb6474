"""The torchvision family: ResNets, MobileNet-V3s and EfficientNet-B0 from torchvision.

ImageNet weights come through torchvision's own weights API (``weights="DEFAULT"``): they are
downloaded into the torch hub cache (``$TORCH_HOME``, default ``~/.cache/torch``) once, at
image build time for the train image
(``python -m flystage.training.torchvision_nets --download resnet18``), so that jobs run with
network isolation.
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

from flystage.training.backbones import WeightsUnavailableError
from flystage.training.families import TORCHVISION
from flystage.training.models import StageNet, last_linear

# arch -> torchvision builder; the builder's weights enum comes from torchvision itself.
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    name: getattr(tvm, name) for name in TORCHVISION.archs
}

# A download that cannot reach its host must fail, not hang a training job.
DOWNLOAD_TIMEOUT_S = 60.0


def _weights_enum(arch: str):
    return tvm.get_model_weights(BUILDERS[arch]).DEFAULT


def weights_cache_path(arch: str) -> Path:
    """Where torch hub keeps ``arch``'s ImageNet weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    url = _weights_enum(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def load_pretrained(arch: str) -> nn.Module:
    weights = _weights_enum(arch)
    cached = weights_cache_path(arch)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return BUILDERS[arch](weights=weights)
    except Exception as exc:  # any failure to fetch or read: one clear message
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not in the torch hub cache ({cached}) and could "
            f"not be downloaded from {weights.url} ({type(exc).__name__}: {exc}). Fetch them "
            "where a network is reachable (python -m flystage.training.torchvision_nets --download "
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


def _backbone(arch: str, channels: int, pretrained: bool) -> nn.Module:
    backbone = load_pretrained(arch) if pretrained else BUILDERS[arch](weights=None)
    _set_input_channels(backbone, channels)
    return backbone


def build_classifier(arch: str, num_classes: int, channels: int, pretrained: bool) -> nn.Module:
    """The torchvision network with a new ``num_classes`` head, behind ImageNet normalisation;
    a grey first conv sums the RGB kernels; BatchNorm frozen when pretrained."""
    backbone = _backbone(arch, channels, pretrained)
    parent, attr, head = last_linear(backbone)
    setattr(parent, attr, nn.Linear(head.in_features, num_classes))
    return StageNet(backbone, channels, frozen_bn=pretrained)


def build_features(
    arch: str, channels: int, *, pretrained: bool, **_probe_options
) -> tuple[nn.Module, int]:
    """The pooled last stage (the head's input) and its size."""
    backbone = _backbone(arch, channels, pretrained)
    parent, attr, head = last_linear(backbone)
    setattr(parent, attr, nn.Identity())
    return StageNet(backbone, channels), head.in_features


def stages_to_freeze(model: StageNet, stages: int) -> list[nn.Module]:
    """The stem and the first ``stages`` stages. Its children are not stages (resnet: conv1, bn1,
    relu, maxpool, layer1..; mobilenet_v3, efficientnet_b0: features, avgpool, classifier,
    whose first child is the stem)."""
    net = model.backbone
    if hasattr(net, "features"):
        return list(net.features)[: 1 + stages]
    return [net.conv1, net.bn1, *[getattr(net, f"layer{i}") for i in range(1, 5)][:stages]]


def cam_layer(model: StageNet) -> nn.Module:
    """The last stage: ``layer4`` of a ResNet, the last block of ``features`` otherwise."""
    net = model.backbone
    return net.layer4 if hasattr(net, "layer4") else net.features[-1]


def main(argv: list[str] | None = None) -> int:
    """``python -m flystage.training.torchvision_nets --download ARCH ...``: fill the torch hub
    cache (image builds)."""
    parser = argparse.ArgumentParser(
        prog="python -m flystage.training.torchvision_nets", description=main.__doc__
    )
    parser.add_argument(
        "--download",
        nargs="+",
        choices=list(BUILDERS),
        metavar="ARCH",
        required=True,
        help=f"archs whose ImageNet weights to fetch: {', '.join(BUILDERS)}",
    )
    args = parser.parse_args(argv)
    for arch in args.download:
        load_pretrained(arch)
        print(f"{arch}: {weights_cache_path(arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
