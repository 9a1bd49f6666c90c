"""The toy world v2 composition report (`composition.quality_v2`): its judging, its verdicts and its wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from composition import quality_v2
from composition.quality_v2 import (
    SETUPS,
    is_noise_image,
    parse_overrides,
    place_verdicts,
    plain_form,
    quality_report,
    verdicts,
)
from evaluation import concept_scores, score
from models.toyworld.v2.train import ToyWorldV2TrainConfig, train
from models.toyworld.v2.world import BACKGROUNDS, Scene, SceneObject, render_scene

HEART = SceneObject("heart", "orange", "plain", (4, 20, 24), "left")
FRAME = SceneObject("frame", "teal", "plain", (36, 20, 24), "right")


def test_plain_forms_swap_held_out_words_for_the_nearest_base_values() -> None:
    assert plain_form("orange heart") == "yellow circle"  # nearest colour by RGB, shape by template overlap
    assert plain_form("teal frame") == "blue square"
    assert plain_form("red checkered square") == "red square"  # a held-out texture is drawn plain


def test_each_place_must_hold_its_own_subject() -> None:
    places = SETUPS[0].places
    assert place_verdicts(render_scene(Scene((HEART, FRAME))), places) == {"left": True, "right": True}
    exchanged = (
        SceneObject("frame", "teal", "plain", (4, 20, 24), "left"),
        SceneObject("heart", "orange", "plain", (36, 20, 24), "right"),
    )
    assert place_verdicts(render_scene(Scene(exchanged)), places) == {"left": False, "right": False}
    wrong_colour = SceneObject("frame", "blue", "plain", (36, 20, 24), "right")
    assert place_verdicts(render_scene(Scene((HEART, wrong_colour))), places) == {
        "left": True,
        "right": False,
    }
    three = SETUPS[2].places
    objects = [
        SceneObject("heart", "orange", "plain", (2, 24, 18), "left"),
        SceneObject("frame", "teal", "plain", (23, 24, 18), "middle"),
        SceneObject("square", "red", "checkered", (44, 24, 18), "right"),
    ]
    assert all(place_verdicts(render_scene(Scene(tuple(objects))), three).values())
    objects[2] = SceneObject("square", "red", "plain", (44, 24, 18), "right")
    assert place_verdicts(render_scene(Scene(tuple(objects))), three)["right"] is False


def test_noise_and_empty_images_count_as_noise_and_renders_do_not() -> None:
    assert not is_noise_image(render_scene(Scene((HEART, FRAME))))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert is_noise_image(Image.fromarray(noise))
    assert is_noise_image(Image.new("RGB", (64, 64), BACKGROUNDS["grey"]))


def test_method_options_come_as_method_key_value_and_are_checked() -> None:
    assert parse_overrides(["clora.preset=paper", "cmlora.cache_interval=4"]) == {
        "clora": {"preset": "paper"},
        "cmlora": {"cache_interval": 4},
    }
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_overrides(["preset=paper"])
    with pytest.raises(ValueError, match="no_such_option"):
        parse_overrides(["clora.no_such_option=1"])


def _report(medians: dict[str, dict[str, float]], noise: int = 0) -> dict:
    rows = {"clora": {"noise_images": noise}, "merge": {"noise_images": 0}}
    return {"medians": medians, "setups": {"N=2": {"train_seeds": {"0": rows}}}}


def test_the_verdicts_are_the_issues_targets_on_the_medians() -> None:
    good = {
        "N=2": {"clora": 0.85, "cmlora": 0.9},
        "N=2 swapped": {"clora": 0.8, "cmlora": 0.95},
        "N=3": {"clora": 0.4, "cmlora": 0.6},
    }
    assert all(verdicts(_report(good)).values())
    assert not verdicts(_report(good, noise=1))["no noise image"]
    worse = {**good, "N=2 swapped": {"clora": 0.7, "cmlora": 0.95}}  # below 80% and 15 points off
    assert not verdicts(_report(worse))["clora swapped >= 80% and within 10%"]
    far = {"N=2": {"clora": 1.0, "cmlora": 0.9}, "N=2 swapped": {"clora": 0.85, "cmlora": 0.95}}
    assert not verdicts(_report(far))["clora swapped >= 80% and within 10%"]  # 15 points apart
    assert not verdicts(_report({**good, "N=3": {"clora": 0.5, "cmlora": 0.59}}))[
        "N=3 >= 60% (clora or cmlora)"
    ]


def test_the_report_trains_fresh_adapters_per_training_seed_and_composes_them(tmp_path: Path) -> None:
    config = ToyWorldV2TrainConfig(
        out=tmp_path / "base", work_dir=tmp_path / "base-work", clip_steps=1, clip_pretrain_steps=1,
        clip_text_pretrain_steps=1, clip_text_batch=4, vae_steps=1, unet_steps=1, clip_batch=4, vae_batch=2,
        unet_batch=2,
    )  # fmt: skip
    model = str(train(config))
    clip = Path(model).parent / "clip" / "toyworld_clip.safetensors"
    report = quality_report(
        model, tmp_path / "work", train_seeds=(0, 1), seeds=2, methods=("merge", "clora"), setups=SETUPS[:1],
        train_steps=1, save_images=True, clip=clip,
    )  # fmt: skip
    seeds = report["setups"]["N=2"]["train_seeds"]
    # the CLIP scores are those of the saved images under the given CLIP, with the setup's prompt and phrases
    images = [
        Image.open(tmp_path / "work" / "images" / "train-seed-1" / "N=2" / f"clora_{s:03d}.png")
        for s in (0, 1)
    ]
    setup = SETUPS[0]
    expected = float(score(images, setup.prompt, model=clip).clipscore_hessel.mean())
    expected_min = float(
        concept_scores(images, ["an orange heart", "a teal frame"], model=clip).minimum.mean()
    )
    assert seeds["1"]["clora"]["clipscore"] == pytest.approx(expected, abs=1e-3)
    assert seeds["1"]["clora"]["concept_min_clipscore"] == pytest.approx(expected_min, abs=1e-3)
    assert report["clip"] == str(clip)
    assert "CLIPScore" in quality_v2.format_table(report)
    assert sorted(seeds) == ["0", "1"]
    for rows in seeds.values():
        assert sorted(rows) == ["clora", "merge"]
        for row in rows.values():
            assert 0 <= row["all_present"] <= 1 and 0 <= row["noise_images"] <= 2
            assert set(row) >= {"left_present", "right_present", "all_present_95ci"}
    adapters = sorted((tmp_path / "work" / "adapters").glob("*/1-steps/lora/seed-*/adapter.path"))
    assert [p.parts[-5] for p in adapters] == ["orange-heart"] * 2 + ["teal-frame"] * 2
    assert report["medians"]["N=2"]["clora"] == pytest.approx(
        float(np.median([seeds[s]["clora"]["all_present"] for s in seeds]))
    )
    assert "no noise image" in report["verdicts"]
    assert "N=2" in quality_v2.format_table(report)
    # without a CLIP the pixel checks stand alone
    bare = quality_report(model, tmp_path / "work", train_seeds=(0,), seeds=1, methods=("merge",), setups=SETUPS[:1],
                          train_steps=1)  # fmt: skip
    assert bare["setups"]["N=2"]["train_seeds"]["0"]["merge"]["clipscore"] is None
    assert "CLIPScore" not in quality_v2.format_table(bare)
