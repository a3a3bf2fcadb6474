"""The prediction pipeline (flystage.batches): readers ahead of inference workers, in order,
with a bounded number of decoded images waiting, on a real model and real files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from artefact_helpers import make_artefact, write_image
from flystage.batches import pipelined_batches
from flystage.organise import iter_images
from flystage.predictor import Predictor, predict_files


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("model")
    make_artefact(d)
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """37 images (not a multiple of any batch size used), one of them unreadable."""
    root = tmp_path_factory.mktemp("images")
    for i in range(36):
        write_image(root / f"embryo{i:02d}.tif", seed=i)
    (root / "embryo17b.tif").write_bytes(b"II*\x00" + b"\x00" * 20)  # a truncated TIFF
    return root


class CountingPredictor(Predictor):
    """The real predictor, counting images decoded but not yet through the model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()
        self.waiting = self.most_waiting = 0

    def prepare(self, source, name):
        out = super().prepare(source, name)
        with self.lock:
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        return out

    def predict_prepared(self, prepared, names, k=3):
        with self.lock:
            self.waiting -= len(prepared)
        return super().predict_prepared(prepared, names, k)


@pytest.mark.parametrize("batch_size, workers, readers", [(1, 1, 1), (5, 2, 1), (8, 3, 2)])
def test_pipeline_answers_as_one_call_per_image_in_path_order(
    model_dir: Path, folder: Path, batch_size: int, workers: int, readers: int
):
    paths, _ = iter_images([folder])
    names = [p.name for p in paths]
    predictor = CountingPredictor(model_dir, threads=1)
    batches = list(
        pipelined_batches(predictor, paths, names, 3, batch_size, workers=workers, readers=readers)
    )
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    got = [p for batch in batches for p in batch]
    expected = [predictor.predict_sources([p], names=[p.name])[0] for p in paths]
    assert [p.source for p in got] == names
    for a, b in zip(got, expected):
        assert a.error == b.error
        assert [label for label, _ in a.top] == [label for label, _ in b.top]
        assert [p for _, p in a.top] == pytest.approx([p for _, p in b.top], abs=1e-5)
    assert sum(p.error is not None for p in got) == 1
    # Never more decoded images waiting than the batches read ahead plus those handed to workers
    # that have not started them (a slow thread start can leave all of them queued).
    assert 0 < predictor.most_waiting <= 2 * batch_size * (workers + 1)


def test_predict_files_runs_a_local_model_as_a_pipeline(model_dir: Path, folder: Path):
    paths, _ = iter_images([folder])
    predictor = CountingPredictor(model_dir, threads=1)
    out = predict_files(
        predictor, paths, root=folder, batch_size=4, workers=2, readers=2, progress=False
    )
    assert [p.source for p in out] == [p.relative_to(folder).as_posix() for p in paths]
    assert predictor.most_waiting > 0  # prepare was called apart from the model


def test_an_error_in_a_reader_reaches_the_caller(model_dir: Path, folder: Path):
    class Failing(Predictor):
        def prepare(self, source, name):
            if name == "embryo05.tif":
                raise MemoryError("no memory left for this image")
            return super().prepare(source, name)

    paths, _ = iter_images([folder])
    with pytest.raises(MemoryError, match="no memory left"):
        list(
            pipelined_batches(
                Failing(model_dir, threads=1), paths, [p.name for p in paths], 3, 4, 2, 2
            )
        )
