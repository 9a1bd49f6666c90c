"""Direct attention-processor calls (models.attention_calls): same outputs as diffusers, no per-call inspection."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from models.attention_calls import DirectCallAttention, direct_attention_calls
from models.pipelines import load_pipeline
from tests.test_adapters import run, unet_inputs
from tests.tiny_models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline


def test_switched_unet_gives_bit_identical_outputs_and_gradients() -> None:
    unet = build_tiny_sd_pipeline().unet
    fast = copy.deepcopy(unet)
    count = sum(type(m) is Attention for m in unet.modules())
    assert count > 0 and direct_attention_calls(fast) == count
    assert not any(type(m) is Attention for m in fast.modules())
    assert all(isinstance(m, Attention) for m in fast.modules() if isinstance(m, DirectCallAttention))
    inputs = unet_inputs(unet)
    outputs = []
    for model in (unet, fast):
        x = inputs["sample"].clone().requires_grad_(True)
        out = model(**{**inputs, "sample": x}).sample
        out.square().mean().backward()
        outputs.append((out.detach(), x.grad))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])
    assert fast.state_dict().keys() == unet.state_dict().keys()


def test_no_signature_inspection_per_call_without_kwargs(monkeypatch: pytest.MonkeyPatch) -> None:
    unet = build_tiny_sd_pipeline().unet
    direct_attention_calls(unet)
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(a) or real(*a, **k))
    run(unet, unet_inputs(unet))
    assert calls == []


def test_kwargs_still_go_through_diffusers_filtering(caplog: pytest.LogCaptureFixture) -> None:
    """A processor that takes an extra kwarg receives it; an unknown kwarg is dropped as diffusers drops it."""
    seen: list[float] = []

    class ScaledProcessor(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     gain: float = 1.0):  # fmt: skip
            seen.append(gain)
            return gain * super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    layer = Attention(query_dim=8, heads=2, dim_head=4, processor=ScaledProcessor())
    x = torch.randn(1, 5, 8)
    reference = layer(x, gain=2.0)
    direct_attention_calls(layer)
    assert type(layer) is DirectCallAttention
    assert torch.equal(layer(x, gain=2.0), reference) and seen == [2.0, 2.0]
    assert torch.equal(layer(x, not_a_kwarg=1.0), layer(x))
    layer.set_processor(AttnProcessor2_0())
    assert torch.allclose(layer(x), reference / 2.0, atol=1e-6)


def test_load_pipeline_switches_unet_and_vae_attention(tiny_sd_path: Path, tiny_sdxl_path: Path) -> None:
    for path in (tiny_sd_path, tiny_sdxl_path):
        pipe = load_pipeline(path, device="cpu")
        for part in (pipe.unet, pipe.vae):
            layers = [m for m in part.modules() if isinstance(m, Attention)]
            assert layers and all(type(m) is DirectCallAttention for m in layers)


def test_sdxl_unet_outputs_unchanged() -> None:
    unet = build_tiny_sdxl_pipeline().unet
    fast = copy.deepcopy(unet)
    direct_attention_calls(fast)
    inputs = unet_inputs(unet)
    assert torch.equal(run(unet, inputs), run(fast, inputs))
