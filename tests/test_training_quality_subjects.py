"""The subjects of the DreamBooth quality report: every held-out concept's training renders and trigger prompts
show and name what they should (fast; the trained report itself is the slow test)."""

from __future__ import annotations

import dataclasses
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
def test_pair_renders_show_the_subject_in_its_half_beside_a_named_base_object(
    name: str, tmp_path: Path
) -> None:
    """Two-object subject renders: the subject alternates between the right and the left half, at pair size,
    beside a base-world object (any base shape and colour: the subject's held-out value sets them apart); the caption names both left to right, the
    subject by the trigger."""
    folder = write_subject_images(tmp_path, count=2, subject=name, pairs=4)
    subject = SUBJECTS[name]
    pairs = sorted(folder.glob("subject-pair-*.png"))
    assert len(pairs) == 4 and len(list(folder.glob("*.png"))) == 6
    placements = set()
    for index, image in enumerate(pairs):
        here, there = ("right", "left") if index % 2 == 0 else ("left", "right")
        placements.add((here, Image.open(image).getpixel((0, 0))))
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        first, second = caption.split(" and ")
        assert TRIGGER in (second if here == "right" else first).split(), caption
        assert name not in caption.split()
        rendered = Image.open(image)
        mine, partner = read_object(rendered, here), read_object(rendered, there)
        assert subject.shown(mine), (image, caption)
        assert partner is not None and not subject.shown(partner)
        assert (partner.shape, partner.colour) != (mine.shape, mine.colour)
    assert len(placements) == 4  # the subject on each side over each background: no side-background cue


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


def test_a_family_row_pools_every_training_seed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import training.quality as quality

    runs = {0: (0.95, 0.9, 0.958), 1: (0.75, 0.5, 0.902)}  # concept, exact, prompts per seed
    seen: list[tuple[int, str]] = []

    def fake(family, model, subject, out, seed, *, settings, cases, prompts, prior):
        seen.append((seed, prior["class_data_dir"]))
        concept, exact, prompt = runs[seed]
        return {"concept_accuracy": concept, "concept_exact_accuracy": exact, "prompt_accuracy": prompt,
                "trainable_parameters": 1_034_240, "file_bytes": 2048, "steps": 800, "steps_per_second": 4.0 + seed,
                "wall_seconds": 100.0}  # fmt: skip

    monkeypatch.setattr(quality, "_train_and_score", fake)
    settings = quality.QualitySettings(train_seeds=(0, 1), regularisation_images=2)
    prior = quality.prior_options(tmp_path, settings)
    row = quality.run_family(
        "lora", "toy", tmp_path, tmp_path, settings=settings, cases=[], prompts=[], prior=prior
    )
    assert [seed for seed, _ in seen] == [0, 1] and seen[0][1] == seen[1][1]  # one regularisation set
    assert row["concept_accuracy"] == pytest.approx(0.85)
    assert row["concept_exact_accuracy"] == pytest.approx(0.7)
    assert row["prompt_accuracy"] == pytest.approx(0.93) and row["steps_per_second"] == pytest.approx(4.5)
    assert row["wall_seconds"] == 200.0 and row["by_seed"][1]["concept_accuracy"] == 0.75
    row.update(drift=0.03, passes=False)
    report = {"base": {"concept_accuracy": 0.0, "concept_exact_accuracy": 0.0, "prompt_accuracy": 0.96},
              "families": [row], "samples": {"concept": 40, "prompts": 72},
              "settings": dataclasses.asdict(settings)}  # fmt: skip
    table = quality.format_report(report)
    assert "seeds 0, 1 pooled" in table and table.splitlines()[-1].endswith("NO    95% / 75%")
    header, line = table.splitlines()[-2:]  # a million parameters stay in their own column
    assert "+3.0p  1,034,240" in line
    assert header.index("params") + len("params") == line.index("1,034,240") + len("1,034,240")


