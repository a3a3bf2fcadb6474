"""The correct-and-retrain loop: predict, correct through the review page's HTTP API, organise
from the reviewed CSV, train a few steps, and training reads the corrected labels."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flask")

from artefact_helpers import make_artefact  # noqa: E402
from flystage import cli  # noqa: E402
from flystage.manifest import read_manifest  # noqa: E402
from review_helpers import Server, review_args  # noqa: E402
from train_helpers import TINY_ARGS, make_tree  # noqa: E402

TINY = [*TINY_ARGS, "--pretrained", "False", "--epochs", "1"]


def call(server: Server, path: str, body: dict | None = None) -> dict:
    """One request as the page sends it (the session token in X-Review-Token)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.base + path,
        data=data,
        method="GET" if body is None else "POST",
        headers={"X-Review-Token": server.session.token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow
def test_corrections_are_what_training_reads(tmp_path: Path, monkeypatch) -> None:
    new = tmp_path / "new-images"
    make_tree(new, per_class=6)  # new-images/<true stage>/<stage>_<i>.png
    make_artefact(tmp_path / "model")  # an untrained model: many answers are wrong
    predictions = tmp_path / "predictions.csv"
    assert (
        cli.main(
            [
                "predict",
                str(new),
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(predictions),
                "--workers",
                "1",
                "--threads",
                "1",
            ]
        )
        == 0
    )

    # The biologist's review: every image gets its true stage (its folder), except two images
    # of 1-3 that the lab now calls 4-6: labels no folder name could give.
    relabel = {"1-3/1-3_0.png": "4-6", "1-3/1-3_1.png": "4-6"}
    reviewed = tmp_path / "reviewed.csv"
    with Server(review_args(predictions, tmp_path, images=new, out=reviewed)) as server:
        page = call(server, "/api/items?limit=200")
        assert page["total"] == 18
        for item in page["items"]:
            label = relabel.get(item["name"], item["name"].split("/")[0])
            call(server, "/api/decide", {"id": item["id"], "label": label})
        counts = call(server, "/api/items?limit=1")["counts"]
    assert counts["reviewed"] == 18 and counts["corrected"] >= 2
    wanted = {
        (new / item["name"]).resolve(): relabel.get(item["name"], item["name"].split("/")[0])
        for item in page["items"]
    }

    manifest = tmp_path / "manifest.csv"
    assert (
        cli.main(
            [
                "organise",
                str(new),
                "--labels-csv",
                str(reviewed),
                "--fractions",
                "0.75,0.25,0",
                "--out",
                str(manifest),
            ]
        )
        == 0
    )
    assert {r.path: r.label for r in read_manifest(manifest)} == wanted

    # Watch what training itself is handed.
    # train_model calls fit once per ensemble member.
    import flystage.training.ensemble as ensemble

    seen: dict[Path, str] = {}
    real_fit = ensemble.fit

    def spy(train_records, valid_records, *args, **kwargs):
        seen.update({r.path: r.label for r in [*train_records, *valid_records]})
        return real_fit(train_records, valid_records, *args, **kwargs)

    monkeypatch.setattr(ensemble, "fit", spy)
    assert (
        cli.main(
            [
                "train",
                "--manifest",
                str(manifest),
                "--model_dir",
                str(tmp_path / "model2"),
                "--checkpoint_dir",
                str(tmp_path / "ckpt"),
                *TINY,
            ]
        )
        == 0
    )
    assert seen == wanted
    assert all(seen[(new / name).resolve()] == "4-6" for name in relabel)
