"""flystage's images driven by the real SageMaker Python SDK (v2) in local mode, as a Studio
user drives them: ``Estimator(image_uri=...).fit`` with one and two instances on a manifest
channel and on a nested ``<gene>/<stage>/`` folder channel, ``Model(...).deploy`` of the serve
image with predictions through ``flystage.sagemaker.FlystagePredictor``, and a batch transform
with the SDK's ``Transformer``.

Needs the SDK (``pip install -e '.[sdk]'``, part of ``make install``), Docker Compose (Debian's
``docker-compose``), the Docker engine and the images of ``make images``. The SDK's telemetry
is switched off the documented way: ``TelemetryOptOut: true`` in an SDK defaults config file
named by ``SAGEMAKER_USER_CONFIG_OVERRIDE``. Training is tiny (63 images, one epoch, 32x80).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))

from sdk_helpers import remove_compose_containers, write_sdk_config  # noqa: E402
from train_helpers import copy_bdgp_genes  # noqa: E402

TRAIN_IMAGE = os.environ.get("TRAIN_IMAGE", "flystage-train:latest")
SERVE_IMAGE = os.environ.get("SERVE_IMAGE", "flystage-serve:latest")
STAGES = ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"]
TINY = {"arch": "small_cnn", "epochs": 1, "height": 32, "width": 80, "batch_size": 16, "threads": 1}
pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def sdk_environment(tmp_path_factory: pytest.TempPathFactory):
    """The SDK's documented settings for this run: telemetry off (SDK defaults config), a
    region for its boto3 session, the v2 deprecation notice silenced."""
    config = write_sdk_config(tmp_path_factory.mktemp("sdk-config") / "config.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAGEMAKER_USER_CONFIG_OVERRIDE", str(config))
        mp.setenv("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
        mp.setenv("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        yield config


@pytest.fixture(scope="module")
def sdk():
    pytest.importorskip("sagemaker", reason="the SageMaker Python SDK: pip install -e '.[sdk]'")
    if not shutil.which("docker-compose") and not shutil.which("docker"):
        pytest.fail("the SDK's local mode needs Docker Compose: apt-get install docker-compose")
    from flystage_local import containers

    client = containers.connect()
    for image in (TRAIN_IMAGE, SERVE_IMAGE):
        containers.require_image(client, image)
    import sagemaker

    return sagemaker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def session(sdk, tmp_path_factory: pytest.TempPathFactory):
    from sagemaker.local import LocalSession

    root = tmp_path_factory.mktemp("sdk-containers")
    session = LocalSession()
    session.config = {
        "local": {"local_code": True, "serving_port": _free_port(), "container_root": str(root)}
    }
    yield session
    remove_compose_containers(root)


@pytest.fixture(scope="module")
def folder_channel(tmp_path_factory: pytest.TempPathFactory, bdgp_root: Path) -> Path:
    """Five BDGP genes as a lab shares them: ``<gene>/<stage>/<image>.bmp`` (63 images)."""
    return copy_bdgp_genes(bdgp_root, tmp_path_factory.mktemp("folder-channel"))


@pytest.fixture(scope="module")
def manifest_channel(folder_channel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images staged as `make upload` / local mode stage them: manifest.csv + images."""
    from flystage_local import channels

    folder, _ = channels.stage_channel(
        [folder_channel], tmp_path_factory.mktemp("manifest-channel")
    )
    return folder


WALL: dict[str, float] = {}


def _fit(session, channel: Path, out: Path, instances: int, logs: bool = False, **hyperparameters):
    from sagemaker.estimator import Estimator

    from flystage import sagemaker as fs

    estimator = Estimator(
        image_uri=TRAIN_IMAGE,
        role=fs.LOCAL_ROLE,
        instance_count=instances,
        instance_type="local",
        hyperparameters={**TINY, **hyperparameters},
        metric_definitions=fs.METRIC_DEFINITIONS,
        output_path=f"file://{out}",
        sagemaker_session=session,
    )
    estimator.fit({fs.DATA_CHANNEL: f"file://{channel}"}, logs=logs)
    return estimator


def _labels(model_data: str) -> list[str]:
    with tarfile.open(model_data.removeprefix("file://")) as tar:
        return json.load(tar.extractfile("metadata.json"))["labels"]


