"""How the toy world's reports sample: the sampler settings, a seeded prompt case, and the images for a batch of
prompts with one generator per image (so batching never changes a sample). Shared by v1 and v2.

No paper of its own: DDIM (Song et al. 2021) with classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

GUIDANCE = 5.0
STEPS = 25


class Captioned(Protocol):
    """A scene of either world: what a `Case` needs of it."""

    def caption(self) -> str: ...


@dataclass(frozen=True)
class Case:
    """One prompt with the scene it describes and the seed it is generated with."""

    scene: Captioned
    seed: int


def sample(  # type: ignore[no-untyped-def]
    pipe, prompts: list[str], seeds: list[int], batch_size: int = 8, guidance: float = GUIDANCE
) -> list[Image.Image]:
    """One image per prompt, each from its own seeded generator (batching does not change them), with the
    toy world's sampler settings."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start : start + batch_size]]
        result = pipe(
            prompts[start : start + batch_size],
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=generators,
        )
        images.extend(result.images)
    return images


def folder_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20
