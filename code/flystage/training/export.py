"""Write the model artefact from a torch model, and read its torch weights back.

:func:`save_artefact` exports ``model.onnx`` (checked against torch on random inputs),
``weights.pt`` and ``metadata.json`` into a model directory, all three or none;
:func:`load_torch_model` rebuilds the torch model of ``weights.pt``. Reading the artefact
without torch (what predicting and serving do) is :mod:`flystage.artefact`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flystage import __version__
from flystage.artefact import (
    FORMAT_VERSION,
    INPUT_NAME,
    INT8_FILE,
    METADATA_FILE,
    ONNX_FILE,
    OPSET,
    OUTPUT_NAME,
    WEIGHTS_FILE,
    ArtefactError,
    Metadata,
    model_input_shape,
    open_session,
    short_repr,
)
from flystage.files import atomic_path
from flystage.imaging import PreprocessConfig
from flystage.training.models import build_from_spec


def _json_safe(metrics: dict[str, Any] | None) -> dict[str, Any]:
    # numpy scalars from training loops are not JSON serialisable; fail here, not at load.
    return json.loads(
        json.dumps(metrics or {}, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )


def save_artefact(
    model_dir: str | Path,
    model: Any,
    arch: str,
    labels: Sequence[str],
    preprocess_config: PreprocessConfig,
    metrics: dict[str, Any] | None = None,
    manifest_sha256: str | None = None,
    *,
    extra: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    opset: int = OPSET,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> Metadata:
    """Write ``model.onnx``, ``weights.pt`` and ``metadata.json`` into ``model_dir``.

    ``model`` is a torch ``nn.Module`` taking float32 ``(N, C, H, W)`` in [0, 1] and returning
    logits ``(N, len(labels))``. The ONNX export is run by onnxruntime on random inputs of a
    batch size other than the export's, and must match torch within
    ``atol + rtol * max|logits|``; otherwise ``ArtefactError`` is raised and nothing is left
    in ``model_dir``. Other files in ``model_dir`` are left alone.
    """

    spec = spec or {"arch": arch, "mode": "full"}  # what load_torch_model rebuilds
    labels = [str(label) for label in labels]
    if not labels or len(set(labels)) != len(labels):
        raise ArtefactError(f"labels {labels}: need a non-empty list of distinct labels")
    c, h, w = model_input_shape(preprocess_config)
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        # A temporary file for each, all moved into place when the block ends without an
        # error (none otherwise). The stack moves the last entered first, so the metadata,
        # entered first, moves last: a reader never sees new metadata next to an old model.
        with ExitStack() as stack:
            metadata_tmp, weights_tmp, onnx_tmp = (
                stack.enter_context(atomic_path(model_dir / name))
                for name in (METADATA_FILE, WEIGHTS_FILE, ONNX_FILE)
            )
            with torch.no_grad():
                out = model(torch.zeros(1, c, h, w))
            if tuple(out.shape) != (1, len(labels)):
                raise ArtefactError(
                    f"the model returns shape {tuple(out.shape)} for one image but there are "
                    f"{len(labels)} labels"
                )
            export_onnx(model, onnx_tmp, (c, h, w), opset)
            max_diff = _check_onnx_matches_torch(model, onnx_tmp, (c, h, w), atol, rtol)
            torch.save(
                {
                    "arch": arch,
                    "labels": labels,
                    "channels": c,
                    "spec": spec,
                    "state_dict": model.state_dict(),
                },
                weights_tmp,
            )
            metadata = _new_metadata(
                arch,
                labels,
                preprocess_config,
                metrics,
                manifest_sha256,
                extra={**(extra or {}), "model": spec},
                onnx={"onnx_opset": opset, "onnx_max_abs_diff": max_diff},
            )
            metadata_tmp.write_text(
                json.dumps(metadata.to_dict(), indent=2) + "\n", encoding="utf-8"
            )
            # An int8 graph quantised from the model being replaced must not outlive it.
            (model_dir / INT8_FILE).unlink(missing_ok=True)
    finally:
        model.train(was_training)
    return metadata


def with_static_padding(model: Any, chw: tuple[int, int, int]) -> Any:
    """``model``, or a copy whose TF-"same" convolutions pad by constants for input ``chw``.

    timm's ``Conv2dSame`` (the stride-2 layers of the tf_ EfficientNets) works out its padding
    from the input size on every call; exported, that is shape arithmetic and a separate Pad
    per layer (about 10 % of the float model's time, and float islands in an int8 graph). An
    artefact's input size is fixed, so each such layer becomes a zero pad by the amounts it
    computes for that size plus an unpadded convolution, which onnxruntime fuses into one
    padded convolution. A layer seen at more than one size keeps its dynamic padding.
    """
    import copy

    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    sizes: dict[str, set[tuple[int, int]]] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _, inputs, name=name: sizes.setdefault(name, set()).add(
                tuple(inputs[0].shape[-2:])
            )
        )
        for name, module in model.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    if not hooks:
        return model
    try:
        with torch.no_grad():
            model(torch.zeros(1, *chw))
    finally:
        for hook in hooks:
            hook.remove()
    static = copy.deepcopy(model)
    for name, seen in sizes.items():
        if len(seen) != 1:
            continue
        (height, width), same = next(iter(seen)), static.get_submodule(name)
        pad_h, pad_w = (
            get_same_padding(size, k, s, d)
            for size, k, s, d in zip((height, width), same.kernel_size, same.stride, same.dilation)
        )
        conv = torch.nn.Conv2d(
            same.in_channels,
            same.out_channels,
            same.kernel_size,
            same.stride,
            0,
            same.dilation,
            same.groups,
            same.bias is not None,
        )
        conv.load_state_dict(same.state_dict())
        pad = torch.nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        parent, _, child = name.rpartition(".")
        setattr(static.get_submodule(parent), child, torch.nn.Sequential(pad, conv))
    return static.eval()


def export_onnx(
    model: Any,
    path: Path,
    chw: tuple[int, int, int],
    opset: int = OPSET,
    static_padding: bool = True,
) -> None:
    """``model`` exported to ``path`` by torch's TorchScript exporter, the batch axis dynamic
    (``static_padding``: :func:`with_static_padding` first; off only to measure what it buys)."""
    if static_padding:
        model = with_static_padding(model, chw)
    with warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (dynamo=False: no onnxscript
        # dependency, proven on these models); its deprecation notice is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        # The flips' reversed Slice (step -1) is not folded into a constant, nor should it be:
        # it reverses the input at run time. With static padding the exporter tries, and says so.
        warnings.filterwarnings(
            "ignore", message="Constant folding - Only steps=1", category=UserWarning
        )
        torch.onnx.export(
            model,
            (torch.rand(1, *chw),),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def _new_metadata(
    arch: str,
    labels: list[str],
    preprocess_config: PreprocessConfig,
    metrics: dict[str, Any] | None,
    manifest_sha256: str | None,
    extra: dict[str, Any],
    onnx: dict[str, Any],
) -> Metadata:
    """The metadata of a model being saved now: ``extra`` (made JSON-safe), then the export's
    facts (input and output names, ``onnx`` opset and difference, the torch version)."""
    return Metadata(
        format_version=FORMAT_VERSION,
        flystage_version=__version__,
        arch=arch,
        labels=labels,
        preprocess=preprocess_config,
        input_shape=model_input_shape(preprocess_config),
        metrics=_json_safe(metrics),
        manifest_sha256=manifest_sha256,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra={
            **_json_safe(extra),
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            **onnx,
            "torch_version": torch.__version__,
        },
    )


def _check_onnx_matches_torch(
    model: Any, onnx_path: Path, chw: tuple[int, int, int], atol: float, rtol: float
) -> float:
    generator = torch.Generator().manual_seed(0)
    batch = torch.rand(3, *chw, generator=generator)  # batch 3: proves the batch axis is dynamic
    with torch.no_grad():
        expected = model(batch).numpy()
    session = open_session(onnx_path.parent, threads=1, graph=onnx_path.name)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    if got.shape != expected.shape:
        raise ArtefactError(f"ONNX export returns shape {got.shape}, torch {expected.shape}")
    max_diff = float(np.max(np.abs(got - expected)))
    tolerance = atol + rtol * float(np.max(np.abs(expected)))
    if not max_diff <= tolerance:
        raise ArtefactError(
            f"ONNX export disagrees with torch: max |difference| {max_diff:.3g} > {tolerance:.3g}; "
            "the model uses an operation the exporter does not translate faithfully"
        )
    return max_diff


def load_torch_model(model_dir: str | Path):
    """The torch model of ``weights.pt`` rebuilt from its spec
    (``flystage.training.models.build_from_spec``), in eval mode.

    Anything but the dict ``save_artefact`` writes (a list, no state dict, bad labels,
    channels or spec, tensors that do not fit the spec) raises ``ArtefactError`` naming the file.
    """
    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ArtefactError(f"{path}: not found; this model directory has no torch weights")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtefactError(
            f"{path}: cannot read the torch weights ({exc}); re-export the model"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state_dict"), dict):
        raise ArtefactError(
            f"{path}: expected a dict with 'arch', 'labels', 'channels', 'spec' and "
            "'state_dict', found "
            f"{type(saved).__name__}"
            f"{'' if not isinstance(saved, dict) else ' without a state_dict'}; "
            "re-export the model"
        )
    labels, channels = saved.get("labels"), saved.get("channels")
    if (
        not isinstance(labels, list)
        or len(labels) < 2
        or not all(isinstance(label, str) for label in labels)
    ):
        raise ArtefactError(
            f"{path}: 'labels' must be a list of at least two strings, not {short_repr(labels)}; "
            "re-export the model"
        )
    if type(channels) is not int or channels not in (1, 3):
        raise ArtefactError(
            f"{path}: 'channels' must be 1 or 3, not {short_repr(channels)}; re-export the model"
        )
    spec = saved.get("spec")
    if spec is None:
        spec = {"arch": saved.get("arch"), "mode": "full"}
    if not _valid_spec(spec):
        raise ArtefactError(f"{path}: bad model 'spec' {short_repr(spec)}; re-export the model")
    try:
        model = build_from_spec(spec, num_classes=len(labels), channels=channels)
        model.load_state_dict(saved["state_dict"])
    except Exception as exc:  # unknown arch, tensors of the wrong shape, missing keys
        raise ArtefactError(
            f"{path}: cannot rebuild the model from its spec and state dict ({exc}); re-export "
            "the model"
        ) from None
    return model.eval()


def _valid_spec(spec: Any, depth: int = 0) -> bool:
    """The shape ``build_from_spec`` expects: an arch string, or a list of member specs."""
    if not isinstance(spec, dict) or depth > 2:
        return False
    temperature = spec.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float))
    ):
        return False
    if "members" in spec:
        members = spec["members"]
        return (
            isinstance(members, list)
            and bool(members)
            and all(_valid_spec(m, depth + 1) for m in members)
        )
    return isinstance(spec.get("arch"), str) and isinstance(spec.get("mode", "full"), str)
