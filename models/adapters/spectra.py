"""What an adapter changed in each layer, read from singular values: the size and effective rank of ΔW, its
spectrum, and intruder dimensions.

- Effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality"):
  exp(H(p)) with pᵢ = σᵢ / Σσ — 1 for a rank-1 update, the full size for a flat spectrum.
- Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
  among the top-k singular vectors of the adapted weight W' = W + ΔW, those whose largest |cosine| with
  every singular vector of the base weight W (same side) stays below a threshold ε — new directions the adapter
  brought in rather than re-weighted. The paper reports them for k = 10 and several ε; 0.5 is the default here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INTRUDER_TOP_K = 10
INTRUDER_THRESHOLD = 0.5
SPECTRUM_LENGTH = 32
"""Singular values of ΔW kept per layer in a report."""


@dataclass
class LayerSpectrum:
    """The singular-value summary of one layer's update."""

    delta_norm: float
    """‖ΔW‖_F."""
    relative_delta_norm: float | None
    """‖ΔW‖_F / ‖W‖_F (None without the base weight)."""
    effective_rank: float
    numerical_rank: int
    """Singular values above max(shape)·eps(float32)·σ₁."""
    singular_values: list[float]
    """The largest `SPECTRUM_LENGTH` singular values of ΔW."""
    intruders: int | None
    """Intruder dimensions (left singular vectors) among the top-k of W + ΔW (None without the base weight)."""
    intruders_right: int | None
    """The same for the right singular vectors."""


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (0 for a zero matrix)."""
    total = float(singular_values.sum())
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0].double() / total
    return math.exp(float(-(p * p.log()).sum()))


def intruder_dimensions(
    base: torch.Tensor,
    adapted: torch.Tensor,
    top_k: int = INTRUDER_TOP_K,
    threshold: float = INTRUDER_THRESHOLD,
) -> tuple[int, int]:
    """How many of the top-`top_k` singular vectors of `adapted` have max |cos| < `threshold` with every
    singular vector of `base` on the same side, as (left / output side, right / input side). The paper counts
    them on one side; both are given because adapters that act on the input side (HRA: W·H, BOFT: W·Rᵀ) keep
    the left singular vectors by construction (W·H = U·Σ·(HᵀV)ᵀ) and show their new directions on the right."""
    u_base, _, vh_base = torch.linalg.svd(base.double(), full_matrices=False)
    u_adapted, _, vh_adapted = torch.linalg.svd(adapted.double(), full_matrices=False)
    left = (u_adapted[:, :top_k].t() @ u_base).abs().amax(dim=1)  # unit vectors: |cos| = |dot|
    right = (vh_adapted[:top_k] @ vh_base.t()).abs().amax(dim=1)
    return int((left < threshold).sum()), int((right < threshold).sum())


def layer_spectrum(
    delta: torch.Tensor,
    base: torch.Tensor | None = None,
    top_k: int = INTRUDER_TOP_K,
    threshold: float = INTRUDER_THRESHOLD,
) -> LayerSpectrum:
    """The `LayerSpectrum` of one ΔW (2-D, or a 1×1 convolution's 4-D weight, flattened)."""
    matrix = delta.flatten(1).double()
    s = torch.linalg.svdvals(matrix)
    tolerance = max(matrix.shape) * torch.finfo(torch.float32).eps * float(s[0]) if s.numel() else 0.0
    relative = intruders = intruders_right = None
    if base is not None:
        weight = base.flatten(1).double()
        relative = float(matrix.norm() / weight.norm())
        intruders, intruders_right = intruder_dimensions(weight, weight + matrix, top_k, threshold)
    return LayerSpectrum(
        delta_norm=float(matrix.norm()),
        relative_delta_norm=relative,
        effective_rank=effective_rank(s),
        numerical_rank=int((s > tolerance).sum()) if float(s[0]) > 0 else 0,
        singular_values=[float(v) for v in s[:SPECTRUM_LENGTH]],
        intruders=intruders,
        intruders_right=intruders_right,
    )
