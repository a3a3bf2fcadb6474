"""The `flystage` command line: one sub-command per pipeline stage.

Each command lives in its own module, which provides ``configure_parser(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so that
``flystage predict`` works without torch installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from flystage import __version__
from flystage.errors import run_command
from flystage.subcommands import add_subcommands

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fetch": ("flystage.datasets", "download and verify the default BDGP example images"),
    "organise": ("flystage.organise", "scan image folders and write a split manifest (CSV)"),
    "augment": ("flystage.augment", "write an offline augmented copy of one split as PNG"),
    "train": ("flystage.training.train", "train a stage classifier and write the model artefact"),
    "evaluate": (
        "flystage.evaluate",
        "score a model on a manifest split: accuracy, recall, confusion",
    ),
    "crossval": ("flystage.training.crossval", "leave-one-group-out cross-validation"),
    "compare": (
        "flystage.compare",
        "two models on the same images: B - A per score with a paired bootstrap interval",
    ),
    "predict": (
        "flystage.predict",
        "top-3 stages for every image in a folder (CSV/JSON, --rename)",
    ),
    "review": (
        "flystage.review.command",
        "a local page to look at every prediction and correct the wrong ones",
    ),
    "local": (
        "flystage_local.command",
        "local mode: the real images run as SageMaker runs them (train, tune, serve, predict, "
        "stop)",
    ),
    "cloud": (
        "flystage.cloud.command",
        "AWS: push images, upload data, tune, train, deploy, predict, tear down",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its options."""
    parser = argparse.ArgumentParser(
        prog="flystage",
        description="Stage Drosophila embryo images: organise, train, evaluate, predict.",
    )
    parser.add_argument("--version", action="version", version=f"flystage {__version__}")
    parsers = add_subcommands(parser, COMMANDS, "command", "COMMAND")
    if command in parsers:
        importlib.import_module(COMMANDS[command][0]).configure_parser(parsers[command])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Importing only the chosen command's module keeps `flystage --help` fast and
    # `flystage predict` free of torch.
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return run_command(args.command, lambda: module.run(args))


if __name__ == "__main__":
    sys.exit(main())
