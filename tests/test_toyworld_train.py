"""The toy-world training command: a few steps of every stage write a pipeline the real loader reads, and a
rerun with more steps resumes from the stage's checkpoint instead of starting over."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from models.pipelines import load_pipeline
from models.toyworld.train import ToyWorldTrainConfig, train
from models.toyworld.world import IMAGE_SIZE


def _tiny_config(tmp_path: Path, **overrides: object) -> ToyWorldTrainConfig:
    settings: dict[str, object] = {
        "out": tmp_path / "assets",
        "work_dir": tmp_path / "work",
        "clip_steps": 2,
        "scorer_steps": 2,
        "vae_steps": 2,
        "unet_steps": 2,
        "clip_batch": 4,
        "vae_batch": 2,
        "unet_batch": 2,
        "checkpoint_every": 1,
    }
    settings.update(overrides)
    return ToyWorldTrainConfig(**settings)  # type: ignore[arg-type]


def _step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["step"])


def test_a_short_run_writes_a_loadable_pipeline_and_resumes(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path)
    pipeline_dir = train(config)
    assert pipeline_dir == config.out / "pipeline"
    assert (config.out / "clip" / "toyworld_clip.pt").is_file()
    pipe = load_pipeline(pipeline_dir, device="cpu", dtype="fp32")
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == IMAGE_SIZE
    assert pipe.scheduler.config.clip_sample is False
    image = pipe("a red circle", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    plain = StableDiffusionPipeline.from_pretrained(pipeline_dir)  # no torch_dtype: fp16 files load as fp32
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.float32}
    assert plain("a red circle", num_inference_steps=2, output_type="np").images.shape[-1] == 3

    first_unet = pipe.unet.state_dict()["conv_out.weight"].clone()
    assert _step(config.work_dir / "unet_state.safetensors") == 2
    (config.work_dir / "unet_final.safetensors").rename(config.work_dir / "unet_final_2.safetensors")
    train(_tiny_config(tmp_path, unet_steps=3))
    assert _step(config.work_dir / "unet_state.safetensors") == 3  # resumed at 2, not restarted at 0
    resumed = load_pipeline(pipeline_dir, device="cpu", dtype="fp32").unet.state_dict()["conv_out.weight"]
    assert not torch.equal(resumed, first_unet)


def test_impossible_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="noise_offset"):
        _tiny_config(tmp_path, noise_offset=-0.1)
    with pytest.raises(ValueError, match="unet_steps"):
        _tiny_config(tmp_path, unet_steps=0)
