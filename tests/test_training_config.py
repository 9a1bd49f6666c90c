"""TrainConfig validation, config files and the CLI flag mapping (no model needed)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from models.profiles import TOYWORLD
from training.cli import build_parser, config_from_args
from training.config import ConfigError, TrainConfig, read_config_file
from training.defaults import apply_profile


def _toy(**options: object) -> TrainConfig:
    return apply_profile(TrainConfig(**options), TOYWORLD, cuda=False)


def test_defaults_resolve_per_family() -> None:
    for family, defaults in TOYWORLD.families.items():
        config = _toy(adapter=family)
        assert (config.max_train_steps, config.learning_rate) == (
            defaults.max_train_steps,
            defaults.learning_rate,
        )
    explicit = _toy(adapter="hra", max_train_steps=7, learning_rate=2e-4)
    assert (explicit.max_train_steps, explicit.learning_rate) == (7, 2e-4)
    assert _toy(adapter="boft").snr == 5.0 and _toy(adapter="lora").snr is None
    assert _toy(adapter="boft", snr_gamma=0.0).snr is None  # 0 turns the family default off
    assert _toy(adapter="lora", snr_gamma=3.0).snr == 3.0
    assert _toy(adapter="hra").offset == 0.075 and _toy(adapter="lora").offset == 0.0
    assert _toy(adapter="hra").prior_loss_weight == 1.5 and _toy(adapter="lora").prior_loss_weight == 1.0
    assert _toy(adapter="hra", prior_loss_weight=1.0).prior_loss_weight == 1.0
    assert _toy(adapter="hra", noise_offset=0.0).offset == 0.0  # 0 turns the family default off
    assert _toy(adapter="lora", noise_offset=0.1).offset == 0.1
    assert TrainConfig(instance_prompt="a sks dog").trigger == "a sks dog"
    assert TrainConfig(instance_prompt="a sks dog", trigger_phrase="sks dog").trigger == "sks dog"
    assert TrainConfig(output_dir="o").class_dir == Path("o/class_images")


def test_validate_lists_every_problem() -> None:
    config = TrainConfig(
        resolution=30,
        train_batch_size=0,
        learning_rate=-1.0,
        lr_scheduler="sometimes",
        mixed_precision="fp8",
        with_prior_preservation=True,
        snr_gamma=-1.0,
        noise_offset=-0.1,
        prior_loss_weight=-1.0,
        adam_beta1=1.5,
        checkpoints_total_limit=0,
        lr_warmup_steps=50,
        max_train_steps=40,
    )
    with pytest.raises(ConfigError) as info:
        config.validate()
    message = str(info.value)
    for expected in [
        "--instance_data_dir is required",
        "--instance_prompt is required",
        "--resolution 30 must be a positive multiple of 8",
        "--train_batch_size must be >= 1 (got 0)",
        "--learning_rate must be a positive number (got -1.0)",
        "--lr_scheduler 'sometimes' is unknown",
        "--mixed_precision 'fp8' is unknown",
        "--with_prior_preservation needs --class_prompt",
        "--snr_gamma must be >= 0",
        "--noise_offset must be >= 0",
        "--prior_loss_weight must be >= 0 (got -1.0)",
        "--adam_beta1 must be in [0, 1)",
        "--checkpoints_total_limit must be >= 1",
        "--lr_warmup_steps 50 must be below --max_train_steps 40",
    ]:
        assert expected in message, expected
    good = TrainConfig(instance_data_dir="x", instance_prompt="a sks dog")
    assert good.validate() is good
    silent = TrainConfig(instance_data_dir="x", instance_prompt="a sks dog", lr_warmup_steps=100)
    with pytest.raises(ConfigError, match="--lr_warmup_steps 100 has no effect with --lr_scheduler constant"):
        silent.validate()
    warm = dataclasses.replace(silent, lr_scheduler="constant_with_warmup")
    assert warm.validate() is warm


def test_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="unknown training option.*learning_rat\\b"):
        TrainConfig.from_dict({"learning_rat": 1e-4})
    config = TrainConfig.from_dict({"adapter": "boft", "max_train_steps": 3})
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_config_files(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"adapter": "krona", "seed": 3}))
    (tmp_path / "c.yaml").write_text("adapter: hra\nadapter_config:\n  r: 4\n")
    assert read_config_file(tmp_path / "c.json") == {"adapter": "krona", "seed": 3}
    assert TrainConfig.from_file(tmp_path / "c.yaml").adapter_config == {"r": 4}
    (tmp_path / "bad.yaml").write_text("adapter: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_config_file(tmp_path / "list.json")
    (tmp_path / "c.toml").write_text("a = 1")
    with pytest.raises(ConfigError, match=r"must end in \.json, \.yaml or \.yml"):
        read_config_file(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="not found"):
        read_config_file(tmp_path / "missing.json")


def test_cli_flags_map_to_config(tmp_path: Path) -> None:
    config = config_from_args(
        [
            "--instance_data_dir", "a.png", "b.png",
            "--instance_prompt", "a photo of sks star",
            "--adapter", "lora",
            "--lora_rank", "8",
            "--lora_alpha", "16",
            "--targets", "attn2.to_v", "attn2.to_out.0",
            "--max_train_steps", "12",
            "--learning_rate", "3e-4",
            "--with_prior_preservation",
            "--class_prompt", "a star",
            "--resume_from_checkpoint", "latest",
            "--no-cache_latents",
            "--snr_gamma", "5",
        ]
    )  # fmt: skip
    assert config.instance_data_dir == ["a.png", "b.png"]
    assert config.targets == ["attn2.to_v", "attn2.to_out.0"]
    assert config.adapter_config == {"rank": 8, "alpha": 16.0}
    assert (config.max_train_steps, config.learning_rate, config.snr_gamma) == (12, 3e-4, 5.0)
    assert config.with_prior_preservation and not config.cache_latents
    assert config.resume_from_checkpoint == "latest"
    single = config_from_args(["--instance_data_dir", "photos", "--targets", "qkvo"])
    assert single.instance_data_dir == "photos" and single.targets == "qkvo"
    dict_flag = config_from_args(["--lora_rank_pattern", '{"down_blocks.0.attentions.0.x": 2}'])
    assert dict_flag.adapter_config == {"rank_pattern": {"down_blocks.0.attentions.0.x": 2}}


def test_config_file_then_flags_precedence(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("adapter: boft\nmax_train_steps: 50\nseed: 1\nadapter_config:\n  block_num: 4\n")
    config = config_from_args(["--config", str(path), "--seed", "9", "--boft_dropout", "0.1"])
    assert (config.adapter, config.max_train_steps, config.seed) == ("boft", 50, 9)
    assert config.adapter_config == {"block_num": 4, "dropout": 0.1}


def test_family_flag_for_another_family_is_refused() -> None:
    with pytest.raises(
        ConfigError, match="--boft_block_size belongs to the boft family, but --adapter is lora"
    ):
        config_from_args(["--boft_block_size", "4"])


def test_help_documents_family_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from models.profiles import PROFILES

    text = build_parser().format_help()
    for profile in PROFILES.values():
        assert f"{profile.name}: {profile.title}" in text
        for family, defaults in profile.families.items():
            assert f"{family:<6} lr {defaults.learning_rate:g}, {defaults.max_train_steps} steps" in text
    assert "offset noise 0.075, prior weight 1.5" in text  # HRA's toy-world loss options
    for flag in [
        "--pretrained_model_name_or_path",
        "--enable_xformers_memory_efficient_attention",
        "--use_8bit_adam",
        "--checkpoints_total_limit",
        "--report_to",
        "--lora_rank",
        "--krona_a1",
        "--boft_block_size",
        "--hra_r",
    ]:
        assert flag in text, flag
