"""Base-model profiles: which profile each model gets, and that a run uses its values and no other's.

Tiny SD 1.x / SDXL pipelines saved as diffusers folders stand for real Stable Diffusion models, the shipped
toy world for itself. A run's resolved options are read back from its model card, its ``train_log.jsonl``
header and ``--show-defaults``, and compared with the profile's values and with the app's fields.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from models.pipelines import default_base_model, load_pipeline
from models.profiles import (
    PROFILES,
    SD1,
    SD2,
    SDXL,
    TOYWORLD,
    ProfileError,
    get_profile,
    profile_for_pipeline,
    profile_for_spec,
    traits_of_folder,
)
from models.toyworld.world import Scene, SceneObject, render_scene
from training.cli import show_defaults
from training.config import TrainConfig
from training.defaults import FAMILY_OPTIONS, PROFILE_OPTIONS, option_text
from training.dreambooth import main
from training.model_card import read_profile_table
from training.train_log import read_log_header


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("subject")
    for k, colour in enumerate(["red", "blue", "green"]):
        render_scene(Scene((SceneObject("heart", colour),))).save(folder / f"{k}.png")
    return folder


def _edit_json(path: Path, **changes: Any) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_each_model_gets_its_profile(tiny_sd_path: Path, tiny_sdxl_path: Path, tmp_path: Path) -> None:
    toy = default_base_model()
    assert toy is not None
    # from the config files alone, and from the loaded pipeline: the same answer
    for folder, expected in ((tiny_sd_path, SD1), (tiny_sdxl_path, SDXL), (toy, TOYWORLD)):
        assert profile_for_spec(folder) is expected
        assert profile_for_pipeline(load_pipeline(folder, device="cpu", dtype="fp32")) is expected
    assert profile_for_spec(None) is TOYWORLD
    # an SD 2.x-v model: OpenCLIP's gelu text encoder, v-prediction, 768 px native
    v_model = tmp_path / "sd2v"
    shutil.copytree(tiny_sd_path, v_model)
    _edit_json(v_model / "text_encoder" / "config.json", hidden_act="gelu")
    _edit_json(v_model / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    traits = traits_of_folder(v_model)
    assert (traits.architecture, traits.prediction_type) == ("sd2", "v_prediction")
    assert profile_for_spec(v_model) is SD2
    # a copy of the toy world keeps its profile through the marker file; the tiny SD copy does not have one
    copy = tmp_path / "toy-copy"
    shutil.copytree(toy, copy)
    assert profile_for_spec(copy) is TOYWORLD
    (copy / "atelier_profile.json").unlink()
    assert profile_for_spec(copy) is SD1  # the toy world is an SD 1.x-architecture model
    # forcing
    assert profile_for_spec(tiny_sd_path, "toyworld") is TOYWORLD
    with pytest.raises(ProfileError, match="choose one of toyworld, sd1, sd2, sdxl"):
        get_profile("sd3")


def test_every_stable_diffusion_value_cites_a_source_and_every_option_exists() -> None:
    from composition.methods import method_options
    from models.adapters import FAMILIES

    for profile in PROFILES.values():
        assert set(profile.families) == set(FAMILIES), profile.name
        for family, defaults in profile.families.items():
            assert any(ch.isdigit() for ch in defaults.source), (profile.name, family)
            expected = "docs/training_quality.md" if profile is TOYWORLD else "lr "
            assert expected in defaults.source, (profile.name, family)
        assert profile.gpu.source and profile.generation.source
        for method, options in profile.generation.method_options.items():
            assert set(options) <= set(method_options(method)), (profile.name, method)
    # the SD profiles share no training value with the toy world's tuning
    for profile in (SD1, SD2, SDXL):
        for family in FAMILIES:
            toy, sd = TOYWORLD.family(family), profile.family(family)
            assert (sd.learning_rate, sd.max_train_steps) != (toy.learning_rate, toy.max_train_steps)
            assert (sd.snr_gamma, sd.noise_offset, sd.prior_loss_weight) == (None, 0.0, 1.0)
        assert profile.method_options("clora") != TOYWORLD.method_options("clora")


def test_a_new_family_gets_the_fallback_defaults() -> None:
    assert SD1.family("a-family-registered-later") is SD1.families["lora"]


def _card_values(out: Path) -> dict[str, tuple[str, str]]:
    return read_profile_table((out / "README.md").read_text())


def _args(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
        "--instance_prompt", "a photo of sks heart", "--output_dir", str(out), "--max_train_steps", "1",
        "--seed", "3", "--num_inference_steps", "1", "--num_validation_images", "1", "--adapter", "hra", *extra,
    ]  # fmt: skip


def test_a_run_on_an_sd_model_uses_the_sd_profile_and_no_toy_value(
    tiny_sd_path: Path, subject_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """HRA is the family whose toy-world tuning departs most from SD's (lr 1e-2, offset noise, prior weight
    1.5); on a tiny SD 1.x model the card, the log header and --show-defaults all give SD 1.x's values."""
    out = tmp_path / "run"
    assert main(_args(tiny_sd_path, subject_dir, out)) == 0
    card = _card_values(out)
    header = read_log_header(out / "train_log.jsonl")
    assert header["profile"] == "sd1" and "## Base-model profile: `sd1`" in (out / "README.md").read_text()
    sd, toy = SD1.family("hra"), TOYWORLD.family("hra")
    assert set(card) == set(PROFILE_OPTIONS) == set(header["options"])
    for name in FAMILY_OPTIONS:
        if name == "max_train_steps":
            assert card[name] == ("1", "given")
            continue
        expected = getattr(sd, name)
        expected = 0.0 if name == "snr_gamma" and expected is None else expected
        assert card[name] == (option_text(expected), "profile sd1"), name
        assert header["options"][name] == {"value": expected, "from": "profile sd1"}, name
        if getattr(toy, name) != getattr(sd, name):
            assert card[name][0] != option_text(getattr(toy, name)), name
    assert card["mixed_precision"] == ("no", "CPU run (profile sd1 on a GPU: fp16)")
    assert card["resolution"] == ("32", "model's native size")
    # --show-defaults prints the same values, without training
    capsys.readouterr()
    assert main([*_args(tiny_sd_path, subject_dir, tmp_path / "unused"), "--show-defaults"]) == 0
    shown = capsys.readouterr().out
    assert "profile: sd1" in shown and not (tmp_path / "unused").exists()
    for name, (value, origin) in card.items():
        line = next(line for line in shown.splitlines() if line.startswith(name + " "))
        assert f" {value} " in line and line.endswith(f"({origin})"), name


