"""The review page in a real browser (Debian's headless Chromium through selenium), on real
BDGP images predicted by a small model: correct two images by keyboard, reload, and the page
and the reviewed CSV both show the corrections. Under "unreviewed", confirming one image after
another past the first page shows every image exactly once."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("flask")

from browser_helpers import chromium, missing  # noqa: E402
from review_helpers import Server, predicted_folder, review_args  # noqa: E402

if missing():
    pytest.skip(missing(), allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def predicted(bdgp_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Predictions (CSV + JSON, as `flystage predict` writes) of 10 BDGP images, read in place."""
    from artefact_helpers import make_artefact
    from flystage.outputs import write_csv, write_json
    from flystage.predictor import Predictor, describe_model, predict_files

    tmp = tmp_path_factory.mktemp("browser")
    paths = sorted(bdgp_root.glob("*/*/*.bmp"))[::19][:10]
    make_artefact(tmp / "model", labels=["1-3", "4-6", "7-8", "9-10", "11-12", "13-16"])
    predictor = Predictor(tmp / "model", threads=1)
    predictions = predict_files(predictor, paths, root=bdgp_root, progress=False)
    csv_path = write_csv(predictions, tmp / "predictions.csv")
    write_json(
        predictions, tmp / "predictions.json", model=describe_model(predictor), images=bdgp_root
    )
    return csv_path, tmp / "model"


def cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "article.card")


def wait_cards(driver, n: int) -> None:
    WebDriverWait(driver, 15).until(lambda d: len(cards(d)) == n)


def test_correct_two_by_keyboard_and_reload(predicted, bdgp_root, tmp_path) -> None:
    csv_path, model = predicted
    out = tmp_path / "reviewed.csv"
    with (
        Server(review_args(csv_path, tmp_path, images=bdgp_root, out=out, model=model)) as server,
        chromium() as driver,
    ):
        labels = server.session.labels
        driver.get(server.url)
        wait_cards(driver, 10)
        # Thumbnails are real pictures, served and decoded.
        WebDriverWait(driver, 15).until(
            lambda d: d.execute_script(
                "return [...document.images].slice(0, 4)"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        )

        # The first card has the focus; a stage's key sets it and moves on to the next card.
        first, second = [c.get_attribute("data-id") for c in cards(driver)[:2]]
        items = {str(i.index): i for i in server.session.items}
        chosen = {}
        body = driver.find_element(By.TAG_NAME, "body")
        for card_id in (first, second):
            top1 = items[card_id].top[0][0]
            # Not the model's answer: a correction.
            stage = next(s for s in reversed(labels) if s != top1)
            chosen[card_id] = stage
            body.send_keys(str(labels.index(stage) + 1))
            WebDriverWait(driver, 10).until(
                lambda d, stage=stage, card_id=card_id: (
                    f"corrected to {stage}"
                    in d.find_element(
                        By.CSS_SELECTOR, f'article.card[data-id="{card_id}"] .decision'
                    ).text
                )
            )
        # Enter confirms the third card's top-1; z takes it back.
        body.send_keys("\n")
        WebDriverWait(driver, 10).until(
            lambda d: "3 of 10 reviewed" in d.find_element(By.ID, "counts").text
        )
        body.send_keys("z")
        WebDriverWait(driver, 10).until(
            lambda d: "2 of 10 reviewed, 2 corrected" in d.find_element(By.ID, "counts").text
        )

        driver.refresh()
        wait_cards(driver, 10)
        WebDriverWait(driver, 10).until(
            lambda d: "2 of 10 reviewed, 2 corrected" in d.find_element(By.ID, "counts").text
        )
        for card_id, stage in chosen.items():
            card = driver.find_element(By.CSS_SELECTOR, f'article.card[data-id="{card_id}"]')
            assert f"corrected to {stage}" in card.find_element(By.CSS_SELECTOR, ".decision").text
            assert "corrected" in card.get_attribute("class")

        # The overlay of one image, on request.
        driver.find_element(
            By.CSS_SELECTOR, f'article.card[data-id="{first}"] .views button:last-child'
        ).click()
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script(
                f"const i = document.querySelector('article.card[data-id=\"{first}\"] img');"
                "return i.src.includes('/overlay/') && i.complete && i.naturalWidth > 0"
            )
        )

    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {(r["path"], r["label"], r["decision"]) for r in rows} == {
        (str(items[i].path), stage, "corrected") for i, stage in chosen.items()
    }


def test_unreviewed_view_shows_every_image_once_across_pages(tmp_path) -> None:
    # Deciding an image takes it out of the "unreviewed" view; the page asks for the next page
    # (60 cards each) after its last card, so no image is skipped or shown twice.
    _, _, csv_path = predicted_folder(tmp_path, n=67)
    with (
        Server(review_args(csv_path, tmp_path, out=tmp_path / "reviewed.csv")) as server,
        chromium() as driver,
    ):
        n = len(server.session.items)
        driver.get(server.url)
        WebDriverWait(driver, 15).until(lambda d: len(cards(d)) >= 60)
        Select(driver.find_element(By.ID, "filter")).select_by_value("unreviewed")
        # The keys go to the page, not to the menu just used.
        driver.execute_script("document.activeElement.blur()")
        WebDriverWait(driver, 15).until(
            lambda d: len(cards(d)) >= 60 and d.find_elements(By.CSS_SELECTOR, ".card.focus")
        )
        body = driver.find_element(By.TAG_NAME, "body")

        def focused(d) -> str:
            return d.find_element(By.CSS_SELECTOR, "article.card.focus").get_attribute("data-id")

        decided: list[str] = []
        for k in range(1, n + 1):
            decided.append(focused(driver))
            body.send_keys(Keys.ENTER)  # confirms the model's first stage, moves to the next card
            WebDriverWait(driver, 10).until(
                lambda d, k=k: d.find_element(By.ID, "counts").text.startswith(f"{k} of {n} ")
            )
            if k < n:
                # The next card is one not decided yet (the focus stays put at the last card).
                WebDriverWait(driver, 10).until(
                    lambda d: focused(d) not in decided,
                    f"after {k} decisions the page offers no image not yet decided",
                )
        shown = [c.get_attribute("data-id") for c in cards(driver)]
        assert (
            sorted(shown) == sorted(decided) == sorted(str(i.index) for i in server.session.items)
        )
        WebDriverWait(driver, 10).until(
            lambda d: d.find_element(By.ID, "sentinel").text == f"{n} images"
        )
    assert len(server.session.store.decisions) == n
