"""``flystage predict``: top-k stages for every image in a folder (no torch on this path).

``flystage predict FOLDER --model DIR`` writes a CSV (``file, stage_1, p_1, ..., error``) and
a JSON file (which also records the folder and the model, for ``flystage review``);
``--rename`` appends the top-3 to each file name
(``embryo12.tif -> embryo12__s11-12_s13-16_s9-10.tif``) after writing an undo manifest
(symbolic links are skipped: neither they nor their targets are renamed), and
``flystage predict --undo MANIFEST`` restores the names. ``--unsure-below P`` adds a column
``unsure`` (true when the top-1 probability is below P: the images a biologist should look
at) and leaves those images under their own names with ``--rename``.

This module is the command only: the model is :mod:`flystage.predictor`, the CSV/JSON
:mod:`flystage.outputs`, the renaming :mod:`flystage.rename`. Any ``SourcePredictor`` (an HTTP
client for the serve container or a SageMaker endpoint too) gets the same command line from
``add_output_arguments`` + ``run_with``.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from flystage import formats
from flystage.artefact import PRECISIONS
from flystage.errors import FlystageError
from flystage.files import REPLACE_HINT, unwritable_reason
from flystage.imaging import set_threads
from flystage.organise import iter_images
from flystage.outputs import write_csv, write_json
from flystage.predictor import (
    DEFAULT_READERS,
    DEFAULT_WORKERS,
    Predictor,
    SourcePredictor,
    describe_model,
    is_unsure,
    predict_files,
)
from flystage.rename import rename_files, undo_renames


def unsure_threshold(text: str) -> float:
    """argparse type of ``--unsure-below``: a probability strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number; give a probability such as 0.8"
        ) from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(
            f"{text} is not between 0 and 1 (exclusive); give a probability such as 0.8"
        )
    return value


class PredictError(FlystageError):
    """Bad usage of ``flystage predict`` (or of ``run_with`` for another predictor): a missing
    folder, an output that exists or cannot be written, a model that cannot be used. Raised
    before any image is predicted; the message is printable whatever bytes the file names hold.
    """

    def __init__(self, message: str = "", *args: object, exit_code: int | None = None):
        super().__init__(_printable(message), *args, exit_code=exit_code)


