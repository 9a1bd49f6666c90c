"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") through PEFT.

ΔW = (alpha / rank) · B A with A ∈ R^{rank×d_in} (Kaiming or Gaussian init) and B ∈ R^{d_out×rank} (zero
init), so the adapted UNet starts exactly at the base model. The layers are PEFT's (`LoraConfig`,
`inject_adapter_in_model`), as diffusers itself does. `rank_pattern`/`alpha_pattern` carry per-layer
ranks, which imported kohya/A1111 files often have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from models.adapters.family import (
    AdapterConfig,
    AdapterFamily,
    LayerShapes,
    additive_effective_weight,
    inject_peft,
    require,
)

INITS = ("default", "gaussian")


@dataclass
class LoraAdapterConfig(AdapterConfig):
    """LoRA hyperparameters (validated)."""

    family = "lora"

    rank: int = field(default=4, metadata={"help": "Rank r of the update B·A."})
    alpha: float = field(default=4.0, metadata={"help": "Scale numerator: ΔW = (alpha / rank) · B·A."})
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA branch input during training, in [0, 1)."}
    )
    init: str = field(
        default="default",
        metadata={"help": "A's init: 'default' (Kaiming-uniform) or 'gaussian'; B starts at zero."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-layer rank overrides: full module name -> rank."}
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-layer alpha overrides: full module name -> alpha."}
    )

    def check(self) -> None:
        require(
            isinstance(self.rank, int) and self.rank >= 1,
            f"lora rank must be an integer >= 1, got {self.rank!r}.",
        )
        require(self.alpha > 0, f"lora alpha must be > 0, got {self.alpha!r}.")
        require(0.0 <= self.dropout < 1.0, f"lora dropout must be in [0, 1), got {self.dropout!r}.")
        require(self.init in INITS, f"lora init must be one of {INITS}, got {self.init!r}.")
        for name, rank in self.rank_pattern.items():
            require(
                isinstance(rank, int) and rank >= 1,
                f"lora rank_pattern[{name!r}] must be >= 1, got {rank!r}.",
            )

    def rank_of(self, name: str) -> int:
        """The rank used for layer `name`."""
        return self.rank_pattern.get(name, self.rank)

    def alpha_of(self, name: str) -> float:
        """The alpha used for layer `name`."""
        return self.alpha_pattern.get(name, self.alpha)

    def validate(self, layer_shapes: LayerShapes) -> None:
        super().validate(layer_shapes)
        unknown = sorted((set(self.rank_pattern) | set(self.alpha_pattern)) - set(layer_shapes))
        require(not unknown, f"lora rank/alpha patterns name layers that are not targets: {unknown[:3]}.")
        for name, shape in layer_shapes.items():
            rank = self.rank_of(name)
            require(
                rank <= min(shape[0], shape[1]),
                f"lora rank {rank} exceeds the size of layer {name} ({shape[0]}x{shape[1]}); use a rank <= "
                f"{min(shape[0], shape[1])}.",
            )


def to_peft_config(config: LoraAdapterConfig, targets: list[str]) -> LoraConfig:
    """The equivalent PEFT `LoraConfig` for these exact target modules."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        init_lora_weights=True if config.init == "default" else "gaussian",
        target_modules=list(targets),
        rank_pattern={re.escape(name): r for name, r in config.rank_pattern.items()},
        alpha_pattern={re.escape(name): a for name, a in config.alpha_pattern.items()},
    )


def _inject(unet: nn.Module, targets: list[str], config: LoraAdapterConfig) -> dict[str, BaseTunerLayer]:
    return inject_peft(unet, to_peft_config(config, targets), targets)


def _param_shapes(config: LoraAdapterConfig, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    rank = config.rank_of(name)
    kernel = tuple(shape[2:])
    return {
        "lora_A.weight": (rank, shape[1], *kernel),
        "lora_B.weight": (shape[0], rank, *(1 for _ in kernel)),
    }


FAMILY = AdapterFamily(
    name="lora",
    title="LoRA",
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models",
    config_cls=LoraAdapterConfig,
    inject=_inject,
    effective_weight=additive_effective_weight,
    param_shapes=_param_shapes,
    peft_config=to_peft_config,
)
