"""Adapter files other tools read, and kohya/A1111 LoRA files read back in.

Formats (keys per adapted module `<m>`; `lora_unet_<m with . as _>` is the kohya name A1111, ComfyUI, kohya
sd-scripts and LyCORIS all map onto the UNet):
- kohya/A1111 LoRA: `lora_unet_<m>.lora_down.weight` (r × d_in), `.lora_up.weight` (d_out × r), `.alpha` (= r);
- diffusers LoRA: `unet.<m>.lora_A.weight` / `.lora_B.weight`, written by diffusers' own `save_lora_weights`;
- LyCORIS LoKr: `lora_unet_<m>.lokr_w1` = A, `.lokr_w2` = scale · B, `.alpha` = 1 (A1111 and ComfyUI compute
  kron(w1, w2) and ignore alpha when both factors are full matrices);
- LyCORIS "full": `lora_unet_<m>.diff` = ΔW itself (A1111's `network_full.py`, ComfyUI's `diff` patch,
  LyCORIS' `FullModule`), exact for any family;
- PEFT's `save_pretrained` layout (`adapter_config.json` + `adapter_model.safetensors`) for LoRA/BOFT/HRA.

Which family goes to which form (`models.adapters.low_rank` holds the math):
- LoRA and HRA are exactly LoRAs (HRA through the WY form of its reflections), in every format;
- DiffuseKronA is exactly a LoKr. The LyCORIS library infers the Kronecker layout from the shapes and can only
  rebuild a square A of side f <= both sides of B; `export_lycoris` writes such layers as LoKr and the others
  as `.diff`, so one file loads exactly in LyCORIS, A1111 and ComfyUI;
- BOFT is exact only as `.diff` (its ΔW = W·Rᵀ·diag(s) − W has full rank);
- any family → a LoRA of a chosen rank by truncated SVD of ΔW, with the relative error per layer and overall
  in the header (`atelier_export`, JSON) and in the returned `ExportReport`.

Every file is written atomically (`models.atomic_write`). The LoRA writers bake the scale into `up`/`lora_B`
and declare alpha = rank, the convention every loader agrees on. Import reads the safetensors file itself
(never a pickle) and lets diffusers' `lora_state_dict` convert kohya / diffusers keys (including SDXL's original
block names).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from safetensors import safe_open
from torch import nn

from models.adapters.family import AdapterError, AdapterFileError
from models.adapters.files import AdapterFile, check_tensors, read_safetensors
from models.adapters.handle import AdapterHandle
from models.adapters.lora import LoraAdapterConfig
from models.adapters.low_rank import (
    EXACT_LOW_RANK,
    LowRank,
    adapter_tensors,
    delta_weights,
    exact_lora,
    extract_lora,
)
from models.adapters.registry import FAMILIES
from models.adapters.targets import layer_shapes
from models.atomic_write import as_os_error, write_safetensors

Adapter = AdapterFile | AdapterHandle
REPORT_KEY = "atelier_export"
"""safetensors header field holding the `ExportReport` of an exported file (JSON)."""


@dataclass
class ExportReport:
    """What an export wrote and how faithful it is (also stored in the file's header)."""

    family: str
    form: str
    """`lora`, `lokr`, `full` (`.diff`), `lokr+full` or `peft`."""
    exact: bool
    rank: int | None = None
    """The rank of an extracted LoRA (None for exact forms)."""
    relative_error: float = 0.0
    """‖ΔW − ΔW_export‖_F / ‖ΔW‖_F over all layers (0 for exact forms)."""
    layer_errors: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a CLI or the UI."""
        if self.exact:
            return f"{self.family} → {self.form}, exact"
        worst = max(self.layer_errors.values(), default=0.0)
        return (
            f"{self.family} → rank-{self.rank} LoRA, relative error {self.relative_error:.2%} "
            f"overall (worst layer {worst:.2%})"
        )

    def header(self) -> dict[str, str]:
        return {REPORT_KEY: json.dumps(asdict(self), sort_keys=True)}


def read_export_report(path: str | Path) -> ExportReport | None:
    """The `ExportReport` in an exported file's header (None for files without one); reads the header only."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = dict(handle.metadata() or {})
    except Exception as error:
        raise AdapterFileError(f"{Path(path).name} is not a readable safetensors file: {error}") from None
    if REPORT_KEY not in header:
        return None
    try:
        return ExportReport(**json.loads(header[REPORT_KEY]))
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"{Path(path).name} has a damaged {REPORT_KEY} header: {error}") from None


