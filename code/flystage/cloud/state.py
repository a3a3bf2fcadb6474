"""What one target leaves for the next: the last tuning job, training job and model data.

A small JSON file (``settings.state_file``), so that ``make train`` finds the tuning job of
``make tune`` and ``make deploy`` the model of ``make train``. Only names are kept: the
details are always read back from SageMaker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flystage.cloud.settings import CloudError


def read_state(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CloudError(
            f"{path}: not valid JSON; delete it (it only records the last job names)"
        ) from None


def update_state(path: str | Path, **values: str) -> None:
    """Merge ``values`` into the state file (written atomically)."""
    path = Path(path)
    state = read_state(path) | values
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
