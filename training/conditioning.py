"""The training set on the model side: cached text embeddings, cached VAE latents, batch assembly.

DreamBooth (Ruiz et al., 2023) trains only the UNet here (the adapter lives in its attention), so the
text encoder(s) and the VAE are frozen and their outputs never change: every distinct prompt is
encoded once, and — with ``cache_latents`` — every image (and its mirror image when flipping is on)
is encoded by the VAE once. The VAE's posterior (mean, std) is cached rather than one sample, so a
fresh latent is still drawn every step exactly as the uncached path does, from the same generator.

SD 1.x/2.x condition on the text encoder's hidden states; SDXL adds the pooled text embedding and
the ``(original size, crop offset, target size)`` time ids (Podell et al., 2023), kept per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from training.data import TrainingImage, flip_tensor, image_to_tensor

VAE_BATCH = 8


@dataclass
class Example:
    """One training image as the loop sees it: prompt id, pixels or cached posterior, SDXL time ids."""

    prompt_index: int
    is_class: bool
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    time_ids: torch.Tensor  # (6,) original h, w, crop top, left, target h, w
    posterior: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, std, each (C, h, w)
    flipped_posterior: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Batch:
    """Model inputs for one micro-batch (instance examples first, then class examples)."""

    latents: torch.Tensor  # (B, C, h, w), already scaled by the VAE scaling factor
    encoder_hidden_states: torch.Tensor  # (B, L, D)
    added_cond_kwargs: dict[str, torch.Tensor] | None
    num_instance: int


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    return isinstance(pipe, StableDiffusionXLPipeline)


@torch.no_grad()
def encode_prompts(
    pipe: DiffusionPipeline, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text-encoder hidden states (P, L, D) and, for SDXL, pooled embeddings (P, D2) of ``prompts``."""
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return embeds.float(), pooled.float()
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds.float(), None


@torch.no_grad()
def encode_posterior(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of a pixel batch (B, 3, H, W) → two (B, C, h, w) tensors (fp32)."""
    means, stds = [], []
    for start in range(0, pixels.shape[0], VAE_BATCH):
        chunk = pixels[start : start + VAE_BATCH].to(vae.device, vae.dtype)
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def scale_latents(vae: torch.nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """VAE sample → UNet latent space (``(x - shift) * scaling_factor``)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (sample - shift) * vae.config.scaling_factor


class TrainingSet:
    """Instance (and class) examples with cached prompts; draws model-ready micro-batches."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        instance: list[TrainingImage],
        instance_prompt: str,
        class_images: list[TrainingImage],
        class_prompt: str | None,
        resolution: int,
        *,
        device: torch.device,
        cache_latents: bool,
        random_flip: bool,
    ) -> None:
        self.vae = pipe.vae
        self.device = device
        self.random_flip = random_flip
        self.cache_latents = cache_latents
        self.sdxl = is_sdxl(pipe)
        prompts: list[str] = []

        def prompt_index(text: str) -> int:
            if text not in prompts:
                prompts.append(text)
            return prompts.index(text)

        def example(image: TrainingImage, prompt: str, is_class: bool) -> Example:
            time_ids = torch.tensor([*image.original_size, *image.crop_top_left, resolution, resolution])
            return Example(prompt_index(prompt), is_class, image_to_tensor(image.image), time_ids.float())

        self.instance = [example(im, im.caption or instance_prompt, False) for im in instance]
        self.classes = [example(im, im.caption or class_prompt or "", True) for im in class_images]
        self.prompts = prompts
        self.prompt_embeds, self.pooled_embeds = encode_prompts(pipe, prompts, device)
        if cache_latents:
            self._cache_posteriors()

    def _cache_posteriors(self) -> None:
        examples = self.instance + self.classes
        pixels = torch.stack([e.pixels for e in examples])
        mean, std = encode_posterior(self.vae, pixels)
        flipped = encode_posterior(self.vae, flip_tensor(pixels)) if self.random_flip else None
        for i, ex in enumerate(examples):
            ex.posterior = (mean[i], std[i])
            if flipped is not None:
                ex.flipped_posterior = (flipped[0][i], flipped[1][i])

    def _posteriors(self, examples: list[Example], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_latents:
            pairs = [e.flipped_posterior if f else e.posterior for e, f in zip(examples, flips, strict=True)]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        pixels = torch.stack(
            [flip_tensor(e.pixels) if f else e.pixels for e, f in zip(examples, flips, strict=True)]
        )
        return encode_posterior(self.vae, pixels)

    def batch(
        self, instance_ids: list[int], class_ids: list[int], flips: list[bool], generator: torch.Generator
    ) -> Batch:
        """Assemble a micro-batch; ``flips`` has one entry per example (instance then class).

        The latent is drawn from the posterior with ``generator`` (on CPU, so CPU and GPU runs agree).
        """
        examples = [self.instance[i] for i in instance_ids] + [self.classes[i] for i in class_ids]
        mean, std = self._posteriors(examples, flips)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        latents = scale_latents(self.vae, mean + std * eps.to(mean.device))
        prompt_ids = torch.tensor([e.prompt_index for e in examples])
        hidden = self.prompt_embeds[prompt_ids.to(self.prompt_embeds.device)]
        added = None
        if self.sdxl:
            time_ids = torch.stack([e.time_ids for e in examples]).to(self.device)
            pooled = self.pooled_embeds[prompt_ids.to(self.pooled_embeds.device)]
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return Batch(latents.to(self.device), hidden.to(self.device), added, len(instance_ids))
