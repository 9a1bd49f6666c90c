"""The committed toy world: loads through the real loader and clip.load, and draws what it is asked."""

from __future__ import annotations

import pytest
import torch

from models.clip_compat import clip
from models.pipelines import default_base_model, load_pipeline
from models.toyworld.checks import check_scene
from models.toyworld.evaluate import Case, generate
from models.toyworld.paths import TOYWORLD_CLIP, TOYWORLD_PIPELINE
from models.toyworld.world import Scene, SceneObject, render_scene

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
