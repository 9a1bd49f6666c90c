"""The toy world v2 subject report (`training.quality_v2`): its pictures, its judging and its wiring."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from models.adapters.files import load_adapter_file
from models.profiles import TOYWORLD
from models.toyworld.sampling import Case
from models.toyworld.v2.checks import read_background, shows
from models.toyworld.v2.train import ToyWorldV2TrainConfig, train
from models.toyworld.v2.world import Scene, SceneObject, concept_scene, render_scene
from training import quality_v2
from training.quality_v2 import (
    QualitySettings,
    run_report,
    subject_cases,
    subject_rate,
    write_subject_pictures,
)


@pytest.fixture(scope="module")
def tiny_v2_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A v2 pipeline folder trained for a step or two per stage: wiring only, it draws nothing."""
    root = tmp_path_factory.mktemp("v2")
    config = ToyWorldV2TrainConfig(
        out=root / "assets", work_dir=root / "work", clip_steps=1, clip_pretrain_steps=1,
        clip_text_pretrain_steps=1, clip_text_batch=4, vae_steps=1, unet_steps=1, clip_batch=4, vae_batch=2,
        unet_batch=2,
    )  # fmt: skip
    pipeline = train(config)
    assert pipeline is not None
    return pipeline


def test_the_subject_pictures_are_drawn_not_rendered_and_read_as_the_subject(tmp_path: Path) -> None:
    folder = write_subject_pictures(tmp_path / "subject", QualitySettings())
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"subject-{i}.png" for i in range(5)]  # no caption sidecars
    backgrounds = []
    for file in files:
        picture = Image.open(file)
        assert picture.size == (96, 96)  # not the world's 64 px
        assert shows(picture, colour="orange", shape="heart")
        backgrounds.append(read_background(picture))
    assert backgrounds == ["white", "black", "grey", "white", "black"]


