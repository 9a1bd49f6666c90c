"""The app's display helpers without a browser: job labels and the job shown after a reload, the smoothed
loss curve, the validation gallery's order and captions, Cancel/Resume states, image-count and word advice and
the trigger prefill from the base model's profile, toasts without temporary paths, and the fingerprints that
recognise a job or a file seen before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app import job_display
from app.feedback import without_paths
from app.fingerprints import file_sha256, job_fingerprint
from app.guidance import (
    DEFAULT_GUIDANCE,
    guidance_for,
    image_count_advice,
    trigger_after_change,
    upload_prompt,
)
from app.store import Store, new_id
from models.profiles import SD1, TOYWORLD


def add_job(store: Store, name: str, status: str, family: str = "lora", step: int = 0, total: int = 0):
    job = store.add_job(name, {"adapter": family, "max_train_steps": total}, store.data_dir, new_id("job"))
    return store.update_job(job.id, status=status, step=step, total=total)


def test_job_labels_tell_jobs_of_one_subject_apart(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        first = add_job(store, "sks dog", "completed", "lora", 800, 800)
        second = add_job(store, "sks dog", "running", "krona", 12, 500)
        labels = dict((value, label) for label, value in job_display.job_choices(store))
        assert list(labels) == [second.id, first.id], "newest first"
        assert labels[first.id].startswith("sks dog · completed · 800/800 steps · lora · ")
        assert labels[second.id].startswith("sks dog · running · 12/500 steps · krona · ")
        assert labels[first.id] != labels[second.id]
    finally:
        store.close()


def test_after_a_reload_the_running_job_is_shown_else_the_next_queued(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        assert job_display.active_job_id(store) is None
        add_job(store, "old", "completed")
        assert job_display.active_job_id(store) is None
        queued = add_job(store, "next", "queued")
        add_job(store, "later", "queued")
        assert job_display.active_job_id(store) == queued.id
        running = add_job(store, "now", "running")
        assert job_display.active_job_id(store) == running.id
    finally:
        store.close()


def test_smoothed_loss_follows_the_trend_with_less_noise() -> None:
    rng = np.random.default_rng(0)
    trend = np.linspace(1.0, 0.2, 400)
    raw = trend + rng.normal(0, 0.3, 400)
    smooth = np.array(job_display.smoothed(raw.tolist()))
    assert smooth[0] == pytest.approx(raw[0]), "bias-corrected: starts at the first value"
    assert np.std(np.diff(smooth)) < np.std(np.diff(raw)) / 5
    assert np.abs(smooth[50:] - trend[50:]).mean() < np.abs(raw[50:] - trend[50:]).mean() / 2
    frame = job_display.loss_frame([(1, 2.0), (2, 0.0)])
    assert list(frame["series"]) == [job_display.RAW] * 2 + [job_display.SMOOTHED] * 2
    assert list(frame["step"]) == [1, 2, 1, 2]
    assert frame["loss"].tolist()[2:] == pytest.approx([2.0, (0.9 * 0.2) / (1 - 0.81)])


def test_validation_gallery_is_newest_first_with_step_captions() -> None:
    paths = ["out/validation/step-50.png", "out/validation/step-100.png", "out/validation/step-800.png"]
    assert job_display.validation_items(paths, final_step=800) == [
        ("out/validation/step-800.png", "step 800 (final)"),
        ("out/validation/step-100.png", "step 100"),
        ("out/validation/step-50.png", "step 50"),
    ]
    assert job_display.validation_items(paths[:2])[0] == ("out/validation/step-100.png", "step 100")


@pytest.mark.parametrize(
    ("status", "cancel", "resume"),
    [
        (None, False, False),
        ("queued", True, False),
        ("running", True, False),
        ("cancelling", False, False),
        ("completed", False, False),
        ("cancelled", False, True),
        ("interrupted", False, True),
        ("failed", False, True),
    ],
)
def test_cancel_and_resume_are_enabled_only_when_they_apply(
    tmp_path: Path, status: str | None, cancel: bool, resume: bool
) -> None:
    store = Store(tmp_path)
    try:
        job = add_job(store, "sks dog", status) if status else None
        cancel_update, resume_update = job_display.button_states(job)
        assert (cancel_update["interactive"], resume_update["interactive"]) == (cancel, resume)
        assert cancel_update["variant"] == ("stop" if cancel else "secondary")
    finally:
        store.close()


def test_fewer_images_than_the_guidance_asks_for_get_a_warning() -> None:
    guidance = guidance_for(None)
    assert guidance is DEFAULT_GUIDANCE and guidance.min_images == 3
    assert "Only 1 image:" in image_count_advice(1, guidance)
    assert "Only 2 images" in image_count_advice(2, guidance)
    assert image_count_advice(3, guidance) is None and image_count_advice(0, guidance) is None


def test_the_toy_world_and_sd_get_their_own_advice_from_their_profiles() -> None:
    """Words and image counts come from the base model's profile (``Profile.hints``), so each model gets
    advice that is true for it: the toy world's text encoder knows only its own words, SD follows DreamBooth."""
    toy, sd = guidance_for(TOYWORLD), guidance_for(SD1)
    assert toy != sd
    assert "own name" in toy.trigger and "'sks' next to 'yellow'" in toy.trigger
    assert "rare token" in sd.trigger and "yellow" not in sd.trigger
    assert toy.class_placeholder == TOYWORLD.hints.class_example == "heart"
    assert sd.class_placeholder == SD1.hints.class_example == "dog"
    assert "toy world knows" in toy.class_word and "coarse class" in sd.class_word
    assert (toy.min_images, sd.min_images) == (TOYWORLD.hints.min_images, SD1.hints.min_images) == (5, 3)
    assert "5 renders" in image_count_advice(4, toy) and image_count_advice(4, sd) is None
    assert "3-5 photos" in image_count_advice(2, sd)
    assert all(line.endswith(".") and line[0].isupper() for line in (toy.trigger, sd.trigger, sd.class_word))


