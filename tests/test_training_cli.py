"""`python -m training.dreambooth` end to end: every family on the tiny model, every bad input (exit 2,
outputs untouched), and `accelerate launch --num_processes 2 --cpu` (gloo) saving once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from models.adapters.files import load_adapter_file
from models.profiles import SD1
from models.toyworld.world import Scene, SceneObject, render_scene
from training.checkpoints import list_checkpoints
from training.cli import build_parser, config_from_args
from training.dreambooth import main
from training.train_log import read_train_log

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("subject")
    for k, colour in enumerate(["red", "blue", "green", "yellow"]):
        render_scene(Scene((SceneObject("heart", colour),))).save(folder / f"{k}.png")
    return folder


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_args(model: Path, images: Path, out: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(images),
        "--instance_prompt", "a photo of sks heart",
        "--output_dir", str(out),
        "--max_train_steps", "2",
        "--seed", "3",
        "--num_inference_steps", "2",
        "--num_validation_images", "2",
    ]  # fmt: skip


FAMILY_FLAGS = {
    "lora": ["--lora_rank", "2", "--lora_alpha", "2"],
    "krona": ["--krona_a1", "4", "--krona_a2", "4"],
    "boft": ["--boft_block_num", "4"],
    "hra": ["--hra_r", "2"],
}


EXPORTS = {
    "lora": {"exports/peft", "exports/pytorch_lora_weights.safetensors", "exports/kohya_lora.safetensors"},
    "krona": {
        "exports/kohya_lokr.safetensors",
        "exports/lycoris.safetensors",
        "exports/pytorch_lora_weights_rank32.safetensors",
    },
    "boft": {
        "exports/peft",
        "exports/kohya_full.safetensors",
        "exports/pytorch_lora_weights_rank32.safetensors",
    },
    "hra": {"exports/peft", "exports/pytorch_lora_weights.safetensors", "exports/kohya_lora.safetensors"},
}


@pytest.mark.parametrize("family", sorted(FAMILY_FLAGS))
def test_cli_trains_every_family(family: str, tiny_sd_path: Path, subject_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main([*base_args(tiny_sd_path, subject_dir, out), "--adapter", family, *FAMILY_FLAGS[family]])
    assert code == 0
    adapter = load_adapter_file(out / "adapter.safetensors")
    assert adapter.family == family and adapter.train_steps == 2
    assert adapter.trigger_phrase == "a photo of sks heart"
    saved = adapter.config.to_dict()
    for flag, value in zip(FAMILY_FLAGS[family][::2], FAMILY_FLAGS[family][1::2], strict=True):
        key = flag.removeprefix(f"--{family}_")
        assert saved[key] == type(saved[key])(value), key
    rows = read_train_log(out / "train_log.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 and r["lr"] == SD1.family(family).learning_rate for r in rows)  # a tiny SD 1.x
    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.size == (2 * 32, 32)  # two 32 px samples side by side
    exported = {p.relative_to(out).as_posix() for p in (out / "exports").iterdir()}
    assert exported == EXPORTS[family]
    card = (out / "README.md").read_text()
    assert "a photo of sks heart" in card and "validation/step-2.png" in card and adapter.fingerprint in card
    # the adapter changed the UNet: effective weights differ from the base model's
    from models.pipelines import load_pipeline

    unet = load_pipeline(tiny_sd_path, device="cpu", dtype="fp32").unet
    effective = adapter.layer_weights(unet)
    assert max((effective[n] - unet.get_submodule(n).weight).abs().max().item() for n in effective) > 0


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_rank_is_the_diffusers_name_of_lora_rank(tmp_path: Path) -> None:
    args = base_args(tmp_path / "model", tmp_path / "images", tmp_path / "out")
    assert config_from_args([*args, "--rank", "8"]).adapter_config == {"rank": 8}
    assert config_from_args([*args, "--lora_rank", "8"]) == config_from_args([*args, "--rank", "8"])
    assert config_from_args(args).adapter_config == {}
    assert "--lora_rank LORA_RANK, --rank LORA_RANK" in build_parser().format_help()


BAD_INPUTS = [
    (["--resolution", "30"], "--resolution 30 must be a positive multiple of 8"),
    (["--lora_rank", "0"], "lora rank must be an integer >= 1"),
    (["--lora_rank", "64"], "lora rank 64 exceeds the size of layer"),
    (
        ["--adapter", "boft", "--boft_block_num", "0", "--boft_block_size", "5"],
        "boft block_size=5 does not divide",
    ),
    (["--adapter", "hra", "--hra_r", "3"], "hra r must be an even integer"),
    (["--adapter", "krona", "--krona_a1", "0"], "krona a1 must be an integer >= 1"),
    (["--lora_dropout", "1.5"], "lora dropout must be in [0, 1)"),
    (["--hra_r", "2"], "--hra_r belongs to the hra family, but --adapter is lora"),
    (
        ["--adapter", "hra", "--rank", "4"],
        "--lora_rank (--rank) belongs to the lora family, but --adapter is hra",
    ),
    (["--rank", "0"], "lora rank must be an integer >= 1"),
    (["--targets", "no_such_layer"], "pattern 'no_such_layer' selects no nn.Linear layer"),
    (["--instance_prompt", " "], "--instance_prompt is required"),
    (["--with_prior_preservation"], "--with_prior_preservation needs --class_prompt"),
    (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU"),
    (["--resume_from_checkpoint", "checkpoint-9"], "is not a training checkpoint"),
    (["--pretrained_model_name_or_path", "/no/such/model"], "does not exist"),
    (["--learning_rate", "0"], "--learning_rate must be a positive number"),
    (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
    (["--lr_scheduler", "sometimes"], "--lr_scheduler 'sometimes' is unknown"),
    (["--adapter", "dora"], "invalid choice: 'dora'"),
    (["--max_train_steps", "many"], "invalid int value: 'many'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS, ids=[m[:40] for _, m in BAD_INPUTS])
def test_bad_input_exits_2_and_touches_nothing(
    extra: list[str],
    message: str,
    tiny_sd_path: Path,
    subject_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "previous-run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "adapter.safetensors").write_bytes(b"an earlier, good adapter")
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (out / "checkpoint-1" / "notes.txt").write_text("not a complete checkpoint")
    before = _snapshot(out)
    code = main([*base_args(tiny_sd_path, subject_dir, out), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert _snapshot(out) == before


def test_bad_images_and_folders_exit_2(
    tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(base_args(tiny_sd_path, empty, out)) == 2
    assert "holds no images" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cat.jpg").write_bytes(b"not really a jpeg")
    Image.new("RGB", (8, 8)).save(broken / "small.png")
    assert main(base_args(tiny_sd_path, broken, out)) == 2
    err = capsys.readouterr().err
    assert "cat.jpg: not a readable image" in err and "small.png: 8x8 is too small" in err
    assert not out.exists()
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"learning_rat": 1}))
    assert main(["--config", str(config)]) == 2
    assert "unknown training option(s): learning_rat" in capsys.readouterr().err


def test_a_full_disk_stops_with_a_message_and_keeps_the_last_checkpoint(
    tiny_sd_path: Path,
    subject_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills while checkpoint 4 is written (safetensors' own I/O error): exit 1 with a message naming
    the problem, the intact checkpoint and how to continue; nothing half-written is left behind; resuming
    from that checkpoint then ends exactly where the uninterrupted run does."""
    import training.checkpoints

    def args(out: Path) -> list[str]:
        return [
            *base_args(tiny_sd_path, subject_dir, out),
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "2",
        ]

    assert main(args(tmp_path / "uninterrupted")) == 0
    save_file = training.checkpoints.save_file

    def disk_fills_at_step_4(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        if ".checkpoint-4-" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(training.checkpoints, "save_file", disk_fills_at_step_4)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(args(out)) == 1
    err = capsys.readouterr().err
    assert f"the disk is full: {out / 'checkpoint-4'} could not be written" in err
    assert f"The newest checkpoint, {out / 'checkpoint-2'} (step 2), is complete" in err
    assert "--resume_from_checkpoint latest" in err
    assert list_checkpoints(out) == [(2, out / "checkpoint-2")]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no staging folder or temporary file
    assert not (out / "adapter.safetensors").exists()
    assert [r["step"] for r in read_train_log(out / "train_log.jsonl")] == [1, 2, 3]

    monkeypatch.undo()
    assert main([*args(out), "--resume_from_checkpoint", "latest"]) == 0
    resumed = load_adapter_file(out / "adapter.safetensors").tensors
    expected = load_adapter_file(tmp_path / "uninterrupted" / "adapter.safetensors").tensors
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tiny_sd_path: Path, subject_dir: Path, tmp_path: Path) -> None:
    """Two gloo processes on the CPU. accelerate 1.x starts several CPU processes through torchrun only with
    ``--multi_gpu`` plus ``ACCELERATE_USE_CPU=1`` (``--cpu --num_processes 2`` alone needs an MPI hostfile)."""
    out = tmp_path / "ddp"
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "ACCELERATE_USE_CPU": "1",
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "training.dreambooth", *base_args(tiny_sd_path, subject_dir, out),
        "--max_train_steps", "3", "--checkpointing_steps", "2",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = load_adapter_file(out / "adapter.safetensors")
    assert json.loads(adapter.metadata["extra"])["num_processes"] == 2
    assert [r["step"] for r in read_train_log(out / "train_log.jsonl")] == [
        1,
        2,
        3,
    ]  # written once, not twice
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftover temporary files
    assert run.stdout.count("adapter: ") == 1


