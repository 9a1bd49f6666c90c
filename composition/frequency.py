"""Frequency profile of an image for CMLoRA's adapter ordering (Zou et al., 2025, "Cached Multi-LoRA
Composition for Multi-Concept Image Generation", ICLR).

The profile is the radial log-amplitude spectrum: the 2-D FFT of the grey image (mean removed, Hann-windowed
so the image border does not leak into every frequency), centred, log(1 + |F|), averaged over rings of equal
normalised radius (0 = DC, 1 = the Nyquist corner). An adapter's high-frequency energy is the share of the
spectral energy Σ|F|² that lies beyond the normalised radius `cutoff`; CMLoRA lets adapters with more
high-frequency content dominate early steps. The reference code hard-codes the order by LoRA category
(character, clothing, style, ...); here it is measured from what each adapter actually produces.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

DEFAULT_BINS = 16
"""Number of radial rings of the profile."""
DEFAULT_CUTOFF = 0.25
"""Normalised radius above which spectrum counts as high frequency."""


def _grey(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """A 2-D float array in [0, 1] (PIL image, HxW[xC] array, or CxHxW tensor)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array.astype(np.float64)
    if array.ndim == 3:
        channel_axis = 0 if isinstance(image, torch.Tensor) else 2
        array = array.mean(axis=channel_axis)
    if array.ndim != 2:
        raise ValueError(f"expected an image, got an array of shape {array.shape}")
    return array


def _spectrum(image: Image.Image | np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(|F| centred, normalised radius 0..1) of the mean-removed, Hann-windowed grey image."""
    grey = _grey(image)
    h, w = grey.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    amplitude = np.abs(np.fft.fftshift(np.fft.fft2((grey - grey.mean()) * window)))  # (H, W)
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.hypot((yy - h // 2) / (h / 2), (xx - w // 2) / (w / 2)) / np.sqrt(2)  # 0 .. 1
    return amplitude, radius


def radial_profile(image: Image.Image | np.ndarray | torch.Tensor, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Mean log(1 + |FFT|) per ring of normalised radius, `bins` rings from DC to the corner."""
    amplitude, radius = _spectrum(image)
    ring = np.minimum((radius * bins).astype(int), bins - 1)
    sums = np.bincount(ring.ravel(), weights=np.log1p(amplitude).ravel(), minlength=bins)
    counts = np.bincount(ring.ravel(), minlength=bins)
    return sums / np.maximum(counts, 1)


def high_frequency_energy(
    image: Image.Image | np.ndarray | torch.Tensor, cutoff: float = DEFAULT_CUTOFF
) -> float:
    """Share of spectral energy beyond normalised radius `cutoff`: the score CMLoRA ranks adapters by."""
    if not 0.0 < cutoff < 1.0:
        raise ValueError(f"cutoff must be in (0, 1), got {cutoff}")
    amplitude, radius = _spectrum(image)
    energy = amplitude**2
    total = energy.sum()
    return float(energy[radius > cutoff].sum() / total) if total > 0 else 0.0


def frequency_order(scores: list[float]) -> list[int]:
    """Adapter indices from most to least high-frequency energy (ties keep bank order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
