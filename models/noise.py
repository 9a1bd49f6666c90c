"""The Gaussian noise of a diffusion training step, with optional offset noise.

DDPM training (Ho et al., 2020) noises latents with standard Gaussian noise; offset noise (Guttenberg, 2023)
adds a per-image, per-channel constant of standard deviation `offset`, so the model cannot read an image's
mean brightness or colour from the nearly-pure noise of the last timesteps and must take it from the prompt.
Shared by the DreamBooth objective and the toy world's own UNet training.
"""

from __future__ import annotations

import torch


def training_noise(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, offset: float = 0.0
) -> torch.Tensor:
    """Float32 noise of `shape` (B, C, h, w) drawn from `generator`, plus `offset` x a (B, C, 1, 1) draw when
    `offset` is non-zero (drawn after the main noise, so offset 0 leaves the generator's stream unchanged)."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator)
    return noise
