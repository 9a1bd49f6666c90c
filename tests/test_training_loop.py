"""The DreamBooth loop on tiny models: resume equals uninterrupted, cancel, pruning, prior preservation,
caching, checkpointing/mixed precision equivalences, the moving average, divergence, SDXL and v-prediction."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from models.adapters.files import load_adapter_file
from models.profiles import TOYWORLD
from models.toyworld.world import Scene, SceneObject, render_scene
from training.checkpoints import CheckpointError, list_checkpoints, load_checkpoint
from training.config import TrainConfig
from training.dreambooth import TrainingDivergedError, train
from training.train_log import read_train_log


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four toy-world images of a held-out concept (a star), varied in colour and background."""
    folder = tmp_path_factory.mktemp("subject")
    looks = [("red", "white"), ("blue", "white"), ("green", "black"), ("yellow", "black")]
    for k, (colour, background) in enumerate(looks):
        render_scene(Scene((SceneObject("star", colour),), background=background)).save(folder / f"{k}.png")
    return folder


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny models train fastest single-threaded on a shared CPU (no OpenMP spin contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(model: Path, images: Path, out: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        pretrained_model_name_or_path=str(model),
        instance_data_dir=str(images),
        instance_prompt="a photo of sks star",
        output_dir=str(out),
        max_train_steps=4,
        learning_rate=1e-3,
        seed=7,
        num_inference_steps=2,
        num_validation_images=1,
        validation_steps=0,
        checkpointing_steps=1000,
    )
    values.update(overrides)
    return TrainConfig(**values)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_adapter_file(out / "adapter.safetensors").tensors


def test_resume_after_cancel_equals_uninterrupted(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    options = dict(
        adapter_config={"dropout": 0.1},  # dropout draws from the global RNG: the checkpoint must restore it
        random_flip=True,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        validation_steps=2,
    )
    events: list[tuple[int, int, dict[str, Any]]] = []
    full = train(
        tiny_config(tiny_sd_path, subject_dir, tmp_path / "full", **options),
        progress=lambda step, total, **info: events.append((step, total, info)),
    )
    assert (
        full.steps == 4
        and not full.cancelled
        and full.adapter_path == tmp_path / "full" / "adapter.safetensors"
    )
    assert [step for step, _ in list_checkpoints(tmp_path / "full")] == [3, 4]  # total limit 2 pruned 1 and 2
    steps_seen = [step for step, _, info in events if "loss" in info]
    assert steps_seen[:4] == [1, 2, 3, 4] and all(total == 4 for _, total, _ in events)
    assert {"loss", "lr", "eta", "validation_images"} <= set(events[0][2])
    grids = [p for _, _, info in events for p in info.get("validation_images", [])]
    assert grids == [
        tmp_path / "full" / "validation" / "step-2.png",
        tmp_path / "full" / "validation" / "step-4.png",
    ]
    assert all(p.is_file() for p in grids)

    cancel = threading.Event()
    part_dir = tmp_path / "part"

    def stop_after_two(step: int, total: int, **info: Any) -> None:
        if step == 2:
            cancel.set()

    part = train(
        tiny_config(tiny_sd_path, subject_dir, part_dir, **(options | {"checkpointing_steps": 1000})),
        progress=stop_after_two,
        cancel=cancel,
    )
    assert part.cancelled and part.steps == 2 and part.adapter_path is None
    assert (
        part.checkpoint_path == part_dir / "checkpoint-2" and not (part_dir / "adapter.safetensors").exists()
    )

    resumed = train(
        tiny_config(tiny_sd_path, subject_dir, part_dir, resume_from_checkpoint="latest", **options)
    )
    assert resumed.steps == 4
    expected, actual = adapter_tensors(tmp_path / "full"), adapter_tensors(part_dir)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected), (
        "resumed run differs from uninterrupted run"
    )
    full_log, resumed_log = (
        read_train_log(tmp_path / "full" / "train_log.jsonl"),
        read_train_log(part_dir / "train_log.jsonl"),
    )
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]
    assert [r["lr"] for r in resumed_log] == [r["lr"] for r in full_log]


