"""The Train tab takes base models by name from the server's list only, and every refusal reads the same
(#35, item 3: the box must not tell which server paths exist)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.studio import DuplicateJobError, RequestError, Settings, Studio
from tests.test_app_jobs import make_subject_images, quick_request


@pytest.fixture
def studio(tiny_sd_path: Path, tmp_path: Path) -> Iterator[Studio]:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-sd").symlink_to(tiny_sd_path, target_is_directory=True)
    (models / "notes.txt").write_text("not a model")
    (models / ".hidden").symlink_to(tiny_sd_path, target_is_directory=True)
    settings = Settings(
        data_dir=tmp_path / "data", base_model=str(tiny_sd_path), models_dir=models, device="cpu"
    )
    studio = Studio(settings, start=False)
    yield studio
    studio.close()


def _job_base_model(studio: Studio, job_id: str) -> str:
    config = json.loads((studio.runner.jobs_dir / job_id / "job.json").read_text())
    return config["pretrained_model_name_or_path"]


def test_every_refusal_is_the_same_sentence(studio: Studio, tiny_sd_path: Path, tmp_path: Path) -> None:
    images = make_subject_images(tmp_path / "subject")
    typed = [
        "/etc/shadow",
        "/nonexistent/x",
        "/etc",
        str(tiny_sd_path.parent),
        str(tmp_path / "models" / "tiny-sd"),
        "tiny-sd/../tiny-sd",
        "../models/tiny-sd",
        "notes.txt",
        ".hidden",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ]
    messages = set()
    for text in typed:
        with pytest.raises(RequestError) as caught:
            studio.start_training(images, quick_request(2, base_model=text))
        messages.add(str(caught.value))
    assert len(messages) == 1, messages
    (message,) = messages
    assert "tiny-sd" in message and "notes.txt" not in message and ".hidden" not in message
    assert studio.store.list_jobs() == []


def test_the_default_and_the_models_folder_are_accepted(
    studio: Studio, tiny_sd_path: Path, tmp_path: Path
) -> None:
    images = make_subject_images(tmp_path / "subject")
    default = studio.start_training(images, quick_request(2))
    # The default named in full is the same job: refused, not queued twice.
    with pytest.raises(DuplicateJobError):
        studio.start_training(images, quick_request(2, base_model=f" {tiny_sd_path} "))
    same = studio.start_training(images, quick_request(3, base_model=f" {tiny_sd_path} "))
    named = studio.start_training(images, quick_request(2, base_model="tiny-sd"))
    assert _job_base_model(studio, default.id) == str(tiny_sd_path)
    assert _job_base_model(studio, same.id) == str(tiny_sd_path)
    assert _job_base_model(studio, named.id) == str(tmp_path / "models" / "tiny-sd")
    assert studio.base_models.hint() == f"default: {tiny_sd_path}; or one of: tiny-sd"


def test_app_refuses_a_missing_models_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.__main__ import main

    assert main(["--models-dir", str(tmp_path / "nope"), "--data-dir", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --models-dir {tmp_path / 'nope'} is not a folder"
