"""The serve container's settings: the usual SageMaker environment variables, with defaults.

Every setting is an environment variable, so a SageMaker model's ``Environment`` (or
``docker run -e``) changes it:

==========================================  ======================================  ===============
variable                                    meaning                                 default
==========================================  ======================================  ===============
``SAGEMAKER_MODEL_SERVER_WORKERS``          worker processes (one model copy each)  CPUs
``FLYSTAGE_INTRA_OP_THREADS``               onnxruntime threads per worker          CPUs // workers
``SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS``  seconds a worker may take per request   60
``SAGEMAKER_MAX_PAYLOAD_IN_MB``             request body limit (larger: HTTP 413)   6
``FLYSTAGE_MAX_PIXELS``                     largest image accepted, in pixels       100,000,000
``FLYSTAGE_MAX_DECODED_MB``                 largest decoded image accepted, in MiB  512
``FLYSTAGE_MAX_BATCH``                      most images in one JSON request         16
``SAGEMAKER_SAFE_PORT_RANGE``               ports the container may use beside 8080 unset (8081)
``FLYSTAGE_PRECISION``                      graph to run: auto, float or int8       auto
==========================================  ======================================  ===============

CPUs are those this container may use (CPU affinity and cgroup quota), not the host's. One
worker per CPU with one thread each gives the most throughput under concurrent requests and
never runs more busy threads than cores; on an ml.m5.xlarge (4 vCPUs) that is 4 workers.
``SAGEMAKER_MODEL_SERVER_TIMEOUT`` is read by multi-model-server as *minutes*: use the
``_SECONDS`` variable. Payload: SageMaker real-time endpoints accept 6 MB. A body over the
limit is answered 413 with flystage's JSON error; the model server itself closes bodies over
:data:`TRANSPORT_FACTOR` times the limit (its own 413, without a body) so that no body can
fill its memory. An image is refused (400) before decoding when its header promises more than
``FLYSTAGE_MAX_PIXELS`` pixels or ``FLYSTAGE_MAX_DECODED_MB`` of decoded samples; the defaults
are the command line's (:mod:`flystage.image_checks`): 512 MiB holds a 100 MP 16-bit grey
image and costs a worker about 3 times that at its peak, while a 600 KB zlib TIFF of 25 MP
float64 RGB (572 MiB decoded) is refused.

``FLYSTAGE_PRECISION``: ``auto`` runs the artefact's int8 graph when training kept one (it
answered like the float graph on the validation images), the float graph otherwise; ``int8``
refuses to start on a model without one; ``float`` always runs ``model.onnx``. Every answer's
``model`` says which ran (``precision``) and its ``version`` is that graph's SHA-256 prefix.

The model server's management API listens on the container's loopback at
:func:`management_port`: 8081, or, when SageMaker sets ``SAGEMAKER_SAFE_PORT_RANGE`` (as it does
for multi-container endpoints, whose containers share one network), the first free port of that
range, since no other port may be used.

``GET /execution-parameters`` (a batch transform job that does not say how many requests to send
at once asks it) answers :meth:`ServeSettings.execution_parameters`: one request per worker, up
to 16, with a body limit that keeps both within SageMaker's 100 MB; the entrypoint passes it to
the model server's endpoint plugin in ``FLYSTAGE_EXECUTION_PARAMETERS``.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from flystage import image_checks
from flystage.errors import FlystageError

WORKERS = "SAGEMAKER_MODEL_SERVER_WORKERS"
THREADS = "FLYSTAGE_INTRA_OP_THREADS"
TIMEOUT_SECONDS = "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS"
MAX_PAYLOAD_MB = "SAGEMAKER_MAX_PAYLOAD_IN_MB"
MAX_PIXELS = "FLYSTAGE_MAX_PIXELS"
MAX_BATCH = "FLYSTAGE_MAX_BATCH"
MAX_DECODED_MB = "FLYSTAGE_MAX_DECODED_MB"
PRECISION = "FLYSTAGE_PRECISION"
# multi-model-server reads MMS_<FIELD> over its config file; its own body limit, in bytes.
TRANSPORT_LIMIT = "MMS_MAX_REQUEST_SIZE"
TRANSPORT_FACTOR = 4

DEFAULT_TIMEOUT_SECONDS = 60
DEFAULT_MAX_PAYLOAD_MB = 6
DEFAULT_MAX_PIXELS = image_checks.DEFAULT_MAX_PIXELS
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_DECODED_MB = image_checks.DEFAULT_MAX_DECODED_MB
SAFE_PORT_RANGE = "SAGEMAKER_SAFE_PORT_RANGE"
INFERENCE_PORT = 8080
DEFAULT_MANAGEMENT_PORT = 8081
# Read by the model server's /execution-parameters plugin (docker/serve/execution-parameters).
EXECUTION_PARAMETERS = "FLYSTAGE_EXECUTION_PARAMETERS"
# SageMaker refuses a transform job whose MaxConcurrentTransforms * MaxPayloadInMB is over 100 MB.
TRANSFORM_TOTAL_PAYLOAD_MB = 100
# Concurrency stops growing where the body limit would fall below a real-time endpoint's 6 MB.
TRANSFORM_MIN_PAYLOAD_MB = 6


class SettingsError(FlystageError, ValueError):
    """A serving environment variable with a value that cannot be used."""


@dataclass(frozen=True)
class ServeSettings:
    workers: int
    threads: int
    timeout_seconds: int
    max_payload_mb: int
    max_pixels: int
    max_batch: int
    max_decoded_mb: int
    precision: str = "auto"

    @property
    def max_payload_bytes(self) -> int:
        return self.max_payload_mb * 2**20

    def execution_parameters(self) -> dict[str, int | str]:
        """What ``GET /execution-parameters`` answers a batch transform job."""
        concurrent, payload_mb = transform_limits(self.workers, self.max_payload_mb)
        return {
            "MaxConcurrentTransforms": concurrent,
            "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": payload_mb,
        }

    def as_environment(self) -> dict[str, str]:
        return {
            WORKERS: str(self.workers),
            THREADS: str(self.threads),
            TIMEOUT_SECONDS: str(self.timeout_seconds),
            MAX_PAYLOAD_MB: str(self.max_payload_mb),
            MAX_PIXELS: str(self.max_pixels),
            MAX_BATCH: str(self.max_batch),
            MAX_DECODED_MB: str(self.max_decoded_mb),
            PRECISION: self.precision,
            TRANSPORT_LIMIT: str(TRANSPORT_FACTOR * self.max_payload_bytes),
            EXECUTION_PARAMETERS: json.dumps(self.execution_parameters()),
        }


def transform_limits(workers: int, max_payload_mb: int) -> tuple[int, int]:
    """(MaxConcurrentTransforms, MaxPayloadInMB) for ``workers`` serve workers that accept bodies
    up to ``max_payload_mb``: a request in flight per worker, at most 16, each body limit within
    SageMaker's 100 MB in total."""
    concurrent = max(1, min(workers, TRANSFORM_TOTAL_PAYLOAD_MB // TRANSFORM_MIN_PAYLOAD_MB))
    return concurrent, min(max_payload_mb, TRANSFORM_TOTAL_PAYLOAD_MB // concurrent)


def available_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 or v1 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by the cgroup quota (``docker run --cpus``), or None if unlimited."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file():
            quota_us = int(v1_quota.read_text())
            return None if quota_us <= 0 else quota_us / int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return None


def _positive_int(environ: MutableMapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a whole number of at least 1") from None
    if value < 1:
        raise SettingsError(f"{name}={raw!r}: expected a whole number of at least 1")
    return value


def resolve(
    environ: MutableMapping[str, str] | None = None, cpus: int | None = None
) -> ServeSettings:
    """The settings from ``environ`` (default ``os.environ``), defaults filled in for ``cpus``."""
    environ = os.environ if environ is None else environ
    cpus = available_cpus() if cpus is None else cpus
    workers = _positive_int(environ, WORKERS, cpus)
    return ServeSettings(
        workers=workers,
        threads=_positive_int(environ, THREADS, max(1, cpus // workers)),
        timeout_seconds=_positive_int(environ, TIMEOUT_SECONDS, DEFAULT_TIMEOUT_SECONDS),
        max_payload_mb=_positive_int(environ, MAX_PAYLOAD_MB, DEFAULT_MAX_PAYLOAD_MB),
        max_pixels=_positive_int(environ, MAX_PIXELS, DEFAULT_MAX_PIXELS),
        max_batch=_positive_int(environ, MAX_BATCH, DEFAULT_MAX_BATCH),
        max_decoded_mb=_positive_int(environ, MAX_DECODED_MB, DEFAULT_MAX_DECODED_MB),
        precision=_precision(environ),
    )


def _precision(environ: MutableMapping[str, str]) -> str:
    from flystage.artefact import PRECISIONS

    raw = environ.get(PRECISION, "").strip().lower() or "auto"
    if raw not in PRECISIONS:
        raise SettingsError(
            f"{PRECISION}={environ[PRECISION]!r}: expected one of {', '.join(PRECISIONS)} "
            "(auto: the int8 graph when the model has one)"
        )
    return raw


def apply(
    environ: MutableMapping[str, str] | None = None, cpus: int | None = None
) -> ServeSettings:
    """Resolve the settings and write them back into ``environ``, where the model server and its
    workers (child processes) read them."""
    environ = os.environ if environ is None else environ
    settings = resolve(environ, cpus)
    environ.update(settings.as_environment())
    return settings


def safe_port_range(environ: MutableMapping[str, str]) -> range | None:
    """The ports of ``SAGEMAKER_SAFE_PORT_RANGE`` (``LOW-HIGH``, both included), None if unset."""
    raw = environ.get(SAFE_PORT_RANGE, "").strip()
    if not raw:
        return None
    match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", raw)
    low, high = (int(match[1]), int(match[2])) if match else (0, 0)
    if not match or not 1 <= low <= high <= 65535:
        raise SettingsError(
            f"{SAFE_PORT_RANGE}={raw!r}: expected two port numbers LOW-HIGH (1-65535, LOW <= "
            "HIGH), as SageMaker sets it, e.g. 10000-10999; unset it to use port 8081"
        )
    return range(low, high + 1)


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def management_port(environ: MutableMapping[str, str] | None = None) -> int:
    """The management API's port: 8081, or the first free one in ``SAGEMAKER_SAFE_PORT_RANGE``
    (never 8080, the inference port)."""
    environ = os.environ if environ is None else environ
    ports = safe_port_range(environ)
    if ports is None:
        return DEFAULT_MANAGEMENT_PORT
    for port in ports:
        if port != INFERENCE_PORT and _free(port):
            return port
    raise SettingsError(
        f"{SAFE_PORT_RANGE}={environ[SAFE_PORT_RANGE]!r}: no free port in the range for the "
        "model server's management API; give a range with a free port other than 8080"
    )
