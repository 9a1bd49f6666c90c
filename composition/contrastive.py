"""CLoRA's attention math (Meral et al., 2024, "CLoRA: A Contrastive Approach to Compose Multiple LoRA
Models"): token maps from captured cross-attention, the contrastive loss over them, and the per-branch masks that
fuse the branches' noise predictions.

Two recipes live here. The reference code's (76def7c), which `preset="paper"` runs: raw attention maps, each
token's map min–max scaled, NT-Xent per positive pair as pytorch-metric-learning computes it (`ntxent_pairs`,
`paper_contrastive_loss`), masks = OR over the concept's tokens of (map > α·max(map)) (`threshold_masks`).
Atelier's (its other presets): token maps as in Attend-and-Excite (Chefer et al., 2023) — the cross-attention over
the prompt's text tokens (BOS and padding dropped) sharpened (×100) and re-normalised with a softmax over tokens,
each token's map min–max normalised (`normalised_token_maps`); a multi-positive InfoNCE where every concept token
map of every branch is an anchor, its positives the same concept's maps in all branches, its negatives the other
concepts' (`contrastive_loss`); masks with `>=` instead of `>` so that α = 0 gives an all-ones mask
(`strength_masks`), and the region geometry of the `partition` preset (`exclusive`, `connected`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

SHARPEN = 100.0
"""Attend-and-Excite's scale before the softmax over tokens."""


def normalised_token_maps(raw: torch.Tensor, eos: int, sharpen: float = SHARPEN) -> torch.Tensor:
    """(T, h, w) attention probabilities -> (T, h, w) maps: softmax over tokens 1..eos-1, each min–max scaled.

    Positions outside 1..eos-1 (BOS, EOS, padding) are zero.
    """
    text = raw[1:eos] * sharpen  # (T', h, w)
    text = torch.softmax(text, dim=0)
    flat = text.flatten(1)  # (T', hw)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    flat = (flat - low) / (high - low).clamp_min(1e-8)
    out = torch.zeros_like(raw)
    out[1:eos] = flat.view_as(text)
    return out


def contrastive_loss(
    maps: Sequence[torch.Tensor], indices: Sequence[Sequence[Sequence[int]]], temperature: float = 0.5
) -> torch.Tensor:
    """NT-Xent over concept token maps of all branches.

    `maps[b]` is branch b's (T, h, w) normalised token maps; `indices[b][c]` the token positions of concept
    c in branch b's text. Returns 0 when there are fewer than two concepts (nothing to contrast).
    """
    vectors, labels = [], []
    for branch_maps, branch_indices in zip(maps, indices, strict=True):
        for concept, positions in enumerate(branch_indices):
            for position in positions:
                vectors.append(branch_maps[position].flatten())
                labels.append(concept)
    label = torch.tensor(labels)
    if len(set(labels)) < 2:
        return torch.zeros((), dtype=maps[0].dtype, device=maps[0].device)
    z = F.normalize(torch.stack(vectors), dim=1)  # (K, hw)
    logits = z @ z.T / temperature  # (K, K)
    eye = torch.eye(len(labels), dtype=torch.bool, device=z.device)
    same = (label[:, None] == label[None, :]).to(z.device) & ~eye
    logits = logits.masked_fill(eye, float("-inf"))
    log_denominator = torch.logsumexp(logits, dim=1)
    log_numerator = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    has_positive = same.any(1)
    return (log_denominator - log_numerator)[has_positive].mean()


