"""Issue 8, "Figures": every reader against a corpus of hostile inputs (tests/hostile_corpus.py).

Each input must get the reader's one clear error (ImageError, ManifestError/OrganiseError,
ArtefactError, LocalModeError, RequestError; a 4xx with a JSON error from the server), never
another exception and never a hang. Valid content under an odd name is read as usual. Then a
bounded property-based fuzz (hypothesis) of the request codec and of the image reader on
mutated valid images. The serve container (one for the module) gets every bad request, and
must still answer a good one afterwards with the same worker processes.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile_corpus as hc
from artefact_helpers import make_artefact
from flystage import cli
from flystage.artefact import ArtefactError, check_artefact, load_metadata
from flystage.image_checks import ImageError
from flystage.manifest import ManifestError, read_manifest
from flystage.organise import organise
from flystage.organise_error import OrganiseError
from flystage.reading import read_image
from flystage.rename import undo_renames
from flystage.training.export import load_torch_model
from flystage_local import LocalModeError  # noqa: E402
from flystage_local.serving import unpack_model  # noqa: E402
from serving_helpers import healthy_serve_container


def _params(cases):
    """pytest params with the case's name as id."""
    return [pytest.param(c, id=c.name) for c in cases]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    make_artefact(folder)
    folder.chmod(0o755)
    return folder


# ---- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params(hc.image_bytes_cases()))
def test_read_image_bytes(case: hc.ImageCase):
    got = hc.outcome(lambda: read_image(case.data, page=case.page), (ImageError,))
    assert got.fits(case.expect), got
    if case.bomb:
        assert got.seconds < 5, got  # refused from the header, not after decoding


def test_read_image_files(tmp_path: Path):
    """The byte corpus on disk, plus folders, FIFOs, devices, link loops and odd names."""
    cases = hc.image_file_cases(tmp_path / "images")
    assert len(cases) > 100
    wrong = []
    for case in cases:
        got = hc.outcome(partial(read_image, case.path), (ImageError,), seconds=10)
        if not got.fits(case.expect):
            wrong.append((case.name, case.expect, got))
    assert wrong == []


# ---- CSV readers ------------------------------------------------------------------------------