def _require_family(adapter: Adapter, *families: str) -> None:
    if adapter.family not in families:
        raise AdapterError(
            f"this export takes {' or '.join(families)} adapters, got a {adapter.family} adapter."
        )


def kohya_name(module: str) -> str:
    """The kohya/LyCORIS name of a UNet module (`lora_unet_` + the module path with `_` for `.`)."""
    return "lora_unet_" + module.replace(".", "_")


def lora_of(adapter: Adapter, unet: nn.Module | None, rank: int | None) -> tuple[LowRank, ExportReport]:
    """The LoRA an export writes: exact (LoRA, HRA) when `rank` is None, else extracted at `rank` by SVD."""
    if rank is None:
        if adapter.family not in EXACT_LOW_RANK:
            raise AdapterError(
                f"a {FAMILIES[adapter.family].title} adapter has no exact LoRA form: give a rank to extract "
                "one (--rank R), or export it exactly to kohya/lycoris (full weight differences or LoKr)."
            )
        return exact_lora(adapter, unet), ExportReport(adapter.family, "lora", exact=True)
    extraction = extract_lora(delta_weights(adapter, unet), rank)
    report = ExportReport(
        adapter.family, "lora", False, rank, extraction.relative_error, extraction.layer_errors
    )
    return extraction.factors, report


def _peft_lora_keys(factors: LowRank) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up) in factors.items():
        tensors[f"{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{name}.lora_B.weight"] = up.contiguous()
    return tensors


def write_diffusers_lora(factors: LowRank, path: str | Path, header: Mapping[str, str]) -> Path:
    """Write LoRA factors as a diffusers LoRA file (keys by diffusers' `save_lora_weights`) plus `header`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        try:
            StableDiffusionPipeline.save_lora_weights(
                folder,
                unet_lora_layers=_peft_lora_keys(factors),
                weight_name=path.name,
                safe_serialization=True,
            )
        except Exception as error:  # safetensors reports a full disk as SafetensorError: name the real file
            os_error = as_os_error(error, path)
            if os_error is None:
                raise
            raise os_error from error
        tensors, written = read_safetensors(Path(folder) / path.name)
    return write_safetensors(path, tensors, {**written, **header})


def write_kohya_lora(factors: LowRank, path: str | Path, header: Mapping[str, str]) -> Path:
    """Write LoRA factors in the kohya/A1111 format (`lora_down`/`lora_up`, alpha = rank) plus `header`."""
    packed = {f"unet.{key}": value for key, value in _peft_lora_keys(factors).items()}
    kohya = convert_state_dict_to_kohya(packed)
    kohya = {k: (v.float() if k.endswith(".alpha") else v) for k, v in kohya.items()}
    ranks = Counter(int(down.shape[0]) for down, _ in factors.values())
    rank = ranks.most_common(1)[0][0] if ranks else 0
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    metadata["ss_network_alpha"] = str(rank)
    return write_safetensors(path, kohya, {**metadata, **header})


def _lokr_factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(w1, w2) = (A, scale·B) per layer: kron(w1, w2) = ΔW exactly."""
    _require_family(adapter, "krona")
    tensors = adapter_tensors(adapter)
    scale = adapter.config.scale
    return {
        name: (tensors[f"{name}.krona_A"], tensors[f"{name}.krona_B"] * scale) for name in adapter.targets
    }


