"""The committed parts of toy world v2, each once it met its own bar: the CLIP (the shipped scorer, whose text
tower conditions the UNet) names every attribute and tells which object is where; the VAE gives back what the
checks read in one- to three-object scenes; each seeds a training run's work folder as is, so a new machine
trains only the rest."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.pipelines import load_pipeline
from models.toyworld.checkpoint import is_carry_over, read_module_weights
from models.toyworld.v2.evaluate import clip_binding_choice, clip_zero_shot, load_scorer
from models.toyworld.v2.train import ToyWorldV2TrainConfig, train, train_clip, train_vae
from models.toyworld.v2.vae_readback import load_vae, readback

V2 = Path(__file__).resolve().parent.parent / "assets" / "toyworld-v2"
V2_CLIP = V2 / "clip" / "toyworld_clip.safetensors"


def test_the_v2_clip_names_every_attribute_and_tells_places_and_bindings_apart() -> None:
    model = load_scorer(V2_CLIP)
    zero_shot = clip_zero_shot(model, count=60)
    assert min(zero_shot.values()) >= 0.9, zero_shot
    choice = clip_binding_choice(model, count=60)
    assert choice["places"] >= 0.9 and choice["binding"] >= 0.9, choice  # 0.5 is a bag of words


def test_the_v2_clip_seeds_a_work_folder_so_training_starts_at_the_vae_and_unet(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(V2_CLIP, work / "clip_final.safetensors")
    model = train_clip(ToyWorldV2TrainConfig(work_dir=work, clip_steps=1, clip_pretrain_steps=1))
    assert not list(work.glob("clip*_state.safetensors"))  # nothing was trained
    shipped = load_file(str(V2_CLIP))
    for key, value in model.state_dict().items():
        assert value.dtype == (torch.float32 if shipped[key].is_floating_point() else shipped[key].dtype)
        torch.testing.assert_close(value, shipped[key].to(value.dtype), rtol=0, atol=0)


V2_VAE = V2 / "vae" / "vae_final.safetensors"


def test_the_v2_vae_gives_back_what_the_checks_read_in_one_to_three_object_scenes() -> None:
    rates = readback(load_vae(V2_VAE), count=96, seed=5)
    assert min(rates[1].values()) >= 0.95, rates[1]
    assert rates[2]["all"] >= 0.9, rates[2]
    assert min(rates[3][field] for field in ("count", "colour", "shape")) >= 0.9, rates[3]


def test_the_v2_vae_seeds_a_work_folder_so_training_starts_at_the_unet(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(V2_VAE, work / "vae_final.safetensors")
    vae = train_vae(ToyWorldV2TrainConfig(work_dir=work, vae_steps=1))
    assert not list(work.glob("vae_state.safetensors"))  # nothing was trained
    with safe_open(str(V2_VAE), framework="pt") as handle:
        assert vae.config.scaling_factor == float(handle.metadata()["scaling_factor"]) > 0
    shipped = load_file(str(V2_VAE))
    for key, value in vae.state_dict().items():
        torch.testing.assert_close(value, shipped[key].to(value.dtype), rtol=0, atol=0)


V2_CARRY = V2 / "unet-carry" / "unet_state.safetensors"


def test_the_three_committed_parts_seed_a_work_folder_that_resumes_the_unet(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for source, name in ((V2_CLIP, "clip_final"), (V2_VAE, "vae_final"), (V2_CARRY, "unet_state")):
        shutil.copy(source, work / f"{name}.safetensors")
    assert is_carry_over(work / "unet_state.safetensors")
    pipeline = train(ToyWorldV2TrainConfig(work_dir=work, out=tmp_path / "out", stage="snapshot"))
    carried = read_module_weights(V2_CARRY, "unet")
    for name, value in load_pipeline(pipeline, device="cpu", dtype="fp32").unet.named_parameters():
        torch.testing.assert_close(value, carried[name].float(), rtol=0, atol=0)
    assert not list(work.glob("*_state.safetensors"))[
        1:
    ]  # nothing but the carried UNet state: no stage trained
