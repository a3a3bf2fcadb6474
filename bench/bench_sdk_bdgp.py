"""The BDGP folder channel through the SageMaker Python SDK (local mode), as a Studio user runs it.

``Estimator(image_uri=<train image>, instance_type="local").fit({"train": "file://<bdgp-insitu>"})``
on the BDGP tree as it is shared (``<gene>/<stage>/<id>.bmp``, no manifest), with the
hyperparameter ``group_regex='^(?P<group>[^/]+)/'`` so the validation split holds whole genes,
and the train program's defaults otherwise (the EfficientNet-Lite2 probe). Prints the job's
labels-and-counts table (from its log) and, as its last line, one JSON object: ``labels``,
``valid_top1``, ``valid_top3``, ``train_images``, ``valid_images``, ``train_genes``,
``valid_genes``, ``seconds``, ``instances``.

    .venv/bin/python bench/bench_sdk_bdgp.py [--data DIR] [--instances 1|2]

Needs the SDK (``pip install -e '.[sdk]'``), Docker Compose and the train image. Telemetry is
switched off by an SDK defaults config (``TelemetryOptOut: true``) named by
``SAGEMAKER_USER_CONFIG_OVERRIDE``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FLYSTAGE_DATA", REPO.parent / "shared" / "data" / "bdgp-insitu"))
SDK_CONFIG = (
    "SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n"
)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="the bdgp-insitu folder (default $FLYSTAGE_DATA)"
    )
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--image", default=os.environ.get("TRAIN_IMAGE", "flystage-train:latest"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flystage-bench-sdk-"))
    (work / "config.yaml").write_text(SDK_CONFIG)
    os.environ.setdefault("SAGEMAKER_USER_CONFIG_OVERRIDE", str(work / "config.yaml"))
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from sagemaker.estimator import Estimator
    from sagemaker.local import LocalSession

    from flystage import sagemaker as fs

    session = LocalSession()
    session.config = {"local": {"local_code": True, "container_root": str(work)}}
    estimator = Estimator(
        image_uri=args.image,
        role=fs.LOCAL_ROLE,
        instance_count=args.instances,
        instance_type="local",
        hyperparameters=fs.folder_hyperparameters(group_regex=fs.GENE_GROUP),
        metric_definitions=fs.METRIC_DEFINITIONS,
        output_path=f"file://{work / 'output'}",
        sagemaker_session=session,
    )
    log = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(_Tee(sys.stderr, log)):
            estimator.fit({fs.DATA_CHANNEL: f"file://{args.data.resolve()}"}, logs=True)
    finally:
        fs.remove_local_containers(work)
    seconds = time.perf_counter() - started
    with tarfile.open(estimator.model_data.removeprefix("file://")) as tar:
        metadata = json.load(tar.extractfile("metadata.json"))
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.getvalue())
    lines = [line.split("|", 1)[-1].strip() for line in text.splitlines() if "algo-1" in line]
    start = next(i for i, line in enumerate(lines) if line.startswith("labels ("))
    table = lines[start : start + 5]
    print("\n".join(table))
    genes = {}
    for split in ("train", "valid"):
        row = next(line for line in table if line.startswith(split))
        genes[split] = int(row.split()[-1])
    metrics = metadata["metrics"]
    print(
        json.dumps(
            {
                "labels": metadata["labels"],
                "valid_top1": metrics.get("valid_top1"),
                "valid_top3": metrics.get("valid_top3"),
                "train_images": metadata.get("train_images"),
                "valid_images": metadata.get("valid_images"),
                "train_genes": genes["train"],
                "valid_genes": genes["valid"],
                "seconds": round(seconds, 1),
                "instances": args.instances,
                "image": args.image,
                "arch": metadata.get("arch"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
