"""The composition quality report's pixel verdicts on true renders (fast): a region passes only with every
expected attribute, and the table shows each concept's own rate beside the all-present rate."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from PIL import Image

from composition.errors import CompositionError
from composition.quality import SETUPS, format_table, passes, region_passes
from models.toyworld.world import HELD_OUT, Scene, SceneObject, render_scene

EXPECT = SETUPS[0].expect  # left: purple, right: heart


def scene(left: tuple[str, str], right: tuple[str, str]) -> Scene:
    return Scene(
        (SceneObject(left[0], left[1], box=(2, 8, 12)), SceneObject(right[0], right[1], box=(18, 8, 12)))
    )


def test_both_concepts_in_their_regions_pass() -> None:
    image = render_scene(scene(("square", "purple"), ("heart", "blue")))
    assert passes(image, EXPECT)


def test_a_missing_or_swapped_concept_fails_its_region_only() -> None:
    no_heart = render_scene(scene(("square", "purple"), ("circle", "blue")))
    assert region_passes(no_heart, "left", EXPECT["left"])
    assert not region_passes(no_heart, "right", EXPECT["right"])
    assert not passes(no_heart, EXPECT)
    swapped = render_scene(scene(("heart", "blue"), ("square", "purple")))
    assert not region_passes(swapped, "left", EXPECT["left"])
    assert not region_passes(swapped, "right", EXPECT["right"])


def test_table_lists_per_concept_rates() -> None:
    row = {"all_present": 0.25, "all_present_95ci": [0.1, 0.45], "left_present": 0.5, "right_present": 0.75,
           "concept_min_clipscore": None, "clipscore": 0.5, "unet_evals": 60, "wall_s": 1.0}  # fmt: skip
    table = format_table({"setups": {"N=2 x": {"methods": {"cmlora": row}}}})
    line = table.splitlines()[1]
    assert line.split()[3:8] == ["25.0%", "10-45%", "50%", "75%", "n/a"]
    del row["all_present_95ci"]  # a report written before the interval existed
    line = format_table({"setups": {"N=2 x": {"methods": {"cmlora": row}}}}).splitlines()[1]
    assert line.split()[3:8] == ["25.0%", "n/a", "50%", "75%", "n/a"]


def test_clora_and_cmlora_options_reach_their_method_only(monkeypatch, tmp_path) -> None:
    import composition.quality as quality

    calls: list[tuple[str, dict]] = []

    class Bank:
        def __init__(self, pipe, paths) -> None:
            pass

        def close(self) -> None:
            pass

    def fake_generate(method, pipe, bank, prompt, steps, guidance, seed, **options):
        calls.append((method, options))
        raise StopIteration  # the options are all this test needs

    monkeypatch.setattr(quality, "AdapterBank", Bank)
    monkeypatch.setattr(quality, "generate", fake_generate)
    monkeypatch.setattr(quality.ConceptPrompt, "build", staticmethod(lambda *a, **k: None))
    options = quality.parse_options(["step_size=1", "refine_rounds=0"])
    cached = quality.parse_options(["cache_interval=8"])
    for method in ("clora", "cmlora", "composite"):
        with contextlib.suppress(StopIteration):
            quality.evaluate_setup(
                None,
                SETUPS[0],
                [],
                1,
                2,
                [method],
                None,
                {"clora": {"preset": "light", **options}, "cmlora": cached},
            )
    assert calls == [
        ("clora", {"preset": "light", "step_size": 1, "refine_rounds": 0}),
        ("cmlora", {"cache_interval": 8}),
        ("composite", {}),
    ]
    with pytest.raises(CompositionError, match="--clora-option 'step_size': expected KEY=VALUE"):
        quality.main(["--clora-option", "step_size"])
    with pytest.raises(CompositionError, match="step_sise"):
        quality.main(["--clora-option", "step_sise=1"])
    with pytest.raises(CompositionError, match="cache_intervall"):
        quality.main(["--cmlora-option", "cache_intervall=8"])


def test_every_setup_binds_each_adapter_to_its_concept_and_the_word_it_qualifies() -> None:
    """CLoRA's masks come from the bound tokens: each phrase holds its concept word, sits in the prompt, and
    tokenizes there as on its own (so the masks follow the object, not only the new word)."""
    from types import SimpleNamespace

    from transformers import CLIPTokenizer

    from composition.prompt import ConceptPrompt
    from models.toyworld.paths import TOYWORLD_PIPELINE

    tokenizer = CLIPTokenizer.from_pretrained(Path(TOYWORLD_PIPELINE) / "tokenizer")
    for setup in SETUPS:
        assert len(setup.phrases) == len(setup.adapters)
        prompt = ConceptPrompt.build(setup.prompt, setup.phrases)
        ids = tokenizer(setup.prompt).input_ids
        for (concept, _), phrase, positions in zip(
            setup.adapters,
            setup.phrases,
            prompt.token_indices(SimpleNamespace(tokenizer=tokenizer)),
            strict=True,
        ):
            assert concept in phrase.split()
            assert tokenizer.decode([ids[p] for p in positions]).strip() == phrase
    assert SETUPS[0].phrases == ("purple square", "blue heart")


def test_each_adapter_prompt_names_only_its_own_held_out_concept() -> None:
    """With the setups' plain forms, adapter k's prompt (`branch_text`) holds its own concept word and no other
    held-out word, and the base branch holds none: every other concept reads as a base-world phrase."""
    from composition.prompt import ConceptPrompt

    held_out = {word for words in HELD_OUT.values() for word in words}
    for setup in SETUPS:
        prompt = ConceptPrompt.build(setup.prompt, setup.phrases, plains=setup.plains)
        assert not held_out & set(prompt.branch_text(None).split()), setup.name
        for index, (concept, _) in enumerate(setup.adapters):
            assert held_out & set(prompt.branch_text(index).split()) == {concept}, (setup.name, concept)


def _record_training(monkeypatch) -> list:  # type: ignore[no-untyped-def]
    """Replace `training.dreambooth.train` by a stub that records each config and writes a dummy adapter."""
    import training.dreambooth

    configs = []

    def fake_train(config):  # type: ignore[no-untyped-def]
        configs.append(config)
        adapter = Path(config.output_dir) / "adapter.safetensors"
        adapter.parent.mkdir(parents=True)
        adapter.write_bytes(b"x")
        return type("Result", (), {"adapter_path": adapter})()

    monkeypatch.setattr(training.dreambooth, "train", fake_train)
    return configs


def test_concept_adapters_train_under_the_training_quality_protocol_with_their_own_word(
    monkeypatch, tmp_path
) -> None:
    """Subject renders captioned with the concept's own word (the composition prompts name it), the
    protocol's batch and prior preservation on captioned base-world renders; a finished adapter is reused."""
    from composition.quality import train_adapter
    from models.toyworld.checks import read_object
    from training.quality import QualitySettings

    configs = _record_training(monkeypatch)
    path = train_adapter("purple", "boft", tmp_path, None, 5)
    assert path == tmp_path / "purple-boft" / "run" / "adapter.safetensors"
    (config,) = configs
    assert (config.adapter, config.trigger_phrase, config.max_train_steps) == ("boft", "purple", 5)
    assert config.train_batch_size == QualitySettings().batch_size and config.with_prior_preservation
    captions = sorted(Path(config.instance_data_dir).glob("*.txt"))
    assert len(captions) == 5 and all("purple" in c.read_text() for c in captions)
    for caption in captions:
        assert read_object(Image.open(caption.with_suffix(".png"))).colour == "purple"
    regularisation = sorted(Path(config.class_data_dir).glob("*.txt"))
    assert len(regularisation) == QualitySettings().regularisation_images
    held_out = [word for words in HELD_OUT.values() for word in words]
    assert not any(word in c.read_text().split() for c in regularisation for word in held_out)
    assert train_adapter("purple", "boft", tmp_path, None, 5) == path and len(configs) == 1


