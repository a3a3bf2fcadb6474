"""The training program: real (tiny) training, metric lines, checkpoints, resume, SIGTERM,
the artefact, and the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from flystage.artefact import check_artefact, load_metadata
from flystage.augment import AugmentConfig
from flystage.channels import split_channels
from flystage.imaging import PreprocessConfig
from flystage.jobdef import METRIC_DEFINITIONS, read_epoch_metric, read_metric
from flystage.manifest import manifest_sha256
from flystage.options import ArgumentParser, parse_bool
from flystage.training.backbones import DEFAULT_TAPS
from flystage.training.config import config_from_args
from flystage.training.ensemble import train_model
from flystage.training.export import load_torch_model
from flystage.training.loop import CHECKPOINT_FILE, TrainingStopped, _is_better, fit, metric_line
from flystage.training.models import Calibrated
from flystage.training.train import EXIT_STOPPED, main
from train_helpers import (
    LABELS,
    TINY_ARGS,
    TINY_PREPROCESS,
    make_manifest_set,
    tiny_config,
    train_command,
)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_manifest_set(tmp_path_factory.mktemp("set"), train_per_class=6, valid_per_class=3)


@pytest.fixture(scope="module")
def records(manifest: Path):
    train, valid, _ = split_channels(manifest)
    return train, valid


def train_main(manifest: Path, model_dir: Path, *args) -> int:
    """``main`` (the training program in this process) on the manifest into model_dir."""
    return main(["--manifest", str(manifest), "--model_dir", str(model_dir), *map(str, args)])


def test_fit_learns_and_returns_best_model(records) -> None:
    """Without augmentation, a few epochs separate the synthetic classes on the training set."""
    train, valid = records
    lines: list[str] = []
    result = fit(
        train,
        valid,
        tiny_config(epochs=12, augment=AugmentConfig.off(), label_smoothing=0.0),
        log=lines.append,
    )
    assert result.labels == list(LABELS)
    assert [e["epoch"] for e in result.history] == list(range(1, 13))
    assert result.history[-1]["train_loss"] < 0.6 * result.history[0]["train_loss"]
    assert not result.model.training
    # The best epoch: highest valid top-1, ties broken by the lowest valid loss.
    best = max(result.history, key=lambda e: (e["valid_top1"], -e["valid_loss"]))
    assert result.best == best
    # The returned weights are the best epoch's: they reproduce its valid loss.
    from flystage.training.data import ImageCache, StageDataset

    dataset = StageDataset(valid, result.labels, ImageCache(result.config.preprocess))
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor(dataset.targets)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(result.model(x), y).item()
    assert loss == pytest.approx(best["valid_loss"], rel=1e-4)
    assert result.samples_seen == 12 * len(train)


def test_metric_lines_read_by_the_job_definition(records) -> None:
    train, valid = records
    lines: list[str] = []
    result = fit(train, valid, tiny_config(epochs=2), log=lines.append)
    log = "\n".join(lines)
    metric_lines = [line for line in lines if line.startswith("epoch=")]
    assert metric_lines == [metric_line(e) for e in result.history]
    assert len(metric_lines) == 2
    for definition in METRIC_DEFINITIONS:
        key = {
            "train:loss": "train_loss",
            "valid:loss": "valid_loss",
            "valid:top1": "valid_top1",
            "valid:top3": "valid_top3",
        }[definition["Name"]]
        values = read_metric(log, definition["Name"])
        assert values == pytest.approx([round(e[key], 4) for e in result.history], abs=1e-9)


def test_stop_then_resume_equals_an_uninterrupted_run(records, tmp_path: Path) -> None:
    train, valid = records
    straight = fit(train, valid, tiny_config(), log=lambda line: None)

    with pytest.raises(TrainingStopped) as stopped:
        fit(train, valid, tiny_config(stop_after_epoch=1), work_dir=tmp_path, log=lambda line: None)
    assert stopped.value.epoch == 1
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert {"model", "optimizer", "scheduler", "best", "best_state"} <= set(state)
    assert not list(tmp_path.glob(".*tmp"))  # written atomically

    lines: list[str] = []
    resumed = fit(train, valid, tiny_config(), work_dir=tmp_path, log=lines.append)
    assert any(
        line.startswith("resuming from checkpoint") and "after epoch 1" in line for line in lines
    )
    assert [line.split()[0] for line in lines if line.startswith("epoch=")] == [
        "epoch=2",
        "epoch=3",
    ]
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3]
    # Per-epoch reseeding makes the resumed run the same as the uninterrupted one.
    for a, b in zip(straight.history, resumed.history):
        for key in ("train_loss", "valid_loss", "valid_top1"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)


def test_checkpoint_of_another_run_is_refused(records, tmp_path: Path) -> None:
    train, valid = records
    fit(train, valid, tiny_config(epochs=1), work_dir=tmp_path, log=lambda line: None)
    other = tiny_config(epochs=1, preprocess=PreprocessConfig(height=32, width=96, channels=1))
    with pytest.raises(ValueError, match="belongs to another training run.*empty checkpoint dir"):
        fit(train, valid, other, work_dir=tmp_path, log=lambda line: None)


@pytest.mark.parametrize("balance", ["sampler", "none"])
def test_balance_options_train(records, balance: str) -> None:
    train, valid = records
    result = fit(
        train[:-4],
        valid,
        tiny_config(epochs=1, balance=balance, optimizer="sgd", scheduler="onecycle"),
        log=lambda line: None,
    )
    assert len(result.history) == 1


def test_main_writes_artefact_history_and_checkpoint(
    manifest: Path, tmp_path: Path, capsys
) -> None:
    model_dir, out, ckpt = tmp_path / "model", tmp_path / "out", tmp_path / "ckpt"
    options = [
        "--output-data-dir",
        out,
        "--checkpoint_dir",
        ckpt,
        "--epochs",
        2,
        "--pretrained",
        False,
    ]
    code = train_main(manifest, model_dir, *options, *TINY_ARGS)
    log = capsys.readouterr().out
    assert code == 0, log
    assert len(read_epoch_metric(log, "valid:top3")) == 2
    metadata = check_artefact(model_dir)  # ONNX runs and matches the metadata
    assert metadata.labels == list(LABELS)
    assert metadata.arch == "small_cnn"
    assert metadata.preprocess.to_dict() == PreprocessConfig(**TINY_PREPROCESS).to_dict()
    assert metadata.manifest_sha256 == manifest_sha256(manifest)
    assert set(metadata.metrics) >= {
        "valid_top1",
        "valid_top3",
        "valid_loss",
        "epoch",
        "valid_ece",
        "temperature",
        "calibrated_valid_loss",
        "calibrated_valid_ece",
    }
    # The artefact says what it is (calibrated by default) and weights.pt rebuilds it.
    spec = metadata.extra["model"]
    assert (spec["arch"], spec["mode"], spec["temperature"]) == (
        "small_cnn",
        "full",
        metadata.metrics["temperature"],
    )
    model = load_torch_model(model_dir)
    assert isinstance(model, Calibrated) and float(model.temperature) == pytest.approx(
        spec["temperature"]
    )
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [e["epoch"] for e in history] == [1, 2]
    assert (
        (out / "history.csv")
        .read_text()
        .startswith("epoch,train_loss,valid_loss,valid_top1,valid_top3")
    )
    assert (ckpt / CHECKPOINT_FILE).is_file()
    assert "host=local rank=0 world_size=1 samples=36" in log


def test_hyperparameters_as_sagemaker_sends_them(monkeypatch) -> None:
    from flystage.training.train import configure_parser

    monkeypatch.setenv("SM_NUM_CPUS", "4")
    parser = ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(
        [
            "--batch_size",
            "64.0",
            "--learning_rate",
            "0.01",
            "--pretrained",
            "True",
            "--mask",
            "false",
            "--angles",
            "[90, 180]",
            "--p-angle",
            "0.25",
            "--preprocess",
            '{"height": 48, "width": 120}',
            "--width",
            "128",
        ]
    )
    config = config_from_args(args)
    assert (config.batch_size, config.learning_rate, config.pretrained) == (64, 0.01, True)
    assert config.threads == 4  # from SM_NUM_CPUS
    assert (config.preprocess.height, config.preprocess.width, config.preprocess.mask) == (
        48,
        128,
        False,
    )
    assert config.augment.angles == (90.0, 180.0) and config.augment.p_angle == 0.25
    off = config_from_args(parser.parse_args(["--augment", "off"]))
    assert off.augment == AugmentConfig.off()
    # A JSON object hyperparameter reaches the program as key=value pairs (sagemaker-training).
    pairs = config_from_args(
        parser.parse_args(
            [
                "--preprocess",
                "align=False,height=40,width=96",
                "--augment",
                "angles=[180.0],p_angle=1",
            ]
        )
    )
    assert (pairs.preprocess.height, pairs.preprocess.width, pairs.preprocess.align) == (
        40,
        96,
        False,
    )
    assert pairs.augment.angles == (180.0,) and pairs.augment.p_angle == 1.0
    for text, value in [("true", True), ('"false"', False), ("1", True), ("False", False)]:
        assert parse_bool(text) is value
    with pytest.raises(Exception, match="expected true or false"):
        parse_bool("maybe")


def test_bad_arguments_fail_with_a_clear_message(manifest: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(["--manifest", str(manifest), "--model_dir", str(tmp_path), "--arch", "resnet7"]) == 1
    )
    assert (
        "training failed: bad hyperparameter: arch 'resnet7': choose one of"
        in capsys.readouterr().err
    )
    assert (
        main(["--manifest", str(manifest), "--model_dir", str(tmp_path), "--no_such_option", "1"])
        == 2
    )
    assert "unrecognized arguments: --no_such_option" in capsys.readouterr().err
    assert main(["--model_dir", str(tmp_path)]) == 1
    assert "no training data: give --manifest" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_non_zero(manifest: Path, tmp_path: Path) -> None:
    """The real program in a subprocess: SIGTERM during training -> finish the step, save a
    checkpoint, exit with EXIT_STOPPED; a restart resumes from that checkpoint."""
    ckpt, model_dir = tmp_path / "ckpt", tmp_path / "model"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = train_command(
        "--manifest", manifest, "--model-dir", model_dir, "--checkpoint-dir", ckpt, *TINY_ARGS
    )
    proc = subprocess.Popen(
        command + ["--epochs", "1000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    timer = threading.Timer(240, proc.kill)  # a hang fails the test instead of blocking CI
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("epoch=1 "):
                proc.send_signal(signal.SIGTERM)
        code = proc.wait()
    finally:
        timer.cancel()
    log = "".join(lines)
    assert code == EXIT_STOPPED, log
    assert "SIGTERM: stopped in epoch" in log and "run again with the same checkpoint dir" in log
    state = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)  # what resuming loads, too
    assert state["epoch"] >= 1
    # The stopped job still leaves the best model so far, marked as such.
    stopped = load_metadata(model_dir)
    assert "stopped by SIGTERM" in stopped.extra["stopped"] and stopped.labels == list(LABELS)
    check_artefact(model_dir)

    # Restart: resumes after the saved epoch and finishes (a shorter job this time).
    done = subprocess.run(
        command + ["--epochs", str(state["epoch"] + 1)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"resuming from checkpoint {ckpt / CHECKPOINT_FILE} after epoch {state['epoch']}"
        in done.stdout
    )
    assert read_metric(done.stdout, "valid:top3") and f"epoch={state['epoch'] + 1} " in done.stdout
    assert load_metadata(model_dir).labels == list(LABELS)
    assert "stopped" not in load_metadata(model_dir).extra  # the finished model replaced it


def test_early_stopping_and_a_finished_run_is_not_retrained(records, tmp_path: Path) -> None:
    train, valid = records
    # A learning rate of ~0 cannot improve on epoch 1 (ties are broken by a lower valid loss).
    config = tiny_config(epochs=20, patience=2, learning_rate=1e-12, warmup_epochs=0.0)
    lines: list[str] = []
    result = fit(train, valid, config, work_dir=tmp_path, log=lines.append)
    assert len(result.history) < 20
    assert any(line.startswith("early stop: no better valid_top1 for 2 epochs") for line in lines)
    lines.clear()
    again = fit(train, valid, config, work_dir=tmp_path, log=lines.append)
    assert not [line for line in lines if line.startswith("epoch=")]
    assert again.history == result.history and again.best == result.best


def test_best_epoch_rule_top1_then_loss() -> None:
    def entry(top1, loss, top3=1.0):
        return {"valid_top1": top1, "valid_loss": loss, "valid_top3": top3}

    assert _is_better(entry(0.3, 2.0), None)
    assert _is_better(entry(0.6, 1.5), entry(0.5, 0.2))  # more right answers beat a lower loss
    assert not _is_better(entry(0.5, 0.1), entry(0.6, 1.5))
    assert _is_better(entry(0.5, 0.9), entry(0.5, 1.0))  # equal top-1: the lower loss
    assert not _is_better(entry(0.5, 1.0), entry(0.5, 1.0))  # a tie keeps the earlier epoch
    # Top-3 does not rank epochs (with three stages it is 1.0 whatever the model does).
    assert _is_better(entry(0.6, 1.0, top3=0.9), entry(0.5, 1.0, top3=1.0))


def test_with_three_stages_the_best_epoch_is_chosen_by_top1(records) -> None:
    train, valid = records
    assert len(LABELS) == 3
    # With augmentation this run's lowest valid loss comes in an epoch of lower top-1 than
    # another epoch's: the old rule (top-3, then loss) would have kept that one.
    result = fit(train, valid, tiny_config(epochs=6), log=lambda line: None)
    history = result.history
    assert all(e["valid_top3"] == 1.0 for e in history)  # top-3 cannot tell the epochs apart
    assert len({e["valid_top1"] for e in history}) > 1  # top-1 can
    top1 = max(e["valid_top1"] for e in history)
    first_best = min(e["epoch"] for e in history if e["valid_top1"] == top1)
    assert result.best["valid_top1"] == top1
    assert result.best["epoch"] > 1  # not simply the first epoch of equal top-3
    # Among the epochs of the best top-1, the lowest loss; earlier epochs of that top-1 lose only
    # on loss.
    tied = [e for e in history if e["valid_top1"] == top1]
    assert result.best["valid_loss"] == min(e["valid_loss"] for e in tied)
    assert (
        result.best["epoch"] == first_best
        or result.best["valid_loss"] < history[first_best - 1]["valid_loss"]
    )
    lowest_loss = min(history, key=lambda e: e["valid_loss"])
    if lowest_loss["valid_top1"] < top1:
        assert result.best["epoch"] != lowest_loss["epoch"]


def test_train_model_calibrates_on_the_valid_images(records) -> None:
    train, valid = records
    lines: list[str] = []
    result = train_model(train, valid, tiny_config(epochs=2), log=lines.append)
    assert isinstance(result.model, Calibrated) and not result.model.training
    t = result.best["temperature"]
    assert result.spec == {
        "arch": "small_cnn",
        "mode": "full",
        "taps": list(DEFAULT_TAPS),
        "hog": False,
        "temperature": t,
    }
    assert float(result.model.temperature) == pytest.approx(t)
    # T minimises the valid NLL, so it is no worse than T = 1 (the uncalibrated model).
    assert result.best["calibrated_valid_loss"] <= result.best["valid_loss"] + 1e-9
    assert result.best["calibrated_valid_top1"] == result.best["valid_top1"]  # ranking unchanged
    assert any(
        line.startswith(f"calibration: temperature {t:.3f} on {len(valid)} valid images")
        for line in lines
    )
    x = torch.rand(2, 1, 32, 80)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), result.model.model(x) / t)
    assert [e["member"] for e in result.history] == [0, 0]
    uncalibrated = train_model(
        train, valid, tiny_config(epochs=2, calibrate=False), log=lambda line: None
    )
    assert not isinstance(uncalibrated.model, Calibrated) and "temperature" not in uncalibrated.best
    # The same seed trains the same member; calibration only divides its logits.
    with torch.no_grad():
        torch.testing.assert_close(uncalibrated.model(x) / t, result.model(x))


def test_main_with_the_default_probe_says_which_hyperparameters_it_ignores(
    manifest: Path, tmp_path: Path, capsys
) -> None:
    """The default model's head is solved exactly: one metric line, and a tuner's learning_rate
    and batch_size are named as unused instead of silently training the same model."""
    small = "--threads 1 --height 32 --width 80".split()
    tuned = "--learning_rate 0.01 --batch_size 64".split()
    code = train_main(manifest, tmp_path / "model", *tuned, *small)
    log = capsys.readouterr().out
    assert code == 0, log
    assert "note: learning_rate, batch_size not used" in log
    assert len(read_epoch_metric(log, "valid:top3")) == 1
    assert check_artefact(tmp_path / "model").extra["model"]["mode"] == "probe"
    sgd = "--learning_rate 0.01 --probe_solver sgd --epochs 2".split()
    code = train_main(manifest, tmp_path / "sgd", *sgd, *small)
    log = capsys.readouterr().out
    assert code == 0 and "not used" not in log and len(read_epoch_metric(log, "valid:top3")) == 2


def test_train_refuses_to_replace_a_model_without_force(
    manifest: Path, tmp_path: Path, capsys
) -> None:
    model_dir = tmp_path / "model"
    args = ["--manifest", str(manifest), "--model_dir", str(model_dir), "--epochs", "1", *TINY_ARGS]
    assert main(args) == 0
    before = (model_dir / "model.onnx").read_bytes()
    capsys.readouterr()
    assert main(args) == 1
    assert (
        "already holds a model; choose another --model-dir or pass --force"
        in capsys.readouterr().err
    )
    assert (model_dir / "model.onnx").read_bytes() == before
    assert main(args + ["--force", "--seed", "1"]) == 0


def test_a_crafted_checkpoint_is_refused_not_run(manifest: Path, tmp_path: Path, capsys) -> None:
    """Checkpoints are loaded with weights_only: a pickle that would run code is a clear error."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": 1, "payload": Payload()}, ckpt / CHECKPOINT_FILE)
    code = train_main(
        manifest, tmp_path / "model", "--checkpoint_dir", ckpt, "--epochs", "1", *TINY_ARGS
    )
    assert code == 1 and not marker.exists()
    assert "not a readable flystage checkpoint" in capsys.readouterr().err


