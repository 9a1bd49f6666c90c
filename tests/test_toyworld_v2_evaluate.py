"""Toy world v2's quality report judges its own figures against issue #37's targets."""

from __future__ import annotations

import math

import pytest

from models.toyworld.v2.evaluate import near_chance_bound, verdicts


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
