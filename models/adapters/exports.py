"""Adapter files other tools read, and kohya/A1111 LoRA files read back in.

- LoRA → diffusers (`pipe.load_lora_weights`), written by diffusers' own `save_lora_weights`;
- LoRA → kohya/A1111 (`lora_unet_<module>.lora_down/lora_up.weight`, `.alpha`) via diffusers'
  `convert_state_dict_to_kohya`;
- DiffuseKronA → LyCORIS LoKr (`lora_unet_<module>.lokr_w1` = A, `.lokr_w2` = B, `.alpha`), which A1111 and
  ComfyUI load; LyCORIS ignores `alpha` when both Kronecker factors are full matrices, so the adapter scale
  is folded into `lokr_w2` and `alpha` is written as 1;
- LoRA/BOFT/HRA → PEFT's `save_pretrained` layout (`adapter_config.json` + `adapter_model.safetensors`).

The LoRA exports fold (alpha / rank) into `lora_up`/`lora_B` and declare alpha = rank, the convention every
loader agrees on. Import reads the safetensors file itself (never a pickle) and lets diffusers'
`lora_state_dict` convert kohya / diffusers keys (including SDXL's original block names).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from torch import nn

from models.adapters.family import AdapterError, AdapterFileError
from models.adapters.files import AdapterFile, check_tensors, read_safetensors
from models.adapters.handle import AdapterHandle
from models.adapters.krona import KronaConfig
from models.adapters.lora import LoraAdapterConfig
from models.adapters.registry import FAMILIES
from models.adapters.targets import layer_shapes
from models.atomic_write import write_safetensors

Adapter = AdapterFile | AdapterHandle


def _tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    return adapter.state_dict() if isinstance(adapter, AdapterHandle) else dict(adapter.tensors)


def _require_family(adapter: Adapter, *families: str) -> None:
    if adapter.family not in families:
        raise AdapterError(
            f"this export takes {' or '.join(families)} adapters, got a {adapter.family} adapter."
        )


def _kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def baked_lora(adapter: Adapter) -> dict[str, torch.Tensor]:
    """PEFT-keyed LoRA tensors with (alpha / rank) folded into lora_B, so alpha = rank reproduces ΔW."""
    _require_family(adapter, "lora")
    config: LoraAdapterConfig = adapter.config
    tensors = _tensors(adapter)
    baked: dict[str, torch.Tensor] = {}
    for name in adapter.targets:
        scale = config.alpha_of(name) / config.rank_of(name)
        baked[f"{name}.lora_A.weight"] = tensors[f"{name}.lora_A.weight"]
        baked[f"{name}.lora_B.weight"] = tensors[f"{name}.lora_B.weight"] * scale
    return baked


def export_diffusers_lora(adapter: Adapter, path: str | Path) -> Path:
    """Write a LoRA as a diffusers LoRA file (`pipe.load_lora_weights(folder, weight_name=path.name)`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=baked_lora(adapter), weight_name=path.name, safe_serialization=True
        )
        os.replace(Path(folder) / path.name, path)
    return path


def export_kohya_lora(adapter: Adapter, path: str | Path) -> Path:
    """Write a LoRA in the kohya/A1111 format (`lora_unet_..lora_down/lora_up.weight`, `.alpha`)."""
    packed = {f"unet.{key}": value for key, value in baked_lora(adapter).items()}
    kohya = convert_state_dict_to_kohya(packed)
    kohya = {k: (v.float() if k.endswith(".alpha") else v) for k, v in kohya.items()}
    return write_safetensors(path, kohya, {"format": "pt", "ss_network_module": "networks.lora"})


def export_lycoris_lokr(adapter: Adapter, path: str | Path) -> Path:
    """Write a DiffuseKronA adapter as a LyCORIS LoKr file (`lokr_w1` = A, `lokr_w2` = scale · B)."""
    _require_family(adapter, "krona")
    config: KronaConfig = adapter.config
    tensors = _tensors(adapter)
    out: dict[str, torch.Tensor] = {}
    for name in adapter.targets:
        key = _kohya_name(name)
        out[f"{key}.lokr_w1"] = tensors[f"{name}.krona_A"]
        out[f"{key}.lokr_w2"] = tensors[f"{name}.krona_B"] * config.scale
        out[f"{key}.alpha"] = torch.tensor(1.0)
    return write_safetensors(path, out, {"format": "pt", "ss_network_module": "lycoris.kohya"})


