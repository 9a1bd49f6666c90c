"""Export fidelity, measured by the readers themselves: every committed toy-world adapter
(`assets/composition/*.safetensors`, trained by `composition.quality`) exported to every format, loaded back by
the LyCORIS library (`create_lycoris_from_weights`, merged) or diffusers (`load_lora_weights`, fused), and the
merged weights compared with Atelier's own: relative Frobenius error ‖W_reader − W_atelier‖ / ‖ΔW_atelier‖ over
all adapted layers. Extracted LoRAs are measured at several ranks next to the error their header reports.

    python -m benchmarks exports [--ranks 4 8 16 32]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

from composition.quality import FIXTURES
from models.adapters.export import export_adapter
from models.adapters.files import AdapterFile, load_adapter_file
from models.pipelines import load_pipeline


@contextmanager
def kohya_names() -> Iterator[None]:
    """LyCORIS' generic loader names modules `<LORA_PREFIX>_<module>`; kohya files (and sd-scripts'
    `lycoris.kohya` network) use `lora_unet_<module>`."""
    from lycoris import wrapper

    before = wrapper.LycorisNetwork.LORA_PREFIX
    wrapper.LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        yield
    finally:
        wrapper.LycorisNetwork.LORA_PREFIX = before


def _weights(unet: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        module = unet.get_submodule(name)
        out[name] = getattr(module, "base_layer", module).weight.detach().double()
    return out


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], base: dict) -> float:
    lost = sum(float((got[n] - want[n]).square().sum()) for n in want)
    return (lost / sum(float((want[n] - base[n]).square().sum()) for n in want)) ** 0.5


def read_with_lycoris(unet: nn.Module, path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from lycoris.wrapper import create_lycoris_from_weights

    copy_ = copy.deepcopy(unet)
    with kohya_names():
        network, _ = create_lycoris_from_weights(1.0, str(path), copy_)
    network.merge_to(1.0)
    return _weights(copy_, names)


def read_with_diffusers(pipe: object, path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    pipe.fuse_lora()
    weights = _weights(pipe.unet, names)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    return weights


def measure(adapter: AdapterFile, pipe: object, ranks: list[int], folder: Path) -> list[tuple[str, str, str]]:
    """(format, what the header reports, error measured through the reader) rows for one adapter."""
    unet = pipe.unet
    base = _weights(unet, adapter.targets)
    want = {n: w.double() for n, w in adapter.layer_weights(unet).items()}
    rows = []
    requests = [("kohya", None), ("lycoris", None), ("diffusers", None)]
    requests += [("lycoris", r) for r in ranks] + [("diffusers", r) for r in ranks]
    for to, rank in requests:
        if to == "diffusers" and rank is None and adapter.family in ("boft", "krona"):
            continue
        path = folder / f"{adapter.name}-{to}-{rank}.safetensors"
        result = export_adapter(adapter, to, path, unet=unet, rank=rank)
        label = f"{to} ({result.report.form}{f' r={rank}' if rank else ''})"
        claimed = "exact" if result.report.exact else f"{result.report.relative_error:.2%}"
        try:
            reader = read_with_diffusers if to == "diffusers" else read_with_lycoris
            got = reader(pipe if to == "diffusers" else unet, path, adapter.targets)
            measured = f"{relative_error(got, want, base):.3e}"
        except RuntimeError as error:
            measured = f"refused: {str(error).splitlines()[0][:60]}"
        rows.append((label, claimed, measured))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks exports", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--quick", action="store_true", help="one adapter per family, rank 8 only")
    args, _ = parser.parse_known_args(argv)
    files = sorted(FIXTURES.glob("*.safetensors"))
    if args.quick:
        files = list({load_adapter_file(f).family: f for f in files}.values())
    ranks = [8] if args.quick else args.ranks
    warnings.filterwarnings("ignore")
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": expected, UNet-only files
    pipe = load_pipeline(None, device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    print("| adapter | family | export (form) | header says | reader's merged weights vs Atelier's |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for file in files:
            adapter = load_adapter_file(file)
            for label, claimed, measured in measure(adapter, pipe, ranks, Path(folder)):
                print(f"| {adapter.name} | {adapter.family} | {label} | {claimed} | {measured} |")
    return 0
