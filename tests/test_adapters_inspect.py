"""The adapter inspector: effective rank and intruder dimensions on matrices with known answers, every family's
report on the tiny SD model (ranks the family's math implies), and the CLI's report, plots and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.adapters import attach
from models.adapters.files import load_adapter_file, save_adapter_file
from models.adapters.inspect import PLOTS, inspect_adapter, main, short_name
from models.adapters.spectra import effective_rank, intruder_dimensions, layer_spectrum
from tests.test_adapters import perturb

CONFIGS = {"lora": {"rank": 2}, "hra": {"r": 4}, "boft": {"block_num": 4}, "krona": {"a1": 8, "a2": 4}}


def test_effective_rank_of_known_spectra() -> None:
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert 1.0 < effective_rank(torch.tensor([1.0, 0.5, 0.1])) < 3.0
    assert effective_rank(torch.zeros(4)) == 0.0


def test_a_new_direction_is_an_intruder_and_a_rescaled_one_is_not() -> None:
    base = torch.diag(torch.linspace(2.0, 1.0, 16))  # singular vectors: the standard basis
    spread = torch.ones(16, 1) / 4.0  # unit vector with |cos| = 0.25 to every basis vector
    assert intruder_dimensions(base, base + 10 * spread @ spread.t()) == (1, 1)
    rescaled = base.clone()
    rescaled[3, 3] = 9.0  # an existing direction made dominant
    assert intruder_dimensions(base, rescaled) == (0, 0)
    assert intruder_dimensions(base, base + 10 * spread @ spread.t(), threshold=0.2) == (0, 0)


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_report_of_every_family_follows_its_math(family: str, tiny_sd_pipe, tmp_path: Path) -> None:
    unet = tiny_sd_pipe.unet
    handle = attach(unet, family, CONFIGS[family], "vo")
    perturb(handle)
    path = save_adapter_file(
        tmp_path / f"{family}.safetensors", handle, unet=unet, base_model_id="tiny", trigger_phrase="sks",
        train_steps=1,
    )  # fmt: skip
    handle.detach()
    adapter = load_adapter_file(path)
    report = inspect_adapter(adapter, pipe=tiny_sd_pipe, images=0)
    assert [layer["name"] for layer in report["layers"]] == adapter.targets
    assert report["trainable_parameters"] == sum(t.numel() for t in adapter.tensors.values())
    assert sum(layer["bytes"] for layer in report["layers"]) < report["file_bytes"]
    for layer in report["layers"]:
        assert layer["delta_norm"] > 0 and 0 < layer["relative_delta_norm"] < 10
        ranks = {"lora": 2, "hra": 4}
        if family in ranks:
            assert (
                layer["numerical_rank"] == ranks[family] and layer["effective_rank"] <= ranks[family] + 1e-6
            )
        if family == "krona":  # rank(A ⊗ B) = rank(A)·rank(B) = 4 · min(b1, b2)
            b1, b2 = layer["shape"][0] // 8, layer["shape"][1] // 4
            assert layer["numerical_rank"] == 4 * min(b1, b2)
        if family == "hra":  # W·H = U·Σ·(HᵀV)ᵀ keeps every left singular vector of W
            assert layer["intruders"] == 0
        assert len(layer["singular_values"]) == min(32, *layer["shape"])
        assert layer["singular_values"] == sorted(layer["singular_values"], reverse=True)
    assert report["delta_norm"] == pytest.approx(sum(x["delta_norm"] ** 2 for x in report["layers"]) ** 0.5)
    assert layer_spectrum(torch.zeros(4, 4)).numerical_rank == 0


def test_cli_writes_report_and_plots_and_compares_two_adapters(
    tiny_sd_pipe, tiny_sd_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unet = tiny_sd_pipe.unet
    files = []
    for family in ("lora", "hra"):
        handle = attach(unet, family, CONFIGS[family], "vo")
        perturb(handle)
        files.append(
            save_adapter_file(
                tmp_path / f"{family}.safetensors",
                handle,
                unet=unet,
                base_model_id=str(tiny_sd_path),
                trigger_phrase="a photo of sks",
                train_steps=1,
            )
        )
        handle.detach()
    out = tmp_path / "inspect"
    code = main(
        [str(files[0]), "--compare", str(files[1]), "--out", str(out), "--images", "2", "--steps", "2"]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "lora (LoRA): " in printed.out and "hra (HRA): " in printed.out
    report = json.loads((out / "report.json").read_text())
    assert [a["family"] for a in report["adapters"]] == ["lora", "hra"]
    for adapter in report["adapters"]:
        frequency = adapter["frequency"]
        assert frequency["prompt"] == "a photo of sks" and len(frequency["adapter"]) == 2
        assert all(0 < v < 1 for v in frequency["adapter"] + frequency["base"])
    assert report["adapters"][0]["frequency"]["base"] == report["adapters"][1]["frequency"]["base"]
    for name in (*PLOTS, "frequency.png", "samples.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width >= 100 and image.height >= 100
    with Image.open(out / "samples.png") as samples:  # base row, then one row per adapter, 4x enlarged
        assert samples.size == (2 * 4 * 32, 3 * 4 * 32)


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.safetensors")]) == 2
    assert "no adapter file" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    assert main([str(tmp_path / "bad.safetensors"), "--threshold", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--threshold" in err


def test_short_layer_names() -> None:
    assert short_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v") == "d1.a0.t0.attn2.to_v"
    assert (
        short_name("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0") == "m.a0.t0.attn1.to_out.0"
    )
