"""The serve image's entrypoint: ``docker run IMAGE serve``.

``serve`` resolves the settings (:mod:`flystage.serving.settings`), checks the model artefact in
``/opt/ml/model`` (``$SAGEMAKER_BASE_DIR/model``) by loading it and running a trial batch, and
only then starts multi-model-server with flystage's handler service. A missing or broken model
is logged and the container exits with status 1 before anything listens on port 8080, so it
never answers ``/ping`` (multi-model-server's own ``/ping`` says 200 even when its model failed
to load). Any other command is run as given (``docker run IMAGE python -V``).

After start, :class:`flystage.serving.model_watch.ModelWatch` stops the server (exit status
3) if its model is ever unregistered, since the model server's ``/ping`` would go on saying 200.

SIGTERM: tini (PID 1) passes it to this process group; sagemaker-inference forwards it to the
model server, which stops, and this process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

HANDLER_SERVICE = "flystage.serving.handler_service"
EXIT_BAD_MODEL = 1
EXIT_BAD_SETTINGS = 2
EXIT_MODEL_LOST = 3

logger = logging.getLogger("flystage.serve")


def model_dir() -> Path:
    """Where SageMaker unpacks model.tar.gz (``SAGEMAKER_BASE_DIR`` moves ``/opt/ml``)."""
    return Path(os.environ.get("SAGEMAKER_BASE_DIR", "/opt/ml")) / "model"


def serve() -> int:
    from flystage.artefact import ArtefactError, check_artefact, graph_file
    from flystage.serving import settings

    if os.environ.get("SAGEMAKER_MULTI_MODEL", "false").lower() == "true":
        logger.error(
            "flystage serve: multi-model endpoints are not supported; unset SAGEMAKER_MULTI_MODEL"
        )
        return EXIT_BAD_SETTINGS
    try:
        config = settings.apply()
        management = f"http://127.0.0.1:{settings.management_port()}"
    except settings.SettingsError as exc:
        logger.error("flystage serve: %s", exc)
        return EXIT_BAD_SETTINGS
    where = model_dir()
    try:
        metadata = check_artefact(where, threads=1, strict=True)
        graph, precision = graph_file(where, metadata, config.precision)
    except ArtefactError as exc:
        logger.error("flystage serve: NOT SERVING, the model in %s is unusable: %s", where, exc)
        return EXIT_BAD_MODEL
    logger.info(
        "flystage serve: model %s (%d stages: %s) in %s, %s graph %s; %d workers x %d threads, "
        "timeout %d s, payload limit %d MB; management API on %s",
        metadata.arch,
        len(metadata.labels),
        ", ".join(metadata.labels),
        where,
        precision,
        graph,
        config.workers,
        config.threads,
        config.timeout_seconds,
        config.max_payload_mb,
        management,
    )
    # The model server's management API (register, unregister, scale models; fetch a model from
    # any URL) shares port 8080 by default: keep it on the container's loopback, where only
    # this container can reach it, on a port SageMaker allows (settings.management_port).
    # multi-model-server reads MMS_<FIELD> over its config file.
    os.environ["MMS_MANAGEMENT_ADDRESS"] = management
    # Imported late: it configures logging and reads the environment at import time.
    from sagemaker_inference import model_server

    from flystage.serving.model_watch import ModelWatch

    # SIGTERM to ourselves runs sagemaker-inference's handler, which stops the model server.
    watch = ModelWatch(management, on_lost=lambda: os.kill(os.getpid(), signal.SIGTERM))
    watch.start()
    model_server.start_model_server(handler_service=HANDLER_SERVICE)
    watch.stop()
    return EXIT_MODEL_LOST if watch.lost else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    if not args or args[0] == "serve":
        return serve()
    os.execvp(args[0], args)  # replaces this process; returns only by raising
    return 127


if __name__ == "__main__":
    sys.exit(main())
