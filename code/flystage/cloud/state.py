"""What one target leaves for the next: the pushed images, the last tuning and training jobs.

A small JSON file (``settings.state_file``), so that ``make train`` finds the tuning job of
``make tune``, ``make deploy`` the model of ``make train``, and every job the image digest
``make push`` pushed (``images``: repository -> tag and digest). Only names are kept: the
details are always read back from AWS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flystage.cloud.settings import CloudError
from flystage.files import atomic_write


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CloudError(
            f"{path}: not valid JSON; delete it (it only records the last job names)"
        ) from None


def update_state(path: str | Path, **values: Any) -> None:
    """Merge ``values`` into the state file (written atomically)."""
    path = Path(path)
    state = read_state(path) | values
    with atomic_write(path) as f:
        f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
