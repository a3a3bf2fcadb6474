"""flystage review without a browser: the predictions file, the store, the API and its guards."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

pytest.importorskip("flask")

from flystage import cli  # noqa: E402
from flystage.predictor import Prediction  # noqa: E402
from flystage.review.app import COOKIE, create_app  # noqa: E402
from flystage.review.command import build_session  # noqa: E402
from flystage.review.predictions import PredictionsError, read_predictions, resolve_items  # noqa: E402
from review_helpers import predicted_folder, review_args, review_argv  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path, Path]:
    return predicted_folder(tmp_path_factory.mktemp("review"))


@pytest.fixture
def session(folder, tmp_path):
    images, model, csv_path = folder
    return build_session(
        review_args(csv_path, tmp_path, out=tmp_path / "reviewed.csv", model=model, images=images)
    )


@pytest.fixture
def client(session):
    client = create_app(session).test_client()
    response = client.get(f"/?token={session.token}")
    assert response.status_code == 303 and COOKIE in response.headers["Set-Cookie"]
    return client


def post(client, session, path, body):
    return client.post(path, json=body, headers={"X-Review-Token": session.token})


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_and_json_read_alike(folder) -> None:
    images, _, csv_path = folder
    a = resolve_items(read_predictions(csv_path), images)
    b = resolve_items(read_predictions(csv_path.with_suffix(".json")), images)
    assert [(i.name, i.path, [s for s, _ in i.top]) for i in a] == [
        (i.name, i.path, [s for s, _ in i.top]) for i in b
    ]
    assert all(i.path.is_file() and len(i.top) == 3 for i in a)


def test_moved_images_refused_and_renames_followed(folder, tmp_path) -> None:
    images, _, csv_path = folder
    copy = tmp_path / "images"
    shutil.copytree(images, copy)
    (copy / "embryo03.tif").unlink()
    with pytest.raises(
        PredictionsError, match=r"1 of 8 image\(s\) are no longer where.*embryo03.tif.*--images"
    ):
        resolve_items(read_predictions(csv_path), copy)
    # A rename by `flystage predict --rename` is followed through its undo manifest.
    (copy / "embryo02.tif").rename(copy / "embryo02__s1-3_s4-6_s7-8.tif")
    shutil.copy(images / "embryo03.tif", copy / "embryo03.tif")
    pred = tmp_path / "predictions.csv"
    shutil.copy(csv_path, pred)
    (tmp_path / "predictions-undo-20260101-000000.csv").write_text(
        f"old,new\n{copy / 'embryo02.tif'},{copy / 'embryo02__s1-3_s4-6_s7-8.tif'}\n"
    )
    items = resolve_items(read_predictions(pred))  # the folder is read off the undo manifest
    assert items[2].path == copy / "embryo02__s1-3_s4-6_s7-8.tif"


def test_every_request_needs_the_token_and_a_loopback_host(session) -> None:
    client = create_app(session).test_client()
    assert client.get("/").status_code == 403
    assert client.get("/api/items").status_code == 403
    assert client.get("/thumb/0.png").status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    assert (
        client.get(f"/?token={session.token}", headers={"Host": "evil.example:80"}).status_code
        == 403
    )
    client.get(f"/?token={session.token}")
    assert client.get("/api/items").status_code == 200
    # A cookie alone (what a cross-site form would carry) cannot write.
    assert client.post("/api/decide", json={"id": 0, "label": "1-3"}).status_code == 403


def test_images_by_index_only(client, session) -> None:
    assert client.get("/thumb/0.png").data[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get("/original/0.png").data[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/thumb/{len(session.items)}.png").status_code == 404
    for path in (
        "/thumb/-1.png",
        "/thumb/..%2f..%2fetc%2fpasswd",
        "/static/../app.py",
        "/thumb/0.png/../../x",
    ):
        assert client.get(path).status_code in (403, 404), path


def test_thumbnails_cached_on_disk(client, session, tmp_path) -> None:
    first = client.get("/thumb/1.png").data
    cached = list((tmp_path / "cache").rglob("*.png"))
    assert cached
    assert client.get("/thumb/1.png").data == first


def test_paging_sorting_filters(client, session) -> None:
    page = client.get("/api/items?limit=3").get_json()
    assert page["total"] == 8 and len(page["items"]) == 3 and page["more"]
    after = page["items"][-1]["id"]
    rest = client.get(f"/api/items?after={after}&limit=100").get_json()
    assert len(rest["items"]) == 5 and not rest["more"]
    p1 = [i["top"][0]["p"] for i in page["items"] + rest["items"]]
    assert p1 == sorted(p1)  # least sure first
    assert client.get("/api/items?after=x").status_code == 400
    assert client.get("/api/items?after=99").status_code == 404
    assert client.get("/api/items?sort=nonsense").status_code == 400
    stage = session.items[0].top[0][0]
    by_stage = client.get(f"/api/items?stage={stage}&limit=100").get_json()["items"]
    assert by_stage and all(i["top"][0]["stage"] == stage for i in by_stage)


@pytest.mark.parametrize("sort", ["unsure", "stage", "file"])
def test_unreviewed_pages_neither_skip_nor_repeat(client, session, sort) -> None:
    # Deciding an image takes it out of the "unreviewed" view: the next page must still start
    # right after the last image shown (an offset counted before the decisions skipped images).
    shown, after = [], ""
    while True:
        page = client.get(f"/api/items?filter=unreviewed&sort={sort}&limit=3&after={after}")
        page = page.get_json()
        for item in page["items"]:
            shown.append(item["id"])
            post(
                client, session, "/api/decide", {"id": item["id"], "label": item["top"][0]["stage"]}
            )
        if not page["more"]:
            break
        after = shown[-1]
    assert sorted(shown) == list(range(8))
    assert client.get("/api/items?filter=unreviewed").get_json()["total"] == 0


def test_decide_undo_and_the_csv(client, session, folder, tmp_path) -> None:
    images, _, _ = folder
    item = session.items[4]
    top1, other = item.top[0][0], next(s for s in session.labels if s != item.top[0][0])
    assert (
        post(client, session, "/api/decide", {"id": 4, "label": other}).get_json()["item"][
            "decision"
        ]
        == "corrected"
    )
    assert (
        post(
            client, session, "/api/decide", {"id": 5, "label": session.items[5].top[0][0]}
        ).status_code
        == 200
    )
    assert (
        post(client, session, "/api/decide", {"id": 4, "label": "no-such-stage"}).status_code == 400
    )
    assert post(client, session, "/api/decide", {"id": "../x", "label": other}).status_code == 400
    written = rows(tmp_path / "reviewed.csv")
    assert [(Path(r["path"]), r["label"], r["decision"]) for r in written] == [
        (images / "embryo04.tif", other, "corrected"),
        (images / "embryo05.tif", session.items[5].top[0][0], "confirmed"),
    ]
    assert written[0]["predicted"] == top1
    counts = post(client, session, "/api/undo", {}).get_json()["counts"]
    assert counts == {"images": 8, "reviewed": 1, "corrected": 1, "confirmed": 0}
    assert len(rows(tmp_path / "reviewed.csv")) == 1
    assert not list(tmp_path.glob(".reviewed.csv.*"))  # no temporary file left behind
    # A new session on the same files resumes where this one stopped.
    again = build_session(
        review_args(folder[2], tmp_path, out=tmp_path / "reviewed.csv", images=images)
    )
    assert again.store.decisions[4].label == other
    filtered = client.get("/api/items?filter=corrected").get_json()
    assert [i["id"] for i in filtered["items"]] == [4]


def test_overlay_on_request(client) -> None:
    response = client.get("/overlay/2.png")
    assert response.status_code == 200 and response.data[:4] == b"\x89PNG"


def open_client(session):
    client = create_app(session).test_client()
    assert client.get(f"/?token={session.token}").status_code == 303
    return client


def test_overlay_gradcam_where_the_weights_are(folder, tmp_path) -> None:
    pytest.importorskip("torch")
    from artefact_helpers import LABELS, tiny_config
    from flystage.training.export import save_artefact
    from flystage.training.models import build_model

    images, _, csv_path = folder
    model = tmp_path / "small_cnn"
    save_artefact(
        model, build_model("small_cnn", len(LABELS), 1).eval(), "small_cnn", LABELS, tiny_config()
    )
    session = build_session(
        review_args(csv_path, tmp_path, out=tmp_path / "r.csv", model=model, images=images)
    )
    client = open_client(session)
    assert b'id="method"' in client.get("/").data  # the page offers the choice
    for query, method in (
        ("?method=gradcam", "gradcam"),
        ("", "gradcam"),
        ("?method=occlusion", "occlusion"),
    ):
        response = client.get(f"/overlay/2.png{query}")
        assert response.status_code == 200 and response.data[:4] == b"\x89PNG", response.data
        assert response.headers["X-Overlay-Method"] == method
    assert client.get("/overlay/2.png?method=magic").status_code == 400
    assert client.get("/overlay/99.png?method=gradcam").status_code == 404
    # Without weights.pt: no choice on the page, an explicit gradcam is a 422 saying why, and
    # the default is occlusion.
    (model / "weights.pt").unlink()
    session = build_session(
        review_args(csv_path, tmp_path, out=tmp_path / "r2.csv", model=model, images=images)
    )
    client = open_client(session)
    assert b'id="method"' not in client.get("/").data
    response = client.get("/overlay/2.png?method=gradcam")
    assert response.status_code == 422 and "weights.pt" in response.get_json()["error"]
    response = client.get("/overlay/2.png")
    assert response.status_code == 200 and response.headers["X-Overlay-Method"] == "occlusion"


def test_overlay_gradcam_refused_for_a_model_it_cannot_rebuild(client) -> None:
    # The tiny test artefact's weights.pt is not a flystage arch: Grad-CAM is a clear 422, the
    # default falls back to occlusion.
    pytest.importorskip("torch")
    response = client.get("/overlay/3.png?method=gradcam")
    assert response.status_code == 422 and "Grad-CAM" in response.get_json()["error"]
    assert client.get("/overlay/3.png").headers["X-Overlay-Method"] == "occlusion"


def test_base_labels_and_group_column(folder, tmp_path) -> None:
    images, model, csv_path = folder
    base = tmp_path / "base.csv"
    base.write_text(
        f"path,label,group\n{images / 'embryo00.tif'},7-8,g0\n{tmp_path / 'old.tif'},1-3,old\n"
    )
    session = build_session(
        review_args(
            csv_path,
            tmp_path,
            out=tmp_path / "r.csv",
            base_labels=base,
            images=images,
            group_regex=r"(?P<group>embryo0[0-3])",
        )
    )
    session.store.decide(0, "9-10")
    written = rows(tmp_path / "r.csv")
    assert [(r["path"], r["label"], r["group"], r["decision"]) for r in written] == [
        ("old.tif", "1-3", "old", "base"),
        (
            str(images / "embryo00.tif"),
            "9-10",
            "embryo00",
            "confirmed" if session.items[0].top[0][0] == "9-10" else "corrected",
        ),
    ]


def test_command_refuses_moved_images_clearly(folder, tmp_path, capsys) -> None:
    _, _, csv_path = folder
    code = cli.main(["review", *review_argv(csv_path, tmp_path, images=tmp_path)])
    assert code == 2
    assert "no longer where the predictions say" in capsys.readouterr().err


def test_a_thumbnail_asked_for_twice_at_once_is_made_once(tmp_path: Path, monkeypatch):
    # The warming thread and a page request often want the same thumbnail on a cold start.
    import threading
    import time

    import numpy as np
    import tifffile

    from flystage.imaging import PreprocessConfig
    from flystage.review import thumbnails

    image = tmp_path / "embryo.tif"
    tifffile.imwrite(image, (np.random.default_rng(0).random((120, 300)) * 4000).astype(np.uint16))
    made = []
    real_load = thumbnails.load

    def slow_load(*args, **kwargs):
        made.append(1)
        time.sleep(0.3)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(thumbnails, "load", slow_load)
    cache = thumbnails.ThumbnailCache(tmp_path / "cache", PreprocessConfig(height=32, width=80))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.thumbnail(image))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and len(results) == 4 and len(set(results)) == 1
    assert results[0].startswith(b"\x89PNG")


def test_review_finds_the_folder_and_model_predict_recorded(tmp_path, monkeypatch, capsys) -> None:
    # `flystage predict new/ --model M --out p.csv`, then `flystage review p.csv`: no --images or
    # --model, relative paths, and review run from another folder.
    from artefact_helpers import make_artefact, write_image
    from flystage import cli

    for i in range(3):
        write_image(tmp_path / "new" / f"embryo{i}.tif", seed=i)
    make_artefact(tmp_path / "M")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["predict", "new", "--model", "M", "--out", "out/p.csv", "--threads", "1"]) == 0
    monkeypatch.chdir(tmp_path / "out")
    for source in ("p.csv", "p.json"):
        session = build_session(review_args(Path(source), tmp_path / "out"))
        assert [i.path for i in session.items] == [
            (tmp_path / "new" / f"embryo{i}.tif").resolve() for i in range(3)
        ]
        assert session.model_dir == (tmp_path / "M").resolve()

    # Explicit options win over what was recorded.
    shutil.copytree(tmp_path / "new", tmp_path / "copy")
    shutil.copytree(tmp_path / "M", tmp_path / "M2")
    session = build_session(
        review_args(Path("p.csv"), tmp_path, images=tmp_path / "copy", model=tmp_path / "M2")
    )
    assert session.items[0].path == (tmp_path / "copy" / "embryo0.tif").resolve()
    assert session.model_dir == tmp_path / "M2"

    # A recorded folder or model that is gone: a clear error naming the option to pass.
    (tmp_path / "M").rename(tmp_path / "M-moved")
    assert cli.main(["review", *review_argv(Path("p.csv"), tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str((tmp_path / "M").resolve()) in err and "--model DIR" in err
    (tmp_path / "new").rename(tmp_path / "new-moved")
    assert (
        cli.main(["review", *review_argv(Path("p.csv"), tmp_path, model=tmp_path / "M-moved")]) == 2
    )
    err = capsys.readouterr().err
    assert str((tmp_path / "new").resolve()) in err and "--images FOLDER" in err
    session = build_session(
        review_args(
            Path("p.csv"), tmp_path, model=tmp_path / "M-moved", images=tmp_path / "new-moved"
        )
    )
    assert len(session.items) == 3


def test_remote_predictions_review_without_model_says_so(folder, tmp_path, monkeypatch, capsys):
    # A remote predictor (serve container, endpoint) records the folder but no model directory:
    # review finds the images and says that --model brings the model's preprocessing, stages and
    # overlay.
    import argparse

    from flystage.predict import add_output_arguments, run_with
    from flystage.review import command

    images, _, _ = folder

    class Remote:
        def predict_sources(self, sources, k=3, names=None):
            return [Prediction(n, [("13-16", 0.9), ("11-12", 0.08), ("9-10", 0.02)]) for n in names]

    parser = argparse.ArgumentParser()
    add_output_arguments(parser)
    out = tmp_path / "remote.csv"
    args = parser.parse_args([str(images), "--out", str(out)])
    assert run_with(Remote(), args, {"server": "http://127.0.0.1:8080"}) == 0

    class Stopped:  # a server stopped at once, as by Ctrl-C
        server_port = 0

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            pass

    monkeypatch.setattr(command, "serve", lambda session, port, on_url: Stopped())
    assert command.run(review_args(out, tmp_path)) == 0
    assert "give --model DIR" in capsys.readouterr().err
    session = build_session(review_args(out, tmp_path))
    assert len(session.items) == 8 and session.model_dir is None
