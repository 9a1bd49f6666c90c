"""CLoRA's denoising loop as the authors' code runs it (Meral et al., 2024; reference code `gemlab-vt/clora`
at commit 76def7c, which survives in forks such as `D3voz/clora`): `clora`'s `preset="paper"`.

Per step i, with one branch for the base prompt (no adapter) and one per adapter:
1. every branch runs its CFG pair on the current latent z; each branch's attention map is the raw cross-attention
   probability at the latent/4 level averaged over heads, layers and both CFG halves (T, h, w);
2. while i < `update_steps` (absolute step index), the NT-Xent loss over the concept tokens' maps of every
   branch (`contrastive.paper_contrastive_loss`) is differentiated through all branches' CFG pairs at once and
   z ← z − s·∇z L; at the absolute steps `refine_steps` this is repeated `refine_rounds` more times, each time
   re-running every branch on the updated z;
3. the masks come from the last forward's maps: adapter k's is the OR over its concept's tokens of
   (map > α·max) in its own branch, the base branch takes the cells no adapter mask holds; the noise
   predictions of that forward (made before the last update) are fused Σ Mε / Σ M per CFG half, guided, and
   the scheduler steps from the updated z.

Departures, none of them in the algorithm: token positions come from the phrases (`ConceptPrompt`), adapters go
through the bank (any family), the min–max scaling of a constant map divides by 1e-12 instead of 0, and no graph
is built at steps without an update.
"""

from __future__ import annotations

from typing import Any

import torch

from composition.attention_store import AttentionStore
from composition.bank import AdapterBank
from composition.contrastive import branch_masks, fuse, paper_contrastive_loss, threshold_masks
from composition.sampling import PromptEmbeds, Sampler


def branch_maps_and_predictions(
    sampler: Sampler,
    bank: AdapterBank,
    store: AttentionStore,
    branches: list[tuple[list[float] | None, PromptEmbeds]],
    latents: torch.Tensor,
    t: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Every branch's CFG pair on `latents`: (unconditional predictions, conditional ones, raw maps (T, h, w)
    averaged over heads, captured layers and the batch). Keeps the graph when gradients are on."""
    uncond, cond, maps = [], [], []
    size = tuple(latents.shape[-2:])
    for selection, embeds in branches:
        bank.activate(selection)
        u, c = sampler.predict(latents, t, embeds)
        uncond.append(u)
        cond.append(c)
        maps.append(store.token_maps(size).mean(0))  # (B, T, h, w) -> (T, h, w)
    return uncond, cond, maps


def run(
    sampler: Sampler,
    bank: AdapterBank,
    store: AttentionStore,
    branches: list[tuple[list[float] | None, PromptEmbeds]],
    indices: list[list[list[int]]],
    opts: Any,
) -> dict[str, Any]:
    """The loop above over `sampler`'s timesteps; `branches` = [(selection, embeds)] with the base first,
    `indices[b][c]` = concept c's positions in branch b's text, `opts` a `clora.CloraOptions`. Returns the
    extras (final masks, their mean, losses, backward passes)."""
    latents = sampler.latents
    size = tuple(latents.shape[-2:])
    losses: list[float] = []
    backward = 0
    mask_sum = masks = None
    own = [indices[b + 1][b] for b in range(len(branches) - 1)]  # each adapter's concept in its own branch
    for index, t in enumerate(sampler.timesteps):
        rounds = opts.rounds_at(index, sampler.steps)
        if rounds == 0:
            uncond, cond, maps = branch_maps_and_predictions(sampler, bank, store, branches, latents, t)
        for _ in range(rounds):
            with torch.enable_grad():
                moving = latents.detach().requires_grad_(True)
                uncond, cond, maps = branch_maps_and_predictions(sampler, bank, store, branches, moving, t)
                loss = paper_contrastive_loss(maps, indices, opts.temperature)
                (grad,) = torch.autograd.grad(loss, moving)
            backward += 1
            latents = (moving - opts.step_size * grad).detach()
            uncond, cond, maps = (
                [u.detach() for u in uncond],
                [c.detach() for c in cond],
                [m.detach() for m in maps],
            )
            losses.append(float(loss.detach()))
        concept_masks = threshold_masks(maps[1:], own, opts.mask_threshold)
        masks = branch_masks(concept_masks, size)  # (N+1, H, W), base first
        mask_sum = masks if mask_sum is None else mask_sum + masks
        eps = sampler.guide(fuse(uncond, masks), fuse(cond, masks))
        sampler.latents = latents
        sampler.step(eps, t, index, loss=losses[-1] if losses else None)
        latents = sampler.latents
    return {
        "masks": masks.cpu(),
        "mean_masks": (mask_sum / sampler.steps).cpu(),
        "losses": losses,
        "backward_passes": backward,
        "base_branch_steps": sampler.steps,
    }
