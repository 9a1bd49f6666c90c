"""`switch`: LoRA Switch (Zhong et al., 2024, "Multi-LoRA Composition for Image Generation").

One adapter active at a time, rotating in bank order, the first adapter first. Two schedules:
- `preset="paper"`: the reference code's step callback (`Yqcca/CMLoRA` 5e79e41 `callbacks_sa.py`, which
  `compose_offline.py` uses; Zhong et al.'s `callbacks.py` for more than two): after step i the next adapter
  takes over when there are two adapters (every step), otherwise when i > 0 and i is a multiple of τ = 5 — the
  first adapter holds steps 0..τ, the next ones τ steps each.
- `preset="atelier"`: the adapter at step i is ⌊i/τ⌋ mod N (τ = `interval`, default 5).
`interval` overrides τ in either. The bank swaps tensors, so a switch costs a pointer swap per touched layer.
Concept weights scale the active adapter (w·ΔW), as the reference's per-LoRA scales do. One CFG pair per step:
the cost of a single-adapter run. The active adapter reads its own branch prompt (`ConceptPrompt.branch_text`:
the other concepts in their plain forms, when they have them). Measurements: `docs/composition_baselines.md`.
"""

from __future__ import annotations

from typing import Any

import torch

from composition.bank import AdapterBank
from composition.errors import CompositionError
from composition.prompt import ConceptPrompt
from composition.sampling import EmbeddingCache, Progress, Result, Sampler, check_inputs

DEFAULT_INTERVAL = 5
"""τ, steps between switches (`switch_step` in the reference scripts; their callback uses it with more than two
adapters)."""
PRESETS = ("atelier", "paper")
DEFAULT_PRESET = "atelier"
"""The toy world's best measured schedule (`docs/composition_baselines.md`)."""


def schedule(steps: int, adapters: int, interval: int) -> list[int]:
    """Atelier's schedule: the active adapter at step i is ⌊i/τ⌋ mod N."""
    return [(i // interval) % adapters for i in range(steps)]


def paper_schedule(steps: int, adapters: int, interval: int = DEFAULT_INTERVAL) -> list[int]:
    """The reference callback's schedule: after step i the next adapter takes over when N <= 2, else when
    i > 0 and i % τ == 0."""
    active, order = 0, []
    for index in range(steps):
        order.append(active)
        if adapters <= 2 or (index > 0 and index % interval == 0):
            active = (active + 1) % adapters
    return order


@torch.no_grad()
def generate(
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    *,
    preset: str = DEFAULT_PRESET,
    interval: int = DEFAULT_INTERVAL,
    height: int | None = None,
    width: int | None = None,
    progress: Progress | None = None,
) -> Result:
    """Generate with one adapter active per step, switching on the preset's schedule."""
    check_inputs(bank, prompt)
    if preset not in PRESETS:
        raise CompositionError(f"unknown switch preset {preset!r}; choose one of {list(PRESETS)}.")
    if interval < 1:
        raise CompositionError(f"switch interval must be >= 1 step, got {interval}.")
    sampler = Sampler(pipe, steps, guidance, seed, height, width, progress)
    cache = EmbeddingCache(pipe, bank, prompt.negative, sampler.size)
    make = paper_schedule if preset == "paper" else schedule
    order = make(steps, len(bank), interval)
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
    return sampler.result(schedule=order, interval=interval, preset=preset)
