"""DeepCache-style feature reuse (Ma et al., 2024, "DeepCache: Accelerating Diffusion Models for Free").

Adjacent denoising steps produce nearly the same deep UNet features. Number the UNet's skip connections in the
order the down path produces them: 0 = the output of `conv_in`, then each down resnet (with its transformer
where the block has one) and each downsampler. The up path consumes them in reverse, one per up resnet. A
cached forward at branch `k` recomputes the down path as far as skip `k`, then the up path from the resnet that
consumes skip `k` to the output head, and feeds the deep feature recorded by the last full forward (the hidden
state entering that resnet, before its skip is joined) in place of everything else.

- Branch 0 (`SHALLOW_BRANCH`, Atelier's default): `conv_in`, the last up resnet (and its transformer), the head:
  DeepCache's `cache_branch_id=0`.
- Branch 2 (`PAPER_BRANCH`): what CMLoRA's reference code (Zou et al., 2025, `Yqcca/CMLoRA` 5e79e41,
  `compose_offline.py`: `cache_layer_id=0, cache_block_id=1`) recomputes. On SD 1.5 that is the whole 64×64 level
  (the first down block's two layers, the last up block's three); on a UNet with one layer per block, such as the
  toy world's, the same skip is the first downsampler's output, so the cached pass recomputes the first down
  block with its downsampler and the up path from the second-to-last up block's last layer: the 16×16 and 8×8
  levels of a 16×16 latent.

CMLoRA uses this for its adapters, one cache per adapter and per CFG half. The deep feature is read with a
forward pre-hook on the consuming resnet that exists only during the recording forward; the cached forward is
written against diffusers' `UNet2DConditionModel` building blocks (SD 1.x/2.x and SDXL configurations; no
ControlNet/T2I residuals, no FreeU). Measurements of the branch points: `docs/composition_baselines.md`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SHALLOW_BRANCH = 0
"""Atelier's branch: only the shallowest skip connection is recomputed."""
PAPER_BRANCH = 2
"""CMLoRA's reference branch (DeepCache layer 0, block 1 as its `compose_offline.py` passes it)."""


class DeepFeatureCache:
    """The deep feature of the last full forward, per key (e.g. adapter index)."""

    def __init__(self) -> None:
        self.features: dict[Any, torch.Tensor] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self.features

    def clear(self) -> None:
        """Forget every cached feature."""
        self.features.clear()


def skip_count(unet: nn.Module) -> int:
    """How many skip connections (branch points) the UNet has: one per up resnet."""
    return sum(len(block.resnets) for block in unet.up_blocks)


def _consumer(unet: nn.Module, branch: int) -> tuple[int, int]:
    """(up block, resnet) that consumes skip `branch`."""
    total = skip_count(unet)
    if not 0 <= branch < total:
        raise ValueError(f"cache branch must be in [0, {total - 1}] for this UNet, got {branch}.")
    position = total - 1 - branch  # in the flat order of the up resnets
    for number, block in enumerate(unet.up_blocks):
        if position < len(block.resnets):
            return number, position
        position -= len(block.resnets)
    raise AssertionError("unreachable: position checked against the total")


def _skip_channels(unet: nn.Module, branch: int) -> int:
    """Channels of skip `branch` (the part of the consumer's input that is not the deep feature)."""
    channels = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        channels += [resnet.out_channels for resnet in block.resnets]
        if getattr(block, "downsamplers", None):
            channels.append(block.downsamplers[0].out_channels)
    return channels[branch]


def full_forward(
    unet: nn.Module,
    cache: DeepFeatureCache,
    key: Any,
    sample: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    branch: int = SHALLOW_BRANCH,
) -> torch.Tensor:
    """A normal UNet forward that also records, under `key`, the deep feature of cache branch `branch`."""
    block, index = _consumer(unet, branch)
    consumer = unet.up_blocks[block].resnets[index]
    skip_channels = _skip_channels(unet, branch)

    def record(_: nn.Module, args: tuple, kwargs: dict) -> None:
        joined = kwargs["input_tensor"] if "input_tensor" in kwargs else args[0]  # cat([deep, skip], dim=1)
        cache.features[key] = joined[:, :-skip_channels].detach()

    handle = consumer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return unet(
            sample, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]  # fmt: skip
    finally:
        handle.remove()


def shallow_forward(
    unet: nn.Module,
    cache: DeepFeatureCache,
    key: Any,
    sample: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
    branch: int = SHALLOW_BRANCH,
) -> torch.Tensor:
    """The UNet output with everything deeper than skip `branch` replaced by the cached deep feature."""
    timestep = t.expand(sample.shape[0]) if t.ndim else t.repeat(sample.shape[0])
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    emb = emb + aug if aug is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    context = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    skips = _down_to(unet, unet.conv_in(sample), emb, context, branch)  # skips 0..branch
    hidden = cache.features[key]
    first_block, first_index = _consumer(unet, branch)
    for number in range(first_block, len(unet.up_blocks)):
        block = unet.up_blocks[number]
        attentions = getattr(block, "attentions", None)
        for index in range(first_index if number == first_block else 0, len(block.resnets)):
            hidden = block.resnets[index](torch.cat([hidden, skips.pop()], dim=1), emb)
            if attentions:
                hidden = attentions[index](hidden, encoder_hidden_states=context, return_dict=False)[0]
        if getattr(block, "upsamplers", None):
            size = skips[-1].shape[2:] if skips else None
            for upsampler in block.upsamplers:
                hidden = upsampler(hidden, size)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


def _down_to(
    unet: nn.Module, hidden: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, branch: int
) -> list[torch.Tensor]:
    """Skips 0..`branch` of the down path (each (B, C, h, w)), computed as the UNet's down blocks do."""
    skips = [hidden]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        for index, resnet in enumerate(block.resnets):
            if len(skips) > branch:
                return skips
            hidden = resnet(hidden, emb)
            if attentions:
                hidden = attentions[index](hidden, encoder_hidden_states=context, return_dict=False)[0]
            skips.append(hidden)
        if getattr(block, "downsamplers", None):
            if len(skips) > branch:
                return skips
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            skips.append(hidden)
    return skips