def _printable(text: str) -> str:
    """``text`` with undecodable file-name bytes (surrogate escapes) shown as ``\\udcXX``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _print(text: str = "", file=None) -> None:
    print(_printable(text), file=file)


# ---- command line ----------------------------------------------------------------------------


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every folder predictor shares (local model, local container, endpoint)."""
    parser.add_argument(
        "folder", nargs="?", type=Path, help="folder of images (searched recursively) or one image"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("predictions.csv"),
        help=(
            "CSV to write (default predictions.csv). A cell starting with =, +, -, @, a tab or a "
            "carriage return (a file name, say) gets a leading single quote, so a spreadsheet "
            "shows it as text, never as a formula (OWASP's CSV-injection rule)"
        ),
    )
    parser.add_argument(
        "--json", type=Path, help="JSON to write (default: the CSV's name with .json)"
    )
    parser.add_argument("--force", action="store_true", help="replace existing CSV/JSON outputs")
    parser.add_argument("--k", type=int, default=3, help="how many stages per image (default 3)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument(
        "--workers", type=int, default=1, help="batches in flight at once (default 1)"
    )
    parser.add_argument(
        "--unsure-below",
        type=unsure_threshold,
        metavar="P",
        help=(
            "add a column 'unsure' (true/false): true when the top-1 probability is below P, a "
            "number between 0 and 1 (default: no column). With --rename, unsure images keep "
            "their names. `flystage evaluate` prints the share of images each threshold accepts "
            "and their accuracy"
        ),
    )
    parser.add_argument(
        "--rename",
        action="store_true",
        help=(
            "append the top-k stages to each file name (not for unsure images, with "
            "--unsure-below). Symbolic links are skipped and reported: neither the link nor its "
            "target is renamed"
        ),
    )
    parser.add_argument(
        "--undo-manifest",
        type=Path,
        help=(
            "where --rename records old->new names (default: next to --out); checked writable "
            "before any prediction"
        ),
    )
    parser.add_argument(
        "--undo",
        type=Path,
        metavar="MANIFEST",
        help="restore the names recorded by an earlier --rename",
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_output_arguments(parser)
    parser.add_argument("--model", type=Path, help="model directory (model.onnx + metadata.json)")
    parser.add_argument(
        "--threads", type=int, help="onnxruntime threads per batch (default: cores / workers)"
    )
    parser.add_argument(
        "--readers",
        type=int,
        default=DEFAULT_READERS,
        help=(
            f"threads reading and preprocessing images ahead of the model (default "
            f"{DEFAULT_READERS})"
        ),
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help=(
            "which of the model's graphs to run: auto (default) = the int8 one when training kept "
            "it (it answered like the float one on the validation images; metadata.json's "
            "'int8' says why), else float; int8 = refuse a model without one"
        ),
    )
    # Batches in flight, one onnxruntime thread each (see bench-predict and docs/speed.md).
    parser.set_defaults(workers=DEFAULT_WORKERS)


def run_undo(manifest: Path) -> int:
    """Restore the names an undo manifest records: exit code 0, or 1 when some were not."""
    try:
        report = undo_renames(manifest)
    except (OSError, ValueError) as exc:
        raise PredictError(str(exc)) from None
    _print(report.text().replace("renamed", "restored", 1))
    return 1 if report.problems else 0


def run_with(
    predictor: SourcePredictor, args: argparse.Namespace, model_info: dict[str, Any] | None = None
) -> int:
    """Predict ``args.folder`` with ``predictor``, write CSV/JSON, rename if asked.

    Exit code 0 when every image was predicted (and renamed if asked), 1 when some were not;
    bad usage raises :class:`PredictError` (exit code 2) before any image is predicted.
    ``args.undo`` restores names instead (no predictor call).
    """
    if getattr(args, "undo", None):
        return run_undo(args.undo)
    if args.folder is None:
        raise PredictError("give the FOLDER of images to predict (or --undo MANIFEST)")
    if args.k < 1 or args.batch_size < 1:
        raise PredictError("--k and --batch-size must be at least 1")
    folder, paths = _find_images(args.folder)
    json_path, undo_path = _output_paths(args)
    root = folder if folder.is_dir() else folder.parent
    predictions = predict_files(
        predictor,
        paths,
        root=root,
        k=args.k,
        batch_size=args.batch_size,
        workers=getattr(args, "workers", 1),
        readers=getattr(args, "readers", 1),
    )
    below = getattr(args, "unsure_below", None)
    write_csv(predictions, args.out, k=args.k, force=args.force, unsure_below=below)
    write_json(
        predictions, json_path, model=model_info, force=args.force, unsure_below=below, images=root
    )
    errors = [p for p in predictions if p.error]
    for p in errors:
        _print(f"unreadable: {p.error}", file=sys.stderr)
    unsure = (
        ""
        if below is None
        else (
            f", {sum(bool(is_unsure(p, below)) for p in predictions)} unsure (top-1 below "
            f"{below:g})"
        )
    )
    _print(
        f"predicted {len(predictions) - len(errors)} of {len(predictions)} image(s){unsure}; "
        f"wrote {args.out} and {json_path}"
    )
    status = 1 if errors else 0
    if args.rename:
        report = rename_files(paths, predictions, undo_path, k=args.k, unsure_below=below)
        _print(report.text())
        _print(f"undo with: flystage predict --undo {undo_path}")
        status = 1 if report.problems or errors else 0
    return status


def _find_images(folder: Path) -> tuple[Path, list[Path]]:
    """The resolved ``folder`` and the images under it; PredictError when there are none.
    Ignored files are counted on stderr."""
    folder = folder.expanduser().resolve()
    if not folder.exists():
        raise PredictError(f"{folder}: no such folder or file")
    paths, ignored = iter_images([folder])
    if ignored:
        _print(
            "ignored: " + ", ".join(f"{n} {why}" for why, n in sorted(ignored.items())),
            file=sys.stderr,
        )
    if not paths:
        raise PredictError(f"no images ({formats.suffix_text()}) under {folder}")
    return folder, paths


def _output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The JSON and undo-manifest paths, every output checked new (or --force) and writable
    before the first image is predicted; PredictError when one is not."""
    json_path = args.json or args.out.with_suffix(".json")
    for out in (args.out, json_path):
        if out.exists() and not args.force:
            raise PredictError(f"{out} already exists; {REPLACE_HINT}")
    undo_path = args.undo_manifest or args.out.with_name(
        f"{args.out.stem}-undo-{datetime.now():%Y%m%d-%H%M%S}.csv"
    )
    if args.rename and undo_path.exists():
        raise PredictError(f"{undo_path} already exists; choose another --undo-manifest")
    # Every output must be writable before the first image is predicted, not after all of them.
    checks = [(args.out, "--out"), (json_path, "--json")] + (
        [(undo_path, "--undo-manifest")] if args.rename else []
    )
    for out, option in checks:
        problem = unwritable_reason(out)
        if problem:
            raise PredictError(f"cannot write {out} ({problem}); choose another {option}")
    return json_path, undo_path


def run(args: argparse.Namespace) -> int:
    if args.undo:
        return run_undo(args.undo)
    if args.folder is None or args.model is None:
        raise PredictError("give a FOLDER and --model DIR (or --undo MANIFEST)")
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    predictor = Predictor(args.model, threads=threads, precision=args.precision)
    set_threads(threads)
    return run_with(predictor, args, describe_model(predictor))
