"""What the BDGP benchmarks share: where the data set is and how it is read.

The scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they
``from common import ...``; tests/test_bench_lablike.py loads it by its path.
"""

from __future__ import annotations

import os
from pathlib import Path

from flystage.datasets import bdgp_by_gene

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))


# Every image of a bdgp-insitu folder with its stage range as label and gene as group.
read_by_gene = bdgp_by_gene
