"""Object regions from cross-attention, shared by CLoRA's `partition` masks and CMLoRA's regional mixing.

The mask recipe is CLoRA's (Meral et al., 2024): a concept's region is where its phrase's tokens draw
attention at the 16×16-equivalent level (`composition.attention_store`), thresholded at α of its peak. Atelier
reads it as a partition of the image between the prompt's objects (`composition.contrastive`): each concept's
strength map is averaged over the forwards seen so far, a cell claimed by several objects goes to the
strongest one (the concepts of one object share its cells), and each object keeps one 4-connected region.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from composition.contrastive import connected, exclusive, strength_masks


class RegionTracker:
    """Running mean of each concept's attention strength (or its last reading), and the masks read from it.

    Concepts may be updated at different steps (CMLoRA's cached adapters run their full UNet only at refresh
    steps): each concept's mean is over its own updates.
    """

    def __init__(
        self,
        concepts: int,
        objects: Sequence[Sequence[int]],
        threshold: float,
        *,
        running_mean: bool = True,
        exclusive_masks: bool = True,
        connected_masks: bool = True,
    ) -> None:
        self.objects = [list(group) for group in objects]
        self.threshold = threshold
        self.running_mean = running_mean
        self.exclusive_masks = exclusive_masks
        self.connected_masks = connected_masks
        self.sums: list[torch.Tensor | None] = [None] * concepts
        self.counts = [0] * concepts

    def add(self, concept: int, strength: torch.Tensor) -> None:
        """Fold one (h, w) strength map of `concept` into its running mean (or replace the last one)."""
        total = self.sums[concept]
        if total is None or not self.running_mean:
            self.sums[concept], self.counts[concept] = strength.detach().clone(), 1
        else:
            self.sums[concept] = total + strength.detach()
            self.counts[concept] += 1

    @property
    def ready(self) -> bool:
        """Whether every concept has been seen at least once."""
        return all(count > 0 for count in self.counts)

    def strengths(self) -> list[torch.Tensor]:
        """Each concept's mean strength map so far."""
        if not self.ready:
            raise RuntimeError("every concept needs one attention reading before masks can be read.")
        return [total / count for total, count in zip(self.sums, self.counts, strict=True)]  # type: ignore[operator]

    def masks(self) -> list[torch.Tensor]:
        """(h, w) bool mask per concept from the mean strengths."""
        strengths = self.strengths()
        masks = strength_masks(strengths, self.threshold)
        if self.exclusive_masks:
            masks = exclusive(masks, strengths, self.objects)
            if self.connected_masks:
                masks = connected(masks, strengths, self.objects)
        return masks


def eos_position(pipe: Any, text: str) -> int:
    """Position of the end-of-text token of `text` under the pipeline's tokenizer (BOS = 0)."""
    tokenizer = pipe.tokenizer
    return len(tokenizer(text, truncation=True, max_length=tokenizer.model_max_length).input_ids) - 1