@pytest.fixture(scope="module")
def folder_model(session, folder_channel: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One job on the nested folder channel, grouped by gene: its model.tar.gz (file:// URI)."""
    from flystage import sagemaker as fs

    started = time.perf_counter()
    estimator = _fit(
        session,
        folder_channel,
        tmp_path_factory.mktemp("fit-folder-1"),
        1,
        **fs.folder_hyperparameters(group_regex=fs.GENE_GROUP),
    )
    WALL["fit folder x1"] = time.perf_counter() - started
    return estimator.model_data


def test_telemetry_is_off_by_the_sdk_defaults_config(session) -> None:
    from sagemaker.config.config_schema import TELEMETRY_OPT_OUT_PATH
    from sagemaker.utils import resolve_value_from_config

    assert (
        resolve_value_from_config(config_path=TELEMETRY_OPT_OUT_PATH, sagemaker_session=session)
        is True
    )


def test_fit_on_a_nested_folder_channel_learns_stages(folder_model: str) -> None:
    assert _labels(folder_model) == STAGES  # the stages, never the genes (issue 9)


@pytest.mark.parametrize("kind, instances", [("manifest", 1), ("manifest", 2), ("folder", 2)])
def test_fit(
    session, folder_channel: Path, manifest_channel: Path, tmp_path: Path, kind: str, instances: int
) -> None:
    from flystage import sagemaker as fs

    channel = manifest_channel if kind == "manifest" else folder_channel
    extra = fs.folder_hyperparameters(group_regex=fs.GENE_GROUP) if kind == "folder" else {}
    started = time.perf_counter()
    estimator = _fit(session, channel, tmp_path, instances, **extra)
    WALL[f"fit {kind} x{instances}"] = time.perf_counter() - started
    assert _labels(estimator.model_data) == STAGES


def test_folder_channel_without_a_group_rule_fails_with_its_reason(
    session, folder_channel: Path, tmp_path: Path, capfd
) -> None:
    with pytest.raises(
        RuntimeError, match="Failed to run"
    ):  # local mode: the container's exit code
        _fit(session, folder_channel, tmp_path, 1, logs=True)
    log = capfd.readouterr().out
    assert "training failed: no group rule for the validation split of folder channel" in log, log[
        -2000:
    ]
    assert "group_regex" in log
    archive = tmp_path / "model.tar.gz"  # local mode tars the job's (empty) model folder even so
    assert not archive.exists() or "metadata.json" not in tarfile.open(archive).getnames()


def test_deploy_predict_and_predict_a_folder_with_rename(
    session, folder_model: str, folder_channel: Path, tmp_path: Path
) -> None:
    from sagemaker.model import Model

    from flystage import sagemaker as fs
    from flystage.rename import undo_renames

    started = time.perf_counter()
    model = Model(
        image_uri=SERVE_IMAGE,
        model_data=folder_model,
        role=fs.LOCAL_ROLE,
        predictor_cls=fs.FlystagePredictor,
        sagemaker_session=session,
        name="flystage-sdk-test-deploy",
    )
    predictor = model.deploy(initial_instance_count=1, instance_type="local")
    try:
        assert isinstance(predictor, fs.FlystagePredictor)
        image = sorted(folder_channel.glob("*/*/*.bmp"))[0]
        top = predictor.predict(image)
        assert len(top) == 3 and {stage for stage, _ in top} <= set(STAGES)
        assert [stage for stage, _ in predictor.predict(image.read_bytes(), k=5)][:3] == [
            stage for stage, _ in top
        ]
        bad = predictor.predict_sources([b"not an image"])[0]
        assert bad.error and "400" in bad.error and not bad.top
        # A folder, as `flystage predict --rename` does it, through the SDK's endpoint.
        new = tmp_path / "new-images"
        new.mkdir()
        for path in sorted(folder_channel.glob("Dif/*/*.bmp"))[:4]:
            shutil.copy2(path, new / path.name)
        before = sorted(p.name for p in new.iterdir())
        assert predictor.predict_folder(new, tmp_path / "predictions.csv", rename=True) == 0
        after = sorted(p.name for p in new.iterdir())
        assert len(after) == 4 and not set(after) & set(before)
        undo = next(tmp_path.glob("predictions-undo-*.csv"))
        undo_renames(undo)
        assert sorted(p.name for p in new.iterdir()) == before
    finally:
        predictor.delete_endpoint()
    WALL["deploy + predict"] = time.perf_counter() - started


def test_batch_transform(session, folder_model: str, folder_channel: Path, tmp_path: Path) -> None:
    from sagemaker.model import Model
    from sagemaker.transformer import Transformer

    from flystage import sagemaker as fs

    started = time.perf_counter()
    name = "flystage-sdk-test-transform"
    Model(
        image_uri=SERVE_IMAGE,
        model_data=folder_model,
        role=fs.LOCAL_ROLE,
        sagemaker_session=session,
        name=name,
    ).create(instance_type="local")
    batch = tmp_path / "batch"
    batch.mkdir()
    for path in sorted(folder_channel.glob("Dms/*/*.bmp"))[:3]:
        shutil.copy2(path, batch / path.name)
    # One image per request (SingleRecord, no split): each file's answer lands in <file>.out.
    transformer = Transformer(
        model_name=name,
        instance_count=1,
        instance_type="local",
        strategy="SingleRecord",
        accept="application/json",
        output_path=f"file://{tmp_path / 'out'}",
        sagemaker_session=session,
    )
    # logs=False: the job's logs would be read from CloudWatch (local mode runs it synchronously).
    transformer.transform(
        f"file://{batch}", content_type="application/x-image", split_type=None, logs=False
    )
    outputs = sorted((tmp_path / "out").glob("*.out"))
    assert [p.name for p in outputs] == sorted(f"{p.name}.out" for p in batch.iterdir())
    for out in outputs:
        top = fs.TopKDeserializer().deserialize(out.read_bytes())
        assert len(top) == 3 and {stage for stage, _ in top} <= set(STAGES)
    WALL["batch transform"] = time.perf_counter() - started


def test_zz_report_wall_times() -> None:
    """Prints the wall time of each SDK step (pytest -s shows it)."""
    print("\nSDK wall times (s): " + json.dumps({k: round(v, 1) for k, v in WALL.items()}))
