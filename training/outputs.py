"""The final products of a DreamBooth run: the adapter file, its exports and the model card.

``adapter.safetensors`` is Atelier's adapter file (``models.adapters.files``: safetensors with the
family, config, targets, base-model fingerprint and trigger phrase in the header). Next to it go the
formats other tools read: diffusers/kohya LoRA for LoRA, LyCORIS LoKr for DiffuseKronA, and the PEFT
layout for LoRA, BOFT and HRA; then ``README.md``. Every file is written atomically by its writer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.adapters import FAMILIES
from models.adapters.files import load_adapter_file, save_adapter_file
from training.model_card import render_model_card, write_model_card

if TYPE_CHECKING:
    from training.dreambooth import TrainResult
    from training.preflight import RunPlan

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"


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
    )
    write_model_card(out / "README.md", card)
    logger.info("wrote %s, %d export(s) and README.md", adapter_path, len(written))
    return adapter_path, written
