"""Everything checked before a DreamBooth run writes a single byte.

``preflight`` turns a ``TrainConfig`` into a ``RunPlan``: options validated, the base model loaded,
the adapter family's hyperparameters checked against the real layer shapes (BOFT blocks dividing the
width, HRA rank parity, KronA factors, ...), the targets resolved, every subject image opened and
checked, the resume checkpoint found and matched to this run, the base-model profile picked
(``models.profiles``) and every option left unset filled from it (``training.defaults``), then the seed. Any problem raises one of the "bad input" errors listed in
``INPUT_ERRORS`` — the CLI turns those into a message and exit code 2 — and leaves existing outputs
untouched, because nothing has been written yet.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from models.adapters import FAMILIES, AdapterConfigError, resolve_targets
from models.adapters.targets import layer_shapes
from models.pipelines import ModelLoadError, default_base_model, load_pipeline, unet_fingerprint
from models.profiles import Profile, ProfileError, get_profile, profile_for_pipeline, profile_for_spec
from training.checkpoints import Checkpoint, CheckpointError, load_checkpoint, resolve_resume
from training.config import ConfigError, TrainConfig
from training.data import ImageDataError, TrainingImage, load_training_images
from training.defaults import apply_profile
from training.prior import existing_class_images

INPUT_ERRORS = (
    ConfigError,
    ImageDataError,
    ModelLoadError,
    AdapterConfigError,
    CheckpointError,
    ProfileError,
)
"""Errors that mean "the input is wrong" (CLI exit code 2), as opposed to a failure during training."""

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunPlan:
    """A checked, fully resolved training run (defaults filled in) and the loaded base model."""

    config: TrainConfig
    given: TrainConfig
    """The options as the user gave them (before the profile filled the rest)."""
    profile: Profile
    pipe: DiffusionPipeline
    base_model: str
    fingerprint: str
    adapter_config: Any
    targets: list[str]
    instance_images: list[TrainingImage]
    checkpoint: Checkpoint | None
    weight_dtype: torch.dtype
    use_xformers: bool
    use_8bit_adam: bool
    report_to: str | None
    resume_note: str | None = None
    """How the run began, for the log and the model card: resumed from which checkpoint, or why not."""

    def run_identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this run."""
        return {
            "family": self.config.adapter,
            "adapter_config": self.adapter_config.to_dict(),
            "targets": self.targets,
            "fingerprint": self.fingerprint,
            "seed": self.config.seed,
        }


