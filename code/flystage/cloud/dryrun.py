"""The dry run: print each AWS request as one JSON object instead of sending it.

No credentials are needed and nothing is read from AWS; whatever a target would have read
from a response (an account id, the best job of the last tuning job) is shown as a
``<placeholder>``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

from flystage.cloud.session import Api


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "read"):
        return "<stream>"
    return value


def request_json(service: str, operation: str, request: dict[str, Any]) -> str:
    """One request as indented JSON: ``{"service", "operation", "request"}``."""
    return json.dumps(
        {"service": service, "operation": operation, "request": _jsonable(request)},
        indent=2,
        sort_keys=False,
    )


class DryRunApi(Api):
    """Prints requests to ``out`` (stdout: a stream of JSON objects, ``jq -s`` reads it);
    notes go to stderr. Every call returns None and waits return at once."""

    dry_run = True

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    @property
    def region(self) -> str:
        return self.settings.region or "<region>"

    def client(self, service: str):
        raise RuntimeError(f"dry run: no {service} client (a target asked AWS for a response)")

    def call(self, service: str, operation: str, **request: Any) -> None:
        print(request_json(service, operation, request), file=self.out, flush=True)
        return None

    def wait(self, service: str, waiter: str, delay: float, **request: Any) -> None:
        self.say(f"# would wait: {service} waiter {waiter} {json.dumps(_jsonable(request))}")
