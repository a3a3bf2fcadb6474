"""What the BDGP benchmarks share: where the data set is and how it is read.

The scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they
``from common import ...``; tests/test_bench_lablike.py loads it by its path.
"""

from __future__ import annotations

import os
from pathlib import Path

from flystage.organise import Record, organise

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))


def read_by_gene(data: Path) -> list[Record]:
    """Every image of a bdgp-insitu folder (or a lab-like copy of one) with its stage range from
    ``labels.csv`` as the label and its gene as the group; all in one split ("none": the
    benchmarks hold out genes themselves)."""
    result = organise(
        [data],
        labels_csv=data / "labels.csv",
        label_column="stage_range",
        group_column="gene",
        split="none",
    )
    return result.records