def test_progress_bar_counts_steps_and_shows_the_latest_loss(capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import ProgressBar

    bar = ProgressBar()
    bar(0, 10, class_images=(2, 4))
    for step in range(1, 11):
        bar(step, 10, loss=1.0 / step, lr=1e-3, eta=0.0, validation_images=[])
    assert bar.bar is not None and bar.bar.n == 10
    assert bar.bar.desc.startswith("training")
    assert bar.bar.postfix == "loss=0.1000, lr=1.00e-03"
    bar.close()
    assert "10/10" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--adapter", "foo"], "error: argument --adapter: invalid choice: 'foo' (choose from 'boft', 'hra', "
         "'krona', 'lora') (see python -m training.dreambooth --help)"),
        (["--max_train_steps", "many"], "error: argument --max_train_steps: invalid int value: 'many' "
         "(see python -m training.dreambooth --help)"),
    ],
)  # fmt: skip
def test_a_bad_flag_is_one_line_not_the_usage(
    extra: list[str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """#35 item 9: argparse printed ~60 lines of usage before the error."""
    assert main(["--output_dir", str(tmp_path / "out"), *extra]) == 2
    assert capsys.readouterr().err.strip() == line


@pytest.mark.parametrize("shape", ["file", "inside-a-file"])
def test_a_file_shaped_output_dir_exits_2_before_anything_runs(
    shape: str,
    tiny_sd_path: Path,
    subject_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """#35 item 9: a file given as --output_dir failed with exit 1 after the base model had loaded."""
    import training.preflight

    def must_not_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the base model was loaded before --output_dir was checked")

    monkeypatch.setattr(training.preflight, "load_pipeline", must_not_load)
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a folder")
    out = blocker if shape == "file" else blocker / "run1"
    assert main(base_args(tiny_sd_path, subject_dir, out)) == 2
    err = capsys.readouterr().err.strip()
    where = "is a file" if shape == "file" else f"is inside {blocker}, which is a file"
    assert err == f"error: --output_dir {out} {where}; pass a folder (it is created if missing)"
    assert blocker.read_text() == "a file, not a folder"


def test_resume_latest_without_a_checkpoint_is_said_and_leftovers_are_removed(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """#35 item 9: `latest` with no checkpoint started over silently, and a kill -9 left staging behind."""
    import logging

    out = tmp_path / "out"
    leftovers = [
        out / ".checkpoint-4-k2j4x9_q",
        out / ".adapter.safetensors.a1b2c3d4.tmp",
        out / "exports" / ".kohya_lora.safetensors.zz9yy8xx.tmp",
        out / "exports" / ".peft.q1w2e3r4",
    ]
    for path in leftovers:
        if path.suffix == ".tmp":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
        else:
            path.mkdir(parents=True)
            (path / "adapter.safetensors").write_bytes(b"half")
    kept = [out / "notes.txt", out / ".my-settings", out / "exports" / ".keep"]
    for path in kept:
        path.write_text("mine")
    caplog.set_level(logging.INFO)
    assert main([*base_args(tiny_sd_path, subject_dir, out), "--resume_from_checkpoint", "latest"]) == 0
    note = f"--resume_from_checkpoint latest found no checkpoint in {out}: started at step 0"
    assert note in caplog.text
    assert f"| Resume | {note} |" in (out / "README.md").read_text()
    assert not [p for p in leftovers if p.exists()]
    assert all(p.read_text() == "mine" for p in kept)
    assert load_adapter_file(out / "adapter.safetensors").train_steps == 2


def test_an_unwritable_output_dir_exits_2_before_anything_runs(
    tiny_sd_path: Path,
    subject_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """#35 item 9. The tests run as root, whom permissions do not stop, so the folder's answer to access(2) is
    what is simulated: read-only for everyone."""
    import training.preflight

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        training.preflight.os,
        "access",
        lambda path, mode: False if Path(path) == locked else real_access(path, mode),
    )
    out = locked / "run1"
    assert main(base_args(tiny_sd_path, subject_dir, out)) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir {out}: {locked} is not writable for this user; pass a folder you can write to"
    )
    assert not out.exists()
