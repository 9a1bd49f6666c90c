"""Which UNet layers an adapter touches: named presets and free-form module patterns.

The default preset `vo` adapts the value and output projections (`to_v`, `to_out.0`) of self- (`attn1`)
and cross-attention (`attn2`) in every down/mid/up transformer block, following UniPano's finding that the
value/output projections carry personalization. Presets match diffusers module names, so they work on
SD 1.x, 2.x and SDXL UNets alike (a preset simply selects nothing in blocks without attention).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from models.adapters.family import AdapterConfigError

_ATTN = r"(?:.+\.)?transformer_blocks\.\d+\.(?:attn1|attn2)\."
_CROSS = r"(?:.+\.)?transformer_blocks\.\d+\.attn2\."

PRESETS: dict[str, str] = {
    "vo": _ATTN + r"(?:to_v|to_out\.0)",
    "qkvo": _ATTN + r"(?:to_q|to_k|to_v|to_out\.0)",
    "cross-vo": _CROSS + r"(?:to_v|to_out\.0)",
    "all-linear": r"(?:.+\.)?attentions\.\d+\..+",
}
"""Preset name -> regex over full module names (only `nn.Linear` modules are ever selected)."""

PRESET_HELP: dict[str, str] = {
    "vo": "value and output projections of self- and cross-attention (default; UniPano)",
    "qkvo": "query, key, value and output projections of self- and cross-attention",
    "cross-vo": "value and output projections of cross-attention only",
    "all-linear": "every Linear inside the transformer blocks (attention, feed-forward, linear proj_in/out)",
}

DEFAULT_PRESET = "vo"


def _weight_layers(unet: nn.Module) -> dict[str, nn.Module]:
    if any(isinstance(m, BaseTunerLayer) for m in unet.modules()):
        raise AdapterConfigError(
            "this UNet already has an adapter attached; detach it (handle.detach()) before resolving targets."
        )
    return {name: m for name, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)}


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _split(spec: str | Sequence[str]) -> list[str]:
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [part.strip() for item in items for part in str(item).split(",")]
    parts = [part for part in parts if part]
    if not parts:
        raise AdapterConfigError(
            f"empty target spec; use a preset ({', '.join(PRESETS)}) or module patterns."
        )
    return parts


def resolve_targets(unet: nn.Module, spec: str | Sequence[str] = DEFAULT_PRESET) -> list[str]:
    """Full names of the `nn.Linear` modules selected by `spec`, in the UNet's module order.

    `spec` is a preset name (`vo`, `qkvo`, `cross-vo`, `all-linear`), a module pattern, or a list of either
    (a comma-separated string works too). A pattern selects a Linear whose full name ends with `.pattern`
    or fully matches it as a regular expression; every item must select at least one Linear. An exact full
    module name is taken as is, which also admits the `nn.Conv2d` layers of imported kohya LoRAs.
    """
    layers = _weight_layers(unet)
    linear = [name for name, module in layers.items() if isinstance(module, nn.Linear)]
    chosen: set[str] = set()
    for item in _split(spec):
        if item in layers:
            chosen.add(item)
            continue
        pattern = PRESETS.get(item)
        hits = [n for n in linear if (re.fullmatch(pattern, n) if pattern else _matches(item, n))]
        if not hits:
            what = f"preset {item!r}" if pattern else f"pattern {item!r}"
            raise AdapterConfigError(
                f"{what} selects no nn.Linear layer in this UNet; use a preset ({', '.join(PRESETS)}) or a "
                "module name such as 'attn2.to_v' (see unet.named_modules())."
            )
        chosen.update(hits)
    return [n for n in layers if n in chosen]


def layer_shapes(unet: nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Weight shape of each target in the plain UNet; a missing or non-weight target is an error."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in targets:
        try:
            module = unet.get_submodule(name)
        except AttributeError:
            raise AdapterConfigError(f"target {name!r} does not exist in this UNet.") from None
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear | nn.Conv2d) or weight is None:
            raise AdapterConfigError(f"target {name!r} is a {type(module).__name__}, not an nn.Linear.")
        shapes[name] = tuple(weight.shape)
    return shapes