# The training program with the probe's feature extraction counted (one line per call).
COUNTING_PROGRAM = """
import sys
import flystage.training.probe as probe
real = probe.extract
def counting(features, images, batch_size=32):
    print(f"extracted {len(images)} images", flush=True)
    return real(features, images, batch_size)
probe.extract = counting
from flystage.training.train import main
sys.exit(main(sys.argv[1:]))
"""


def _probe_job(manifest: Path, model_dir: Path, *args: str, env=None) -> subprocess.Popen:
    small = "--threads 1 --height 32 --width 80 --augment_draws 1".split()
    return subprocess.Popen(
        [sys.executable, "-c", COUNTING_PROGRAM, "--manifest", str(manifest)]
        + ["--model_dir", str(model_dir), *small, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extracted(log: str) -> int:
    return sum(int(n) for n in re.findall(r"^extracted (\d+) images$", log, re.M))


def test_two_hosts_share_the_probe_features_and_solve_the_same_head(
    manifest: Path, tmp_path: Path
) -> None:
    """INSTANCE_COUNT=2 for the default probe: each host reads, augments and runs the backbone
    on its half of the images only, the rows are exchanged over gloo, and the exact solve gives
    the head a single host gives."""
    one = _probe_job(manifest, tmp_path / "one")
    single_log = one.communicate(timeout=600)[0]
    assert one.returncode == 0, single_log[-3000:]
    env = dict(
        os.environ,
        FLYSTAGE_MASTER_ADDR="127.0.0.1",
        FLYSTAGE_DIST_PORT=str(_free_port()),
        FLYSTAGE_DIST_TIMEOUT="300",
    )
    hosts = ["algo-1", "algo-2"]
    jobs = {
        host: _probe_job(
            manifest,
            tmp_path / host,
            "--hosts",
            json.dumps(hosts),
            "--current_host",
            host,
            env=env,
        )
        for host in hosts
    }
    try:
        logs = {host: job.communicate(timeout=600)[0] for host, job in jobs.items()}
    finally:
        for job in jobs.values():
            job.kill()
    for host, job in jobs.items():
        assert job.returncode == 0, f"{host}:\n{logs[host][-3000:]}"
    # 18 training images x (1 + 1 draw) and 9 valid images: 45 on one host, split in two.
    total = _extracted(single_log)
    assert total == 18 * 2 + 9
    assert sorted(_extracted(log) for log in logs.values()) == [22, 23]
    single = load_torch_model(tmp_path / "one")
    shared = load_torch_model(tmp_path / "algo-1")
    for name, weights in single.state_dict().items():
        torch.testing.assert_close(shared.state_dict()[name], weights, rtol=1e-4, atol=1e-4)
    a, b = load_metadata(tmp_path / "one").metrics, load_metadata(tmp_path / "algo-1").metrics
    assert a["valid_top1"] == b["valid_top1"] and a["valid_top3"] == b["valid_top3"]
    assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-4)
    assert not any((tmp_path / "algo-2").glob("*"))  # only rank 0 writes the artefact
