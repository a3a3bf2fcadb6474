"""Benchmark the review page on 2,000 lab-like images: `make bench-review`.

    python bench/bench_review.py [--images 2000] [--distinct 40]

Makes ``--images`` 1110x420 16-bit TIFFs like the lab's (``tests/serving_helpers.lab_image``;
``--distinct`` different pictures, hard-linked under 2,000 names: every name still gets its
own thumbnail, as the cache is keyed by path) and a predictions CSV for them, starts
``flystage review`` as its own process with an empty thumbnail cache, and measures in
Debian's headless Chromium:

- ``first_page_s``: from navigation to the first page's thumbnails all decoded (cold cache;
  the server starts making thumbnails least-sure-first in the background as it starts);
- ``scroll_2000_s``: scrolling one window at a time until all cards are loaded and every
  thumbnail in view has been decoded (cold: thumbnails are made as they are asked for);
- once every thumbnail is cached: ``cached_max_ms`` / ``cached_p99_ms`` / ``cached_median_ms``
  of every request the page makes (each thumbnail and every API page, one at a time, over
  HTTP), ``cached_first_page_s`` for a reload and ``cached_scroll_2000_s`` for scrolling again;
- ``server_rss_mb`` / ``server_peak_rss_mb``: the server process's memory at the end.
Goals: first page < 1 s, no request over 200 ms once cached. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser_helpers import chromium, missing  # noqa: E402
from serving_helpers import lab_image  # noqa: E402

LABELS = ["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"]
FIRST_PAGE = 12  # thumbnails in the first window


def make_images(folder: Path, n: int, distinct: int) -> list[str]:
    folder.mkdir(parents=True)
    originals = []
    for i in range(distinct):
        path = folder / f"embryo{i:05d}.tif"
        tifffile.imwrite(path, lab_image(seed=i))
        originals.append(path)
    names = [p.name for p in originals]
    for i in range(distinct, n):
        name = f"embryo{i:05d}.tif"
        os.link(originals[i % distinct], folder / name)
        names.append(name)
    return names


def write_predictions(path: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "stage_1", "p_1", "stage_2", "p_2", "stage_3", "p_3", "error"])
        for name in names:
            p = rng.dirichlet(np.full(len(LABELS), 0.5))
            order = np.argsort(-p)[:3]
            writer.writerow([name, *[c for j in order for c in (LABELS[j], f"{p[j]:.4f}")], ""])


def rss_mb(pid: int) -> tuple[float, float]:
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def wait_images_js(count: int) -> str:
    return (
        f"const i = [...document.querySelectorAll('article.card img')].slice(0, {count});"
        f"return i.length >= {count} && i.every(x => x.complete && x.naturalWidth > 0)"
    )


VISIBLE_DONE = """
const imgs = [...document.querySelectorAll('article.card img')].filter(i => {
  const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; });
return imgs.every(i => i.complete && i.naturalWidth > 0);
"""


def scroll_all(driver, n: int) -> float:
    """Seconds to scroll one window at a time to the last of ``n`` cards, each window's
    thumbnails decoded."""
    from selenium.webdriver.support.ui import WebDriverWait

    t0 = time.perf_counter()
    while True:
        WebDriverWait(driver, 60, poll_frequency=0.02).until(
            lambda d: d.execute_script(VISIBLE_DONE)
        )
        done = driver.execute_script(
            "return document.querySelectorAll('article.card').length >= arguments[0] &&"
            " innerHeight + scrollY >= document.body.scrollHeight - 2",
            n,
        )
        if done:
            return round(time.perf_counter() - t0, 2)
        driver.execute_script("window.scrollBy(0, innerHeight)")


def timed_get(url: str, token: str) -> float:
    request = urllib.request.Request(url, headers={"X-Review-Token": token})
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=40)
    args = parser.parse_args(argv)
    if missing():
        print(f"error: {missing()}", file=sys.stderr)
        return 2
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="flystage-bench-review-") as tmp:
        tmp = Path(tmp)
        names = make_images(tmp / "images", args.images, min(args.distinct, args.images))
        write_predictions(tmp / "predictions.csv", names)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flystage",
                "review",
                str(tmp / "predictions.csv"),
                "--images",
                str(tmp / "images"),
                "--out",
                str(tmp / "reviewed.csv"),
                "--cache-dir",
                str(tmp / "cache"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            url = ""
            while not url:
                line = server.stdout.readline()
                if not line:
                    raise RuntimeError("flystage review exited before printing its URL")
                url = line.split("open ", 1)[1].strip() if line.startswith("open ") else ""
            base, token = url.split("/?token=")
            result: dict = {"images": args.images, "size": "1110x420 uint16 TIFF"}
            with chromium(1280, 900) as driver:
                t0 = time.perf_counter()
                driver.get(url)
                WebDriverWait(driver, 60, poll_frequency=0.02).until(
                    lambda d: d.execute_script(wait_images_js(FIRST_PAGE))
                )
                result["first_page_s"] = round(time.perf_counter() - t0, 3)
                result["scroll_2000_s"] = scroll_all(driver, args.images)
                # Every thumbnail cached (the background maker finishes what scrolling skipped).
                deadline = time.time() + 600
                while (
                    sum(1 for _ in (tmp / "cache").rglob("*.png")) < args.images
                    and time.time() < deadline
                ):
                    time.sleep(0.5)
                t0 = time.perf_counter()
                driver.refresh()
                WebDriverWait(driver, 60, poll_frequency=0.02).until(
                    lambda d: d.execute_script(wait_images_js(FIRST_PAGE))
                )
                result["cached_first_page_s"] = round(time.perf_counter() - t0, 3)
                result["cached_scroll_2000_s"] = scroll_all(driver, args.images)
            times = [timed_get(f"{base}/thumb/{i}.png", token) for i in range(args.images)]
            times += [
                # Each page as the page asks for it: after an image id.
                timed_get(f"{base}/api/items?after={o}&limit=60", token)
                for o in range(0, args.images, 60)
            ]
            times.append(timed_get(f"{base}/", token))
            result.update(
                cached_requests=len(times),
                cached_median_ms=round(float(np.median(times)), 2),
                cached_p99_ms=round(float(np.percentile(times, 99)), 2),
                cached_max_ms=round(max(times), 2),
            )
            rss, peak = rss_mb(server.pid)
            result.update(server_rss_mb=round(rss, 1), server_peak_rss_mb=round(peak, 1))
            result["goals_met"] = result["first_page_s"] < 1.0 and result["cached_max_ms"] < 200
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
