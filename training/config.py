"""``TrainConfig``: the one description of a DreamBooth adapter training run.

The CLI (``training.cli``), the web app and the tests all build a ``TrainConfig`` and hand it to
``training.dreambooth.train``. Field names follow diffusers' ``train_dreambooth_lora.py`` flags
(DreamBooth: Ruiz et al., 2023), so a diffusers user recognises every option; the adapter family
(LoRA, DiffuseKronA, BOFT, HRA) and its hyperparameters come from ``models.adapters``.

``validate()`` checks everything that can be checked without loading a model, with one clear
message per problem; checks that need the UNet's layer shapes (BOFT block size dividing the
width, KronA factors dividing it, ...) run in ``training.preflight`` before any output is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb")


class ConfigError(ValueError):
    """A training option is missing, out of range or contradicts another one."""


@dataclass(frozen=True)
class FamilyTrainingDefaults:
    """Per-family optimiser defaults (the papers' SD ratios, scaled to the toy world's step counts)."""

    learning_rate: float
    max_train_steps: int
    source: str
    snr_gamma: float | None = None
    """Min-SNR loss weighting γ (Hang et al. 2023) unless the run sets its own; None = off."""
    noise_offset: float = 0.0
    """Offset-noise std unless the run sets its own; 0 = plain Gaussian noise."""
    prior_loss_weight: float = 1.0
    """Weight of the prior-preservation loss unless the run sets its own (DreamBooth's λ)."""


FAMILY_TRAINING_DEFAULTS: dict[str, FamilyTrainingDefaults] = {
    "lora": FamilyTrainingDefaults(
        5e-3, 800, "LoRA-DreamBooth: lr 1e-4, 500 steps on SD; toy world: 5e-3, 800"
    ),
    "krona": FamilyTrainingDefaults(
        5e-3, 1200, "DiffuseKronA: lr 5e-4..1e-3, 500 steps on SDXL; toy world: 5e-3, 1200"
    ),
    "boft": FamilyTrainingDefaults(
        5e-3,
        1400,
        "BOFT/OFT DreamBooth: lr 3e-5..6e-5 on SD; toy world: 5e-3, 1400, min-SNR 5",
        snr_gamma=5.0,
    ),
    "hra": FamilyTrainingDefaults(
        1e-2,
        800,
        "HRA DreamBooth: lr ~5e-3 range on SD; toy world: 1e-2, 800, offset noise 0.075, prior-loss weight 1.5",
        noise_offset=0.075,
        prior_loss_weight=1.5,
    ),
}
"""Learning rate, steps and loss options per family. The SD settings the papers use are quoted; the values
are the toy-world tuning (32 px, batch 8, prior preservation, the held-out colour purple, measured by
``python -m training.quality`` over several training seeds), where the tiny UNet needs a much larger step
size than SD. Every setting tried and what it measured is in ``docs/training_quality.md``."""


def _lr_multiplier_problems(multipliers: Any) -> list[str]:
    if not isinstance(multipliers, dict):
        return [f'--lr_multipliers must be a JSON object such as {{"attn1": 0.25}} (got {multipliers!r})']
    out = []
    for pattern, factor in multipliers.items():
        try:
            re.compile(pattern)
        except re.error as error:
            out.append(f"--lr_multipliers pattern {pattern!r} is not a regular expression: {error}")
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 <= factor < math.inf:
            out.append(f"--lr_multipliers {pattern!r}: the factor must be a number >= 0 (got {factor!r})")
    return out


def lr_factor(module_name: str, multipliers: dict[str, float]) -> float:
    """The learning-rate factor of an adapted module: the first `multipliers` pattern found in its name."""
    return next((float(f) for p, f in multipliers.items() if re.search(p, module_name)), 1.0)


def _opt(help_text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": help_text}, **kwargs)


@dataclass
class TrainConfig:
    """Every option of a DreamBooth adapter training run. ``None`` means "use the documented default"."""

    # --- base model and data -------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = _opt(
        "Base model: hub id, local diffusers folder or single .safetensors/.ckpt file. Default: the toy world.",
        default=None,
    )
    instance_data_dir: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Folder of subject images, or a list of image files (JPEG/PNG/WebP). A <image>.txt next "
            "to an image replaces the instance prompt for that image."
        },
    )
    instance_prompt: str = _opt("Prompt with the trigger phrase, e.g. 'a photo of sks dog'.", default="")
    trigger_phrase: str | None = _opt(
        "The phrase that summons the subject, stored in the adapter file. Default: the instance prompt.",
        default=None,
    )
    class_data_dir: str | None = _opt(
        "Folder of class images for prior preservation; missing images are generated by the base model "
        "and cached there. Default: <output_dir>/class_images.",
        default=None,
    )
    class_prompt: str | None = _opt("Prompt for the class, e.g. 'a photo of a dog'.", default=None)
    with_prior_preservation: bool = _opt("Add the prior-preservation loss on class images.", default=False)
    prior_loss_weight: float | None = _opt(
        "Weight of the prior-preservation loss. Default: the family's (1.0 unless listed under the per-family "
        "defaults).",
        default=None,
    )
    num_class_images: int = _opt("Number of class images (generated when the folder has fewer).", default=100)
    resolution: int | None = _opt(
        "Training resolution in pixels (multiple of 8). Default: the base model's native size.", default=None
    )
    center_crop: bool = _opt("Centre crop after resizing (default: seeded random crop).", default=False)
    random_flip: bool = _opt("Randomly flip images horizontally.", default=False)
    # --- adapter ---------------------------------------------------------------------------------------
    adapter: str = _opt("Adapter family: lora, krona, boft or hra.", default="lora")
    targets: str | list[str] = field(
        default="vo",
        metadata={"help": "Target preset (vo, qkvo, cross-vo, all-linear) or module-name patterns."},
    )
    adapter_config: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Family hyperparameters overriding the family defaults (e.g. {'rank': 8})."},
    )
    # --- optimisation ----------------------------------------------------------------------------------
    output_dir: str = _opt(
        "Where the adapter, checkpoints, samples and logs go.", default="outputs/dreambooth"
    )
    train_batch_size: int = _opt("Instance images per step and process.", default=1)
    gradient_accumulation_steps: int = _opt("Micro-batches accumulated per optimiser step.", default=1)
    max_train_steps: int | None = _opt("Optimiser steps. Default: per family (see --help).", default=None)
    learning_rate: float | None = _opt("Peak learning rate. Default: per family (see --help).", default=None)
    lr_scheduler: str = _opt(f"Learning-rate schedule: {', '.join(LR_SCHEDULERS)}.", default="constant")
    lr_warmup_steps: int = _opt("Linear warm-up steps (every schedule but constant).", default=0)
    lr_multipliers: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "Per-layer learning-rate factors, kohya's block learning rates by module name: "
            'JSON {"pattern": factor}, a pattern being a regular expression searched in each adapted '
            'module\'s name, the first match winning, e.g. {"attn1": 0.25} (self-attention), '
            '{"^down_blocks": 0.5}. Unmatched layers keep the full rate; factor 0 freezes a layer.'
        },
    )
    adam_beta1: float = _opt("AdamW beta1.", default=0.9)
    adam_beta2: float = _opt("AdamW beta2.", default=0.999)
    adam_weight_decay: float = _opt("AdamW weight decay.", default=1e-2)
    adam_epsilon: float = _opt("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _opt("Gradient clipping norm (0 disables).", default=1.0)
    use_8bit_adam: bool = _opt(
        "bitsandbytes 8-bit AdamW (falls back to torch AdamW if missing).", default=False
    )
    snr_gamma: float | None = _opt(
        "Min-SNR loss weighting gamma (5.0 is the paper's value); 0 turns it off. Default: the family's "
        "(listed under the per-family defaults).",
        default=None,
    )
    noise_offset: float | None = _opt(
        "Std of a per-image, per-channel constant added to the training noise ('offset noise'); 0 disables. "
        "Default: the family's (listed under the per-family defaults).",
        default=None,
    )
    use_ema: bool = _opt(
        "Keep an exponential moving average of the adapter weights; validation grids and the saved adapter "
        "use it.",
        default=False,
    )
    ema_decay: float = _opt(
        "Decay of the moving average (--use_ema), warmed up as in diffusers.", default=0.99
    )
    # --- performance -----------------------------------------------------------------------------------
    mixed_precision: str = _opt("no, fp16 (GPU) or bf16. Adapter weights stay fp32.", default="no")
    gradient_checkpointing: bool = _opt("Recompute UNet activations to save memory.", default=False)
    enable_xformers_memory_efficient_attention: bool = _opt(
        "Use xformers attention (falls back to PyTorch SDPA if missing).", default=False
    )
    cache_latents: bool = _opt("Encode images with the VAE once instead of every step.", default=True)
    # --- checkpoints, validation, logging --------------------------------------------------------------
    checkpointing_steps: int = _opt("Write checkpoint-N/ every N steps.", default=500)
    checkpoints_total_limit: int | None = _opt("Keep at most this many checkpoints.", default=None)
    resume_from_checkpoint: str | None = _opt("A checkpoint folder, or 'latest' in output_dir.", default=None)
    validation_prompt: str | None = _opt(
        "Prompt for validation grids (default: the instance prompt).", default=None
    )
    num_validation_images: int = _opt("Images per validation grid.", default=4)
    validation_steps: int = _opt(
        "Write validation/step-N.png every N steps (0: only at the end).", default=100
    )
    num_inference_steps: int = _opt("Denoising steps for validation and class images.", default=25)
    guidance_scale: float = _opt("Classifier-free guidance for validation and class images.", default=7.5)
    seed: int | None = _opt(
        "Seed for crops, sampling, noise and validation. Default: drawn and logged.", default=None
    )
    report_to: str = _opt(
        "Extra tracker: none, tensorboard or wandb (train_log.jsonl is always written).", default="none"
    )

    # --------------------------------------------------------------------------------------------------
    @property
    def family_defaults(self) -> FamilyTrainingDefaults:
        return FAMILY_TRAINING_DEFAULTS[self.adapter]

    def _in_effect(self, name: str) -> Any:
        """Option ``name`` as given, or the family's default of the same name when it is None."""
        given = getattr(self, name)
        return given if given is not None else getattr(self.family_defaults, name)

    @property
    def steps(self) -> int:
        """Optimiser steps, the family default when not given."""
        return self._in_effect("max_train_steps")

    @property
    def lr(self) -> float:
        """Peak learning rate, the family default when not given."""
        return self._in_effect("learning_rate")

    @property
    def snr(self) -> float | None:
        """Min-SNR γ in effect: the given value (0 = off) or the family default."""
        return self._in_effect("snr_gamma") or None

    @property
    def offset(self) -> float:
        """Offset-noise std in effect: the given value or the family default (0 = off)."""
        return self._in_effect("noise_offset")

    @property
    def prior_weight(self) -> float:
        """Prior-preservation loss weight in effect: the given value or the family default."""
        return self._in_effect("prior_loss_weight")

    @property
    def trigger(self) -> str:
        return self.trigger_phrase or self.instance_prompt

    @property
    def class_dir(self) -> Path:
        return Path(self.class_data_dir) if self.class_data_dir else Path(self.output_dir) / "class_images"

    def validate(self) -> TrainConfig:
        """Check every option that needs no model; raise ``ConfigError`` listing all problems."""
        problems = list(self._problems())
        if problems:
            raise ConfigError("invalid training options:\n  " + "\n  ".join(problems))
        return self

    def _problems(self) -> list[str]:
        out: list[str] = []
        if self.adapter not in FAMILY_TRAINING_DEFAULTS:
            out.append(
                f"--adapter {self.adapter!r} is unknown; choose one of {', '.join(FAMILY_TRAINING_DEFAULTS)}"
            )
        if not self.instance_data_dir:
            out.append("--instance_data_dir is required: a folder (or list) of subject images")
        if not self.instance_prompt.strip():
            out.append("--instance_prompt is required, e.g. 'a photo of sks dog'")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            out.append(f"--resolution {self.resolution} must be a positive multiple of 8 (e.g. 512)")
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "num_validation_images",
            "num_class_images",
            "checkpointing_steps",
            "num_inference_steps",
        ):
            if getattr(self, name) < 1:
                out.append(f"--{name} must be >= 1 (got {getattr(self, name)})")
        for name in (
            "lr_warmup_steps",
            "validation_steps",
            "prior_loss_weight",
            "max_grad_norm",
            "adam_weight_decay",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:  # None: the family's default
                out.append(f"--{name} must be >= 0 (got {value})")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            out.append(f"--max_train_steps must be >= 1 (got {self.max_train_steps})")
        if self.learning_rate is not None and not (
            self.learning_rate > 0 and math.isfinite(self.learning_rate)
        ):
            out.append(f"--learning_rate must be a positive number (got {self.learning_rate})")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            out.append(f"--checkpoints_total_limit must be >= 1 (got {self.checkpoints_total_limit})")
        if not 0 < self.ema_decay < 1:
            out.append(f"--ema_decay must be in (0, 1) (got {self.ema_decay}); 0.99 averages about 100 steps")
        if self.noise_offset is not None and self.noise_offset < 0:
            out.append(f"--noise_offset must be >= 0 (got {self.noise_offset}); 0 turns offset noise off")
        if self.snr_gamma is not None and self.snr_gamma < 0:
            out.append(f"--snr_gamma must be >= 0 (got {self.snr_gamma}); 0 turns SNR weighting off")
        out.extend(_lr_multiplier_problems(self.lr_multipliers))
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"--{name} must be in [0, 1) (got {getattr(self, name)})")
        if self.lr_scheduler not in LR_SCHEDULERS:
            out.append(
                f"--lr_scheduler {self.lr_scheduler!r} is unknown; choose one of {', '.join(LR_SCHEDULERS)}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            out.append(
                f"--mixed_precision {self.mixed_precision!r} is unknown; choose one of {', '.join(MIXED_PRECISION)}"
            )
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            out.append(
                f"--lr_warmup_steps {self.lr_warmup_steps} has no effect with --lr_scheduler constant (it never warms "
                "up); use --lr_scheduler constant_with_warmup, or --lr_warmup_steps 0"
            )
        if self.max_train_steps is not None and self.lr_warmup_steps >= self.max_train_steps > 0:
            out.append(
                f"--lr_warmup_steps {self.lr_warmup_steps} must be below --max_train_steps {self.max_train_steps}: "
                "the run would end before reaching the full learning rate"
            )
        if self.report_to not in REPORT_TO:
            out.append(f"--report_to {self.report_to!r} is unknown; choose one of {', '.join(REPORT_TO)}")
        if self.with_prior_preservation and not (self.class_prompt or "").strip():
            out.append("--with_prior_preservation needs --class_prompt, e.g. 'a photo of a dog'")
        if not self.output_dir:
            out.append("--output_dir is required")
        if not self.targets:
            out.append("--targets is empty; use a preset (vo, qkvo, cross-vo, all-linear) or module patterns")
        return out

    # --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (a JSON/YAML file); unknown keys are an error, not silently ignored."""
        unknown = unknown_options(values)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}; see --help for the list")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a ``.json`` or ``.yaml``/``.yml`` file of options."""
        return cls.from_dict(read_config_file(path))


def unknown_options(values: Mapping[str, Any]) -> list[str]:
    """The keys of ``values`` that are not `TrainConfig` fields, sorted."""
    return sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The options stored in a JSON or YAML file, as a dict (``ConfigError`` on a bad file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            values = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path} must end in .json, .yaml or .yml")
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return values
