"""Issue 8's figures: run the hostile-input corpus (tests/hostile_corpus.py) through every reader
and the real serve container, and print one JSON line.

    .venv/bin/python bench/hostile_report.py [--serve-image flystage-serve:latest] [--no-server]

Counts: inputs tried; answered as they must be (the reader's one clear error, or a 4xx with the
JSON error body from the server; valid images under odd names read); anything else is listed
under "wrong". Then: worker restarts during the corpus (MMS worker PIDs before and after, and
docker's restart count), files lost or renamed outside the folder by ``predict --rename`` on a
hostile folder, and the serve worker's peak resident memory (VmHWM, from /proc) before and
after the bomb requests, with the container's cgroup peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "local")]

import hostile_corpus as hc  # noqa: E402
from artefact_helpers import make_artefact  # noqa: E402
from flystage import cli  # noqa: E402
from flystage.artefact import ArtefactError, check_artefact, load_metadata  # noqa: E402
from flystage.image_checks import ImageError  # noqa: E402
from flystage.manifest import ManifestError, read_manifest  # noqa: E402
from flystage.organise import organise  # noqa: E402
from flystage.organise_error import OrganiseError  # noqa: E402
from flystage.reading import read_image  # noqa: E402
from flystage.rename import undo_renames  # noqa: E402
from flystage.training.export import load_torch_model  # noqa: E402
from flystage_local import LocalModeError  # noqa: E402
from flystage_local.serving import unpack_model  # noqa: E402


class Tally:
    def __init__(self) -> None:
        self.tried = 0
        self.clear = 0  # the reader's own error, or a 4xx with a JSON error body
        self.read = 0  # read normally: valid images under odd names, CSVs a reader accepts
        self.wrong: list[str] = []

    def add(self, where: str, name: str, ok: bool, kind: str, detail: str = "") -> None:
        self.tried += 1
        if not ok:
            self.wrong.append(f"{where}: {name}: {kind} {detail}"[:300])
        elif kind == "ok":
            self.read += 1
        else:
            self.clear += 1

    def outcome(self, where: str, name: str, got: hc.Outcome, expect: str = "error") -> None:
        self.add(
            where, name, got.fits(expect), got.kind, got.detail if not got.fits(expect) else ""
        )


def readers(tally: Tally, work: Path, model_dir: Path) -> None:
    for case in hc.image_bytes_cases():
        tally.outcome(
            "read_image(bytes)",
            case.name,
            hc.outcome(partial(read_image, case.data, page=case.page), (ImageError,)),
            case.expect,
        )
    for case in hc.image_file_cases(work / "images"):
        tally.outcome(
            "read_image(file)",
            case.name,
            hc.outcome(partial(read_image, case.path), (ImageError,), seconds=10),
            case.expect,
        )

    data = work / "csv"
    data.mkdir()
    (data / "img.tif").write_bytes(hc.valid_images()["tiff"])
    os.symlink("loop.tif", data / "loop.tif")
    for case in hc.csv_cases(hc.MANIFEST_HEADER, lambda p: f"{p},11-12,g1,train,{'0' * 40}\n"):
        (data / "manifest.csv").write_bytes(case.data)
        tally.outcome(
            "read_manifest",
            case.name,
            hc.outcome(lambda: read_manifest(data / "manifest.csv"), (ManifestError,)),
            "any",
        )
    for case in hc.csv_cases(hc.LABELS_HEADER, lambda p: f"{p},11-12,g1\n"):
        (data / "labels.csv").write_bytes(case.data)
        got = hc.outcome(lambda: organise([data], labels_csv=data / "labels.csv"), (OrganiseError,))
        tally.outcome("organise --labels-csv", case.name, got, "any")
    for case in hc.csv_cases(hc.UNDO_HEADER, lambda p: f"{p},{p}__s1-3_s4-6_s7-8.tif\n"):
        (work / "undo.csv").write_bytes(case.data)
        tally.outcome(
            "predict --undo",
            case.name,
            hc.outcome(lambda: undo_renames(work / "undo.csv"), (OSError, ValueError)),
            "any",
        )
    try:
        from flystage.review import predictions as review
    except ImportError:  # the review extra is not installed
        review = None
    if review is not None:

        def read(path: Path):
            return review.resolve_items(review.read_predictions(path))

        for case in hc.csv_cases(hc.PREDICTIONS_HEADER, hc.predictions_row):
            (data / "predictions.csv").write_bytes(case.data)
            tally.outcome(
                "review predictions.csv",
                case.name,
                hc.outcome(lambda: read(data / "predictions.csv"), (review.PredictionsError,)),
                "any",
            )
        for name, content in hc.predictions_json_cases():
            (data / "predictions.json").write_bytes(content)
            tally.outcome(
                "review predictions.json",
                name,
                hc.outcome(lambda: read(data / "predictions.json"), (review.PredictionsError,)),
                "any",
            )

    good = json.loads((model_dir / "metadata.json").read_text())
    for i, (name, content) in enumerate(hc.metadata_cases(good)):
        folder = shutil.copytree(model_dir, work / f"meta{i}")
        (folder / "metadata.json").write_bytes(content)
        tally.outcome(
            "metadata.json", name, hc.outcome(partial(load_metadata, folder), (ArtefactError,))
        )
    hc.WEIGHTS_MARKER.unlink(missing_ok=True)
    for i, (name, content) in enumerate(hc.weights_cases((model_dir / "weights.pt").read_bytes())):
        folder = shutil.copytree(model_dir, work / f"weights{i}")
        (folder / "weights.pt").write_bytes(content)
        tally.outcome(
            "weights.pt", name, hc.outcome(partial(load_torch_model, folder), (ArtefactError,))
        )
    if hc.WEIGHTS_MARKER.exists():
        tally.wrong.append("weights.pt: a crafted file ran a command")

    outside = work / "tar-outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me\n")
    before = hc.snapshot(outside)
    files = {
        name: (model_dir / name).read_bytes()
        for name in ("metadata.json", "model.onnx", "weights.pt")
    }
    for i, case in enumerate(hc.tar_cases(files, outside)):
        archive = work / f"model{i}.tar.gz"
        archive.write_bytes(case.data)
        got = hc.outcome(
            lambda archive=archive: check_artefact(
                unpack_model(archive, work / "models"), strict=True
            ),
            (LocalModeError, ArtefactError),
        )
        tally.outcome("model.tar.gz", case.name, got)
        shutil.rmtree(work / "models", ignore_errors=True)
    if hc.snapshot(outside) != before:
        tally.wrong.append("model.tar.gz: a file outside the models folder changed")


def rename(work: Path, model_dir: Path) -> dict:
    """``predict --rename`` then ``--undo`` on a hostile folder: files lost, changes outside."""
    folder, outside = work / "rename" / "images", work / "rename" / "outside"
    hc.hostile_folder(folder, outside)
    outside_before, inodes_before = hc.snapshot(outside), hc.inodes(folder)
    names_before = set(hc.snapshot(folder))
    out = work / "rename" / "predictions.csv"
    quiet = open(os.devnull, "w")
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = quiet
    try:
        code = cli.main(
            ["predict", str(folder), "--model", str(model_dir), "--out", str(out), "--rename"]
        )
        renamed = len(set(hc.snapshot(folder)) - names_before)
        lost = len(inodes_before - hc.inodes(folder))
        undo = next((work / "rename").glob("*undo*.csv"))
        undo_code = cli.main(["predict", "--undo", str(undo)])
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        quiet.close()
    outside_changed = sum(
        1
        for k in set(outside_before) | set(hc.snapshot(outside))
        if outside_before.get(k) != hc.snapshot(outside).get(k)
    )
    return {
        "rename_files_in_folder": len(inodes_before),
        "rename_renamed": renamed,
        "rename_exit": code,
        "files_lost": lost,
        "files_renamed_or_changed_outside": outside_changed,
        "undo_exit": undo_code,
        "undo_restored_all_names": set(hc.snapshot(folder)) == names_before,
    }


def server(tally: Tally, image: str, model_dir: Path) -> dict:
    from flystage.serving.container import start_serve_container
    from serving_helpers import lab_image, tiff_bytes

    with start_serve_container(
        model_dir, image, environment={"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}
    ) as running:
        running.wait_healthy(timeout=180)
        container = running.container
        pids = hc.worker_pids(container)
        cases = hc.http_cases()
        rss = {}
        for bombs in (False, True):  # every other bad request first, then the bombs
            rss[bombs] = hc.peak_rss_mib(container, pids)
            for case in [c for c in cases if c.bomb == bombs]:
                start = time.perf_counter()
                status, body = hc.send(running.url, case)
                ok = (
                    hc.clear_error_body(status, body)
                    if case.path == "/invocations"
                    else (status is not None and 400 <= status < 500 and "Traceback" not in body)
                )
                tally.add("serve", case.name, ok, f"HTTP {status}", body[:150] if not ok else "")
                if time.perf_counter() - start > 30:
                    tally.wrong.append(
                        f"serve: {case.name}: {time.perf_counter() - start:.0f} s to answer"
                    )
        good_status, _ = hc.send(
            running.url,
            hc.HttpCase("good", tiff_bytes(lab_image(seed=3)), {"Content-Type": "image/tiff"}),
        )
        after = hc.worker_pids(container)
        log = running.logs()
        return {
            "server_requests": len(cases),
            "server_good_request_after": good_status,
            "server_restarts": hc.restart_count(container) + len(set(pids) - set(after)),
            "server_worker_deaths_in_log": sum(log.count(marker) for marker in hc.WORKER_DEATH),
            "worker_peak_rss_mib_at_start": _round(rss[False]),
            "worker_peak_rss_mib_before_bombs": _round(rss[True]),
            "worker_peak_rss_mib_after_bombs": _round(hc.peak_rss_mib(container, after)),
            "container_peak_mib": _round(hc.container_peak_mib(container)),
            "bomb_requests": sum(c.bomb for c in cases),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--serve-image", default=os.environ.get("SERVE_IMAGE", "flystage-serve:latest")
    )
    parser.add_argument("--no-server", action="store_true", help="readers and rename only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tally = Tally()
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="flystage-hostile-") as tmp:
        work = Path(tmp)
        model_dir = work / "model"
        model_dir.mkdir()
        make_artefact(model_dir)
        model_dir.chmod(0o755)
        readers(tally, work, model_dir)
        figures.update(rename(work, model_dir))
        if not args.no_server:
            figures.update(server(tally, args.serve_image, model_dir))
    report = {
        "inputs_tried": tally.tried,
        "clear_error_or_4xx": tally.clear,
        "answered_without_error": tally.read,
        "wrong": tally.wrong,
        **figures,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report))
    return (
        0
        if not tally.wrong
        and report.get("files_lost", 0) == 0
        and report.get("server_restarts", 0) == 0
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
