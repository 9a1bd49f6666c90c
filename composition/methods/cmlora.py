"""`cmlora`: Cached Multi-LoRA composition (Zou et al., 2025, "Cached Multi-LoRA Composition for
Multi-Concept Image Generation", ICLR; reference code `Yqcca/CMLoRA`).

Composite-style (each adapter predicts on its own, predictions are combined, then CFG) with three changes:

1. **Frequency order.** Each adapter's high-frequency energy is measured at run time from what it alone
   produces (a short `profile_steps`-step sample at a fixed seed, decoded, radial log-amplitude FFT spectrum;
   see `composition.frequency`), or taken from `frequency_scores` (e.g. measured on its sample grid). Adapters
   are ordered from most to least high-frequency energy; the dominant adapter of step i is
   order[⌊i·N/steps⌋], so high-frequency adapters dominate early steps and low-frequency ones late.
   The reference hard-codes this order by LoRA category; measuring it is the paper's intent.
   Measured scores are cached on the bank per (adapter, prompt, size, profile steps), so a batch of seeds
   pays for profiling once; `extras["profile_evals"]` says what a call spent on it.
2. **Dominant weight.** The dominant adapter's prediction gets the share w_dom = (N−0.5)/(2N−1.5) of the
   total and the others share 1 − w_dom equally (N=2: 0.6/0.4; N=3: 0.556/0.222/0.222). The reference's
   "decaying" dominant weight never actually decays; this keeps the stated share constant.
3. **Non-uniform caching.** Non-dominant adapters recompute the full UNet only at refresh steps and
   otherwise run the shallow path with their own cached deep feature (DeepCache-style, see
   `composition.feature_cache`). Refresh steps are spaced by a cosine law, ⌈steps/cache_interval⌉ of
   them, denser at the start and end of sampling than in the middle. The reference caches nothing unless
   its interval is >= 2; here any interval >= 1 works and `cache_interval=1` disables caching (every step
   refreshes). The dominant adapter runs the full UNet at every step except the refresh steps after the first:
   there (`dominant_yields`, Atelier's addition, on by default) it reuses the deep feature of its full pass
   one step earlier while the others recompute, so a step costs one full pass, N−1 at refresh steps, and N at
   step 0, where nothing is cached yet (N=2: 52 UNet evaluations at 25 steps against composite's 100,
   instead of 60-64 with the dominant adapter always in full). Measured on the toy world (32 seeds, both
   concepts present, regions on): 29 of 32 with it and without it on purple BOFT + heart LoRA, 29 and 29 on
   purple HRA + heart KronA; on one object ("a purple heart on a white background", no regions) 22 with it,
   23 without. `dominant_yields=False` keeps the dominant adapter in full at every step, as the paper does;
   with `cache_interval=1` every adapter runs in full at every step either way.
4. **Regions (Atelier's addition).** The paper composes concepts that share the whole image (a character, its
   clothes, a style); mixed over every cell, two concepts meant to be separate objects ("my dog and my cat")
   average into one another (toy world, "a purple square and a blue heart": both present in 0% of 32 seeds,
   as with composite). With `regions` (default: on when the prompt names more than one object,
   `ConceptPrompt.objects`) each adapter's full forwards also record its concept's cross-attention, and the
   step's mix is applied per cell: inside an object's region (`composition.regions`, CLoRA's masks as its
   `partition` preset reads them) only that object's adapters mix, with their dominance shares renormalised;
   cells no region holds take the plain mix. Dominance order, shares and caching are unchanged, but a cached
   adapter now draws its region alone, so the default refresh interval is 4 there instead of 5
   (`REGIONAL_CACHE_INTERVAL`). On one object every concept shares the object's cells and the result is the
   plain mix. The final masks are in `extras["masks"]`.

Each adapter reads its own branch prompt (`ConceptPrompt.branch_text`: the other concepts in their plain forms,
when they have them), for its profiling sample too.

`unet_evals` counts full UNet predictions (sampling plus any profiling; `extras` splits them); shallow
(cached) predictions are reported separately in `extras["shallow_evals"]`, because they cost a fraction of a
full one. Region masks cost no extra forward: they are read from the cross-attention of the full forwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from composition.attention_store import AttentionStore, capture_cross_attention
from composition.bank import AdapterBank
from composition.contrastive import branch_masks, concept_strength, normalised_token_maps
from composition.errors import CompositionError
from composition.feature_cache import DeepFeatureCache, full_forward, shallow_forward
from composition.frequency import frequency_order, high_frequency_energy
from composition.methods.composite import one_hot
from composition.prompt import ConceptPrompt
from composition.regions import RegionTracker, eos_position
from composition.sampling import EmbeddingCache, Progress, Result, Sampler, check_inputs, split_pair

DEFAULT_CACHE_INTERVAL = 5
"""Mean steps between full recomputations of a non-dominant adapter when the adapters mix over the whole
image. Measured on the toy world (N=2 LoRA + BOFT, 25 steps, 32 seeds, purple kept on the left): interval 1
(no caching) 59%, 5 56%, 8 56%, 10 34%."""
REGIONAL_CACHE_INTERVAL = 4
"""The same under `regions`, where a cached adapter draws its own region alone instead of 40% of every cell,
so its stale deep feature weighs fully there. Toy world, both concepts present over seeds 0-31 (purple BOFT +
heart LoRA / purple HRA + heart KronA): interval 3 88% / 91%, 4 91% / 91%, 5 72% / 75%; interval 1 (no
caching) 94% on the second."""
DEFAULT_PROFILE_STEPS = 4
"""Denoising steps of each adapter's frequency-profiling sample."""
REGION_THRESHOLD = 0.3
"""α of the regional masks (CLoRA's): a concept's cells are where its mean strength is >= α of its peak."""
PROFILE_SEED = 0
"""Seed of the profiling samples (fixed, so cached scores do not depend on the generation seed)."""


