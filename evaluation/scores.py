"""Score formulas on CLIP embeddings: CLIPScore (two scales), CLIP-I and per-concept scores.

- CLIPScore, Hessel et al. 2021 ("CLIPScore: A Reference-free Evaluation Metric for Image Captioning"):
  `w · max(cos(E_image, E_text), 0)` with `w = 2.5`.
- The 0–100 scale used by torchmetrics' `CLIPScore`: `max(100 · cos(E_image, E_text), 0)`.
- CLIP-I, Ruiz et al. 2023 (DreamBooth): the mean cosine similarity between the CLIP image embeddings of a
  generated image and of the real subject (reference) images.
- Per-concept scores for multi-concept compositions (as reported by Attend-and-Excite / CLoRA-style papers):
  each concept phrase is scored against the image on its own, and the minimum over concepts shows whether
  every concept made it into the picture.

Everything here works on plain tensors, so the formulas can be tested on hand-made embeddings.
"""

from __future__ import annotations

import torch

HESSEL_WEIGHT = 2.5
"""The rescaling weight `w` of Hessel et al. 2021."""

METRIC_DESCRIPTIONS: dict[str, str] = {
    "clip_t_cosine": "cosine similarity between the CLIP image and prompt embeddings",
    "clipscore_hessel": "CLIPScore, Hessel et al. 2021: 2.5 * max(cos, 0), range 0-2.5",
    "clipscore_100": "CLIPScore on the torchmetrics 0-100 scale: max(100 * cos, 0)",
    "clip_i": "CLIP-I (DreamBooth): mean cosine between the image and the reference images' embeddings",
}


def normalize(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (CLIP compares embeddings by direction only)."""
    if embeddings.ndim != 2:
        raise ValueError(f"expected a (N, D) batch of embeddings, got shape {tuple(embeddings.shape)}")
    return embeddings / embeddings.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(embeddings.dtype).tiny)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of `a` with row i of `b`: (N, D), (N, D) -> (N,)."""
    if a.shape != b.shape:
        raise ValueError(
            f"paired embeddings must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return (normalize(a) * normalize(b)).sum(dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` with every row of `b`: (N, D), (M, D) -> (N, M)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"embedding widths differ: {a.shape[-1]} and {b.shape[-1]}")
    return normalize(a) @ normalize(b).T


def clipscore_hessel(cosine: torch.Tensor, weight: float = HESSEL_WEIGHT) -> torch.Tensor:
    """CLIPScore of Hessel et al. 2021: `weight · max(cos, 0)`, elementwise."""
    return weight * cosine.clamp_min(0.0)


def clipscore_100(cosine: torch.Tensor) -> torch.Tensor:
    """CLIPScore on the torchmetrics scale: `max(100 · cos, 0)`, elementwise."""
    return 100.0 * cosine.clamp_min(0.0)


def clip_i(image_embeddings: torch.Tensor, reference_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP-I per generated image: its mean cosine with every reference image, (N, D), (R, D) -> (N,).

    The mean of the result over images is DreamBooth's CLIP-I (the mean over all generated/real pairs).
    """
    if reference_embeddings.shape[0] == 0:
        raise ValueError("CLIP-I needs at least one reference image")
    return cosine_matrix(image_embeddings, reference_embeddings).mean(dim=1)


def concept_minimum(concept_scores: torch.Tensor) -> torch.Tensor:
    """Per image, the lowest score over its concepts: (N, K) -> (N,)."""
    if concept_scores.ndim != 2 or concept_scores.shape[1] == 0:
        raise ValueError(
            f"expected (images, concepts) scores with at least one concept, got {tuple(concept_scores.shape)}"
        )
    return concept_scores.min(dim=1).values
