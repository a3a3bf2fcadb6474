"""Serving speed: the serve image (onnxruntime, int8 and float graphs) against a torch-eager
baseline served the same way.

All run in real containers on this machine with multi-model-server and sagemaker-inference,
on the same model artefact and the same number of workers: the serve image with its default
precision (the int8 graph when the model has one) and with ``FLYSTAGE_PRECISION=float``; the
baseline runs ``weights.pt`` in torch eager mode (docker/baseline, benchmark-only), the usual
PyTorch serving pattern, once with torch's own thread count and once with one thread per
worker. Each request is a 1110 x 420 16-bit TIFF (the lab's images). For each server:

- ``start_to_healthy_s``: ``docker run`` to the first ``/ping`` 200; ``first_answer_s`` to the
  first 200 from ``/invocations``;
- concurrency 1: latency p50 / p99 / mean (ms) over ``--requests`` requests, and where the
  time goes (``breakdown_ms``: the model work in the Python worker, the rest of the worker,
  and everything outside it: HTTP, the Java front end and its queue);
- concurrency 4: throughput (requests/s) over ``--requests`` requests;
- errors (anything but 200), and image sizes.

Prints one JSON line per server, then a summary line with the ratios and the goals.

    python bench/bench_serve.py [--model DIR] [--requests 3000]
    make bench-serve

Without ``--model``, the default model is trained on BDGP first (``flystage train``, which
keeps an int8 graph when it answers like the float one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import numpy as np
import urllib3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from common import trained_model  # noqa: E402
from flystage.serving.container import start_serve_container  # noqa: E402
from flystage.serving.settings import available_cpus  # noqa: E402
from serving_helpers import lab_image, tiff_bytes  # noqa: E402

GOALS = {
    "throughput_ratio_min": 3.0,
    "requests_min": 6000,
    "p99_over_p50_max": 1.5,
    "errors_max": 0,
    "start_to_healthy_s_max": 15.0,
    "serve_image_gb_max": 1.0,
}


def image_gb(client, tag: str) -> float | None:
    try:
        return round(client.images.get(tag).attrs["Size"] / 1e9, 3)
    except docker.errors.ImageNotFound:
        return None


def first_answer(
    http: urllib3.PoolManager, url: str, body: bytes, started: float, timeout: float
) -> float:
    """Seconds from ``started`` to the first 200 from /invocations (workers may still be
    loading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if send(http, url, body)[0] == 200:
                return time.monotonic() - started
        except urllib3.exceptions.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no answer from {url} within {timeout:.0f} s")


def send(http: urllib3.PoolManager, url: str, body: bytes) -> tuple[int, float, dict]:
    """POST one image: the status, the client's milliseconds, and the answer's ``timing_ms``
    (inside the Python worker: ``total`` from input_fn to the answer, ``predict`` of it the
    decode, preprocessing and model; ``{}`` when the server gives none)."""
    start = time.perf_counter()
    response = http.request(
        "POST",
        f"{url}/invocations",
        body=body,
        headers={"Content-Type": "image/tiff"},
        timeout=urllib3.Timeout(total=60),
        retries=False,
    )
    ms = (time.perf_counter() - start) * 1000
    timing = {}
    if response.status == 200:
        try:
            timing = json.loads(response.data).get("timing_ms") or {}
        except (ValueError, AttributeError):
            timing = {}
    return response.status, ms, timing


def breakdown(latencies: list[float], timings: list[dict]) -> dict | None:
    """Where the time of a request goes at p50 and p99: the Python worker's model work
    (``predict``), the rest of the worker (``worker_other``: decoding the request, encoding
    the answer) and everything outside it (``outside_worker``: the client, HTTP, the model
    server's Java front end and its queue to the worker)."""
    rows = [(ms, t) for ms, t in zip(latencies, timings) if "total" in t and "predict" in t]
    if len(rows) < 10:
        return None
    parts = {
        "predict": [t["predict"] for _, t in rows],
        "worker_other": [t["total"] - t["predict"] for _, t in rows],
        "outside_worker": [ms - t["total"] for ms, t in rows],
    }
    return {
        name: {q: round(float(np.percentile(v, int(q[1:]))), 2) for q in ("p50", "p99")}
        for name, v in parts.items()
    }


def run_phase(url: str, body: bytes, requests: int, concurrency: int, time_limit: float) -> dict:
    """``requests`` POSTs with ``concurrency`` clients, stopping early at ``time_limit`` seconds."""
    http = urllib3.PoolManager(maxsize=concurrency)
    latencies: list[float] = []
    timings: list[dict] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + time_limit

    def client() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            with lock:
                if next(counter, None) is None:
                    return
            try:
                status, ms, timing = send(http, url, body)
            except urllib3.exceptions.HTTPError:
                status, ms, timing = 0, 0.0, {}
            with lock:
                if status == 200:
                    latencies.append(ms)
                    timings.append(timing)
                else:
                    errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - start
    done = len(latencies) + errors
    return {
        "concurrency": concurrency,
        "requests": done,
        "errors": errors,
        "timed_out": done < requests,
        "seconds": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if latencies else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies), 2) if latencies else None,
        "breakdown_ms": breakdown(latencies, timings),
    }


