"""Train a stage classifier: the ``flystage train`` command and the SageMaker training program.

``main`` / ``run``: arguments (``configure_parser``: the data options, the SageMaker environment
``SM_*`` as their defaults, and one option per config field from
``flystage.training.config``), data-parallel training over ``SM_HOSTS`` (torch.distributed,
gloo), ``flystage.training.ensemble.train_model``, the model artefact, and the
``output/failure`` file when anything goes wrong. The epoch loop is
``flystage.training.loop``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from flystage import formats
from flystage.channels import DataError, FolderRules, data_summary, split_channels
from flystage.files import atomic_write
from flystage.manifest import Record, manifest_sha256
from flystage.options import ArgumentParser, UsageError, integer, regex_text
from flystage.organise import iter_images
from flystage.training.config import TrainConfig, add_config_options, config_from_args
from flystage.training.ensemble import train_model
from flystage.training.loop import STOP, FitResult, TrainingStopped, dist_info, saved_model_line

DEFAULT_DIST_PORT = 29500
DEFAULT_DIST_TIMEOUT_S = 900
EXIT_STOPPED = 3  # stopped early on request (SIGTERM, stop_after_epoch); a checkpoint was saved


def _base_dir() -> Path:
    return Path(os.environ.get("SAGEMAKER_BASE_DIR", "/opt/ml"))


def _in_sagemaker() -> bool:
    return "SM_TRAINING_ENV" in os.environ or "SM_MODEL_DIR" in os.environ


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    """The channels, output folders and hosts, each defaulting to the SageMaker environment."""
    env = os.environ.get
    io = parser.add_argument_group("data and output (defaults from the SageMaker environment)")
    io.add_argument(
        "--manifest",
        "--train",
        dest="train",
        default=env("SM_CHANNEL_TRAIN"),
        help=(
            "manifest CSV, a folder holding manifest.csv, or a <label>/<images> tree "
            "(SM_CHANNEL_TRAIN)"
        ),
    )
    io.add_argument(
        "--valid",
        default=env("SM_CHANNEL_VALID", env("SM_CHANNEL_VALIDATION")),
        help="validation channel, same forms (SM_CHANNEL_VALID or SM_CHANNEL_VALIDATION); "
        "default: the manifest's valid rows",
    )
    io.add_argument(
        "--unlabelled",
        default=env("SM_CHANNEL_UNLABELLED"),
        help="a folder of the lab's unlabelled images (any nesting; SM_CHANNEL_UNLABELLED): the "
        "probe standardises its features by them too and, with self_training, learns from the "
        "ones it names with confidence",
    )
    io.add_argument(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        default=env("SM_MODEL_DIR"),
        help="where the model artefact is written (SM_MODEL_DIR)",
    )
    io.add_argument(
        "--output_data_dir",
        "--output-data-dir",
        dest="output_data_dir",
        default=env("SM_OUTPUT_DATA_DIR"),
        help="where per-epoch metrics are written (SM_OUTPUT_DATA_DIR)",
    )
    default_checkpoints = str(_base_dir() / "checkpoints") if _in_sagemaker() else None
    io.add_argument(
        "--checkpoint_dir",
        "--checkpoint-dir",
        dest="checkpoint_dir",
        default=default_checkpoints,
        help="checkpoint every epoch here and resume from it (SageMaker: <base>/checkpoints)",
    )
    io.add_argument(
        "--hosts",
        type=json.loads,
        default=json.loads(env("SM_HOSTS", "[]")),
        help="JSON list of hosts (SM_HOSTS); more than one trains data-parallel",
    )
    io.add_argument(
        "--current_host",
        "--current-host",
        dest="current_host",
        default=env("SM_CURRENT_HOST"),
        help="this host's name (SM_CURRENT_HOST)",
    )
    io.add_argument("--force", action="store_true", help="replace a model already in --model-dir")


def _add_folder_channel_options(parser: argparse.ArgumentParser) -> None:
    """How a channel without manifest.csv is labelled and grouped."""
    rules = parser.add_argument_group(
        "folder channels (a channel without manifest.csv is read as `flystage organise` reads a "
        "folder)"
    )
    rules.add_argument(
        "--label_regex",
        "--label-regex",
        dest="label_regex",
        type=regex_text,
        default=None,
        help="regex with a named group 'label', searched in each image's path below the channel",
    )
    rules.add_argument(
        "--label_level",
        "--label-level",
        dest="label_level",
        type=integer,
        default=None,
        help="take the label from the N-th folder up (1 = the image's own folder); default: the "
        "nearest folder that looks like a stage (refused when that is a guess)",
    )
    rules.add_argument(
        "--group_regex",
        "--group-regex",
        dest="group_regex",
        type=regex_text,
        default=None,
        help="regex with a named group 'group' on each image's path below the channel, e.g. "
        "'^(?P<group>[^/]+)/'; needed to draw the validation split from a folder channel",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Options of ``flystage train`` and of the SageMaker program (hyperparameters with
    underscores; hyphen aliases accepted). Paths default to the SageMaker environment."""
    _add_data_options(parser)
    _add_folder_channel_options(parser)
    add_config_options(parser)


