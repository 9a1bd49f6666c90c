"""A real browser (Debian's headless Chromium driven by Playwright) clicks through train → library → compose →
evaluate on the tiny SD model and saves a screenshot of each tab to ``docs/screenshots/`` (shown in the README).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``); ``playwright install`` is not used. Run with
``make test-browser`` or ``pytest -m browser``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_app_api import RunningApp, running_app, tiny_clip  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
TRAIN_TIMEOUT_MS = 300_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium: apt-get install chromium"),
]


def save_screenshot(page, name: str, tmp_path: Path) -> Path:
    """Screenshot the whole page into docs/screenshots/<name>.png (written aside, then renamed)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    partial = tmp_path / f"{name}.png"
    page.screenshot(path=str(partial), full_page=True)
    target = SCREENSHOTS / f"{name}.png"
    shutil.copyfile(partial, target.with_suffix(".png.tmp"))
    os.replace(target.with_suffix(".png.tmp"), target)
    return target


def test_click_through_train_library_compose_evaluate(running_app: RunningApp, tmp_path: Path) -> None:  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(running_app.url)

            # Train: upload, fill the form, start, watch the job finish.
            page.locator("#train-files input[type=file]").set_input_files(
                [str(p) for p in running_app.images]
            )
            expect(page.locator("#upload-report")).to_contain_text("subject-2.png: 64x48", timeout=60_000)
            page.locator("#train-class-word textarea, #train-class-word input").first.fill("dog")
            page.locator("#train-steps input").fill("3")
            page.get_by_text("Advanced training options").click()
            page.locator("#train-validation-steps input").fill("2")
            page.locator("#train-validation-images input").fill("1")
            page.locator("#train-validation-denoise input").fill("4")
            page.locator("#start-training").click()
            expect(page.locator("#job-status")).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS)
            expect(page.locator("#job-status")).to_contain_text("Step 3/3")
            save_screenshot(page, "train", tmp_path)

            # Library: the new adapter is listed; its details and sample grid open.
            page.get_by_role("tab", name="Library").click()
            expect(page.locator("#library-table")).to_contain_text("sks dog", timeout=30_000)
            page.locator("#library-select input").click()
            page.get_by_role("option").first.click()
            expect(page.locator("#library-details")).to_contain_text("parameters", timeout=30_000)
            save_screenshot(page, "library", tmp_path)

            # Compose: pick the adapter, write a prompt, generate.
            page.get_by_role("tab", name="Compose").click()
            page.locator("#compose-adapters input").click()
            page.get_by_role("option").first.click()
            expect(page.locator("#compose-table")).to_contain_text("sks dog", timeout=30_000)
            page.locator("#compose-prompt textarea, #compose-prompt input").first.fill(
                "a photo of sks dog on grass"
            )
            page.locator("#compose-steps input").fill("4")
            page.locator("#compose-images input").fill("2")
            page.locator("#compose-generate").click()
            expect(page.locator("#compose-info")).to_contain_text("2 image(s)", timeout=120_000)
            expect(page.locator("#compose-gallery img")).to_have_count(2, timeout=30_000)
            save_screenshot(page, "compose", tmp_path)

            # Evaluate: score the gallery against the prompt.
            page.get_by_role("tab", name="Evaluate").click()
            page.locator("#evaluate-prompts textarea").fill("a photo of sks dog on grass")
            page.locator("#evaluate-score").click()
            expect(page.locator("#evaluate-summary")).to_contain_text("clipscore_100: mean", timeout=120_000)
            save_screenshot(page, "evaluate", tmp_path)
        finally:
            browser.close()
    assert {p.name for p in SCREENSHOTS.glob("*.png")} >= {
        "train.png",
        "library.png",
        "compose.png",
        "evaluate.png",
    }
