"""`merge`: one weighted sum of all adapters for the whole run (diffusers `set_adapters` semantics).

Baseline of LoRA composition (Zhong et al., 2024, "Multi-LoRA Composition for Image Generation", their
"LoRA Merge"): W = W0 + Σ wᵢ(Wᵢ − W0) with wᵢ the concept weights, no normalisation, exactly what
diffusers' `set_adapters(names, weights)` does for LoRAs. One CFG pair per step: base cost.
"""

from __future__ import annotations

from typing import Any

import torch

from composition.bank import AdapterBank
from composition.prompt import ConceptPrompt
from composition.sampling import EmbeddingCache, Progress, Result, Sampler, check_inputs


@torch.no_grad()
def generate(
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    *,
    height: int | None = None,
    width: int | None = None,
    progress: Progress | None = None,
) -> Result:
    """Generate with the weighted sum of every adapter active at every step."""
    check_inputs(bank, prompt)
    sampler = Sampler(pipe, steps, guidance, seed, height, width, progress)
    embeds = EmbeddingCache(pipe, bank, prompt.negative, sampler.size).get(prompt.text, prompt.weights)
    try:
        bank.activate(prompt.weights)
        for index, t in enumerate(sampler.timesteps):
            uncond, cond = sampler.predict(sampler.latents, t, embeds)
            sampler.step(sampler.guide(uncond, cond), t, index)
    finally:
        bank.deactivate()
    return sampler.result(weights=prompt.weights)
