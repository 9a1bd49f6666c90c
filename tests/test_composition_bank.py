"""AdapterBank: exact restore, exact activation, weighted sums equal diffusers' set_adapters, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from composition import AdapterBank, CompositionError
from tests.composition_helpers import FakeAdapter, torch_threads, unet_state


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def test_activate_and_deactivate_restore_base_exactly(tiny_sd_pipe) -> None:
    unet = tiny_sd_pipe.unet
    before = unet_state(unet)
    pointers = {k: p.data_ptr() for k, p in unet.named_parameters()}
    bank = AdapterBank(tiny_sd_pipe, [FakeAdapter(1), FakeAdapter(2, suffixes=("to_q",))])
    for selection in (0, 1, [0.5, 2.0], [1.0, 1.0], None, 1, 0):
        bank.activate(selection)
    bank.deactivate()
    after = unet_state(unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pointers == {k: p.data_ptr() for k, p in unet.named_parameters()}


def test_activating_one_adapter_gives_its_weights_and_leaves_other_layers(tiny_sd_pipe) -> None:
    unet = tiny_sd_pipe.unet
    first, second = FakeAdapter(1), FakeAdapter(2, suffixes=("to_q",))
    expected = first.layer_weights(unet)
    base = unet_state(unet)
    bank = AdapterBank(tiny_sd_pipe, [first, second])
    bank.activate(0)
    for name, module in unet.named_modules():
        if name in expected:
            assert torch.equal(module.weight, expected[name])
        elif name.endswith("to_q"):
            assert torch.equal(module.weight, base[f"{name}.weight"])
    assert bank.active == (1.0, 0.0)


def test_weighted_sum_is_base_plus_weighted_deltas(tiny_sd_pipe) -> None:
    unet = tiny_sd_pipe.unet
    sources = [FakeAdapter(1), FakeAdapter(2), FakeAdapter(3, suffixes=("to_v",))]
    weights = [0.5, -1.0, 2.0]
    base = unet_state(unet)
    per_adapter = [s.layer_weights(unet) for s in sources]
    bank = AdapterBank(tiny_sd_pipe, sources)
    bank.activate(weights)
    name = next(iter(per_adapter[0]))
    w0 = base[f"{name}.weight"]
    expected = w0 + sum(w * (layers[name] - w0) for w, layers in zip(weights, per_adapter, strict=True))
    torch.testing.assert_close(unet.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
    report = bank.memory_report()
    assert report["adapters_total_bytes"] == sum(
        t.numel() * 4 for layers in per_adapter for t in layers.values()
    )
    assert report["scratch_bytes"] == report["touched_base_bytes"] > 0


def _lora_sources(unet: torch.nn.Module, names: list[str]) -> list[FakeAdapter]:
    """Effective per-layer weights of PEFT LoRA adapters already attached to `unet`, one source per name."""
    sources = []
    for adapter in names:
        weights = {
            name: (module.base_layer.weight + module.get_delta_weight(adapter)).detach().clone()
            for name, module in unet.named_modules()
            if isinstance(module, LoraLayer) and adapter in module.lora_A
        }
        source = FakeAdapter(0)
        source.layer_weights = lambda _unet, w=weights: w
        sources.append(source)
    return sources


def test_weighted_sum_matches_diffusers_set_adapters(tiny_sd_path) -> None:
    from models.pipelines import load_pipeline

    reference = load_pipeline(tiny_sd_path, device="cpu", dtype="fp32")
    plain = load_pipeline(tiny_sd_path, device="cpu", dtype="fp32")
    torch.manual_seed(0)
    for name in ("a", "b"):
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["to_v", "to_out.0"], init_lora_weights="gaussian"
        )
        reference.unet.add_adapter(config, adapter_name=name)
    with torch.no_grad():
        for module in reference.unet.modules():
            if isinstance(module, LoraLayer):
                for adapter in ("a", "b"):
                    module.lora_B[adapter].weight.normal_(0, 0.2)
    sources = _lora_sources(reference.unet, ["a", "b"])
    reference.unet.set_adapters(["a", "b"], weights=[0.7, 1.3])
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor(400), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = reference.unet(x, t, encoder_hidden_states=context).sample
        bank = AdapterBank(plain, sources)
        bank.activate([0.7, 1.3])
        got = plain.unet(x, t, encoder_hidden_states=context).sample
        bank.deactivate()
        base = plain.unet(x, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the adapters really change the output


def test_bank_errors_are_clear(tiny_sd_pipe) -> None:
    with pytest.raises(CompositionError, match="no adapters given"):
        AdapterBank(tiny_sd_pipe, [])
    with pytest.raises(CompositionError, match="does not fit this base model"):
        AdapterBank(tiny_sd_pipe, [FakeAdapter(1, compatible=False)])
    bad = FakeAdapter(1)
    bad.layer_weights = lambda unet: {"down_blocks.0.attentions.0.proj_in": torch.zeros(3, 3)}
    with pytest.raises(CompositionError, match="trained for another base model"):
        AdapterBank(tiny_sd_pipe, [bad])
    missing = FakeAdapter(1)
    missing.layer_weights = lambda unet: {"no.such.layer": torch.zeros(3, 3)}
    with pytest.raises(CompositionError, match="does not have"):
        AdapterBank(tiny_sd_pipe, [missing])
    with pytest.raises(CompositionError, match="repeat"):
        AdapterBank(tiny_sd_pipe, [FakeAdapter(1), FakeAdapter(2)], names=["a", "a"])
    assert AdapterBank(tiny_sd_pipe, [FakeAdapter(1), FakeAdapter(1)]).names == ["fake1", "fake1-2"]
    bank = AdapterBank(tiny_sd_pipe, [FakeAdapter(1)])
    with pytest.raises(CompositionError, match="out of range"):
        bank.activate(3)
    with pytest.raises(CompositionError, match="one per adapter"):
        bank.activate([1.0, 1.0])


def _kohya_file(pipe, path, seed: int) -> dict[str, torch.Tensor]:
    """A kohya/A1111 LoRA file (rank 2, alpha 1) on the first to_v of the UNet and every q_proj of the text
    encoder; returns its tensors."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    layers = [("lora_te_", n, m) for n, m in pipe.text_encoder.named_modules() if n.endswith("q_proj")]
    layers.append(("lora_unet_", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", None))
    for prefix, name, module in layers:
        module = module or pipe.unet.get_submodule(name)
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, module.in_features, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return tensors


def test_kohya_text_encoder_parts_give_per_adapter_prompt_embeddings(tiny_sd_pipe, tmp_path) -> None:
    from composition.sampling import EmbeddingCache

    encoder = tiny_sd_pipe.text_encoder
    tensors = _kohya_file(tiny_sd_pipe, tmp_path / "kohya.safetensors", 0)
    name = next(n for n, _ in encoder.named_modules() if n.endswith("q_proj"))
    key = "lora_te_" + name.replace(".", "_")
    base_weight = encoder.get_submodule(name).weight.detach().clone()
    expected = base_weight + 0.5 * tensors[f"{key}.lora_up.weight"] @ tensors[f"{key}.lora_down.weight"]
    bank = AdapterBank(tiny_sd_pipe, [tmp_path / "kohya.safetensors", FakeAdapter(2)])
    assert bank.entries[0].family == "lora" and bank.has_text_encoder_parts(0)
    assert not bank.has_text_encoder_parts(1)
    bank.activate(0)
    torch.testing.assert_close(encoder.get_submodule(name).weight, expected)
    bank.deactivate()
    assert torch.equal(encoder.get_submodule(name).weight, base_weight)
    cache = EmbeddingCache(tiny_sd_pipe, bank, "", (32, 32))
    base, own, other = cache.get("a dog"), cache.get("a dog", 0), cache.get("a dog", 1)
    assert (own.hidden - base.hidden).abs().max() > 1e-3
    assert other is base  # no text-encoder part: the base embeddings are shared
    broken = FakeAdapter(3)
    broken.text_encoder_tensors = {"text_encoder.no.such.layer.lora_A.weight": torch.zeros(2, 32)}
    with pytest.raises(CompositionError, match="does not match this pipeline"):
        AdapterBank(tiny_sd_pipe, [broken])
