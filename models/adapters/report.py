"""Parameter and file-size report of an adapter family on a UNet, computed from shapes alone.

Nothing is attached: each family's `param_shapes` rule (the same one that validates adapter files) gives
the tensors every targeted layer would get. Used by the UI (before training) and the benchmarks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.adapters.family import AdapterConfig
from models.adapters.registry import coerce_config, get_family
from models.adapters.targets import DEFAULT_PRESET, layer_shapes, resolve_targets

_HEADER_BYTES_PER_TENSOR = 64
"""safetensors header JSON per tensor besides its key: dtype, shape and offsets."""
_METADATA_BYTES = 1024
"""Atelier's header fields besides the target list (config, ids, phrase, times)."""


def parameter_report(
    unet: nn.Module,
    family: str,
    config: AdapterConfig | dict | None = None,
    targets: str | Sequence[str] = DEFAULT_PRESET,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Trainable parameters, estimated adapter-file size and per-layer tensor shapes.

    Returns `family`, `config`, `num_layers`, `trainable_parameters`, `unet_parameters`,
    `trainable_fraction`, `file_bytes_estimate` and `layers` (one dict per target: `name`,
    `weight_shape`, `tensors` {name: shape}, `parameters`).
    """
    spec = get_family(family)
    config = coerce_config(spec, config)
    names = resolve_targets(unet, targets)
    shapes = layer_shapes(unet, names)
    config.validate(shapes)
    layers = []
    header = (
        _METADATA_BYTES + len(json.dumps(names)) + len(json.dumps({k: list(v) for k, v in shapes.items()}))
    )
    for name in names:
        tensors = spec.param_shapes(config, name, shapes[name])
        header += sum(len(name) + len(key) + 1 + _HEADER_BYTES_PER_TENSOR for key in tensors)
        layers.append(
            {
                "name": name,
                "weight_shape": list(shapes[name]),
                "tensors": {key: list(shape) for key, shape in tensors.items()},
                "parameters": sum(math.prod(shape) for shape in tensors.values()),
            }
        )
    trainable = sum(layer["parameters"] for layer in layers)
    unet_parameters = sum(p.numel() for p in unet.parameters())
    element = torch.empty((), dtype=dtype).element_size()
    return {
        "family": spec.name,
        "config": config.to_dict(),
        "num_layers": len(layers),
        "trainable_parameters": trainable,
        "unet_parameters": unet_parameters,
        "trainable_fraction": trainable / unet_parameters if unet_parameters else 0.0,
        "file_bytes_estimate": trainable * element + header,
        "layers": layers,
    }