def test_explicit_flags_win_and_profile_forces(tiny_sd_path: Path, subject_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "given"
    assert main(_args(tiny_sd_path, subject_dir, out, "--learning_rate", "3e-4", "--targets", "vo")) == 0
    card = _card_values(out)
    assert card["learning_rate"] == ("0.0003", "given") and card["targets"] == ("vo", "given")
    assert card["noise_offset"] == ("0.0", "profile sd1")
    forced = tmp_path / "forced"
    assert main(_args(tiny_sd_path, subject_dir, forced, "--profile", "toyworld")) == 0
    card = _card_values(forced)
    toy = TOYWORLD.family("hra")
    assert card["learning_rate"] == (str(toy.learning_rate), "profile toyworld")
    assert card["noise_offset"] == (str(toy.noise_offset), "profile toyworld")
    assert card["prior_loss_weight"] == (str(toy.prior_loss_weight), "profile toyworld")
    assert read_log_header(forced / "train_log.jsonl")["profile"] == "toyworld"


def test_show_defaults_for_sdxl_and_the_toy_world(tiny_sdxl_path: Path) -> None:
    shown = show_defaults(TrainConfig(pretrained_model_name_or_path=str(tiny_sdxl_path), adapter="krona"))
    krona = SDXL.family("krona")
    assert "profile: sdxl" in shown
    for name in ("learning_rate", "max_train_steps", "gradient_accumulation_steps", "targets"):
        line = next(line for line in shown.splitlines() if line.startswith(name + " "))
        assert str(getattr(krona, name)) in line and "(profile sdxl)" in line, name
    toy = show_defaults(TrainConfig(adapter="boft"))
    assert "profile: toyworld" in toy
    assert next(line for line in toy.splitlines() if line.startswith("snr_gamma ")).split()[1] == "5.0"


def test_the_app_fields_agree_with_the_profile(tiny_sd_path: Path, tmp_path: Path) -> None:
    from app.method_form import option_defaults
    from app.studio import Settings, Studio
    from app.tabs.train import PROFILE_FIELDS, profile_defaults

    studio = Studio(Settings(data_dir=tmp_path, base_model=str(tiny_sd_path), device="cpu"), start=False)
    try:
        for family in SD1.families:
            fields = profile_defaults(studio, None, family)
            assert "`sd1`" in fields["text"]
            assert {n: fields[n] for n in PROFILE_FIELDS} == {
                n: getattr(SD1.family(family), n) for n in PROFILE_FIELDS
            }
        assert profile_defaults(studio, "", "lora")["learning_rate"] == SD1.family("lora").learning_rate
        toy = profile_defaults(studio, str(default_base_model()), "hra")
        assert "`toyworld`" in toy["text"] and toy["learning_rate"] == TOYWORLD.family("hra").learning_rate
        assert "rare token" in fields["guidance"].trigger and "`toyworld`" not in fields["text"]
        assert "own name" in toy["guidance"].trigger and toy["guidance"].class_placeholder == "heart"
        # the trigger field's prefill: DreamBooth's 'sks' on SD, empty (the concept's own name asked) on the toy world
        assert (fields["guidance"].default_trigger, toy["guidance"].default_trigger) == ("sks", "")
        assert all(p.hints.trigger_placeholder for p in PROFILES.values())
        shown = option_defaults("cmlora", studio.profile())
        assert {k: shown[k] for k in SD1.method_options("cmlora")} == SD1.method_options("cmlora")
        assert option_defaults("clora", TOYWORLD)["preset"] == "partition"
    finally:
        studio.close()


def test_composition_cli_uses_the_profile(tiny_sd_path: Path, tiny_sd_pipe: Any, tmp_path: Path) -> None:
    from composition.__main__ import main as compose
    from tests.test_composition_cli import _lora_file

    star = _lora_file(tiny_sd_pipe, 1, "zq star", tmp_path)
    heart = _lora_file(tiny_sd_pipe, 2, "vx heart", tmp_path)
    common = [
        "--base-model", str(tiny_sd_path), "--adapter", str(star), "--adapter", str(heart),
        "--prompt", "a zq star and a vx heart", "--clip-model", "none", "--device", "cpu", "--method", "cmlora",
    ]  # fmt: skip
    assert compose([*common, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["profile"] == "sd1" and report["guidance"] == SD1.generation.compose_guidance
    assert report["methods"]["cmlora"]["options"] == SD1.method_options("cmlora")
    from composition.methods.cmlora import DEFAULT_PRESET, resolve_options

    chosen = SD1.method_options("cmlora")
    expected = resolve_options(chosen.pop("preset", DEFAULT_PRESET), chosen).cache_interval
    assert report["methods"]["cmlora"]["images"][0]["extras"]["cache_interval"] == expected
    given = [
        "--steps",
        "2",
        "--option",
        "cache_interval=1",
        "--profile",
        "toyworld",
        "--out",
        str(tmp_path / "b"),
    ]
    assert compose([*common, *given]) == 0
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["profile"] == "toyworld" and report["guidance"] == TOYWORLD.generation.compose_guidance
    assert report["methods"]["cmlora"]["options"] == {"cache_interval": 1}