def test_prior_preservation_generates_and_caches_class_images(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    class_dir = tmp_path / "class"
    options = dict(
        with_prior_preservation=True, class_prompt="a star", class_data_dir=str(class_dir), max_train_steps=2
    )
    train(tiny_config(tiny_sd_path, subject_dir, tmp_path / "a", num_class_images=3, **options))
    first = sorted(class_dir.glob("*.png"))
    assert [p.name for p in first] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    before = {p.name: p.read_bytes() for p in first}
    log = read_train_log(tmp_path / "a" / "train_log.jsonl")
    assert all("prior_loss" in row and "instance_loss" in row for row in log)
    assert all(abs(r["loss"] - (r["instance_loss"] + r["prior_loss"])) < 1e-5 for r in log)

    train(tiny_config(tiny_sd_path, subject_dir, tmp_path / "b", num_class_images=4, **options))
    after = sorted(class_dir.glob("*.png"))
    assert len(after) == 4 and all(before[name] == (class_dir / name).read_bytes() for name in before)

    fresh = tmp_path / "fresh"  # image k always comes from seed + k: regenerating gives the same file
    train(
        tiny_config(
            tiny_sd_path,
            subject_dir,
            tmp_path / "c",
            num_class_images=4,
            **(options | {"class_data_dir": str(fresh)}),
        )
    )
    assert (fresh / "class-00003.png").read_bytes() == (class_dir / "class-00003.png").read_bytes()


def test_family_prior_loss_weight_reaches_the_loss(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    """A family whose default weighs the prior loss other than 1 trains exactly as with that weight given, and
    differently from ``--prior_loss_weight 1``; the model card names the weight in effect."""
    family, weight = next(
        (f, d.prior_loss_weight) for f, d in TOYWORLD.families.items() if d.prior_loss_weight != 1
    )
    options = dict(
        profile="toyworld",
        adapter=family, with_prior_preservation=True, class_prompt="a star", num_class_images=2,
        class_data_dir=str(tmp_path / "class"), max_train_steps=2,
    )  # fmt: skip
    runs = {}
    for name, given in (("default", None), ("explicit", weight), ("one", 1.0)):
        out = tmp_path / name
        train(tiny_config(tiny_sd_path, subject_dir, out, prior_loss_weight=given, **options))
        runs[name] = (adapter_tensors(out), read_train_log(out / "train_log.jsonl")[-1])
    (default_tensors, default_row), (explicit_tensors, explicit_row) = runs["default"], runs["explicit"]
    assert default_row["loss"] == explicit_row["loss"]
    assert all(torch.equal(default_tensors[k], explicit_tensors[k]) for k in default_tensors)
    one_row = runs["one"][1]
    assert one_row["loss"] != default_row["loss"]
    assert f"2 images, weight {weight:g} |" in (tmp_path / "default" / "README.md").read_text()
    assert "2 images, weight 1 |" in (tmp_path / "one" / "README.md").read_text()


def test_cached_and_uncached_latents_train_alike(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    train(tiny_config(tiny_sd_path, subject_dir, tmp_path / "cached", max_train_steps=3, random_flip=True))
    train(
        tiny_config(
            tiny_sd_path,
            subject_dir,
            tmp_path / "plain",
            max_train_steps=3,
            random_flip=True,
            cache_latents=False,
        )
    )
    cached = [r["loss"] for r in read_train_log(tmp_path / "cached" / "train_log.jsonl")]
    plain = [r["loss"] for r in read_train_log(tmp_path / "plain" / "train_log.jsonl")]
    assert cached == pytest.approx(plain, rel=1e-4)


def test_gradient_checkpointing_gives_the_same_adapter(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    train(tiny_config(tiny_sd_path, subject_dir, tmp_path / "plain", max_train_steps=2))
    train(
        tiny_config(
            tiny_sd_path, subject_dir, tmp_path / "ckpt", max_train_steps=2, gradient_checkpointing=True
        )
    )
    plain, ckpt = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "ckpt")
    assert all(torch.allclose(plain[k], ckpt[k], atol=1e-6) for k in plain)


def test_bf16_keeps_adapter_fp32_and_missing_extras_fall_back(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(
        tiny_sd_path,
        subject_dir,
        tmp_path / "bf16",
        max_train_steps=2,
        mixed_precision="bf16",
        enable_xformers_memory_efficient_attention=True,
        use_8bit_adam=True,
    )
    with caplog.at_level(logging.WARNING):
        result = train(config)
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    assert {t.dtype for t in adapter_tensors(tmp_path / "bf16").values()} == {torch.float32}
    text = caplog.text
    assert "xformers attention asked for" in text and "using PyTorch SDPA" in text
    assert "8-bit Adam asked for" in text and "using torch AdamW" in text
    train(
        tiny_config(tiny_sd_path, subject_dir, tmp_path / "fp32", max_train_steps=1)
    )  # precision switch in one process


def test_diverging_loss_stops_without_writing_an_adapter(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    config = tiny_config(tiny_sd_path, subject_dir, tmp_path / "nan", learning_rate=1e30, max_grad_norm=0.0)
    with pytest.raises(
        TrainingDivergedError, match=r"the loss became \[nan\] at step 2.*Lower --learning_rate"
    ):
        train(config)
    assert not (tmp_path / "nan" / "adapter.safetensors").exists()
    assert len(read_train_log(tmp_path / "nan" / "train_log.jsonl")) == 1


def test_sdxl_trains_with_time_ids(tiny_sdxl_path: Path, subject_dir: Path, tmp_path: Path) -> None:
    result = train(
        tiny_config(tiny_sdxl_path, subject_dir, tmp_path / "xl", max_train_steps=2, adapter="lora")
    )
    adapter = load_adapter_file(result.adapter_path)
    assert adapter.family == "lora" and adapter.train_steps == 2
    assert any(torch.count_nonzero(t) for k, t in adapter.tensors.items() if "lora_B" in k)


def test_v_prediction_model_trains(tiny_sd_path: Path, subject_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "v-model"
    shutil.copytree(tiny_sd_path, model)
    scheduler_file = model / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) | {"prediction_type": "v_prediction"}
    scheduler_file.write_text(json.dumps(scheduler))
    eps = train(tiny_config(tiny_sd_path, subject_dir, tmp_path / "eps", max_train_steps=2, snr_gamma=5.0))
    vel = train(tiny_config(model, subject_dir, tmp_path / "vel", max_train_steps=2, snr_gamma=5.0))
    assert vel.final_loss is not None and eps.final_loss is not None and vel.final_loss != eps.final_loss
    assert load_file(vel.adapter_path).keys() == load_file(eps.adapter_path).keys()


def test_captioned_class_images_use_their_captions(tiny_sd_pipe: Any, tmp_path: Path) -> None:
    from training.conditioning import TrainingSet
    from training.data import load_training_images
    from training.prior import ensure_class_images

    prompts = ["a red circle on a white background", "a blue square on a black background"]
    files = ensure_class_images(
        tiny_sd_pipe, tmp_path, prompts, 3, resolution=32, seed=1, num_inference_steps=2, guidance_scale=5.0
    )
    assert [p.with_suffix(".txt").read_text().strip() for p in files] == [prompts[0], prompts[1], prompts[0]]
    images = load_training_images(files, 32, center_crop=True)
    train_set = TrainingSet(
        tiny_sd_pipe, images[:1], "a sks star", images, "unused class prompt", 32,
        device=torch.device("cpu"), cache_latents=True, random_flip=False,
    )  # fmt: skip
    assert train_set.prompts == [
        prompts[0],
        prompts[1],
    ]  # the instance's sidecar caption, then class captions
    assert [e.prompt_index for e in train_set.classes] == [0, 1, 0]


def test_moving_average_is_saved_and_resumes_exactly(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    """--use_ema: the adapter file holds diffusers' warmed-up average of the live weights after each step
    (decay min(ema_decay, (1 + t) / (10 + t))), and a cancelled run resumes the same average bit for bit."""
    live = train(tiny_config(tiny_sd_path, subject_dir, tmp_path / "live", checkpointing_steps=1))
    per_step = [load_checkpoint(path).adapter for _, path in list_checkpoints(tmp_path / "live")]
    assert len(per_step) == 4 and live.steps == 4
    expected = dict(per_step[0])
    for t, weights in enumerate(per_step[1:], start=1):
        decay = min(0.2, (1 + t) / (10 + t))
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}

    options = dict(use_ema=True, ema_decay=0.2)
    averaged = train(tiny_config(tiny_sd_path, subject_dir, tmp_path / "ema", **options))
    saved = adapter_tensors(tmp_path / "ema")
    last = adapter_tensors(tmp_path / "live")
    assert saved.keys() == last.keys() == expected.keys() and averaged.steps == 4
    assert all(torch.allclose(saved[k], expected[k], atol=1e-6) for k in saved)
    assert not all(torch.allclose(saved[k], last[k]) for k in saved)  # not the last step's weights
    assert "| Weights saved | moving average, decay 0.2 |" in (tmp_path / "ema" / "README.md").read_text()
    assert "| Weights saved | last step |" in (tmp_path / "live" / "README.md").read_text()

    cancel = threading.Event()
    part = train(
        tiny_config(tiny_sd_path, subject_dir, tmp_path / "part", **options),
        progress=lambda step, total, **info: cancel.set() if step == 2 else None,
        cancel=cancel,
    )
    assert part.cancelled and (tmp_path / "part" / "checkpoint-2" / "ema.safetensors").is_file()
    train(
        tiny_config(tiny_sd_path, subject_dir, tmp_path / "part", resume_from_checkpoint="latest", **options)
    )
    resumed = adapter_tensors(tmp_path / "part")
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)


def test_moving_average_cannot_resume_a_checkpoint_without_one(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    cancel = threading.Event()
    train(
        tiny_config(tiny_sd_path, subject_dir, tmp_path),
        progress=lambda step, total, **info: cancel.set(),
        cancel=cancel,
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="no moving average.*without --use_ema"):
        train(tiny_config(tiny_sd_path, subject_dir, tmp_path, resume_from_checkpoint="latest", use_ema=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_lr_multipliers_scale_matching_layers_only(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path
) -> None:
    """One AdamW step from LoRA's zero-initialised B moves B by lr x factor x (the same Adam direction), so
    self-attention B at factor 0.5 is exactly half the full-rate run's, factor 0 leaves it at zero, and
    every other layer is unchanged; the log reports the schedule's full rate. Weight decay is off so that the
    unscaled tensors (A, which decay would shrink by lr x factor x decay) must match bit for bit."""
    full = tmp_path / "full"
    train(tiny_config(tiny_sd_path, subject_dir, full, max_train_steps=1, adam_weight_decay=0.0))
    for factor in (0.5, 0.0):
        out = tmp_path / f"x{factor}"
        train(
            tiny_config(
                tiny_sd_path,
                subject_dir,
                out,
                max_train_steps=1,
                adam_weight_decay=0.0,
                lr_multipliers={r"\.attn1\.": factor},
            )
        )
        reference, scaled = adapter_tensors(full), adapter_tensors(out)
        self_b = [k for k in reference if ".attn1." in k and "lora_B" in k]
        assert self_b and all(reference[k].abs().max() > 0 for k in self_b)
        for key in reference:
            if key in self_b:
                assert torch.allclose(scaled[key], factor * reference[key], rtol=1e-4, atol=1e-9), key
            else:
                assert torch.equal(scaled[key], reference[key]), key
        assert read_train_log(out / "train_log.jsonl")[0]["lr"] == pytest.approx(1e-3)


def test_lr_multipliers_are_validated() -> None:
    with pytest.raises(ValueError, match="not a regular expression"):
        TrainConfig(instance_data_dir="x", instance_prompt="p", lr_multipliers={"attn1[": 0.5}).validate()
    with pytest.raises(ValueError, match="factor must be a number >= 0"):
        TrainConfig(instance_data_dir="x", instance_prompt="p", lr_multipliers={"attn1": -1}).validate()


def test_family_noise_offset_reaches_the_loss(tiny_sd_path: Path, subject_dir: Path, tmp_path: Path) -> None:
    """A family whose default uses offset noise trains exactly as with that offset given, and differently
    from plain noise (``--noise_offset 0``); the model card names the offset in effect."""
    family, default = next((f, d.noise_offset) for f, d in TOYWORLD.families.items() if d.noise_offset)
    runs = {}
    for name, offset in (("default", None), ("explicit", default), ("plain", 0.0)):
        out = tmp_path / name
        train(
            tiny_config(
                tiny_sd_path,
                subject_dir,
                out,
                profile="toyworld",
                adapter=family,
                max_train_steps=2,
                noise_offset=offset,
            )
        )
        runs[name] = (adapter_tensors(out), read_train_log(out / "train_log.jsonl")[-1]["loss"])
    (default_tensors, default_loss), (explicit_tensors, explicit_loss) = runs["default"], runs["explicit"]
    assert default_loss == explicit_loss
    assert all(torch.equal(default_tensors[k], explicit_tensors[k]) for k in default_tensors)
    assert runs["plain"][1] != default_loss
    assert f"| Offset noise | std {default:g} |" in (tmp_path / "default" / "README.md").read_text()
    assert "| Offset noise | off |" in (tmp_path / "plain" / "README.md").read_text()
