"""Batched prediction over many files as a pipeline: readers ahead of inference workers.

Reading and preprocessing an image (:meth:`flystage.predictor.Predictor.prepare`) and running a
batch through onnxruntime (:meth:`~flystage.predictor.Predictor.predict_prepared`) both release
the GIL for most of their time, so on threads they overlap: ``readers`` threads decode the
next images while ``workers`` threads each run a batch. At most
``2 * batch_size * (workers + 1)`` decoded images wait at once (``workers + 1`` batches read
ahead, and up to ``workers + 1`` batches handed to workers that have not started them; about
0.1 MB each at the default input), whatever the folder's size, and batches come out in the
order of the paths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class PreparingPredictor(Protocol):
    """A local predictor that splits an image's work into prepare (decode) and predict."""

    def prepare(self, source: Any, name: str) -> np.ndarray | str: ...

    def predict_prepared(
        self, prepared: Sequence[np.ndarray | str], names: Sequence[str], k: int = 3
    ) -> list[Any]: ...


def pipelined_batches(
    predictor: PreparingPredictor,
    paths: Sequence[Path],
    names: Sequence[str],
    k: int = 3,
    batch_size: int = 16,
    workers: int = 1,
    readers: int = 1,
) -> Iterator[list[Any]]:
    """Yield the predictions for ``paths`` one batch at a time, in order.

    ``readers`` threads run ``predictor.prepare`` ahead of ``workers`` threads running
    ``predictor.predict_prepared`` on batches of ``batch_size``.
    """
    batch_size, workers, readers = max(1, batch_size), max(1, workers), max(1, readers)
    window = batch_size * (workers + 1)
    todo = iter(zip(paths, names))
    reads: deque[tuple[str, Future]] = deque()
    running: deque[Future] = deque()
    with (
        ThreadPoolExecutor(readers, thread_name_prefix="flystage-read") as read_pool,
        ThreadPoolExecutor(workers, thread_name_prefix="flystage-infer") as infer_pool,
    ):

        def read_ahead() -> None:
            for path, name in todo:
                reads.append((name, read_pool.submit(predictor.prepare, path, name)))
                if len(reads) >= window:
                    return

        read_ahead()
        while reads or running:
            if reads:
                batch = [reads.popleft() for _ in range(min(batch_size, len(reads)))]
                read_ahead()
                prepared = [future.result() for _, future in batch]
                batch_names = [name for name, _ in batch]
                running.append(
                    infer_pool.submit(predictor.predict_prepared, prepared, batch_names, k)
                )
            # Keep `workers` batches running; drain them all once nothing is left to read.
            while running and (len(running) > workers or not reads):
                yield running.popleft().result()
