"""Writing composition outputs: images, CLoRA masks, the labelled comparison grid and the JSON report.

No paper. Every file is written atomically (a temporary file in the same folder, then `os.replace`), so an
interrupted run never leaves a half-written PNG or report behind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from models.atomic_write import atomic_write, atomic_write_text

LABEL_HEIGHT = 14
"""Pixels of the caption strip above each grid column and left of each row."""


def save_image(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_json(data: Mapping[str, Any], path: Path) -> Path:
    """Write JSON (indented, UTF-8) atomically."""
    text = json.dumps(data, indent=2, default=_plain, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def mask_images(masks: torch.Tensor, scale: int) -> list[Image.Image]:
    """(branches, H, W) masks in [0, 1] -> greyscale images enlarged `scale`× (nearest)."""
    images = []
    for mask in masks:
        array = (mask.float().clamp(0, 1) * 255).byte().cpu().numpy()
        image = Image.fromarray(array, mode="L")
        images.append(
            image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.Resampling.NEAREST)
        )
    return images


def comparison_grid(
    cells: Sequence[Sequence[Image.Image]], columns: Sequence[str], rows: Sequence[str]
) -> Image.Image:
    """Images in a grid (rows × columns) with column captions on top and row captions on the left."""
    width, height = cells[0][0].size
    label_width = max(6 * max(len(r) for r in rows) + 4, LABEL_HEIGHT)
    grid = Image.new("RGB", (label_width + width * len(columns), LABEL_HEIGHT + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((label_width + c * width + 2, 1), name, fill="black")
    for r, name in enumerate(rows):
        draw.text((2, LABEL_HEIGHT + r * height + 2), name, fill="black")
        for c, image in enumerate(cells[r]):
            grid.paste(
                image.convert("RGB").resize((width, height)),
                (label_width + c * width, LABEL_HEIGHT + r * height),
            )
    return grid


def jsonable_extras(extras: Mapping[str, Any]) -> dict[str, Any]:
    """Method extras without tensors (masks are written as images instead)."""
    return {k: v for k, v in extras.items() if not isinstance(v, torch.Tensor)}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def method_cost(
    full_rows: Sequence[float], shallow_rows: Sequence[float], wall_s: Sequence[float]
) -> dict[str, float]:
    """Mean cost of one image of a method: full UNet rows (a CFG pair is 2), shallow (cached) rows, CPU seconds."""
    count = max(len(full_rows), 1)
    return {
        "full_rows": sum(full_rows) / count,
        "shallow_rows": sum(shallow_rows) / count,
        "wall_s": sum(wall_s) / count,
    }


def versus_composite(costs: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each method's full rows, shallow rows and seconds per image over LoRA Composite's (N CFG pairs per step, the
    cost every per-adapter method is measured against); empty when composite did not run. Shallow rows are not
    folded into the full-row ratio: they cost a fraction of a full row that depends on the UNet and the branch."""
    base = costs.get("composite")
    if not base:
        return {}
    return {
        method: {
            "full_rows": cost["full_rows"] / base["full_rows"] if base["full_rows"] else float("nan"),
            "shallow_rows_per_composite_row": cost["shallow_rows"] / base["full_rows"]
            if base["full_rows"]
            else float("nan"),
            "wall_s": cost["wall_s"] / base["wall_s"] if base["wall_s"] else float("nan"),
        }
        for method, cost in costs.items()
    }