def test_shape_adapters_train_every_transformer_linear_for_longer(monkeypatch, tmp_path) -> None:
    """Held-out shapes get `SHAPE_TRAINING` (all-linear targets, its steps, two-object renders beside the
    single ones) in their own folder; colours keep `vo`, the family's steps and single renders; an explicit
    step count wins over both."""
    from composition.quality import SHAPE_TRAINING, train_adapter
    from models.toyworld.checks import read_object

    configs = _record_training(monkeypatch)
    heart = train_adapter("heart", "hra", tmp_path, None, None)
    colour = train_adapter("purple", "hra", tmp_path, None, None)
    train_adapter("star", "lora", tmp_path, None, 7)
    pairs = SHAPE_TRAINING["pair_images"]
    assert heart == tmp_path / f"heart-hra-all-linear-pairs{pairs}" / "run" / "adapter.safetensors"
    assert colour == tmp_path / "purple-hra" / "run" / "adapter.safetensors"
    (h, c, s) = configs
    assert (h.targets, h.max_train_steps) == ("all-linear", SHAPE_TRAINING["steps"])
    assert (c.targets, c.max_train_steps) == ("vo", None)
    assert (s.targets, s.max_train_steps) == ("all-linear", 7)
    assert read_object(Image.open(sorted(Path(h.instance_data_dir).glob("*.png"))[0])).shape == "heart"
    assert len(list(Path(h.instance_data_dir).glob("subject-pair-*.png"))) == pairs > 0
    assert not list(Path(c.instance_data_dir).glob("subject-pair-*.png"))


