"""The denoising loop's shared pieces for every composition method: embeddings, latents, CFG, stepping, decode.

No paper of its own: this is the standard latent-diffusion sampler (Rombach et al., 2022) with
classifier-free guidance (Ho & Salimans, 2022), split into parts so that composition methods can run the
UNet several times per step under different adapters and combine the predictions before guidance.
Prompt embeddings are computed per adapter when the adapter changes a text encoder (imported kohya LoRAs),
otherwise shared. The UNet-evaluation counter counts one per conditional or unconditional prediction of one
image (a CFG pair is 2); methods report it in `Result.unet_evals`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from composition.bank import AdapterBank, Selection
from composition.errors import CompositionError
from composition.prompt import ConceptPrompt

Progress = Callable[..., None]
"""`progress(step, total, **info)`, called after every denoising step."""


@dataclass
class Result:
    """What every method returns: the images, the UNet evaluations spent, and method-specific extras."""

    images: list[Image.Image]
    unet_evals: int
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptEmbeds:
    """Text conditioning of one prompt for a CFG pair, batch order [unconditional, conditional]."""

    hidden: torch.Tensor  # (2, T, D)
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (2, P), time_ids (2, 6)

    def select(self, which: slice) -> PromptEmbeds:
        """A sub-batch (e.g. `slice(1, 2)` = conditional only)."""
        added = None if self.added is None else {k: v[which] for k, v in self.added.items()}
        return PromptEmbeds(self.hidden[which], added)


def encode_prompt(pipe: Any, text: str, negative: str, size: tuple[int, int]) -> PromptEmbeds:
    """Encode `text` and `negative` with the pipeline's own encoder(s) (SD 1.x/2.x or SDXL)."""
    device = pipe._execution_device
    with torch.no_grad():
        if isinstance(pipe, StableDiffusionXLPipeline):
            cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
                prompt=text, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negative or None,
            )  # fmt: skip
            projection = pipe.text_encoder_2.config.projection_dim
            time_ids = pipe._get_add_time_ids(
                size, (0, 0), size, cond.dtype, text_encoder_projection_dim=projection
            )
            added = {
                "text_embeds": torch.cat([pooled_uncond, pooled]),
                "time_ids": time_ids.to(device).repeat(2, 1),
            }
            return PromptEmbeds(torch.cat([uncond, cond]), added)
        cond, uncond = pipe.encode_prompt(text, device, 1, True, negative_prompt=negative or None)
        return PromptEmbeds(torch.cat([uncond, cond]))


class EmbeddingCache:
    """Prompt embeddings per (text, adapter selection); adapters without text-encoder parts share the base's."""

    def __init__(self, pipe: Any, bank: AdapterBank, negative: str, size: tuple[int, int]) -> None:
        self.pipe, self.bank, self.negative, self.size = pipe, bank, negative, size
        self._cache: dict[tuple[str, tuple[float, ...] | None], PromptEmbeds] = {}

    def get(self, text: str, selection: Selection = None) -> PromptEmbeds:
        """Embeddings of `text` with the text-encoder parts of `selection` active."""
        weights = self.bank.weights_for(selection)
        if weights is not None:
            weights = tuple(w if self.bank.has_text_encoder_parts(i) else 0.0 for i, w in enumerate(weights))
            weights = weights if any(weights) else None
        key = (text, weights)
        if key not in self._cache:
            with self.bank.using(None if weights is None else list(weights)):
                self._cache[key] = encode_prompt(self.pipe, text, self.negative, self.size)
        return self._cache[key]


