"""BOFT (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization")
through PEFT.

The adapted weight is W' = (W · Rᵀ) · diag(s): R is an orthogonal matrix built as a product of
`butterfly_factor` block-diagonal Cayley rotations interleaved with butterfly permutations, s a learned
per-output scale. R starts at the identity and s at one, so the adapted UNet starts at the base model.

CPU caveat: PEFT builds butterfly factors > 1 with a CUDA extension (`fbd_cuda`, compiled with ninja). When
that extension cannot be loaded PEFT silently trains with butterfly factor 1 instead (plain block-diagonal
OFT). Atelier checks for the extension before attaching and refuses a factor > 1 it cannot honour, so a
config never quietly means a different model. On a CPU with several threads the Cayley rotations are solved
block by block (`models.adapters.boft_cpu_solve`: PEFT's batched solve fails there).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from peft import BOFTConfig
from peft.tuners.boft.layer import get_fbd_cuda
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from models.adapters.boft_cpu_solve import install as _install_cpu_solve
from models.adapters.family import (
    ADAPTER_NAME,
    AdapterConfig,
    AdapterConfigError,
    AdapterFamily,
    LayerShapes,
    base_weight,
    inject_peft,
    require,
)

_install_cpu_solve()  # PEFT's batched Cayley solve breaks on multi-threaded CPUs (boft_cpu_solve)


@dataclass
class BoftAdapterConfig(AdapterConfig):
    """BOFT hyperparameters (validated). Give exactly one of `block_size` / `block_num` (the other 0)."""

    family = "boft"

    block_size: int = field(
        default=0, metadata={"help": "Size of each orthogonal block (0: derive it from block_num)."}
    )
    block_num: int = field(
        default=8, metadata={"help": "Number of orthogonal blocks per layer (0: derive it from block_size)."}
    )
    butterfly_factor: int = field(
        default=1, metadata={"help": "Number of butterfly factors m (1 = block-diagonal OFT)."}
    )
    dropout: float = field(
        default=0.0,
        metadata={"help": "Multiplicative dropout: probability of replacing a block by I, in [0, 1)."},
    )

    def check(self) -> None:
        require(
            (self.block_size == 0) != (self.block_num == 0),
            f"boft needs exactly one of block_size / block_num set (the other 0), got block_size="
            f"{self.block_size}, block_num={self.block_num}.",
        )
        require(min(self.block_size, self.block_num) >= 0, "boft block_size and block_num must be >= 0.")
        require(
            self.butterfly_factor >= 1, f"boft butterfly_factor must be >= 1, got {self.butterfly_factor}."
        )
        require(0.0 <= self.dropout < 1.0, f"boft dropout must be in [0, 1), got {self.dropout}.")

    def blocks_for(self, d_in: int) -> tuple[int, int]:
        """(block_num, block_size) for a layer with `d_in` inputs (assumes `validate` passed)."""
        if self.block_num:
            return self.block_num, d_in // self.block_num
        return d_in // self.block_size, self.block_size

    def validate(self, layer_shapes: LayerShapes) -> None:
        super().validate(layer_shapes)
        extra = self.butterfly_factor - 1
        if extra and not fbd_cuda_available():
            raise BoftUnavailableError(
                f"boft butterfly_factor={self.butterfly_factor} needs PEFT's fbd_cuda extension (a CUDA GPU with "
                "nvcc and ninja), which could not be loaded here; PEFT would silently fall back to factor 1. "
                "Set butterfly_factor=1 (block-diagonal OFT) or train on a CUDA machine."
            )
        for name, shape in layer_shapes.items():
            require(len(shape) == 2, f"boft adapts nn.Linear layers only; {name} is a convolution.")
            d_in = shape[1]
            given = f"block_num={self.block_num}" if self.block_num else f"block_size={self.block_size}"
            divisor = self.block_num or self.block_size
            require(d_in % divisor == 0, f"boft {given} does not divide the {d_in} inputs of {name}.")
            block_num, block_size = self.blocks_for(d_in)
            if extra:
                require(
                    block_num % (2**extra) == 0 and extra <= math.log2(block_num),
                    f"boft butterfly_factor={self.butterfly_factor} needs the number of blocks of {name} "
                    f"({block_num}) to be a multiple of {2**extra}.",
                )
                require(
                    block_size % 2 == 0 and block_num % 2 == 0,
                    f"boft butterfly_factor > 1 needs an even block size and block count; {name} has "
                    f"{block_num} blocks of {block_size}.",
                )


class BoftUnavailableError(AdapterConfigError):
    """The requested butterfly factor needs PEFT's CUDA extension, which is missing on this machine."""


def fbd_cuda_available() -> bool:
    """Whether PEFT's butterfly CUDA extension loads here (PEFT warns while trying; those warnings are muted)."""
    if not torch.cuda.is_available():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_fbd_cuda() is not None


def to_peft_config(config: BoftAdapterConfig, targets: list[str]) -> BOFTConfig:
    """The equivalent PEFT `BOFTConfig` for these exact target modules."""
    return BOFTConfig(
        boft_block_size=config.block_size,
        boft_block_num=config.block_num,
        boft_n_butterfly_factor=config.butterfly_factor,
        boft_dropout=config.dropout,
        target_modules=list(targets),
        init_weights=True,
    )


def _inject(unet: nn.Module, targets: list[str], config: BoftAdapterConfig) -> dict[str, BaseTunerLayer]:
    with warnings.catch_warnings():
        # PEFT warns about the missing CUDA extension even for factor 1, where it changes nothing.
        warnings.filterwarnings("ignore", message=".*(CUDA extension|boft_n_butterfly_factor).*")
        return inject_peft(unet, to_peft_config(config, targets), targets)


@torch.no_grad()
def _effective_weight(layer: BaseTunerLayer) -> torch.Tensor:
    weight = base_weight(layer)
    if layer.merged:
        return weight.detach().clone()
    rotation, scale = layer.get_delta_weight(ADAPTER_NAME)
    return ((weight.to(rotation.dtype) @ rotation.t()) * scale).to(weight.dtype)


def _param_shapes(config: BoftAdapterConfig, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    block_num, block_size = config.blocks_for(shape[1])
    return {
        "boft_R": (config.butterfly_factor, block_num, block_size, block_size),
        "boft_s": (shape[0], 1),
    }


FAMILY = AdapterFamily(
    name="boft",
    title="BOFT",
    paper="Liu et al. 2024, Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
    config_cls=BoftAdapterConfig,
    inject=_inject,
    effective_weight=_effective_weight,
    param_shapes=_param_shapes,
    peft_config=to_peft_config,
)
