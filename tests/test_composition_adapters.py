"""The bank on real adapter files of every family (LoRA, DiffuseKronA, BOFT, HRA), mixed freely."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from composition import AdapterBank, CompositionError, ConceptPrompt, generate
from models.adapters import attach
from models.adapters.files import save_adapter_file
from tests.composition_helpers import torch_threads

FAMILIES = ("boft", "hra", "krona", "lora")
CONFIGS = {"lora": {"rank": 4}, "krona": None, "boft": {"block_num": 4, "block_size": 0}, "hra": {"r": 4}}
X, T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(350)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _forward(pipe) -> torch.Tensor:
    context = torch.randn(
        1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        return pipe.unet(X, T, encoder_hidden_states=context).sample


def _make_adapter(
    pipe, family: str, seed: int, folder: Path, with_output: bool = True
) -> tuple[Path, dict[str, torch.Tensor], torch.Tensor | None]:
    """Attach a randomised adapter, record its layer weights (and UNet output), save it, detach it."""
    handle = attach(pipe.unet, family, CONFIGS[family], "vo")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in handle.trainable_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    weights = handle.layer_weights()
    output = _forward(pipe) if with_output else None
    path = save_adapter_file(
        folder / f"{family}{seed}.safetensors", handle, unet=pipe.unet, base_model_id="tiny",
        trigger_phrase=f"{family} thing", train_steps=1,
    )  # fmt: skip
    handle.detach()
    return path, weights, output


def test_every_family_activates_exactly_and_families_mix(tiny_sd_pipe, tmp_path) -> None:
    base_out = _forward(tiny_sd_pipe)
    base = {k: v.clone() for k, v in tiny_sd_pipe.unet.state_dict().items()}
    made = {
        family: _make_adapter(tiny_sd_pipe, family, seed, tmp_path) for seed, family in enumerate(FAMILIES)
    }
    bank = AdapterBank(tiny_sd_pipe, [made[f][0] for f in FAMILIES])
    assert [e.family for e in bank.entries] == list(FAMILIES)
    assert [e.trigger_phrase for e in bank.entries] == [f"{f} thing" for f in FAMILIES]
    for index, family in enumerate(FAMILIES):
        bank.activate(index)
        attached = made[family][2]
        torch.testing.assert_close(_forward(tiny_sd_pipe), attached, rtol=1e-4, atol=1e-5)
        assert (attached - base_out).abs().max() > 1e-4
    for pair, weights in ((("lora", "boft"), (0.6, 0.8)), (("krona", "hra"), (1.2, 0.5))):
        selection = [dict(zip(pair, weights, strict=True)).get(f, 0.0) for f in FAMILIES]
        bank.activate(selection)
        for name in made[pair[0]][1]:
            w0 = base[f"{name}.weight"]
            expected = w0 + sum(w * (made[f][1][name] - w0) for f, w in zip(pair, weights, strict=True))
            torch.testing.assert_close(
                tiny_sd_pipe.unet.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-6
            )
    bank.deactivate()
    assert torch.equal(_forward(tiny_sd_pipe), base_out)
    bank.close()
    mixed = AdapterBank(tiny_sd_pipe, [made["lora"][0], made["boft"][0]])
    prompt = ConceptPrompt.build("a lora thing next to a boft thing", ["lora thing", "boft thing"])
    result = generate("composite", tiny_sd_pipe, mixed, prompt, steps=2, seed=0)
    assert result.unet_evals == 8 and np.asarray(result.images[0]).std() > 0


def test_adapter_for_another_base_model_is_refused(tiny_sd_pipe, tiny_sdxl_pipe, tmp_path) -> None:
    path, _, _ = _make_adapter(tiny_sdxl_pipe, "lora", 1, tmp_path, with_output=False)
    with pytest.raises(CompositionError, match="does not fit this base model"):
        AdapterBank(tiny_sd_pipe, [path])
    with pytest.raises(CompositionError, match="does not exist"):
        AdapterBank(tiny_sd_pipe, [tmp_path / "missing.safetensors"])
