"""The ONNX export: TF-"same" padding becomes constants for the artefact's fixed input size."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import torch

from flystage.artefact import ONNX_FILE, load_metadata
from flystage.training.config import TrainConfig
from flystage.training.export import save_artefact, with_static_padding
from flystage.training.models import build_from_spec

LABELS = ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"]


def test_default_model_exports_without_pad_or_shape_arithmetic(tmp_path):
    config = TrainConfig()
    spec = config.architecture()
    torch.manual_seed(0)
    model = build_from_spec(spec, len(LABELS), config.preprocess.channels).eval()
    metadata = save_artefact(tmp_path, model, config.arch, LABELS, config.preprocess, spec=spec)
    ops = [node.op_type for node in onnx.load(tmp_path / ONNX_FILE).graph.node]
    # Before: Shape/Ceil arithmetic and a Pad for each of Lite2's five stride-2 layers.
    assert "Ceil" not in ops and ops.count("Pad") == 5
    # Constant pads: onnxruntime folds every one into its convolution.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(tmp_path / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    optimised = [node.op_type for node in onnx.load(tmp_path / "optimised.onnx").graph.node]
    assert "Pad" not in optimised
    # save_artefact checked the graph against the unchanged torch model (dynamic padding).
    assert load_metadata(tmp_path).extra["onnx_max_abs_diff"] < 1e-3
    assert metadata.arch == config.arch


def test_static_padding_matches_dynamic_and_leaves_the_model_alone():
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv2dSame(1, 4, 3, stride=2), torch.nn.ReLU()).eval()
    x = torch.rand(2, 1, 37, 50)  # odd sizes: the TF padding is asymmetric
    static = with_static_padding(model, (1, 37, 50))
    assert isinstance(model[0], Conv2dSame), "the original model must not change"
    assert not any(isinstance(m, Conv2dSame) for m in static.modules())
    with torch.no_grad():
        assert torch.allclose(static(x), model(x), atol=1e-6)


def test_a_layer_seen_at_two_sizes_keeps_its_dynamic_padding():
    from timm.layers import Conv2dSame

    class TwoSizes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = Conv2dSame(1, 2, 3, stride=2)

        def forward(self, x):
            return self.conv(x).mean((2, 3)) + self.conv(x[:, :, :, :-3]).mean((2, 3))

    model = TwoSizes().eval()
    static = with_static_padding(model, (1, 20, 31))
    assert isinstance(static.conv, Conv2dSame)
    x = torch.rand(1, 1, 20, 31)
    with torch.no_grad():
        assert torch.allclose(static(x), model(x))


def test_models_without_same_padding_are_returned_as_they_are():
    model = torch.nn.Conv2d(1, 2, 3)
    assert with_static_padding(model, (1, 8, 8)) is model