def export_peft(adapter: Adapter, folder: str | Path) -> Path:
    """Write a LoRA/BOFT/HRA adapter in PEFT's `save_pretrained` layout (loads with `PeftModel.from_pretrained`)."""
    family = FAMILIES[adapter.family]
    if family.peft_config is None:
        raise AdapterError(
            f"PEFT has no {family.title} adapter type (its LoKr keeps the Kronecker factor A square); "
            "export it with export_lycoris_lokr instead."
        )
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        family.peft_config(adapter.config, list(adapter.targets)).save_pretrained(str(tmp))
        tensors = {f"base_model.model.{key}": value for key, value in _tensors(adapter).items()}
        write_safetensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        _replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _replace_folder(new: Path, folder: Path) -> None:
    """Move `new` to `folder`, replacing an existing folder with as small a window as renames allow."""
    if not folder.exists():
        os.replace(new, folder)
        return
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def import_kohya_lora(path: str | Path, unet: nn.Module) -> AdapterFile:
    """Read a kohya/A1111 (or diffusers) LoRA `.safetensors` file as a LoRA `AdapterFile` for `unet`.

    UNet layers become the adapter (per-layer rank/alpha kept); text-encoder layers are kept apart in
    `text_encoder_tensors` (diffusers keys). Unknown formats and layers missing from `unet` raise
    `AdapterFileError`.
    """
    path = Path(path)
    raw, header = read_safetensors(path)
    pipeline_cls = StableDiffusionXLPipeline if _is_sdxl(unet) else StableDiffusionPipeline
    try:
        state, alphas = pipeline_cls.lora_state_dict(raw, unet_config=unet.config)
    except Exception as error:
        raise AdapterFileError(f"{path.name} is not a LoRA file diffusers can read: {error}") from None
    alphas = dict(alphas or {})
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    text_state = {k: v for k, v in state.items() if not k.startswith("unet.")}
    text_state.update({k: torch.as_tensor(v) for k, v in alphas.items() if not k.startswith("unet.")})
    if not unet_state:
        raise AdapterFileError(f"{path.name} holds no UNet LoRA layers (found {len(state)} other tensors).")
    tensors = convert_unet_state_dict_to_peft(unet_state)
    unknown = sorted(k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if unknown:
        raise AdapterFileError(f"{path.name} has UNet tensors Atelier cannot use as LoRA, e.g. {unknown[0]}.")
    unet_alphas = _module_alphas(alphas)
    targets = _in_unet_order(unet, {k.rsplit(".lora_", 1)[0] for k in tensors})
    try:
        shapes = layer_shapes(unet, targets)
    except AdapterError as error:
        raise AdapterFileError(f"{path.name} does not fit this UNet: {error}") from None
    config = _lora_config(targets, tensors, unet_alphas)
    check_tensors(path.name, "lora", config, targets, shapes, tensors)
    metadata = {
        "source": str(path),
        "source_format": "kohya" if any(k.startswith("lora_unet_") for k in raw) else "diffusers",
        "base_model_id": header.get("ss_sd_model_name", ""),
        "trigger_phrase": "",
    }
    return AdapterFile("lora", config, targets, tensors, shapes, metadata, text_state, path=path)


def _is_sdxl(unet: nn.Module) -> bool:
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def _module_alphas(alphas: Mapping[str, float]) -> dict[str, float]:
    """UNet network alphas keyed by module name (diffusers keys them by the old down-weight name)."""
    keyed = {
        k.removeprefix("unet.").removesuffix(".alpha"): torch.zeros(1)
        for k in alphas
        if k.startswith("unet.")
    }
    converted = convert_unet_state_dict_to_peft(dict(keyed))
    values = [float(alphas[f"unet.{k}.alpha"]) for k in keyed]
    return {new.rsplit(".lora_", 1)[0]: value for new, value in zip(converted, values, strict=True)}


def _in_unet_order(unet: nn.Module, names: set[str]) -> list[str]:
    order = [name for name, _ in unet.named_modules() if name in names]
    missing = sorted(names - set(order))
    if missing:
        raise AdapterFileError(f"LoRA layer {missing[0]} does not exist in this UNet (wrong base model?).")
    return order


def _lora_config(
    targets: list[str], tensors: Mapping[str, torch.Tensor], alphas: Mapping[str, float]
) -> LoraAdapterConfig:
    """Most common rank/alpha as the defaults, per-layer patterns for the rest."""
    ranks = {t: int(tensors[f"{t}.lora_A.weight"].shape[0]) for t in targets}
    layer_alpha = {t: float(alphas.get(t, ranks[t])) for t in targets}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(layer_alpha.values()).most_common(1)[0][0]
    return LoraAdapterConfig(
        rank=rank,
        alpha=alpha,
        rank_pattern={t: r for t, r in ranks.items() if r != rank},
        alpha_pattern={t: a for t, a in layer_alpha.items() if a != alpha},
    )
