"""composition.attention_mass: per-token cross-attention shares on a real (tiny) SD 1.x pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from composition.attention_mass import HALVES, attention_mass, format_mass, main
from composition.attention_store import cross_attention_factors

PROMPT = "a red star on the left and a blue ring on the right"


def test_every_resolution_and_half_is_a_distribution_over_the_tokens(tiny_sd_pipe) -> None:
    labels, masses = attention_mass(tiny_sd_pipe, PROMPT, seeds=(0,), steps=2)
    factors = set(cross_attention_factors(tiny_sd_pipe.unet).values())
    assert set(masses) == {(factor, half) for factor in factors for half in HALVES}
    length = tiny_sd_pipe.tokenizer.model_max_length
    for mass in masses.values():
        assert mass.shape == (length,)
        assert float(mass.sum()) == pytest.approx(1.0, abs=1e-4)
        assert float(mass.min()) >= 0
    assert labels == [tiny_sd_pipe.tokenizer.decode([i]) for i in tiny_sd_pipe.tokenizer(PROMPT).input_ids]
    assert labels[0] == "<|startoftext|>" and labels[-1] == "<|endoftext|>"


def test_keys_that_ignore_the_text_spread_the_mass_evenly(tiny_sd_pipe) -> None:
    """Zero key projections make every score equal: each of the 77 positions then gets exactly 1/77."""
    for name, module in tiny_sd_pipe.unet.named_modules():
        if name.endswith("attn2"):
            torch.nn.init.zeros_(module.to_k.weight)
    _, masses = attention_mass(tiny_sd_pipe, PROMPT, seeds=(0,), steps=1)
    length = tiny_sd_pipe.tokenizer.model_max_length
    for mass in masses.values():
        assert torch.allclose(mass, torch.full((length,), 1 / length), atol=1e-6)


def test_the_unet_gets_its_own_processors_back(tiny_sd_pipe) -> None:
    before = {name: type(p) for name, p in tiny_sd_pipe.unet.attn_processors.items()}
    attention_mass(tiny_sd_pipe, PROMPT, seeds=(0,), steps=1)
    assert {name: type(p) for name, p in tiny_sd_pipe.unet.attn_processors.items()} == before


def test_the_table_names_each_token_and_the_padding(tiny_sd_pipe) -> None:
    labels, masses = attention_mass(tiny_sd_pipe, PROMPT, seeds=(0,), steps=1)
    lines = format_mass(labels, masses).splitlines()
    assert len(lines) == len(masses)
    assert all("star:" in line and "right:" in line and "| padding:" in line for line in lines)


def test_a_missing_model_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--pipeline", str(tmp_path / "nowhere"), "--prompt", PROMPT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
