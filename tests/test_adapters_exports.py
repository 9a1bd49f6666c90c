"""Exports other tools load (diffusers, kohya, LyCORIS LoKr, PEFT) and kohya LoRA import, on tiny pipelines."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from models.adapters import AdapterError, attach
from models.adapters.exports import (
    export_diffusers_lora,
    export_kohya_lora,
    export_lycoris_lokr,
    export_peft,
    import_kohya_lora,
)
from models.adapters.family import AdapterFileError
from models.pipelines import load_pipeline
from tests.test_adapters import perturb, run, unet_inputs

PIPES = ("tiny_sd_pipe", "tiny_sdxl_pipe")


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(pipe, seed: int = 0) -> np.ndarray:
    """A seeded 2-step 32x32 image as a float array."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a photo of sks", num_inference_steps=2, height=32, width=32, output_type="np", generator=generator
    ).images


@pytest.mark.parametrize("pipe_name", PIPES)
def test_lora_exports_load_in_diffusers_and_match_atelier(pipe_name: str, request, tmp_path: Path) -> None:
    pipe = request.getfixturevalue(pipe_name)
    pipe.set_progress_bar_config(disable=True)
    fresh = load_pipeline(
        request.getfixturevalue(pipe_name.replace("_pipe", "_path")), device="cpu", dtype="fp32"
    )
    fresh.set_progress_bar_config(disable=True)
    handle = attach(pipe.unet, "lora", {"rank": 2, "alpha": 6.0}, "qkvo")
    perturb(handle)
    ours = generate(pipe)
    export_diffusers_lora(handle, tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    export_kohya_lora(handle, tmp_path / "kohya.safetensors")
    handle.detach()
    base = generate(fresh)
    assert np.abs(ours - base).max() > 1e-3  # the adapter visibly changes the image

    fresh.load_lora_weights(str(tmp_path / "diffusers"), weight_name="pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(generate(fresh), ours, atol=1e-4)

    kohya = load_file(tmp_path / "kohya.safetensors")
    name = "lora_unet_" + handle.targets[0].replace(".", "_")
    assert kohya[f"{name}.lora_down.weight"].shape[0] == 2 and float(kohya[f"{name}.alpha"]) == 2.0
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    np.testing.assert_allclose(generate(pipe), ours, atol=1e-4)
    pipe.unload_lora_weights()

    imported = import_kohya_lora(tmp_path / "kohya.safetensors", pipe.unet)
    assert imported.family == "lora" and imported.targets == handle.targets
    weights = imported.layer_weights(pipe.unet)
    again = imported.attach(pipe.unet)
    np.testing.assert_allclose(generate(pipe), ours, atol=1e-4)
    for layer, weight in again.layer_weights().items():
        torch.testing.assert_close(weights[layer], weight)


def test_kohya_import_keeps_per_layer_rank_alpha_and_text_encoder(tiny_sd_pipe, tmp_path: Path) -> None:
    unet = tiny_sd_pipe.unet
    handle = attach(unet, "lora", {"rank": 2, "alpha": 2.0}, "vo")
    perturb(handle)
    expected = handle.layer_weights()
    export_kohya_lora(handle, tmp_path / "k.safetensors")
    handle.detach()
    tensors = load_file(tmp_path / "k.safetensors")
    first = "lora_unet_" + handle.targets[0].replace(".", "_")
    tensors[f"{first}.alpha"] = torch.tensor(1.0)  # alpha 1 at rank 4: a quarter of the update
    down, up = tensors[f"{first}.lora_down.weight"], tensors[f"{first}.lora_up.weight"]
    tensors[f"{first}.lora_down.weight"] = torch.cat([down, torch.zeros_like(down)])  # rank 4, same ΔW·(r/α)
    tensors[f"{first}.lora_up.weight"] = torch.cat([up, torch.zeros_like(up)], dim=1)
    conv = (
        "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 Conv2d in SD 1.x, as kohya LoRAs often touch
    )
    conv_down, conv_up = torch.randn(2, 32, 1, 1), torch.randn(32, 2, 1, 1)
    tensors |= {f"{conv}.lora_down.weight": conv_down, f"{conv}.lora_up.weight": conv_up}
    tensors[f"{conv}.alpha"] = torch.tensor(1.0)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors |= {f"{te}.lora_down.weight": torch.ones(2, 32), f"{te}.lora_up.weight": torch.ones(32, 2)}
    tensors[f"{te}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "edited.safetensors")

    imported = import_kohya_lora(tmp_path / "edited.safetensors", unet)
    assert imported.config.rank == 2 and imported.config.rank_pattern == {handle.targets[0]: 4}
    conv_name = "down_blocks.0.attentions.0.proj_in"
    assert imported.config.alpha_pattern == {handle.targets[0]: 1.0, conv_name: 1.0}
    assert any("text_model.encoder.layers.0" in key for key in imported.text_encoder_tensors)
    weights = imported.layer_weights(unet)
    base = unet.get_submodule(handle.targets[0]).weight
    torch.testing.assert_close(weights[handle.targets[0]] - base, (expected[handle.targets[0]] - base) / 4)
    for layer in handle.targets[1:]:
        torch.testing.assert_close(weights[layer], expected[layer])
    assert imported.targets[0] == conv_name and imported.layer_shapes[conv_name] == (32, 32, 1, 1)
    conv_delta = 0.5 * (conv_up.flatten(1) @ conv_down.flatten(1)).reshape(32, 32, 1, 1)
    torch.testing.assert_close(weights[conv_name], unet.get_submodule(conv_name).weight + conv_delta)
    inputs = unet_inputs(unet)
    attached = imported.attach(unet)
    adapted = run(unet, inputs)
    attached.merge()
    torch.testing.assert_close(run(unet, inputs), adapted, atol=1e-4, rtol=0)


def test_kohya_import_rejects_foreign_and_mismatched_files(
    tiny_sd_pipe, tiny_sdxl_pipe, tmp_path: Path
) -> None:
    save_file({"model.weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(AdapterFileError, match="foreign.safetensors"):
        import_kohya_lora(tmp_path / "foreign.safetensors", tiny_sd_pipe.unet)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        import_kohya_lora(tmp_path / "pickle.safetensors", tiny_sd_pipe.unet)
    handle = attach(tiny_sd_pipe.unet, "lora", None, "vo")
    export_kohya_lora(handle, tmp_path / "sd.safetensors")
    handle.detach()
    with pytest.raises(AdapterFileError):
        import_kohya_lora(tmp_path / "sd.safetensors", tiny_sdxl_pipe.unet)


def test_lycoris_lokr_export_is_kron_of_w1_w2(tiny_sd_pipe, tmp_path: Path) -> None:
    unet = tiny_sd_pipe.unet
    handle = attach(unet, "krona", {"a1": 8, "a2": 4, "scale": 0.5}, "vo")
    perturb(handle)
    weights = handle.layer_weights()
    export_lycoris_lokr(handle, tmp_path / "lokr.safetensors")
    tensors = load_file(tmp_path / "lokr.safetensors")
    assert len(tensors) == 3 * len(handle.targets)
    for name in handle.targets:
        key = "lora_unet_" + name.replace(".", "_")
        w1, w2 = tensors[f"{key}.lokr_w1"], tensors[f"{key}.lokr_w2"]
        assert w1.shape == (8, 4) and float(tensors[f"{key}.alpha"]) == 1.0
        base = unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(base + torch.kron(w1, w2), weights[name])
    with pytest.raises(AdapterError, match="lora"):
        export_kohya_lora(handle, tmp_path / "nope.safetensors")
    with pytest.raises(AdapterError, match="export_lycoris_lokr"):
        export_peft(handle, tmp_path / "peft")


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize("family", ["lora", "boft", "hra"])
def test_peft_export_loads_with_peft(family: str, tiny_sd_pipe, tmp_path: Path) -> None:
    unet = tiny_sd_pipe.unet
    base = copy.deepcopy(unet)
    inputs = unet_inputs(unet)
    handle = attach(unet, family, None, "vo")
    perturb(handle)
    expected = run(unet, inputs)
    folder = export_peft(handle, tmp_path / "peft")
    export_peft(handle, folder)  # overwriting an existing export works
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == family.upper()
    model = PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(run(model.base_model.model, inputs), expected, atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
