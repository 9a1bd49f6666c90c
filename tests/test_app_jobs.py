"""The app's job runner without a browser: real training jobs on the tiny SD model, each in a worker process.

Covers start and progress events, the adapter reaching the library, cancel → resumable checkpoint → resume,
a killed worker reported as a failed job, restart recovery, and upload checks that leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.events import EVENTS_FILE, FileFlag, read_events
from app.studio import RequestError, Settings, Studio, TrainRequest

JOB_TIMEOUT = 300


def make_subject_images(folder: Path, count: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = (np.random.default_rng(index).random((48, 64, 3)) * 255).astype(np.uint8)
        path = folder / f"subject-{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def quick_request(steps: int, **overrides: object) -> TrainRequest:
    """A tiny run: validation grids of one image with two denoising steps."""
    values: dict[str, object] = dict(
        trigger="sks",
        class_word="dog",
        steps=steps,
        validation_steps=2,
        num_validation_images=1,
        validation_inference_steps=2,
    )
    values.update(overrides)
    return TrainRequest(**values)  # type: ignore[arg-type]


def wait_for(condition: Callable[[], bool], timeout: float = JOB_TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_subject_images(tmp_path_factory.mktemp("subject"))


@pytest.fixture(scope="module")
def studio(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studio]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("atelier-data"), base_model=str(tiny_sd_path), device="cpu"
    )
    studio = Studio(settings)
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def finished_job(studio: Studio, images: list[Path]):
    job = studio.start_training(images, quick_request(4))
    return studio.runner.wait(job.id, JOB_TIMEOUT)


def test_job_trains_in_a_worker_process_and_its_adapter_reaches_the_library(
    studio: Studio, finished_job
) -> None:
    from models.adapters.files import load_adapter_file

    job = finished_job
    assert job.status == "completed", job.error
    assert (job.step, job.total, job.runs) == (4, 4, 1)
    events, _ = read_events(studio.runner.jobs_dir / job.id / EVENTS_FILE)
    started = [e for e in events if e["event"] == "started"]
    assert len(started) == 1 and started[0]["pid"] != os.getpid()
    steps = [e["step"] for e in events if e["event"] == "progress" and "loss" in e]
    assert steps[:4] == [1, 2, 3, 4]
    assert all(np.isfinite(e["loss"]) and e["eta"] >= 0 for e in events if e["event"] == "progress")
    assert events[-1]["event"] == "completed"

    view = studio.runner.view(job.id)
    assert [s for s, _ in view.losses] == [1, 2, 3, 4]
    assert [Path(p).name for p in view.validation_images] == ["step-2.png", "step-4.png"]

    record = studio.library.get(job.adapter_id)
    stored = studio.library.path(record)
    adapter = load_adapter_file(stored)
    assert (record.family, record.trigger, record.source) == ("lora", "sks dog", "trained")
    assert record.parameters == sum(t.numel() for t in adapter.tensors.values()) > 0
    assert record.size_bytes == stored.stat().st_size
    assert stored.read_bytes() == Path(events[-1]["adapter_path"]).read_bytes()
    assert studio.library.sample_path(record).is_file()
    assert {p.name for p in studio.library.export_paths(record)} >= {"kohya_lora.safetensors"}
    assert not list(studio.library.root.glob(".partial-*"))


def test_cancel_leaves_a_checkpoint_and_resume_continues_from_it(studio: Studio, images: list[Path]) -> None:
    job = studio.start_training(images, quick_request(500, validation_steps=0))
    wait_for(lambda: studio.store.get_job(job.id).step >= 2, what="two training steps")
    studio.runner.cancel(job.id)
    stopped = studio.runner.wait(job.id, JOB_TIMEOUT, statuses=("cancelled", "failed"))
    assert stopped.status == "cancelled", stopped.error
    assert 2 <= stopped.step < 500
    checkpoint = Path(stopped.output_dir) / f"checkpoint-{stopped.step}"
    assert (checkpoint / "state.json").is_file()
    assert studio.store.adapter_for_job(job.id) is None

    studio.runner.resume(job.id, max_train_steps=stopped.step + 2)
    done = studio.runner.wait(job.id, JOB_TIMEOUT)
    assert done.status == "completed", done.error
    assert (done.step, done.runs) == (stopped.step + 2, 2)
    logged = [s for s, _ in studio.runner.view(job.id).losses]
    assert logged == list(range(1, stopped.step + 3)), "the resumed run must continue, not restart"
    events, _ = read_events(studio.runner.jobs_dir / job.id / EVENTS_FILE)
    assert [e["event"] for e in events if e["event"] != "progress"] == [
        "started",
        "cancelled",
        "started",
        "completed",
    ]
    assert studio.store.adapter_for_job(job.id) is not None


def test_a_killed_worker_is_reported_as_a_failed_job(studio: Studio, images: list[Path]) -> None:
    job = studio.start_training(images, quick_request(500, validation_steps=0))
    wait_for(lambda: studio.store.get_job(job.id).step >= 1, what="a training step")
    pid = studio.runner.worker_pid()
    assert pid is not None and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    failed = studio.runner.wait(job.id, 60)
    assert failed.status == "failed"
    assert "killed by signal 9" in failed.error and "resume" in failed.error
    assert studio.runner.view(job.id).resumable


def test_restart_marks_running_jobs_interrupted_and_keeps_the_library(
    studio: Studio, finished_job, tmp_path: Path
) -> None:
    from app.library import Library
    from app.store import Store

    completed_event = read_events(studio.runner.jobs_dir / finished_job.id / EVENTS_FILE)[0][-1]
    data = tmp_path / "data"
    store, config = Store(data), finished_job.config
    library = Library(store)
    old = store.add_job("finished earlier", config, finished_job.output_dir, "job-old")
    store.update_job(old.id, status="completed", adapter_id=library.register_trained(old, completed_event))
    # The previous app process died while running one job, and after another job's worker had finished
    # but before its adapter was registered; it also left a half-copied library folder.
    store.add_job("was running", config, data / "jobs/job-running/output", "job-running")
    store.update_job("job-running", status="running", step=2)
    store.add_job("finished unseen", config, finished_job.output_dir, "job-unseen")
    store.update_job("job-unseen", status="running", step=4)
    events = data / "jobs" / "job-unseen" / EVENTS_FILE
    events.parent.mkdir(parents=True)
    events.write_text(json.dumps({"event": "started", "pid": 1}) + "\n" + json.dumps(completed_event) + "\n")
    (library.root / ".partial-adapter-crashed").mkdir()
    before = {r.id for r in library.records()}
    store.close()

    restarted = Studio(Settings(data_dir=data), start=False)
    try:
        interrupted = restarted.store.get_job("job-running")
        assert interrupted.status == "interrupted" and "step 2" in interrupted.error
        assert restarted.runner.view("job-running").resumable
        recovered = restarted.store.get_job("job-unseen")
        assert recovered.status == "completed" and recovered.adapter_id is not None
        assert {r.id for r in restarted.library.records()} == before | {recovered.adapter_id}
        assert all(restarted.library.path(r).is_file() for r in restarted.library.records())
        assert not (restarted.library.root / ".partial-adapter-crashed").exists()
    finally:
        restarted.store.close()


def test_an_orphaned_worker_sees_its_cancel_flag(tmp_path: Path) -> None:
    flag = FileFlag(tmp_path / "cancel", parent_pid=os.getppid())
    assert not flag.is_set()
    flag.set()
    assert flag.is_set()
    flag.clear()
    assert not FileFlag(tmp_path / "cancel", parent_pid=os.getppid()).is_set()
    assert FileFlag(tmp_path / "cancel", parent_pid=os.getppid() + 100000).is_set()


def test_bad_uploads_are_named_and_change_nothing(studio: Studio, tmp_path: Path, images: list[Path]) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not an image")
    huge = tmp_path / "huge.png"
    Image.new("L", (20000, 20000)).save(huge, optimize=False)
    jobs_before = studio.store.list_jobs()
    dirs_before = sorted(studio.runner.jobs_dir.iterdir())

    check = studio.check_uploads([images[0], fake, huge])
    assert check.accepted == [images[0]] and not check.ok
    assert check.messages[0].startswith("✓ subject-0.png: 64x48")
    assert check.messages[1].startswith("✗ notes.png") and "not a readable image" in check.messages[1]
    assert check.messages[2].startswith("✗ huge.png") and "decompression bomb" in check.messages[2]
    empty = studio.check_uploads([])
    assert empty.accepted == [] and "No images uploaded" in empty.messages[0]

    for files in ([images[0], fake], [huge], [], None):
        with pytest.raises(RequestError, match="Nothing was started"):
            studio.start_training(files, quick_request(2))
    with pytest.raises(RequestError, match="trigger phrase is empty"):
        studio.start_training(images, quick_request(2, trigger=" "))
    assert studio.store.list_jobs() == jobs_before
    assert sorted(studio.runner.jobs_dir.iterdir()) == dirs_before


@pytest.mark.parametrize("family", ["lora", "krona", "boft", "hra"])
def test_a_request_without_steps_leaves_them_to_the_profile(family: str) -> None:
    """Unset steps reach the trainer unset (the base model's profile fills them); a known profile sizes the
    checkpoint interval from its steps."""
    from models.profiles import SD1, TOYWORLD

    for profile in (TOYWORLD, SD1):
        default = profile.family(family).max_train_steps
        for steps in (None, 0):
            config = TrainRequest(trigger="sks", family=family, steps=steps).to_config("base", profile)
            assert config.max_train_steps is None and config.learning_rate is None
            assert config.checkpointing_steps == max(1, min(500, default // 4))
    assert TrainRequest(trigger="sks", family=family, steps=7).to_config("base").max_train_steps == 7


def test_picking_a_family_in_the_train_tab_fills_the_profiles_values(
    tmp_path: Path, tiny_sd_path: Path
) -> None:
    from app.guidance import guidance_for
    from app.ui import build_app
    from models.profiles import SD1, TOYWORLD

    studio = Studio(
        Settings(data_dir=tmp_path, base_model=None, models_dir=tiny_sd_path.parent, device="cpu")
    )
    try:
        demo = build_app(studio)
        (pick,) = [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "pick_family"]
        for base, profile in (("", TOYWORLD), (tiny_sd_path.name, SD1)):
            for family, defaults in profile.families.items():
                *groups, text, trigger, class_word, steps, lr, targets, n_class, _, _ = pick(
                    family, base, "", "", None
                )
                assert [g["visible"] for g in groups].count(True) == 1
                assert f"`{profile.name}`" in text
                guidance = guidance_for(profile)  # the words' advice follows the base model's profile
                assert trigger["info"] == guidance.trigger and class_word["info"] == guidance.class_word
                assert class_word["placeholder"] == profile.hints.class_example
                assert (steps["value"], lr["value"], targets["value"], n_class["value"]) == (
                    defaults.max_train_steps,
                    defaults.learning_rate,
                    defaults.targets,
                    defaults.num_class_images,
                )
    finally:
        studio.close()


def _event(demo, name: str):
    (found,) = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name]
    return found


def _component(demo, elem_id: str):
    (found,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    return found


def test_the_trigger_prefill_and_the_upload_line_follow_the_base_models_profile(
    tmp_path: Path, tiny_sd_path: Path, images: list[Path]
) -> None:
    """On page load and on a base-model change the trigger field gets the profile's prefill and placeholder
    (the toy world: empty, asking for the concept's own name; SD: 'sks'), the line under the upload box the
    profile's image advice; a trigger the user typed survives the change."""
    from app.guidance import guidance_for
    from app.ui import build_app
    from models.profiles import SD1, TOYWORLD

    assert (TOYWORLD.hints.default_trigger, SD1.hints.default_trigger) == ("", "sks")
    tiny = tiny_sd_path.name
    for default_base, profile in ((None, TOYWORLD), (str(tiny_sd_path), SD1)):
        studio = Studio(
            Settings(
                data_dir=tmp_path / profile.name,
                base_model=default_base,
                models_dir=tiny_sd_path.parent,
                device="cpu",
            ),
            start=False,
        )
        try:
            demo = build_app(studio)
            trigger = _component(demo, "train-trigger")
            assert (trigger.value, trigger.placeholder) == (
                profile.hints.default_trigger,
                profile.hints.trigger_placeholder,
            )
            assert _component(demo, "upload-report").value == f"Upload {profile.hints.subject_images}."
        finally:
            studio.close()

    # The toy world's app (the server default), the tiny SD model typed into the base-model box.
    studio = Studio(
        Settings(data_dir=tmp_path / "both", base_model=None, models_dir=tiny_sd_path.parent, device="cpu"),
        start=False,
    )
    try:
        demo = build_app(studio)
        fill = _event(demo, "fill_from_profile").fn
        for base, typed, before, profile, value in (
            (tiny, "", "", SD1, "sks"),  # empty toy-world field: SD's prefill
            ("", "sks", "sks", TOYWORLD, ""),  # SD's untouched prefill: back to empty on the toy world
            (tiny, "purple", "", SD1, None),  # typed on the toy world: kept
            ("", "zwx", "sks", TOYWORLD, None),  # typed over SD's prefill: kept
            (tiny, "sks", "", SD1, None),  # typed on the toy world although advised against: kept
        ):
            advice = guidance_for(profile)
            text, trigger, *_, prefilled, report = fill(base, "lora", typed, before, None)
            assert f"`{profile.name}`" in text
            assert trigger.get("value") == value, (base, typed, before)
            assert (trigger["info"], trigger["placeholder"]) == (advice.trigger, advice.trigger_placeholder)
            assert prefilled == advice.default_trigger
            assert report == f"Upload {advice.recommended_images}."
        # With images uploaded the line is the upload check, warned by the profile now chosen (toy world: 5).
        paths = [str(p) for p in images]
        *_, toy_report = fill("", "lora", "", "", paths)
        *_, sd_report = fill(tiny, "lora", "", "", paths)
        assert "✓ subject-2.png" in toy_report and f"Only {len(images)} images" in toy_report
        assert "✓ subject-2.png" in sd_report and "Only" not in sd_report
        # Picking a family goes through the same rules.
        *_, trigger, _, _, _, _, _, _, _ = _event(demo, "pick_family").fn("hra", tiny, "purple", "", None)
        assert "value" not in trigger

        # Starting a job with an empty trigger: the one-line refusal as a toast, nothing queued, no traceback.
        start = _event(demo, "start_job")
        values = {id(c): c.value for c in start.inputs}
        args = [values[id(c)] for c in start.inputs]
        args[0], args[1] = paths, "  "
        with pytest.warns(UserWarning, match="^the trigger phrase is empty; type the concept's own name"):
            result = start.fn(*args)
        assert len(result) == 2 and studio.store.list_jobs() == []
    finally:
        studio.close()


def test_the_same_job_twice_is_refused_while_the_first_is_queued(tmp_path: Path, images: list[Path]) -> None:
    from app.studio import DuplicateJobError

    studio = Studio(Settings(data_dir=tmp_path, base_model=None, device="cpu"), start=False)
    try:
        first = studio.start_training(images, quick_request(4))
        with pytest.raises(DuplicateJobError, match=f"already queued as `{first.id}`") as caught:
            studio.start_training(list(reversed(images)), quick_request(4))
        assert caught.value.job.id == first.id
        assert [job.id for job in studio.store.list_jobs()] == [first.id]
        other_steps = studio.start_training(images, quick_request(5))
        fewer_images = studio.start_training(images[:2], quick_request(4))
        assert len({first.id, other_steps.id, fewer_images.id}) == 3
        studio.runner.cancel(first.id)
        again = studio.start_training(images, quick_request(4))
        assert again.id != first.id, "a cancelled job no longer blocks the same settings"
    finally:
        studio.close()