def _init_distributed(
    hosts: list[str], current_host: str | None, log: Callable[[str], None]
) -> tuple[int, int]:
    """Join the process group when there is more than one host: master = the first host of the
    sorted list (``FLYSTAGE_MASTER_ADDR`` overrides its address), port ``FLYSTAGE_DIST_PORT``."""
    hosts = sorted(hosts)
    if len(hosts) <= 1:
        return 0, 1
    if current_host not in hosts:
        raise UsageError(
            f"current host {current_host!r} is not in the hosts {hosts} (SM_CURRENT_HOST, SM_HOSTS)"
        )
    rank, world = hosts.index(current_host), len(hosts)
    master = os.environ.get("FLYSTAGE_MASTER_ADDR", hosts[0])
    port = int(os.environ.get("FLYSTAGE_DIST_PORT", DEFAULT_DIST_PORT))
    timeout = datetime.timedelta(
        seconds=float(os.environ.get("FLYSTAGE_DIST_TIMEOUT", DEFAULT_DIST_TIMEOUT_S))
    )
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.environ.get("SM_NETWORK_INTERFACE_NAME"):
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["SM_NETWORK_INTERFACE_NAME"]
    log(f"host={current_host} rank={rank} world_size={world}: joining tcp://{master}:{port} (gloo)")
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world, timeout=timeout
    )
    return rank, world


def _write_history(
    output_dir: Path, history: list[dict[str, float]], best: dict[str, float]
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(output_dir / "history.csv") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)
    with atomic_write(output_dir / "metrics.json") as f:
        f.write(json.dumps({"best": best, "history": history}, indent=2) + "\n")


def _write_failure(message: str) -> Path | None:
    """``<base>/output/failure``: SageMaker shows its first 1024 characters as FailureReason."""
    if not _in_sagemaker():
        return None
    path = _base_dir() / "output" / "failure"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(message)
    except OSError:
        return None
    return path


def _log(line: str) -> None:
    print(line, flush=True)


def _refuse_existing_model(model_dir: str, force: bool) -> None:
    """Every flystage command refuses to replace results without --force; a model too."""
    from flystage.artefact import METADATA_FILE, ONNX_FILE

    if force or not any((Path(model_dir) / name).exists() for name in (ONNX_FILE, METADATA_FILE)):
        return
    try:  # the best-so-far model of a stopped run is provisional: its restart replaces it
        if "stopped" in json.loads((Path(model_dir) / METADATA_FILE).read_text(encoding="utf-8")):
            return
    except (OSError, ValueError):
        pass
    raise UsageError(
        f"{model_dir} already holds a model; choose another --model-dir or pass --force to "
        "replace it"
    )


def _save(
    args: argparse.Namespace,
    result: FitResult,
    config: TrainConfig,
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    manifest: Path | None,
    world: int,
    stopped: str | None = None,
) -> None:
    """The model artefact (and the history) of a finished or a stopped run."""
    from flystage.training.export import save_artefact  # needs onnx: imported only where used

    extra = {
        "train_config": config.to_dict(),
        "train_images": len(train_records),
        "valid_images": len(valid_records),
        "world_size": world,
    }
    if result.pseudo_labels:
        extra["pseudo_labelled_images"] = len(result.pseudo_labels)
    if stopped:
        extra["stopped"] = stopped
    _log(saved_model_line(result.best))
    save_artefact(
        args.model_dir,
        result.model,
        config.arch,
        result.labels,
        config.preprocess,
        metrics=result.best,
        manifest_sha256=manifest_sha256(manifest) if manifest else None,
        spec=result.spec,
        extra=extra,
    )
    _log(
        f"model artefact written to {args.model_dir}"
        + (" (best model so far of a stopped run)" if stopped else "")
    )
    if config.int8 and not stopped:  # a stopped run's provisional model stays float
        from flystage.training.quantise import add_int8_for_run

        add_int8_for_run(
            args.model_dir,
            config.preprocess,
            result.labels,
            train_records,
            valid_records,
            config.seed,
            _log,
            threads=config.threads or None,
        )
    elif config.int8:
        _log("int8: not made for the provisional model of a stopped run")
    if args.output_data_dir and result.history:
        _write_history(Path(args.output_data_dir), result.history, result.best)


