"""`AdapterBank`: N concept adapters held against one pipeline, activated by swapping weight tensors.

No paper; this is the engine under every composition method (merge, LoRA Switch/Composite of Zhong et al.
2024, CMLoRA of Zou et al. 2025, CLoRA of Meral et al. 2024). For each adapter the bank asks the adapter for
the effective weight of exactly the layers it touches (`layer_weights(unet)`, any family: LoRA, DiffuseKronA,
BOFT, HRA, kohya LoRA imports), stores those tensors once, and activates an adapter by pointing each touched
parameter's `.data` at its stored tensor: no per-forward adapter cost, no PEFT wrappers in the UNet, so
families mix freely (PEFT's mixed-adapter model excludes BOFT and HRA; the bank does not need it).
"None" points every parameter back at the untouched base tensor, so restoring is exact by construction.
A weighted sum (diffusers `set_adapters` semantics: W = W0 + Σ wᵢ(Wᵢ − W0)) is written into one scratch
buffer per layer. Text-encoder parts of imported LoRAs are held the same way, per adapter.

Memory: base + Σ touched-layer tensors (+ one scratch per touched layer once a weighted sum is used);
`memory_report()` gives the numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from composition.errors import CompositionError


class AdapterSource(Protocol):
    """What the bank needs from an adapter (an `AdapterFile` satisfies it)."""

    family: str
    metadata: Mapping[str, str]

    def check_compatible(self, unet: nn.Module) -> None: ...

    def layer_weights(self, unet: nn.Module) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class BankEntry:
    """One adapter in the bank: a display name, its family, its trigger phrase (if recorded)."""

    name: str
    family: str
    trigger_phrase: str | None
    layers: tuple[str, ...]
    text_layers: tuple[str, ...]


Selection = int | Sequence[float] | None
"""What to activate: one adapter's index, one weight per adapter (a weighted sum), or None (the base)."""


def load_source(path: str | Path, unet: nn.Module) -> AdapterSource:
    """Read an adapter file: Atelier's own format, else a kohya/A1111 LoRA (imported against `unet`)."""
    from models.adapters.family import AdapterFileError, DamagedAdapterFile
    from models.adapters.files import load_adapter_file

    path = Path(path)
    if not path.is_file():
        raise CompositionError(f"adapter file {path} does not exist; check the path.")
    try:
        return load_adapter_file(path)
    except DamagedAdapterFile as error:
        raise CompositionError(str(error)) from None
    except AdapterFileError as own_error:
        from models.adapters.exports import import_kohya_lora

        try:
            return import_kohya_lora(path, unet)
        except AdapterFileError as kohya_error:
            raise CompositionError(
                f"{path.name} is neither an Atelier adapter file ({own_error}) nor a kohya/A1111 LoRA "
                f"({kohya_error})."
            ) from kohya_error