class Sampler:
    """One image's denoising trajectory: seeded latents, timesteps, UNet calls with CFG, decode."""

    def __init__(
        self,
        pipe: Any,
        steps: int,
        guidance: float,
        seed: int,
        height: int | None = None,
        width: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        if steps < 1:
            raise CompositionError(f"steps must be >= 1, got {steps}.")
        if guidance < 0:
            raise CompositionError(f"guidance must be >= 0, got {guidance}.")
        self.pipe, self.unet = pipe, pipe.unet
        # A private scheduler: stepping state never leaks between trajectories (e.g. CMLoRA's profiling runs).
        self.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        self.steps, self.guidance, self.progress = steps, float(guidance), progress
        self.cfg = self.guidance > 1.0
        scale = pipe.vae_scale_factor
        default = self.unet.config.sample_size * scale
        self.height, self.width = height or default, width or default
        if self.height % scale or self.width % scale:
            raise CompositionError(
                f"height and width must be multiples of {scale}, got {self.height}x{self.width}."
            )
        self.device, self.dtype = pipe._execution_device, self.unet.dtype
        self.generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.scheduler.set_timesteps(steps, device=self.device)
        self.timesteps = self.scheduler.timesteps
        shape = (1, self.unet.config.in_channels, self.height // scale, self.width // scale)
        noise = randn_tensor(shape, generator=self.generator, device=torch.device("cpu"), dtype=torch.float32)
        self.latents = (noise.to(self.device, self.dtype)) * self.scheduler.init_noise_sigma
        accepts = set(inspect.signature(self.scheduler.step).parameters)
        self._step_kwargs = {"generator": self.generator} if "generator" in accepts else {}
        self.unet_evals = 0

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return (self.height, self.width)

    def batch_for(self, embeds: PromptEmbeds) -> PromptEmbeds:
        """The part of a CFG pair this sampler evaluates (conditional only when guidance is off)."""
        return embeds if self.cfg else embeds.select(slice(1, 2))

    def model_input(self, latents: torch.Tensor, t: torch.Tensor, batch: int) -> torch.Tensor:
        """Latents repeated to the batch and scaled for the scheduler."""
        return self.scheduler.scale_model_input(latents.expand(batch, *latents.shape[1:]), t)

    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) noise predictions under whatever the bank has active."""
        embeds = self.batch_for(embeds)
        batch = embeds.hidden.shape[0]
        out = self.unet(
            self.model_input(latents, t, batch), t, encoder_hidden_states=embeds.hidden,
            added_cond_kwargs=embeds.added, return_dict=False,
        )[0]  # fmt: skip
        self.unet_evals += batch
        return split_pair(out)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: ε = ε_u + g(ε_c − ε_u) (just ε_c when guidance <= 1)."""
        return uncond + self.guidance * (cond - uncond) if self.cfg else cond

    def step(self, eps: torch.Tensor, t: torch.Tensor, index: int, **info: Any) -> None:
        """Advance the latents one scheduler step and report progress."""
        self.latents = self.scheduler.step(eps, t, self.latents, **self._step_kwargs, return_dict=False)[0]
        if self.progress is not None:
            self.progress(index + 1, self.steps, **info)

    def decode(self, latents: torch.Tensor | None = None) -> list[Image.Image]:
        """Latents -> PIL images through the VAE (upcast to fp32 where the VAE asks for it)."""
        return decode_latents(self.pipe, self.latents if latents is None else latents)

    def result(self, **extras: Any) -> Result:
        """Decode the final latents into a `Result` with the evaluation count."""
        return Result(self.decode(), self.unet_evals, extras)


def split_pair(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A UNet output of batch 2 ([u, c]) or 1 ([c]) -> (uncond, cond)."""
    return (out[:1], out[1:2]) if out.shape[0] == 2 else (out, out)


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Decode latents with the pipeline's VAE and image processor."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    original = vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor
        image = vae.decode(scaled, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(original)
    return pipe.image_processor.postprocess(image.detach().float(), output_type="pil")


def check_inputs(bank: AdapterBank, prompt: ConceptPrompt) -> None:
    """The prompt must name one concept per adapter of the bank."""
    if len(prompt.concepts) != len(bank):
        raise CompositionError(
            f"the prompt binds {len(prompt.concepts)} concepts but the bank holds {len(bank)} adapters; "
            "give one phrase per adapter."
        )
