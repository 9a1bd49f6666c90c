"""Generic adapter tests, PEFT-style: one table of cases (family × target preset × tiny SD 1.x / SDXL UNet)
run through every test — identity at init, training touches only the adapter, merge == unmerged,
unmerge/disable/detach restore the base, save → load round trips."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from models.adapters import FAMILIES, PRESETS, AdapterHandle, attach
from models.adapters.files import AdapterFileError, load_adapter_file, save_adapter_file

MODELS = ("sd", "sdxl")
TEST_CASES = list(itertools.product(FAMILIES, PRESETS, MODELS))
IDS = [f"{family}-{preset}-{model}" for family, preset, model in TEST_CASES]
ORTHOGONAL = {"boft", "hra"}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny UNets run far faster on one thread than on two contended ones (shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_unets(tiny_sd_path: Path, tiny_sdxl_path: Path) -> dict[str, UNet2DConditionModel]:
    return {
        "sd": UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet").eval(),
        "sdxl": UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet").eval(),
    }


def unet_inputs(unet: UNet2DConditionModel, seed: int = 0) -> dict:
    """Seeded UNet inputs: one 8x8 latent, a timestep, text states (and SDXL's added conditioning)."""
    g = torch.Generator().manual_seed(seed)
    kwargs = {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, unet.config.cross_attention_dim, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, text_dim, generator=g),
            "time_ids": torch.randn(1, 6, generator=g),
        }
    return kwargs


def run(unet: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def perturb(handle: AdapterHandle, seed: int = 1) -> None:
    """Move every adapter tensor away from its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in handle.trainable_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize(("family", "preset", "model"), TEST_CASES, ids=IDS)
def test_starts_at_base_and_trains_only_the_adapter(
    family: str, preset: str, model: str, base_unets: dict
) -> None:
    unet = copy.deepcopy(base_unets[model])
    inputs = unet_inputs(unet)
    base_out = run(unet, inputs)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}

    handle = attach(unet, family, None, preset)
    assert handle.targets and all(
        isinstance(unet.get_submodule(t).get_base_layer(), nn.Linear) for t in handle.targets
    )
    torch.testing.assert_close(run(unet, inputs), base_out, atol=1e-5, rtol=0)
    if family in ORTHOGONAL:  # orthogonal families start at exactly the identity rotation
        for name, weight in handle.layer_weights().items():
            torch.testing.assert_close(weight, base_state[f"{name}.weight"], atol=1e-6, rtol=0)

    adapter_ids = {id(p) for p in handle.trainable_parameters()}
    assert {id(p) for p in unet.parameters() if p.requires_grad} == adapter_ids
    before = {k: v.detach().clone() for k, v in handle.state_dict().items()}
    optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=1e-2)
    unet.train()
    loss = unet(**inputs).sample.pow(2).mean()
    regularizer = handle.regularization_loss()
    if regularizer is not None:
        loss = loss + regularizer
    loss.backward()
    optimizer.step()
    unet.eval()

    after = handle.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name, param in unet.named_parameters():
        if id(param) not in adapter_ids:
            original = base_state[name.replace(".base_layer.", ".")]
            assert torch.equal(param, original), f"{name} changed but is not an adapter parameter"
    assert (run(unet, inputs) - base_out).abs().max() > 1e-6


@pytest.mark.parametrize(("family", "preset", "model"), TEST_CASES, ids=IDS)
def test_merge_unmerge_disable_detach(family: str, preset: str, model: str, base_unets: dict) -> None:
    unet = copy.deepcopy(base_unets[model])
    inputs = unet_inputs(unet)
    base_out = run(unet, inputs)
    originals = {name: m for name, m in unet.named_modules() if isinstance(m, nn.Linear)}
    base_weights = {name: m.weight.detach().clone() for name, m in originals.items()}

    handle = attach(unet, family, None, preset)
    perturb(handle)
    adapted = run(unet, inputs)
    assert (adapted - base_out).abs().max() > 1e-4
    expected_weights = handle.layer_weights()
    for name in handle.targets:  # layer_weights does not touch the UNet
        assert torch.equal(unet.get_submodule(name).get_base_layer().weight, base_weights[name])

    handle.merge()
    assert handle.merged
    torch.testing.assert_close(run(unet, inputs), adapted, atol=1e-4, rtol=0)
    for name in handle.targets:
        merged = unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(merged, expected_weights[name], atol=1e-5, rtol=0)
    handle.unmerge()
    assert not handle.merged
    for name in handle.targets:
        weight = unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(weight, base_weights[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(run(unet, inputs), adapted, atol=1e-5, rtol=0)

    handle.set_enabled(False)
    torch.testing.assert_close(run(unet, inputs), base_out, atol=1e-5, rtol=0)
    handle.set_enabled(True)
    torch.testing.assert_close(run(unet, inputs), adapted, atol=1e-5, rtol=0)

    handle.merge()
    handle.detach()
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear):
            assert module is originals[name]
    assert all(p.requires_grad for p in unet.parameters())
    assert not hasattr(unet, "peft_config")
    torch.testing.assert_close(run(unet, inputs), base_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("family", "preset", "model"), TEST_CASES, ids=IDS)
def test_save_load_round_trip(family: str, preset: str, model: str, base_unets: dict, tmp_path: Path) -> None:
    unet = copy.deepcopy(base_unets[model])
    inputs = unet_inputs(unet)
    handle = attach(unet, family, None, preset)
    perturb(handle)
    adapted = run(unet, inputs)
    weights = handle.layer_weights()
    path = save_adapter_file(
        tmp_path / "concept.safetensors",
        handle,
        unet=unet,
        base_model_id=f"tiny-{model}",
        trigger_phrase="a photo of sks",
        train_steps=7,
        extra={"lr": 1e-4},
    )
    handle.detach()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept.safetensors"]  # no temp file left

    loaded = load_adapter_file(path)
    assert (loaded.family, loaded.targets, loaded.config) == (family, handle.targets, handle.config)
    assert (loaded.base_model_id, loaded.trigger_phrase, loaded.train_steps) == (
        f"tiny-{model}",
        "a photo of sks",
        7,
    )
    assert json.loads(loaded.metadata["extra"]) == {"lr": 1e-4}
    assert loaded.metadata["created"].endswith("+00:00")

    fresh = copy.deepcopy(base_unets[model])
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    file_weights = loaded.layer_weights(fresh)
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())
    assert set(file_weights) == set(weights)
    for name, weight in weights.items():
        torch.testing.assert_close(file_weights[name], weight, atol=1e-6, rtol=0)
    loaded.attach(fresh)
    torch.testing.assert_close(run(fresh, inputs), adapted, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loading_into_a_mismatched_unet_fails_clearly(family: str, base_unets: dict, tmp_path: Path) -> None:
    unet = copy.deepcopy(base_unets["sd"])
    handle = attach(unet, family, None, "vo")
    path = save_adapter_file(
        tmp_path / "sd.safetensors",
        handle,
        unet=unet,
        base_model_id="tiny-sd",
        trigger_phrase="x",
        train_steps=1,
    )
    handle.detach()
    loaded = load_adapter_file(path)
    other = copy.deepcopy(base_unets["sdxl"])
    with pytest.raises(AdapterFileError, match="tiny-sd"):
        loaded.attach(other)
    with pytest.raises(AdapterFileError, match="tiny-sd"):
        loaded.layer_weights(other)
