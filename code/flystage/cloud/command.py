"""``flystage cloud TARGET``: push, upload, tune, train, deploy, predict, batch-predict, teardown.

Settings come from ``flystage.toml`` (``--config``) and ``FLYSTAGE_*`` variables;
``--dry-run`` prints each AWS request as JSON instead of sending it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flystage.subcommands import add_subcommands


def _hp_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hp",
        nargs="*",
        default=None,
        metavar="NAME=VALUE",
        help="hyperparameters (for example learning_rate=0.01 epochs=30)",
    )


def _policies_arguments(policies: argparse.ArgumentParser, check: argparse.ArgumentParser) -> None:
    source_arn = (
        "also require aws:SourceArn in the trust policy (off: SageMaker may not send it on every "
        "AssumeRole; aws:SourceAccount is always required)"
    )
    policies.add_argument(
        "--out",
        type=Path,
        default=Path("runs/cloud/iam"),
        help="folder to write them to (default: runs/cloud/iam)",
    )
    policies.add_argument("--source-arn", action="store_true", help=source_arn)
    check.add_argument(
        "--policies",
        type=Path,
        help="check the policies in this folder (default: those `policies` generates)",
    )
    check.add_argument("--source-arn", action="store_true", help=source_arn)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="settings file (default: $FLYSTAGE_CONFIG or ./flystage.toml)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the AWS requests as JSON; send nothing"
    )
    p = add_subcommands(parser, TARGETS, "target", "TARGET")

    p["upload"].add_argument(
        "manifest", type=Path, help="the manifest CSV (flystage organise) or of an augmented set"
    )
    p["upload"].add_argument(
        "--multipart-threshold-mb", type=float, default=64, help="files above this go in parts"
    )

    _hp_argument(p["tune"])
    p["tune"].add_argument(
        "--max-jobs", type=int, help="trials in total (default: tuning_max_jobs)"
    )
    p["tune"].add_argument(
        "--parallel-jobs", type=int, help="trials at once (default: tuning_parallel_jobs)"
    )
    p["tune"].add_argument("--no-wait", action="store_true", help="start the job and return")
    p["tune"].add_argument(
        "--warm-start",
        action="append",
        default=[],
        metavar="TUNING_JOB",
        help="seed the search with this finished tuning job's trials (same data, image and HP=; "
        "repeat for up to 5)",
    )

    _hp_argument(p["train"])
    p["train"].add_argument(
        "--tuning-job", help="take the best hyperparameters of this tuning job (default: the last)"
    )
    p["train"].add_argument("--instance-count", type=int, help="instances (data-parallel when > 1)")
    p["train"].add_argument(
        "--spot", action=argparse.BooleanOptionalAction, default=None, help="managed spot training"
    )
    p["train"].add_argument(
        "--unlabelled",
        help="s3:// prefix of the lab's unlabelled images: the job's channel 'unlabelled' "
        "(feature statistics and, with hyperparameter self_training, pseudo-labels)",
    )
    p["train"].add_argument("--no-wait", action="store_true", help="start the job and return")

    p["deploy"].add_argument(
        "--model-data", help="s3://.../model.tar.gz (default: the last training job's)"
    )
    p["deploy"].add_argument(
        "--serverless",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serverless endpoint",
    )
    p["deploy"].add_argument(
        "--no-wait", action="store_true", help="return before the endpoint is InService"
    )

    from flystage.predict import add_output_arguments

    add_output_arguments(p["predict"])
    p["predict"].add_argument(
        "--concurrency", type=int, default=4, help="requests in flight (default 4)"
    )

    _policies_arguments(p["policies"], p["check"])

    p["batch-predict"].add_argument(
        "source", help="s3:// prefix of images, or a local folder (uploaded first)"
    )
    p["batch-predict"].add_argument(
        "--model-data", help="s3://.../model.tar.gz (default: the last training job's)"
    )
    p["batch-predict"].add_argument(
        "--out", type=Path, help="with a local folder: the top-3 CSV to write"
    )
    p["batch-predict"].add_argument(
        "--force", action="store_true", help="replace an existing --out CSV/JSON"
    )


def _emit(api, args: argparse.Namespace):
    """Where results go: stdout, or stderr in a dry run (whose stdout is only the JSON requests)."""
    return api.say if args.dry_run else print


def _hyperparameters(args: argparse.Namespace) -> dict[str, str] | None:
    if args.hp is None:
        return None
    from flystage.cloud.training import parse_hyperparameters

    return parse_hyperparameters(args.hp)


def _push(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.ecr import push

    for local, uri in push(api, settings).items():
        _emit(api, args)(f"{local} -> {uri}")
    return 0


def _upload(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.s3 import upload_dataset

    report = upload_dataset(
        api,
        settings,
        args.manifest,
        multipart_threshold=int(args.multipart_threshold_mb * 2**20),
    )
    if not args.dry_run:
        print(
            f"{report.uri}: uploaded {len(report.uploaded)}, replaced {len(report.replaced)}, "
            f"unchanged {len(report.skipped)}"
        )
    return 0


def _tune(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.tuning import tune

    tune(
        api,
        settings,
        _hyperparameters(args),
        max_jobs=args.max_jobs,
        parallel_jobs=args.parallel_jobs,
        wait=not args.no_wait,
        warm_start=args.warm_start,
    )
    return 0


def _train(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.training import train

    train(
        api,
        settings,
        _hyperparameters(args),
        tuning_job=args.tuning_job,
        wait=not args.no_wait,
        unlabelled=args.unlabelled,
    )
    return 0


def _deploy(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.hosting import deploy

    deploy(api, settings, args.model_data, wait=not args.no_wait)
    return 0


def _predict(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.endpoint import predict_folder

    return predict_folder(api, settings, args)


def _batch_predict(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.batch import batch_predict

    _emit(api, args)(
        batch_predict(
            api,
            settings,
            args.source,
            model_data=args.model_data,
            out_csv=args.out,
            force=args.force,
        )
    )
    return 0


def _teardown(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.hosting import teardown

    teardown(api, settings)
    return 0


def _policies(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.policies import write_policies

    settings.require("region", "role_arn", "bucket")
    for path in write_policies(settings, args.out, source_arn=args.source_arn):
        print(path)
    return 0


def _check(api, settings, args: argparse.Namespace) -> int:
    from flystage.cloud.check import run_check

    return run_check(settings, args.policies, source_arn=args.source_arn)


# target -> (handler(api, settings, args) -> exit code, one-line help)
TARGETS = {
    "push": (
        _push,
        "create the ECR repositories, log in, tag and push the train and serve images",
    ),
    "upload": (
        _upload,
        "upload a manifest and its images to s3://bucket/prefix/data/ (skips unchanged files)",
    ),
    "tune": (
        _tune,
        "hyperparameter tuning job (Bayesian over what the mode uses: probe_l2 and "
        "probe_columns for the default exact probe, else learning_rate and batch_size; maximise "
        "valid:top3)",
    ),
    "train": (_train, "training job with the best (or given) hyperparameters"),
    "deploy": (
        _deploy,
        "model, endpoint config and endpoint on the serve image; waits until InService",
    ),
    "predict": (
        _predict,
        "top-3 stages for a folder of images through the endpoint (CSV/JSON, --rename)",
    ),
    "batch-predict": (
        _batch_predict,
        "batch transform over images in S3 (or a local folder, uploaded first)",
    ),
    "teardown": (
        _teardown,
        "delete the endpoint, its config and model if they carry flystage's tags (never S3 data "
        "or images)",
    ),
    "policies": (
        _policies,
        "write the IAM policies (execution role, its trust, operator) for the settings",
    ),
    "check": (_check, "dry run of every target, its requests checked against the IAM policies"),
}


def run(args: argparse.Namespace) -> int:
    from flystage.cloud.dryrun import DryRunApi
    from flystage.cloud.session import Api
    from flystage.cloud.settings import load_settings

    settings = load_settings(args.config)
    if getattr(args, "instance_count", None) is not None or getattr(args, "spot", None) is not None:
        settings = settings.replace(instance_count=args.instance_count, spot=args.spot)
    if getattr(args, "serverless", None) is not None:
        settings = settings.replace(serverless=args.serverless)
    # Options go through the same checks as the file and FLYSTAGE_* (--spot and max_wait_s).
    settings = settings.validate()
    api = (DryRunApi if args.dry_run else Api)(settings)
    handler, _ = TARGETS[args.target]
    return handler(api, settings, args)
