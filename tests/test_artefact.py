"""artefact: a real torch -> ONNX export, checked by onnxruntime; broken artefacts fail clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from artefact_helpers import LABELS, make_artefact, tiny_config, tiny_model
from flystage import __version__
from flystage.artefact import ArtefactError, check_artefact, load_metadata
from flystage.imaging import PreprocessConfig
from flystage.training.export import load_torch_model, save_artefact

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model_dir = tmp_path_factory.mktemp("artefact") / "model"
    model, _ = make_artefact(model_dir)
    return model_dir, model


def test_save_writes_the_three_files_and_metadata(artefact):
    model_dir, _ = artefact
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "metadata.json",
        "model.onnx",
        "weights.pt",
    ]
    raw = json.loads((model_dir / "metadata.json").read_text())
    assert raw["format_version"] == 1 and raw["flystage_version"] == __version__
    assert raw["arch"] == "tiny" and raw["labels"] == LABELS
    assert raw["preprocess"] == tiny_config().to_dict()
    assert raw["input_shape"] == [1, 32, 80]
    assert raw["metrics"] == {"valid_top3": 0.5} and raw["manifest_sha256"] == "0" * 64
    assert raw["created"].endswith("+00:00")
    assert raw["model"] == {"arch": "tiny", "mode": "full"}  # what load_torch_model rebuilds
    md = load_metadata(model_dir)
    assert md.labels == LABELS and md.preprocess == tiny_config() and md.input_shape == (1, 32, 80)
    assert md.extra["onnx_max_abs_diff"] < 1e-4


def test_onnx_matches_torch_at_any_batch_size(artefact):
    model_dir, model = artefact
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for n in (1, 5):
        x = np.random.default_rng(n).random((n, 1, 32, 80), dtype=np.float32)
        got = session.run(["logits"], {"image": x})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (n, len(LABELS))
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    assert check_artefact(model_dir).labels == LABELS


def test_weights_rebuild_the_same_model(tmp_path: Path):
    from flystage.training.models import build_model

    model = build_model("small_cnn", num_classes=3, channels=1).eval()
    config = PreprocessConfig(height=32, width=80, channels=1)
    save_artefact(tmp_path, model, "small_cnn", ["a", "b", "c"], config, {}, None)
    again = load_torch_model(tmp_path)
    x = torch.rand(2, 1, 32, 80)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


class BatchBlind(torch.nn.Module):
    """Correct in torch, wrong in ONNX: the tracer freezes Python's int(batch size) to 1."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x):
        return self.inner(x) * float(x.shape[0])


def test_export_that_disagrees_with_torch_is_refused(tmp_path: Path):
    with (
        pytest.warns(torch.jit.TracerWarning),
        pytest.raises(ArtefactError, match="disagrees with torch"),
    ):
        save_artefact(tmp_path, BatchBlind(), "tiny", LABELS, tiny_config())
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_model_and_labels_must_agree(tmp_path: Path):
    with pytest.raises(ArtefactError, match="returns shape \\(1, 4\\) .* 3 labels"):
        save_artefact(tmp_path, tiny_model(), "tiny", LABELS[:3], tiny_config())
    with pytest.raises(ArtefactError, match="distinct"):
        save_artefact(tmp_path, tiny_model(), "tiny", ["a", "a", "b", "c"], tiny_config())


def test_saving_keeps_the_model_in_its_mode(tmp_path: Path):
    model = tiny_model().train()
    save_artefact(tmp_path, model, "tiny", LABELS, tiny_config())
    assert model.training


def broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def edit_metadata(**changes):
    def edit(d: Path):
        raw = json.loads((d / "metadata.json").read_text())
        raw.update(changes)
        (d / "metadata.json").write_text(json.dumps(raw))

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: (d / "model.onnx").unlink(), "missing model.onnx"),
        (lambda d: (d / "metadata.json").unlink(), "missing metadata.json"),
        (lambda d: (d / "metadata.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "metadata.json").write_text("[1, 2]"), "expected a JSON object"),
        (edit_metadata(labels=[]), "non-empty list of distinct labels"),
        (edit_metadata(format_version=99), "format_version 99"),
        (
            edit_metadata(preprocess={"height": 32, "width": 80, "colour": "blue"}),
            "bad 'preprocess'",
        ),
        (edit_metadata(input_shape=[3, 32, 80]), "does not match the preprocess"),
        # Tampered fields: each one an ArtefactError naming the file, never TypeError/KeyError.
        (edit_metadata(input_shape=5), "'input_shape' must be a list of three integers"),
        (edit_metadata(input_shape=[1, 32]), "'input_shape' must be a list of three integers"),
        (
            edit_metadata(input_shape=["1", 32, 80]),
            "'input_shape' must be a list of three integers",
        ),
        (edit_metadata(input_shape={"c": 1}), "'input_shape' must be a list of three integers"),
        (edit_metadata(labels="1-3"), "non-empty list of distinct labels"),
        (edit_metadata(labels=[1, 2, 3, 4]), "non-empty list of distinct labels"),
        (edit_metadata(labels=[["a"], ["b"], ["c"], ["d"]]), "non-empty list of distinct labels"),
        (edit_metadata(labels=[{"a": 1}, "b", "c", "d"]), "non-empty list of distinct labels"),
        (edit_metadata(labels=None), "non-empty list of distinct labels"),
        (edit_metadata(preprocess=5), "bad 'preprocess'.*JSON object"),
        (edit_metadata(preprocess=[["height", 32]]), "bad 'preprocess'.*JSON object"),
        (edit_metadata(preprocess="height=32"), "bad 'preprocess'.*JSON object"),
        (edit_metadata(preprocess={"height": "32"}), "bad 'preprocess'"),
        (edit_metadata(preprocess={"height": None}), "bad 'preprocess'"),
        (edit_metadata(preprocess={"low_percentile": "a"}), "bad 'preprocess'"),
        (edit_metadata(format_version="1"), "format_version '1'"),
        (edit_metadata(format_version=[1]), r"format_version \[1\]"),
        (edit_metadata(arch=None), "'arch' must be a non-empty string"),
        (edit_metadata(arch={"x": 1}), "'arch' must be a non-empty string"),
        (edit_metadata(metrics=[1, 2]), "'metrics' must be a JSON object"),
        (edit_metadata(manifest_sha256=5), "'manifest_sha256' must be a string"),
        (edit_metadata(created=5), "'created' must be a string"),
        (lambda d: (d / "metadata.json").write_bytes(b"\xff\xfe{}"), "not valid JSON"),
        (lambda d: (d / "metadata.json").write_text("null"), "expected a JSON object"),
    ],
)
def test_broken_metadata_is_refused(artefact, tmp_path: Path, edit, message: str):
    broken = broken_copy(artefact[0], tmp_path / "broken", edit)
    with pytest.raises(ArtefactError, match=message) as info:
        load_metadata(broken)
    # The message names the file (the directory when a file is missing).
    assert str(broken if message.startswith("missing") else broken / "metadata.json") in str(
        info.value
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            edit_metadata(labels=["a", "b", "c", "d", "e"]),
            "has 4 outputs but metadata.json lists 5 labels",
        ),
        (
            lambda d: (d / "model.onnx").write_bytes(b"not an onnx model"),
            "onnxruntime cannot load it",
        ),
        (
            lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:300]),
            "onnxruntime cannot load it",
        ),
        (
            edit_metadata(
                preprocess={**tiny_config().to_dict(), "width": 96}, input_shape=[1, 32, 96]
            ),
            "does not match metadata input_shape",
        ),
    ],
)
def test_broken_model_is_refused_by_check_artefact(artefact, tmp_path: Path, edit, message: str):
    broken = broken_copy(artefact[0], tmp_path / "broken", edit)
    with pytest.raises(ArtefactError, match=message):
        check_artefact(broken)


def test_missing_directory_and_weights(tmp_path: Path, artefact):
    with pytest.raises(ArtefactError, match="no such model directory"):
        load_metadata(tmp_path / "nowhere")
    no_weights = broken_copy(artefact[0], tmp_path / "nw", lambda d: (d / "weights.pt").unlink())
    assert check_artefact(no_weights).arch == "tiny"  # serving needs no weights.pt
    with pytest.raises(ArtefactError, match="no torch weights"):
        load_torch_model(no_weights)


@pytest.fixture(scope="module")
def small_cnn_artefact(tmp_path_factory) -> Path:
    from flystage.training.models import build_model

    model_dir = tmp_path_factory.mktemp("small") / "model"
    model = build_model("small_cnn", num_classes=3, channels=1).eval()
    save_artefact(
        model_dir,
        model,
        "small_cnn",
        ["a", "b", "c"],
        PreprocessConfig(height=32, width=80, channels=1),
    )
    return model_dir


