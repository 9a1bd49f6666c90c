"""`cmlora`: Cached Multi-LoRA composition (Zou et al., 2025, "Cached Multi-LoRA Composition for
Multi-Concept Image Generation", ICLR; reference code `Yqcca/CMLoRA` 5e79e41, `pipeline_offline.py`).

Composite-style: each adapter predicts on its own, the predictions are mixed with the dominant adapter's share
w_dom = (N−0.5)/(2N−1.5) (N=2: 0.6/0.4; the reference's "decaying" coefficient never reaches the weights, so
the share is constant there too), then classifier-free guidance. Non-dominant work is saved with DeepCache-style
cached forwards (`composition.feature_cache`).

`preset="paper"` is the reference code's algorithm step for step:
- one shared prompt for every adapter (`prompts="shared"`);
- refresh steps 0, c, 2c, … (`schedule="paper"`, its default `uniform=True`, c = `cache_interval` = 5); at each
  one adapter, round-robin in bank order (`order="bank"`: the reference's category order, which keeps the
  order the LoRAs are given), is recomputed in full and becomes the dominant adapter; every other forward, the
  dominant adapter's included, is a cached one (at step 0 all run in full: nothing is cached yet);
  `cache_interval=1` recomputes everything at every step;
- the reference's cached pass (`cache_branch=2`, DeepCache layer 0 block 1).

Atelier's variants, each an option over that baseline (the measured gain of each: `docs/composition_baselines.md`):
- `prompts="per_adapter"`: each adapter reads its own branch prompt (`ConceptPrompt.branch_text`: the other
  concepts in their plain forms), for its profiling sample too;
- `order="fft"`: adapters ordered by the high-frequency energy of a short sample of each alone
  (`composition.frequency`; or `frequency_scores`), most first — the paper's stated intent, which the
  reference hard-codes by category; profiling scores are cached on the bank, `extras["profile_evals"]` says
  what a call spent;
- `schedule="atelier"`: the dominant adapter of step i is order[⌊i·N/steps⌋] (contiguous blocks) and runs in full,
  the others are recomputed at ⌈steps/c⌉ cosine-spaced refresh steps (dense at both ends) and cached between;
  `dominant_yields` (with it): at refresh steps after the first the dominant adapter reuses its deep feature
  of one step earlier while the others recompute, so a step costs one full pass;
- `cache_branch=0`: the shallowest cached pass (one up resnet) instead of the reference's;
- `regions`: each adapter's full forwards also record its concept's cross-attention, and the mix is applied per
  cell: inside an object's region (`composition.regions`) only that object's adapters mix, with their shares
  renormalised; cells no region holds take the plain mix. None = on when the prompt names several objects.

`preset="atelier"` is every variant on. Any option passed overrides the preset. `unet_evals` counts full UNet
predictions (sampling plus profiling; `extras` splits them); cached predictions are in
`extras["shallow_evals"]`, because they cost a fraction of a full one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from composition.attention_store import AttentionStore, capture_cross_attention
from composition.bank import AdapterBank
from composition.contrastive import branch_masks, concept_strength, normalised_token_maps
from composition.errors import CompositionError
from composition.feature_cache import (
    PAPER_BRANCH,
    SHALLOW_BRANCH,
    DeepFeatureCache,
    full_forward,
    shallow_forward,
    skip_count,
)
from composition.frequency import frequency_order, high_frequency_energy
from composition.methods.composite import one_hot
from composition.prompt import ConceptPrompt
from composition.regions import RegionTracker, eos_position
from composition.sampling import EmbeddingCache, Progress, Result, Sampler, check_inputs, split_pair

DEFAULT_CACHE_INTERVAL = 5
"""Mean steps between full recomputations of a cached adapter (the reference's c=5)."""
REGIONAL_CACHE_INTERVAL = 4
"""The same under `regions` with Atelier's schedule, where a cached adapter draws its own region alone
(measured: `docs/composition_baselines.md`)."""
DEFAULT_PROFILE_STEPS = 4
"""Denoising steps of each adapter's frequency-profiling sample."""
REGION_THRESHOLD = 0.3
"""α of the regional masks (CLoRA's): a concept's cells are where its mean strength is >= α of its peak."""
PROFILE_SEED = 0
"""Seed of the profiling samples (fixed, so cached scores do not depend on the generation seed)."""


@dataclass(frozen=True)
class CmloraOptions:
    """CMLoRA's knobs (the module docstring says which are the reference's and which Atelier's)."""

    prompts: str = "per_adapter"
    """"shared": every adapter reads the prompt as written (the reference); "per_adapter": its branch prompt."""
    order: str = "fft"
    """"bank": adapters in bank order (the reference); "fft": by measured high-frequency energy."""
    schedule: str = "atelier"
    """"paper": uniform refresh steps, one adapter (round-robin) refreshed and dominant at each, every other
    forward cached; "atelier": contiguous dominant blocks in full, cosine-spaced refreshes of the others."""
    cache_interval: int | None = None
    """Steps between refreshes; None: `REGIONAL_CACHE_INTERVAL` under regions with Atelier's schedule, else
    `DEFAULT_CACHE_INTERVAL`. 1 disables caching."""
    cache_branch: int = SHALLOW_BRANCH
    """DeepCache branch of the cached forward (`composition.feature_cache`; 2 = the reference's)."""
    dominant_yields: bool = True
    """Atelier's schedule only: at refresh steps after the first the dominant adapter reuses its deep feature."""
    regions: bool | None = None
    """Mix per object region; None = when the prompt names several objects."""
    mask_threshold: float = REGION_THRESHOLD
    """α of the region masks."""
    profile_steps: int = DEFAULT_PROFILE_STEPS
    """Denoising steps of each adapter's profiling sample (`order="fft"`)."""
    frequency_scores: tuple[float, ...] | None = None
    """Given high-frequency scores instead of profiling (`order="fft"`)."""

    def check(self, n: int) -> None:
        choices = {
            "prompts": ("shared", "per_adapter"),
            "order": ("bank", "fft"),
            "schedule": ("paper", "atelier"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CompositionError(
                    f"cmlora {name} must be one of {allowed}, got {getattr(self, name)!r}."
                )
        if self.cache_interval is not None and self.cache_interval < 1:
            raise CompositionError(f"cache_interval must be >= 1, got {self.cache_interval}.")
        if self.profile_steps < 1:
            raise CompositionError(f"profile_steps must be >= 1, got {self.profile_steps}.")
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise CompositionError(f"cmlora mask_threshold must be in [0, 1], got {self.mask_threshold}.")
        if self.frequency_scores is not None and len(self.frequency_scores) != n:
            raise CompositionError(f"got {len(self.frequency_scores)} profile scores for {n} adapters.")


PAPER = CmloraOptions(
    prompts="shared", order="bank", schedule="paper", cache_interval=DEFAULT_CACHE_INTERVAL,
    cache_branch=PAPER_BRANCH, dominant_yields=False, regions=False,
)  # fmt: skip
"""The reference code's algorithm."""
PRESETS: dict[str, CmloraOptions] = {"paper": PAPER, "atelier": CmloraOptions()}
DEFAULT_PRESET = "atelier"
"""The toy world's best measured variant (`docs/composition_baselines.md`)."""


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


def forward_plan(
    steps: int, order: Sequence[int], schedule: str, interval: int, dominant_yields: bool = True
) -> list[tuple[int, frozenset[int]]]:
    """Per step: (the dominant adapter, the adapters that run the full UNet); the others run cached.

    "paper": refresh steps 0, c, 2c, …; the k-th refreshes order[k mod N] alone, which is dominant until the
    next; step 0 runs every adapter in full (nothing is cached yet), and c = 1 runs everything in full.
    "atelier": dominant blocks (`dominant_schedule`) in full, the others at `refresh_steps`; with
    `dominant_yields` the dominant adapter is the one cached at refresh steps after the first.
    """
    n = len(order)
    plan: list[tuple[int, frozenset[int]]] = []
    if schedule == "paper":
        refresh = set(range(0, steps, interval))
        turn, dominant = 0, order[0]
        for index in range(steps):
            if index in refresh:
                dominant, turn = order[turn % n], turn + 1
            if index == 0 or interval == 1:
                full = frozenset(range(n))
            else:
                full = frozenset({dominant} if index in refresh else set())
            plan.append((dominant, full))
        return plan
    dominants = dominant_schedule(steps, order)
    refresh = refresh_steps(steps, interval)
    for index in range(steps):
        refreshing, dominant = index in refresh, dominants[index]
        full = set()
        for adapter in range(n):
            if dominant_yields and index > 0 and interval > 1:
                fresh = refreshing != (adapter == dominant)  # at refresh steps the others, else the dominant
            else:
                fresh = adapter == dominant or refreshing
            if fresh or index == 0:
                full.add(adapter)
        plan.append((dominant, frozenset(full)))
    return plan


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
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    texts: Sequence[str],
    guidance: float,
    size: tuple[int, int],
    steps: int,
) -> tuple[list[float], int]:
    """Each adapter's high-frequency energy from a short sample of it alone on its prompt `texts[i]`;
    (scores, UNet evals spent)."""
    cache = bank.memo.setdefault("cmlora_frequency_scores", {})
    embeds_cache = EmbeddingCache(pipe, bank, prompt.negative, size)
    scores, spent = [], 0
    for index, text in enumerate(texts):
        selection = one_hot(index, prompt.weights)
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


def resolve_options(preset: str, overrides: dict[str, Any]) -> CmloraOptions:
    """The preset's options with `overrides` applied; unknown presets or options are a `CompositionError`."""
    if preset not in PRESETS:
        raise CompositionError(f"unknown cmlora preset {preset!r}; choose one of {sorted(PRESETS)}.")
    known = {f.name for f in fields(CmloraOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise CompositionError(f"unknown cmlora option(s) {unknown}; known: {sorted(known)}.")
    if overrides.get("frequency_scores") is not None:
        overrides = {**overrides, "frequency_scores": tuple(float(x) for x in overrides["frequency_scores"])}
    return replace(PRESETS[preset], **overrides)


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
    height: int | None = None,
    width: int | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> Result:
    """Generate with a dominant adapter per step and cached forwards for the rest (see the module docstring)."""
    check_inputs(bank, prompt)
    n = len(bank)
    opts = resolve_options(preset, overrides)
    opts.check(n)
    if opts.cache_branch >= skip_count(pipe.unet) or opts.cache_branch < 0:
        raise CompositionError(f"cache_branch must be in [0, {skip_count(pipe.unet) - 1}] for this UNet.")
    objects = prompt.objects()
    regional = len(objects) > 1 if opts.regions is None else bool(opts.regions)
    interval = opts.cache_interval
    if interval is None:
        interval = (
            REGIONAL_CACHE_INTERVAL if regional and opts.schedule == "atelier" else DEFAULT_CACHE_INTERVAL
        )
    sampler = Sampler(pipe, steps, guidance, seed, height, width, progress)
    texts = [prompt.text if opts.prompts == "shared" else prompt.branch_text(i) for i in range(n)]
    scores: list[float] | None = None
    profile_evals = 0
    if opts.order == "bank":
        order = list(range(n))
    else:
        if opts.frequency_scores is not None:
            scores = list(opts.frequency_scores)
        else:
            scores, profile_evals = profile_scores(
                pipe, bank, prompt, texts, guidance, sampler.size, opts.profile_steps
            )
        order = frequency_order(scores)
    plan = forward_plan(steps, order, opts.schedule, interval, opts.dominant_yields)
    cache = DeepFeatureCache()
    embeds_cache = EmbeddingCache(pipe, bank, prompt.negative, sampler.size)
    selections = [one_hot(i, prompt.weights) for i in range(n)]
    embeds = [sampler.batch_for(embeds_cache.get(texts[i], s)) for i, s in enumerate(selections)]
    shallow = 0
    store = AttentionStore()
    tracker = RegionTracker(n, objects, opts.mask_threshold)
    reads = (  # each adapter's own concept in the text it reads: (EOS position, token positions)
        [(eos_position(pipe, texts[i]), _positions(pipe, prompt, opts.prompts, i)) for i in range(n)]
        if regional
        else []
    )
    latent_size = tuple(sampler.latents.shape[-2:])
    masks = None
    capture = capture_cross_attention(pipe.unet, store) if regional else nullcontext()
    try:
        with capture:
            for index, t in enumerate(sampler.timesteps):
                dominant, full = plan[index]
                uncond, cond = [], []
                for adapter in range(n):
                    bank.activate(selections[adapter])
                    embed = embeds[adapter]
                    batch = embed.hidden.shape[0]
                    model_input = sampler.model_input(sampler.latents, t, batch)
                    args = (
                        pipe.unet,
                        cache,
                        adapter,
                        model_input,
                        t,
                        embed.hidden,
                        embed.added,
                        opts.cache_branch,
                    )
                    if adapter in full or adapter not in cache:
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
                mix = mixing_weights(n, dominant)
                if regional:
                    masks = branch_masks(tracker.masks(), latent_size)[1:]  # (N, H, W)
                    weights = regional_weights(mix, masks)[:, None, None]  # (N, 1, 1, H, W)
                else:
                    weights = torch.tensor(mix).view(-1, 1, 1, 1, 1)
                eps = sampler.guide(_mixed(weights, uncond), _mixed(weights, cond))
                sampler.step(eps, t, index, dominant=bank.names[dominant])
    finally:
        bank.deactivate()
    sampling_evals = sampler.unet_evals
    sampler.unet_evals += profile_evals
    return sampler.result(
        order=[bank.names[i] for i in order],
        profile_scores=scores,
        dominant_schedule=[step[0] for step in plan],
        refresh_steps=sorted(i for i, (_, full) in enumerate(plan) if full and i > 0)
        if opts.schedule == "paper"
        else sorted(refresh_steps(steps, interval)),
        shallow_evals=shallow,
        profile_evals=profile_evals,
        sampling_evals=sampling_evals,
        regions=regional,
        cache_interval=interval,
        dominant_yields=opts.dominant_yields,
        options={"preset": preset, **{f.name: getattr(opts, f.name) for f in fields(CmloraOptions)}},
        **({"masks": masks.cpu(), "mask_names": list(bank.names)} if masks is not None else {}),
    )


def _positions(pipe: Any, prompt: ConceptPrompt, prompts: str, adapter: int) -> list[int]:
    """Token positions of `adapter`'s concept in the text it reads (the shared prompt or its branch prompt)."""
    if prompts == "shared":
        return prompt.written_token_indices(pipe)[adapter]
    return prompt.token_indices(pipe, adapter)[adapter]
