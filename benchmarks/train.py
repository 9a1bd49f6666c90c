"""Steps/s and peak RSS of Atelier's DreamBooth trainer against a plain diffusers + PEFT training loop.

Reference: the DreamBooth-LoRA loop of diffusers' ``train_dreambooth_lora.py``, step for step — a Dataset
that opens, transforms and tokenizes each image in ``__getitem__``, a DataLoader, PEFT LoRA attached with
``unet.add_adapter(LoraConfig(...))``, UNet, optimizer, loader and LR scheduler prepared by accelerate, and
every step a VAE encode of the pixel batch and a text-encoder pass before the UNet forward/backward, the
gradient clip, a (default, for-each) AdamW step, the scheduler step and a progress-bar update with the loss.
Atelier's ``training.dreambooth.train`` runs the same model, batch size, targets (``vo``), rank, learning
rate and number of steps with the CLI's progress bar, and its optimisations: text embeddings and VAE
posteriors cached once (both encoders are frozen), images decoded once, a fused AdamW step, PEFT's LoRA
layers without their per-call bookkeeping (`models.adapters.lean_lora`) and direct attention-processor calls
(`models.attention_calls`); a channels-last UNet on CUDA only. Both run in this one process on the
same subject images and the same thread count.

Model: the toy world (``assets/toyworld``) when installed, otherwise the toy world's architecture with
random weights (speed does not depend on the weights; the table says which).

Reported per side: steps/s of the training loop, wall time including setup (Atelier's caching is
setup), and the peak resident-memory growth above the process's RSS just before that side started
(sampled every 5 ms). Atelier runs first, so any allocator reuse favours the reference. The sides
alternate for ``--repeats`` rounds; per side the best round is kept for each figure (the CPU is shared).
The reference also reports the share of its loop spent in the UNet's forward and backward passes: caching
and a leaner loop can remove only the rest, so 1/share is the most they can gain (the ceiling line).

    python -m benchmarks.train [--quick] [--steps N] [--batch B [B ...]] [--threads T]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from PIL import Image, ImageOps
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from models.adapters import resolve_targets
from models.clip_tokenizer import write_clip_tokenizer_files
from models.pipelines import default_base_model
from models.toyworld.world import IMAGE_SIZE, Scene, SceneObject, render_scene
from training.cli import ProgressBar
from training.config import TrainConfig
from training.dreambooth import train

TARGET_SPEEDUP = 1.3
PROMPT = "a photo of sks star"


class PeakRss:
    """Samples this process's RSS in a background thread; ``peak_growth`` is the max above the start value."""

    def __init__(self, interval: float = 0.005) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        gc.collect()
        self.start = self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_growth(self) -> int:
        return self.peak - self.start


def toyworld_architecture(folder: Path) -> Path:
    """Save a random-weight pipeline with the toy world's exact architecture into ``folder``."""
    from models.toyworld import clip_model
    from models.toyworld.stages import SCHEDULER_CONFIG
    from models.toyworld.train import build_unet, build_vae

    text_encoder = clip_model.to_transformers_text_model(clip_model.build_tiny_clip(seed=0))
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=build_vae(),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(folder / "tokenizer_files")),
        unet=build_unet(text_encoder.config.hidden_size),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


def subject_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, colour in enumerate(["red", "blue", "green", "yellow", "purple"]):
        render_scene(Scene((SceneObject("star", colour),))).save(folder / f"{k}.png")
    return folder


