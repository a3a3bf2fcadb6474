"""flystage.sagemaker without Docker: importable without the SDK, one source for metrics and
ranges, image URIs from the settings, and the predictor's serializer and deserializer on the
serve image's real answer format."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flystage import jobdef
from flystage import sagemaker as fs
from flystage.cloud.settings import Settings
from flystage.serving.codec import encode_response


def test_importing_needs_no_sdk() -> None:
    code = (
        "import sys; sys.modules['sagemaker'] = None\n"  # any `import sagemaker` now fails
        "from flystage import sagemaker as fs\n"
        "assert not fs.sdk_available()\n"
        "assert set(fs.hyperparameter_ranges()) == {'probe_l2', 'probe_columns'}\n"
        "try:\n    fs.FlystagePredictor\nexcept ImportError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'flystage[sdk]'" in done.stdout


def test_metrics_come_from_the_job_definition() -> None:
    assert (
        fs.METRIC_DEFINITIONS is jobdef.METRIC_DEFINITIONS and fs.OBJECTIVE_METRIC == "valid:top3"
    )


def test_the_default_model_is_tuned_by_its_probe_prior_and_bands() -> None:
    # The default (an exactly solved probe) has no learning rate or batches to tune.
    plain = fs.hyperparameter_ranges(as_sdk=False)
    assert plain == fs.hyperparameter_ranges(as_sdk=False, static={"epochs": "30"})
    assert plain == {
        "probe_l2": {
            "Name": "probe_l2",
            "MinValue": "0.01",
            "MaxValue": "10",
            "ScalingType": "Logarithmic",
        },
        "probe_columns": {"Name": "probe_columns", "Values": ["1", "3"]},
    }


@pytest.mark.parametrize(
    "static", [{"probe_solver": "sgd"}, {"mode": "finetune"}, {"arch": "small_cnn"}]
)
def test_gradient_modes_are_tuned_by_learning_rate_and_batch_size(static: dict) -> None:
    plain = fs.hyperparameter_ranges(as_sdk=False, static=static)
    assert plain["learning_rate"] == {
        "Name": "learning_rate",
        "MinValue": "0.001",
        "MaxValue": "0.1",
        "ScalingType": "Logarithmic",
    }
    assert set(plain) == {"learning_rate", "batch_size"}
    assert plain["batch_size"]["Values"] == ["32", "64", "128", "256"]


@pytest.mark.parametrize("static", [None, {"probe_solver": "sgd"}])
def test_ranges_as_sdk_objects(static: dict | None) -> None:
    """The SDK objects give CreateHyperParameterTuningJob exactly make tune's ranges."""
    pytest.importorskip("sagemaker")
    from sagemaker.tuner import CategoricalParameter, ContinuousParameter, IntegerParameter

    kinds = {
        ContinuousParameter: "ContinuousParameterRanges",
        IntegerParameter: "IntegerParameterRanges",
        CategoricalParameter: "CategoricalParameterRanges",
    }
    request: dict[str, list] = {kind: [] for kind in kinds.values()}
    for name, r in fs.hyperparameter_ranges(static=static).items():
        request[kinds[type(r)]].append(r.as_tuning_range(name))
    assert request == jobdef.tuning_ranges(static)


def test_image_uris_from_the_settings() -> None:
    settings = Settings(
        train_image="t:1", serve_image="s:1", registry_override="localhost:5000", image_tag="v2"
    )
    assert fs.image_uris(settings, local=True) == ("t:1", "s:1")
    assert fs.image_uris(settings) == (
        "localhost:5000/flystage-train:v2",
        "localhost:5000/flystage-serve:v2",
    )


def test_folder_hyperparameters() -> None:
    assert fs.folder_hyperparameters(group_regex=fs.GENE_GROUP, epochs=2) == {
        "group_regex": r"^(?P<group>[^/]+)/",
        "epochs": 2,
    }


def test_serializer_and_deserializer(tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    image = tmp_path / "e.png"
    image.write_bytes(png)
    serializer = fs.ImageSerializer()
    assert (
        serializer.serialize(png)
        == serializer.serialize(image)
        == serializer.serialize(str(image))
        == png
    )
    assert (
        fs.content_type(png) == "image/png"
        and fs.content_type(b"II*\0" + b"\0" * 12) == "image/tiff"
    )
    with pytest.raises(TypeError, match="expected image bytes"):
        serializer.serialize(3)
    top = [
        {"stage": "9-10", "probability": 0.7},
        {"stage": "7-8", "probability": 0.2},
        {"stage": "11-12", "probability": 0.1},
    ]
    body = encode_response(
        [{"file": "request body", "top": top, "error": None}], {"labels": []}, {"total": 1.0}
    )
    assert fs.TopKDeserializer().deserialize(io.BytesIO(body.encode()), "application/json") == [
        ("9-10", 0.7),
        ("7-8", 0.2),
        ("11-12", 0.1),
    ]
    with pytest.raises(ValueError, match="unsupported"):
        fs.TopKDeserializer().deserialize(
            io.BytesIO(json.dumps({"error": "unsupported image", "status": 415}).encode())
        )
