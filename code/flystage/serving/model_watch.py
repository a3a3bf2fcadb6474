"""Keep ``/ping`` honest after start: stop the container when its model is gone.

multi-model-server answers ``/ping`` with 200 "Healthy" even with no model registered, so a
model unregistered through the management API (reachable only on the container's loopback,
but still) would leave an endpoint that passes health checks and answers every request with
404. :class:`ModelWatch` asks the management API, every few seconds, whether the model is
registered; once it has been and then is not, it calls ``on_lost``, which the entrypoint uses
to stop the model server. The container then exits with a non-zero status, ``/ping`` fails,
and SageMaker replaces the instance.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable

logger = logging.getLogger(__name__)

MODEL_NAME = "model"  # the name sagemaker-inference registers a single model under


def model_registered(
    management_url: str, name: str = MODEL_NAME, timeout: float = 2.0
) -> bool | None:
    """Whether ``name`` is among the model server's models; None if the server did not answer."""
    try:
        with urllib.request.urlopen(f"{management_url}/models", timeout=timeout) as response:
            listing = json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    models = listing.get("models") if isinstance(listing, dict) else None
    return any(isinstance(m, dict) and m.get("modelName") == name for m in models or [])


class ModelWatch(threading.Thread):
    """Poll ``model_registered`` every ``interval`` seconds; ``misses`` answers in a row
    without the model call ``on_lost`` (once) and end the thread.

    The model server registers the model given on its command line before it listens, so any
    answer without it means the model was removed (possibly before the first poll). No answer
    at all is not a miss: while the server starts or stops, the listing is unknown, and a
    server that died ends the container by itself.
    """

    def __init__(
        self,
        management_url: str,
        on_lost: Callable[[], None],
        interval: float = 2.0,
        misses: int = 2,
    ) -> None:
        super().__init__(name="flystage-model-watch", daemon=True)
        self.management_url = management_url
        self.on_lost = on_lost
        self.interval = interval
        self.misses = misses
        self.lost = False
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        missing = 0
        while not self._stop_event.wait(self.interval):
            registered = model_registered(self.management_url)
            if registered is None:
                continue
            if registered:
                missing = 0
                continue
            missing += 1
            if missing >= self.misses:
                logger.error(
                    "flystage serve: the model is no longer registered with the model server; "
                    "stopping, so that /ping fails and the instance is replaced"
                )
                self.lost = True
                self.on_lost()
                return