def build_adapter_config(config: TrainConfig) -> Any:
    """The family's config: its defaults overridden by ``config.adapter_config`` (checked on its own)."""
    family = FAMILIES[config.adapter]
    known = {f.name for f in dataclasses.fields(family.config_cls)}
    unknown = sorted(set(config.adapter_config) - known)
    if unknown:
        raise ConfigError(
            f"{config.adapter} has no hyperparameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return family.config_cls.from_dict({**family.default_config().to_dict(), **config.adapter_config})
    except (AdapterConfigError, TypeError) as exc:
        raise ConfigError(f"invalid {config.adapter} hyperparameters: {exc}") from exc


def base_model_spec(config: TrainConfig) -> str:
    if config.pretrained_model_name_or_path:
        return config.pretrained_model_name_or_path
    default = default_base_model()
    if default is None:
        raise ConfigError(
            "no --pretrained_model_name_or_path given and the toy world is not installed under assets/; "
            "pass a diffusers folder, a single .safetensors file or a hub id"
        )
    return str(default)


def _resolution(config: TrainConfig, pipe: DiffusionPipeline) -> int:
    native = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    resolution = config.resolution or native
    if resolution % pipe.vae_scale_factor:
        raise ConfigError(
            f"--resolution {resolution} must be a multiple of the VAE factor {pipe.vae_scale_factor}; "
            f"the model's native size is {native}"
        )
    return resolution


def _optional_feature(
    asked: bool, module: str, what: str, fallback: str, device: torch.device, *, by_profile: bool = False
) -> bool:
    """Whether to use an optional GPU feature; a missing package is a warning when the user asked for the
    feature and an info line when only the profile did (it offers the feature where installed)."""
    if not asked:
        return False
    if importlib.util.find_spec(module) is None:
        log = logging.getLogger(__name__).info if by_profile else logging.getLogger(__name__).warning
        log("%s asked for, but %s is not installed: using %s.", what, module, fallback)
        return False
    if device.type != "cuda":
        logging.getLogger(__name__).warning(
            "%s needs a CUDA GPU (device is %s): using %s.", what, device, fallback
        )
        return False
    return True


def report_target(config: TrainConfig) -> str | None:
    """The accelerate tracker for ``--report_to``, or None (with a log line when it is not installed)."""
    if config.report_to == "none":
        return None
    if importlib.util.find_spec(config.report_to) is None:
        logging.getLogger(__name__).warning(
            "--report_to %s: %s is not installed; only train_log.jsonl is written.",
            config.report_to,
            config.report_to,
        )
        return None
    return config.report_to


def load_with_profile(
    config: TrainConfig, device: torch.device, *, check: bool = True
) -> tuple[TrainConfig, DiffusionPipeline, str]:
    """Pick the profile, fill ``config``'s unset options from it and load the base model in the resulting
    precision: (resolved config, pipeline, model spec). A diffusers folder's profile is read from its config
    files; a hub id or single file is loaded first and then cast. ``check=False`` skips the option checks
    (``--show-defaults`` needs no subject images)."""
    spec = base_model_spec(config)
    cuda = device.type == "cuda"
    profile = profile_for_spec(spec, config.profile)
    pipe = None
    if profile is None:
        pipe = load_pipeline(spec, device=device, dtype=torch.float32, config=config.base_config)
        profile = profile_for_pipeline(pipe)
    resolved = apply_profile(config, profile, cuda=cuda)
    if check:
        resolved.validate()
    if resolved.mixed_precision == "fp16" and not cuda:
        raise ConfigError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 or no")
    weight_dtype = _DTYPES[resolved.mixed_precision]
    pipe = (
        load_pipeline(spec, device=device, dtype=weight_dtype, config=config.base_config)
        if pipe is None
        else pipe.to(dtype=weight_dtype)
    )
    return dataclasses.replace(resolved, resolution=_resolution(resolved, pipe)), pipe, spec


def preflight(config: TrainConfig, device: torch.device, *, rank: int = 0) -> RunPlan:
    """Check ``config`` completely and load the base model; raise an ``INPUT_ERRORS`` error on bad input."""
    config.validate()
    adapter_config = build_adapter_config(config)
    check_output_dir(config.output_dir)
    resume_from = resolve_resume(config.resume_from_checkpoint, config.output_dir)
    resume_note = None
    if resume_from is not None:
        resume_note = f"resumed from {resume_from}"
    elif config.resume_from_checkpoint == "latest":
        resume_note = (
            f"--resume_from_checkpoint latest found no checkpoint in {config.output_dir}: started at step 0"
        )
        logging.getLogger(__name__).warning(resume_note)
    checkpoint = load_checkpoint(resume_from, rank=rank) if resume_from is not None else None
    checkpoint_run = checkpoint.run if checkpoint is not None else None
    filled, pipe, spec = load_with_profile(config, device)
    weight_dtype = _DTYPES[filled.mixed_precision]
    resolution = filled.resolution
    try:
        targets = resolve_targets(pipe.unet, filled.targets)
        adapter_config.validate(layer_shapes(pipe.unet, targets))
    except AdapterConfigError as exc:
        raise ConfigError(f"--adapter {config.adapter} with --targets {filled.targets}: {exc}") from exc
    seed = config.seed
    if seed is None:
        seed = checkpoint_run["seed"] if checkpoint_run else secrets.randbelow(2**31)
    instance_images = load_training_images(
        config.instance_data_dir, resolution, center_crop=config.center_crop, seed=seed
    )
    resolved = dataclasses.replace(
        filled,
        seed=seed,
        validation_prompt=config.validation_prompt or config.instance_prompt,
        adapter_config=adapter_config.to_dict(),
    )
    plan = RunPlan(
        config=resolved,
        given=config,
        profile=get_profile(filled.profile),
        pipe=pipe,
        base_model=spec,
        fingerprint=unet_fingerprint(pipe.unet),
        adapter_config=adapter_config,
        targets=targets,
        instance_images=instance_images,
        checkpoint=checkpoint,
        weight_dtype=weight_dtype,
        use_xformers=_optional_feature(
            resolved.enable_xformers_memory_efficient_attention,
            "xformers",
            "xformers attention",
            "PyTorch SDPA",
            device,
            by_profile=config.enable_xformers_memory_efficient_attention is None,
        ),
        use_8bit_adam=_optional_feature(
            resolved.use_8bit_adam,
            "bitsandbytes",
            "8-bit Adam",
            "torch AdamW",
            device,
            by_profile=config.use_8bit_adam is None,
        ),
        report_to=report_target(config),
        resume_note=resume_note,
    )
    if checkpoint_run is not None:
        _check_same_run(checkpoint_run, plan.run_identity(), resume_from)
    if checkpoint is not None and resolved.use_ema and checkpoint.ema is None:
        raise CheckpointError(
            f"checkpoint {resume_from} holds no moving average (it was written without --use_ema); resume "
            "without --use_ema or start a new output_dir"
        )
    if resolved.with_prior_preservation:
        existing = existing_class_images(resolved.class_dir)[: resolved.num_class_images]
        if existing:
            load_training_images(existing, resolution, center_crop=True, seed=seed)
    return plan


def check_output_dir(output_dir: str | Path) -> None:
    """``ConfigError`` unless ``output_dir`` is (or can be created as) a writable folder; writes nothing."""
    path = Path(output_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise ConfigError(f"--output_dir {path} {where}; pass a folder (it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--output_dir {path}: {existing} is not writable for this user; pass a folder you can write to"
        )


def _check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path | None) -> None:
    for key in ("family", "targets", "adapter_config", "fingerprint"):
        if saved.get(key) != current[key]:
            raise CheckpointError(
                f"checkpoint {path} was made with a different {key.replace('_', ' ')} "
                f"({saved.get(key)!r} vs {current[key]!r}); resume with the original options or start a new output_dir"
            )
