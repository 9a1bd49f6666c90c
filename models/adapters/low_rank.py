"""Every adapter's weight update ΔW per layer, its exact low-rank form where one exists, and LoRA extraction.

- LoRA: ΔW = (α/r)·B·A, so (down, up) = (A, (α/r)·B).
- HRA (Yuan et al. 2024): PEFT applies the reflections on the input side, W' = W·H with
  H = H₁·H₂·…·H_r, Hᵢ = I − 2ûᵢûᵢᵀ (ûᵢ = uᵢ/‖uᵢ‖, the columns of `hra_u` in order). In the compact WY form
  (Schreiber & Van Loan 1989, "A storage-efficient WY representation for products of Householder
  transformations") H = I − Y·T·Yᵀ with Y = [û₁ … û_r] and T upper triangular, grown one reflection at a time
  by T ← [[T, −2·T·Yᵀ·y], [0, 2]] (expand (I − YTYᵀ)(I − 2yyᵀ)). Hence
  ΔW = W·(H − I) = (−W·Y·T)·Yᵀ: a LoRA with down = Yᵀ (r × d_in) and up = −W·Y·T (d_out × r), exactly, of rank
  ≤ r. With Gram-Schmidt (`apply_gs`) PEFT builds H = I − 2·Q·Qᵀ from the orthonormalised vectors Q, so
  down = Qᵀ and up = −2·W·Q.
- BOFT and DiffuseKronA have no exact low-rank form: ΔW is computed in full (`delta_weights`) and a rank-R
  LoRA is extracted by truncated SVD, the best rank-R approximation in Frobenius norm (Eckart & Young 1936) —
  the job kohya's `networks/extract_lora_from_models.py` does for fine-tuned models. The relative error
  ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F is reported per layer and overall (all layers as one vector).

ΔW of HRA and BOFT depends on the base weight W, so those take the base UNet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from models.adapters.family import AdapterError
from models.adapters.files import AdapterFile
from models.adapters.handle import AdapterHandle
from models.adapters.hra import HraAdapterConfig
from models.adapters.lora import LoraAdapterConfig

Adapter = AdapterFile | AdapterHandle
LowRank = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name -> (down (r × d_in), up (d_out × r)) with ΔW = up · down (no further scale); a LoRA imported
for a 1×1 convolution keeps its 4-D kohya shapes."""

EXACT_LOW_RANK = ("lora", "hra")
"""Families whose ΔW is exactly a LoRA (whatever the base weights)."""
WEIGHT_FREE_DELTA = ("lora", "krona")
"""Families whose ΔW is a function of the adapter alone (the others need the base weights)."""


@dataclass
class Extraction:
    """A LoRA extracted from full weight updates, with how far it is from them."""

    factors: LowRank
    layer_errors: dict[str, float]
    """Relative Frobenius error ‖ΔW − up·down‖ / ‖ΔW‖ per layer (0 where ΔW = 0)."""
    relative_error: float
    """The same over all layers at once: sqrt(Σ‖ΔW − up·down‖²) / sqrt(Σ‖ΔW‖²)."""


def adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's own tensors (keyed `<module>.<PEFT parameter>`)."""
    return adapter.state_dict() if isinstance(adapter, AdapterHandle) else dict(adapter.tensors)


def base_weights(adapter: Adapter, unet: nn.Module | None) -> dict[str, torch.Tensor]:
    """The base weight W of every target: of `unet`, else of the UNet a handle is attached to."""
    if isinstance(adapter, AdapterHandle):
        if adapter.merged:
            raise AdapterError("unmerge() the adapter before exporting it (its base weights hold ΔW now).")
        unet = adapter.unet if unet is None else unet
    if unet is None:
        raise AdapterError(
            f"a {adapter.family} adapter changes W by an amount that depends on W itself, so exporting it needs "
            "the base model it was trained on (--base-model)."
        )
    if isinstance(adapter, AdapterFile):
        adapter.check_compatible(unet)
    weights = {}
    for name in adapter.targets:
        module = unet.get_submodule(name)
        weights[name] = getattr(module, "base_layer", module).weight.detach()
    return weights


