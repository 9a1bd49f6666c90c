"""Filling a ``TrainConfig``'s unset options from a base-model profile (``models.profiles``).

Every option a profile can supply is ``None`` in a ``TrainConfig`` until ``apply_profile`` fills it: the
adapter family's training defaults, the GPU options (on a GPU only; a CPU run is fp32 without them), the
sampling of validation and class images, and the resolution. A value the user gave (flag, config file or
the app's field) is never replaced. ``resolved_options`` lists each option with its value and where it came
from, for ``--show-defaults``, the model card and ``train_log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from models.profiles import Profile
from training.config import TrainConfig

FAMILY_OPTIONS = (
    "learning_rate",
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "targets",
    "snr_gamma",
    "noise_offset",
    "prior_loss_weight",
    "num_class_images",
    "use_ema",
)
"""`TrainConfig` options taken from the profile's entry for the adapter family (same names)."""
GPU_OPTIONS = (
    "mixed_precision",
    "gradient_checkpointing",
    "enable_xformers_memory_efficient_attention",
    "use_8bit_adam",
)
"""`TrainConfig` options taken from the profile's GPU defaults on a CUDA device."""
_CPU_VALUES = {
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "enable_xformers_memory_efficient_attention": False,
    "use_8bit_adam": False,
}
SAMPLING_OPTIONS = {"num_inference_steps": "validation_steps", "guidance_scale": "validation_guidance"}
"""`TrainConfig` option -> the profile's generation field it comes from."""
PROFILE_OPTIONS = (*FAMILY_OPTIONS, *GPU_OPTIONS, *SAMPLING_OPTIONS, "resolution")


def apply_profile(config: TrainConfig, profile: Profile, *, cuda: bool) -> TrainConfig:
    """`config` with every unset profile option filled from `profile` (given values kept)."""
    family = profile.family(config.adapter)
    values: dict[str, Any] = {"profile": profile.name}
    for name in FAMILY_OPTIONS:
        if getattr(config, name) is None:
            values[name] = getattr(family, name)
    if values.get("snr_gamma", 0.0) is None:
        values["snr_gamma"] = 0.0  # off
    for name in GPU_OPTIONS:
        if getattr(config, name) is None:
            values[name] = getattr(profile.gpu, name) if cuda else _CPU_VALUES[name]
    for name, source in SAMPLING_OPTIONS.items():
        if getattr(config, name) is None:
            values[name] = getattr(profile.generation, source)
    if config.resolution is None and profile.resolution is not None:
        values["resolution"] = profile.resolution
    return dataclasses.replace(config, **values)


def resolved_options(given: TrainConfig, resolved: TrainConfig) -> dict[str, dict[str, Any]]:
    """Each profile option of `resolved`: its value and where it came from (`given`, `profile <name>`, the
    model's native size, or a CPU run's fp32 in place of the profile's GPU options)."""
    from models.profiles import get_profile

    profile = get_profile(resolved.profile) if resolved.profile else None
    out = {}
    for name in PROFILE_OPTIONS:
        value = getattr(resolved, name)
        if getattr(given, name) is not None:
            origin = "given"
        elif name == "resolution" and profile is not None and profile.resolution is None:
            origin = "model's native size"
        elif name in GPU_OPTIONS and profile is not None and value != getattr(profile.gpu, name):
            origin = f"CPU run (profile {profile.name} on a GPU: {getattr(profile.gpu, name)})"
        else:
            origin = f"profile {resolved.profile}"
        out[name] = {"value": value, "from": origin}
    return out


def option_text(value: Any) -> str:
    """How an option's value is written in ``--show-defaults`` and the model card (JSON for lists, booleans
    and None, plain text otherwise)."""
    return json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)


def format_options(options: dict[str, dict[str, Any]]) -> str:
    """`resolved_options` as aligned text lines."""
    width = max(len(name) for name in options)
    return "\n".join(
        f"{name:<{width}}  {option_text(row['value']):<12} ({row['from']})" for name, row in options.items()
    )
