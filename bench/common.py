"""What the BDGP benchmarks share: where the data set is and how it is read.

The scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they
``from common import ...``; tests/test_bench_lablike.py loads it by its path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flystage.datasets import bdgp_by_gene

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))


# Every image of a bdgp-insitu folder with its stage range as label and gene as group.
read_by_gene = bdgp_by_gene


def trained_model(model_dir: Path, work: Path) -> str:
    """The toolkit's default model trained on DATA (genes as groups) by the real commands, so
    that the artefact holds the int8 graph training keeps (or says why it did not)."""
    manifest = work / "manifest.csv"
    for command in (
        ["organise", str(DATA), "--group-regex", "^(?P<group>[^/]+)/", "--out", str(manifest)],
        ["train", "--manifest", str(manifest), "--model-dir", str(model_dir)],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "flystage", *command], capture_output=True, text=True
        )
        if result.returncode != 0:
            sys.exit(f"flystage {command[0]} failed ({result.returncode}):\n{result.stderr}")
    return f"the default model trained on the BDGP images in {DATA} (flystage train)"
