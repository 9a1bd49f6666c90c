"""`switch`: LoRA Switch (Zhong et al., 2024, "Multi-LoRA Composition for Image Generation").

One adapter active at a time, rotating every τ denoising steps in bank order, the first adapter first:
the adapter at step i is ⌊i/τ⌋ mod N. The reference (`maszhongming/Multi-LoRA-Composition`) switches inside
a scheduler callback by toggling `set_adapters`; here the bank swaps tensors, so a switch costs a pointer
swap per touched layer. Concept weights scale the active adapter (w·ΔW), as the reference's per-LoRA
scales do. One CFG pair per step: the cost of a single-adapter run. The active adapter reads its own branch
prompt (`ConceptPrompt.branch_text`: the other concepts in their plain forms, when they have them).
"""

from __future__ import annotations

from typing import Any

import torch

from composition.bank import AdapterBank
from composition.errors import CompositionError
from composition.prompt import ConceptPrompt
from composition.sampling import EmbeddingCache, Progress, Result, Sampler, check_inputs

DEFAULT_INTERVAL = 5
"""τ, steps between switches (the reference's default `switch_step`)."""


def schedule(steps: int, adapters: int, interval: int) -> list[int]:
    """The active adapter at each step: ⌊i/τ⌋ mod N."""
    return [(i // interval) % adapters for i in range(steps)]


@torch.no_grad()
def generate(
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    *,
    interval: int = DEFAULT_INTERVAL,
    height: int | None = None,
    width: int | None = None,
    progress: Progress | None = None,
) -> Result:
    """Generate with one adapter active per step, switching every `interval` steps."""
    check_inputs(bank, prompt)
    if interval < 1:
        raise CompositionError(f"switch interval must be >= 1 step, got {interval}.")
    sampler = Sampler(pipe, steps, guidance, seed, height, width, progress)
    cache = EmbeddingCache(pipe, bank, prompt.negative, sampler.size)
    order = schedule(steps, len(bank), interval)
    weights = prompt.weights
    try:
        for index, t in enumerate(sampler.timesteps):
            active = order[index]
            selection = [weights[i] if i == active else 0.0 for i in range(len(bank))]
            embeds = cache.get(prompt.branch_text(active), selection)
            bank.activate(selection)
            uncond, cond = sampler.predict(sampler.latents, t, embeds)
            sampler.step(sampler.guide(uncond, cond), t, index, adapter=bank.names[active])
    finally:
        bank.deactivate()
    return sampler.result(schedule=order, interval=interval)
