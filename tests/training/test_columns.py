"""probe_columns: each stage pooled over bands along the embryo's long axis, on real BDGP
images: the bands average what the global pool averages, a pattern's place along the embryo
changes them, the ONNX graph pools as torch does, and the artefact reloads with its bands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flystage.artefact import INPUT_NAME, OUTPUT_NAME, open_session
from flystage.training.backbones import LiteFeatures
from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache, to_float
from flystage.training.ensemble import train_model
from flystage.training.export import load_torch_model, save_artefact
from flystage.training.gradcam import gradcam
from flystage.training.models import build_feature_extractor
from serving_helpers import bdgp_records

torch.set_num_threads(1)


def _real_images(bdgp_root) -> torch.Tensor:
    train, _ = bdgp_records(bdgp_root, train_per_stage=1, valid_per_stage=0)
    return to_float(ImageCache(TrainConfig().preprocess).get([r.path for r in train]))


def test_bands_split_the_global_pool_and_see_where_a_pattern_lies(bdgp_root) -> None:
    x = _real_images(bdgp_root)[:3]
    one, dim1 = build_feature_extractor("efficientnet_lite2", 1)
    three, dim3 = build_feature_extractor("efficientnet_lite2", 1, columns=3)
    assert dim3 == 3 * dim1 == 3 * 840
    with torch.no_grad():
        f1, f3 = one(x), three(x)
    assert f3.shape == (3, dim3)
    # Stage 4's map is 15 wide at 240 px: bands of 5 columns, whose mean is the global mean.
    widths = [24, 48, 88, 120, 208, 352]  # Lite2's taps 1-6, in order
    start = sum(widths[:3])
    bands = f3[:, 3 * start : 3 * (start + widths[3])].view(3, widths[3], 3)
    assert torch.allclose(bands.mean(2), f1[:, start : start + widths[3]], atol=1e-5)
    # Mirrored left to right, the end bands change places: each end band of the mirror image
    # is nearer the image's opposite end band than its own.
    with torch.no_grad():
        mirrored = three(torch.flip(x, (3,))).view(3, -1, 3)
    b = f3.view(3, -1, 3)
    assert (mirrored[..., 2] - b[..., 0]).abs().mean() < (mirrored[..., 0] - b[..., 0]).abs().mean()
    assert (mirrored[..., 0] - b[..., 2]).abs().mean() < (mirrored[..., 2] - b[..., 2]).abs().mean()
    # The bands are those of adaptive average pooling.
    maps = torch.randn(2, 5, 4, 8)
    expected = torch.nn.functional.adaptive_avg_pool2d(maps, (1, 3)).flatten(1)
    assert torch.allclose(three._pool(maps), expected, atol=1e-6)


def test_columns_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_columns must be 1..16"):
        TrainConfig(probe_columns=0)
    with pytest.raises(ValueError, match="columns must be >= 1"):
        LiteFeatures("efficientnet_lite0", columns=0, pretrained=False)


def test_a_banded_probe_exports_reloads_and_explains(bdgp_root, tmp_path) -> None:
    train, valid = bdgp_records(bdgp_root, train_per_stage=3, valid_per_stage=1)
    labels = sorted({r.label for r in train}, key=lambda s: int(s.split("-")[0]))
    config = TrainConfig(probe_columns=3, probe_flips="none", threads=1)
    result = train_model(train, valid, config, log=lambda line: None, labels=labels)
    assert result.spec["columns"] == 3
    save_artefact(tmp_path, result.model, config.arch, labels, config.preprocess, spec=result.spec)
    x = _real_images(bdgp_root)
    with torch.no_grad():
        expected = result.model(x).numpy()
    session = open_session(tmp_path, threads=1)
    assert np.abs(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0] - expected).max() < 1e-4
    reloaded = load_torch_model(tmp_path)
    assert reloaded.model.features.columns == 3
    with torch.no_grad():
        assert np.abs(reloaded(x).numpy() - expected).max() < 1e-6
    heat, _, _ = gradcam(reloaded, x[0].numpy(), 0)
    assert heat.shape == x.shape[2:] and np.isfinite(heat).all() and heat.max() > 0
