"""`composite`: LoRA Composite (Zhong et al., 2024, "Multi-LoRA Composition for Image Generation").

At every step each adapter, alone, gives its conditional and unconditional noise predictions; the
conditional ones are averaged, the unconditional ones are averaged, then classifier-free guidance is applied
to the two averages. Concept weights scale each adapter (w·ΔW), as the reference's per-LoRA scales do; the
average is uniform, as in the paper. Cost: N CFG pairs per step. Each adapter reads its own branch prompt
(`ConceptPrompt.branch_text`: the other concepts in their plain forms, when they have them).
"""

from __future__ import annotations

from typing import Any

import torch

from composition.bank import AdapterBank
from composition.prompt import ConceptPrompt
from composition.sampling import EmbeddingCache, Progress, Result, Sampler, check_inputs


def one_hot(index: int, weights: list[float]) -> list[float]:
    """Adapter `index` alone at its concept weight."""
    return [w if i == index else 0.0 for i, w in enumerate(weights)]


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
    """Generate from the per-step average of every adapter's own predictions."""
    check_inputs(bank, prompt)
    sampler = Sampler(pipe, steps, guidance, seed, height, width, progress)
    cache = EmbeddingCache(pipe, bank, prompt.negative, sampler.size)
    selections = [one_hot(i, prompt.weights) for i in range(len(bank))]
    embeds = [cache.get(prompt.branch_text(i), s) for i, s in enumerate(selections)]
    try:
        for index, t in enumerate(sampler.timesteps):
            uncond_sum = cond_sum = None
            for selection, embed in zip(selections, embeds, strict=True):
                bank.activate(selection)
                uncond, cond = sampler.predict(sampler.latents, t, embed)
                uncond_sum = uncond if uncond_sum is None else uncond_sum + uncond
                cond_sum = cond if cond_sum is None else cond_sum + cond
            n = len(selections)
            sampler.step(sampler.guide(uncond_sum / n, cond_sum / n), t, index)
    finally:
        bank.deactivate()
    return sampler.result()
