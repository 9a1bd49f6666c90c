"""The GPU check: each adapter family trained and each composition method run at Stable Diffusion scale, on
SD 1.5 and SDXL architectures built from configs (random weights), with every option from the base model's
profile (`models.profiles`: resolution, precision, checkpointing, 8-bit Adam, batch, targets, learning rate,
guidance, method options). Diffusers' own code is the baseline: its pipeline call for generation, and a
plain PEFT-LoRA UNet step (forward, backward, AdamW on random latents, no data or caching) for training.

Printed, one table per architecture: s/step (training: after the warm-up steps, from ``train_log.jsonl``;
generation: wall time / denoising steps), peak allocated VRAM, and UNet evaluations per image (each batch
element of a UNet forward counts one; classifier-free guidance costs two per step). Random weights measure
speed and memory, never quality.

    python -m benchmarks.gpu_check                       # one H100: about 8 minutes
    python -m benchmarks.gpu_check --archs sd1 --steps 30 --compose-steps 50
    python -m benchmarks.gpu_check --quick --device cpu  # smoke run of the same code (narrow models, 64 px)

Defaults: 20 training steps per family and 20 denoising steps per image (the profiles' own 500-1010 training
steps and 50 sampling steps cost proportionally more; s/step does not change). Without a CUDA device (and
without ``--device cpu``) it prints that it did not run and exits 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.train_sd15 import seconds_per_step, write_subject_images
from models.adapters import FAMILIES
from models.profiles import Profile, profile_for_spec

QUICK_SIZE = 64
PROMPT = "a photo of zq{family} toy"
QUICK_ADAPTER_OPTIONS = {"sdxl": {"krona": {"a1": 16}}}
"""The quarter-width SDXL (`--quick`) has 80-wide layers, which KronA's default a1 = 64 does not divide."""


def build(arch: str, quick: bool, folder: Path, dtype: torch.dtype) -> Path:
    """Build the architecture from configs and save it as a diffusers folder."""
    if arch == "sd1":
        from benchmarks._sd15 import build_sd15_pipeline

        pipe = build_sd15_pipeline(quick, 512, "cpu")
    else:
        from benchmarks._sdxl import build_sdxl_pipeline

        pipe = build_sdxl_pipeline(4 if quick else 1)
    pipe.to(dtype).save_pretrained(folder)
    return folder


@contextmanager
def peak_vram(device: str) -> Iterator[dict[str, float | None]]:
    """Peak allocated CUDA memory (GiB) while the block runs; None off CUDA."""
    found: dict[str, float | None] = {"gib": None}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield found
    if cuda:
        torch.cuda.synchronize()
        found["gib"] = torch.cuda.max_memory_allocated() / 2**30


def train_family(
    model: Path, family: str, arch: str, root: Path, steps: int, quick: bool, device: str
) -> dict:
    """One family's run through `training.dreambooth.train` with the profile's options."""
    from training.config import TrainConfig
    from training.dreambooth import train

    out = root / f"train-{family}"
    config = TrainConfig(
        pretrained_model_name_or_path=str(model),
        instance_data_dir=str(write_subject_images(root / "subject", QUICK_SIZE if quick else 512)),
        instance_prompt=PROMPT.format(family=family),
        output_dir=str(out),
        adapter=family,
        adapter_config=QUICK_ADAPTER_OPTIONS.get(arch, {}).get(family, {}) if quick else {},
        resolution=QUICK_SIZE if quick else None,
        max_train_steps=steps,
        seed=0,
        checkpointing_steps=10**9,
        validation_steps=0,
        num_validation_images=1,
        num_inference_steps=1,
    )
    with peak_vram(device) as vram:
        result = train(config)
    return {
        "what": f"train {family}",
        "s_per_step": seconds_per_step(result.log_path, warmup=min(3, steps - 2)),
        "vram_gib": vram["gib"],
        "unet_evals": None,
        "adapter": result.adapter_path,
    }


