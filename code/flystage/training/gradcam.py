"""Grad-CAM for the review page's "what the model looked at", on the torch weights.

Grad-CAM (Selvaraju et al. 2017) weights the channels of a convolutional feature map by the mean
gradient of the class score over space and keeps the positive part of their sum: a coarse map
of where the evidence for that class lies. One forward and one backward pass per image, so it is
much cheaper than occlusion (:mod:`flystage.review.occlusion`, which needs only the ONNX model
and serves every artefact); it needs ``weights.pt`` and torch, hence its place on the torch side.

Which feature map, per model kind (:func:`target_layers`):

- linear probe (:class:`~flystage.training.probe.ProbeNet`, the default model) on an
  EfficientNet-Lite (:class:`~flystage.training.backbones.LiteFeatures`): the head sees the
  spatial means of several block stages (the ``taps``) concatenated. Their feature maps have
  different resolutions, and every shallower tap also flows into the deeper ones, so the map
  is taken at the deepest one the head sees: the output of the last kept block stage
  (``blocks[-1]``, i.e. ``max(taps)``), or the head conv (``bn2``) when the probe pools it.
  Its gradient carries only what the head reads from that tap (the shallower taps' own
  contributions to the score are not in this map: a choice of one readable map over a blend
  of resolutions). A probe that also appends HOG features explains its CNN part only; a
  torchvision probe uses the backbone's last stage, as below. A probe whose features are
  averaged over flips of the image (``probe_flips``: ``FlipAverage``) runs every flipped copy
  through that layer: each copy's map is flipped back onto the image and the maps are summed,
  so the map of a mirrored image is the mirrored map.
- a classifier or a probe's features: its backbone family's ``cam_layer``
  (:mod:`flystage.training.families`). Fine-tuned EfficientNet-Lite (``LiteNet``): the head
  conv after its BN and activation (``net.bn2``); torchvision ResNets: ``layer4``;
  MobileNet-V3 / EfficientNet-B0: the last block of ``features``; ``small_cnn``: its last
  conv-BN-ReLU. A module no family built: its last Conv2d.
- calibrated (``Calibrated``): the wrapped model. Dividing logits by a positive temperature
  scales every gradient alike, so the normalised map is the same.
- ensemble (``EnsembleNet``): one map per member, all from the gradient of the ensemble's own
  output (the log of the mean probability) for the class, summed after upsampling to the input
  size, then the positive part is kept: each member counts as much as its evidence moves the
  ensemble's answer. Members the rule above cannot map are skipped (at least one must map).
- HOG networks (``hognet``, ``hognet_turn``, a HOG-only probe) have no convolutional feature
  map (their family has no ``cam_layer``): :class:`GradCamUnavailable`; occlusion still
  explains them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flystage.errors import FlystageError
from flystage.training.families import family_of
from flystage.training.models import Calibrated, ConcatFeatures, EnsembleNet, FlipAverage, arch_of
from flystage.training.probe import ProbeNet


class GradCamUnavailable(FlystageError, ValueError):
    """This model has no convolutional feature map to explain (HOG features)."""


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, Calibrated):
        model = model.model
    return model


def _last_conv(model: nn.Module) -> nn.Module:
    found = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            found = module
    if found is None:
        raise GradCamUnavailable(
            f"{type(model).__name__} has no convolutional layer for Grad-CAM; use occlusion"
        )
    return found


def _family_layer(module: nn.Module) -> nn.Module:
    """The feature map of a classifier or extractor a backbone family built (its ``cam_layer``);
    of a module built otherwise, its last Conv2d."""
    arch = arch_of(module)
    if arch is None:
        return _last_conv(module)
    family = family_of(arch)
    if family.cam_layer is None:
        raise GradCamUnavailable(
            f"{family.title} ({arch}) have no convolutional feature map for Grad-CAM; use occlusion"
        )
    return family.cam_layer(module)


def _feature_layer(features: nn.Module) -> nn.Module:
    """The deepest convolutional feature map a probe's head sees (module docstring)."""
    if isinstance(features, FlipAverage):
        return _feature_layer(features.features)
    if isinstance(features, ConcatFeatures):  # the first part with a map (not appended HOG)
        reasons = []
        for part in features.parts:
            try:
                return _feature_layer(part)
            except GradCamUnavailable as exc:
                reasons.append(str(exc))
        raise GradCamUnavailable("; ".join(reasons))
    return _family_layer(features)


