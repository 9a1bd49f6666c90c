"""Where a UNet reads a prompt: the cross-attention mass each prompt token receives.

No paper: a measurement. CLoRA (Meral et al., 2024), Attend-and-Excite and Prompt-to-Prompt read a word's
cross-attention map as the place where that word acts; that only holds where the UNet actually attends to
the words. This tool generates a prompt and reports, for each latent resolution and each image half, the
share of attention every token gets (start token, words, end token, padding summed), averaged over heads,
the cross-attention layers of that resolution, the denoising steps and the seeds (conditional half of
classifier-free guidance only). It works on any `StableDiffusionPipeline`; docs/toyworld_v2.md uses it on the
toy world.

    python -m composition.attention_mass --pipeline DIR --prompt "a red star on the left and a blue ring on the right"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch

from composition.attention_store import (
    AttentionStore,
    capture_cross_attention,
    cross_attention_factors,
    map_grid,
)

HALVES = ("left", "right")


@torch.no_grad()
def attention_mass(
    pipe: Any, prompt: str, seeds: Sequence[int] = (0, 1, 2, 3), steps: int = 25, guidance: float = 5.0
) -> tuple[list[str], dict[tuple[int, str], torch.Tensor]]:
    """(token labels, {(downsampling factor, half): mass per token position}). Each mass vector sums to 1
    over the tokenizer's full length; positions past the end token are the padding."""
    unet = pipe.unet
    factors = cross_attention_factors(unet)
    store = AttentionStore()
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[tuple[int, str], int] = {}

    def collect(_pipe: Any, _step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        for layer, probs in store.maps.items():
            conditional = probs[probs.shape[0] // 2 :] if guidance > 1 else probs  # (B, HW, T)
            h, w = map_grid(conditional.shape[1], tuple(kwargs["latents"].shape[-2:]))
            grid = conditional.reshape(conditional.shape[0], h, w, conditional.shape[-1])
            middle = grid.shape[2] // 2
            for half, columns in zip(HALVES, (slice(0, middle), slice(middle, None)), strict=True):
                key = (factors[layer], half)
                mass = grid[:, :, columns].float().mean(dim=(0, 1, 2))
                sums[key] = sums.get(key, 0) + mass
                counts[key] = counts.get(key, 0) + 1
        store.clear()
        return kwargs

    with capture_cross_attention(unet, store, target_factor=None):
        for seed in seeds:
            pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                callback_on_step_end=collect,
                output_type="latent",
            )
    ids = pipe.tokenizer(prompt).input_ids
    labels = [pipe.tokenizer.decode([token]) for token in ids]
    return labels, {key: total / counts[key] for key, total in sorted(sums.items())}


def format_mass(labels: list[str], masses: dict[tuple[int, str], torch.Tensor]) -> str:
    """One line per (factor, half): each token's share, then the padding's."""
    lines = []
    for (factor, half), mass in masses.items():
        words = " ".join(f"{label}:{float(mass[i]):.2f}" for i, label in enumerate(labels))
        lines.append(f"1/{factor:<2} {half:<5} {words} | padding:{float(mass[len(labels) :].sum()):.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a diffusers folder, hub id or single file")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 (default 4)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        parser.error("--seeds and --steps must be at least 1")
    from models.pipelines import ModelLoadError, load_pipeline

    try:
        pipe = load_pipeline(args.pipeline, device="cpu", dtype="fp32")
    except ModelLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    labels, masses = attention_mass(pipe, args.prompt, range(args.seeds), args.steps, args.guidance)
    print(format_mass(labels, masses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