def _csv_folder(root: Path) -> Path:
    """A folder with one valid image and a link loop, which the CSV rows name."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "img.tif").write_bytes(hc.valid_images()["tiff"])
    os.symlink("loop.tif", root / "loop.tif")
    return root


MANIFEST_CASES = hc.csv_cases(hc.MANIFEST_HEADER, lambda p: f"{p},11-12,g1,train,{'0' * 40}\n")
LABELS_CASES = hc.csv_cases(hc.LABELS_HEADER, lambda p: f"{p},11-12,g1\n")
UNDO_CASES = hc.csv_cases(hc.UNDO_HEADER, lambda p: f"{p},{p}__s1-3_s4-6_s7-8.tif\n")


@pytest.mark.parametrize("case", _params(MANIFEST_CASES))
def test_read_manifest(case: hc.CsvCase, tmp_path: Path):
    folder = _csv_folder(tmp_path / "data")
    manifest = folder / "manifest.csv"
    manifest.write_bytes(case.data)
    for check_files in (True, False):
        got = hc.outcome(
            partial(read_manifest, manifest, check_files=check_files), (ManifestError,)
        )
        assert got.fits("any"), (check_files, got)
        if got.kind == "error":
            assert str(manifest) in got.detail, got  # names the file


@pytest.mark.parametrize("case", _params(LABELS_CASES))
def test_organise_labels_csv(case: hc.CsvCase, tmp_path: Path, capsys):
    folder = _csv_folder(tmp_path / "data")
    labels = folder / "labels.csv"
    labels.write_bytes(case.data)
    got = hc.outcome(lambda: organise([folder], labels_csv=labels), (OrganiseError,))
    assert got.fits("any"), got
    # Through the command line: exit 0 or 2 with a message, never a traceback.
    out = tmp_path / "manifest.csv"
    code = hc.outcome(
        lambda: cli.main(["organise", str(folder), "--labels-csv", str(labels), "--out", str(out)]),
        (),
    )
    assert code.kind == "ok", code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if got.kind == "error":
        assert "error:" in err


@pytest.mark.parametrize("case", _params(UNDO_CASES))
def test_undo_manifest(case: hc.CsvCase, tmp_path: Path, capsys):
    folder = _csv_folder(tmp_path / "data")
    undo = tmp_path / "undo.csv"
    undo.write_bytes(case.data)
    before = hc.snapshot(tmp_path)
    got = hc.outcome(lambda: undo_renames(undo), (OSError, ValueError))
    assert got.fits("any"), got
    code = hc.outcome(lambda: cli.main(["predict", "--undo", str(undo)]), ())
    assert code.kind == "ok", code
    assert "Traceback" not in capsys.readouterr().err
    assert hc.snapshot(tmp_path) == before  # nothing named in a hostile undo manifest was moved
    assert folder.is_dir()


def test_organise_skips_fifos_devices_and_broken_links(tmp_path: Path):
    """A FIFO named x.tif would block organise for ever when hashed; a link loop or a dangling
    link would crash it. They are skipped and counted; the real image is organised."""
    stage = tmp_path / "data" / "11-12"
    stage.mkdir(parents=True)
    (stage / "ok.tif").write_bytes(hc.valid_images()["tiff"])
    os.mkfifo(stage / "fifo.tif")
    os.symlink("loop.tif", stage / "loop.tif")
    os.symlink("/nowhere/at/all.tif", stage / "dangling.tif")
    os.symlink("/dev/zero", stage / "zero.tif")
    got = hc.outcome(
        lambda: organise([tmp_path / "data"], split="none"), (OrganiseError,), seconds=20
    )
    assert got.kind == "ok", got
    result = organise([tmp_path / "data"], split="none")
    assert [r.path.name for r in result.records] == ["ok.tif"]
    assert sum(n for why, n in result.ignored.items() if "not a regular file" in why) == 4


PREDICTIONS_CASES = hc.csv_cases(hc.PREDICTIONS_HEADER, hc.predictions_row)


def _review_readers():
    review = pytest.importorskip("flystage.review.predictions")
    return (
        review,
        (lambda path: review.resolve_items(review.read_predictions(path))),
        (review.PredictionsError,),
    )


@pytest.mark.parametrize("case", _params(PREDICTIONS_CASES))
def test_review_predictions_csv(case: hc.CsvCase, tmp_path: Path):
    """``flystage review`` reads a predictions CSV and finds its images: PredictionsError or
    fine."""
    _, read, allowed = _review_readers()
    folder = _csv_folder(tmp_path / "data")
    (folder / "predictions.csv").write_bytes(case.data)
    got = hc.outcome(lambda: read(folder / "predictions.csv"), allowed)
    assert got.fits("any"), got


def test_review_predictions_json(tmp_path: Path):
    _, read, allowed = _review_readers()
    folder = _csv_folder(tmp_path / "data")
    wrong = []
    for name, data in hc.predictions_json_cases():
        (folder / "predictions.json").write_bytes(data)
        got = hc.outcome(lambda: read(folder / "predictions.json"), allowed)
        if not got.fits("any"):
            wrong.append((name, got))
    assert wrong == []


# ---- model artefact ---------------------------------------------------------------------------


def _copy_model(model_dir: Path, target: Path) -> Path:
    shutil.copytree(model_dir, target)
    return target


def test_tampered_metadata(model_dir: Path, tmp_path: Path):
    good = json.loads((model_dir / "metadata.json").read_text())
    wrong = []
    cases = hc.metadata_cases(good)
    for i, (name, data) in enumerate(cases):
        folder = _copy_model(model_dir, tmp_path / f"m{i}")
        (folder / "metadata.json").write_bytes(data)
        for reader in (load_metadata, lambda d: check_artefact(d, strict=True)):
            got = hc.outcome(partial(reader, folder), (ArtefactError,))
            if got.kind != "error" or "metadata.json" not in got.detail:
                wrong.append((name, got))
    assert len(cases) >= 40 and wrong == []


def test_tampered_weights(model_dir: Path, tmp_path: Path):
    hc.WEIGHTS_MARKER.unlink(missing_ok=True)
    wrong = []
    cases = hc.weights_cases((model_dir / "weights.pt").read_bytes())
    for i, (name, data) in enumerate(cases):
        folder = _copy_model(model_dir, tmp_path / f"w{i}")
        (folder / "weights.pt").write_bytes(data)
        got = hc.outcome(partial(load_torch_model, folder), (ArtefactError,))
        if got.kind != "error" or "weights.pt" not in got.detail:
            wrong.append((name, got))
    assert wrong == []
    assert not hc.WEIGHTS_MARKER.exists(), "a crafted weights.pt ran a command"


def test_hostile_model_tar(model_dir: Path, tmp_path: Path):
    """unpack_model refuses the archive (LocalModeError), or what it unpacked is refused by the
    strict artefact check (ArtefactError); nothing outside the models folder changes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me\n")
    files = {
        name: (model_dir / name).read_bytes()
        for name in ("metadata.json", "model.onnx", "weights.pt")
    }
    cases = hc.tar_cases(files, outside)
    before = hc.snapshot(tmp_path)
    wrong = []
    for i, case in enumerate(cases):
        archive = tmp_path / "archives" / f"{i}.tar.gz"
        archive.parent.mkdir(exist_ok=True)
        archive.write_bytes(case.data)
        models = tmp_path / "models"

        def unpack_and_check(archive=archive, models=models):
            return check_artefact(unpack_model(archive, models), strict=True)

        got = hc.outcome(unpack_and_check, (LocalModeError, ArtefactError))
        if got.kind != "error":
            wrong.append((case.name, got))
        shutil.rmtree(models, ignore_errors=True)
    assert wrong == []
    after = hc.snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("archives")} == before
    assert (outside / "victim.txt").read_text() == "keep me\n"


