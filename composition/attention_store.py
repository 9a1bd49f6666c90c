"""Cross-attention capture for CLoRA (Meral et al., 2024): a diffusers attention processor plus a store.

SDPA never materialises attention probabilities, so the capturing processor computes them explicitly
(`attn.get_attention_scores`, softmax(QKᵀ/√d)) and records them, head-averaged, for the cross-attention
layers of one resolution only. As in Attend-and-Excite / CLoRA that is the "16×16" level of SD 1.5 at
512 px: the cross-attention layers whose spatial size is the latent size / 4 (or the nearest level the UNet
has: 4×4 of the toy world's 16×16 latents). The processors are installed with `unet.set_attn_processor` for
the duration of a `capture_cross_attention` block and the previous ones are put back afterwards; every other
layer keeps its own processor. Recorded maps keep their autograd graph when gradients are on, so a loss on
them can move the latent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

TARGET_FACTOR = 4
"""Downsampling factor (relative to the latent) of the layers to capture: 64 -> 16 on SD 1.5 at 512 px."""


class AttentionStore:
    """Head-averaged cross-attention probabilities of the last UNet forward, per captured layer."""

    def __init__(self) -> None:
        self.maps: dict[str, torch.Tensor] = {}

    def record(self, layer: str, probs: torch.Tensor) -> None:
        """Keep `probs` (batch, pixels, tokens) for `layer`, replacing the previous forward's."""
        self.maps[layer] = probs

    def clear(self) -> None:
        """Forget everything recorded."""
        self.maps.clear()

    def token_maps(self, latent_size: tuple[int, int]) -> torch.Tensor:
        """Mean over captured layers, as images of the latent's aspect: (batch, tokens, h, w)."""
        if not self.maps:
            raise RuntimeError(
                "no cross-attention was recorded; run the UNet inside capture_cross_attention."
            )
        stacked = torch.stack(list(self.maps.values())).mean(0)  # (B, hw, T)
        batch, pixels, tokens = stacked.shape
        h, w = map_grid(pixels, latent_size)
        return stacked.transpose(1, 2).reshape(batch, tokens, h, w)  # (B, T, h, w)


def map_grid(pixels: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention map with `pixels` query positions, at the aspect of a latent of `latent_size`."""
    factor = (latent_size[0] * latent_size[1] / pixels) ** 0.5
    return round(latent_size[0] / factor), round(latent_size[1] / factor)


class CapturingAttnProcessor:
    """Attention with explicit probabilities; records cross-attention probabilities into a store."""

    def __init__(self, store: AttentionStore, layer: str) -> None:
        self.store = store
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        batch, keys, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·heads, HW, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (B·heads, T, d)
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B·heads, HW, T)
        if is_cross:
            per_head = probs.view(batch, attn.heads, *probs.shape[1:])
            self.store.record(self.layer, per_head.mean(1))  # (B, HW, T)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_factors(unet: nn.Module) -> dict[str, int]:
    """Processor name -> downsampling factor of every cross-attention layer (`attn2`) of a UNet2DCondition."""
    factors: dict[str, int] = {}
    factor = 1
    down_factor: dict[str, int] = {}
    for i, block in enumerate(unet.down_blocks):
        down_factor[f"down_blocks.{i}."] = factor
        if getattr(block, "downsamplers", None):
            factor *= 2
    down_factor["mid_block."] = factor
    for j, block in enumerate(unet.up_blocks):
        down_factor[f"up_blocks.{j}."] = factor
        if getattr(block, "upsamplers", None):
            factor //= 2
    for name in unet.attn_processors:
        if ".attn2." in name:
            prefix = next(p for p in down_factor if name.startswith(p))
            factors[name] = down_factor[prefix]
    return factors


def capture_layers(unet: nn.Module, target_factor: int | None = TARGET_FACTOR) -> list[str]:
    """The cross-attention processor names at the level nearest `target_factor` (ties: the coarser one);
    every level's with `target_factor=None`."""
    factors = cross_attention_factors(unet)
    if not factors:
        raise ValueError("this UNet has no cross-attention layers; it cannot be steered by token attention.")
    if target_factor is None:
        return list(factors)
    best = min(set(factors.values()), key=lambda f: (abs(f - target_factor), -f))
    return [name for name, f in factors.items() if f == best]


@contextmanager
def capture_cross_attention(
    unet: nn.Module, store: AttentionStore, target_factor: int | None = TARGET_FACTOR
) -> Iterator[list[str]]:
    """Install capturing processors on the chosen layers only (`capture_layers`); restore the previous
    processors afterwards."""
    previous = unet.attn_processors
    layers = capture_layers(unet, target_factor)
    chosen = set(layers)
    unet.set_attn_processor(
        {
            name: CapturingAttnProcessor(store, name) if name in chosen else proc
            for name, proc in previous.items()
        }
    )
    try:
        yield layers
    finally:
        unet.set_attn_processor(previous)
        store.clear()
