"""Validation samples during DreamBooth training: seeded image grids written as ``validation/step-N.png``.

The same prompt and the same seeds at every validation step, so the grids show how the subject
emerges (and whether it starts to overfit) as training goes on. The pipeline shares the UNet being
trained, so the adapter is active; the UNet is switched to eval mode for sampling and back after.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image

from models.atomic_write import atomic_write


@torch.no_grad()
def sample_images(
    pipe: DiffusionPipeline,
    prompt: str,
    count: int,
    *,
    resolution: int,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> list[Image.Image]:
    """``count`` images of ``prompt``; image ``k`` uses CPU generator seed ``seed + k``."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    try:
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(count)]
        return pipe(
            [prompt] * count,
            height=resolution,
            width=resolution,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
        ).images
    finally:
        pipe.unet.train(was_training)


def save_grid(images: list[Image.Image], path: Path) -> Path:
    """Tile ``images`` into a near-square grid and write it atomically as PNG."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size, (0, 0, 0))
    grid = make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)
    return atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