def test_the_subject_rate_wants_shape_and_colour_both(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = QualitySettings(subject_shape="frame", subject_colour="teal")
    cases = subject_cases(settings, 4)
    assert [case.scene.caption() for case in cases[:3]] == [
        "a teal frame on a white background",
        "a teal frame on a black background",
        "a teal frame on a grey background",
    ]
    drawn = [
        render_scene(cases[0].scene),
        render_scene(concept_scene("frame", "blue", seed=1)),  # the shape alone
        render_scene(concept_scene("square", "teal", seed=2)),  # the colour alone
        render_scene(Scene((SceneObject("frame", "teal", "plain", (10, 10, 40)),), background="grey")),
    ]
    used: list[float] = []

    def fake_generate(pipe: object, asked: list[Case], guidance: float) -> list[Image.Image]:
        used.append(guidance)
        return drawn[: len(asked)]

    monkeypatch.setattr(quality_v2, "generate", fake_generate)
    assert subject_rate(None, cases, settings) == 0.5
    assert used == [TOYWORLD.generation.compose_guidance]  # the app's generation default
    assert subject_rate(None, cases, dataclasses.replace(settings, guidance=9.0)) == 0.5
    assert used[-1] == 9.0


def test_the_report_trains_each_family_once_per_seed_with_the_apps_prompt(
    tiny_v2_pipeline: Path, tmp_path: Path
) -> None:
    settings = QualitySettings(steps=2, train_seeds=(0, 1))
    report = run_report(["lora"], str(tiny_v2_pipeline), tmp_path, settings, subject_count=2, prompt_count=2)
    (row,) = report["families"]
    assert [run["seed"] for run in row["runs"]] == [0, 1]
    for run in row["runs"]:
        assert run["steps"] == 2
        assert 0 <= run["subject_rate"] <= 1 and 0 <= run["prompt_accuracy"] <= 1
        assert set(run["prompt_checks"]) == {"colour", "shape", "background"}
        assert run["prompt_accuracy"] <= min(run["prompt_checks"].values())
        assert run["drift"] == pytest.approx(report["base"]["prompt_accuracy"] - run["prompt_accuracy"])
        assert Path(run["adapter"]).is_relative_to(tmp_path / "lora" / f"seed-{run['seed']}")
        adapter = load_adapter_file(run["adapter"])
        assert adapter.trigger_phrase == "orange heart"
    assert row["passes"] == all(r["subject_rate"] >= 0.8 and r["drift"] <= 0.05 for r in row["runs"])
    text = quality_v2.format_report(report)
    assert "orange heart" in text and "'a photo of {trigger}'" in text
    assert f"guidance {TOYWORLD.generation.compose_guidance:g}" in text


def test_the_drift_prompts_hold_no_held_out_word() -> None:
    for case in quality_v2.drift_cases(72):
        assert not {"orange", "teal", "heart", "frame", "checkered"} & set(case.scene.caption().split())
    assert isinstance(quality_v2.drift_cases(2)[0], Case)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--base-model", "nowhere"], "not a diffusers pipeline folder"),
        (["--base-model", ".", "--subject-colour", "magenta"], "invalid choice"),
        (
            ["--base-model", ".", "--subject-colour", "red", "--subject-shape", "square"],
            "all base-world words",
        ),
        (["--base-model", ".", "--instance-prompt", "a photo"], "must contain {trigger}"),
        (["--base-model", ".", "--adapter-option", "r=4"], "name that family alone"),
        (
            ["--base-model", ".", "--families", "lora", "--adapter-option", "r=4"],
            "--adapter-option: lora has no hyperparameter(s) r; known: alpha",
        ),
        (["--base-model", ".", "--families", "lora", "--adapter-option", "rank=0"], "lora rank must be"),
        (["--base-model", ".", "--train-option", "nonsense=1"], "not a TrainConfig option"),
        (["--base-model", ".", "--guidance", "0.5"], "guidance 0.5: give a scale >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:
        quality_v2.main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_held_out_texture_subject_is_drawn_checkered_and_judged_by_its_texture_too(tmp_path: Path) -> None:
    settings = QualitySettings(subject_shape="square", subject_colour="red", subject_texture="checkered")
    assert settings.trigger == "red checkered square"
    for file in sorted(write_subject_pictures(tmp_path, settings).iterdir()):
        assert settings.shown_in(Image.open(file))
    plain = render_scene(concept_scene("square", "red", "plain", seed=3))
    assert shows(plain, colour="red", shape="square") and not settings.shown_in(plain)
    with pytest.raises(ValueError, match="all base-world words"):
        QualitySettings(subject_shape="square", subject_colour="red")


def test_the_report_table_keeps_a_million_parameters_apart_from_the_drift() -> None:
    run = {
        "seed": 0, "subject_rate": 0.875, "prompt_accuracy": 0.958, "drift": 0.042, "trainable_parameters": 1_034_240,
        "file_bytes": 4_188_467, "steps": 800, "steps_per_second": 4.44, "wall_seconds": 189.0,
        "prompt_checks": {"colour": 1.0, "shape": 0.958, "background": 1.0},
    }  # fmt: skip
    report = {
        "settings": dataclasses.asdict(QualitySettings()),
        "samples": {"subject": 24, "prompts": 24},
        "base": {"subject_rate": 0.0, "prompt_accuracy": 1.0, "prompt_checks": run["prompt_checks"]},
        "families": [
            {"family": "lora", "runs": [run], "subject_rate": 0.875, "worst_subject_rate": 0.875,
             "worst_drift": 0.042, "passes": True},
        ],
    }  # fmt: skip
    header, row = quality_v2.format_report(report).splitlines()[2:4]
    assert row.split()[:9] == ["lora", "0", "88%", "95.8%", "+4.2p", "1,034,240", "4090.3", "800", "4.44"]
    assert header.index("params") + len("params") == row.index("1,034,240") + len("1,034,240")
