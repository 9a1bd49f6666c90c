"""The Train and Library tabs in a real browser (Debian's Chromium via Playwright) on the tiny SD model: advice
for too few images, a double click on Start training that queues one job, the same job refused while it runs,
the running job shown again after a page reload, Cancel/Resume enabled only when they apply, the validation
gallery newest first with step captions after completion; then the trained adapter's sample grid drawn at a
readable size, and imports of a non-adapter file and of a file already in the library refused by toasts that
leave the table and selector intact. Run with ``make test-browser`` or ``pytest -m browser``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_app_api import RunningApp, app_running, tiny_clip  # noqa: F401  (fixture)
from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="needs Debian's chromium: apt-get install chromium"),
]
STEPS = 40


@pytest.fixture
def app_on_tiny(
    tiny_sd_path: Path,
    tiny_clip: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningApp]:
    with app_running(tiny_sd_path, tiny_clip, tmp_path_factory) as app:
        yield app


@pytest.fixture
def page(app_on_tiny: RunningApp) -> Iterator:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_on_tiny.url)
            page.wait_for_selector("#start-training", timeout=120_000)  # a busy machine renders slowly
            expect.set_options(timeout=20_000)
            yield page
        finally:
            browser.close()


def test_train_tab_guides_refuses_a_second_identical_job_and_survives_a_reload(
    app_on_tiny: RunningApp, page, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    store = app_on_tiny.studio.store
    files = page.locator("#train-files input[type=file]")
    cancel, resume = page.locator("#cancel-job"), page.locator("#resume-job")
    expect(cancel).to_be_disabled()
    expect(resume).to_be_disabled()
    expect(cancel).not_to_have_class(re.compile(r"\bstop\b"))
    expect(page.get_by_text("rare token the tokenizer keeps", exact=False)).to_be_visible()  # sd1 hints

    # One image: a warning beside the upload, before anything starts.
    files.set_input_files([str(app_on_tiny.images[0])])
    expect(page.locator("#upload-report")).to_contain_text("Only 1 image", timeout=60_000)
    files.set_input_files([str(p) for p in app_on_tiny.images])
    expect(page.locator("#upload-report")).to_contain_text("subject-2.png: 64x48", timeout=60_000)
    expect(page.locator("#upload-report")).not_to_contain_text("Only")

    page.locator("#train-class-word textarea, #train-class-word input").first.fill("dog")
    page.locator("#train-steps input").fill(str(STEPS))
    page.get_by_text("Advanced training options").click()
    page.locator("#train-validation-steps input").fill(str(STEPS // 2))
    page.locator("#train-validation-images input").fill("1")
    page.locator("#train-validation-denoise input").fill("2")

    # A double click queues one job; clicking again while it is queued or running is refused with a toast.
    page.locator("#start-training").dblclick()
    expect(page.locator("#job-status")).to_contain_text("job-", timeout=60_000)
    page.wait_for_timeout(2_000)
    assert len(store.list_jobs()) == 1
    (job,) = store.list_jobs()
    expect(page.locator("#start-training")).to_be_enabled()
    page.locator("#start-training").click()
    expect(page.get_by_text("The same job is already")).to_be_visible(timeout=30_000)
    assert len(store.list_jobs()) == 1

    # A reload while the job runs shows that job, its status in the dropdown, and a red Cancel.
    expect(page.locator("#job-status")).to_contain_text("running", timeout=120_000)
    page.reload()
    expect(page.locator("#job-status")).to_contain_text(job.id, timeout=60_000)
    expect(page.locator("#job-select input")).to_have_value(
        re.compile(r"^sks dog · running · \d+/40 steps · lora · "), timeout=30_000
    )
    expect(cancel).to_be_enabled(timeout=30_000)
    expect(cancel).to_have_class(re.compile(r"\bstop\b"))
    expect(resume).to_be_disabled()

    cancel.click()
    expect(page.locator("#job-status")).to_contain_text("cancelled", timeout=120_000)
    expect(resume).to_be_enabled(timeout=30_000)
    expect(cancel).to_be_disabled()
    resume.click()
    expect(page.locator("#job-status")).to_contain_text("completed", timeout=300_000)
    expect(page.locator("#job-status")).to_contain_text(f"Step {STEPS}/{STEPS}")
    expect(cancel).to_be_disabled()
    expect(resume).to_be_disabled()
    # The buttons keep their labels and the loss plot draws both curves (an event that yields nothing, or a
    # plot first given an empty frame, left blank buttons and a plot without lines).
    expect(cancel).to_have_text("Cancel")
    expect(resume).to_have_text("Resume")
    expect(page.locator("#loss-plot")).to_contain_text("loss (smoothed)", timeout=30_000)
    expect(page.locator("#loss-plot")).to_contain_text("loss (per step)")

    # The validation gallery: newest first, captioned with the step, drawn whole.
    gallery = page.locator("#validation-gallery")
    expect(gallery).to_contain_text(f"step {STEPS} (final)", timeout=30_000)
    captions = gallery.locator(".caption-label, figcaption, .thumbnail-item span").all_inner_texts()
    assert captions and captions[0].startswith(f"step {STEPS}"), captions
    fits = gallery.locator("img").evaluate_all("els => els.map(e => getComputedStyle(e).objectFit)")
    assert fits and set(fits) == {"contain"}, fits
    assert "error" not in (page.locator(".toast-body.error").all_inner_texts() or [""])[0].lower()

    # Library: the sample grid is enlarged for reading; bad and repeated imports are toasts, nothing breaks.
    page.get_by_role("tab", name="Library").click()
    page.locator("#library-select input").click()
    page.get_by_role("option").first.click()
    expect(page.locator("#library-details")).to_contain_text("parameters", timeout=30_000)
    sample = page.locator("#library-sample img")
    expect(sample).to_be_visible(timeout=30_000)
    assert sample.evaluate("e => e.naturalWidth") >= 512
    expect(page.locator("#library-downloads")).to_contain_text("sks-dog-lora")

    notes = tmp_path / "notes.safetensors"
    notes.write_text("a text file with the wrong suffix")
    (record,) = app_on_tiny.studio.library.records()
    copy = tmp_path / "again.safetensors"
    shutil.copyfile(app_on_tiny.studio.library.path(record), copy)
    page.get_by_text("Import a .safetensors adapter").click()
    upload = page.locator("#library-upload input[type=file]")
    for path, toast in ((notes, "notes.safetensors is not an adapter"), (copy, "already in the library")):
        upload.set_input_files(str(path))
        expect(page.locator("#library-upload")).to_contain_text(path.name, timeout=30_000)
        page.locator("#library-import").click()
        expect(page.get_by_text(toast).first).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1_000)
        for panel in ("#library-table", "#library-select"):
            expect(page.locator(panel)).not_to_contain_text("Error")
        expect(page.locator("#library-table")).to_contain_text("sks dog")
        page.locator("#library-upload button[aria-label='Clear']").first.click()
    assert "/tmp/" not in page.get_by_text("is not an adapter").first.inner_text()
    assert len(app_on_tiny.studio.library.records()) == 1
