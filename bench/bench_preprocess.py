"""How long a lab image takes to become a model input.

A 1110x420 16-bit dim TIFF (like the lab's), as file bytes, through
``flystage.reading.read_image`` and ``imaging.preprocess`` with the default PreprocessConfig, one
image at a time on one thread (as a serving worker does). Prints one JSON line: median and
p90 milliseconds of the whole path, and of reading and preprocessing separately.

    python bench/bench_preprocess.py [--repeats 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic lab image the tests use

from flystage.imaging import PreprocessConfig, preprocess  # noqa: E402
from flystage.reading import read_image  # noqa: E402
from imaging_helpers import LAB_HEIGHT, LAB_WIDTH, dim_embryo, tiff_bytes  # noqa: E402


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {
        "median_ms": round(float(np.median(ms)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument(
        "--threads", type=int, default=1, help="OpenCV threads (default 1, as in serving)"
    )
    args = parser.parse_args(argv)
    cv2.setNumThreads(args.threads)

    config = PreprocessConfig()
    # a few different images, tilted, so that alignment and masking do real work
    payloads = [
        tiff_bytes(dim_embryo(angle=a, length=800, seed=i)) for i, a in enumerate((0, 12, -25, 40))
    ]
    for data in payloads:  # warm up
        preprocess(read_image(data), config)

    read_s, prep_s, total_s = [], [], []
    for i in range(args.repeats):
        data = payloads[i % len(payloads)]
        t0 = time.perf_counter()
        image = read_image(data)
        t1 = time.perf_counter()
        out = preprocess(image, config)
        t2 = time.perf_counter()
        read_s.append(t1 - t0)
        prep_s.append(t2 - t1)
        total_s.append(t2 - t0)
    assert out.shape == (config.channels, config.height, config.width)

    total = percentiles_ms(total_s)
    result = {
        "benchmark": "preprocess",
        "image": f"{LAB_WIDTH}x{LAB_HEIGHT} uint16 TIFF bytes",
        "output": list(out.shape),
        "config": config.to_dict(),
        "repeats": args.repeats,
        "threads": args.threads,
        **total,
        "read": percentiles_ms(read_s),
        "preprocess": percentiles_ms(prep_s),
        "images_per_s": round(1000.0 / total["median_ms"], 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
