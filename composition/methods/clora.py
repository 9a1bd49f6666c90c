"""`clora`: CLoRA (Meral et al., 2024, "CLoRA: A Contrastive Approach to Compose Multiple LoRA Models";
reference code `gemlab-vt/clora` at 76def7c, surviving in forks such as `D3voz/clora`; SD 1.5 and LoRA only).

Branches: one for the base prompt without adapters (every concept in its plain form) and one per adapter,
with that adapter active and its prompt carrying its own trigger (`ConceptPrompt.branch_text`). Each step runs
the branches, reads their cross-attention at the latent/4 level (`composition.attention_store`), may move the
latent down the gradient of a contrastive loss over the concepts' token maps, and fuses the branches' noise
predictions with per-branch masks, Σ Mᵢεᵢ / Σ Mᵢ, before classifier-free guidance.

`preset="paper"` is the reference code's loop step for step (`composition.methods.clora_paper`: raw maps averaged
over heads, layers and both CFG halves; NT-Xent per positive pair; one backward through every branch's CFG pair;
ε predicted before the update, the step taken from the updated latent; absolute step indices), at the settings
of the authors' notebook: updates at steps i < 50, 20 extra rounds at steps 0, 10 and 20, step size 20,
τ = 0.5, α = 0.4. `preset="reference"` is a deprecated alias of it.

Atelier's variants (`loop="atelier"`, this module), each measured against `paper` in
`docs/composition_baselines.md`:
- `sharpened` / `light`: Attend-and-Excite token maps (conditional half, ×100 softmax over the text tokens,
  min–max), a multi-positive InfoNCE over them, the latent updated before the step's prediction, one branch's
  graph at a time (exact by the chain rule, so memory does not grow with N), steps as fractions of the run
  (updates in the first 60%, refinement at 0, 0.2, 0.4); `light` has 4 refinement rounds instead of 20.
- `partition`: no latent updates; masks from unsharpened maps averaged over the steps so far (`running_mean`),
  cells claimed by several objects given to the strongest (`exclusive_masks`; concepts whose phrases touch in
  the prompt are one object, `ConceptPrompt.objects`), one 4-connected region per object (`connected_masks`):
  the masks split the image between the objects (`composition.regions`, which cmlora's regions share). The base
  branch runs only at steps where its mask holds a cell (`skip_idle_base`; under `partition`, never).
Any single option passed overrides the preset. `iterations=0` turns latent updates (and refinement) off.

`unet_evals` counts every UNet forward of one image (a CFG pair is 2), latent-update forwards included;
`extras["backward_passes"]` counts the backward passes through the UNet.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from composition.attention_store import TARGET_FACTOR, AttentionStore, capture_cross_attention
from composition.bank import AdapterBank
from composition.contrastive import (
    SHARPEN,
    branch_masks,
    concept_strength,
    contrastive_loss,
    fuse,
    normalised_token_maps,
)
from composition.errors import CompositionError
from composition.methods import clora_paper
from composition.methods.composite import one_hot
from composition.prompt import ConceptPrompt
from composition.regions import RegionTracker, eos_position
from composition.sampling import EmbeddingCache, Progress, PromptEmbeds, Result, Sampler, check_inputs


@dataclass(frozen=True)
class CloraOptions:
    """CLoRA's knobs (see the module docstring for the presets)."""

    iterations: int = 1
    """Latent-update rounds per early step (0 = no latent updates at all)."""
    update_until: float = 0.6
    """Fraction of the steps that get latent updates (when `update_steps` is None)."""
    refine_at: tuple[float, ...] = (0.0, 0.2, 0.4)
    """Fractions of the steps where extra refinement rounds run (when `refine_steps` is None)."""
    update_steps: int | None = None
    """Latent updates at step indices i < this (absolute, the reference's `max_iter_to_alter`)."""
    refine_steps: tuple[int, ...] | None = None
    """Absolute step indices of the refinement rounds (the reference's `iterative_steps`)."""
    loop: str = "atelier"
    """"paper": the reference code's loop (`composition.methods.clora_paper`); "atelier": this module's."""
    refine_rounds: int = 20
    """Extra latent-update rounds at each refinement step."""
    step_size: float = 20.0
    """Latent-update step size."""
    temperature: float = 0.5
    """NT-Xent temperature."""
    mask_threshold: float = 0.3
    """α: a token's mask is map >= α·max(map); 0 gives all-ones masks."""
    capture_factor: int = TARGET_FACTOR
    """Capture cross-attention at the level latent/`capture_factor` (nearest available)."""
    mask_sharpen: float = SHARPEN
    """Scale of the attention before the softmax over tokens in the maps the masks are read from (the loss
    always uses Attend-and-Excite's 100). 1 leaves the attention nearly as it is: every cell where a concept's
    words draw attention, not only the cells where one of them beats every other word."""
    exclusive_masks: bool = False
    """Give a cell claimed by several objects' masks only to the object whose map is strongest there; the
    concepts of one object (adjacent phrases, `ConceptPrompt.objects`) share its cells."""
    connected_masks: bool = False
    """After `exclusive_masks`, keep each object's mask one 4-connected region (its part of largest summed
    strength) and give the cells it drops to the neighbouring object strongest there (`contrastive.connected`)."""
    running_mean: bool = False
    """Read the masks from the mean of the concept maps over the steps so far instead of the current step's."""
    skip_idle_base: bool = True
    """Run the base branch only at steps where its mask covers a cell. Its maps make no mask, so the adapter
    branches run first, the masks follow, and where the base mask is empty (always, under `partition`) the
    fused prediction is the same without it; False runs it at every step, as the reference does."""

    def check(self) -> None:
        if self.iterations < 0 or self.refine_rounds < 0:
            raise CompositionError("clora iterations and refine_rounds must be >= 0.")
        if not 0.0 <= self.update_until <= 1.0 or not all(0.0 <= f <= 1.0 for f in self.refine_at):
            raise CompositionError("clora update_until and refine_at are fractions of the steps, in [0, 1].")
        if not 0.0 <= self.mask_threshold <= 1.0:
            raise CompositionError(f"clora mask_threshold must be in [0, 1], got {self.mask_threshold}.")
        if self.temperature <= 0:
            raise CompositionError(f"clora temperature must be > 0, got {self.temperature}.")
        if self.loop not in ("paper", "atelier"):
            raise CompositionError(f"clora loop must be 'paper' or 'atelier', got {self.loop!r}.")
        if self.update_steps is not None and self.update_steps < 0:
            raise CompositionError(f"clora update_steps must be >= 0, got {self.update_steps}.")
        if self.mask_sharpen <= 0:
            raise CompositionError(f"clora mask_sharpen must be > 0, got {self.mask_sharpen}.")

    def rounds_at(self, index: int, steps: int) -> int:
        """Latent-update rounds before denoising step `index`."""
        limit = self.update_until * steps if self.update_steps is None else self.update_steps
        if self.iterations == 0 or index >= limit:
            return 0
        if self.refine_steps is not None:
            refine = set(self.refine_steps)
        else:
            refine = {round(f * steps) for f in self.refine_at}
        return self.iterations + (self.refine_rounds if index in refine else 0)


