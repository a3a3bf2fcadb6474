"""The backbone-family table: every arch belongs to one family, which says how it is built,
probed, fine-tuned, explained and pretrained. Adding a family is one :func:`register` call.

Torch-free: the tuners resolve the training mode where torch may be absent
(:mod:`flystage.training.kinds`), so the built-in families name their torch hooks as
``"module:function"`` strings imported on first call (:func:`lazy`; :func:`hooks_of` for a
family module that names them as :data:`HOOK_FUNCTIONS` does). The hooks' contracts:

- ``build(arch, num_classes, channels, pretrained)``: the classifier, ``(N, channels, H, W)``
  float32 in [0, 1] -> logits ``(N, num_classes)``, any height and width. Its input
  normalisation (ImageNet mean and std, or [-1, 1] for EfficientNet-Lite) lives inside it,
  so the table has none.
- ``features(arch, channels, *, taps, pretrained, columns)``: ``(extractor, D)``, an
  extractor ``(N, channels, H, W)`` -> ``(N, D)`` for the linear probe (``taps`` and
  ``columns`` are the probe options; a family ignores those it has not).
- ``freeze(classifier, stages)``: the modules of a classifier ``build`` made that stay frozen
  when fine-tuning: the stem and the first ``stages`` stages.
- ``cam_layer(module)``: the feature-map module Grad-CAM reads in a classifier or extractor
  the family built.
- ``weights(arch)``: the file its ImageNet weights are read from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What the ``mode`` option may ask of a family (``auto`` resolves to one of them).
TRAINED_MODES: tuple[str, ...] = ("full", "probe", "finetune")


def lazy(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` as a function that imports it on first call, so the table
    names torch code without importing torch."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = call.__name__ = target
    return call


# A family module's hooks under their conventional function names.
HOOK_FUNCTIONS = {
    "build": "build_classifier",
    "features": "build_features",
    "freeze": "stages_to_freeze",
    "cam_layer": "cam_layer",
}


def hooks_of(module: str, *hooks: str) -> dict[str, Callable[..., Any]]:
    """``hooks`` (keys of :data:`HOOK_FUNCTIONS`) of the family module ``module``, imported on
    first call: keyword arguments for :class:`BackboneFamily`."""
    return {hook: lazy(f"{module}:{HOOK_FUNCTIONS[hook]}") for hook in hooks}


@dataclass(frozen=True)
class BackboneFamily:
    """One row of the table (hooks: the module docstring). ``None`` for a hook: the family has
    no such thing (no probe features, no fine-tuning, no convolutional map, no pretrained
    weights)."""

    name: str
    title: str  # what messages call its models ("HOG networks")
    archs: tuple[str, ...]
    build: Callable[..., Any]
    features: Callable[..., tuple[Any, int]] | None = None
    freeze: Callable[[Any, int], list[Any]] | None = None
    cam_layer: Callable[[Any], Any] | None = None
    weights: Callable[[str], Any] | None = None
    # What ``mode=auto`` trains, without and with ``pretrained=true``.
    auto_mode: str = "full"
    auto_mode_pretrained: str | None = None  # None: as auto_mode
    columns: bool = False  # its probe features pool bands along the width (probe_columns)

    def __post_init__(self) -> None:
        for mode in (self.auto_mode, self.auto_mode_pretrained or self.auto_mode):
            if mode not in self.modes:
                raise ValueError(f"family {self.name}: auto mode {mode!r} is not one of its modes")

    @property
    def pretrained(self) -> bool:
        """Whether it has ImageNet weights to start from."""
        return self.weights is not None

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes it can train: full always, probe with features, finetune with stages to
        freeze."""
        hooks = {"full": self.build, "probe": self.features, "finetune": self.freeze}
        return tuple(mode for mode in TRAINED_MODES if hooks[mode] is not None)

    def auto(self, pretrained: bool) -> str:
        """The mode ``auto`` resolves to."""
        return (self.auto_mode_pretrained or self.auto_mode) if pretrained else self.auto_mode


_FAMILIES: dict[str, BackboneFamily] = {}


def register(family: BackboneFamily) -> BackboneFamily:
    """Add ``family`` to the table; its name and archs must be new."""
    taken = [a for a in family.archs if a in archs()]
    if family.name in _FAMILIES or taken or not family.archs:
        raise ValueError(
            f"family {family.name}: its name or archs {taken or family.archs} are taken or empty"
        )
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove the family ``name`` (tests that register a toy one)."""
    del _FAMILIES[name]


def families() -> tuple[BackboneFamily, ...]:
    """Every family, in the order registered."""
    return tuple(_FAMILIES.values())


def archs() -> tuple[str, ...]:
    """Every arch, family by family in the order registered (the ``arch`` option's choices)."""
    return tuple(arch for family in _FAMILIES.values() for arch in family.archs)


def archs_for(mode: str) -> tuple[str, ...]:
    """The archs whose family can train ``mode``."""
    return tuple(a for f in _FAMILIES.values() if mode in f.modes for a in f.archs)


def family_of(arch: str) -> BackboneFamily:
    """The family of ``arch``; ``ValueError`` naming the choices if there is none."""
    for family in _FAMILIES.values():
        if arch in family.archs:
            return family
    raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(archs())}")


# The built-in families, in the order of the arch option's choices.
HOG = register(
    BackboneFamily(
        "hog",
        # Fixed oriented-gradient features and a linear classifier: the best held-out-by-gene
        # accuracy on BDGP when no pretrained weights are available (docs/accuracy.md).
        # hognet_turn also averages over the 180-degree turn, for sets where the head may point
        # either way (it cost accuracy on BDGP, whose embryos all face left).
        "HOG networks",
        ("hognet", "hognet_turn"),
        **hooks_of("flystage.training.hog", "build", "features"),
    )
)
LITE = register(
    BackboneFamily(
        "efficientnet_lite",
        "EfficientNet-Lites",
        ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
        **hooks_of("flystage.training.lite", "build", "features", "freeze", "cam_layer"),
        # From pip packages (flystage.training.backbones), so always at hand: probed by default.
        weights=lazy("flystage.training.backbones:weights_path"),
        auto_mode="probe",
        columns=True,
    )
)
TORCHVISION = register(
    BackboneFamily(
        "torchvision",
        "torchvision networks",
        (
            "resnet18",
            "resnet34",
            "resnet50",
            "mobilenet_v3_small",
            "mobilenet_v3_large",
            "efficientnet_b0",
        ),
        **hooks_of(
            "flystage.training.torchvision_nets", "build", "features", "freeze", "cam_layer"
        ),
        # From the torch hub cache, fetched once: trained from scratch unless pretrained=true.
        weights=lazy("flystage.training.torchvision_nets:weights_cache_path"),
        auto_mode_pretrained="probe",
    )
)
SMALL_CNN = register(
    BackboneFamily(
        "small_cnn",
        "small CNNs",
        ("small_cnn",),
        **hooks_of("flystage.training.small_cnn", "build", "cam_layer"),
    )
)