def concept_strength(maps: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """(h, w) strength of a concept: the max over its tokens of each token map scaled by its own peak."""
    selected = maps[list(positions)]  # (k, h, w)
    peak = selected.flatten(1).max(1).values.view(-1, 1, 1).clamp_min(1e-8)
    return (selected / peak).amax(0)


def strength_masks(strengths: Sequence[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """(h, w) bool masks from concept strengths: strength >= threshold · max(strength). On one step's
    `concept_strength` (which peaks at 1) this is CLoRA's mask: OR over the concept's tokens of
    (map >= threshold · max(map))."""
    return [s >= threshold * s.max() for s in strengths]


def exclusive(
    masks: Sequence[torch.Tensor],
    strengths: Sequence[torch.Tensor],
    objects: Sequence[Sequence[int]] | None = None,
) -> list[torch.Tensor]:
    """The masks with every cell claimed by several objects kept only by the strongest one there.

    `objects` groups the concepts that describe one object (`ConceptPrompt.objects`); default: one concept
    per object. An object claims the union of its concepts' masks with the strongest of their strengths, and
    every concept of the winning object gets the object's cells, so attributes of one object are fused there
    instead of splitting it between them.
    """
    groups = [list(g) for g in objects] if objects is not None else [[i] for i in range(len(masks))]
    claimed = torch.stack([torch.stack([masks[i] for i in g]).any(0) for g in groups])  # (G, h, w) bool
    power = torch.stack([torch.stack([strengths[i] for i in g]).amax(0) for g in groups])  # (G, h, w)
    winner = power.masked_fill(~claimed, float("-inf")).argmax(0)  # (h, w)
    out: list[torch.Tensor] = list(masks)
    for number, group in enumerate(groups):
        for concept in group:
            out[concept] = claimed[number] & (winner == number)
    return out


def connected(
    masks: Sequence[torch.Tensor],
    strengths: Sequence[torch.Tensor],
    objects: Sequence[Sequence[int]] | None = None,
) -> list[torch.Tensor]:
    """Exclusive masks made one region per object: every object keeps its 4-connected part of largest
    summed strength, and the cells it loses go to the neighbouring object strongest there (grown one ring at a
    time; a cell that no kept region reaches is left to the base branch).

    An object of the prompt is one thing in one place. Read from a coarse map, an object's mask sometimes also
    holds a stray cell inside the other object's half (a corner where neither draws attention, taken by the
    one whose normalised map is less weak there); that cell's prediction then comes from a branch that draws
    something else there and cuts into the other object. `objects` groups concepts as `exclusive` does
    (default: one concept per object); every concept of an object gets the object's region, and an object
    with no cells keeps none.
    """
    groups = [list(g) for g in objects] if objects is not None else [[i] for i in range(len(masks))]
    claimed = [torch.stack([masks[i] for i in g]).any(0) for g in groups]
    power = [torch.stack([strengths[i] for i in g]).amax(0) for g in groups]  # strongest of its concepts
    kept = [_main_component(c, p) for c, p in zip(claimed, power, strict=True)]
    orphans = torch.stack([c & ~k for c, k in zip(claimed, kept, strict=True)]).any(0)
    while orphans.any():
        reach = torch.stack(
            [p.masked_fill(~(_grow(k) & orphans), float("-inf")) for k, p in zip(kept, power, strict=True)]
        )  # (G, h, w)
        value, winner = reach.max(0)
        taken = value > float("-inf")
        if not taken.any():
            break
        kept = [k | (taken & (winner == number)) for number, k in enumerate(kept)]
        orphans &= ~taken
    out: list[torch.Tensor] = list(masks)
    for group, region in zip(groups, kept, strict=True):
        for concept in group:
            out[concept] = region
    return out


def _main_component(mask: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """The 4-connected component of `mask` with the largest summed strength."""
    left, best, best_sum = mask.clone(), torch.zeros_like(mask), float("-inf")
    while left.any():
        region = torch.zeros_like(left).flatten()
        region[strength.masked_fill(~left, float("-inf")).flatten().argmax()] = True
        region = region.view_as(left)
        while True:  # flood fill inside what is left of the mask
            grown = _grow(region) & left
            if torch.equal(grown, region):
                break
            region = grown
        total = float(strength[region].sum())
        if total > best_sum:
            best, best_sum = region, total
        left &= ~region
    return best


def _grow(region: torch.Tensor) -> torch.Tensor:
    """The region and its 4-neighbours."""
    grown = region.clone()
    grown[1:] |= region[:-1]
    grown[:-1] |= region[1:]
    grown[:, 1:] |= region[:, :-1]
    grown[:, :-1] |= region[:, 1:]
    return grown


def branch_masks(concept_masks: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """(N+1, H, W) float masks at latent size: the base branch first (where no concept mask is set)."""
    stacked = torch.stack(list(concept_masks)).float()  # (N, h, w)
    base = 1.0 - stacked.amax(0, keepdim=True)  # (1, h, w)
    masks = torch.cat([base, stacked])  # (N+1, h, w)
    return F.interpolate(masks[None], size=size, mode="nearest")[0]  # (N+1, H, W)


def fuse(predictions: Sequence[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Σ Mᵢ εᵢ / Σ Mᵢ over branches; `predictions[i]` is (1, C, H, W), `masks` (branches, H, W)."""
    weights = masks[:, None, None].to(predictions[0].dtype)  # (branches, 1, 1, H, W)
    stacked = torch.stack(list(predictions))  # (branches, 1, C, H, W)
    return (weights * stacked).sum(0) / weights.sum(0).clamp_min(1e-8)


def ntxent_pairs(vectors: torch.Tensor, labels: Sequence[int], temperature: float) -> torch.Tensor:
    """NT-Xent as pytorch-metric-learning's `NTXentLoss` computes it (which CLoRA's reference code calls): cosine
    similarity s over the (K, D) `vectors`; for every ordered positive pair (a, p), a ≠ p with one label,
    ℓ_ap = −log(exp(s_ap/τ) / (exp(s_ap/τ) + Σ_n exp(s_an/τ))) over the n labelled otherwise; the mean over the
    positive pairs. 0 when there is no positive pair or no negative."""
    label = torch.tensor(list(labels), device=vectors.device)
    z = F.normalize(vectors, dim=1)
    logits = z @ z.T / temperature  # (K, K)
    eye = torch.eye(len(label), dtype=torch.bool, device=vectors.device)
    positive = (label[:, None] == label[None, :]) & ~eye
    negative = label[:, None] != label[None, :]
    if not positive.any() or not negative.any():
        return vectors.sum() * 0.0
    anchors, partners = torch.where(positive)
    negatives = logits.masked_fill(~negative, float("-inf"))[anchors]  # (P, K): each pair's anchor row
    pair = logits[anchors, partners]  # (P,)
    log_denominator = torch.logsumexp(torch.cat([pair[:, None], negatives], dim=1), dim=1)
    return (log_denominator - pair).mean()


def paper_contrastive_loss(
    maps: Sequence[torch.Tensor], indices: Sequence[Sequence[Sequence[int]]], temperature: float
) -> torch.Tensor:
    """CLoRA reference code's loss: every concept token's raw map of every branch, flattened and min–max scaled,
    labelled by its concept, through `ntxent_pairs`. `maps[b]` is branch b's (T, h, w) raw attention,
    `indices[b][c]` the positions of concept c in branch b's text."""
    vectors, labels = [], []
    for branch_maps, branch_indices in zip(maps, indices, strict=True):
        for concept, positions in enumerate(branch_indices):
            for position in positions:
                flat = branch_maps[position].flatten()
                vectors.append((flat - flat.min()) / (flat.max() - flat.min()).clamp_min(1e-12))
                labels.append(concept)
    return ntxent_pairs(torch.stack(vectors), labels, temperature)


def threshold_masks(
    maps: Sequence[torch.Tensor], positions: Sequence[Sequence[int]], alpha: float
) -> list[torch.Tensor]:
    """CLoRA reference code's masks: for concept c, the OR over its tokens of (map > α·max(map)) on `maps[c]`,
    a (T, h, w) raw attention (each adapter branch's own); (h, w) bool per concept."""
    out = []
    for concept_maps, tokens in zip(maps, positions, strict=True):
        selected = concept_maps[list(tokens)]  # (k, h, w)
        peak = selected.flatten(1).max(1).values.view(-1, 1, 1)
        out.append((selected > alpha * peak).any(0))
    return out
