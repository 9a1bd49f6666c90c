"""A real browser (Debian's headless Chromium driven by Playwright) clicks through train → library → compose →
evaluate, on the tiny SD model and on the toy world (the default base model, when installed); the toy-world run
saves a screenshot of each tab to ``docs/screenshots/`` (shown in the README).

Needs ``/usr/bin/chromium`` (``apt-get install chromium``); ``playwright install`` is not used. Run with
``make test-browser`` or ``pytest -m browser``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_app_api import RunningApp, start_app, tiny_clip  # noqa: F401  (fixture)
from tests.test_app_jobs import make_subject_images

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


@dataclass(frozen=True)
class World:
    """What the click-through uses on one base model."""

    name: str
    prefill: str
    """What the trigger field shows on page load (the base model's profile)."""
    trigger: str
    """What the test types there (the profile's advice)."""
    class_word: str
    train_steps: int
    prompt: str
    denoise_steps: int
    upload_report: str
    screenshots: bool

    @property
    def phrase(self) -> str:
        return f"{self.trigger} {self.class_word}".strip()


TINY = World(
    name="tiny",
    prefill="sks",  # the SD profile's prefill, kept
    trigger="sks",
    class_word="dog",
    train_steps=3,
    prompt="a photo of sks dog on grass",
    denoise_steps=4,
    upload_report="subject-2.png: 64x48",
    screenshots=False,
)
TOY = World(
    name="toyworld",
    prefill="",  # the toy world's profile prefills nothing and asks for the concept's own name
    trigger="heart",
    class_word="",
    train_steps=120,
    prompt="a red heart on a white background",
    denoise_steps=25,
    upload_report="subject-2.png: 32x32",
    screenshots=True,
)


def _toy_world_assets() -> tuple[Path, Path] | None:
    from models.pipelines import default_base_model
    from models.toyworld.paths import TOYWORLD_DIR

    base, clip = default_base_model(), TOYWORLD_DIR / "clip" / "toyworld_clip.pt"
    return (Path(base), clip) if base is not None and clip.is_file() else None


@pytest.fixture(params=[TINY, TOY], ids=lambda world: world.name)
def world_app(
    request: pytest.FixtureRequest,
    tiny_sd_path: Path,
    tiny_clip: Path,  # noqa: F811  (the imported fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[World, RunningApp]]:
    """The app on the tiny model (random images) or on the toy world (renders of its held-out heart)."""
    world: World = request.param
    subject = tmp_path_factory.mktemp("subject")
    if world is TINY:
        base, clip, images = tiny_sd_path, tiny_clip, make_subject_images(subject)
    else:
        assets = _toy_world_assets()
        if assets is None:
            pytest.skip("the toy world is not installed under assets/toyworld")
        from training.quality import write_subject_images

        base, clip = assets
        images = sorted(write_subject_images(subject, count=5, subject="heart").glob("*.png"))
    demo, studio, url = start_app(tmp_path_factory.mktemp("atelier-data"), base, clip)
    try:
        yield world, RunningApp(url, studio, images)
    finally:
        demo.close()
        studio.close()


def save_screenshot(page, name: str, tmp_path: Path) -> Path:
    """Screenshot the whole page into docs/screenshots/<name>.png (written aside, then renamed)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    partial = tmp_path / f"{name}.png"
    page.screenshot(path=str(partial), full_page=True)
    target = SCREENSHOTS / f"{name}.png"
    shutil.copyfile(partial, target.with_suffix(".png.tmp"))
    os.replace(target.with_suffix(".png.tmp"), target)
    return target


def test_click_through_train_library_compose_evaluate(
    world_app: tuple[World, RunningApp], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    world, running_app = world_app

    def shot(name: str) -> None:
        if world.screenshots:
            page.wait_for_timeout(3_000)  # let the last updates (loss plot, button states) finish drawing
            save_screenshot(page, name, tmp_path)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(running_app.url)

            # Train: the trigger prefilled from the profile; upload, fill the form, start, watch the job finish.
            trigger = page.locator("#train-trigger textarea, #train-trigger input").first
            expect(trigger).to_have_value(world.prefill)
            trigger.fill(world.trigger)
            page.locator("#train-files input[type=file]").set_input_files(
                [str(p) for p in running_app.images]
            )
            expect(page.locator("#upload-report")).to_contain_text(world.upload_report, timeout=60_000)
            page.locator("#train-class-word textarea, #train-class-word input").first.fill(world.class_word)
            page.locator("#train-steps input").fill(str(world.train_steps))
            page.get_by_text("Advanced training options").click()
            page.locator("#train-validation-steps input").fill(str(max(world.train_steps // 2, 1)))
            page.locator("#train-validation-images input").fill("1")
            page.locator("#train-validation-denoise input").fill(str(world.denoise_steps))
            page.locator("#start-training").click()
            expect(page.locator("#job-status")).to_contain_text("completed", timeout=TRAIN_TIMEOUT_MS)
            expect(page.locator("#job-status")).to_contain_text(
                f"Step {world.train_steps}/{world.train_steps}"
            )
            expect(page.locator("#cancel-job")).to_have_text("Cancel")
            expect(page.locator("#loss-plot")).to_contain_text("loss (smoothed)", timeout=30_000)
            shot("train")

            # Library: the new adapter is listed; its details and sample grid open.
            page.get_by_role("tab", name="Library").click()
            expect(page.locator("#library-table")).to_contain_text(world.phrase, timeout=30_000)
            page.locator("#library-select input").click()
            page.get_by_role("option").first.click()
            expect(page.locator("#library-details")).to_contain_text("parameters", timeout=30_000)
            shot("library")

            # Compose: pick the adapter, write a prompt, generate.
            page.get_by_role("tab", name="Compose").click()
            page.locator("#compose-adapters input").click()
            page.get_by_role("option").first.click()
            expect(page.locator("#compose-table")).to_contain_text(world.phrase, timeout=30_000)
            page.locator("#compose-prompt textarea, #compose-prompt input").first.fill(world.prompt)
            page.locator("#compose-steps input").fill(str(world.denoise_steps))
            page.locator("#compose-images input").fill("4")
            page.locator("#compose-generate").click()
            expect(page.locator("#compose-info")).to_contain_text("4 image(s)", timeout=120_000)
            expect(page.locator("#compose-gallery img")).to_have_count(4, timeout=30_000)
            shot("compose")
            # The method options are a form (advanced options collapsed), not a JSON editor.
            page.locator("#compose-method input").click()
            page.get_by_role("option", name="clora", exact=True).click()
            expect(page.get_by_text("Advanced clora options")).to_be_visible(timeout=30_000)
            expect(page.get_by_text("Fraction of the steps that get latent updates")).to_be_hidden()
            expect(page.locator("#tab-compose .cm-editor")).to_have_count(0)

            # Evaluate: score the gallery against the prompt.
            page.get_by_role("tab", name="Evaluate").click()
            page.locator("#evaluate-prompts textarea").fill(world.prompt)
            page.locator("#evaluate-score").click()
            expect(page.locator("#evaluate-summary")).to_contain_text("clipscore_100: mean", timeout=120_000)
            expect(page.locator("#evaluate-thumbs img")).to_have_count(4, timeout=30_000)
            expect(page.locator("#evaluate-glossary")).to_contain_text("Hessel")
            shot("evaluate")
        finally:
            browser.close()
    if world.screenshots:
        assert {p.name for p in SCREENSHOTS.glob("*.png")} >= {
            "train.png",
            "library.png",
            "compose.png",
            "evaluate.png",
        }
