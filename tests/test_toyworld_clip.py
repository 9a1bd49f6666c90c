"""The tiny CLIP: clip-anytorch load of the saved file, transformers conversion, resumable checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.clip_compat import clip
from models.toyworld import clip_model
from models.toyworld.checkpoint import load_state, save_state
from models.toyworld.clip_model import encode_text_truncated

CAPTIONS = ["a red circle on a white background", "a blue striped square and a yellow triangle", ""]


@pytest.fixture(scope="module")
def tiny_clip() -> clip.model.CLIP:
    model = clip_model.build_tiny_clip(seed=3)
    with torch.no_grad():  # non-trivial norms/biases so the conversion test sees every parameter
        for name, param in model.named_parameters():
            if "ln" in name or "bias" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def test_saved_file_loads_with_clip_load_and_matches(tiny_clip: clip.model.CLIP, tmp_path: Path) -> None:
    pt_path, st_path = clip_model.save_tiny_clip(tiny_clip, tmp_path / "tiny.pt")
    loaded, preprocess = clip.load(str(pt_path), device="cpu")
    tokens = clip.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = tiny_clip.half().float().encode_text(tokens)
        assert torch.allclose(loaded.encode_text(tokens), expected, atol=1e-4)
    assert preprocess.transforms[0].size == 32
    assert set(load_file(str(st_path))) == set(tiny_clip.state_dict())


def test_transformers_text_model_matches_clip_hidden_states(tiny_clip: clip.model.CLIP) -> None:
    tiny_clip = tiny_clip.float()
    text_model = clip_model.to_transformers_text_model(tiny_clip)
    tokens = clip.tokenize(CAPTIONS)
    with torch.no_grad():
        reference = clip_model.clip_text_hidden_states(tiny_clip, tokens)
        converted = text_model(tokens).last_hidden_state
    assert converted.shape == (3, 77, clip_model.WIDTH)
    torch.testing.assert_close(converted, reference, atol=1e-5, rtol=1e-5)
    assert text_model.config.hidden_act == "quick_gelu"


def test_truncated_text_encoding_equals_full_context(tiny_clip: clip.model.CLIP) -> None:
    tiny_clip = tiny_clip.float()
    tokens = clip.tokenize(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(
            encode_text_truncated(tiny_clip, tokens), tiny_clip.encode_text(tokens), atol=1e-5, rtol=1e-5
        )


def test_checkpoint_round_trip_restores_weights_optimizer_and_ema(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(8, 4)).square().mean().backward()
    optimizer.step()
    ema = [p.detach().clone() * 0.5 for p in net.parameters()]
    save_state(tmp_path / "s.safetensors", {"net": net}, optimizer, {"ema": ema}, step=7)

    other = torch.nn.Linear(4, 3)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    other_ema = [torch.zeros_like(p) for p in other.parameters()]
    assert load_state(tmp_path / "s.safetensors", {"net": other}, other_opt, {"ema": other_ema}) == 7
    for a, b in zip(net.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ema, other_ema, strict=True):
        assert torch.equal(a, b)
    moments = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], moments)