def target_layer(model: nn.Module) -> nn.Module:
    """The feature-map module Grad-CAM reads for one (non-ensemble) model."""
    model = _unwrap(model)
    if isinstance(model, ProbeNet):
        return _feature_layer(model.features)
    return _family_layer(model)


def _flips(model: nn.Module) -> tuple[tuple[int, ...], ...]:
    """The flips (``torch.flip`` dims) whose copies of the input one model's target layer sees,
    in the order of the layer's batch rows."""
    model = _unwrap(model)
    if isinstance(model, ProbeNet) and isinstance(model.features, FlipAverage):
        return model.features.dims
    return ((),)


def _targets(model: nn.Module) -> list[tuple[nn.Module, tuple[tuple[int, ...], ...]]]:
    """(feature-map module, its flips) per member that can be mapped (one for a single model)."""
    model = _unwrap(model)
    if not isinstance(model, EnsembleNet):
        return [(target_layer(model), _flips(model))]
    targets, reasons = [], []
    for member in model.members:
        try:
            targets.append((target_layer(member), _flips(member)))
        except GradCamUnavailable as exc:
            reasons.append(str(exc))
    if not targets:
        raise GradCamUnavailable(f"no ensemble member can be mapped: {'; '.join(reasons)}")
    return targets


def target_layers(model: nn.Module) -> list[nn.Module]:
    """One feature-map module per member (one for a single model); see the module docstring."""
    return [layer for layer, _ in _targets(model)]


def gradcam(
    model: nn.Module, array: np.ndarray, target: int | None = None
) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM of one model input ``array`` float32 ``(C, H, W)`` in [0, 1] (as
    :func:`flystage.imaging.load` makes it) for class ``target`` (default: the predicted one).

    Returns the map ``(H, W)`` float32 in [0, 1] (its maximum is 1 unless no positive evidence
    was found, then all zeros), the class it explains, and the model's probabilities.
    """
    targets = _targets(model)
    layers = [layer for layer, _ in targets]
    maps: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, k=k: maps.__setitem__(k, out))
        for k, layer in enumerate(layers)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # Gradients flow to the activations through the input (a frozen backbone's
            # parameters need none).
            x = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None].requires_grad_(True)
            out = model(x)
            probs = torch.softmax(out.detach(), dim=1)[0].numpy()
            cls = int(probs.argmax()) if target is None else int(target)
            if not 0 <= cls < out.shape[1]:
                raise ValueError(f"class {cls} is not one of the model's {out.shape[1]} classes")
            acts = [maps[k] for k in range(len(layers))]
            grads = torch.autograd.grad(out[0, cls], acts, allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    h, w = array.shape[1:]
    total = torch.zeros(h, w)
    for act, grad, (_, flips) in zip(acts, grads, targets):
        if grad is None:
            continue
        # One batch row per flipped copy of the one image (a single row without flips).
        for row, dims in enumerate(flips):
            weights = grad[row].mean(dim=(1, 2))  # (channels,)
            cam = (weights[:, None, None] * act[row].detach()).sum(0)
            up = nn.functional.interpolate(
                cam[None, None], size=(h, w), mode="bilinear", align_corners=False
            )[0, 0]
            # The copy's map flipped back onto the image: (N, C, H, W) dims -> (H, W) dims.
            total += torch.flip(up, [d - 2 for d in dims]) if dims else up
    heat = total.clamp_min(0).numpy().astype(np.float32)
    peak = float(heat.max())
    return (heat / peak if peak > 0 else heat), cls, probs


class GradCam:
    """The torch model of one artefact (``weights.pt``), loaded once, explained one image at a
    time (a lock: hooks and autograd are per call, the model is shared by the server's threads)."""

    def __init__(self, model_dir: str | Path, threads: int = 1):
        from flystage.training.export import load_torch_model

        torch.set_num_threads(max(1, threads))
        self.model = load_torch_model(model_dir)
        target_layers(self.model)  # a model that cannot be mapped fails here, clearly
        self._lock = threading.Lock()

    def __call__(self, array: np.ndarray, target: int | None = None) -> np.ndarray:
        with self._lock:
            return gradcam(self.model, array, target)[0]
