"""Helpers for the review tests: a predicted folder with a tiny real model, and a review server."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

from artefact_helpers import make_artefact, write_image


def predicted_folder(root: Path, n: int = 8, suffix: str = ".tif") -> tuple[Path, Path, Path]:
    """``root/images`` with ``n`` small embryo images, a tiny artefact in ``root/model`` and
    ``root/predictions.csv`` (+ .json) as `flystage predict` writes them; returns (images, model,
    csv)."""
    from flystage.outputs import write_csv, write_json
    from flystage.predictor import Predictor, describe_model, predict_files

    images, model = root / "images", root / "model"
    paths = [write_image(images / f"embryo{i:02d}{suffix}", seed=i) for i in range(n)]
    make_artefact(model)
    predictor = Predictor(model, threads=1)
    predictions = predict_files(predictor, paths, root=images, progress=False)
    csv_path = write_csv(predictions, root / "predictions.csv")
    write_json(
        predictions, root / "predictions.json", model=describe_model(predictor), images=images
    )
    return images, model, csv_path


def review_argv(source: Path, tmp: Path, **extra) -> list[str]:
    """``flystage review``'s arguments: ``source``, a cache under ``tmp``, ``--key value``."""
    argv = [str(source), "--cache-dir", str(tmp / "cache")]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def review_args(source: Path, tmp: Path, **extra) -> argparse.Namespace:
    from flystage.review.command import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(review_argv(source, tmp, **extra))


class Server:
    """A review server on a loopback port in a thread (what `flystage review` runs)."""

    def __init__(self, args: argparse.Namespace):
        from flystage.review.command import build_session, serve

        self.session = build_session(args)
        urls: list[str] = []
        self.server = serve(self.session, 0, on_url=urls.append)
        self.url = urls[0]
        self.base = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