class AdapterBank:
    """Adapters for one pipeline, precomputed; `activate(...)` swaps them in (see the module docstring)."""

    def __init__(
        self,
        pipe: Any,
        sources: Sequence[AdapterSource | str | Path],
        names: Sequence[str] | None = None,
    ) -> None:
        if not sources:
            raise CompositionError("no adapters given: pass at least one adapter file (--adapter FILE).")
        if names is not None and len(names) != len(sources):
            raise CompositionError(
                f"got {len(names)} names for {len(sources)} adapters; give one per adapter."
            )
        self.pipe = pipe
        unet: nn.Module = pipe.unet
        self._params: dict[str, nn.Parameter] = {}
        self._base: dict[str, torch.Tensor] = {}
        self._weights: list[dict[str, torch.Tensor]] = []
        self.entries: list[BankEntry] = []
        if names is not None and len(set(names)) != len(names):
            raise CompositionError(f"adapter names {list(names)} repeat; give each adapter its own name.")
        labels = (
            list(names)
            if names is not None
            else _unique([_default_name(s, i) for i, s in enumerate(sources)])
        )
        for index, source in enumerate(sources):
            name = labels[index]
            if isinstance(source, str | Path):
                source = load_source(source, unet)
            try:
                source.check_compatible(unet)
            except Exception as err:
                raise CompositionError(f"adapter {name!r} does not fit this base model: {err}") from err
            with torch.no_grad():
                unet_weights = self._hold(unet, "unet", source.layer_weights(unet), name)
                text_weights: dict[str, torch.Tensor] = {}
                for component, tensors in _text_encoder_weights(source, pipe).items():
                    text_weights.update(self._hold(getattr(pipe, component), component, tensors, name))
            self._weights.append({**unet_weights, **text_weights})
            trigger = getattr(source, "trigger_phrase", None) or dict(source.metadata).get("trigger_phrase")
            self.entries.append(
                BankEntry(name, source.family, trigger or None, tuple(unet_weights), tuple(text_weights))
            )
        self._scratch: dict[str, torch.Tensor] = {}
        self._active: tuple[float, ...] | None = None
        self.memo: dict[str, Any] = {}
        """Per-bank memo for methods (CMLoRA's measured frequency scores), dropped by `close()`."""

    def _hold(
        self, module: nn.Module, prefix: str, tensors: Mapping[str, torch.Tensor], adapter: str
    ) -> dict[str, torch.Tensor]:
        """Store an adapter's effective weights (keyed `<component>:<module>`), cast to each parameter."""
        held: dict[str, torch.Tensor] = {}
        for layer, weight in tensors.items():
            key = f"{prefix}:{layer}"
            if key not in self._params:
                try:
                    param = module.get_submodule(layer).weight
                except AttributeError:
                    raise CompositionError(
                        f"adapter {adapter!r} changes layer {layer!r}, which the {prefix} does not have; "
                        "it was trained for another architecture."
                    ) from None
                self._params[key] = param
                self._base[key] = param.data
            param = self._params[key]
            if tuple(weight.shape) != tuple(param.shape):
                raise CompositionError(
                    f"adapter {adapter!r} gives layer {layer} shape {tuple(weight.shape)}, the {prefix} has "
                    f"{tuple(param.shape)}; it was trained for another base model."
                )
            held[key] = weight.detach().to(param.device, param.dtype).contiguous()
        return held

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        """Adapter names, in bank order."""
        return [e.name for e in self.entries]

    @property
    def active(self) -> tuple[float, ...] | None:
        """The current weights per adapter (one-hot for a single adapter), or None for the base."""
        return self._active

    def has_text_encoder_parts(self, index: int) -> bool:
        """Whether adapter `index` changes a text encoder (then its prompt embeddings are its own)."""
        return bool(self.entries[index].text_layers)

    @torch.no_grad()
    def activate(self, selection: Selection) -> None:
        """Swap in one adapter (an index), a weighted sum (one weight per adapter) or the base (None)."""
        weights = self.weights_for(selection)
        if weights == self._active:
            return
        for key, param in self._params.items():
            param.data = self._tensor_for(key, weights)
        self._active = weights

    def deactivate(self) -> None:
        """Put the base weights back (exactly: the original tensors)."""
        self.activate(None)

    @contextmanager
    def using(self, selection: Selection) -> Iterator[None]:
        """Activate `selection` for a `with` block, then restore what was active before."""
        previous = self._active
        self.activate(selection)
        try:
            yield
        finally:
            self.activate(None if previous is None else list(previous))

    def weights_for(self, selection: Selection) -> tuple[float, ...] | None:
        """A selection as one weight per adapter (None for the base); bad indices/lengths are an error."""
        if selection is None:
            return None
        if isinstance(selection, int):
            if not 0 <= selection < len(self):
                raise CompositionError(f"adapter index {selection} out of range: the bank holds {len(self)}.")
            return tuple(1.0 if i == selection else 0.0 for i in range(len(self)))
        weights = tuple(float(w) for w in selection)
        if len(weights) != len(self):
            raise CompositionError(
                f"got {len(weights)} weights for {len(self)} adapters; give one per adapter."
            )
        return None if not any(weights) else weights

    def _tensor_for(self, key: str, weights: tuple[float, ...] | None) -> torch.Tensor:
        """The tensor a parameter should point at under `weights` (no copy unless a real mix is needed)."""
        base = self._base[key]
        if weights is None:
            return base
        touching = [
            (w, self._weights[i][key]) for i, w in enumerate(weights) if w and key in self._weights[i]
        ]
        if not touching:
            return base
        if len(touching) == 1 and touching[0][0] == 1.0:
            return touching[0][1]
        scratch = self._scratch.get(key)
        if scratch is None:
            scratch = self._scratch[key] = torch.empty_like(base)
        mix = base.float()
        for weight, tensor in touching:
            mix = mix + weight * (tensor.float() - base.float())
        scratch.copy_(mix)
        return scratch

    def memory_report(self) -> dict[str, Any]:
        """Bytes held: the touched base layers, each adapter's tensors, and the weighted-sum scratch."""
        per_adapter = {
            entry.name: sum(t.numel() * t.element_size() for t in weights.values())
            for entry, weights in zip(self.entries, self._weights, strict=True)
        }
        return {
            "touched_layers": len(self._params),
            "touched_base_bytes": sum(t.numel() * t.element_size() for t in self._base.values()),
            "adapter_bytes": per_adapter,
            "adapters_total_bytes": sum(per_adapter.values()),
            "scratch_bytes": sum(t.numel() * t.element_size() for t in self._scratch.values()),
        }

    def close(self) -> None:
        """Restore the base weights and drop the stored tensors."""
        self.deactivate()
        self._weights.clear()
        self._scratch.clear()
        self.memo.clear()


