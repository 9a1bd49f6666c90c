"""`clora`: CLoRA (Meral et al., 2024, "CLoRA: A Contrastive Approach to Compose Multiple LoRA Models";
reference code `gemlab-vt/clora`, SD 1.5 and LoRA only).

Branches: one for the base prompt without adapters (every concept in its plain form) and one per adapter,
with that adapter active and its prompt carrying its own trigger (`ConceptPrompt.branch_text`). Every step
runs every branch (unconditional + conditional) and captures cross-attention at the 16×16-equivalent level
(`composition.attention_store`). Early in sampling the latent moves down the gradient of the contrastive
loss over the branches' concept token maps (`composition.contrastive`); at every step each adapter branch's
mask is its concept's thresholded attention, the base branch covers the rest, and the conditional and
unconditional predictions are each fused as Σ Mᵢεᵢ / Σ Mᵢ before classifier-free guidance. The final masks
(and their mean over steps) are in `extras` for display.

Departures from the reference, on purpose:
- Token positions come from the phrases (`ConceptPrompt.token_indices`), not hand-typed (the reference's
  own example is off by one).
- Adapters without text-encoder parts work (the reference refuses them), any family works (the bank).
- Memory does not grow with N: the reference backpropagates through all branches at once with
  `retain_graph`. Here a first pass computes every branch's maps without a graph, the loss gives the
  gradient with respect to each branch's maps, then each branch is re-run with a graph and backpropagated
  alone with that gradient (exact by the chain rule: ∇z L = Σ_b J_bᵀ ∂L/∂A_b). One branch's graph at a time,
  at the price of one extra conditional forward per branch per update.

`unet_evals` counts every UNet forward of one image: each adapter branch's CFG pair per step, the base
branch's at the steps where its mask covers a cell (`extras["base_branch_steps"]`; all of them with
`skip_idle_base=False`), plus two conditional forwards per branch per latent-update round (maps without a
graph, then the branch's backward pass). Under `partition` the objects' masks claim every cell, so the base
branch never runs: N CFG pairs per step, as composite, instead of N+1.

Presets (`preset=`): `reference` (default) = the reference's settings: latent updates at every step
i < 0.6·steps (30 of 50), 20 extra refinement rounds at 0, 0.2 and 0.4 of the steps (0, 10, 20 of 50),
step size 20, temperature 0.5, α = 0.3. `light` = the same with 4 refinement rounds, for CPU previews.
`partition` = no latent updates, masks read from unsharpened maps (`mask_sharpen=1`) averaged over the steps
so far (`running_mean`), and a cell that several objects claim goes to the object whose map is strongest there
(`exclusive_masks`; concepts whose phrases touch in the prompt, "purple star", are one object and share its
cells, `ConceptPrompt.objects`), and each object keeps one 4-connected region (`connected_masks`; the cells
it drops go to the neighbouring object): the concept masks then split the image between the objects instead
of covering the cells where a concept word wins the sharpened softmax (`composition.regions`, which CMLoRA's
regional mixing shares). Any single option passed overrides the preset. `iterations=0` turns latent updates (and refinement) off.

Why `partition` exists (toy world, `python -m composition.quality`, purple BOFT + heart LoRA, "a purple
square and a blue heart", 16 seeds, no latent updates): with the reference's masks the heart's mask held a
few scattered cells of the 4×4 map, the base branch (its prompt says "blue circle") filled the rest of the
heart's half, and the heart was read in 0 of 16 images; the same adapters with the halves of the image forced
as masks gave 13 of 16. Unsharpened maps alone covered both halves with both masks (2 of 16); with exclusive
cells, 10 of 16 (sharpening 10: 8 of 16). The latent updates cost here (with them, 6 of 16), as they did
with the reference's masks. Reading the maps at 8×8 (`capture_factor=2`) instead of 4×4 lost the purple
(left 0% of 32). Masks read from each step's maps alone flip a cell of the heart's half to the purple for a
few steps in the failures; the running mean keeps them (32 seeds: 78.1% both present against 50.0% per
step; masks read at the first step only: 75.0%, over the first five steps and then kept: 59.4%; an EMA of the maps, 0.5 or 0.7, did not help;
each concept's phrase averaged over every branch's maps: 53.1% per step, 68.8% with the running mean; one
latent update per early step on top, 65.6%).
Over 32 seeds: both concepts present 78.1% with `partition` against 3.1% with `light` (purple BOFT + heart
LoRA), 75.0% against 0% (purple HRA + heart KronA), at 100 UNet evaluations per image (the base branch idle)
instead of `light`'s 310-312; on the next 32 seeds, 75.0% and 62.5%. On one
object ("a purple heart on a white background") the shared cells give 62.5%; when each concept kept its own
cells the two split the object between them (21.9%). N=3 ("a purple star and a blue heart") stays at 0%:
the heart adapter's own branch ("a blue triangle and a blue heart") draws two triangles. With "a red heart"
the heart is there (97%) but the left object, the average of the star's and the purple's branches, reads as
the purple branch's plain triangle (23 of 32; 3.1% both present).

Why `connected_masks`: in the failures left after the running mean the masks were the two halves except one
cell, most often the bottom-right corner, which the purple object claimed from step 0 or from a middle step
on (its normalised map is a little less weak there than the heart's). That cell's prediction came from the
purple branch, whose prompt draws a circle there, and the heart's point became a circle's edge: the heart
adapter alone drew its heart in seeds where `partition` lost it (29 of seeds 0-31 alone against 26 under
`partition`). With one region per object, over 32 seeds (purple BOFT + heart LoRA / purple HRA + heart
KronA): 93.8% / 93.8% both present against 81.2% / 71.9%; on seeds 32-63 87.5% / 90.6% against 68.8% /
78.1%; on seeds 64-127 79.7% / 73.4% against 70.3% / 67.2%; over the 128 seeds 85.2% / 82.8%. Keeping the component that holds an object's
strongest cell, instead of the one of largest summed strength, gave 87.5% / 90.6% on seeds 0-31 and 84.4% /
81.2% on 32-63: a stray cell can hold the peak. Thresholding at 0 instead of α (every cell to the stronger
object, no base branch) changed nothing (81.2% / 71.9%).
"""

