"""A full disk while the final exports are written (#35, item 7): the adapter file is complete, the message
names the missing export and the command that writes it from the adapter, and no half-written file is left."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import models.atomic_write
from models.adapters.files import load_adapter_file
from tests.test_training_cli import base_args
from training.dreambooth import main

DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TARGETS = {
    "diffusers": "pytorch_lora_weights.safetensors",
    "kohya": "kohya_lora.safetensors",
    "peft": "adapter_model.safetensors",
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_app_jobs import make_subject_images

    folder = tmp_path_factory.mktemp("subject")
    make_subject_images(folder)
    return folder


@pytest.mark.parametrize("export", sorted(TARGETS))
def test_a_full_disk_during_an_export_keeps_the_adapter_and_says_how_to_redo_it(
    export: str,
    tiny_sd_path: Path,
    subject: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real_save = safetensors.torch.save_file

    def disk_fills_at_the_export(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        if TARGETS[export] in str(filename):
            with open(filename, "wb") as handle:  # a partial file, as a full disk leaves it
                handle.write(b"\0" * 64)
            raise SafetensorError(DISK_FULL)
        real_save(tensors, filename, metadata=metadata)

    # diffusers' save_lora_weights calls safetensors.torch.save_file; the project's writer its own import
    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_at_the_export)
    monkeypatch.setattr(models.atomic_write, "save_file", disk_fills_at_the_export)
    out = tmp_path / "out"
    argv = [*base_args(tiny_sd_path, subject, out), "--lora_rank", "2", "--num_validation_images", "1"]
    assert main(argv) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    [err] = [line for line in stderr.splitlines() if line.startswith("training failed")]
    adapter = out / "adapter.safetensors"
    assert err.startswith("training failed: the disk is full: "), err
    assert f"The adapter {adapter} is complete (the training is not lost)" in err, err
    assert f"the {export} export is missing: free space on that disk" in err, err
    assert load_adapter_file(adapter).family == "lora"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "a temporary file was left"
    assert not any(p.name == TARGETS[export] for p in out.rglob("*"))

    # the command in the message writes the missing export from the adapter file
    command = shlex.split(err.split("without training again: ", 1)[1])
    assert command[:6] == ["python", "-m", "models.adapters.export", str(adapter), "--to", export], command
    monkeypatch.undo()
    from models.adapters.export import main as export_main

    assert export_main(command[3:]) == 0
    assert [p for p in out.rglob(TARGETS[export])], "the command did not write the export"
