"""Adapter families for the Stable Diffusion UNet: LoRA, DiffuseKronA, BOFT and HRA.

`attach(unet, family, config, targets)` wraps the chosen attention projections and returns an
`AdapterHandle`; `models.adapters.files` saves/loads adapter files; `models.adapters.exports` writes
the formats other tools read (diffusers, kohya/A1111, LyCORIS, PEFT) and imports kohya LoRAs.
"""

from models.adapters.family import (
    AdapterConfig,
    AdapterConfigError,
    AdapterError,
    AdapterFamily,
    AdapterFileError,
)
from models.adapters.handle import AdapterHandle, attach
from models.adapters.registry import FAMILIES, get_family
from models.adapters.targets import DEFAULT_PRESET, PRESETS, resolve_targets

__all__ = [
    "DEFAULT_PRESET",
    "FAMILIES",
    "PRESETS",
    "AdapterConfig",
    "AdapterConfigError",
    "AdapterError",
    "AdapterFamily",
    "AdapterFileError",
    "AdapterHandle",
    "attach",
    "get_family",
    "resolve_targets",
]