def edit_weights(change):
    def edit(d: Path):
        saved = torch.load(d / "weights.pt", weights_only=True)
        torch.save(change(saved), d / "weights.pt")

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (edit_weights(lambda s: [1, 2, 3]), "found list"),
        (edit_weights(lambda s: list(s["state_dict"].values())), "found list"),
        (
            edit_weights(lambda s: {k: v for k, v in s.items() if k != "state_dict"}),
            "without a state_dict",
        ),
        (edit_weights(lambda s: {**s, "state_dict": [1]}), "without a state_dict"),
        (edit_weights(lambda s: {**s, "labels": "abc"}), "'labels' must be a list"),
        (
            edit_weights(lambda s: {k: v for k, v in s.items() if k != "labels"}),
            "'labels' must be a list",
        ),
        (edit_weights(lambda s: {**s, "labels": [1, 2, 3]}), "'labels' must be a list"),
        (edit_weights(lambda s: {**s, "channels": "1"}), "'channels' must be 1 or 3"),
        (edit_weights(lambda s: {**s, "channels": 7}), "'channels' must be 1 or 3"),
        (edit_weights(lambda s: {**s, "spec": [1]}), "bad model 'spec'"),
        (edit_weights(lambda s: {**s, "spec": {"mode": "full"}}), "bad model 'spec'"),
        (edit_weights(lambda s: {**s, "spec": {"arch": 5}}), "bad model 'spec'"),
        (edit_weights(lambda s: {**s, "spec": {"members": 5}}), "bad model 'spec'"),
        (
            edit_weights(lambda s: {**s, "spec": {"members": [{"arch": "small_cnn"}, "x"]}}),
            "bad model 'spec'",
        ),
        (
            edit_weights(lambda s: {**s, "spec": {"arch": "small_cnn", "temperature": "hot"}}),
            "bad model 'spec'",
        ),
        (
            edit_weights(lambda s: {**s, "spec": {"arch": "no_such_net", "mode": "full"}}),
            "unknown arch 'no_such_net'",
        ),
        (
            edit_weights(lambda s: {**s, "spec": {"arch": "small_cnn", "mode": "probe"}}),
            "cannot rebuild the model",
        ),
        (edit_weights(lambda s: {**s, "spec": None, "arch": None}), "bad model 'spec'"),
        (
            edit_weights(lambda s: {**s, "labels": ["a", "b"]}),
            "cannot rebuild the model",
        ),  # head of 3 outputs
        (
            edit_weights(lambda s: {**s, "state_dict": {"x": torch.zeros(1)}}),
            "cannot rebuild the model",
        ),
        (
            lambda d: (d / "weights.pt").write_bytes(b"not a torch file"),
            "cannot read the torch weights",
        ),
    ],
)
def test_tampered_weights_are_refused(small_cnn_artefact, tmp_path: Path, edit, message: str):
    assert load_torch_model(small_cnn_artefact) is not None  # the untouched copy loads
    broken = broken_copy(small_cnn_artefact, tmp_path / "broken", edit)
    with pytest.raises(ArtefactError, match=message) as info:
        load_torch_model(broken)
    assert str(broken / "weights.pt") in str(info.value)


@pytest.mark.parametrize("arch", ["default", "hognet", "hognet_turn", "small_cnn"])
def test_the_default_and_small_models_export_and_match_onnx(tmp_path, arch):
    """The default model (TrainConfig().architecture()) and every from-scratch arch export at
    the default input size (ONNX checked against torch)."""
    from flystage.imaging import PreprocessConfig
    from flystage.training.config import TrainConfig
    from flystage.training.models import build_from_spec

    labels = ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"]
    spec = TrainConfig().architecture() if arch == "default" else {"arch": arch, "mode": "full"}
    model = build_from_spec(spec, len(labels), PreprocessConfig().channels).eval()
    save_artefact(
        tmp_path / arch, model, spec.get("arch", arch), labels, PreprocessConfig(), spec=spec
    )
    check_artefact(tmp_path / arch)


# ---- trained models on real BDGP images: ensembles, calibration, the linear probe ------------


def real_inputs(records, config: PreprocessConfig) -> np.ndarray:
    """The images as serving feeds them to the model: float32 (N, C, H, W) in [0, 1]."""
    from flystage.imaging import load

    return np.stack([load(r.path, config) for r in records])


