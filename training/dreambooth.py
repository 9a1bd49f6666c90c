"""DreamBooth adapter training: ``train(config, progress, cancel)``, the one engine for CLI, app and multi-GPU.

Implements DreamBooth (Ruiz et al., 2023) with a parameter-efficient adapter in the UNet's attention
(LoRA, DiffuseKronA, BOFT or HRA from ``models.adapters``), written against accelerate so the same
code runs on a CPU, one GPU, or data-parallel on many:

    python -m training.dreambooth --instance_data_dir photos/ --instance_prompt "a photo of sks dog"
    accelerate launch --multi_gpu --num_processes 2 -m training.dreambooth --instance_data_dir photos/ ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m training.dreambooth ...  # 2 CPU procs, gloo

The loop reads top to bottom: preflight (every check, the base-model profile's defaults filled in, nothing
written) → class images for prior
preservation → attach the adapter → cache text embeddings and latents → optimiser and schedule →
resume → steps (loss, backward, step, log, validate, checkpoint, cancel) → adapter file, exports and
model card. Only the main process writes files.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import ProjectConfiguration, gather_object, parse_flag_from_env, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params

from models.adapters import attach
from models.adapters.handle import AdapterHandle
from models.adapters.lean_lora import lean_lora_forward
from training.checkpoints import capture_rng, remove_leftovers, restore_rng, save_checkpoint
from training.conditioning import TrainingSet
from training.config import TrainConfig, lr_factor
from training.data import load_training_images
from training.defaults import resolved_options
from training.ema import AdapterEMA
from training.objective import denoising_loss
from training.outputs import OutputWriteError, write_final_outputs
from training.preflight import RunPlan, preflight, report_target
from training.prior import ensure_class_images, existing_class_images
from training.sampling import CLASS_STREAM, INSTANCE_STREAM, micro_batch_generator, sample_indices
from training.train_log import TrainLog
from training.validation import sample_images, save_grid

logger = logging.getLogger(__name__)

ProgressFn = Callable[..., None]
"""``progress(step, total, loss=, lr=, eta=, validation_images=)`` — called on the main process after each step."""


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped without saving the broken adapter."""


@dataclass
class TrainResult:
    """What a finished (or cancelled) run produced."""

    adapter_path: Path | None
    output_dir: Path
    steps: int
    final_loss: float | None
    cancelled: bool = False
    checkpoint_path: Path | None = None
    validation_images: list[Path] = field(default_factory=list)
    log_path: Path | None = None
    seconds: float = 0.0
    steps_per_second: float = 0.0
    trainable_parameters: int = 0
    num_processes: int = 1
    exports: dict[str, Path] = field(default_factory=dict)


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An ``Accelerator`` for this run. In a single process, a run with a different mixed precision
    than the previous run in the same process (the web app) resets accelerate's process-wide state."""
    kwargs: dict[str, Any] = {
        "mixed_precision": config.mixed_precision,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "log_with": report_target(config),
        "project_config": ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"
        ),
    }
    try:
        return Accelerator(**kwargs)
    except ValueError:
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)


def _class_images(plan: RunPlan, accelerator: Accelerator, progress: ProgressFn | None) -> list:
    cfg = plan.config
    if not cfg.with_prior_preservation:
        return []
    if accelerator.is_main_process:
        ensure_class_images(
            plan.pipe,
            cfg.class_dir,
            cfg.class_prompt or "",
            cfg.num_class_images,
            resolution=cfg.resolution,
            seed=cfg.seed,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            progress=(lambda done, total: progress(0, cfg.max_train_steps, class_images=(done, total)))
            if progress
            else None,
        )
    accelerator.wait_for_everyone()
    files = existing_class_images(cfg.class_dir)[: cfg.num_class_images]
    return load_training_images(files, cfg.resolution, center_crop=True, seed=cfg.seed)


