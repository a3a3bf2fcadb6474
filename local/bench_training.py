"""Local-mode training time, one host against two: ``python local/bench_training.py``.

Runs the same job (real train image, BDGP from ``$FLYSTAGE_DATA``) with InstanceCount 1 and 2
and prints one JSON line per run: wall seconds from container start to the last exit, the
per-epoch seconds the program logged, and the final validation metrics. Two hosts on one
2-core machine share the same cores, so this measures the data-parallel machinery's cost,
not a speed-up that only separate instances can give.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from flystage.cloud.training import job_name, parse_hyperparameters
from flystage_local import channels, training
from flystage_local.command import DEFAULT_DATA, build_request

EPOCH_SECONDS = re.compile(r"epoch \d+/\d+: \d+ images in ([0-9.]+) s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=[DEFAULT_DATA])
    parser.add_argument("--hp", default="arch=small_cnn epochs=5")
    parser.add_argument("--image", default="flystage-train:latest")
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-local-") as scratch:
        runs = Path(scratch)
        channel, _ = channels.stage_channel(args.data, runs / "channels")
        for count in args.instances:
            request = build_request(
                args.image,
                parse_hyperparameters(args.hp.split()),
                channel,
                count,
                job_name(f"bench{count}"),
                runs,
            )
            result = training.run_training_job(request, runs, write=None)
            epochs = [float(s) for s in EPOCH_SECONDS.findall(result.logs["algo-1"])]
            print(
                json.dumps(
                    {
                        "bench": "local_training",
                        "instances": count,
                        "hyperparameters": args.hp,
                        "status": result.status,
                        "seconds": result.seconds,
                        "epoch_seconds_median": statistics.median(epochs) if epochs else None,
                        "valid_top3": result.final_metrics.get("valid:top3"),
                        "images": "BDGP 193",
                        "load_average_1min": round(os.getloadavg()[0], 2),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
