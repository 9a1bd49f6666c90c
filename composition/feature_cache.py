"""DeepCache-style feature reuse (Ma et al., 2024, "DeepCache: Accelerating Diffusion Models for Free").

Adjacent denoising steps produce nearly the same deep UNet features. A full forward records the feature
entering the last (shallowest) up block; a cached forward then recomputes only the shallow path (time
embedding, `conv_in`, the first down block, the last up block, the output head) and feeds the recorded deep
feature in place of everything below. CMLoRA (Zou et al., 2025) uses this for its non-dominant adapters, one
cache per adapter and per CFG half. The deep feature is read with a forward pre-hook on the last up block
that exists only during the recording forward; the shallow forward is written against diffusers'
`UNet2DConditionModel` building blocks (SD 1.x/2.x and SDXL configurations; no ControlNet/T2I residuals).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DeepFeatureCache:
    """The deep feature of the last full forward, per key (e.g. adapter index)."""

    def __init__(self) -> None:
        self.features: dict[Any, torch.Tensor] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self.features

    def clear(self) -> None:
        """Forget every cached feature."""
        self.features.clear()


def full_forward(
    unet: nn.Module,
    cache: DeepFeatureCache,
    key: Any,
    sample: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """A normal UNet forward that also records the deep feature under `key`."""
    last_up = unet.up_blocks[-1]

    def record(_: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache.features[key] = hidden.detach()

    handle = last_up.register_forward_pre_hook(record, with_kwargs=True)
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
) -> torch.Tensor:
    """The UNet output with every block below the shallowest level replaced by the cached deep feature."""
    deep = cache.features[key]
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
    hidden = unet.conv_in(sample)  # (B, C0, h, w)
    skips: tuple[torch.Tensor, ...] = (hidden,)
    first_down = unet.down_blocks[0]
    for index, resnet in enumerate(first_down.resnets):
        hidden = resnet(hidden, emb)
        if getattr(first_down, "has_cross_attention", False):
            hidden = first_down.attentions[index](hidden, encoder_hidden_states=context, return_dict=False)[0]
        skips += (hidden,)
    last_up = unet.up_blocks[-1]
    skips = skips[-len(last_up.resnets) :]
    if getattr(last_up, "has_cross_attention", False):
        out = last_up(
            hidden_states=deep, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=context
        )
    else:
        out = last_up(hidden_states=deep, temb=emb, res_hidden_states_tuple=skips)
    if unet.conv_norm_out is not None:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)