def _param_groups(handle: AdapterHandle, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The adapter's parameters grouped by learning-rate factor (`TrainConfig.lr_multipliers`), the
    full-rate group first; each group's ``lr`` is the peak rate times its factor."""
    by_factor: dict[float, list[torch.nn.Parameter]] = {}
    for name, params in handle.parameters_by_layer().items():
        by_factor.setdefault(lr_factor(name, cfg.lr_multipliers), []).extend(params)
    order = sorted(by_factor, key=lambda factor: (factor != 1.0, -factor))
    return [{"params": by_factor[f], "lr": cfg.learning_rate * f, "lr_factor": f} for f in order]


def _optimizer(plan: RunPlan, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    cfg = plan.config
    kwargs = {
        "lr": cfg.learning_rate,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "weight_decay": cfg.adam_weight_decay,
        "eps": cfg.adam_epsilon,
    }
    if plan.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    try:  # one fused kernel instead of a Python loop over the many small adapter tensors
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.AdamW(params, **kwargs)


def _peak_relative_lr(current: list[float], groups: list[dict[str, Any]]) -> float:
    """The schedule's learning rate for factor-1 layers (what the log and progress report), from the groups'
    current rates."""
    return next(
        (lr / g["lr_factor"] for lr, g in zip(current, groups, strict=True) if g["lr_factor"] > 0), 0.0
    )


def _cancel_requested(cancel: CancelFlag | None, accelerator: Accelerator) -> bool:
    wanted = torch.tensor([1.0 if cancel is not None and cancel.is_set() else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        wanted = accelerator.reduce(wanted, reduction="sum")
    return bool(wanted.item() > 0)


def _check_finite(loss: torch.Tensor, step: int, accelerator: Accelerator, cfg: TrainConfig) -> None:
    values = accelerator.gather(loss.detach().float().reshape(1))
    if not torch.isfinite(values).all():
        precision = "" if cfg.mixed_precision == "no" else " or train with --mixed_precision no"
        raise TrainingDivergedError(
            f"the loss became {values.tolist()} at step {step + 1}; training stopped and nothing from this step "
            f"was saved. Lower --learning_rate (now {cfg.learning_rate:g}){precision}, then start again or resume "
            "from an earlier checkpoint with --resume_from_checkpoint."
        )


def _save_checkpoint(
    plan: RunPlan,
    accelerator: Accelerator,
    handle: Any,
    optimizer: Any,
    lr_scheduler: Any,
    step: int,
    ema: AdapterEMA | None,
) -> Path | None:
    rng_tensors, rng_values = capture_rng()
    all_rng = gather_object([rng_tensors])
    path = None
    if accelerator.is_main_process:
        path = save_checkpoint(
            plan.config.output_dir,
            step,
            adapter=handle.state_dict(),
            optimizer=optimizer.state_dict(),
            lr_scheduler=lr_scheduler.state_dict(),
            rng_tensors=all_rng,
            rng_values=rng_values,
            run=plan.run_identity(),
            total_limit=plan.config.checkpoints_total_limit,
            ema=ema.state_tensors() if ema is not None else None,
        )
    accelerator.wait_for_everyone()
    return path


def _validate(plan: RunPlan, accelerator: Accelerator, step: int, ema: AdapterEMA | None) -> Path | None:
    cfg = plan.config
    path = None
    if accelerator.is_main_process:
        with accelerator.autocast(), ema.averaged() if ema is not None else nullcontext():
            images = sample_images(
                plan.pipe,
                cfg.validation_prompt or cfg.instance_prompt,
                cfg.num_validation_images,
                resolution=cfg.resolution,
                seed=cfg.seed,
                num_inference_steps=cfg.num_inference_steps,
                guidance_scale=cfg.guidance_scale,
            )
        path = save_grid(images, Path(cfg.output_dir) / "validation" / f"step-{step}.png")
    accelerator.wait_for_everyone()
    return path


def train(
    config: TrainConfig, progress: ProgressFn | None = None, cancel: CancelFlag | None = None
) -> TrainResult:
    """Train one DreamBooth adapter as ``config`` says; see the module docstring for the stages.

    Bad input raises an error from ``training.preflight.INPUT_ERRORS`` before anything is written;
    a diverging loss raises ``TrainingDivergedError``; a file that cannot be written (a full disk) raises
    ``OutputWriteError``, naming the newest intact checkpoint; ``cancel.is_set()`` stops at the next step
    boundary and writes a resumable checkpoint (the result has ``cancelled=True``).
    """
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator would create it
    plan = preflight(config, state.device, rank=state.process_index)
    accelerator = make_accelerator(plan.config)
    try:
        return _run(plan, accelerator, progress, cancel)
    except OSError as exc:
        raise OutputWriteError.from_os_error(exc, plan.config.output_dir) from exc


def _run(
    plan: RunPlan, accelerator: Accelerator, progress: ProgressFn | None, cancel: CancelFlag | None
) -> TrainResult:
    """The stages after preflight, top to bottom (see the module docstring)."""
    cfg, pipe = plan.config, plan.pipe
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in remove_leftovers(out):
            logger.info("removed %s, left half-written by an interrupted run", leftover)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    class_images = _class_images(plan, accelerator, progress)

    # Adapter: identical initialisation on every process, adapter weights in fp32 under mixed precision.
    set_seed(cfg.seed)
    unet = pipe.unet
    handle = attach(unet, cfg.adapter, plan.adapter_config, plan.targets)
    lean_lora_forward(unet)  # PEFT's LoRA layers without their per-call bookkeeping (same sums)
    if plan.weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if plan.use_xformers:
        unet.enable_xformers_memory_efficient_attention()
    # NHWC convolutions suit CUDA tensor cores; on CPU they cost time at batch >= 2 (toy world: 36.4 against
    # 35.0 ms a step at batch 2, docs/benchmarks.md), so the UNet stays contiguous there.
    if accelerator.device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    params = handle.trainable_parameters()
    ema = AdapterEMA(params, cfg.ema_decay) if cfg.use_ema else None

    train_set = TrainingSet(
        pipe,
        plan.instance_images,
        cfg.instance_prompt,
        class_images,
        cfg.class_prompt,
        cfg.resolution,
        device=accelerator.device,
        cache_latents=cfg.cache_latents,
        random_flip=cfg.random_flip,
    )
    groups = _param_groups(handle, cfg)
    optimizer = _optimizer(plan, groups)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.max_train_steps,
    )
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    model, optimizer = accelerator.prepare(unet, optimizer)
    set_seed(cfg.seed, device_specific=True)

    start_step = 0
    if plan.checkpoint is not None:
        handle.load_state_dict(plan.checkpoint.adapter)
        optimizer.load_state_dict(plan.checkpoint.optimizer)
        lr_scheduler.load_state_dict(plan.checkpoint.lr_scheduler)
        restore_rng(plan.checkpoint.rng["tensors"], plan.checkpoint.rng["values"])
        start_step = plan.checkpoint.step
        if ema is not None and plan.checkpoint.ema is not None:
            ema.load_state_tensors(plan.checkpoint.ema)
        logger.info("resumed from %s at step %d", plan.checkpoint.path, start_step)
    header = {"profile": plan.profile.name, "options": resolved_options(plan.given, cfg)}
    log = (
        TrainLog(out / "train_log.jsonl", resume_step=start_step, header=header)
        if accelerator.is_main_process
        else None
    )
    if plan.report_to:
        accelerator.init_trackers(
            "atelier-dreambooth", config={"adapter": cfg.adapter, "lr": cfg.learning_rate}
        )

    total, accum = cfg.max_train_steps, cfg.gradient_accumulation_steps
    world, rank = accelerator.num_processes, accelerator.process_index
    step, last_loss, started = start_step, None, time.perf_counter()
    validation_images: list[Path] = []
    checkpoint_path, cancelled = None, False
    model.train()
    while step < total:
        if _cancel_requested(cancel, accelerator):
            checkpoint_path = _save_checkpoint(plan, accelerator, handle, optimizer, lr_scheduler, step, ema)
            cancelled = True
            break
        losses: list[list[float]] = []  # per micro-batch: total, instance, prior
        for micro in range(accum):
            k = step * accum + micro
            gen = micro_batch_generator(cfg.seed, k, rank)
            pick = dict(
                micro_batch=k, rank=rank, world_size=world, batch_size=cfg.train_batch_size, seed=cfg.seed
            )
            instance_ids = sample_indices(len(train_set.instance), stream=INSTANCE_STREAM, **pick)
            class_ids = (
                sample_indices(len(train_set.classes), stream=CLASS_STREAM, **pick) if class_images else []
            )
            count = len(instance_ids) + len(class_ids)
            flips = (torch.rand(count, generator=gen) < 0.5).tolist() if cfg.random_flip else [False] * count
            with accelerator.accumulate(model):
                batch = train_set.batch(instance_ids, class_ids, flips, gen)
                parts = denoising_loss(
                    model,
                    noise_scheduler,
                    batch,
                    gen,
                    noise_offset=cfg.offset,
                    snr_gamma=cfg.snr,
                    prior_loss_weight=cfg.prior_loss_weight,
                )
                loss = parts.total
                regularizer = handle.regularization_loss()
                if regularizer is not None:
                    loss = loss + regularizer
                _check_finite(loss, step, accelerator, cfg)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append([loss.item(), parts.instance, parts.prior if parts.prior is not None else 0.0])
        lr = _peak_relative_lr(lr_scheduler.get_last_lr(), groups)
        lr_scheduler.step()
        if ema is not None:
            ema.step()
        step += 1
        means = accelerator.gather(torch.tensor(losses, device=accelerator.device).mean(dim=0, keepdim=True))
        last_loss, instance_loss, prior_loss = means.mean(
            dim=0
        ).tolist()  # averaged over micro-batches, processes
        elapsed = time.perf_counter() - started
        eta = elapsed / (step - start_step) * (total - step)
        new_images = []
        if cfg.validation_steps and step % cfg.validation_steps == 0 and step < total:
            new_images.append(_validate(plan, accelerator, step, ema))
        if step % cfg.checkpointing_steps == 0:
            checkpoint_path = _save_checkpoint(plan, accelerator, handle, optimizer, lr_scheduler, step, ema)
        if accelerator.is_main_process:
            row = {"step": step, "loss": last_loss, "lr": lr, "time": round(elapsed, 4)}
            if class_images:
                row |= {"instance_loss": instance_loss, "prior_loss": prior_loss}
            log.write(**row)
            validation_images += [p for p in new_images if p]
            if progress is not None:
                progress(
                    step,
                    total,
                    loss=last_loss,
                    lr=lr,
                    eta=eta,
                    validation_images=[p for p in new_images if p],
                )
        if plan.report_to:
            accelerator.log({"loss": last_loss, "lr": lr}, step=step)

    seconds = time.perf_counter() - started
    rate = (step - start_step) / seconds if seconds > 0 and step > start_step else 0.0
    result = TrainResult(
        adapter_path=None,
        output_dir=out,
        steps=step,
        final_loss=last_loss,
        cancelled=cancelled,
        checkpoint_path=checkpoint_path,
        validation_images=validation_images,
        log_path=out / "train_log.jsonl",
        seconds=seconds,
        steps_per_second=rate,
        trainable_parameters=handle.num_parameters(),
        num_processes=world,
    )
    if not cancelled:
        if ema is not None:
            ema.copy_to_live()  # the adapter file holds the average
        final_grid = _validate(plan, accelerator, step, None) if cfg.num_validation_images else None
        if final_grid is not None:
            result.validation_images.append(final_grid)
            if progress is not None:
                progress(
                    step,
                    total,
                    loss=last_loss,
                    lr=lr_scheduler.get_last_lr()[0],
                    eta=0.0,
                    validation_images=[final_grid],
                )
        if accelerator.is_main_process:
            result.adapter_path, result.exports = write_final_outputs(plan, handle, result, final_grid)
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.dreambooth``: exit 0 on success, 2 on bad input, 1 when training fails, 130 when cancelled."""
    from training.cli import run_cli

    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
