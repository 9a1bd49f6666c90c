"""Atelier adapter files: one `.safetensors` per adapter, every piece of metadata in its header.

Header fields (all strings, as safetensors requires): `atelier_format`, `family`, `config` (JSON),
`targets` (JSON list of module names), `layer_shapes` (JSON), `base_model_id`, `unet_fingerprint`
(`models.pipelines.unet_fingerprint` of the UNet it was trained on), `trigger_phrase`, `train_steps`,
`created` (UTC ISO time) and `extra` (JSON). Tensors are keyed `<module name>.<PEFT parameter name>`.
Writes are atomic (temporary file in the same folder + `os.replace`); reading never unpickles anything.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from models.adapters.family import AdapterConfig, AdapterConfigError, AdapterFileError, DamagedAdapterFile
from models.adapters.handle import AdapterHandle, attach
from models.adapters.registry import FAMILIES, get_family
from models.adapters.targets import layer_shapes
from models.atomic_write import write_safetensors
from models.pipelines import unet_fingerprint

FORMAT = "atelier-adapter/1"


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; `AdapterFileError` if it cannot be read or holds
    NaN/infinite weights."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"no adapter file at {path}.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:
        raise DamagedAdapterFile(
            f"{path} is not a readable safetensors file (truncated, corrupt or another format): {error}"
        ) from None
    check_finite(path.name, tensors)
    return tensors, metadata


def check_finite(label: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise `DamagedAdapterFile` naming the first tensor that holds NaN or infinite values (such an adapter
    turns every image black or into noise)."""
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise DamagedAdapterFile(
                    f"{label}: tensor {key} holds {bad} NaN/infinite value(s) of {tensor.numel()}; the adapter "
                    "is damaged (did its training diverge?): train it again or use an earlier checkpoint."
                )


@dataclass
class AdapterFile:
    """An adapter loaded from disk (or imported): everything needed to attach it or read its weights."""

    family: str
    config: AdapterConfig
    targets: list[str]
    tensors: dict[str, torch.Tensor]
    layer_shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    text_encoder_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    path: Path | None = None

    @property
    def base_model_id(self) -> str:
        """The base model the adapter was trained on (as given at save time)."""
        return self.metadata.get("base_model_id", "")

    @property
    def fingerprint(self) -> str:
        """`unet_fingerprint` of the UNet it was trained on ('' for imported files)."""
        return self.metadata.get("unet_fingerprint", "")

    @property
    def trigger_phrase(self) -> str:
        """The phrase that calls the concept up in a prompt."""
        return self.metadata.get("trigger_phrase", "")

    @property
    def train_steps(self) -> int:
        """Optimizer steps the adapter was trained for (0 if unknown)."""
        return int(self.metadata.get("train_steps", "0") or 0)

    @property
    def name(self) -> str:
        """A display name: the file stem, else the trigger phrase."""
        return self.path.stem if self.path else (self.trigger_phrase or self.family)

    def check_compatible(self, unet: nn.Module, *, strict: bool = False) -> None:
        """Raise `AdapterFileError` unless every target exists in `unet` with the shape it was trained on.

        A differing UNet fingerprint with matching shapes is a warning (an error when `strict`).
        """
        where = f"adapter {self.name}"
        try:
            shapes = layer_shapes(unet, self.targets)
        except AdapterConfigError as error:
            raise AdapterFileError(
                f"{where} does not fit this UNet ({error}); it was trained on {self.base_model_id or 'another model'}."
            ) from None
        for name, shape in shapes.items():
            if shape != self.layer_shapes[name]:
                raise AdapterFileError(
                    f"{where} was trained on a UNet where {name} has shape {self.layer_shapes[name]}, but this "
                    f"UNet has {shape}; load it with its base model ({self.base_model_id or 'unknown'})."
                )
        if self.fingerprint and self.fingerprint != unet_fingerprint(unet):
            message = (
                f"{where} was trained on UNet {self.fingerprint} ({self.base_model_id}); this UNet is "
                f"{unet_fingerprint(unet)}. Shapes match, but results may differ."
            )
            if strict:
                raise AdapterFileError(message)
            warnings.warn(message, stacklevel=2)

    def attach(self, unet: nn.Module) -> AdapterHandle:
        """Attach this adapter (with its trained tensors) to `unet` in place."""
        self.check_compatible(unet)
        handle = attach(unet, self.family, self.config, self.targets)
        handle.load_state_dict(self.tensors)
        return handle

    def layer_weights(self, unet: nn.Module) -> dict[str, torch.Tensor]:
        """Effective weight (adapter applied) of every target, from `unet`'s current weights.

        `unet` is not modified: the adapter is attached to read-only views of the target layers that share
        the UNet's weight storage.
        """
        self.check_compatible(unet)
        handle = attach(_shadow(unet, self.targets), self.family, self.config, self.targets)
        handle.load_state_dict(self.tensors)
        return handle.layer_weights()


