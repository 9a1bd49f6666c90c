"""Export an Atelier adapter file to what other tools load — the one entry point of the CLI, the trainer's final
exports and the app's Library.

    python -m models.adapters.export adapter.safetensors --to kohya|diffusers|lycoris|peft [--rank R] [--out PATH]
        [--base-model SPEC]

- `kohya`: for A1111, ComfyUI and kohya's scripts. LoRA and HRA as an exact LoRA, DiffuseKronA as an exact
  LoKr, BOFT as exact full weight differences (`.diff`).
- `diffusers`: a LoRA for `pipe.load_lora_weights`. Exact for LoRA and HRA; BOFT and DiffuseKronA need `--rank`.
- `lycoris`: one file the LyCORIS library loads (and A1111/ComfyUI too), exact for every family.
- `peft`: PEFT's `save_pretrained` folder (LoRA, BOFT, HRA).
- `--rank R` (kohya, diffusers, lycoris): a LoRA extracted from ΔW by truncated SVD; the relative error per
  layer and overall goes into the file's header (`atelier_export`) and is printed.

HRA and BOFT change W by an amount that depends on W, so their exports read the base UNet (`--base-model`,
default: the model recorded in the file when it can be loaded here, else the toy world). Exit status 0, or 2
with one line naming the problem. Format details: `models.adapters.exports`; the math: `models.adapters.low_rank`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusers.utils.logging import disable_progress_bar
from torch import nn

from models.adapters import exports
from models.adapters.family import AdapterError
from models.adapters.files import AdapterFile, load_adapter_file
from models.adapters.handle import AdapterHandle
from models.adapters.low_rank import EXACT_LOW_RANK, WEIGHT_FREE_DELTA
from models.adapters.registry import FAMILIES

FORMATS = ("kohya", "diffusers", "lycoris", "peft")
Adapter = AdapterFile | AdapterHandle
EXTRACT_RANK = 32
"""Rank of the LoRA extracted for diffusers from families that have no exact LoRA form (trainer, Library)."""


@dataclass(frozen=True)
class StandardExport:
    """One export written after training: format, rank (None = exact) and file or folder name."""

    to: str
    rank: int | None
    name: str


def standard_exports(family: str) -> dict[str, StandardExport]:
    """The exports the trainer writes next to an adapter of `family` (what the Library offers to download):
    every reader gets the exact file where one exists, and diffusers a LoRA extracted at `EXTRACT_RANK` where
    the family has no exact LoRA form."""
    table: dict[str, StandardExport] = {}
    if FAMILIES[family].peft_config is not None:
        table["peft"] = StandardExport("peft", None, "peft")
    if family in EXACT_LOW_RANK:
        table["diffusers"] = StandardExport("diffusers", None, "pytorch_lora_weights.safetensors")
        table["kohya"] = StandardExport("kohya", None, "kohya_lora.safetensors")
        return table
    kohya_form = "lokr" if family == "krona" else "full"
    table["kohya"] = StandardExport("kohya", None, f"kohya_{kohya_form}.safetensors")
    if family == "krona":  # the compact LoKr is not one the LyCORIS library rebuilds (see exports.py)
        table["lycoris"] = StandardExport("lycoris", None, "lycoris.safetensors")
    table["diffusers"] = StandardExport(
        "diffusers", EXTRACT_RANK, f"pytorch_lora_weights_rank{EXTRACT_RANK}.safetensors"
    )
    return table


@dataclass
class ExportResult:
    """Where an export went and how faithful it is."""

    path: Path
    report: exports.ExportReport


def default_name(stem: str, to: str) -> str:
    """The file (or, for PEFT, folder) name an export of `stem` gets by default."""
    return f"{stem}-peft" if to == "peft" else f"{stem}.{to}.safetensors"


def needs_base_weights(family: str, to: str) -> bool:
    """Whether exporting `family` this way reads the base UNet: ΔW of LoRA and DiffuseKronA is the adapter's
    own, that of HRA and BOFT (and any family computed from its adapted weights) depends on W."""
    return family not in WEIGHT_FREE_DELTA and to != "peft"


def check_request(family: str, to: str, rank: int | None) -> None:
    """Raise `AdapterError` (one line: what is wrong, what to do) unless `family` can be exported this way."""
    if to not in FORMATS:
        raise AdapterError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}.")
    if rank is not None and rank < 1:
        raise AdapterError(f"--rank must be >= 1, got {rank}.")
    if rank is not None and to == "peft":
        raise AdapterError("--rank extracts a LoRA; PEFT exports keep the adapter as it is, so drop --rank.")
    title = FAMILIES[family].title
    if to == "peft" and FAMILIES[family].peft_config is None:
        raise AdapterError(
            f"PEFT has no {title} adapter type (its LoKr keeps the Kronecker factor A square); "
            "export it to kohya or lycoris instead."
        )
    if to == "diffusers" and rank is None and family not in EXACT_LOW_RANK:
        raise AdapterError(
            f"diffusers loads LoRAs only, and a {title} adapter is not one: give --rank R to extract a "
            "LoRA of rank R (the error is reported), or use --to lycoris for an exact file."
        )


def export_adapter(
    adapter: Adapter, to: str, out: str | Path, *, unet: nn.Module | None = None, rank: int | None = None
) -> ExportResult:
    """Export `adapter` to format `to` (one of `FORMATS`) at `out`; `unet` = the base UNet (HRA/BOFT)."""
    check_request(adapter.family, to, rank)
    if to == "peft":
        path = exports.export_peft(adapter, out)
        return ExportResult(path, exports.ExportReport(adapter.family, "peft", exact=True))
    if to == "diffusers":
        path = exports.export_diffusers_lora(adapter, out, unet=unet, rank=rank)
    elif to == "lycoris":
        path = exports.export_lycoris(adapter, out, unet=unet, rank=rank)
    elif rank is not None or adapter.family in EXACT_LOW_RANK:
        path = exports.export_kohya_lora(adapter, out, unet=unet, rank=rank)
    elif adapter.family == "krona":
        path = exports.export_lycoris_lokr(adapter, out)
    else:
        path = exports.export_full_diff(adapter, out, unet=unet)
    report = exports.read_export_report(path)
    if report is None:
        raise AdapterError(f"{path} was written without its export report; please report this.")
    return ExportResult(path, report)


def write_standard_exports(
    adapter: Adapter,
    folder: str | Path,
    *,
    unet: nn.Module | None = None,
    on_error: Callable[[str, AdapterError], None] | None = None,
) -> dict[str, ExportResult]:
    """Write `standard_exports(adapter.family)` into `folder` (the trainer's `exports/`, the Library's
    downloads). An export that fails raises, or with `on_error` is reported to it and skipped."""
    written: dict[str, ExportResult] = {}
    for name, spec in standard_exports(adapter.family).items():
        try:
            written[name] = export_adapter(
                adapter, spec.to, Path(folder) / spec.name, unet=unet, rank=spec.rank
            )
        except AdapterError as error:
            if on_error is None:
                raise
            on_error(name, error)
    return written


def _base_unet(adapter: AdapterFile, spec: str | None) -> nn.Module:
    """The base UNet: `spec`, else the folder recorded in the file if it exists here, else the toy world."""
    from models.pipelines import load_pipeline

    if spec is None and adapter.base_model_id and Path(adapter.base_model_id).exists():
        spec = adapter.base_model_id
    return load_pipeline(spec, device="cpu", dtype="fp32").unet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.adapters.export",
        description="Export an Atelier adapter file for A1111/ComfyUI/kohya, diffusers, LyCORIS or PEFT.",
    )
    parser.add_argument("file", type=Path, help="an Atelier adapter .safetensors file")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    parser.add_argument("--rank", type=int, help="extract a LoRA of this rank by truncated SVD of ΔW")
    parser.add_argument("--out", type=Path, help="output file (PEFT: folder); default beside FILE")
    parser.add_argument(
        "--base-model",
        help="the base model the adapter was trained on (HRA and BOFT only; default: the one recorded in "
        "the file if it is a local folder, else the toy world)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.pipelines import ModelLoadError

    try:
        adapter = load_adapter_file(args.file)
        check_request(adapter.family, args.to, args.rank)
        out = args.out or args.file.with_name(default_name(args.file.stem, args.to))
        unet = None
        if needs_base_weights(adapter.family, args.to):
            disable_progress_bar()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                unet = _base_unet(adapter, args.base_model)
        result = export_adapter(adapter, args.to, out, unet=unet, rank=args.rank)
    except (AdapterError, ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{result.path}: {result.report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