def test_the_trigger_prefill_comes_from_the_profile_and_never_overwrites_a_typed_word() -> None:
    """SD prefills DreamBooth's 'sks'; the toy world leaves the field empty and asks for the concept's own name
    (docs/training_quality.md); a change of base model replaces only an empty field or an untouched prefill."""
    toy, sd = guidance_for(TOYWORLD), guidance_for(SD1)
    assert (toy.default_trigger, sd.default_trigger, DEFAULT_GUIDANCE.default_trigger) == ("", "sks", "")
    assert "own name" in toy.trigger_placeholder and "sks" in sd.trigger_placeholder
    assert "sks" not in toy.trigger_placeholder
    assert trigger_after_change("", "", sd) == "sks" and trigger_after_change(None, None, sd) == "sks"
    assert trigger_after_change("sks", "sks", toy) == "" and trigger_after_change(" sks ", "sks", toy) == ""
    assert trigger_after_change("purple", "", sd) is None and trigger_after_change("zwx", "sks", toy) is None
    assert trigger_after_change("sks", "", sd) is None  # typed, even if it equals the new default
    assert upload_prompt(toy) == f"Upload {TOYWORLD.hints.subject_images}." != upload_prompt(sd)


def test_toasts_name_files_without_their_temporary_folders() -> None:
    message = (
        "/tmp/gradio/4b1c0ffee/notes.safetensors is not an adapter (/tmp/gradio/4b1c0ffee/notes.safetensors)"
    )
    assert without_paths(message) == "notes.safetensors is not an adapter (notes.safetensors)"
    assert without_paths("step 3/4 done") == "step 3/4 done"


def test_fingerprints_ignore_per_job_paths_and_image_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    config = {"adapter": "lora", "max_train_steps": 100, "output_dir": "/x/job-1/output"}
    same = dict(config, output_dir="/x/job-2/output", instance_data_dir="/x/job-2/images")
    assert job_fingerprint(config, [a, b]) == job_fingerprint(same, [b, a])
    assert job_fingerprint(config, [a, b]) != job_fingerprint(dict(config, max_train_steps=101), [a, b])
    assert job_fingerprint(config, [a, b]) != job_fingerprint(config, [a])
    c = tmp_path / "c.png"
    c.write_bytes(b"first")
    assert file_sha256(a) == file_sha256(c) != file_sha256(b)