def _default_name(source: AdapterSource | str | Path, index: int) -> str:
    if isinstance(source, str | Path):
        return Path(source).stem
    name = getattr(source, "name", None) or dict(getattr(source, "metadata", {}) or {}).get("name")
    return str(name) if name else f"adapter{index + 1}"


def _unique(names: list[str]) -> list[str]:
    """Default names made distinct (`adapter`, `adapter-2`, ...): trainers often name every file alike."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def _text_encoder_weights(source: Any, pipe: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Effective text-encoder weights of an imported LoRA's text-encoder part, per pipeline component.

    `source.text_encoder_tensors` holds diffusers-format keys, as `lora_state_dict` gives them for kohya/A1111
    files (`text_encoder.<module>.to_q_lora.down.weight` plus `....alpha`, or the newer `lora_linear_layer` /
    PEFT `lora_A`/`lora_B` names; `text_encoder_2.` for SDXL's second encoder). diffusers'
    `convert_state_dict_to_peft` maps them to PEFT names; W' = W + (alpha / rank) · B @ A.
    """
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    tensors: Mapping[str, torch.Tensor] = getattr(source, "text_encoder_tensors", None) or {}
    components = ("text_encoder", "text_encoder_2")
    stray = sorted(k for k in tensors if not k.startswith(tuple(f"{c}." for c in components)))
    if stray:
        raise CompositionError(
            f"text-encoder tensor {stray[0]!r} names no text encoder this bank understands."
        )
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component in components:
        part = {
            k.removeprefix(f"{component}."): v for k, v in tensors.items() if k.startswith(f"{component}.")
        }
        if not part:
            continue
        encoder = getattr(pipe, component, None)
        if encoder is None:
            raise CompositionError(f"the adapter changes {component}, which this pipeline does not have.")
        layers = {k: v for k, v in part.items() if not k.endswith(".alpha")}
        alphas = {
            k.removesuffix(".alpha"): torch.as_tensor(v) for k, v in part.items() if k.endswith(".alpha")
        }
        if not any(".lora_A." in k or ".lora_B." in k for k in layers):
            kind = (
                StateDictType.DIFFUSERS
                if any("lora_linear_layer" in k for k in layers)
                else StateDictType.DIFFUSERS_OLD
            )
            layers = convert_state_dict_to_peft(layers, original_type=kind)
            alphas = convert_state_dict_to_peft(alphas, original_type=kind) if alphas else {}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in layers.items():
            module, _, kind_name = key.rpartition(".lora_")
            pairs.setdefault(module, {})[kind_name] = tensor
        for module, pair in pairs.items():
            try:
                weight = encoder.get_submodule(module).weight
            except AttributeError:
                raise CompositionError(
                    f"text-encoder LoRA layer {module!r} does not match this pipeline's {component}; "
                    "the LoRA was made for another base model."
                ) from None
            if set(pair) != {"A.weight", "B.weight"}:
                raise CompositionError(f"text-encoder LoRA layer {module!r} lacks its down or up matrix.")
            down, up = pair["A.weight"].float(), pair["B.weight"].float()
            alpha = alphas.get(f"{module}.lora_A.weight")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            out.setdefault(component, {})[module] = weight.detach().float() + scale * (
                up.flatten(1) @ down.flatten(1)
            )
    return out
