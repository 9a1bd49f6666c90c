"""The subjects of the DreamBooth quality report: every held-out concept's training renders and trigger prompts
show and name what they should (fast; the trained report itself is the slow test)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from models.toyworld.checks import read_object
from models.toyworld.world import HELD_OUT, render_scene
from training.quality import SUBJECTS, TRIGGER, concept_cases, write_subject_images


def test_every_held_out_concept_is_a_subject() -> None:
    assert sorted(SUBJECTS) == sorted(name for names in HELD_OUT.values() for name in names)


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_subject_images_show_the_concept_and_captions_hide_it_behind_the_trigger(
    name: str, tmp_path: Path
) -> None:
    folder = write_subject_images(tmp_path, count=5, subject=name)
    subject = SUBJECTS[name]
    images = sorted(folder.glob("*.png"))
    assert len(images) == 5
    for image in images:
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert TRIGGER in caption.split() and name not in caption, caption
        assert subject.shown(read_object(Image.open(image))), image
    backgrounds = {Image.open(image).getpixel((0, 0)) for image in images}
    assert len(backgrounds) == 2  # both backgrounds among the five


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_concept_cases_vary_the_other_attributes_and_render_as_the_subject(name: str) -> None:
    cases = concept_cases(8, name)
    subject = SUBJECTS[name]
    # every (other attribute, background) pair before any repeats: a purple subject has 3 shapes x 2 backgrounds
    assert len({case.scene.caption() for case in cases[:6]}) == 6
    assert len({case.seed for case in cases}) == 8
    for case in cases:
        obj = case.scene.objects[0]
        assert getattr(obj, subject.attribute) == name
        assert subject.caption(case.scene) == case.scene.caption().replace(name, TRIGGER)
    assert subject.shown(read_object(render_scene(cases[0].scene)))
