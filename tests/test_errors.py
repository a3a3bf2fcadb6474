"""The one error convention: every user-facing exception is a FlystageError, and every entry
point turns one into ``flystage COMMAND: error: MESSAGE`` and its exit code."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import socket
import sys
import types
from pathlib import Path

import pytest

import flystage
import flystage_local
from flystage import cli
from flystage.errors import FlystageError, run_command

# Exceptions that never reach a user as a command's failure, and why.
INTERNAL = {
    # Control flow: the training program catches it, saves a checkpoint and exits 3.
    "flystage.training.loop.TrainingStopped",
    # The serve image's HTTP 4xx: must stay sagemaker-inference's GenericInferenceToolkitError,
    # which the model server turns into the response's status and body.
    "flystage.serving.codec.RequestError",
    # A protocol signal from parsing a server's answer: every predictor turns it into a
    # CloudError or LocalModeError naming the endpoint or URL (or a per-image error row).
    "flystage.serving.client.AnswerError",
}


def package_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in flystage and flystage_local, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for package in (flystage, flystage_local):
        names = [package.__name__] + [
            info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
        ]
        for name in names:
            if name.endswith("__main__"):  # runs the command on import
                continue
            module = importlib.import_module(name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_user_facing_exception_is_a_flystage_error() -> None:
    found = package_exceptions()
    assert INTERNAL <= set(found), f"stale allow-list entries: {INTERNAL - set(found)}"
    assert "flystage.cloud.settings.CloudError" in found  # the walk reaches sub-packages
    assert "flystage_local.LocalModeError" in found
    strays = sorted(
        name
        for name, cls in found.items()
        if name not in INTERNAL and not issubclass(cls, FlystageError)
    )
    assert not strays, f"derive these from FlystageError or list them in INTERNAL: {strays}"
    for name in INTERNAL:
        assert not issubclass(found[name], FlystageError), (
            f"{name} is one now: drop it from INTERNAL"
        )


# The classes that predate FlystageError, and the standard base callers may still catch.
HISTORICAL_BASES = {
    "flystage.artefact.ArtefactError": ValueError,
    "flystage.channels.DataError": ValueError,
    "flystage.cloud.settings.CloudError": RuntimeError,
    "flystage.compare.CompareError": ValueError,
    "flystage.datasets.DatasetError": RuntimeError,
    "flystage.files.OutputExistsError": FileExistsError,
    "flystage.image_checks.ImageError": ValueError,
    "flystage.manifest.ManifestError": ValueError,
    "flystage.options.OptionValueError": ValueError,
    "flystage.options.UsageError": ValueError,
    "flystage.organise_error.OrganiseError": ValueError,
    "flystage.review.predictions.PredictionsError": ValueError,
    "flystage.serving.container.ContainerError": RuntimeError,
    "flystage.serving.settings.SettingsError": ValueError,
    "flystage.training.backbones.WeightsUnavailableError": RuntimeError,
    "flystage.training.folds.CrossvalError": ValueError,
    "flystage.training.gradcam.GradCamUnavailable": ValueError,
    "flystage_local.LocalModeError": RuntimeError,
}


def test_each_keeps_its_standard_base() -> None:
    """``except ValueError`` (or RuntimeError, FileExistsError) written before the base still
    catches it."""
    found = package_exceptions()
    for name, base in HISTORICAL_BASES.items():
        assert issubclass(found[name], base) and issubclass(found[name], FlystageError), name


def test_run_command_maps_only_flystage_errors(capsys) -> None:
    def fails(code: int | None) -> int:
        raise FlystageError("mend this", exit_code=code)

    assert run_command("x", lambda: fails(None)) == 2
    assert capsys.readouterr().err == "flystage x: error: mend this\n"
    assert run_command("x", lambda: fails(5)) == 5
    assert run_command("x", lambda: None) == 0
    assert run_command("x", lambda: 1) == 1
    with pytest.raises(KeyError):  # a bug is a traceback, not a message
        run_command("x", lambda: {}["missing"])


@pytest.fixture
def boom_command(monkeypatch):
    """A ``flystage boom`` command whose run() raises what the test puts in ``raises``."""
    module = types.ModuleType("flystage_test_boom")
    module.raises = FlystageError("the thing is wrong; do this", exit_code=4)
    module.configure_parser = lambda parser: None

    def run(args):
        raise module.raises

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "boom", (module.__name__, "fails on purpose"))
    return module


def test_cli_main_maps_a_raised_error_to_the_prefix_and_its_code(boom_command, capsys) -> None:
    assert cli.main(["boom"]) == 4
    out, err = capsys.readouterr()
    assert out == "" and err == "flystage boom: error: the thing is wrong; do this\n"
    boom_command.raises = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["boom"])


def test_a_missing_folder_to_organise(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-folder"
    assert cli.main(["organise", str(missing), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flystage organise: error: ") and str(missing) in err
    assert not (tmp_path / "m.csv").exists()


def test_fetch_from_a_closed_port(tmp_path: Path, monkeypatch, capsys) -> None:
    """fetch exits 2 like every other command (it exited 1 before the convention)."""
    monkeypatch.delenv("FLYSTAGE_DATA", raising=False)  # else the local copy is used
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/bdgp.tar.gz"
    assert cli.main(["fetch", "--dest", str(tmp_path / "bdgp"), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flystage fetch: error: could not download {url}")
    assert "FLYSTAGE_DATA" in err


def test_local_mode_entry_points_map_errors_the_same_way(capsys) -> None:
    """``flystage local`` and ``python -m flystage_local`` are one command: one mapping."""
    from flystage_local.command import main

    assert cli.main(["local", "predict"]) == 2
    via_cli = capsys.readouterr().err
    assert main(["predict"]) == 2
    assert capsys.readouterr().err == via_cli
    assert (
        via_cli == "flystage local: error: give a folder of images (DIR=...) or --undo MANIFEST\n"
    )


def test_a_missing_cloud_settings_file(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "flystage.toml"
    assert cli.main(["cloud", "--config", str(missing), "--dry-run", "teardown"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flystage cloud: error: settings file {missing} not found")