def onnx_logits(model_dir: Path, x: np.ndarray) -> np.ndarray:
    from flystage.artefact import open_session

    return open_session(model_dir, threads=1).run(["logits"], {"image": x})[0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def bdgp_set(bdgp_root):
    from train_helpers import bdgp_records

    train, valid = bdgp_records(bdgp_root, train_per_stage=4, valid_per_stage=2)
    # Images neither trained nor validated on, of every stage, to compare outputs on.
    _, unseen = bdgp_records(bdgp_root, train_per_stage=6, valid_per_stage=3)
    return train, valid, unseen


def train_and_save(train, valid, model_dir: Path, preprocess: PreprocessConfig, **choices):
    """Two epochs of ``train_model`` (one thread, batches of 8) with the given choices, saved
    as an artefact in model_dir; returns the result and the metadata."""
    from flystage.training.config import TrainConfig
    from flystage.training.ensemble import train_model

    config = TrainConfig(**choices, epochs=2, batch_size=8, threads=1, preprocess=preprocess)
    result = train_model(train, valid, config, log=lambda line: None)
    metadata = save_artefact(
        model_dir,
        result.model,
        config.arch,
        result.labels,
        preprocess,
        result.best,
        spec=result.spec,
    )
    return result, metadata


@pytest.mark.parametrize(
    "members, calibrate",
    [
        (dict(ensemble_archs=("hognet", "small_cnn")), False),
        (dict(arch="hognet", ensemble=2), True),
    ],
)
def test_ensemble_artefact_averages_the_members_probabilities(
    bdgp_set, tmp_path: Path, members, calibrate
):
    from flystage.training.models import Calibrated, EnsembleNet

    train, valid, unseen = bdgp_set
    preprocess = PreprocessConfig(height=32, width=80, channels=1)
    result, metadata = train_and_save(
        train, valid, tmp_path, preprocess, **members, mode="full", calibrate=calibrate
    )
    ensemble = result.model.model if calibrate else result.model
    assert isinstance(ensemble, EnsembleNet) and len(ensemble.members) == 2
    assert isinstance(result.model, Calibrated) == calibrate
    assert metadata.extra["model"] == result.spec and len(result.spec["members"]) == 2
    assert ("temperature" in result.spec) == calibrate

    x = real_inputs(unseen, preprocess)
    with torch.no_grad():
        member_probs = [
            torch.softmax(m(torch.from_numpy(x)), dim=1).numpy() for m in ensemble.members
        ]
    assert not np.allclose(member_probs[0], member_probs[1], atol=1e-3)  # two different members
    mean_probs = np.mean(member_probs, axis=0)
    got = onnx_logits(tmp_path, x)
    if calibrate:
        t = result.best["temperature"]
        assert t == result.spec["temperature"] and t != 1.0
        np.testing.assert_allclose(got * t, np.log(mean_probs), atol=1e-4)
        np.testing.assert_allclose(softmax(got), softmax(np.log(mean_probs) / t), atol=1e-4)
    else:
        np.testing.assert_allclose(softmax(got), mean_probs, atol=1e-4)

    again = load_torch_model(tmp_path)
    assert type(again) is type(result.model)
    with torch.no_grad():
        torch.testing.assert_close(again(torch.from_numpy(x)), result.model(torch.from_numpy(x)))


def test_probe_artefact_onnx_matches_torch_on_real_images(bdgp_set, tmp_path: Path):
    from flystage.training.probe import ProbeNet

    train, valid, unseen = bdgp_set
    preprocess = PreprocessConfig()  # the default input, 64 x 160 grey
    result, _ = train_and_save(
        train, valid, tmp_path, preprocess, arch="efficientnet_lite0", mode="probe", augment_draws=1
    )
    assert isinstance(result.model.model, ProbeNet)
    assert check_artefact(tmp_path).extra["model"]["mode"] == "probe"

    x = real_inputs(unseen + valid, preprocess)
    with torch.no_grad():
        want = result.model(torch.from_numpy(x)).numpy()
    got = onnx_logits(tmp_path, x)
    assert np.ptp(want, axis=0).max() > 0.1  # the images give different answers
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(softmax(got), softmax(want), atol=1e-5)
    # weights.pt alone (no weight packages needed) rebuilds the same model.
    again = load_torch_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(torch.from_numpy(x)).numpy(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [
        "code/inference.py",
        "code/requirements.txt",
        "notes.txt",
        "link",
        "code.tar.gz/x",
        "linked.tar.gz",
    ],
)
def test_strict_check_serves_nothing_but_the_model_files(tmp_path: Path, artefact, extra: str):
    """What the serve image runs before starting: a model folder holding anything but the
    files flystage writes (a code/ folder would be imported and pip-installed by the server)."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(artefact[0], model_dir)
    check_artefact(model_dir, strict=True)
    if extra == "link":
        (model_dir / "model.onnx").rename(tmp_path / "outside.onnx")
        (model_dir / "model.onnx").symlink_to(tmp_path / "outside.onnx")
    elif extra == "linked.tar.gz":
        (model_dir / extra).symlink_to(tmp_path / "outside.onnx")
    else:
        (model_dir / extra).parent.mkdir(exist_ok=True)
        (model_dir / extra).write_text("x\n", encoding="utf-8")
    check_artefact(model_dir)  # a local folder for predict may hold more; serving may not
    with pytest.raises(
        ArtefactError, match="besides the model; a flystage model.tar.gz holds only"
    ):
        check_artefact(model_dir, strict=True)


def test_strict_check_ignores_the_archives_sdk_local_mode_leaves_beside_the_model(
    tmp_path: Path, artefact
):
    # Model(model_data="file://.../model.tar.gz").deploy(instance_type="local") unpacks the
    # archive next to itself and mounts that folder: the archives are never opened.
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(artefact[0], model_dir)
    (model_dir / "model.tar.gz").write_bytes(b"\x1f\x8b not opened")
    (model_dir / "output.tar.gz").write_bytes(b"\x1f\x8b not opened")
    assert check_artefact(model_dir, strict=True).labels
