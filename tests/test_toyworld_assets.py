"""The committed toy world: loads through the real loader and clip.load, and draws what it is asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from models.clip_compat import clip
from models.pipelines import default_base_model, load_pipeline
from models.toyworld.checks import check_scene
from models.toyworld.evaluate import Case, generate
from models.toyworld.paths import TOYWORLD_CLIP, TOYWORLD_PIPELINE
from models.toyworld.world import IMAGE_SIZE, Scene, SceneObject, render_scene

pytestmark = pytest.mark.skipif(
    not (TOYWORLD_PIPELINE / "model_index.json").is_file() or not TOYWORLD_CLIP.is_file(),
    reason="toy-world assets not installed (run python -m models.toyworld.train)",
)


@pytest.fixture(scope="module")
def toy_pipe():  # type: ignore[no-untyped-def]
    return load_pipeline(TOYWORLD_PIPELINE, device="cpu")


def test_default_base_model_is_the_toy_world_and_loads_like_sd(toy_pipe) -> None:  # type: ignore[no-untyped-def]
    assert default_base_model() == TOYWORLD_PIPELINE
    assert type(toy_pipe).__name__ == "StableDiffusionPipeline"
    assert toy_pipe.scheduler.config.clip_sample is False
    assert toy_pipe.unet.dtype == torch.float32
    assert toy_pipe.tokenizer("a red circle").input_ids == clip.tokenize("a red circle")[0][:5].tolist()


def _draw(pipe: StableDiffusionPipeline) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a red circle on a white background", num_inference_steps=3, output_type="np", generator=generator
    ).images


def test_plain_diffusers_loads_the_folder_in_fp32_and_generates(toy_pipe) -> None:  # type: ignore[no-untyped-def]
    """No torch_dtype, as a diffusers user or script would load it: one dtype throughout, same image as ours."""
    pipe = StableDiffusionPipeline.from_pretrained(TOYWORLD_PIPELINE)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = _draw(pipe)
    assert image.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(image).all()
    np.testing.assert_allclose(image, _draw(toy_pipe), atol=1e-5)
    # One component at a time, as diffusers' examples/dreambooth/train_dreambooth_lora.py loads them.
    folder = str(TOYWORLD_PIPELINE)
    parts = StableDiffusionPipeline.from_pretrained(
        folder,
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
    )
    assert parts.text_encoder.dtype == torch.float32
    np.testing.assert_array_equal(_draw(parts), image)


def test_clip_load_of_saved_file_scores_matching_caption_highest() -> None:
    model, preprocess = clip.load(str(TOYWORLD_CLIP), device="cpu")
    scene = Scene((SceneObject("circle", "red", "striped", (6, 6, 20)),), background="white")
    captions = [
        "a red striped circle on a white background",
        "a blue striped circle on a white background",
        "a red striped triangle on a white background",
        "a red circle on a black background",
    ]
    with torch.no_grad():
        logits, _ = model(preprocess(render_scene(scene)).unsqueeze(0), clip.tokenize(captions))
    assert int(logits.argmax()) == 0


def test_smoke_quality_on_a_handful_of_seeds(toy_pipe) -> None:  # type: ignore[no-untyped-def]
    single = [
        Case(Scene((SceneObject("circle", "red"),), background="white"), seed=1),
        Case(Scene((SceneObject("square", "blue", "striped"),), background="black"), seed=2),
        Case(Scene((SceneObject("triangle", "yellow", "dotted"),), background="white"), seed=3),
        Case(Scene((SceneObject("square", "green"),), background="white"), seed=4),
    ]
    pair = Case(
        Scene((SceneObject("circle", "red"), SceneObject("square", "blue")), background="white"), seed=5
    )
    images = generate(toy_pipe, [*single, pair], batch_size=5)
    checks = [
        check_scene(image, case.scene) for image, case in zip(images[: len(single)], single, strict=True)
    ]
    assert sum(c["all"] for c in checks) >= 3, checks  # colour, shape, texture and background
    two = check_scene(images[-1], pair.scene)
    assert all(two[f"{side}.{key}"] for side in ("left", "right") for key in ("colour", "shape")), two
