"""Plain-language one-line explanations of the scores and counts the app shows, and the chart frame of the
Evaluate tab (images numbered in order, scores rounded)."""

from __future__ import annotations

from typing import Any

import pandas as pd

DECIMALS = 3
EXPLANATIONS = {
    "clip_t_cosine": "How close the image and the prompt are for CLIP (cosine, -1 to 1; higher = closer).",
    "clipscore_hessel": "CLIPScore as in Hessel et al. 2021: 2.5 x the cosine, floored at 0 (about 0 to 1; "
    "papers report this one).",
    "clipscore_100": "The same closeness on a 0-100 scale (100 x the cosine, floored at 0; the chart uses it).",
    "clip_i": "How much the image looks like your reference images for CLIP (cosine, higher = more alike).",
    "clip_i x100": "The reference likeness x100, so it fits on the chart beside clipscore_100.",
    "UNet evals": "How many times the denoising network ran: the method's cost in compute (more = slower).",
    "full UNet rows": "Full runs of the denoising network per image (a guidance pair counts 2): the main cost.",
    "shallow rows": "Cheaper runs that reuse cached deep features (CMLoRA); each costs a fraction of a full one.",
    "CPU s": "Seconds the image took to generate on this machine.",
    "rows vs composite": "Full rows over LoRA Composite's (every adapter at every step): below 1 is cheaper.",
    "CPU s vs composite": "Seconds over LoRA Composite's on the same seeds: below 1 is faster.",
}
"""Score name → one plain sentence; ``glossary`` shows the ones present."""


def glossary(names: list[str]) -> str:
    """A Markdown list explaining each named score that has an explanation."""
    return "\n".join(f"- **{name}**: {EXPLANATIONS[name]}" for name in names if name in EXPLANATIONS)


def score_frames(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The table (numbered, rounded to ``DECIMALS``), the long chart frame and the chart's x order.

    Images are labelled ``#1``, ``#2``, ... in the order they were scored, so the chart reads left to right in
    that order (not as text, where 10 sorts before 2) and its labels stay short enough not to overlap."""
    raw = pd.DataFrame(rows)
    labels = [f"#{i + 1}" for i in range(len(raw))]
    raw.insert(0, "#", labels)
    if "clip_i" in raw:
        raw["clip_i x100"] = raw["clip_i"] * 100
    numeric = raw.select_dtypes("number").columns
    raw[numeric] = raw[numeric].round(DECIMALS)
    metrics = [m for m in ("clipscore_100", "clip_i x100") if m in raw]
    long = raw.melt(id_vars=["#"], value_vars=metrics, var_name="metric", value_name="score")
    return raw.drop(columns=["clip_i x100"], errors="ignore"), long, labels
