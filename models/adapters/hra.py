"""HRA (Yuan et al., 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation") through PEFT, plus the paper's orthogonality regulariser that PEFT lacks.

The adapted weight is W' = W · H with H = Π_i (I − 2 ûᵢûᵢᵀ), a chain of r Householder reflections whose
vectors are the columns of U ∈ R^{d_in×r}. PEFT's symmetric init repeats every vector twice, so the
reflections cancel and H = I at the start (r must therefore be even). The regulariser
λ · Σ_layers ‖I − ÛᵀÛ‖_F (Û: U with unit-norm columns) pushes the reflection planes towards orthogonality;
`AdapterHandle.regularization_loss()` returns it for the training loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from peft import HRAConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from models.adapters.family import (
    ADAPTER_NAME,
    AdapterConfig,
    AdapterFamily,
    LayerShapes,
    base_weight,
    inject_peft,
    require,
)


@dataclass
class HraAdapterConfig(AdapterConfig):
    """HRA hyperparameters (validated)."""

    family = "hra"

    r: int = field(
        default=8,
        metadata={"help": "Number of Householder reflections per layer (even, so the adapter starts at I)."},
    )
    apply_gs: bool = field(
        default=False,
        metadata={"help": "Orthonormalise the reflection vectors with Gram-Schmidt (PEFT apply_GS)."},
    )
    ortho_lambda: float = field(
        default=1e-4, metadata={"help": "Weight λ of the orthogonality regulariser λ·Σ‖I − ÛᵀÛ‖_F (0 = off)."}
    )

    def check(self) -> None:
        require(
            isinstance(self.r, int) and self.r >= 2 and self.r % 2 == 0,
            f"hra r must be an even integer >= 2 (pairs of equal reflections start the adapter at the identity), "
            f"got {self.r!r}.",
        )
        require(self.ortho_lambda >= 0, f"hra ortho_lambda must be >= 0, got {self.ortho_lambda!r}.")

    def validate(self, layer_shapes: LayerShapes) -> None:
        super().validate(layer_shapes)
        for name, shape in layer_shapes.items():
            require(len(shape) == 2, f"hra adapts nn.Linear layers here; {name} is a convolution.")
            require(self.r <= shape[1], f"hra r={self.r} exceeds the {shape[1]} inputs of {name}; lower r.")


def to_peft_config(config: HraAdapterConfig, targets: list[str]) -> HRAConfig:
    """The equivalent PEFT `HRAConfig` for these exact target modules."""
    return HRAConfig(r=config.r, apply_GS=config.apply_gs, target_modules=list(targets), init_weights=True)


def _inject(unet: nn.Module, targets: list[str], config: HraAdapterConfig) -> dict[str, BaseTunerLayer]:
    return inject_peft(unet, to_peft_config(config, targets), targets)


@torch.no_grad()
def _effective_weight(layer: BaseTunerLayer) -> torch.Tensor:
    weight = base_weight(layer)
    if layer.merged:
        return weight.detach().clone()
    reflection = layer.get_delta_weight(ADAPTER_NAME)
    return (weight.to(reflection.dtype) @ reflection).to(weight.dtype)


def _param_shapes(config: HraAdapterConfig, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {"hra_u": (shape[1], config.r)}


def orthogonality_loss(u: torch.Tensor) -> torch.Tensor:
    """‖I − ÛᵀÛ‖_F for one layer's reflection vectors U (d_in × r), Û with unit-norm columns."""
    unit = u / u.norm(dim=0, keepdim=True)
    eye = torch.eye(u.shape[1], device=u.device, dtype=u.dtype)
    return torch.linalg.matrix_norm(eye - unit.t() @ unit)


def _regularization(layers: Mapping[str, BaseTunerLayer], config: HraAdapterConfig) -> torch.Tensor | None:
    if config.ortho_lambda == 0:
        return None
    return config.ortho_lambda * sum(
        orthogonality_loss(layer.hra_u[ADAPTER_NAME]) for layer in layers.values()
    )


FAMILY = AdapterFamily(
    name="hra",
    title="HRA",
    paper="Yuan et al. 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder "
    "Reflection Adaptation",
    config_cls=HraAdapterConfig,
    inject=_inject,
    effective_weight=_effective_weight,
    param_shapes=_param_shapes,
    regularization=_regularization,
    peft_config=to_peft_config,
)