def delta_weights(adapter: Adapter, unet: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """ΔW = W' − W of every target in float32 (LoRA and DiffuseKronA need no UNet; HRA and BOFT do)."""
    family = adapter.family
    if family in ("lora", "hra"):
        return {
            name: (up.flatten(1) @ down.flatten(1)).reshape(adapter.layer_shapes[name])
            for name, (down, up) in exact_lora(adapter, unet).items()
        }
    if family == "krona":
        tensors = adapter_tensors(adapter)
        scale = adapter.config.scale
        return {
            name: scale * torch.kron(tensors[f"{name}.krona_A"].float(), tensors[f"{name}.krona_B"].float())
            for name in adapter.targets
        }
    base = base_weights(adapter, unet)
    if isinstance(adapter, AdapterHandle):
        adapted = adapter.layer_weights()
    else:
        adapted = adapter.layer_weights(unet)  # type: ignore[arg-type]  # base_weights checked unet
    return {name: adapted[name].float() - base[name].float() for name in adapter.targets}


def exact_lora(adapter: Adapter, unet: nn.Module | None = None) -> LowRank:
    """The exact LoRA form of a LoRA or HRA adapter (float32 factors, computed in float64)."""
    if adapter.family == "lora":
        return _lora_factors(adapter)
    if adapter.family == "hra":
        return _hra_factors(adapter, base_weights(adapter, unet))
    raise AdapterError(
        f"a {adapter.family} adapter has no exact LoRA form; extract one at a chosen rank (--rank R) or export "
        "the full weight differences (--to lycoris)."
    )


def _lora_factors(adapter: Adapter) -> LowRank:
    config: LoraAdapterConfig = adapter.config
    tensors = adapter_tensors(adapter)
    factors: LowRank = {}
    for name in adapter.targets:
        scale = config.alpha_of(name) / config.rank_of(name)
        factors[name] = (tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] * scale)
    return factors


def _hra_factors(adapter: Adapter, base: Mapping[str, torch.Tensor]) -> LowRank:
    config: HraAdapterConfig = adapter.config
    tensors = adapter_tensors(adapter)
    factors: LowRank = {}
    for name in adapter.targets:
        u = tensors[f"{name}.hra_u"].double()  # (d_in, r)
        weight = base[name].double()  # (d_out, d_in)
        if config.apply_gs:
            q = _gram_schmidt(u)
            down, up = q.t(), -2.0 * weight @ q
        else:
            y, t = householder_wy(u)
            down, up = y.t(), -(weight @ y @ t)
        factors[name] = (down.float(), up.float())
    return factors


def householder_wy(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, T) with Π_i (I − 2ûᵢûᵢᵀ) = I − Y·T·Yᵀ for the columns uᵢ of `u` (d × r), multiplied in order."""
    y = u / u.norm(dim=0, keepdim=True)
    r = y.shape[1]
    t = torch.zeros(r, r, dtype=u.dtype, device=u.device)
    for k in range(r):
        t[:k, k] = -2.0 * t[:k, :k] @ (y[:, :k].t() @ y[:, k])
        t[k, k] = 2.0
    return y, t


def _gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns from `u` in order, as PEFT's HRA `apply_GS` builds them."""
    columns: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for q in columns:
            v = v - (q @ v) * q
        columns.append(v / v.norm())
    return torch.stack(columns, dim=1)


def svd_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-`rank` LoRA (down, up) of one ΔW and its relative Frobenius error. A convolution's ΔW
    (out, in, kh, kw) gives kohya's conv shapes: down (r, in, kh, kw), up (out, r, 1, 1).

    The singular values are split evenly (up = U·√S, down = √S·Vᵀ) so neither factor dwarfs the other in fp16.
    """
    matrix = delta.flatten(1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = max(1, min(rank, s.numel()))
    root = s[:keep].sqrt()
    up = u[:, :keep] * root
    down = root[:, None] * vh[:keep]
    total = float(s.square().sum())
    lost = float(s[keep:].square().sum())
    if delta.dim() == 4:
        down, up = down.reshape(keep, *delta.shape[1:]), up.reshape(*up.shape, 1, 1)
    return down.float(), up.float(), math.sqrt(lost / total) if total > 0 else 0.0


def extract_lora(deltas: Mapping[str, torch.Tensor], rank: int) -> Extraction:
    """A rank-`rank` LoRA of every ΔW (a layer with fewer dimensions keeps all of them)."""
    if rank < 1:
        raise AdapterError(f"the rank of an extracted LoRA must be >= 1, got {rank}.")
    factors: LowRank = {}
    errors: dict[str, float] = {}
    lost = total = 0.0
    for name, delta in deltas.items():
        down, up, error = svd_lora(delta, rank)
        factors[name] = (down, up)
        errors[name] = error
        norm = float(delta.double().square().sum())
        total += norm
        lost += norm * error**2
    return Extraction(factors, errors, math.sqrt(lost / total) if total > 0 else 0.0)