def diffusers_lora_step(pipe: Any, profile: Profile, steps: int, size: int, device: str) -> dict:
    """Baseline: PEFT LoRA on diffusers' UNet, plain forward/backward/AdamW steps on random latents."""
    from peft import LoraConfig

    lora = profile.family("lora")
    unet = pipe.unet
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=lora.learning_rate)
    gpu = device.startswith("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(profile.gpu.mixed_precision) if gpu else None
    if gpu and profile.gpu.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    batch = lora.train_batch_size
    latents = torch.randn(batch, 4, size // 8, size // 8, device=device)
    text_dim = unet.config.cross_attention_dim
    hidden = torch.randn(batch, 77, text_dim, device=device)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(batch, pooled, device=device),
            "time_ids": torch.tensor(
                [[size, size, 0, 0, size, size]] * batch, device=device, dtype=torch.float32
            ),
        }
    times = []
    with peak_vram(device) as vram:
        for _ in range(steps):
            start = time.perf_counter()
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                t = torch.randint(0, 1000, (batch,), device=device)
                prediction = unet(latents, t, hidden, added_cond_kwargs=added, return_dict=False)[0]
                loss = torch.nn.functional.mse_loss(prediction.float(), latents)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    unet.disable_adapters()
    warm = times[min(3, len(times) - 1) :]
    return {"what": "diffusers+PEFT LoRA step", "s_per_step": sum(warm) / len(warm), "vram_gib": vram["gib"]}


@contextmanager
def count_unet_evals(unet: torch.nn.Module) -> Iterator[list[int]]:
    """Counts batch elements through the UNet's forward (a CFG pair in one batch counts two)."""
    count = [0]

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        count[0] += int(sample.shape[0])

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def compose_methods(
    model: Path, adapters: list[Path], profile: Profile, steps: int, size: int | None, device: str
) -> tuple[list[dict], Any]:
    """Each composition method for one image with the profile's options, then diffusers' own pipeline."""
    from composition.bank import AdapterBank
    from composition.methods import METHODS, generate
    from composition.prompt import ConceptPrompt
    from models.pipelines import load_pipeline

    gpu = device.startswith("cuda")
    dtype = {"fp16": "fp16", "bf16": "bf16"}.get(profile.gpu.mixed_precision, "fp32") if gpu else "fp32"
    pipe = load_pipeline(model, device=device, dtype=dtype)
    bank = AdapterBank(pipe, adapters)
    phrases = [entry.trigger_phrase.removeprefix("a photo of ") for entry in bank.entries]
    prompt = ConceptPrompt.build(f"{phrases[0]} on the left and {phrases[1]} on the right", phrases)
    guidance = profile.generation.compose_guidance
    rows = []
    for method in METHODS:
        with peak_vram(device) as vram:
            start = time.perf_counter()
            result = generate(
                method, pipe, bank, prompt, steps, guidance, 0, height=size, width=size,
                **profile.method_options(method),
            )  # fmt: skip
            wall = time.perf_counter() - start
        rows.append({"what": f"compose {method}", "s_per_step": wall / steps, "vram_gib": vram["gib"],
                     "unet_evals": result.unet_evals})  # fmt: skip
    bank.close()
    with peak_vram(device) as vram, count_unet_evals(pipe.unet) as evals, torch.no_grad():
        start = time.perf_counter()
        pipe(prompt.text, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
        wall = time.perf_counter() - start
    rows.append({"what": "diffusers pipeline (no adapter)", "s_per_step": wall / steps, "vram_gib": vram["gib"],
                 "unet_evals": evals[0]})  # fmt: skip
    return rows, pipe


def check(arch: str, args: argparse.Namespace, device: str) -> tuple[Profile, list[dict]]:
    """Build one architecture, train every family, compose every method, run the baselines."""
    gpu = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix=f"atelier-gpu-check-{arch}-") as tmp:
        root = Path(tmp)
        model = build(arch, args.quick, root / "model", torch.float16 if gpu else torch.float32)
        profile = profile_for_spec(model)
        rows = [train_family(model, f, arch, root, args.steps, args.quick, device) for f in args.families]
        adapters = [r.pop("adapter") for r in rows]
        size = QUICK_SIZE if args.quick else None
        composed, pipe = compose_methods(model, adapters[:2], profile, args.compose_steps, size, device)
        baseline = diffusers_lora_step(pipe, profile, args.steps, size or _native(pipe), device)
        return profile, [*rows, baseline, *composed]


def _native(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def format_table(arch: str, profile: Profile, rows: list[dict], device: str, quick: bool) -> str:
    model = {"sd1": "SD 1.5", "sdxl": "SDXL"}[arch] + (" (narrow, --quick)" if quick else " (real widths)")
    cell: Callable[[Any, str], str] = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"## {model}, profile {profile.name}, {device}",
        "| run | s/step | peak VRAM GiB | UNet evals/image |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['what']} | {cell(row['s_per_step'], '.3f')} | {cell(row['vram_gib'], '.2f')} | "
            f"{cell(row.get('unet_evals'), 'd')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--archs", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sdxl"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per family (default 20, quick 3)"
    )
    parser.add_argument(
        "--compose-steps", type=int, default=None, help="denoising steps (default 20, quick 2)"
    )
    parser.add_argument("--quick", action="store_true", help="narrow models at 64 px (a CPU smoke run)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("not run: no CUDA device here (--device cpu --quick for a smoke run of the same code)")
        return 0
    if len(args.families) < 2 or "lora" not in args.families:
        parser.error("--families needs lora and at least one other family (two adapters are composed)")
    args.steps = args.steps or (3 if args.quick else 20)
    args.compose_steps = args.compose_steps or (2 if args.quick else 20)
    started = time.perf_counter()
    for arch in args.archs:
        profile, rows = check(arch, args, device)
        print(format_table(arch, profile, rows, device, args.quick), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
