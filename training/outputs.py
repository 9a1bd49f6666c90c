"""The final products of a DreamBooth run (the adapter file, its exports and the model card), and the error
a run raises when it cannot write its outputs.

``adapter.safetensors`` is Atelier's adapter file (``models.adapters.files``: safetensors with the
family, config, targets, base-model fingerprint and trigger phrase in the header). Next to it go the
formats other tools read (``models.adapters.export.standard_exports``: exact kohya/A1111/ComfyUI files for
every family, diffusers LoRAs, LyCORIS, PEFT); then ``README.md``. Every file is written atomically by its writer
(``models.atomic_write``), so a full disk mid-run leaves every earlier file and checkpoint whole, and
``OutputWriteError`` tells the user which file failed, what is intact and how to continue: after the adapter
file is written, a failed export says the adapter is complete and gives the command that writes the export
from it (``python -m models.adapters.export ADAPTER --to FORMAT``), so nothing is trained twice.
"""

from __future__ import annotations

import errno
import logging
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
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
MODEL_CARD = "README.md"

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS}


class OutputWriteError(RuntimeError):
    """A file of the run could not be written (full disk, no permission, ...); what was saved before is intact."""

    @classmethod
    def from_os_error(cls, exc: OSError, output_dir: str | Path) -> OutputWriteError:
        """The message for ``exc``: which file failed and why, the newest intact checkpoint, what to do."""
        problem, remedy = _problem_and_remedy(exc, output_dir)
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

    @classmethod
    def for_export(
        cls, exc: OSError, adapter_path: Path, export: str, command: str | None
    ) -> OutputWriteError:
        """The message for a final export (or the model card) that could not be written after the adapter
        file was: the adapter is complete, what is missing, and the ``command`` that writes it again."""
        problem, remedy = _problem_and_remedy(exc, adapter_path.parent)
        if command is None:
            missing = f"only the {export} is missing: {remedy}; the adapter works without it."
        else:
            missing = (
                f"the {export} export is missing: {remedy}, then write it from the adapter file, without "
                f"training again: {command}"
            )
        return cls(f"{problem}. The adapter {adapter_path} is complete (the training is not lost); {missing}")


def _problem_and_remedy(exc: OSError, output_dir: str | Path) -> tuple[str, str]:
    target = exc.filename or output_dir
    if exc.errno in _DISK_FULL:
        return f"the disk is full: {target} could not be written", "free space on that disk"
    if exc.errno in _NOT_ALLOWED:
        return (
            f"{target} could not be written: no permission ({exc.strerror})",
            "make the output folder writable",
        )
    return f"{target} could not be written ({exc.strerror or exc})", "fix the cause"


@contextmanager
def _completing(adapter_path: Path, export: str, command: str | None) -> Iterator[None]:
    """Writes after the adapter file: a failed one raises ``OutputWriteError.for_export``."""
    try:
        yield
    except OSError as exc:
        raise OutputWriteError.for_export(exc, adapter_path, export, command) from exc


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
    # diffusers' LoRA code: load it late
    from models.adapters.export import export_adapter, needs_base_weights, standard_exports

    written: dict[str, Path] = {}
    for name, spec in standard_exports(cfg.adapter).items():
        target = out / "exports" / spec.name
        redo = [
            "python",
            "-m",
            "models.adapters.export",
            str(adapter_path),
            "--to",
            spec.to,
            "--out",
            str(target),
        ]
        if spec.rank is not None:
            redo += ["--rank", str(spec.rank)]
        if needs_base_weights(cfg.adapter, spec.to):
            redo += ["--base-model", plan.base_model]
        with _completing(adapter_path, name, shlex.join(redo)):
            export = export_adapter(adapter_file, spec.to, target, unet=plan.pipe.unet, rank=spec.rank)
        logger.info("export %s: %s", name, export.report.summary())
        written[name] = export.path
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
        resume_note=plan.resume_note,
        resolved=resolved_options(plan.given, cfg),
    )
    with _completing(adapter_path, f"model card {MODEL_CARD}", None):
        write_model_card(out / MODEL_CARD, card)
    logger.info("wrote %s, %d export(s) and README.md", adapter_path, len(written))
    return adapter_path, written