# ---- predict --rename on a hostile folder -------------------------------------------------------


def test_rename_loses_no_file_and_touches_nothing_outside(model_dir: Path, tmp_path: Path, capsys):
    folder, outside = tmp_path / "images", tmp_path / "outside"
    hc.hostile_folder(folder, outside)
    outside_before, inodes_before = hc.snapshot(outside), hc.inodes(folder)
    names_before = set(hc.snapshot(folder))
    out = tmp_path / "predictions.csv"
    code = hc.outcome(
        lambda: cli.main(
            ["predict", str(folder), "--model", str(model_dir), "--out", str(out), "--rename"]
        ),
        (),
    )
    assert code.kind == "ok", code
    assert "Traceback" not in capsys.readouterr().err
    assert hc.snapshot(outside) == outside_before
    assert hc.inodes(folder) == inodes_before  # every file still there (perhaps renamed)
    assert set(hc.snapshot(folder)) != names_before  # and the readable ones were renamed
    for link in ("link-out.tif", "dir-link-out", "loop.tif", "dangling.tif"):
        assert os.path.islink(folder / link)
    undo = next(tmp_path.glob("*undo*.csv"))
    assert cli.main(["predict", "--undo", str(undo)]) == 0
    assert set(hc.snapshot(folder)) == names_before
    assert hc.snapshot(outside) == outside_before


# ---- property-based fuzz ----------------------------------------------------------------------

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["image", "instances", "k", "x"]) | st.text(max_size=5),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
_b64 = st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
_requests = st.fixed_dictionaries(
    {},
    optional={
        "image": _b64 | _json_values,
        "instances": st.lists(
            _b64 | st.fixed_dictionaries({"image": _b64}) | _json_values, max_size=20
        )
        | _json_values,
        "k": _json_values,
    },
)
_bodies = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=300),
    _json_values.map(json.dumps),
    _requests.map(lambda d: json.dumps(d).encode()),
    st.lists(_b64, max_size=20).map(lambda items: json.dumps(items).encode()),
)
_content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "image/tiff",
            "image/png",
            "application/octet-stream",
            "Application/JSON; charset=utf-8",
            "text/csv",
            "",
            ";",
            "image/",
        ]
    ),
    st.text(max_size=30),
)


@FUZZ
@given(
    body=_bodies,
    content_type=_content_types,
    k=st.none() | st.text(max_size=12),
    num_labels=st.integers(1, 20),
    max_batch=st.integers(1, 16),
)
def test_fuzz_decode_request(body, content_type, k, num_labels, max_batch):
    codec = pytest.importorskip("flystage.serving.codec")
    headers = {} if k is None else {"X-Amzn-SageMaker-Custom-Attributes": f"k={k}"}
    if isinstance(body, str) and codec.media_type(content_type) != codec.JSON_TYPE:
        body = body.encode(
            "utf-8"
        )  # as the toolkit passes them: only JSON (and CSV) bodies arrive as str
    try:
        request = codec.decode_request(
            body, content_type, headers, num_labels=num_labels, max_batch=max_batch
        )
    except codec.RequestError as exc:
        assert 400 <= exc.status_code < 500
    else:
        assert 1 <= request.k <= num_labels and 1 <= len(request.images) <= max_batch
        assert all(isinstance(image, bytes) and image for image in request.images)


