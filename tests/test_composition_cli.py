"""`python -m composition`: images, masks, comparison grid and JSON report; bad input exits 2 with one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from composition.__main__ import main, parse_adapter
from models.adapters import attach
from models.adapters.files import save_adapter_file
from tests.composition_helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _lora_file(pipe, seed: int, trigger: str, folder: Path) -> Path:
    handle = attach(pipe.unet, "lora", {"rank": 2}, "vo")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in handle.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    path = save_adapter_file(
        folder / f"{trigger.replace(' ', '_')}.safetensors", handle, unet=pipe.unet, base_model_id="tiny",
        trigger_phrase=trigger, train_steps=1,
    )  # fmt: skip
    handle.detach()
    return path


def test_compare_writes_images_masks_grid_and_report(tiny_sd_path, tiny_sd_pipe, tmp_path) -> None:
    star = _lora_file(tiny_sd_pipe, 1, "zq star", tmp_path)
    heart = _lora_file(tiny_sd_pipe, 2, "vx heart", tmp_path)
    out = tmp_path / "out"
    code = main([
        "--base-model", str(tiny_sd_path), "--adapter", f"{star}::1.0:star", "--adapter", f"{heart}:vx heart:0.8",
        "--prompt", "a zq star on the left and a vx heart on the right", "--compare", "--method", "clora",
        "--option", 'preset="light"', "--option", "refine_rounds=0", "--steps", "1", "--seed", "5",
        "--clip-model", "none", "--device", "cpu", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ["merge", "switch", "composite", "cmlora", "clora"]
    assert report["seeds"] == [5]
    assert [a["phrase"] for a in report["adapters"]] == ["zq star", "vx heart"]
    assert [a["weight"] for a in report["adapters"]] == [1.0, 0.8]
    assert report["methods"]["merge"]["images"][0]["unet_evals"] == 2
    assert report["methods"]["composite"]["images"][0]["unet_evals"] == 4
    assert report["methods"]["clora"]["options"] == {"preset": "light", "refine_rounds": 0}
    for method, entry in report["methods"].items():  # full and shallow rows apart, and each over composite's
        record, cost = entry["images"][0], entry["cost"]
        assert (cost["full_rows"], cost["shallow_rows"]) == (record["full_rows"], record["shallow_rows"]), (
            method
        )
        assert cost["vs_composite"]["full_rows"] == record["full_rows"] / 4, method
        assert cost["vs_composite"]["wall_s"] == pytest.approx(
            record["wall_s"] / entry_wall(report, "composite")
        )
    assert report["methods"]["cmlora"]["images"][0]["shallow_rows"] == 0  # one step: nothing cached yet
    assert report["methods"]["clora"]["clip"] == {"skipped": "--clip-model none"}
    for method, entry in report["methods"].items():
        assert Image.open(out / entry["images"][0]["file"]).size == (32, 32), method
    masks = report["methods"]["clora"]["images"][0]["masks"]
    assert len(masks) == 3 and all((out / m).is_file() for m in masks)
    grid = Image.open(out / report["grid"])
    assert grid.size[0] > 5 * 32 and grid.size[1] > 32
    assert not list(out.glob(".*.tmp"))


def entry_wall(report: dict, method: str) -> float:
    return report["methods"][method]["cost"]["wall_s"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--adapter", "{star}:zwx cat"], "phrase 'zwx cat' of adapter 1 is not in the prompt"),
        ([], "no adapters given"),
        (["--adapter", "{star}", "--option", "interval"], "expected KEY=VALUE"),
        (["--adapter", "{star}", "--method", "merge", "--option", "interval=3"], "has no option"),
        (["--adapter", "{tmp}/nope.safetensors"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    extra, message, tiny_sd_path, tiny_sd_pipe, tmp_path, capsys
) -> None:
    star = _lora_file(tiny_sd_pipe, 1, "zq star", tmp_path)
    extra = [e.format(star=star, tmp=tmp_path) for e in extra]
    argv = [
        "--base-model",
        str(tiny_sd_path),
        "--prompt",
        "a zq star",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--device", "cpu", "--clip-model", "none", *extra]) == 2
    last = capsys.readouterr().err.strip().split("\n")[-1]
    assert last.startswith("error: ") and message in last


def test_parse_adapter() -> None:
    assert parse_adapter("a.safetensors") == ("a.safetensors", None, 1.0, None)
    assert parse_adapter("a.safetensors:sks dog:0.5:dog") == ("a.safetensors", "sks dog", 0.5, "dog")
    with pytest.raises(ValueError, match="is not a number"):
        parse_adapter("a.safetensors:dog:heavy")


def test_a_bad_flag_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse printed its whole usage before the error (#35 item 9)."""
    with pytest.raises(SystemExit) as caught:
        main(["--method", "foo", "--prompt", "x", "--out", str(tmp_path)])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: argument --method: invalid choice: 'foo' (choose from 'clora', 'cmlora', 'composite', 'merge', "
        "'switch') (see python -m composition --help)"
    )
