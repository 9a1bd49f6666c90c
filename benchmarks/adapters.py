"""Cost of each adapter family on an SD-1.5-architecture UNet, as ratios against the plain base UNet.

The UNet is diffusers' `UNet2DConditionModel` with Stable Diffusion 1.5's config and random weights
(cost does not depend on the weights), run on CPU in fp32 at a reduced latent size (16x16, batch 1;
`--quick`: 8x8 and fewer rounds) with a 77-token text context. For every family at its default config on
the `vo` targets it prints:

- trainable parameters and the size of the saved adapter file;
- forward+backward time of the adapted UNet (gradients for the adapter only, as in training) relative to
  a forward+backward of the frozen base UNet (gradient w.r.t. the input latents, so the backward runs
  through the whole network);
- merged-inference time (adapter merged into the weights, wrappers still in place) relative to the plain
  base forward — target 1.00 ± 0.03.

Base and adapted runs alternate (order flipped every round); a ratio is the median of the per-round
ratios over `--repeats` rounds (3x as many for the cheaper merged inference), which cancels most of the
shared CPU's load swings.

    python -m benchmarks.adapters [--quick] [--threads T] [--repeats R] [--families lora,krona,...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from models.adapters import FAMILIES, attach
from models.adapters.files import save_adapter_file

MERGED_TARGET = (0.97, 1.03)

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.5's UNet architecture with seeded random weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD15_UNET).eval()


def make_inputs(latent: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(1, 4, latent, latent, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, 768, generator=g),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_backward(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> None:
    unet(**inputs).sample.pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)


def inference(unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        unet(**inputs)


def paired(base: Callable[[], object], adapted: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(median of per-round adapted/base time ratios, best base time); the order alternates every round."""
    base(), adapted()
    ratios, base_times = [], []
    for round_index in range(rounds):
        if round_index % 2:
            adapted_time, base_time = timed(adapted), timed(base)
        else:
            base_time, adapted_time = timed(base), timed(adapted)
        ratios.append(adapted_time / base_time)
        base_times.append(base_time)
    return statistics.median(ratios), min(base_times)


def bench_family(
    name: str, unet: UNet2DConditionModel, inputs: dict[str, torch.Tensor], repeats: int, folder: Path
) -> dict[str, float]:
    base_unet = unet
    adapted_unet = copy.deepcopy(unet)
    base_unet.requires_grad_(False)
    grad_inputs = {**inputs, "sample": inputs["sample"].clone().requires_grad_(True)}
    handle = attach(adapted_unet, name, None, "vo")
    params = handle.num_parameters()
    with torch.no_grad():  # move off the init so no branch is trivially zero
        for param in handle.trainable_parameters():
            param.add_(1e-3 * torch.randn_like(param))
    path = save_adapter_file(
        folder / f"{name}.safetensors",
        handle,
        unet=adapted_unet,
        base_model_id="sd15-architecture-random",
        trigger_phrase="sks",
        train_steps=0,
    )
    fb_ratio, base_fb = paired(
        lambda: forward_backward(base_unet, grad_inputs),
        lambda: forward_backward(adapted_unet, inputs),
        repeats,
    )
    handle.merge()
    merged_ratio, base_inf = paired(
        lambda: inference(base_unet, inputs), lambda: inference(adapted_unet, inputs), 3 * repeats
    )
    handle.detach()
    return {
        "params": params,
        "file_mb": path.stat().st_size / 2**20,
        "fb_ratio": fb_ratio,
        "base_fb_s": base_fb,
        "merged_ratio": merged_ratio,
        "base_inf_s": base_inf,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.adapters", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="8x8 latents and 3 rounds")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared CPU)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per measurement (median ratio kept)"
    )
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated family names")
    args = parser.parse_args(argv)
    latent = 8 if args.quick else 16
    repeats = args.repeats or (3 if args.quick else 7)
    torch.set_num_threads(args.threads)
    unet = build_unet()
    inputs = make_inputs(latent)
    total = sum(p.numel() for p in unet.parameters())
    print(
        f"SD-1.5-architecture UNet, random weights, {total / 1e6:.0f}M params, fp32 CPU, {args.threads} threads, "
        f"latents 1x4x{latent}x{latent}, text 77x768, targets 'vo', median of {repeats} rounds"
    )
    header = (
        f"{'family':8} {'trainable':>10} {'file MB':>8} {'fwd+bwd / base':>15} {'merged inf / base':>18} "
        f"{'in 1.00±0.03':>13}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        for name in args.families.split(","):
            row = bench_family(name, unet, inputs, repeats, Path(folder))
            inside = MERGED_TARGET[0] <= row["merged_ratio"] <= MERGED_TARGET[1]
            ok &= inside
            print(
                f"{name:8} {row['params']:>10,} {row['file_mb']:>8.2f} {row['fb_ratio']:>15.3f} "
                f"{row['merged_ratio']:>18.3f} {'yes' if inside else 'NO':>13}",
                flush=True,
            )
        print(f"(base fwd+bwd {row['base_fb_s']:.3f} s, base inference {row['base_inf_s']:.3f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