def test_codec_str_body_of_an_image_type_is_a_request_error():
    codec = pytest.importorskip("flystage.serving.codec")
    with pytest.raises(codec.RequestError):
        codec.decode_request("\u0100 not latin-1", "image/tiff")


_KINDS = sorted(hc.valid_images())


@FUZZ
@given(
    kind=st.sampled_from(_KINDS),
    other=st.sampled_from(_KINDS),
    how=st.sampled_from(["flip", "truncate", "splice", "flip+truncate", "repeat"]),
    flips=st.lists(st.integers(0, 2**16), min_size=1, max_size=12),
    cut=st.integers(0, 4000),
    cut_other=st.integers(0, 4000),
)
def test_fuzz_read_image_on_mutated_images(kind, other, how, flips, cut, cut_other):
    data = hc.valid_images()[kind]
    if "flip" in how:
        data = hc.flip_bits(data, flips)
    if "truncate" in how:
        data = data[: cut % (len(data) + 1)]
    if how == "splice":
        data = hc.splice(data, hc.valid_images()[other], cut, cut_other)
    if how == "repeat":
        data = data[: cut % (len(data) + 1)] * 3
    # A small pixel limit keeps each example cheap (a flipped size field may ask for 1 MP).
    got = hc.outcome(lambda: read_image(data, max_pixels=1_000_000), (ImageError,), seconds=20)
    assert got.kind in ("ok", "error"), got


# ---- the serve container ------------------------------------------------------------------------

from test_images import client, images  # noqa: E402,F401 - the same engine and image fixtures

HTTP_CASES = hc.http_cases()


@pytest.fixture(scope="module")
def serving(images, model_dir):
    with healthy_serve_container(model_dir, images["serve"]) as container:
        pids = hc.worker_pids(container.container)
        state = {
            "server": container,
            "pids": pids,
            "rss_before": hc.peak_rss_mib(container.container, pids),
        }
        yield state


@pytest.mark.docker
@pytest.mark.parametrize("case", _params(HTTP_CASES))
def test_serve_bad_request_is_a_clear_4xx(serving, case: hc.HttpCase):
    status, body = hc.send(serving["server"].url, case)
    if case.path == "/invocations":
        assert hc.clear_error_body(status, body), (status, body[:300])
    else:  # the model server's own answer for paths it does not serve
        assert status is not None and 400 <= status < 500 and "Traceback" not in body, (
            status,
            body[:300],
        )


@pytest.mark.docker
def test_serve_after_the_corpus_still_answers_with_the_same_workers(serving):
    container = serving["server"]
    from serving_helpers import lab_image, tiff_bytes

    status, body = hc.send(
        container.url,
        hc.HttpCase("good", tiff_bytes(lab_image(seed=3)), {"Content-Type": "image/tiff"}),
    )
    assert status == 200 and len(json.loads(body)["predictions"][0]["top"]) == 3, body[:300]
    assert container.status() == "running" and hc.restart_count(container.container) == 0
    assert hc.worker_pids(container.container) == serving["pids"], "a worker was restarted"
    log = container.logs()
    assert not [marker for marker in hc.WORKER_DEATH if marker in log], log[-3000:]


@pytest.mark.docker
def test_serve_bomb_cases_do_not_blow_up_worker_memory(serving):
    """The bomb requests (600 MB decoded each) are refused from their headers: the worker's peak
    resident memory (VmHWM) grows by less than 256 MiB over the whole corpus."""
    container = serving["server"]
    bombs = [c for c in HTTP_CASES if c.bomb]
    for case in bombs:  # again, in case this test runs alone
        status, body = hc.send(container.url, case)
        assert status is not None and 400 <= status < 500, (case.name, status, body[:300])
    before, after = serving["rss_before"], hc.peak_rss_mib(container.container, serving["pids"])
    if before is None or after is None:
        pytest.skip("the workers' /proc is not visible from here")
    assert after - before < 256, f"worker peak RSS {before:.0f} -> {after:.0f} MiB"