def lycoris_infers_layout(w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the LyCORIS library rebuilds a LoKr layer with these factor shapes.

    LyCORIS (`modules/lokr.py`, `make_module_from_state_dict`) re-derives one factor f from the shapes and
    factorises both dimensions as (min(f, d/f), max(f, d/f)); a square w1 of side f <= both sides of w2 is the
    layout it reproduces whatever the dimensions.
    """
    return w1.shape[0] == w1.shape[1] and w1.shape[0] <= min(w2.shape)


def _lokr_keys(name: str, w1: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    key = kohya_name(name)
    return {f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(1.0)}


def _full_keys(deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{kohya_name(name)}.diff": delta.contiguous() for name, delta in deltas.items()}


def _lycoris_header(report: ExportReport) -> dict[str, str]:
    return {"format": "pt", "ss_network_module": "lycoris.kohya", **report.header()}


def export_lycoris_lokr(adapter: Adapter, path: str | Path) -> Path:
    """Write a DiffuseKronA adapter as a compact LoKr file (`lokr_w1` = A, `lokr_w2` = scale · B): exact in
    A1111 and ComfyUI; the LyCORIS library itself only rebuilds layers `lycoris_infers_layout` accepts."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (w1, w2) in _lokr_factors(adapter).items():
        tensors |= _lokr_keys(name, w1, w2)
    report = ExportReport(adapter.family, "lokr", exact=True)
    return write_safetensors(path, tensors, _lycoris_header(report))


def export_full_diff(adapter: Adapter, path: str | Path, *, unet: nn.Module | None = None) -> Path:
    """Write ΔW of every layer as LyCORIS "full" modules (`lora_unet_<m>.diff`): exact for every family."""
    report = ExportReport(adapter.family, "full", exact=True)
    return write_safetensors(path, _full_keys(delta_weights(adapter, unet)), _lycoris_header(report))


def export_diffusers_lora(
    adapter: Adapter, path: str | Path, *, unet: nn.Module | None = None, rank: int | None = None
) -> Path:
    """Write a diffusers LoRA file (`pipe.load_lora_weights(folder, weight_name=path.name)`): exact for LoRA
    and HRA, extracted at `rank` otherwise. `unet`: the base UNet (needed for HRA and BOFT files)."""
    factors, report = lora_of(adapter, unet, rank)
    return write_diffusers_lora(factors, path, report.header())


def export_kohya_lora(
    adapter: Adapter, path: str | Path, *, unet: nn.Module | None = None, rank: int | None = None
) -> Path:
    """Write a kohya/A1111 LoRA file: exact for LoRA and HRA, extracted at `rank` otherwise."""
    factors, report = lora_of(adapter, unet, rank)
    return write_kohya_lora(factors, path, report.header())


def export_lycoris(
    adapter: Adapter, path: str | Path, *, unet: nn.Module | None = None, rank: int | None = None
) -> Path:
    """Write one file the LyCORIS library, A1111 and ComfyUI all load. Exact without `rank`: LoRA keys for
    LoRA/HRA, LoKr (where LyCORIS infers the layout) or `.diff` for DiffuseKronA, `.diff` for BOFT; with
    `rank`, a LoRA extracted at that rank."""
    if rank is not None or adapter.family in EXACT_LOW_RANK:
        factors, report = lora_of(adapter, unet, rank)
        return write_kohya_lora(factors, path, _lycoris_header(report))
    if adapter.family == "krona":
        tensors: dict[str, torch.Tensor] = {}
        full: dict[str, torch.Tensor] = {}
        for name, (w1, w2) in _lokr_factors(adapter).items():
            if lycoris_infers_layout(w1, w2):
                tensors |= _lokr_keys(name, w1, w2)
            else:
                full[name] = torch.kron(w1.float(), w2.float())
        tensors |= _full_keys(full)
        form = "+".join(f for f, used in (("lokr", len(full) < len(adapter.targets)), ("full", full)) if used)
        return write_safetensors(path, tensors, _lycoris_header(ExportReport(adapter.family, form, True)))
    return export_full_diff(adapter, path, unet=unet)


def export_peft(adapter: Adapter, folder: str | Path) -> Path:
    """Write a LoRA/BOFT/HRA adapter in PEFT's `save_pretrained` layout (loads with `PeftModel.from_pretrained`)."""
    family = FAMILIES[adapter.family]
    if family.peft_config is None:
        raise AdapterError(
            f"PEFT has no {family.title} adapter type (its LoKr keeps the Kronecker factor A square); "
            "export it to kohya or lycoris instead."
        )
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        family.peft_config(adapter.config, list(adapter.targets)).save_pretrained(str(tmp))
        tensors = {f"base_model.model.{key}": value for key, value in adapter_tensors(adapter).items()}
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
