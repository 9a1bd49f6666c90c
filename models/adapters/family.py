"""What every adapter family shares: the config base class, the family record, errors, PEFT injection.

A family (LoRA, DiffuseKronA, BOFT, HRA) is one module that builds an `AdapterFamily`: a validated config
dataclass, a function that wraps the targeted `nn.Linear` modules of a UNet in adapter layers (PEFT's
tuner layers, or the project's own layer for DiffuseKronA, which follows the same `BaseTunerLayer`
pattern), and the per-layer math the rest of Atelier needs without knowing the family: the effective
weight of a wrapped layer, the parameter shapes a config implies, and an optional training regulariser.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from peft import PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ADAPTER_NAME = "default"
"""The PEFT adapter name every Atelier adapter uses (PEFT's own default, so exported files match PEFT's)."""

LayerShapes = Mapping[str, tuple[int, ...]]
"""Full module name -> weight shape of the plain layer (`(out_features, in_features)` for `nn.Linear`)."""


class AdapterError(Exception):
    """Base class of every adapter error; the message says what is wrong and what to do."""


class AdapterConfigError(AdapterError, ValueError):
    """A hyperparameter is invalid on its own or does not fit the targeted layers."""


class AdapterFileError(AdapterError):
    """An adapter file is foreign, truncated, corrupt or does not match the UNet it is loaded into."""


class DamagedAdapterFile(AdapterFileError):
    """The file's bytes cannot be used whatever its layout (unreadable, or NaN/infinite weights): no other
    reader (such as the kohya importer) is worth trying."""


@dataclass
class AdapterConfig:
    """Base of the family config dataclasses: JSON round trip and validation hooks."""

    family: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Validate the hyperparameters on their own; raise `AdapterConfigError` naming the field."""

    def validate(self, layer_shapes: LayerShapes) -> None:
        """Validate against the targeted layers (name -> weight shape); raise `AdapterConfigError`."""
        if not layer_shapes:
            raise AdapterConfigError(f"{self.family}: no target layers given; pick a preset such as 'vo'.")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of the fields."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Rebuild from `to_dict()` output; unknown keys are an error (a file from a newer Atelier?)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise AdapterConfigError(
                f"{cls.family} config has unknown fields {unknown}; known fields are {sorted(names)}."
            )
        return cls(**dict(data))


def require(condition: bool, message: str) -> None:
    """Raise `AdapterConfigError(message)` unless `condition` holds."""
    if not condition:
        raise AdapterConfigError(message)


InjectFn = Callable[[nn.Module, list[str], Any], dict[str, BaseTunerLayer]]
EffectiveWeightFn = Callable[[BaseTunerLayer], torch.Tensor]
ParamShapesFn = Callable[[Any, str, tuple[int, ...]], dict[str, tuple[int, ...]]]
RegularizerFn = Callable[[Mapping[str, BaseTunerLayer], Any], torch.Tensor | None]
PeftConfigFn = Callable[[Any, list[str]], PeftConfig]


@dataclass(frozen=True)
class AdapterFamily:
    """One adapter family, registered by name in `models.adapters.FAMILIES`."""

    name: str
    title: str
    paper: str
    config_cls: type[AdapterConfig]
    inject: InjectFn
    effective_weight: EffectiveWeightFn
    param_shapes: ParamShapesFn
    regularization: RegularizerFn | None = None
    peft_config: PeftConfigFn | None = None

    def default_config(self) -> AdapterConfig:
        """The family's config with every field at its documented default."""
        return self.config_cls()


def inject_peft(unet: nn.Module, peft_config: PeftConfig, targets: list[str]) -> dict[str, BaseTunerLayer]:
    """Wrap exactly `targets` in PEFT tuner layers (in place) and return them by full module name."""
    inject_adapter_in_model(peft_config, unet, adapter_name=ADAPTER_NAME)
    return collect_tuner_layers(unet, targets)


def collect_tuner_layers(unet: nn.Module, targets: list[str]) -> dict[str, BaseTunerLayer]:
    """The tuner layers now sitting at `targets`; fails loudly if any target was not wrapped."""
    layers: dict[str, BaseTunerLayer] = {}
    for name in targets:
        module = unet.get_submodule(name)
        if not isinstance(module, BaseTunerLayer):
            raise AdapterError(f"layer {name} was not wrapped by the adapter; please report this.")
        layers[name] = module
    return layers


def adapter_tensors(layer: BaseTunerLayer) -> dict[str, torch.Tensor]:
    """The adapter's parameters in one layer, keyed as PEFT saves them (`lora_A.weight`, `hra_u`, ...)."""
    tensors: dict[str, torch.Tensor] = {}
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or ADAPTER_NAME not in container:
            continue
        item = container[ADAPTER_NAME]
        if isinstance(item, torch.Tensor):
            tensors[attr] = item
        else:
            for sub, param in item.named_parameters():
                tensors[f"{attr}.{sub}"] = param
    return tensors


def base_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """The wrapped layer's own weight (with any merged adapter already in it)."""
    return layer.get_base_layer().weight


@torch.no_grad()
def additive_effective_weight(layer: BaseTunerLayer) -> torch.Tensor:
    """W + ΔW for additive families (LoRA, DiffuseKronA); the weight itself once merged."""
    weight = base_weight(layer)
    if layer.merged:
        return weight.detach().clone()
    return weight + layer.get_delta_weight(ADAPTER_NAME).to(weight.dtype)