PRESETS: dict[str, CloraOptions] = {
    "paper": CloraOptions(
        loop="paper",
        update_steps=50,
        refine_steps=(0, 10, 20),
        refine_rounds=20,
        step_size=20.0,
        temperature=0.5,
        mask_threshold=0.4,
        skip_idle_base=False,
    ),
    "sharpened": CloraOptions(),
    "light": CloraOptions(refine_rounds=4),
    "partition": CloraOptions(
        iterations=0, mask_sharpen=1.0, exclusive_masks=True, connected_masks=True, running_mean=True
    ),
}


DEPRECATED_PRESETS = {"reference": "paper"}
"""Old preset names and the preset they now mean (with a `DeprecationWarning`)."""
DEFAULT_PRESET = "partition"
"""The toy world's best measured variant (`docs/composition_baselines.md`)."""


def resolve_preset(preset: str) -> str:
    """The preset's current name; a deprecated alias warns. Unknown names are a `CompositionError`."""
    if preset in DEPRECATED_PRESETS:
        new = DEPRECATED_PRESETS[preset]
        warnings.warn(
            f"clora preset {preset!r} is deprecated: it now means the reference code's algorithm; use {new!r}.",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    if preset not in PRESETS:
        raise CompositionError(f"unknown clora preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return preset


@dataclass
class Branch:
    """One CLoRA branch: adapter selection (None = base), its embeddings, token positions, EOS position."""

    selection: list[float] | None
    embeds: PromptEmbeds
    indices: list[list[int]]
    eos: int


def _branches(pipe: Any, bank: AdapterBank, prompt: ConceptPrompt, sampler: Sampler) -> list[Branch]:
    cache = EmbeddingCache(pipe, bank, prompt.negative, sampler.size)
    branches = []
    for adapter in [None, *range(len(bank))]:
        text = prompt.branch_text(adapter)
        selection = None if adapter is None else one_hot(adapter, prompt.weights)
        eos = eos_position(pipe, text)
        embeds = sampler.batch_for(cache.get(text, selection))
        branches.append(Branch(selection, embeds, prompt.token_indices(pipe, adapter), eos))
    return branches


def _cond_maps(
    sampler: Sampler, store: AttentionStore, latents: torch.Tensor, t: torch.Tensor, branch: Branch
) -> torch.Tensor:
    """Conditional forward of one branch; its normalised token maps (T, h, w) (graph kept if grad is on)."""
    cond = branch.embeds.select(slice(-1, None))
    sampler.unet(
        sampler.model_input(latents, t, 1), t, encoder_hidden_states=cond.hidden, added_cond_kwargs=cond.added,
        return_dict=False,
    )  # fmt: skip
    sampler.unet_evals += 1
    raw = store.token_maps(tuple(latents.shape[-2:]))[-1]  # (T, h, w) of the conditional element
    return normalised_token_maps(raw, branch.eos)


def _update_latents(
    sampler: Sampler,
    bank: AdapterBank,
    store: AttentionStore,
    branches: list[Branch],
    t: torch.Tensor,
    opts: CloraOptions,
) -> float:
    """One contrastive latent update, backpropagating one branch at a time; returns the loss."""
    latents = sampler.latents.detach()
    with torch.no_grad():
        maps = []
        for branch in branches:
            bank.activate(branch.selection)
            maps.append(_cond_maps(sampler, store, latents, t, branch))
    with torch.enable_grad():
        leaves = [m.detach().requires_grad_(True) for m in maps]
        loss = contrastive_loss(leaves, [b.indices for b in branches], opts.temperature)
        if not loss.requires_grad:  # fewer than two concepts: nothing to contrast
            return float(loss.detach())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    moving = latents.clone().requires_grad_(True)
    for branch, grad in zip(branches, grads, strict=True):
        if grad is None:
            continue
        bank.activate(branch.selection)
        with torch.enable_grad():
            _cond_maps(sampler, store, moving, t, branch).backward(grad)
    sampler.latents = (latents - opts.step_size * moving.grad).detach()
    return float(loss.detach())


def backward_passes(losses: list[float], branches: int) -> int:
    """Backward passes (conditional half) through the UNet of Atelier's loop: one per branch per latent update
    (`losses` holds one entry per update)."""
    return len(losses) * branches


def generate(
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    *,
    preset: str = DEFAULT_PRESET,
    height: int | None = None,
    width: int | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> Result:
    """Generate with CLoRA: contrastive latent updates early, attention-masked fusion of the branches."""
    check_inputs(bank, prompt)
    preset = resolve_preset(preset)
    fields = set(CloraOptions.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CompositionError(f"unknown clora option(s) {unknown}; known: {sorted(fields)}.")
    for name in ("refine_at", "refine_steps"):
        if overrides.get(name) is not None:
            overrides[name] = tuple(overrides[name])
    opts = replace(PRESETS[preset], **overrides)
    opts.check()
    sampler = Sampler(pipe, steps, guidance, seed, height, width, progress)
    store = AttentionStore()
    latent_size = tuple(sampler.latents.shape[-2:])
    losses: list[float] = []
    mask_sum = masks = None
    base_steps = 0
    regions = RegionTracker(
        len(bank), prompt.objects(), opts.mask_threshold, running_mean=opts.running_mean,
        exclusive_masks=opts.exclusive_masks, connected_masks=opts.connected_masks,
    )  # fmt: skip
    options = {"preset": preset, **{k: getattr(opts, k) for k in sorted(fields)}}
    if opts.loop == "paper":
        try:
            with capture_cross_attention(pipe.unet, store, opts.capture_factor), torch.no_grad():
                branches = _branches(pipe, bank, prompt, sampler)
                extras = clora_paper.run(
                    sampler, bank, store, [(b.selection, b.embeds) for b in branches],
                    [b.indices for b in branches], opts,
                )  # fmt: skip
        finally:
            bank.deactivate()
        return sampler.result(mask_names=["base", *bank.names], options=options, **extras)
    try:
        with capture_cross_attention(pipe.unet, store, opts.capture_factor), torch.no_grad():
            branches = _branches(pipe, bank, prompt, sampler)
            for index, t in enumerate(sampler.timesteps):
                for _ in range(opts.rounds_at(index, steps)):
                    losses.append(_update_latents(sampler, bank, store, branches, t, opts))
                # the adapter branches first; reads: each concept's (token maps, positions) in its own branch
                uncond, cond, reads = [], [], []
                for number, branch in enumerate(branches[1:], start=1):
                    bank.activate(branch.selection)
                    u, c = sampler.predict(sampler.latents, t, branch.embeds)
                    uncond.append(u)
                    cond.append(c)
                    raw = store.token_maps(latent_size)[-1]  # (T, h, w)
                    token_maps = normalised_token_maps(raw, branch.eos, opts.mask_sharpen)
                    reads.append((token_maps, branch.indices[number - 1]))
                for concept, (maps, positions) in enumerate(reads):
                    regions.add(concept, concept_strength(maps, positions))
                concept_masks = regions.masks()
                masks = branch_masks(concept_masks, latent_size)  # (N+1, H, W)
                mask_sum = masks if mask_sum is None else mask_sum + masks
                weights = masks[1:]  # where the base mask is empty, the adapter branches alone
                if masks[0].any() or not opts.skip_idle_base:
                    bank.activate(branches[0].selection)
                    u, c = sampler.predict(sampler.latents, t, branches[0].embeds)
                    uncond.insert(0, u)
                    cond.insert(0, c)
                    base_steps += 1
                    weights = masks
                eps = sampler.guide(fuse(uncond, weights), fuse(cond, weights))
                sampler.step(eps, t, index, loss=losses[-1] if losses else None)
    finally:
        bank.deactivate()
    return sampler.result(
        masks=masks.cpu(),
        mean_masks=(mask_sum / steps).cpu(),
        mask_names=["base", *bank.names],
        losses=losses,
        base_branch_steps=base_steps,
        backward_passes=backward_passes(losses, len(bank) + 1),
        options=options,
    )