def default_cache_interval(regional: bool) -> int:
    """`cache_interval` when none is given: `REGIONAL_CACHE_INTERVAL` under regions, else the global one."""
    return REGIONAL_CACHE_INTERVAL if regional else DEFAULT_CACHE_INTERVAL


def dominant_share(n: int) -> float:
    """w_dom = (N − 0.5) / (2N − 1.5): the dominant adapter's share of the combined prediction."""
    return (n - 0.5) / (2 * n - 1.5)


def mixing_weights(n: int, dominant: int) -> list[float]:
    """Per-adapter weights of a step: w_dom for the dominant adapter, the rest shared equally."""
    if n == 1:
        return [1.0]
    share = dominant_share(n)
    return [share if i == dominant else (1.0 - share) / (n - 1) for i in range(n)]


def dominant_schedule(steps: int, order: Sequence[int]) -> list[int]:
    """Dominant adapter per step: contiguous blocks in `order` (first = most high-frequency)."""
    n = len(order)
    return [order[min(n - 1, i * n // steps)] for i in range(steps)]


def refresh_steps(steps: int, interval: int) -> set[int]:
    """Steps at which cached adapters recompute fully: ⌈steps/interval⌉ points on a cosine law (dense at
    both ends); every step when `interval` is 1."""
    if interval <= 1 or steps <= 2:
        return set(range(steps))
    count = max(2, math.ceil(steps / interval))
    points = {round((steps - 1) * (1 - math.cos(math.pi * k / (count - 1))) / 2) for k in range(count)}
    return points | {0}


def regional_weights(mix: Sequence[float], masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) per-cell mixing weights: each adapter's step weight inside its own mask, renormalised over
    the adapters whose masks hold the cell; the step weights themselves where no mask does."""
    share = torch.tensor(list(mix), dtype=masks.dtype, device=masks.device).view(-1, 1, 1)
    weights = share * masks
    total = weights.sum(0, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(1e-12), share.expand_as(weights))


def _mixed(weights: torch.Tensor, predictions: list[torch.Tensor]) -> torch.Tensor:
    """Σᵢ wᵢ εᵢ over the adapters' (1, C, H, W) predictions."""
    return (weights.to(predictions[0]) * torch.stack(predictions)).sum(0)


def profile_scores(
    pipe: Any, bank: AdapterBank, prompt: ConceptPrompt, guidance: float, size: tuple[int, int], steps: int
) -> tuple[list[float], int]:
    """Each adapter's high-frequency energy from a short sample of it alone; (scores, UNet evals spent)."""
    cache = bank.memo.setdefault("cmlora_frequency_scores", {})
    embeds_cache = EmbeddingCache(pipe, bank, prompt.negative, size)
    scores, spent = [], 0
    for index in range(len(bank)):
        selection = one_hot(index, prompt.weights)
        text = prompt.branch_text(index)
        key = (index, tuple(selection), text, size, steps, guidance)
        if key not in cache:
            sampler = Sampler(pipe, steps, guidance, PROFILE_SEED, *size)
            embeds = embeds_cache.get(text, selection)
            bank.activate(selection)
            for step_index, t in enumerate(sampler.timesteps):
                sampler.step(sampler.guide(*sampler.predict(sampler.latents, t, embeds)), t, step_index)
            cache[key] = high_frequency_energy(sampler.decode()[0])
            spent += sampler.unet_evals
        scores.append(cache[key])
    bank.deactivate()
    return scores, spent


@torch.no_grad()
def generate(
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    *,
    cache_interval: int | None = None,
    profile_steps: int = DEFAULT_PROFILE_STEPS,
    frequency_scores: Sequence[float] | None = None,
    regions: bool | None = None,
    mask_threshold: float = REGION_THRESHOLD,
    dominant_yields: bool = True,
    height: int | None = None,
    width: int | None = None,
    progress: Progress | None = None,
) -> Result:
    """Generate with a frequency-ordered dominant adapter and cached non-dominant adapters."""
    check_inputs(bank, prompt)
    objects = prompt.objects()
    regional = len(objects) > 1 if regions is None else bool(regions)
    if cache_interval is None:
        cache_interval = default_cache_interval(regional)
    if cache_interval < 1:
        raise CompositionError(f"cache_interval must be >= 1, got {cache_interval}.")
    if profile_steps < 1:
        raise CompositionError(f"profile_steps must be >= 1, got {profile_steps}.")
    if not 0.0 <= mask_threshold <= 1.0:
        raise CompositionError(f"cmlora mask_threshold must be in [0, 1], got {mask_threshold}.")
    n = len(bank)
    sampler = Sampler(pipe, steps, guidance, seed, height, width, progress)
    if frequency_scores is not None:
        if len(frequency_scores) != n:
            raise CompositionError(f"got {len(frequency_scores)} profile scores for {n} adapters.")
        scores, profile_evals = [float(s) for s in frequency_scores], 0
    else:
        scores, profile_evals = profile_scores(pipe, bank, prompt, guidance, sampler.size, profile_steps)
    order = frequency_order(scores)
    dominants = dominant_schedule(steps, order)
    refresh = refresh_steps(steps, cache_interval)
    cache = DeepFeatureCache()
    embeds_cache = EmbeddingCache(pipe, bank, prompt.negative, sampler.size)
    selections = [one_hot(i, prompt.weights) for i in range(n)]
    embeds = [sampler.batch_for(embeds_cache.get(prompt.branch_text(i), s)) for i, s in enumerate(selections)]
    shallow = 0
    store = AttentionStore()
    tracker = RegionTracker(n, objects, mask_threshold)
    reads = (  # each adapter's own concept in its own branch: (EOS position, token positions)
        [(eos_position(pipe, prompt.branch_text(i)), prompt.token_indices(pipe, i)[i]) for i in range(n)]
        if regional
        else []
    )
    latent_size = tuple(sampler.latents.shape[-2:])
    masks = None
    capture = capture_cross_attention(pipe.unet, store) if regional else nullcontext()
    try:
        with capture:
            for index, t in enumerate(sampler.timesteps):
                uncond, cond = [], []
                for adapter in range(n):
                    bank.activate(selections[adapter])
                    embed = embeds[adapter]
                    batch = embed.hidden.shape[0]
                    model_input = sampler.model_input(sampler.latents, t, batch)
                    args = (pipe.unet, cache, adapter, model_input, t, embed.hidden, embed.added)
                    dominant = adapter == dominants[index]
                    refreshing = index in refresh
                    if dominant_yields and index > 0 and cache_interval > 1:
                        fresh = refreshing != dominant  # at refresh steps the others, else the dominant
                    else:
                        fresh = dominant or refreshing
                    if fresh or adapter not in cache:
                        out = full_forward(*args)
                        sampler.unet_evals += batch
                        if regional:  # only a full forward passes the captured cross-attention
                            eos, positions = reads[adapter]
                            maps = normalised_token_maps(store.token_maps(latent_size)[-1], eos, sharpen=1.0)
                            tracker.add(adapter, concept_strength(maps, positions))
                    else:
                        out = shallow_forward(*args)
                        shallow += batch
                    u, c = split_pair(out)
                    uncond.append(u)
                    cond.append(c)
                mix = mixing_weights(n, dominants[index])
                if regional:
                    masks = branch_masks(tracker.masks(), latent_size)[1:]  # (N, H, W)
                    weights = regional_weights(mix, masks)[:, None, None]  # (N, 1, 1, H, W)
                else:
                    weights = torch.tensor(mix).view(-1, 1, 1, 1, 1)
                eps = sampler.guide(_mixed(weights, uncond), _mixed(weights, cond))
                sampler.step(eps, t, index, dominant=bank.names[dominants[index]])
    finally:
        bank.deactivate()
    sampling_evals = sampler.unet_evals
    sampler.unet_evals += profile_evals
    return sampler.result(
        order=[bank.names[i] for i in order],
        profile_scores=scores,
        dominant_schedule=dominants,
        refresh_steps=sorted(refresh),
        shallow_evals=shallow,
        profile_evals=profile_evals,
        sampling_evals=sampling_evals,
        regions=regional,
        cache_interval=cache_interval,
        dominant_yields=dominant_yields,
        **({"masks": masks.cpu(), "mask_names": list(bank.names)} if masks is not None else {}),
    )