def _frozen_view(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are new frozen Parameters over the same storage."""
    view = copy.copy(module)
    view._parameters = {
        key: None if p is None else nn.Parameter(p.detach(), requires_grad=False)
        for key, p in module._parameters.items()
    }
    view._buffers = dict(module._buffers)
    view._modules = dict(module._modules)
    return view


def _shadow(unet: nn.Module, targets: list[str]) -> nn.Module:
    """A module tree holding frozen views of `targets` under their full names."""
    root = nn.Module()
    for name in targets:
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        module = unet.get_submodule(name)
        node.add_module(leaf, _frozen_view(getattr(module, "base_layer", module)))
    return root


def save_adapter_file(
    path: str | Path,
    handle: AdapterHandle,
    *,
    unet: nn.Module,
    base_model_id: str,
    trigger_phrase: str,
    train_steps: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save the handle's adapter tensors and metadata to one `.safetensors` file (atomic write)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"adapter files end in .safetensors; got {path.name}.")
    metadata = {
        "format": "pt",
        "atelier_format": FORMAT,
        "family": handle.family,
        "config": json.dumps(handle.config.to_dict(), sort_keys=True),
        "targets": json.dumps(handle.targets),
        "layer_shapes": json.dumps({k: list(v) for k, v in handle.layer_shapes.items()}),
        "base_model_id": str(base_model_id),
        "unet_fingerprint": unet_fingerprint(unet),
        "trigger_phrase": trigger_phrase,
        "train_steps": str(int(train_steps)),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "extra": json.dumps(dict(extra or {}), sort_keys=True, default=str),
    }
    return write_safetensors(path, handle.state_dict(), metadata)


def load_adapter_file(path: str | Path) -> AdapterFile:
    """Read and validate an Atelier adapter file (family, config, keys and shapes); never unpickles."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if metadata.get("atelier_format") != FORMAT:
        hint = " It looks like a kohya/A1111 LoRA: use import_kohya_lora." if _looks_kohya(tensors) else ""
        raise AdapterFileError(
            f"{path.name} is a safetensors file but not an Atelier adapter (no '{FORMAT}' header).{hint}"
        )
    try:
        family = get_family(metadata.get("family", ""))
        config = family.config_cls.from_dict(json.loads(metadata["config"]))
        targets = list(json.loads(metadata["targets"]))
        shapes = {k: tuple(v) for k, v in json.loads(metadata["layer_shapes"]).items()}
    except (KeyError, ValueError, TypeError) as error:
        raise AdapterFileError(f"{path.name} has a damaged Atelier header: {error}") from None
    check_tensors(path.name, family.name, config, targets, shapes, tensors)
    return AdapterFile(family.name, config, targets, tensors, shapes, metadata, path=path)


def check_tensors(
    label: str,
    family_name: str,
    config: AdapterConfig,
    targets: list[str],
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Raise `AdapterFileError` unless `tensors` are exactly the keys/shapes `config` implies per target."""
    family = FAMILIES[family_name]
    missing_shapes = [t for t in targets if t not in shapes]
    if missing_shapes:
        raise AdapterFileError(f"{label}: no layer shape recorded for target {missing_shapes[0]}.")
    expected = {
        f"{t}.{key}": shape
        for t in targets
        for key, shape in family.param_shapes(config, t, shapes[t]).items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        example = missing[0] if missing else unexpected[0]
        raise AdapterFileError(
            f"{label}: tensors do not match its {family_name} config ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {example}); the file is damaged or was edited."
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise AdapterFileError(
                f"{label}: tensor {key} has shape {tuple(tensors[key].shape)}, its config implies {tuple(shape)}."
            )


def _looks_kohya(tensors: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(("lora_unet_", "lora_te")) for key in tensors)
