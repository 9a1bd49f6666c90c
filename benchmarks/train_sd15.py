"""DreamBooth-LoRA training at Stable Diffusion 1.5 size on the GPU: seconds per step and peak VRAM.

The GPU half of the training benchmark (the CPU half, Atelier against a plain diffusers + PEFT loop, is
``benchmarks.train``). Atelier's ``training.dreambooth.train`` runs on an SD 1.5-architecture pipeline built
from configs (random weights: speed and memory do not depend on them; ``benchmarks._sd15``) saved to a
temporary folder in fp16, at 512 px, batch 1, fp16 mixed precision, gradient checkpointing, LoRA rank 4 on the
``vo`` targets, SDPA attention. Reported: seconds per step after the warm-up steps (from ``train_log.jsonl``),
peak allocated and reserved CUDA memory during training, and peak allocated memory against the 6 GB target.

    python -m benchmarks.train_sd15 [--steps 30] [--size 512]          # needs a CUDA device
    python -m benchmarks.train_sd15 --device cpu --quick --steps 3     # smoke run of the same code path

Without a CUDA device (and without ``--device cpu``) it prints that it did not run and exits 0, so
``make bench`` still runs the other benchmarks on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks._sd15 import build_sd15_pipeline
from training.config import TrainConfig
from training.dreambooth import train
from training.train_log import read_train_log

TARGET_VRAM_GB = 6.0
PROMPT = "a photo of sks toy"


@dataclass(frozen=True)
class Sd15TrainingRun:
    """What one benchmark run measured."""

    device: str
    size: int
    steps: int
    seconds_per_step: float
    peak_allocated_gb: float | None
    peak_reserved_gb: float | None
    trainable_parameters: int


def write_subject_images(folder: Path, size: int, count: int = 4) -> Path:
    """``count`` smooth random RGB images of ``size`` px (decoded once and cached by the trainer anyway)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{index}.png")
    return folder


def seconds_per_step(log: Path, warmup: int) -> float:
    """Mean step time after the first ``warmup`` steps, from the ``time`` column of ``train_log.jsonl``."""
    times = [row["time"] for row in read_train_log(log)]
    if len(times) < 2:
        raise ValueError(f"{log} has {len(times)} logged step(s); run at least 2 steps.")
    first = min(warmup, len(times) - 2)
    return (times[-1] - times[first]) / (len(times) - 1 - first)


def run(device: str, size: int, steps: int, quick: bool, warmup: int = 5) -> Sd15TrainingRun:
    """Build, save and train; return the measurements."""
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="atelier-bench-sd15-") as tmp:
        root = Path(tmp)
        pipe = build_sd15_pipeline(quick, size, "cpu")
        pipe.to(torch.float16 if cuda else torch.float32).save_pretrained(root / "model")
        del pipe
        config = TrainConfig(
            pretrained_model_name_or_path=str(root / "model"),
            instance_data_dir=str(write_subject_images(root / "subject", size)),
            instance_prompt=PROMPT,
            output_dir=str(root / "out"),
            adapter="lora",
            targets="vo",
            adapter_config={"rank": 4, "alpha": 4.0},
            resolution=size,
            train_batch_size=1,
            max_train_steps=steps,
            learning_rate=1e-4,
            mixed_precision="fp16" if cuda else "no",
            gradient_checkpointing=True,
            seed=0,
            checkpointing_steps=10**9,
            validation_steps=0,
            num_validation_images=1,
            num_inference_steps=1,
        )
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        result = train(config)
        allocated = reserved = None
        if cuda:
            allocated = torch.cuda.max_memory_allocated() / 2**30
            reserved = torch.cuda.max_memory_reserved() / 2**30
        return Sd15TrainingRun(
            device=device,
            size=size,
            steps=result.steps,
            seconds_per_step=seconds_per_step(result.log_path, warmup),
            peak_allocated_gb=allocated,
            peak_reserved_gb=reserved,
            trainable_parameters=result.trainable_parameters,
        )


def format_run(measured: Sd15TrainingRun, quick: bool) -> str:
    model = "narrow SD-shaped UNet (--quick)" if quick else "SD 1.5 architecture (UNet 860M), random weights"
    lines = [
        f"model: {model}; {measured.size} px, batch 1, "
        f"{'fp16 mixed precision' if measured.peak_allocated_gb is not None else 'fp32'}, gradient checkpointing, "
        f"LoRA r=4 on 'vo' ({measured.trainable_parameters:,} params), {measured.steps} steps on {measured.device}",
        f"s/step (after warm-up): {measured.seconds_per_step:.3f}",
    ]
    if measured.peak_allocated_gb is None:
        lines.append("peak VRAM: not measured (no CUDA device)")
    else:
        ratio = measured.peak_allocated_gb / TARGET_VRAM_GB
        verdict = "met" if measured.peak_allocated_gb <= TARGET_VRAM_GB else "NOT met"
        lines.append(
            f"peak VRAM allocated {measured.peak_allocated_gb:.2f} GB (reserved {measured.peak_reserved_gb:.2f} GB); "
            f"ratio to the {TARGET_VRAM_GB:g} GB target: {ratio:.2f}x [{verdict}]"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_sd15", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="narrow SD-shaped model (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 30, quick 3)")
    parser.add_argument("--size", type=int, default=None, help="resolution in px (default 512, quick 64)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print(
            "not run: no CUDA device here (this benchmark measures GPU memory; --device cpu for a smoke run)"
        )
        return 0
    measured = run(
        device, args.size or (64 if args.quick else 512), args.steps or (3 if args.quick else 30), args.quick
    )
    print(format_run(measured, args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