from __future__ import annotations

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
    """Fraction of the steps that get latent updates."""
    refine_at: tuple[float, ...] = (0.0, 0.2, 0.4)
    """Fractions of the steps where extra refinement rounds run."""
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
        if self.mask_sharpen <= 0:
            raise CompositionError(f"clora mask_sharpen must be > 0, got {self.mask_sharpen}.")

    def rounds_at(self, index: int, steps: int) -> int:
        """Latent-update rounds before denoising step `index`."""
        if self.iterations == 0 or index >= self.update_until * steps:
            return 0
        refine = {round(f * steps) for f in self.refine_at}
        return self.iterations + (self.refine_rounds if index in refine else 0)


PRESETS: dict[str, CloraOptions] = {
    "reference": CloraOptions(),
    "light": CloraOptions(refine_rounds=4),
    "partition": CloraOptions(
        iterations=0, mask_sharpen=1.0, exclusive_masks=True, connected_masks=True, running_mean=True
    ),
}


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


def generate(
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    *,
    preset: str = "reference",
    height: int | None = None,
    width: int | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> Result:
    """Generate with CLoRA: contrastive latent updates early, attention-masked fusion of the branches."""
    check_inputs(bank, prompt)
    if preset not in PRESETS:
        raise CompositionError(f"unknown clora preset {preset!r}; choose one of {sorted(PRESETS)}.")
    fields = set(CloraOptions.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise CompositionError(f"unknown clora option(s) {unknown}; known: {sorted(fields)}.")
    if "refine_at" in overrides:
        overrides["refine_at"] = tuple(overrides["refine_at"])
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
        options={"preset": preset, **{k: getattr(opts, k) for k in sorted(fields)}},
    )