def bench_server(
    name: str, image: str, model_dir: Path, environment: dict[str, str], body: bytes, args
) -> dict:
    http = urllib3.PoolManager()
    with start_serve_container(model_dir, image, environment=environment) as server:
        healthy = server.wait_healthy(timeout=args.start_timeout)
        answered = first_answer(http, server.url, body, server.started, args.start_timeout)
        for _ in range(args.warmup):
            send(http, server.url, body)
        serial = run_phase(server.url, body, args.requests, 1, args.time_limit)
        parallel = run_phase(server.url, body, args.requests, args.concurrency, args.time_limit)
        stop_seconds, exit_code = server.stop(timeout=30)
    return {
        "server": name,
        "image": image,
        "environment": environment,
        "start_to_healthy_s": round(healthy, 2),
        "first_answer_s": round(answered, 2),
        "c1": serial,
        f"c{args.concurrency}": parallel,
        "errors": serial["errors"] + parallel["errors"],
        "stop_s": round(stop_seconds, 2),
        "exit_code": exit_code,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        type=Path,
        help="model artefact folder (default: the default model trained on BDGP)",
    )
    parser.add_argument("--serve-image", default="flystage-serve:latest")
    parser.add_argument("--baseline-image", default="flystage-baseline:latest")
    parser.add_argument("--train-image", default="flystage-train:latest")
    parser.add_argument(
        "--requests", type=int, default=3000, help="requests per phase and server (default 3000)"
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="model server workers for every server (default: the serve image's default)",
    )
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds at most per phase")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    args = parser.parse_args(argv)

    client = docker.from_env()
    cpus = available_cpus()
    workers = args.workers or cpus  # the serve image's default on this machine
    body = tiff_bytes(lab_image(420, 1110, seed=7))
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        model_dir = args.model
        note = "model given"
        if model_dir is None:
            model_dir = Path(scratch) / "model"
            note = trained_model(model_dir, Path(scratch))
        model_dir.chmod(0o755)
        meta = json.loads((model_dir / "metadata.json").read_text())
        common = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(workers)}
        int8 = bool((meta.get("int8") or {}).get("kept"))
        runs = [
            *([("onnxruntime int8 (serve image)", args.serve_image, dict(common))] if int8 else []),
            (
                "onnxruntime float (serve image)",
                args.serve_image,
                {**common, "FLYSTAGE_PRECISION": "float"},
            ),
            ("torch-eager (torch's own threads)", args.baseline_image, dict(common)),
            (
                "torch-eager (1 thread per worker)",
                args.baseline_image,
                {**common, "BASELINE_TORCH_THREADS": str(max(1, cpus // workers))},
            ),
        ]
        results = []
        for name, image, environment in runs:
            result = bench_server(name, image, model_dir, environment, body, args)
            result.update(
                {
                    "arch": meta["arch"],
                    "input_shape": meta["input_shape"],
                    "cpus": cpus,
                    "request_bytes": len(body),
                }
            )
            print(json.dumps(result), flush=True)
            results.append(result)

    ours, baselines = results[0], results[1 + int8 :]
    conc = f"c{args.concurrency}"
    best_baseline = max(b[conc]["throughput_rps"] for b in baselines)
    sizes = {
        which: image_gb(client, tag)
        for which, tag in (
            ("serve", args.serve_image),
            ("train", args.train_image),
            ("baseline", args.baseline_image),
        )
    }
    summary = {
        "summary": "bench_serve",
        "model": note,
        "arch": meta["arch"],
        "requests_total": sum(r["c1"]["requests"] + r[conc]["requests"] for r in results),
        "throughput_rps": {r["server"]: r[conc]["throughput_rps"] for r in results},
        "served_by_default": ours["server"],
        "int8_record": meta.get("int8"),
        "throughput_ratio_vs_best_baseline": round(ours[conc]["throughput_rps"] / best_baseline, 2)
        if best_baseline
        else None,
        "float_throughput_ratio_vs_best_baseline": round(
            results[int8][conc]["throughput_rps"] / best_baseline, 2
        )
        if best_baseline
        else None,
        "throughput_ratio_vs_each_baseline": {
            b["server"]: round(ours[conc]["throughput_rps"] / b[conc]["throughput_rps"], 2)
            for b in baselines
            if b[conc]["throughput_rps"]
        },
        "p50_ms_c1": ours["c1"]["p50_ms"],
        "p99_ms_c1": ours["c1"]["p99_ms"],
        "p99_over_p50_c1": round(ours["c1"]["p99_ms"] / ours["c1"]["p50_ms"], 2)
        if ours["c1"]["p50_ms"]
        else None,
        "breakdown_ms_c1": ours["c1"]["breakdown_ms"],
        "requests_default_server": ours["c1"]["requests"] + ours[conc]["requests"],
        "errors": {r["server"]: r["errors"] for r in results},
        "start_to_healthy_s": ours["start_to_healthy_s"],
        "first_answer_s": ours["first_answer_s"],
        "image_gb": sizes,
        "serve_over_train_size": round(sizes["serve"] / sizes["train"], 3)
        if sizes["serve"] and sizes["train"]
        else None,
    }
    summary["goals"] = {
        "throughput >= 3x best torch-eager": (summary["throughput_ratio_vs_best_baseline"] or 0)
        >= GOALS["throughput_ratio_min"],
        ">= 6000 requests to the default server": summary["requests_default_server"]
        >= GOALS["requests_min"],
        "p99 <= 1.5x p50 at concurrency 1": (summary["p99_over_p50_c1"] or 99)
        <= GOALS["p99_over_p50_max"],
        "zero errors": all(e == 0 for e in summary["errors"].values()),
        "start to healthy <= 15 s": ours["start_to_healthy_s"] <= GOALS["start_to_healthy_s_max"],
        "serve image <= 1 GB": (sizes["serve"] or 99) <= GOALS["serve_image_gb_max"],
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
