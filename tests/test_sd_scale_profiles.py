"""SD-scale wiring on the CPU: full-size SD 1.5 and SDXL-structured pipelines from configs (random weights),
the profile picked for each, every adapter family trained for 2 steps through the real CLI, and two of those
adapters composed with every method for 2 steps.

Random weights measure wiring, shapes, memory and speed, never quality. CLoRA runs the profile's settings
but without the 20 refinement rounds its `paper` preset adds at three points of the schedule (at 2 steps
that is about 40 latent-update rounds, hours of SD-size forward and backward passes on two CPU cores); its
latent updates themselves run. SD 1.5 is built at its real widths;
SDXL with its real block structure at a quarter of its widths (`benchmarks._sdxl`, `width_divisor=4`), because
the full 2.6B-parameter UNet in fp32 with its two text encoders (about 14 GB) does not fit beside the other
work on this machine's 24 GB. Runtime and peak RSS are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from models.adapters import FAMILIES
from models.profiles import PROFILES, profile_for_spec
from models.toyworld.world import Scene, SceneObject, render_scene
from training.model_card import read_profile_table

RESOLUTION = 64
SDXL_WIDTH_DIVISOR = 4
FAMILY_FLAGS = {"sdxl": {"krona": ["--krona_a1", "16"]}}
"""KronA's default a1 = 64 does not divide the quarter-width SDXL's 80-wide layers; the real widths take it."""


def _build(arch: str, folder: Path) -> Path:
    if arch == "sd1":
        from benchmarks._sd15 import build_sd15_pipeline

        pipe = build_sd15_pipeline(quick=False, size=512, device="cpu")
    else:
        from benchmarks._sdxl import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(SDXL_WIDTH_DIVISOR)
    pipe.to(torch.float16).save_pretrained(folder)  # half the disk; loaded back in fp32 on the CPU
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_sd_scale_profile_trains_every_family_and_composes_every_method(arch: str, tmp_path: Path) -> Any:
    from composition.__main__ import main as compose
    from composition.methods import METHODS
    from training.dreambooth import main as train

    torch.set_num_threads(2)
    model = _build(arch, tmp_path / "model")
    profile = profile_for_spec(model)
    assert profile is PROFILES[arch]
    images = tmp_path / "images"
    images.mkdir()
    for k, colour in enumerate(["red", "blue"]):
        render_scene(Scene((SceneObject("heart", colour),))).resize((RESOLUTION, RESOLUTION)).save(
            images / f"{k}.png"
        )
    adapters = {}
    for family in FAMILIES:
        out = tmp_path / family
        code = train([
            "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
            "--instance_prompt", f"a photo of zq{family} heart", "--output_dir", str(out), "--adapter", family,
            "--resolution", str(RESOLUTION), "--max_train_steps", "2", "--seed", "0", "--validation_steps", "0",
            "--num_validation_images", "1", "--num_inference_steps", "1", *FAMILY_FLAGS.get(arch, {}).get(family, []),
        ])  # fmt: skip
        assert code == 0, family
        card = read_profile_table((out / "README.md").read_text())
        defaults = profile.family(family)
        assert card["learning_rate"] == (str(defaults.learning_rate), f"profile {arch}")
        assert card["train_batch_size"] == (str(defaults.train_batch_size), f"profile {arch}")
        assert card["targets"] == (defaults.targets, f"profile {arch}")
        adapters[family] = out / "adapter.safetensors"
    out = tmp_path / "compose"
    code = compose([
        "--base-model", str(model), "--adapter", f"{adapters['lora']}:zqlora heart",
        "--adapter", f"{adapters['boft']}:zqboft heart", "--prompt", "a zqlora heart and a zqboft heart",
        "--compare", "--method", "clora", "--option", "refine_rounds=0", "--steps", "2", "--height", str(RESOLUTION), "--width", str(RESOLUTION),
        "--clip-model", "none", "--device", "cpu", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["profile"] == arch and set(report["methods"]) == set(METHODS)
    for method, entry in report["methods"].items():
        expected = profile.method_options(method) | ({"refine_rounds": 0} if method == "clora" else {})
        assert entry["options"] == expected, method
        assert entry["images"][0]["unet_evals"] >= 4, method  # at least one CFG pair per step