def test_plain_forms_swap_each_held_out_word_for_the_nearest_base_value_the_checks_read() -> None:
    """Purple is nearest blue in RGB (119 against red's 184); the heart's check template overlaps the
    circle's most and the star's the triangle's; base words stay."""
    import numpy as np

    from composition.quality import nearest_base_value, plain_form
    from models.toyworld.checks import shape_template
    from models.toyworld.world import BASE_COLOURS, BASE_SHAPES, COLOURS

    purple = np.array(COLOURS["purple"], dtype=np.float32)
    distances = {c: float(np.linalg.norm(purple - np.array(COLOURS[c], np.float32))) for c in BASE_COLOURS}
    assert min(distances, key=distances.__getitem__) == nearest_base_value("purple") == "blue"
    heart = shape_template("heart", 32, 32)
    ious = {
        s: (heart & shape_template(s, 32, 32)).sum() / (heart | shape_template(s, 32, 32)).sum()
        for s in BASE_SHAPES
    }
    assert max(ious, key=ious.__getitem__) == nearest_base_value("heart") == "circle"
    assert nearest_base_value("star") == "triangle"
    assert nearest_base_value("checkered") == "checkered" and nearest_base_value("red") == "red"
    assert plain_form("purple square") == "blue square" and plain_form("blue heart") == "blue circle"
    assert SETUPS[0].plains == ("blue square", "blue circle")
    assert SETUPS[2].plains == ("triangle", "blue circle", "blue")


def test_rates_and_their_interval_count_the_images_that_pass(monkeypatch) -> None:
    from types import SimpleNamespace

    import composition.quality as quality
    from evaluation.intervals import wilson_interval

    good = render_scene(scene(("square", "purple"), ("heart", "blue")))
    no_heart = render_scene(scene(("square", "purple"), ("circle", "blue")))
    images = [good, good, no_heart, good]  # seeds 0..3

    class Bank:
        def __init__(self, pipe, paths) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(quality, "AdapterBank", Bank)
    monkeypatch.setattr(
        quality,
        "generate",
        lambda method, *args, **kw: SimpleNamespace(
            images=[images[args[5]]], unet_evals=7, extras={"shallow_evals": 3}
        ),
    )
    monkeypatch.setattr(quality.ConceptPrompt, "build", staticmethod(lambda *a, **k: None))
    row = quality.evaluate_setup(None, SETUPS[0], [], 4, 2, ["composite"], None)["composite"]
    assert (row["all_present"], row["left_present"], row["right_present"]) == (0.75, 1.0, 0.75)
    assert row["all_present_95ci"] == list(wilson_interval(3, 4))
    assert (row["unet_evals"], row["shallow_evals"]) == (7, 3)  # full and cached rows apart
    assert row["noise_images"] == 0  # every image shows an object
    later = quality.evaluate_setup(None, SETUPS[0], [], 3, 2, ["composite"], None, first_seed=1)["composite"]
    assert later["all_present"] == pytest.approx(2 / 3)  # seeds 1, 2, 3
    for bad in (["--seeds", "0"], ["--first-seed", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            quality.main(bad)
        assert exit_info.value.code == 2


def test_committed_fixtures_cover_every_setup_and_are_used_without_training(monkeypatch, tmp_path) -> None:
    """Every (concept, family) of the report has a committed adapter of that family, bound to that concept's
    word and made for the toy world's UNet; with `fixtures` the report composes it and trains nothing."""
    from composition.quality import FIXTURES, train_adapter
    from models.adapters.files import load_adapter_file
    from models.pipelines import default_base_model, load_pipeline, unet_fingerprint

    configs = _record_training(monkeypatch)
    unet = load_pipeline(default_base_model(), device="cpu").unet
    for concept, family in {pair for setup in SETUPS for pair in setup.adapters}:
        path = train_adapter(concept, family, tmp_path, None, None, FIXTURES)
        assert path == FIXTURES / f"{concept}-{family}.safetensors"
        adapter = load_adapter_file(path)
        assert (adapter.family, adapter.trigger_phrase) == (family, concept)
        assert adapter.fingerprint == unet_fingerprint(unet)
    assert configs == []
    assert (
        train_adapter("purple", "krona", tmp_path, None, 5, FIXTURES).parent.name == "run"
    )  # no fixture: trains
