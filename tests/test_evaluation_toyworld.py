"""On the toy world: the default CLIP is the toy CLIP and scores like its own API; the matched-vs-mismatched
check uses real mismatches, and (slow) the toy CLIP passes it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluation
from evaluation.toyworld_check import (
    REQUIRED_FRACTION,
    describes,
    format_report,
    matched_vs_mismatched,
    one_attribute_caption,
    other_scene_captions,
)
from models.clip_compat import clip
from models.toyworld.world import Scene, SceneObject, render_scene, sample_batch


def test_other_scene_captions_never_describe_the_image() -> None:
    scenes = sample_batch(7, 60)
    others = other_scene_captions(scenes, random.Random(0))
    captions = {scene.caption(): scene for scene in scenes}
    assert len(others) == len(scenes)
    for scene, other in zip(scenes, others, strict=True):
        assert not describes(captions[other], scene)
    plain = Scene((SceneObject("circle", "red"),), background="white", mention_background=False)
    on_white = Scene((SceneObject("circle", "red", box=(2, 2, 12)),), background="white")
    on_black = Scene((SceneObject("circle", "red"),), background="black")
    assert describes(plain, on_black) and describes(on_white, plain)
    assert not describes(on_white, on_black)
    assert not describes(Scene((SceneObject("square", "red"),)), plain)


def test_one_attribute_caption_changes_exactly_one_word() -> None:
    rng = random.Random(0)
    for scene in sample_batch(8, 40, held_out=True):
        own, changed = scene.caption().split(), one_attribute_caption(scene, rng, held_out=True).split()
        assert len(own) == len(changed)
        assert sum(a != b for a, b in zip(own, changed, strict=True)) == 1


def test_default_model_is_the_toy_clip_and_matches_its_own_encode_image_and_text() -> None:
    from models.toyworld.paths import TOYWORLD_CLIP

    scenes = sample_batch(11, 6, held_out=True)
    images = [render_scene(scene) for scene in scenes]
    prompts = [scene.caption() for scene in scenes]
    scores = evaluation.score(images, prompts, device="cpu", batch_size=4)
    assert scores.model == str(TOYWORLD_CLIP)
    model, preprocess = clip.load(str(TOYWORLD_CLIP), device="cpu", jit=False)
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(image) for image in images]))
        text_emb = model.encode_text(clip.tokenize(prompts))
    expected = F.cosine_similarity(image_emb, text_emb, dim=-1)
    torch.testing.assert_close(scores.text_cosine, expected, atol=1e-6, rtol=0)
    twin = evaluation.score(
        images, prompts, model=Path(TOYWORLD_CLIP).with_suffix(".safetensors"), device="cpu", batch_size=4
    )
    assert torch.equal(twin.text_cosine, scores.text_cosine)


@pytest.mark.slow
@pytest.mark.parametrize("held_out", [False, True])
def test_toy_clip_scores_matched_captions_higher_for_90_percent(held_out: bool) -> None:
    report = matched_vs_mismatched(n=200, seed=2024, model=None, device="cpu", held_out=held_out)
    print(format_report(report))
    assert report.other_scene.fraction_matched_higher >= REQUIRED_FRACTION
    assert report.other_scene.mean_margin > 0
