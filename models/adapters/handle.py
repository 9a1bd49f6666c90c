"""`attach` an adapter family to a UNet and drive it through an `AdapterHandle`.

The handle is the one object training and composition hold: it lists the trainable parameters, saves and
loads the adapter tensors (keyed `<module name>.<PEFT parameter name>`, e.g.
`...attn1.to_v.lora_A.weight`), merges/unmerges, disables, gives the effective weight of every touched
layer, and `detach()`es, which puts the original `nn.Linear` objects back and restores `requires_grad`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from models.adapters.family import AdapterConfig, AdapterError, AdapterFamily, adapter_tensors
from models.adapters.registry import coerce_config, get_family
from models.adapters.targets import DEFAULT_PRESET, layer_shapes, resolve_targets


class AdapterHandle:
    """A live adapter attached to a UNet (see `attach`)."""

    def __init__(
        self,
        unet: nn.Module,
        family: AdapterFamily,
        config: AdapterConfig,
        layers: dict[str, BaseTunerLayer],
        shapes: dict[str, tuple[int, ...]],
        requires_grad: dict[str, bool],
        had_peft_config: bool,
    ) -> None:
        self.unet = unet
        self.family_spec = family
        self.config = config
        self.layers = layers
        self.layer_shapes = shapes
        self._requires_grad = requires_grad
        self._had_peft_config = had_peft_config
        self._attached = True
        self._enabled = True

    @property
    def family(self) -> str:
        """The family name (`lora`, `krona`, `boft`, `hra`)."""
        return self.family_spec.name

    @property
    def targets(self) -> list[str]:
        """Full module names of the adapted layers, in UNet order."""
        return list(self.layers)

    @property
    def merged(self) -> bool:
        """Whether the adapter is currently merged into the base weights."""
        return any(layer.merged for layer in self.layers.values())

    @property
    def enabled(self) -> bool:
        """Whether the adapter currently affects the UNet's output."""
        return self._enabled

    def _check_attached(self) -> None:
        if not self._attached:
            raise AdapterError("this adapter was detached; attach it again to use it.")

    def parameters_by_layer(self) -> dict[str, list[nn.Parameter]]:
        """The adapter's parameters of each adapted layer, keyed by the layer's module name."""
        self._check_attached()
        return {name: list(adapter_tensors(layer).values()) for name, layer in self.layers.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters (the only ones in the UNet that require grad after `attach`)."""
        return [p for params in self.parameters_by_layer().values() for p in params]

    def num_parameters(self) -> int:
        """Number of adapter parameters."""
        return sum(p.numel() for p in self.trainable_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the adapter tensors, keyed `<module name>.<parameter name>`."""
        self._check_attached()
        return {
            f"{name}.{key}": tensor.detach().clone()
            for name, layer in self.layers.items()
            for key, tensor in adapter_tensors(layer).items()
        }

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy adapter tensors in; keys and shapes must match exactly (error lists the differences)."""
        self._check_attached()
        if self.merged:
            raise AdapterError("unmerge() the adapter before loading new tensors into it.")
        own = {
            f"{name}.{key}": param
            for name, layer in self.layers.items()
            for key, param in adapter_tensors(layer).items()
        }
        missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
        bad_shapes = [k for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad_shapes:
            details = []
            if missing:
                details.append(f"missing {len(missing)} (e.g. {missing[0]})")
            if unexpected:
                details.append(f"unexpected {len(unexpected)} (e.g. {unexpected[0]})")
            if bad_shapes:
                k = bad_shapes[0]
                details.append(
                    f"shape mismatch at {k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                )
            raise AdapterError(
                f"{self.family} adapter tensors do not match this adapter: {'; '.join(details)}."
            )
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(state_dict[key].to(param.device, param.dtype))

    def regularization_loss(self) -> torch.Tensor | None:
        """The family's training regulariser (HRA's orthogonality term), or None."""
        self._check_attached()
        if self.family_spec.regularization is None:
            return None
        return self.family_spec.regularization(self.layers, self.config)

    def merge(self) -> None:
        """Fold the adapter into the base weights (inference at base cost)."""
        self._check_attached()
        if not self._enabled:
            raise AdapterError("the adapter is disabled; set_enabled(True) before merging.")
        if not self.merged:
            for layer in self.layers.values():
                layer.merge()

    def unmerge(self) -> None:
        """Take a merged adapter out of the base weights again (no-op when not merged)."""
        self._check_attached()
        for layer in self.layers.values():
            if layer.merged:
                layer.unmerge()

    def set_enabled(self, enabled: bool) -> None:
        """Switch the adapter's effect on or off (a merged adapter is unmerged when disabled)."""
        self._check_attached()
        if not enabled:
            self.unmerge()
        for layer in self.layers.values():
            layer.enable_adapters(enabled)
        self._enabled = enabled

    def layer_weights(self) -> dict[str, torch.Tensor]:
        """Effective weight of every touched layer with the adapter applied; the UNet is not changed."""
        self._check_attached()
        return {name: self.family_spec.effective_weight(layer) for name, layer in self.layers.items()}

    def detach(self) -> None:
        """Remove the adapter: unmerge, put the original modules back, restore `requires_grad`."""
        if not self._attached:
            return
        self.unmerge()
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.unet.get_submodule(parent_name), child, layer.get_base_layer())
        for name, param in self.unet.named_parameters():
            if name in self._requires_grad:
                param.requires_grad_(self._requires_grad[name])
        if not self._had_peft_config and hasattr(self.unet, "peft_config"):
            del self.unet.peft_config
        self._attached = False

    def __repr__(self) -> str:
        state = "merged" if self._attached and self.merged else ("attached" if self._attached else "detached")
        return f"AdapterHandle({self.family}, {len(self.layers)} layers, {state})"


def attach(
    unet: nn.Module,
    family: str,
    config: AdapterConfig | dict | None = None,
    targets: str | Sequence[str] = DEFAULT_PRESET,
) -> AdapterHandle:
    """Wrap the target layers of `unet` in a fresh adapter of `family` (in place; only adapter params train).

    `targets` is a preset (`vo`, `qkvo`, `cross-vo`, `all-linear`), module patterns, or the exact list of
    module names from `resolve_targets`. The config is validated against the target shapes first.
    """
    spec = get_family(family)
    config = coerce_config(spec, config)
    names = resolve_targets(unet, targets)
    shapes = layer_shapes(unet, names)
    config.validate(shapes)
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    had_peft_config = hasattr(unet, "peft_config")
    layers = spec.inject(unet, names, config)
    return AdapterHandle(unet, spec, config, layers, shapes, requires_grad, had_peft_config)
