"""Toy world v2's quality report judges its own figures against issue #37's targets."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from PIL import Image

from models.toyworld.sampling import GUIDANCE
from models.toyworld.v2.evaluate import (
    check_rates,
    held_out_rates,
    near_chance_bound,
    rate,
    single_object_cases,
    verdicts,
)
from models.toyworld.v2.world import BACKGROUNDS, BASE_COLOURS, HELD_OUT, render_scene, with_attribute

HELD_OUT_NAMES = [name for names in HELD_OUT.values() for name in names]


def test_near_chance_is_the_checks_chance_plus_two_standard_errors() -> None:
    assert near_chance_bound("shape", 36) == pytest.approx(1 / 11 + 2 * math.sqrt((1 / 11) * (10 / 11) / 36))
    assert near_chance_bound("shape", 36) == pytest.approx(0.1867, abs=1e-4)
    assert near_chance_bound("colour", 12) == pytest.approx(1 / 9 + 2 * math.sqrt((1 / 9) * (8 / 9) / 12))
    assert near_chance_bound("texture", 36) == pytest.approx(0.2 + 2 * math.sqrt(0.16 / 36))
    assert near_chance_bound("texture", 1000) < near_chance_bound("texture", 36)  # more samples, tighter


def test_verdicts_hold_each_figure_to_its_target() -> None:
    figures = {
        "single_object_accuracy": 0.95,  # the bound itself counts as met (>=)
        "2_object_rate": 0.84,
        "clip_zero_shot_shape": 0.93,
        "clip_zero_shot_texture": 0.89,
        "load_s": 2.0,  # < 2 s: not met
        "four_images_25_steps_s": 2.5,
        "assets_mb": 62.9,
        "held_out_teal": 0.75,
        "held_out_heart": 0.0,
        "held_out_checkered": 0.25,
        "unrelated_figure": 1.0,
    }
    judged = verdicts(figures, held_out_samples=36)
    met = {name: ok for name, (_, _, ok) in judged.items()}
    assert met == {
        "single_object_accuracy": True,
        "2_object_rate": False,
        "clip_zero_shot_shape": True,
        "clip_zero_shot_texture": False,
        "load_s": False,
        "four_images_25_steps_s": True,
        "assets_mb": True,
        "held_out_teal": False,
        "held_out_heart": True,
        "held_out_checkered": True,  # 0.25 <= 0.2 + 2 * 0.0667
    }
    assert judged["held_out_teal"][1] == pytest.approx(near_chance_bound("colour", 36))


class _RecordingPipe:
    """Stands in for a pipeline: records the guidance it is called with and returns blank images."""

    def __init__(self) -> None:
        self.guidance: list[float] = []

    def __call__(
        self, prompts: list[str], num_inference_steps: int, guidance_scale: float, generator: list
    ) -> object:
        self.guidance.append(guidance_scale)
        return type("Result", (), {"images": [Image.new("RGB", (64, 64), (245, 245, 245))] * len(prompts)})()


def test_the_guidance_asked_for_reaches_every_generation() -> None:
    pipe = _RecordingPipe()
    cases = single_object_cases(3)
    assert rate(pipe, cases) == 0.0  # blank images show nothing
    assert rate(pipe, cases, guidance=7.5) == 0.0
    held_out_rates(pipe, per_concept=2, guidance=3.0)
    assert pipe.guidance[0] == GUIDANCE and pipe.guidance[1] == 7.5
    assert set(pipe.guidance[2:]) == {3.0} and len(pipe.guidance) == 2 + len(HELD_OUT_NAMES)


def test_check_rates_count_each_check_and_all_of_them_from_one_generation() -> None:
    cases = single_object_cases(3)
    first, second, third = (case.scene for case in cases)
    other_colour = next(c for c in BASE_COLOURS if c != second.objects[0].colour)
    other_background = next(b for b in BACKGROUNDS if b != third.background)
    drawn = {
        first.caption(): render_scene(first),
        second.caption(): render_scene(with_attribute(second, "colour", other_colour)),
        third.caption(): render_scene(replace(third, background=other_background)),
    }
    calls: list[list[str]] = []

    def pipe(prompts: list[str], num_inference_steps: int, guidance_scale: float, generator: list) -> object:
        calls.append(prompts)
        return type("Result", (), {"images": [drawn[p] for p in prompts]})()

    rates = check_rates(pipe, cases, ("colour", "shape", "background"))
    assert len(calls) == 1
    assert rates == pytest.approx({"colour": 2 / 3, "shape": 1.0, "background": 2 / 3, "all": 1 / 3})
    assert rate(pipe, cases, ("colour", "shape")) == pytest.approx(2 / 3)
