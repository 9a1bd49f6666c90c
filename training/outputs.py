"""The final products of a DreamBooth run (the adapter file, its exports and the model card), and the error
a run raises when it cannot write its outputs.

``adapter.safetensors`` is Atelier's adapter file (``models.adapters.files``: safetensors with the
family, config, targets, base-model fingerprint and trigger phrase in the header). Next to it go the
formats other tools read: diffusers/kohya LoRA for LoRA, LyCORIS LoKr for DiffuseKronA, and the PEFT
layout for LoRA, BOFT and HRA; then ``README.md``. Every file is written atomically by its writer
(``models.atomic_write``), so a full disk mid-run leaves every earlier file and checkpoint whole, and
``OutputWriteError`` tells the user which file failed, what is intact and how to continue.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.adapters import FAMILIES
from models.adapters.files import load_adapter_file, save_adapter_file
from training.checkpoints import list_checkpoints
from training.defaults import resolved_options
from training.model_card import render_model_card, write_model_card

if TYPE_CHECKING:
    from training.dreambooth import TrainResult
    from training.preflight import RunPlan

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


class OutputWriteError(RuntimeError):
    """A file of the run could not be written (full disk, no permission, ...); what was saved before is intact."""

    @classmethod
    def from_os_error(cls, exc: OSError, output_dir: str | Path) -> OutputWriteError:
        """The message for ``exc``: which file failed and why, the newest intact checkpoint, what to do."""
        target = exc.filename or output_dir
        if exc.errno in _DISK_FULL:
            problem, remedy = f"the disk is full: {target} could not be written", "free space on that disk"
        elif exc.errno in _NOT_ALLOWED:
            problem = f"{target} could not be written: no permission ({exc.strerror})"
            remedy = "make the output folder writable"
        else:
            problem, remedy = f"{target} could not be written ({exc.strerror or exc})", "fix the cause"
        found = list_checkpoints(output_dir)
        if found:
            step, path = found[-1]
            where = (
                f"The newest checkpoint, {path} (step {step}), is complete: {remedy}, then run the same command "
                "with --resume_from_checkpoint latest (in the app: Resume), or continue in another --output_dir "
                f"with --resume_from_checkpoint {path}."
            )
        else:
            where = f"No checkpoint was saved yet: {remedy} or choose another --output_dir, then start again."
        return cls(
            f"{problem}. Training stopped; files saved before are intact (each is written under a temporary "
            f"name and renamed when complete). {where}"
        )


def _exporters(family: str) -> dict[str, tuple[Any, str]]:
    """Export name → (function, file or folder name) for ``family``."""
    from models.adapters import exports

    table: dict[str, tuple[Any, str]] = {}
    if FAMILIES[family].peft_config is not None:  # PEFT has no DiffuseKronA type
        table["peft"] = (exports.export_peft, "peft")
    if family == "lora":
        table["diffusers"] = (exports.export_diffusers_lora, "pytorch_lora_weights.safetensors")
        table["kohya"] = (exports.export_kohya_lora, "kohya_lora.safetensors")
    if family == "krona":
        table["lycoris"] = (exports.export_lycoris_lokr, "lycoris_lokr.safetensors")
    return table


def write_final_outputs(
    plan: RunPlan, handle: Any, result: TrainResult, sample_grid: Path | None
) -> tuple[Path, dict[str, Path]]:
    """Write the adapter file, its exports and ``README.md`` into the output folder."""
    cfg = plan.config
    out = Path(cfg.output_dir)
    adapter_path = save_adapter_file(
        out / ADAPTER_FILE,
        handle,
        unet=plan.pipe.unet,
        base_model_id=plan.base_model,
        trigger_phrase=cfg.trigger,
        train_steps=result.steps,
        extra={
            "instance_prompt": cfg.instance_prompt,
            "final_loss": result.final_loss,
            "seed": cfg.seed,
            "num_processes": result.num_processes,
            "learning_rate": cfg.learning_rate,
            "profile": cfg.profile,
        },
    )
    adapter_file = load_adapter_file(adapter_path)
    written: dict[str, Path] = {}
    for name, (export, target) in _exporters(cfg.adapter).items():
        written[name] = Path(export(adapter_file, out / "exports" / target))
    family = FAMILIES[cfg.adapter]
    card = render_model_card(
        cfg,
        base_model=plan.base_model,
        fingerprint=plan.fingerprint,
        family_title=family.title,
        family_paper=family.paper,
        adapter_config=plan.adapter_config.to_dict(),
        num_targets=len(plan.targets),
        trainable_parameters=result.trainable_parameters,
        steps=result.steps,
        final_loss=result.final_loss,
        adapter_file=ADAPTER_FILE,
        exports=[str(path.relative_to(out)) for path in written.values()],
        sample_grid=str(sample_grid.relative_to(out)) if sample_grid else None,
        resolved=resolved_options(plan.given, cfg),
    )
    write_model_card(out / "README.md", card)
    logger.info("wrote %s, %d export(s) and README.md", adapter_path, len(written))
    return adapter_path, written
