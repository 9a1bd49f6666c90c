"""DiffuseKronA (Marjit et al., 2024, "DiffuseKronA: A Parameter Efficient Fine-tuning Method for
Personalized Diffusion Models"): Kronecker-product adapters on the UNet attention projections.

ΔW = scale · (A ⊗ B) in `torch.kron(A, B)` layout, with A ∈ R^{a1×a2} (Gaussian, std 1/a1) and
B ∈ R^{(d_out/a1)×(d_in/a2)} (zero), so training starts at the base model. PEFT's LoKr keeps A square, so
this is the project's own layer written in PEFT's `BaseTunerLayer` pattern (per-adapter `ParameterDict`s,
`get_delta_weight`, merge/unmerge, disable). The forward never builds ΔW: with x reshaped to
X ∈ R^{a2×b2} (row-major), (A ⊗ B)·x = vec(A·X·Bᵀ) — the row-major form of the paper's vec(B·X·Aᵀ).

Factor sizes. The paper's SD setting is a1 = 64, a2 = 8; `factors` overrides them per projection type
(e.g. `{"attn2.to_k": [32, 8]}`; the longest matching name suffix wins). When a requested factor does not
divide the layer dimension, the rule is: use the largest divisor of the dimension that is <= the request
(a1 for d_out, a2 for d_in). So a 32-wide tiny layer with a1 = 64 gets a1 = 32, and 768-wide cross-attention
inputs keep a2 = 8 (768 = 8 · 96) while a 100-wide input with a2 = 8 would get a2 = 5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from models.adapters.family import (
    ADAPTER_NAME,
    AdapterConfig,
    AdapterConfigError,
    AdapterFamily,
    LayerShapes,
    additive_effective_weight,
    require,
)


@dataclass
class KronaConfig(AdapterConfig):
    """DiffuseKronA hyperparameters (validated)."""

    family = "krona"

    a1: int = field(default=64, metadata={"help": "Rows of A (requested); B gets d_out / a1 rows."})
    a2: int = field(default=8, metadata={"help": "Columns of A (requested); B gets d_in / a2 columns."})
    scale: float = field(
        default=1.0, metadata={"help": "Multiplier of the Kronecker update: ΔW = scale · (A ⊗ B)."}
    )
    factors: dict[str, list[int]] = field(
        default_factory=dict,
        metadata={
            "help": "Per-projection overrides: module-name suffix (e.g. 'to_v', 'attn2.to_k') -> [a1, a2]."
        },
    )

    def check(self) -> None:
        for label, value in (("a1", self.a1), ("a2", self.a2)):
            require(
                isinstance(value, int) and value >= 1,
                f"krona {label} must be an integer >= 1, got {value!r}.",
            )
        require(self.scale != 0, "krona scale must be non-zero (a zero scale disables the adapter).")
        for key, pair in self.factors.items():
            ok = (
                isinstance(pair, list | tuple)
                and len(pair) == 2
                and all(isinstance(v, int) and v >= 1 for v in pair)
            )
            require(ok, f"krona factors[{key!r}] must be two integers >= 1 ([a1, a2]), got {pair!r}.")

    def requested(self, name: str) -> tuple[int, int]:
        """The (a1, a2) requested for module `name` before fitting them to its shape."""
        keys = [k for k in self.factors if name == k or name.endswith("." + k)]
        if not keys:
            return self.a1, self.a2
        a1, a2 = self.factors[max(keys, key=len)]
        return int(a1), int(a2)

    def factors_for(self, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """The (a1, a2) actually used for a layer with weight shape (d_out, d_in) (see the module rule)."""
        a1, a2 = self.requested(name)
        return fit_factor(shape[0], a1), fit_factor(shape[1], a2)

    def validate(self, layer_shapes: LayerShapes) -> None:
        super().validate(layer_shapes)
        convs = [name for name, shape in layer_shapes.items() if len(shape) != 2]
        if convs:
            raise AdapterConfigError(f"krona adapts nn.Linear layers only; {convs[0]} is a convolution.")


def fit_factor(dim: int, wanted: int) -> int:
    """The largest divisor of `dim` that is <= `wanted` (DiffuseKronA's factor rule in this project)."""
    for candidate in range(min(dim, wanted), 0, -1):
        if dim % candidate == 0:
            return candidate
    return 1


class KronaLinear(nn.Module, BaseTunerLayer):
    """An `nn.Linear` plus a Kronecker-product update, following PEFT's tuner-layer pattern."""

    adapter_layer_names = ("krona_A", "krona_B")
    other_param_names = ("krona_scale",)

    def __init__(
        self, base_layer: nn.Linear, adapter_name: str, factors: tuple[int, int], scale: float
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.krona_A = nn.ParameterDict({})
        self.krona_B = nn.ParameterDict({})
        self.krona_scale: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.update_layer(adapter_name, factors, scale)

    def update_layer(self, adapter_name: str, factors: tuple[int, int], scale: float) -> None:
        """Create adapter `adapter_name`: A ~ N(0, 1/a1²), B = 0."""
        a1, a2 = factors
        if self.out_features % a1 or self.in_features % a2:
            raise AdapterConfigError(
                f"krona factors ({a1}, {a2}) do not divide the layer shape ({self.out_features}, {self.in_features})."
            )
        a = torch.empty(a1, a2)
        nn.init.normal_(a, std=1.0 / a1)
        self.krona_A[adapter_name] = nn.Parameter(a)
        self.krona_B[adapter_name] = nn.Parameter(
            torch.zeros(self.out_features // a1, self.in_features // a2)
        )
        self.krona_scale[adapter_name] = float(scale)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW = scale · kron(A, B), shape (d_out, d_in)."""
        return self.krona_scale[adapter] * torch.kron(self.krona_A[adapter], self.krona_B[adapter])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ΔW of the active (or named) adapters into the base weight."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.krona_A:
                continue
            weight = self.get_base_weight()
            merged = weight + self.get_delta_weight(adapter).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(
                    f"NaNs detected in the merged weights; adapter {adapter} seems to be broken."
                )
            self.set_base_weight(merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract every merged ΔW from the base weight again."""
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            weight = self.get_base_weight()
            self.set_base_weight(weight - self.get_delta_weight(adapter).to(weight.dtype))

    def kron_apply(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """(A ⊗ B)·x for every row of x without building A ⊗ B: vec(A·X·Bᵀ), X = x as (a2, b2)."""
        a, b = self.krona_A[adapter], self.krona_B[adapter]
        (a1, a2), (b1, b2) = a.shape, b.shape
        lead = x.shape[:-1]
        x_mat = x.to(a.dtype).reshape(*lead, a2, b2)  # (..., a2, b2)
        if a1 * a2 * b2 + a1 * b2 * b1 <= a2 * b2 * b1 + a1 * a2 * b1:
            y = torch.matmul(torch.matmul(a, x_mat), b.t())  # (..., a1, b2) -> (..., a1, b1)
        else:
            y = torch.matmul(a, torch.matmul(x_mat, b.t()))  # (..., a2, b1) -> (..., a1, b1)
        return self.krona_scale[adapter] * y.reshape(*lead, a1 * b1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.krona_A:
                result = result + self.kron_apply(x, adapter).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "krona." + super().__repr__()


def _inject(unet: nn.Module, targets: list[str], config: KronaConfig) -> dict[str, BaseTunerLayer]:
    for param in unet.parameters():
        param.requires_grad_(False)
    layers: dict[str, BaseTunerLayer] = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise AdapterConfigError(
                f"krona adapts nn.Linear layers only; {name} is a {type(base).__name__}."
            )
        layer = KronaLinear(
            base, ADAPTER_NAME, config.factors_for(name, tuple(base.weight.shape)), config.scale
        )
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def _param_shapes(config: KronaConfig, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    a1, a2 = config.factors_for(name, shape)
    return {"krona_A": (a1, a2), "krona_B": (shape[0] // a1, shape[1] // a2)}


FAMILY = AdapterFamily(
    name="krona",
    title="DiffuseKronA",
    paper="Marjit et al. 2024, DiffuseKronA: A Parameter Efficient Fine-tuning Method for Personalized Diffusion Models",
    config_cls=KronaConfig,
    inject=_inject,
    effective_weight=additive_effective_weight,
    param_shapes=_param_shapes,
)
