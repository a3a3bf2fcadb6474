"""Command line of local mode: ``flystage local {train,tune,serve,predict,stop}``.

Installed with flystage (``python -m flystage_local`` is the same command); the Makefile's
``local-*`` targets call it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flystage import jobdef, predict
from flystage.cloud.settings import CloudError, load_settings
from flystage.cloud.training import job_name, parse_hyperparameters
from flystage.errors import run_command
from flystage.subcommands import add_subcommands
from flystage_local import LocalModeError, channels, containers, serving, training, tuning

DEFAULT_DATA = os.environ.get(
    "FLYSTAGE_DATA",
    str(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bdgp-insitu"),
)


def build_request(
    image: str,
    hyperparameters: dict[str, str],
    channel: Path,
    instances: int,
    name: str,
    jobs_root: Path,
    checkpoints: Path | None = None,
) -> dict:
    """The CreateTrainingJob request, built by ``flystage.jobdef`` as the cloud target builds it.

    Cloud settings (flystage.toml / FLYSTAGE_* env) supply instance type, runtime and tags;
    the data, output and checkpoints are local folders (``file://``) instead of S3.
    """
    try:
        settings = load_settings().replace(instance_count=instances, spot=False)
        return jobdef.training_job_request(
            settings,
            image,
            hyperparameters,
            {jobdef.DATA_CHANNEL: f"file://{channel}"},
            job_name=name,
            output_uri=f"file://{jobs_root.resolve() / name}",
            checkpoint_uri=f"file://{checkpoints.resolve()}" if checkpoints else None,
        )
    except (CloudError, ValueError) as exc:
        raise LocalModeError(str(exc)) from None


def _stage(args: argparse.Namespace) -> Path:
    channel, report = channels.stage_channel(args.data, args.runs / "channels")
    print(report)
    return channel


def cmd_train(args: argparse.Namespace) -> int:
    channel = _stage(args)
    name = args.job_name or job_name("local")
    request = build_request(
        args.image,
        parse_hyperparameters(args.hp.split()),
        channel,
        args.instances,
        name,
        args.runs,
        args.checkpoints,
    )
    print(
        f"job {name}: {args.instances} host(s), image {args.image}, "
        f"hyperparameters {request['HyperParameters']}"
    )
    result = training.run_training_job(request, args.runs, stop_grace=args.stop_grace)
    print("\n".join(training.status_lines(result)))
    return 0 if result.succeeded else 1


def cmd_tune(args: argparse.Namespace) -> int:
    fixed = parse_hyperparameters(args.hp.split())
    # The same ranges, for the same mode, as the SageMaker tuning job (flystage.jobdef).
    ranges = jobdef.tuning_ranges(fixed)
    trials = tuning.trial_count(args.trials, fixed)
    channel = _stage(args)
    search = args.job_name or job_name("tune")
    folder = args.runs / search
    folder.mkdir(parents=True)
    print(
        f"tuning {search}: {trials} trial(s) over {[d.name for d in tuning.dimensions(ranges)]}, "
        f"objective {jobdef.OBJECTIVE_METRIC} (maximise), fixed {fixed}"
    )

    def run_job(suffix: str, tuned: dict[str, str]) -> training.JobResult:
        request = build_request(
            args.image, {**fixed, **tuned}, channel, args.instances, f"{search}-{suffix}", folder
        )
        return training.run_training_job(request, folder, write=None, stop_grace=args.stop_grace)

    def report(trial: tuning.Trial) -> None:
        print(
            f"trial {trial.number}: {trial.hyperparameters} -> {trial.job.status}, "
            f"{jobdef.OBJECTIVE_METRIC}={trial.objective} ({trial.job.seconds:.0f} s)",
            flush=True,
        )
        if trial.job.failure_reason:
            print("  " + trial.job.failure_reason.strip().splitlines()[-1])

    trials = tuning.run_search(run_job, trials, seed=args.seed, ranges=ranges, report=report)
    print(tuning.table(trials))
    tuning.write_summary(trials, folder / "tuning.json")
    best = tuning.best_trial(trials)
    if best is None:
        print(f"no trial reported {jobdef.OBJECTIVE_METRIC}; see {folder}")
        return 1
    print(f"best trial {best.number} ({best.job.name}): {jobdef.OBJECTIVE_METRIC}={best.objective}")
    print("best hyperparameters: " + " ".join(f"{k}={v}" for k, v in best.hyperparameters.items()))
    print(f"model artefact: {best.job.model_artefact}\nsummary: {folder / 'tuning.json'}")
    return 0


def _latest_model(runs: Path) -> Path:
    found = sorted(runs.glob("*/model.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise LocalModeError(
            f"no model.tar.gz under {runs}; train with `make local-train` or give MODEL=..."
        )
    return found[-1]


def cmd_serve(args: argparse.Namespace) -> int:
    model = args.model or _latest_model(args.runs)
    env = dict(e.split("=", 1) for e in args.env)
    url, seconds = serving.start_server(
        model, args.image, args.runs / "models", args.port, args.timeout, env
    )
    print(f"serving {model} at {url} (healthy after {seconds:.1f} s); `make local-stop` stops it")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    if args.undo:
        return predict.run_undo(args.undo)
    if args.folder is None:
        raise LocalModeError("give a folder of images (DIR=...) or --undo MANIFEST")
    predictor = serving.ContainerPredictor(serving.server_url(args.port))
    predictor.check()
    return predict.run_with(predictor, args, {"server": predictor.url})


def cmd_stop(args: argparse.Namespace) -> int:
    removed, networks = containers.remove_everything(containers.connect())
    print(
        f"removed {len(removed)} container(s) {removed} and {len(networks)} network(s) {networks}"
    )
    return 0


# command -> (handler(args) -> exit code, one-line help)
COMMANDS = {
    "train": (cmd_train, "run one training job"),
    "tune": (cmd_tune, "run a small hyperparameter search"),
    "serve": (cmd_serve, "start the serve image on a model.tar.gz"),
    "predict": (cmd_predict, "send every image of a folder to the local server"),
    "stop": (cmd_stop, "remove every container and network local mode made"),
}


def _add_job_options(parsers: dict[str, argparse.ArgumentParser]) -> None:
    """The options of ``train`` and ``tune``."""
    for name in ("train", "tune"):
        s = parsers[name]
        s.add_argument(
            "--data",
            nargs="+",
            default=[DEFAULT_DATA],
            help="image folders (gene/stage/image) or one manifest CSV (default $FLYSTAGE_DATA)",
        )
        s.add_argument(
            "--instances",
            type=int,
            default=1,
            help="hosts (ResourceConfig.InstanceCount, default 1)",
        )
        s.add_argument("--hp", default="", help="hyperparameters, 'name=value name=value'")
        s.add_argument(
            "--image",
            default=os.environ.get("TRAIN_IMAGE", "flystage-train:latest"),
            help="train image",
        )
        s.add_argument("--job-name", help="job (or tuning) name; default a fresh timestamped one")
        s.add_argument(
            "--stop-grace",
            type=int,
            default=training.STOP_GRACE_SECONDS,
            help="seconds between SIGTERM and SIGKILL when a job is stopped",
        )
    parsers["train"].add_argument(
        "--checkpoints",
        type=Path,
        help="checkpoint folder kept between jobs (CheckpointConfig); a rerun resumes from it",
    )
    parsers["tune"].add_argument(
        "--trials", type=int, default=4, help="training jobs to run (default 4)"
    )
    parsers["tune"].add_argument(
        "--seed", type=int, default=0, help="seed of the quasi-random design"
    )


def _add_serve_options(s: argparse.ArgumentParser) -> None:
    """The options of ``serve``."""
    s.add_argument(
        "--model", type=Path, help="model.tar.gz or model folder (default: the newest under --runs)"
    )
    s.add_argument(
        "--image",
        default=os.environ.get("SERVE_IMAGE", "flystage-serve:latest"),
        help="serve image",
    )
    s.add_argument(
        "--port", type=int, default=serving.DEFAULT_PORT, help="port on 127.0.0.1 (default 8080)"
    )
    s.add_argument(
        "--timeout",
        type=float,
        default=serving.DEFAULT_START_TIMEOUT,
        help="seconds to wait for /ping",
    )
    s.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="container environment (e.g. SAGEMAKER_MODEL_SERVER_WORKERS=2)",
    )


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add local mode's options and sub-commands to ``p`` (``flystage local``'s parser)."""
    p.add_argument(
        "--runs",
        type=Path,
        default=Path("runs/local"),
        help="folder of jobs, channels and models (default runs/local)",
    )
    parsers = add_subcommands(p, COMMANDS, "local_command", "LOCAL_COMMAND")
    _add_job_options(parsers)
    _add_serve_options(parsers["serve"])
    predict.add_output_arguments(parsers["predict"])
    parsers["predict"].add_argument(
        "--port", type=int, default=serving.DEFAULT_PORT, help="the server's port on 127.0.0.1"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flystage local", description=__doc__.splitlines()[0])
    configure_parser(p)
    return p


def run(args: argparse.Namespace) -> int:
    handler, _ = COMMANDS[args.local_command]
    return handler(args)


def main(argv: list[str] | None = None) -> int:
    """``python -m flystage_local``: the same command, and the same error convention, as
    ``flystage local``."""
    return run_command("local", lambda: run(parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
