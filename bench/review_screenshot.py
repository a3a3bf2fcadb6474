"""Screenshot of the review page for README: `make screenshots` -> docs/review.png.

    python bench/review_screenshot.py [--predictions runs/demo/predictions.csv]
        [--model runs/demo/model] [--out docs/review.png]

Opens `flystage review` on the demo's predictions (run `make demo` first) in Debian's headless
Chromium, confirms one image and corrects another through the page's own keys (the decisions
go to a temporary CSV, never to the demo's reviewed.csv), opens one "what the model looked at"
overlay, and saves the window as a PNG.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser_helpers import chromium, missing  # noqa: E402
from review_helpers import Server, review_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, default=REPO / "runs/demo/predictions.csv")
    parser.add_argument("--model", type=Path, default=REPO / "runs/demo/model")
    parser.add_argument("--out", type=Path, default=REPO / "docs/review.png")
    args = parser.parse_args(argv)
    if missing():
        print(f"error: {missing()}", file=sys.stderr)
        return 2
    if not args.predictions.is_file():
        print(f"error: {args.predictions} not found: run `make demo` first", file=sys.stderr)
        return 2
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with (
            Server(
                review_args(args.predictions, tmp, model=args.model, out=tmp / "reviewed.csv")
            ) as server,
            chromium(1280, 820) as driver,
        ):
            driver.get(server.url)
            WebDriverWait(driver, 30).until(
                lambda d: d.execute_script(
                    "const i = [...document.images]; return i.length > 8 && "
                    "i.slice(0, 12).every(x => x.complete && x.naturalWidth > 0)"
                )
            )
            body = driver.find_element(By.TAG_NAME, "body")
            body.send_keys("\n")  # confirm the first (least sure) image's top-1
            labels = server.session.labels
            second = server.session.items[
                int(
                    driver.find_elements(By.CSS_SELECTOR, "article.card")[1].get_attribute(
                        "data-id"
                    )
                )
            ]
            stage = next(s for s in labels if s != second.top[0][0])
            body.send_keys(str(labels.index(stage) + 1))  # correct the second
            WebDriverWait(driver, 10).until(
                lambda d: "2 of" in d.find_element(By.ID, "counts").text
            )
            body.send_keys("m")  # the third card: what the model looked at
            WebDriverWait(driver, 60).until(
                lambda d: d.execute_script(
                    "const i = document.querySelector('article.card.focus img');"
                    "return i.src.includes('/overlay/') && i.complete && i.naturalWidth > 0"
                )
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
