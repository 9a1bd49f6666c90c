"""`python -m models.adapters.export`: every family to every format it supports, the base model read where ΔW
depends on it, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.adapters import attach
from models.adapters.export import FORMATS, main, standard_exports
from models.adapters.exports import read_export_report
from models.adapters.files import save_adapter_file
from models.adapters.low_rank import delta_weights
from tests.test_adapters import perturb

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"lora": {"rank": 2}, "hra": {"r": 2}, "boft": {"block_num": 4}, "krona": {"a1": 8, "a2": 4}}


@pytest.fixture(scope="module")
def adapter_files(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One trained-looking adapter file per family, recorded as trained on the tiny SD folder."""
    from models.pipelines import load_pipeline

    folder = tmp_path_factory.mktemp("adapters")
    unet = load_pipeline(tiny_sd_path, device="cpu", dtype="fp32").unet
    files = {}
    for family, config in CONFIGS.items():
        handle = attach(unet, family, config, "vo")
        perturb(handle)
        files[family] = save_adapter_file(
            folder / f"{family}.safetensors",
            handle,
            unet=unet,
            base_model_id=str(tiny_sd_path),
            trigger_phrase="sks",
            train_steps=1,
        )
        handle.detach()
    return files


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_family_exports_to_every_format_it_supports(
    family: str, adapter_files: dict[str, Path], tiny_sd_path: Path, tmp_path: Path, capsys
) -> None:
    from models.adapters.files import load_adapter_file
    from models.pipelines import load_pipeline

    source = adapter_files[family]
    expected = delta_weights(load_adapter_file(source), load_pipeline(tiny_sd_path, dtype="fp32").unet)
    for to in FORMATS:
        rank = 3 if to == "diffusers" and family in ("boft", "krona") else None
        out = tmp_path / (f"{to}" if to == "peft" else f"{to}.safetensors")
        argv = [source, "--to", to, "--out", out, *(["--rank", rank] if rank else [])]
        code, stdout, stderr = _run(argv, capsys)
        if to == "peft" and family == "krona":
            assert code == 2 and stderr.count("\n") == 1 and "PEFT has no DiffuseKronA" in stderr
            continue
        assert code == 0, stderr
        assert stdout.startswith(f"{out}: {family} → ")
        if to == "peft":
            assert (out / "adapter_config.json").is_file()
            continue
        report = read_export_report(out)
        assert report is not None and report.family == family
        assert report.exact == (rank is None) and ("exact" in stdout) == (rank is None)
        if rank is not None:
            assert f"{report.relative_error:.2%}" in stdout and 0 < report.relative_error < 1
        tensors = load_file(out)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
    if family == "boft":  # the exact kohya file of BOFT is ΔW itself
        diff = load_file(tmp_path / "kohya.safetensors")
        for name, delta in expected.items():
            torch.testing.assert_close(diff[f"lora_unet_{name.replace('.', '_')}.diff"], delta)


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
def test_default_output_name_and_the_module_entry_point(adapter_files: dict[str, Path]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "models.adapters.export", str(adapter_files["hra"]), "--to", "kohya"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = adapter_files["hra"].with_name("hra.kohya.safetensors")
    assert done.stdout.strip() == f"{out}: hra → lora, exact"
    assert read_export_report(out).exact


def test_bad_input_gets_one_line_and_exit_2(
    adapter_files: dict[str, Path], tmp_path: Path, capsys, tiny_sdxl_path: Path
) -> None:
    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04not safetensors")
    cases = [
        ([tmp_path / "missing.safetensors", "--to", "kohya"], "no adapter file"),
        ([tmp_path / "foreign.safetensors", "--to", "kohya"], "not an Atelier adapter"),
        ([tmp_path / "pickle.safetensors", "--to", "kohya"], "not a readable safetensors"),
        ([adapter_files["boft"], "--to", "diffusers"], "give --rank R"),
        ([adapter_files["lora"], "--to", "kohya", "--rank", "0"], "--rank must be >= 1"),
        ([adapter_files["lora"], "--to", "peft", "--rank", "4"], "drop --rank"),
        ([adapter_files["hra"], "--to", "kohya", "--base-model", tiny_sdxl_path], "does not fit this UNet"),
        ([adapter_files["hra"], "--to", "kohya", "--base-model", tmp_path / "nowhere"], "does not exist"),
        ([adapter_files["lora"], "--to", "kohya", "--out", tmp_path / "no" / "dir" / "x"], ""),
    ]
    for argv, message in cases:
        code, stdout, stderr = _run(argv, capsys)
        if not message:  # a missing output folder is created, like every other writer's
            assert code == 0, stderr
            continue
        assert code == 2, (argv, stdout, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
        assert "Traceback" not in stderr
    with pytest.raises(SystemExit) as exit_info:
        main([str(adapter_files["lora"]), "--to", "a1111"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_standard_exports_give_every_family_an_exact_kohya_file_and_a_diffusers_lora(family: str) -> None:
    table = standard_exports(family)
    assert table["kohya"].rank is None and table["diffusers"].to == "diffusers"
    assert (table["diffusers"].rank is None) == (family in ("lora", "hra"))
    assert ("peft" in table) == (family != "krona")
    assert len({spec.name for spec in table.values()}) == len(table)
