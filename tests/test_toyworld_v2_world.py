"""Toy world v2's generator and checks: determinism, held-out concepts, captions with places, checks against
ground truth."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from models.toyworld.v2.checks import check_scene, read_background, read_objects, shows
from models.toyworld.v2.subjects import PHOTO_SIZE, draw_subject
from models.toyworld.v2.world import (
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
    render_scene,
    sample_batch,
    slot_columns,
    twin_scene,
)


def test_same_seed_same_scenes_and_pixels() -> None:
    first, second = sample_batch(5, 30), sample_batch(5, 30)
    assert first == second
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(np.asarray(render_scene(a)), np.asarray(render_scene(b)))
    assert sample_batch(6, 30) != first


def test_images_are_64_px_rgb() -> None:
    image = render_scene(sample_batch(0, 1)[0])
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) == (64, 64) and image.mode == "RGB"


def test_held_out_concepts_sit_between_known_ones_and_are_never_sampled_for_the_base() -> None:
    assert len(HELD_OUT["shape"]) >= 2 and len(HELD_OUT["colour"]) >= 2 and len(HELD_OUT["texture"]) >= 1
    held = {name for names in HELD_OUT.values() for name in names}
    seen: Counter[str] = Counter()
    counts: Counter[int] = Counter()
    for scene in sample_batch(0, 3000):
        assert not scene.concepts() & held, scene.caption()
        assert not set(scene.caption().split()) & held
        seen.update(scene.concepts())
        counts[len(scene.objects)] += 1
    assert set(seen) == (set(SHAPES) | set(COLOURS) | set(TEXTURES) | set(BACKGROUNDS)) - held
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 400
    # every held-out colour lies between two base colours: nearer to each of them than they are to each other
    rgb = {name: np.array(value, dtype=float) for name, value in COLOURS.items()}
    for colour, (a, b) in {"orange": ("red", "yellow"), "teal": ("green", "blue")}.items():
        assert np.linalg.norm(rgb[colour] - rgb[a]) < np.linalg.norm(rgb[a] - rgb[b])
        assert np.linalg.norm(rgb[colour] - rgb[b]) < np.linalg.norm(rgb[a] - rgb[b])


def test_captions_name_objects_in_any_order_with_places_and_articles() -> None:
    scenes = sample_batch(3, 600)
    orders = Counter(scene.order for scene in scenes if len(scene.objects) == 2)
    assert orders[(0, 1)] > 50 and orders[(1, 0)] > 50
    placed = [s for s in scenes if s.mention_positions]
    assert placed and all(len(s.objects) > 1 for s in placed)
    for scene in placed:
        caption = scene.caption()
        for obj in scene.objects:
            assert (
                f"{obj.phrase()} {dict(left='on the left', middle='in the middle', right='on the right')[obj.slot]}"
                in caption
            )
    orange = Scene((SceneObject("star", "orange"),), mention_background=False)
    assert orange.caption() == "an orange star"
    three = Scene(
        (
            SceneObject("star", "red", box=(2, 20, 16), slot="left"),
            SceneObject("ring", "blue", box=(24, 20, 16), slot="middle"),
            SceneObject("cross", "green", box=(46, 20, 16), slot="right"),
        ),
        background="grey",
        order=(2, 0, 1),
        mention_positions=True,
    )
    assert three.caption() == (
        "a green cross on the right, a red star on the left and a blue ring in the middle on a grey background"
    )
    assert three.caption({0: "", 2: ""}) == (
        "a cross on the right, a star on the left and a blue ring in the middle on a grey background"
    )
    assert three.caption({1: "zebra"}).endswith("a zebra ring in the middle on a grey background")
    dotted = Scene((SceneObject("star", "orange", "dotted"),), mention_background=False)
    assert dotted.caption({0: ""}) == "a dotted star"


def test_objects_stay_inside_their_slots() -> None:
    for scene in sample_batch(4, 400):
        for obj in scene.objects:
            start, end = slot_columns(len(scene.objects), obj.slot)
            left, _, side = obj.box
            assert start <= left and left + side <= end, (scene, obj)


def test_bad_scenes_are_refused() -> None:
    with pytest.raises(SceneError, match="unknown shape"):
        SceneObject("hexagon", "red")
    with pytest.raises(SceneError, match="does not fit"):
        SceneObject("circle", "red", box=(60, 0, 16))
    with pytest.raises(SceneError, match="one to three"):
        Scene(())


def test_twins_change_exactly_one_thing_or_swap_two_objects() -> None:
    rng = random.Random(0)
    kinds: Counter[str] = Counter()
    for scene in sample_batch(8, 300, held_out=True):
        twin = twin_scene(scene, rng)
        assert twin.caption() != scene.caption() or twin.objects != scene.objects
        if twin.background != scene.background:
            kinds["background"] += 1
            assert twin.objects == scene.objects
            continue
        changed = [i for i, (a, b) in enumerate(zip(scene.objects, twin.objects, strict=True)) if a != b]
        assert [o.box for o in scene.objects] == [o.box for o in twin.objects]
        kinds["swap" if len(changed) == 2 else "one"] += 1
    assert kinds["swap"] > 10 and kinds["one"] > 100 and kinds["background"] > 10


def test_checks_read_rendered_scenes() -> None:
    scenes = sample_batch(11, 300, held_out=True)
    totals: Counter[str] = Counter()
    for scene in scenes:
        results = check_scene(render_scene(scene), scene)
        totals["all"] += results["all"]
        totals["count"] += results["count"]
        assert read_background(render_scene(scene)) == scene.background
    assert totals["all"] / len(scenes) >= 0.97, totals
    assert totals["count"] / len(scenes) >= 0.98, totals


@pytest.mark.parametrize("shape", SHAPES)
def test_checks_tell_every_shape_from_every_other(shape: str) -> None:
    for index, colour in enumerate(COLOURS):
        scene = concept_scene(shape, colour, "plain", list(BACKGROUNDS)[index % 3], seed=index)
        readings = read_objects(render_scene(scene))
        assert len(readings) == 1 and readings[0].shape == shape and readings[0].colour == colour


def test_shows_finds_objects_anywhere_and_refuses_blank_images() -> None:
    scene = Scene(
        (
            SceneObject("heart", "orange", box=(4, 20, 24), slot="left"),
            SceneObject("frame", "teal", "checkered", box=(36, 20, 24), slot="right"),
        ),
        background="black",
    )
    image = render_scene(scene)
    assert shows(image, "orange", "heart") and shows(image, "teal", "frame", "checkered")
    assert not shows(image, "orange", "frame") and not shows(image, "red")
    blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 245, dtype=np.uint8)
    assert read_objects(blank) == [] and not shows(blank, shape="circle")


@pytest.mark.parametrize(("shape", "colour"), [("heart", "orange"), ("frame", "teal")])
def test_a_users_own_subject_pictures_differ_from_the_world_yet_read_as_the_subject(
    shape: str, colour: str
) -> None:
    hits = 0
    for seed in range(12):
        photo = draw_subject(shape, colour, seed, list(BACKGROUNDS)[seed % 3])
        assert photo.size == (PHOTO_SIZE, PHOTO_SIZE) != (IMAGE_SIZE, IMAGE_SIZE)
        readings = read_objects(photo.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
        hits += len(readings) == 1 and readings[0].shape == shape and readings[0].colour == colour
        world = render_scene(concept_scene(shape, colour, seed=seed)).resize((PHOTO_SIZE, PHOTO_SIZE))
        assert np.abs(np.asarray(photo, dtype=float) - np.asarray(world, dtype=float)).mean() > 5
    assert hits >= 11


def test_vae_readback_of_a_lossless_autoencoder_is_what_the_checks_read_on_clean_renders() -> None:
    """The readback measures the checks on reconstructions: an identity 'VAE' must score what clean renders
    score (every one-object scene right), and a VAE that paints everything grey must score nothing."""
    from types import SimpleNamespace

    from models.toyworld.v2.vae_readback import readback

    identity = SimpleNamespace(
        encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
        decode=lambda z: SimpleNamespace(sample=z),
    )
    rates = readback(identity, count=60, seed=11)
    assert set(rates) == {1, 2, 3}
    assert rates[1] == dict.fromkeys(("count", "colour", "shape", "texture", "all"), 1.0)
    assert rates[2]["all"] >= 0.9 and rates[3]["all"] >= 0.7
    grey = SimpleNamespace(
        encode=lambda x: SimpleNamespace(latent_dist=SimpleNamespace(mean=x)),
        decode=lambda z: SimpleNamespace(sample=z * 0),
    )
    assert all(row["all"] == 0.0 for row in readback(grey, count=30, seed=11).values())