def _record_settings(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace `run_report` by a stub that records the settings `main` built and returns an empty report."""
    import training.quality as quality

    seen: list[quality.QualitySettings] = []

    def fake_report(families, *, out, settings, concept_count, prompt_count):
        seen.append(settings)
        return {"base": {"concept_accuracy": 0.0, "concept_exact_accuracy": 0.0, "prompt_accuracy": 1.0},
                "families": [], "samples": {"concept": 1, "prompts": 1},
                "settings": dataclasses.asdict(settings)}  # fmt: skip

    monkeypatch.setattr(quality, "run_report", fake_report)
    return seen


def test_cli_passes_family_hyperparameters_and_pair_renders_into_the_protocol(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--adapter-option` values are parsed as JSON and reach TrainConfig through the settings; they need one
    family, and a malformed one is refused before anything trains."""
    import training.quality as quality

    seen = _record_settings(monkeypatch)
    argv = ["--families", "hra", "--adapter-option", "r=16", "--adapter-option", "apply_gs=true"]
    assert quality.main([*argv, "--pair-images", "3", "--out", str(tmp_path)]) == 0
    (settings,) = seen
    assert settings.adapter_config == {"r": 16, "apply_gs": True} and settings.pair_images == 3
    assert settings.train_options()["adapter_config"] == {"r": 16, "apply_gs": True}
    for bad in (["--adapter-option", "r=16"], ["--families", "hra", "--adapter-option", "r"]):
        with pytest.raises(SystemExit) as error:
            quality.main(bad)
        assert error.value.code == 2
    assert len(seen) == 1
    argv = ["--families", "hra", "--prior-loss-weight", "1.5", "--class-images", "3", "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    assert seen[-1].prior_loss_weight == 1.5 and settings.prior_loss_weight is None
    assert seen[-1].regularisation_images == 3 and settings.regularisation_images == 64
    settings = seen[-1]
    options = quality.prior_options(tmp_path, settings)
    assert options["prior_loss_weight"] == 1.5 and options["num_class_images"] == 3
    assert len(list(Path(options["class_data_dir"]).glob("*.png"))) == 3
    assert quality.prior_options(tmp_path, dataclasses.replace(settings, prior=False)) == {}


def test_train_option_reaches_the_protocol_and_unknown_keys_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--train-option` values (JSON) override the protocol's TrainConfig options; a key TrainConfig does not
    have is refused with exit 2 before anything trains."""
    import training.quality as quality

    seen = _record_settings(monkeypatch)
    options = ["--train-option", "adam_weight_decay=0", "--train-option", "random_flip=true"]
    assert quality.main(["--families", "hra", *options, "--out", str(tmp_path)]) == 0
    options = seen[-1].train_options()
    assert options["adam_weight_decay"] == 0 and options["random_flip"] is True
    assert options["train_batch_size"] == quality.QualitySettings.batch_size  # the protocol's own stay
    with pytest.raises(SystemExit) as error:
        quality.main(["--families", "hra", "--train-option", "warmup=100"])
    assert error.value.code == 2 and len(seen) == 1
    assert quality.unknown_options({"warmup": 1, "seed": 2, "a": 3}) == ["a", "warmup"]


def test_trigger_option_reaches_captions_prompts_and_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--trigger` (default: the subject's own name) is the word of the subject captions, the trigger prompts
    and the TrainConfig; a word the base world uses is refused (exit 2) before anything trains."""
    import training.quality as quality

    folder = write_subject_images(tmp_path / "subject", count=3, subject="purple", trigger="purple")
    captions = [p.read_text(encoding="utf-8").split() for p in sorted(folder.glob("*.txt"))]
    assert all("purple" in words and TRIGGER not in words for words in captions)
    assert "blue" in quality.base_world_words() and "purple" not in quality.base_world_words()

    prompts: list[str] = []

    def fake_sample(pipe: object, texts: list[str], seeds: list[int]) -> list[Image.Image]:
        prompts.extend(texts)
        return [Image.new("RGB", (32, 32), "white") for _ in texts]

    monkeypatch.setattr(quality, "sample", fake_sample)
    assert quality.concept_scores(None, concept_cases(3, "purple"), "purple", trigger="purple") == (0.0, 0.0)
    assert len(prompts) == 3 and all(text.split()[1] == "purple" for text in prompts), prompts

    seen = _record_settings(monkeypatch)
    assert quality.main(["--families", "hra", "--out", str(tmp_path)]) == 0
    assert seen[-1].trigger is None and seen[-1].trigger_word == "purple"  # the subject's own name
    assert quality.main(["--families", "hra", "--trigger", "zwx", "--out", str(tmp_path)]) == 0
    assert seen[-1].trigger_word == "zwx"
    configs: list[quality.TrainConfig] = []

    class Stop(Exception):
        pass

    def fake_train(config: quality.TrainConfig) -> None:
        configs.append(config)
        raise Stop

    monkeypatch.setattr(quality, "train", fake_train)
    with pytest.raises(Stop):
        quality._train_and_score("hra", "model", folder, tmp_path, 0, settings=seen[-1], cases=[], prompts=[],
                                 prior={})  # fmt: skip
    (config,) = configs
    assert config.trigger_phrase == "zwx" and config.instance_prompt.split()[1] == "zwx"
    with pytest.raises(SystemExit) as error:
        quality.main(["--trigger", "blue"])
    assert error.value.code == 2 and len(seen) == 2