class ReferenceDataset(torch.utils.data.Dataset):
    """diffusers' DreamBoothDataset pattern: open, EXIF-rotate, transform and tokenize in ``__getitem__``."""

    def __init__(self, folder: Path, tokenizer: CLIPTokenizer, size: int) -> None:
        self.paths = sorted(folder.glob("*.png"))
        self.tokenizer = tokenizer
        self.transforms = transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize([0.5], [0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = ImageOps.exif_transpose(Image.open(self.paths[index])).convert("RGB")
        ids = self.tokenizer(PROMPT, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids[0]  # fmt: skip
        return {"pixel_values": self.transforms(image), "input_ids": ids}


def reference_loop(
    model: Path, images: Path, *, steps: int, batch: int, rank: int, lr: float, seed: int
) -> tuple[float, float]:
    """The plain diffusers + PEFT loop, step for step as diffusers' ``train_dreambooth_lora.py`` runs it
    (accelerate-prepared UNet, optimizer, data loader and LR scheduler; ``accelerator.accumulate``,
    ``backward`` and ``clip_grad_norm_``; a tqdm bar with the loss and LR; ``accelerator.log``). Returns
    steps/s of the loop (setup excluded, like Atelier's figure) and the share of the loop's time spent in
    the UNet's forward and backward passes."""
    set_seed(seed)
    accelerator = Accelerator()
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    targets = resolve_targets(unet, "vo")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    dataset = ReferenceDataset(images, pipe.tokenizer, IMAGE_SIZE)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_training_steps=steps)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    bar = tqdm(range(steps), desc="reference", disable=not accelerator.is_local_main_process)
    unet.train()
    done, unet_seconds, start = 0, 0.0, time.perf_counter()
    while done < steps:
        for item in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(item["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                hidden = text_encoder(item["input_ids"])[0]
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
                unet_start = time.perf_counter()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(prediction.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                unet_seconds += time.perf_counter() - unet_start
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                bar.update(1)
                done += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            bar.set_postfix(**logs)
            accelerator.log(logs, step=done)
            if done == steps:
                break
    seconds = time.perf_counter() - start
    bar.close()
    accelerator.end_training()
    return steps / seconds, unet_seconds / seconds


def atelier_run(
    model: Path, images: Path, out: Path, *, steps: int, batch: int, rank: int, lr: float, seed: int
) -> float:
    config = TrainConfig(
        pretrained_model_name_or_path=str(model),
        instance_data_dir=str(images),
        instance_prompt=PROMPT,
        output_dir=str(out),
        adapter="lora",
        targets="vo",
        adapter_config={"rank": rank, "alpha": float(rank)},
        train_batch_size=batch,
        max_train_steps=steps,
        learning_rate=lr,
        center_crop=True,
        seed=seed,
        checkpointing_steps=10**9,
        validation_steps=0,
        num_validation_images=1,
        num_inference_steps=1,
    )
    progress = ProgressBar()  # the CLI's bar, as the reference draws one
    try:
        return train(config, progress=progress).steps_per_second
    finally:
        progress.close()


def measure(run: Callable[[], float | tuple[float, float]]) -> dict[str, Any]:
    """Run one side; a side that also returns its UNet share (the reference) has it kept as ``unet_share``."""
    started = time.perf_counter()
    with PeakRss() as rss:
        outcome = run()
    rate, share = outcome if isinstance(outcome, tuple) else (outcome, None)
    row = {"steps_per_s": rate, "wall_s": time.perf_counter() - started, "peak_mb": rss.peak_growth / 2**20}
    return row | ({"unet_share": share} if share is not None else {})


def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Fastest steps/s, shortest wall time and smallest peak RSS over the rounds of one side (and the UNet
    share of the fastest round, when the side reports one)."""
    fastest = max(rounds, key=lambda r: r["steps_per_s"])
    row = {
        "steps_per_s": fastest["steps_per_s"],
        "wall_s": min(r["wall_s"] for r in rounds),
        "peak_mb": min(r["peak_mb"] for r in rounds),
    }
    return row | ({"unet_share": fastest["unet_share"]} if "unet_share" in fastest else {})


def compare(model: Path, images: Path, root: Path, *, batch: int, repeats: int, steps: int) -> dict[str, Any]:
    """Alternate the two sides ``repeats`` times at one batch size; the best round of each side."""
    common = {"steps": steps, "batch": batch, "rank": 4, "lr": 1e-4, "seed": 0}
    rounds: dict[str, list[dict[str, Any]]] = {"atelier": [], "reference": []}
    for k in range(repeats):
        out = root / f"out-b{batch}-{k}"
        rounds["atelier"].append(measure(lambda out=out: atelier_run(model, images, out, **common)))
        rounds["reference"].append(measure(lambda: reference_loop(model, images, **common)))
    return {side: best(rounds[side]) for side in rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke run)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per side (default 40, quick 8)"
    )
    parser.add_argument(
        "--batch", type=int, nargs="+", default=None, help="batch sizes to compare (default 1 2 4, quick 2)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    parser.add_argument(
        "--repeats", type=int, default=None, help="rounds per side, best kept (default 2, quick 1)"
    )
    args = parser.parse_args(argv)
    steps = args.steps or (8 if args.quick else 40)
    batches = args.batch or ([2] if args.quick else [1, 2, 4])
    if min(batches) <= 0 or steps <= 0:
        parser.error("--batch and --steps must be positive")
    torch.set_num_threads(args.threads)
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="atelier-bench-train-") as tmp:
        root = Path(tmp)
        installed = default_base_model()
        model = installed if installed is not None else toyworld_architecture(root / "model")
        images = subject_images(root / "subject")
        for batch in batches:
            results[batch] = compare(
                model,
                images,
                root,
                batch=batch,
                repeats=args.repeats or (1 if args.quick else 2),
                steps=steps,
            )
    what = (
        "toy world"
        if installed is not None
        else "toy-world architecture, random weights (toy world not installed)"
    )
    print(f"model: {what}; {steps} steps, LoRA r=4 on 'vo', {args.threads} thread(s), CPU")
    print(f"{'batch':>5}  {'side':26}{'steps/s':>10}{'wall s':>10}{'peak RSS +MB':>14}")
    for batch, sides in results.items():
        for name, side in (("Atelier train()", "atelier"), ("diffusers+PEFT reference", "reference")):
            row = sides[side]
            print(
                f"{batch:>5}  {name:26}{row['steps_per_s']:>10.2f}{row['wall_s']:>10.1f}{row['peak_mb']:>14.1f}"
            )
    for batch, sides in results.items():
        atelier, reference = sides["atelier"], sides["reference"]
        speedup = atelier["steps_per_s"] / reference["steps_per_s"]
        memory = reference["peak_mb"] / atelier["peak_mb"] if atelier["peak_mb"] > 0 else float("inf")
        print(
            f"batch {batch}: speed ratio (Atelier / reference) {speedup:.2f}x "
            f"[target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}]; "
            f"peak RSS growth ratio (reference / Atelier) {memory:.2f}x; "
            f"wall-time ratio incl. setup (reference / Atelier) {reference['wall_s'] / atelier['wall_s']:.2f}x"
        )
        share = reference["unet_share"]
        print(
            f"batch {batch}: the reference spends {100 * share:.1f}% of its loop in the UNet forward/backward; "
            f"a loop that kept only that part would be {1 / share:.2f}x (the ceiling of caching and loop work; "
            f"past it only a faster UNet pass helps)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
