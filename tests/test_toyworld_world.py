"""The toy world's generator and checks: determinism, held-out concepts, checks against ground truth."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from models.toyworld.checks import check_scene, read_background, read_object
from models.toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    IMAGE_SIZE,
    SHAPES,
    TEXTURES,
    Scene,
    SceneError,
    SceneObject,
    concept_scene,
    images_to_array,
    render_scene,
    sample_batch,
    twin_scene,
)


def test_same_seed_same_scenes_and_pixels() -> None:
    first, second = sample_batch(5, 20), sample_batch(5, 20)
    assert first == second
    assert all(
        np.array_equal(np.asarray(render_scene(a)), np.asarray(render_scene(b)))
        for a, b in zip(first, second, strict=True)
    )
    assert sample_batch(6, 20) != first


def test_base_sampler_never_emits_held_out_concepts() -> None:
    held = {name for names in HELD_OUT.values() for name in names}
    seen: Counter[str] = Counter()
    for scene in sample_batch(0, 3000):
        assert not scene.concepts() & held, scene.caption()
        assert not set(scene.caption().split()) & held
        seen.update(scene.concepts())
    base = (set(SHAPES) | set(COLOURS) | set(TEXTURES) | set(BACKGROUNDS)) - held
    assert set(seen) == base


def test_held_out_sampler_covers_everything_and_held_out_list_is_large_enough() -> None:
    assert len(HELD_OUT["shape"]) >= 2 and len(HELD_OUT["colour"]) >= 1 and len(HELD_OUT["texture"]) >= 1
    seen: set[str] = set()
    for scene in sample_batch(1, 2000, held_out=True):
        seen |= scene.concepts()
    assert seen == set(SHAPES) | set(COLOURS) | set(TEXTURES) | set(BACKGROUNDS)


def test_captions_name_left_object_first() -> None:
    scenes = [s for s in sample_batch(3, 200) if len(s.objects) == 2]
    assert scenes
    for scene in scenes:
        left, right = scene.objects
        assert left.box[0] + left.box[2] <= IMAGE_SIZE // 2 < right.box[0]
        assert scene.caption().startswith(f"a {left.phrase()} and a {right.phrase()}")


def test_render_shape_and_range() -> None:
    scene = concept_scene("star", "purple", "checkered", background="black", seed=3)
    image = render_scene(scene)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    array = images_to_array([image])
    assert array.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert -1.0 <= array.min() < array.max() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"shape": "hexagon", "colour": "red"}, "shape"),
        ({"shape": "circle", "colour": "teal"}, "colour"),
        ({"shape": "circle", "colour": "red", "texture": "wavy"}, "texture"),
        ({"shape": "circle", "colour": "red", "box": (30, 0, 10)}, "fit"),
    ],
)
def test_bad_attributes_are_named(kwargs: dict, word: str) -> None:
    with pytest.raises(SceneError, match=word):
        SceneObject(**kwargs)


def test_checks_agree_with_ground_truth_on_clean_scenes() -> None:
    scenes = sample_batch(11, 300, held_out=True)
    results = [check_scene(render_scene(scene), scene) for scene in scenes]
    accuracy = np.mean([r["all"] for r in results])
    assert accuracy >= 0.97, accuracy
    for key in ("background", "colour", "shape", "texture"):
        values = [v for r in results for k, v in r.items() if k.split(".")[-1] == key]
        assert np.mean(values) >= 0.97, (key, np.mean(values))


def test_checks_reject_wrong_attributes_and_empty_regions() -> None:
    scene = Scene((SceneObject("triangle", "blue", "striped", (4, 6, 20)),), background="white")
    image = render_scene(scene)
    reading = read_object(image)
    assert reading is not None and (reading.shape, reading.colour, reading.texture) == (
        "triangle",
        "blue",
        "striped",
    )
    wrong = Scene((SceneObject("circle", "red", "plain", (4, 6, 20)),), background="black")
    result = check_scene(image, wrong)
    assert not any(result.values())
    blank = render_scene(Scene((SceneObject("square", "green", box=(2, 2, 10)),)))
    assert read_object(blank, "right") is None
    assert read_background(blank) == "white"


def test_checks_recognise_every_held_out_concept() -> None:
    rng = random.Random(0)
    for shape in HELD_OUT["shape"]:
        for colour in HELD_OUT["colour"]:
            for texture in ("plain", *HELD_OUT["texture"]):
                scene = concept_scene(
                    shape, colour, texture, background=rng.choice(list(BACKGROUNDS)), seed=1
                )
                assert check_scene(render_scene(scene), scene)["all"], scene.caption()


def test_twin_scene_changes_exactly_one_attribute() -> None:
    rng = random.Random(4)
    for scene in sample_batch(9, 200, held_out=True):
        twin = twin_scene(scene, rng)
        differences = int(twin.background != scene.background)
        for a, b in zip(scene.objects, twin.objects, strict=True):
            assert a.box == b.box
            differences += (a.shape != b.shape) + (a.colour != b.colour) + (a.texture != b.texture)
        assert differences == 1
        assert twin.caption() != scene.caption()
