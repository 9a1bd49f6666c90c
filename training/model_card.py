"""The ``README.md`` model card written next to a trained DreamBooth adapter.

It records what someone needs to use (and reproduce) the adapter: base model and its UNet
fingerprint, adapter family and paper, targets, hyperparameters, the trigger phrase, training
settings, the base-model profile with every option it resolved (and whether the user gave it), the final
loss and the last validation grid. Written atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from models.atomic_write import atomic_write_text
from training.config import TrainConfig
from training.defaults import option_text


def render_model_card(
    config: TrainConfig,
    *,
    base_model: str,
    fingerprint: str,
    family_title: str,
    family_paper: str,
    adapter_config: dict[str, Any],
    num_targets: int,
    trainable_parameters: int,
    steps: int,
    final_loss: float | None,
    adapter_file: str,
    exports: list[str],
    sample_grid: str | None,
    resume_note: str | None = None,
    resolved: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The model card as Markdown text (``resume_note``: how the run began, when it was asked to resume)."""
    hyper = json.dumps(adapter_config, indent=2, sort_keys=True)
    targets = config.targets if isinstance(config.targets, str) else ", ".join(config.targets)
    lines = [
        f"# DreamBooth {family_title} adapter: “{config.trigger}”",
        "",
        f"Trained with Atelier (`python -m training.dreambooth`) on {base_model}.",
        "",
        "## Use",
        "",
        f"Put the trigger phrase **{config.trigger}** in the prompt, e.g. “{config.instance_prompt}”.",
        f"Load `{adapter_file}` with Atelier (`models.adapters.files.load_adapter_file`) or the composition tools.",
    ]
    if exports:
        lines.append("Exports for other tools: " + ", ".join(f"`{name}`" for name in exports) + ".")
    lines += [
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| Base model | `{base_model}` (UNet fingerprint `{fingerprint}`) |",
        f"| Adapter family | {family_title} ({family_paper}) |",
        f"| Targets | `{targets}` ({num_targets} layers) |",
        f"| Trainable parameters | {trainable_parameters:,} |",
        "",
        "Hyperparameters:",
        "",
        "```json",
        hyper,
        "```",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| Instance prompt | “{config.instance_prompt}” |",
        f"| Prior preservation | {_prior_text(config)} |",
        f"| Steps | {steps} (batch {config.train_batch_size} × accumulation {config.gradient_accumulation_steps}) |",
        f"| Learning rate | {config.learning_rate:g} ({config.lr_scheduler}, warm-up {config.lr_warmup_steps}) |",
        f"| Min-SNR weighting | {'off' if config.snr is None else f'γ = {config.snr:g}'} |",
        f"| Offset noise | {f'std {config.offset:g}' if config.offset else 'off'} |",
        f"| Weights saved | {f'moving average, decay {config.ema_decay:g}' if config.use_ema else 'last step'} |",
        f"| Resolution | {config.resolution} px |",
        f"| Mixed precision | {config.mixed_precision} |",
        f"| Seed | {config.seed} |",
        f"| Final loss | {'n/a' if final_loss is None else f'{final_loss:.4f}'} |",
    ]
    if resume_note:
        lines.append(f"| Resume | {resume_note} |")
    if resolved:
        lines += [
            "",
            f"## Base-model profile: `{config.profile}`",
            "",
            "Every option a base-model profile supplies (`models.profiles`), its value in this run and where it came from:",
            "",
            "| Option | Value | From |",
            "|---|---|---|",
            *(
                f"| `{name}` | `{option_text(row['value'])}` | {row['from']} |"
                for name, row in resolved.items()
            ),
        ]
    if sample_grid:
        lines += [
            "",
            "## Samples",
            "",
            f"“{config.validation_prompt or config.instance_prompt}”:",
            "",
            f"![samples]({sample_grid})",
        ]
    return "\n".join(lines) + "\n"


def _prior_text(config: TrainConfig) -> str:
    if not config.with_prior_preservation:
        return "off"
    return f"“{config.class_prompt}”, {config.num_class_images} images, weight {config.prior_loss_weight:g}"


PROFILE_ROW = re.compile(r"^\| `(\w+)` \| `(.*)` \| (.+) \|$")


def read_profile_table(text: str) -> dict[str, tuple[str, str]]:
    """The profile section of a model card read back: option -> (value as written, origin)."""
    rows = (PROFILE_ROW.match(line) for line in text.splitlines())
    return {m.group(1): (m.group(2), m.group(3)) for m in rows if m}


def write_model_card(path: Path, text: str) -> Path:
    """Write the card atomically."""
    return atomic_write_text(path, text)
