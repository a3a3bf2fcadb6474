"""``flystage review``: start the review page on a predictions file (or a folder and a model).

    flystage review runs/demo/predictions.csv     # folder and model: as `flystage predict` recorded
    flystage review new-images/ --model model/    # predicts first, then reviews

prints ``http://127.0.0.1:PORT/?token=...`` and serves until Ctrl-C. Decisions go to the
reviewed CSV (``--out``), a ``flystage organise --labels-csv`` input.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import webbrowser
from pathlib import Path

from flystage import formats
from flystage.artefact import load_metadata
from flystage.errors import FlystageError
from flystage.imaging import PreprocessConfig
from flystage.manifest import sort_labels
from flystage.predict import unsure_threshold
from flystage.review.predictions import (
    PredictionsError,
    read_predictions,
    recorded_model,
    resolve_items,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        type=Path,
        help="predictions CSV/JSON from `flystage predict` (or local mode, the cloud), "
        "or a folder of images to predict first with --model",
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="model directory: labels, preprocessing (thumbnails show what it saw) and "
        "the 'what the model looked at' overlay (default: the model `flystage predict` recorded "
        "in the predictions JSON)",
    )
    parser.add_argument(
        "--images",
        type=Path,
        help="the folder that was predicted (default: the folder `flystage predict` recorded in "
        "the predictions JSON, else the predictions file's folder)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="reviewed labels CSV (default: <predictions>-reviewed.csv); reopened to resume",
    )
    parser.add_argument(
        "--base-labels",
        type=Path,
        metavar="CSV",
        help=(
            "labels to carry into the reviewed CSV first (e.g. the training manifest), so one "
            "`flystage organise --labels-csv` retrains on old and corrected images"
        ),
    )
    parser.add_argument(
        "--group-regex",
        help="regex with a named group 'group' on each image's name, for the group column",
    )
    parser.add_argument(
        "--unsure-below",
        type=unsure_threshold,
        default=0.8,
        metavar="P",
        help=(
            "images with a top-1 probability below P count as unsure when the file has no unsure "
            "column (default 0.8)"
        ),
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)"
    )
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument(
        "--cache-dir", type=Path, help="thumbnail cache (default ~/.cache/flystage/thumbnails)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime threads for predicting and the overlay (default 1)",
    )


def _predict_folder(folder: Path, model: Path, out: Path, threads: int) -> Path:
    """Predict ``folder`` with ``model`` into ``out`` (CSV + JSON), the same files `flystage
    predict` writes."""
    from flystage.organise import iter_images
    from flystage.outputs import write_csv, write_json
    from flystage.predictor import Predictor, describe_model, predict_files

    predictor = Predictor(model, threads=threads)
    paths, _ = iter_images([folder])
    if not paths:
        raise PredictionsError(f"no images ({formats.suffix_text()}) under {folder}")
    predictions = predict_files(predictor, paths, root=folder, workers=1)
    write_csv(predictions, out, force=True)
    write_json(
        predictions,
        out.with_suffix(".json"),
        model=describe_model(predictor),
        force=True,
        images=folder,
    )
    return out


def build_session(args: argparse.Namespace):
    """The :class:`ReviewSession` the arguments describe (predicting a folder first if given
    one)."""
    from flystage.review.app import ReviewSession
    from flystage.review.store import ReviewStore
    from flystage.review.thumbnails import ThumbnailCache, default_cache_dir

    source = args.source.expanduser()
    if source.is_dir():
        if args.model is None:
            raise PredictionsError(
                f"{source} is a folder: give --model DIR to predict it first (or a predictions "
                "file)"
            )
        out = args.out or Path(f"{source.resolve()}-reviewed.csv")
        source = _predict_folder(
            source.resolve(), args.model, out.with_name(f"{out.stem}-predictions.csv"), args.threads
        )
    predictions = read_predictions(source)
    # Explicit options win over what `flystage predict` recorded.
    model_dir = args.model or recorded_model(predictions)
    config, labels = PreprocessConfig(), list(predictions.model.get("labels") or [])
    if model_dir is not None:
        metadata = load_metadata(model_dir)
        config, labels = metadata.preprocess, list(metadata.labels)
    if not labels:  # no model named anywhere: every stage the model ever answered
        labels = sort_labels({stage for row in predictions.rows for stage, _ in row["top"]})
    items = resolve_items(predictions, args.images, unsure_below=args.unsure_below)
    out = args.out or source.with_name(f"{source.stem}-reviewed.csv")
    store = ReviewStore(out, items, group_regex=args.group_regex, base_labels=args.base_labels)
    thumbnails = ThumbnailCache(args.cache_dir or default_cache_dir(), config)
    return ReviewSession(
        items,
        labels,
        store,
        thumbnails,
        title=f"flystage review: {source.name}",
        model_dir=model_dir,
        threads=args.threads,
    )


def serve(session, port: int = 0, ready: threading.Event | None = None, on_url=print):
    """Serve ``session`` on 127.0.0.1 (never another address) until interrupted; returns the
    server."""
    from werkzeug.serving import make_server

    from flystage.review.app import create_app, select

    server = make_server("127.0.0.1", port, create_app(session), threaded=True)
    # werkzeug logs every request (thousands of thumbnails, the token in the first one): only
    # its warnings and errors reach the terminal.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # Least sure first is the default order: warm those thumbnails first.
    session.thumbnails.warm([i.path for i in select(session, "unsure", "all", None)])
    on_url(f"http://127.0.0.1:{server.server_port}/?token={session.token}")
    if ready is not None:
        ready.set()
    return server


def run(args: argparse.Namespace) -> int:
    try:
        import flask  # noqa: F401
    except ImportError:
        raise FlystageError("Flask is not installed: pip install 'flystage[review]'") from None
    try:
        session = build_session(args)
    except FlystageError:
        raise
    except (OSError, ValueError) as exc:
        # A file it cannot read or write, a value a library refuses: still the user's to mend,
        # so a message, not a traceback.
        raise PredictionsError(str(exc)) from exc
    if session.model_dir is None:
        print(
            "note: the predictions name no model directory (a remote predictor made them, or the "
            "JSON beside the CSV is missing): thumbnails use the default preprocessing, the stages "
            "offered are those the model answered, and there is no 'what the model looked at'; "
            "give --model DIR for all three",
            file=sys.stderr,
        )
    counts = session.store.counts()
    server = serve(
        session,
        args.port,
        on_url=lambda url: print(
            f"reviewing {counts['images']} image(s) ({counts['reviewed']} already reviewed); "
            f"decisions saved to {session.store.out}\nopen {url}\n(Ctrl-C to stop)",
            flush=True,
        ),
    )
    if args.open:
        webbrowser.open(f"http://127.0.0.1:{server.server_port}/?token={session.token}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print(
        f"reviewed labels: {session.store.out} (retrain: flystage organise FOLDER --labels-csv "
        f"{session.store.out} ...)"
    )
    return 0