def _unlabelled_images(
    folder: str | None, train_records: Sequence[Record], valid_records: Sequence[Record]
) -> list[Path]:
    """Every image under ``folder`` (as ``flystage organise`` finds them) that is not a
    training or validation image; [] without a folder."""
    if not folder:
        return []
    if not Path(folder).is_dir():
        raise UsageError(f"--unlabelled {folder}: not a folder; give a folder of images")
    labelled = {r.path.resolve() for r in (*train_records, *valid_records)}
    images, _ = iter_images([folder])
    found = [p for p in images if p.resolve() not in labelled]
    if not found:
        raise DataError(
            f"--unlabelled {folder}: no images there besides the labelled ones (looked for "
            f"{formats.suffix_text()})"
        )
    _log(f"unlabelled: {len(found)} images from {folder}")
    return found


def _note_unused_by_probe(args: argparse.Namespace, config: TrainConfig) -> None:
    """Say which given hyperparameters the exactly solved probe does not use."""
    solved = [
        name
        for name in ("learning_rate", "batch_size", "epochs")
        if getattr(args, name, None) is not None
    ]
    if (
        solved
        and all(config.mode_of(a) == "probe" for a in config.member_archs)
        and config.probe_solver == "lbfgs"
    ):
        # A tuning job over these would train the same model every trial: say so in its log.
        _log(
            f"note: {', '.join(solved)} not used: the probe's head is solved exactly "
            "(probe_solver=lbfgs); tune probe_l2, or train with probe_solver=sgd or "
            "mode=finetune"
        )


def _report_failure(exc: Exception) -> None:
    """Write the failure file and say on stderr why training failed (with the traceback
    unless it is a usage or data error)."""
    cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = f"{cause}\n\n{traceback.format_exc()}"
    where = _write_failure(text)
    print(
        f"training failed: {cause}" + (f" (traceback in {where})" if where else ""),
        file=sys.stderr,
        flush=True,
    )
    if not isinstance(exc, (UsageError, DataError)):
        traceback.print_exc()


def run(args: argparse.Namespace) -> int:
    """Train from parsed arguments; 0 on success, ``EXIT_STOPPED`` when stopped with a
    checkpoint, 1 on an error (traceback in ``<base>/output/failure`` under SageMaker)."""
    previous_handler = signal.getsignal(signal.SIGTERM)
    STOP.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())
    try:
        config = config_from_args(args)
        _note_unused_by_probe(args, config)
        if not args.train:
            raise UsageError("no training data: give --manifest (or set SM_CHANNEL_TRAIN)")
        if not args.model_dir:
            raise UsageError("no model dir: give --model-dir (or set SM_MODEL_DIR)")
        _refuse_existing_model(args.model_dir, args.force)
        if config.threads:
            torch.set_num_threads(config.threads)
        rank, world = _init_distributed(args.hosts, args.current_host, _log)
        rules = FolderRules(args.label_regex, args.label_level, args.group_regex)
        train_records, valid_records, manifest = split_channels(
            args.train, args.valid, seed=config.seed, rules=rules, log=_log
        )
        _log(data_summary(train_records, valid_records))
        unlabelled = _unlabelled_images(args.unlabelled, train_records, valid_records)
        result = train_model(
            train_records,
            valid_records,
            config,
            work_dir=args.checkpoint_dir,
            log=_log,
            unlabelled=unlabelled,
        )
        _log(
            f"host={args.current_host or 'local'} rank={rank} world_size={world} "
            f"samples={result.samples_seen}"
        )
        if rank == 0:
            _save(args, result, config, train_records, valid_records, manifest, world)
        if world > 1:
            dist.barrier()  # nobody leaves before rank 0 has written the artefact
        return 0
    except TrainingStopped as exc:
        if exc.result is not None and dist_info()[0] == 0 and args.model_dir:
            _save(
                args,
                exc.result,
                config,
                train_records,
                valid_records,
                manifest,
                world,
                stopped=f"{exc} (best epoch {exc.result.best['epoch']} so far)",
            )
        _log(f"{exc}; run again with the same checkpoint dir to resume")
        _write_failure(
            f"{exc}: checkpoint {exc.checkpoint}; run again with the same checkpoint dir to "
            "resume\n"
        )
        return EXIT_STOPPED
    except Exception as exc:
        _report_failure(exc)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_handler)


def main(argv: list[str] | None = None) -> int:
    """The SageMaker training program: ``train_flystage.py --key value ...``."""
    parser = ArgumentParser(
        prog="train_flystage.py", description="Train a flystage stage classifier."
    )
    configure_parser(parser)
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        where = _write_failure(f"{exc}\n\n{parser.format_usage()}")
        print(
            f"training failed: {exc}" + (f" (written to {where})" if where else ""),
            file=sys.stderr,
            flush=True,
        )
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
