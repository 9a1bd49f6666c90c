"""Where the trained toy world lives under `assets/` (the files `python -m models.toyworld.train` writes)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"
TOYWORLD_DIR = ASSETS / "toyworld"
TOYWORLD_PIPELINE = TOYWORLD_DIR / "pipeline"
"""The diffusers `StableDiffusionPipeline` folder (fp16), loadable with `models.pipelines.load_pipeline`."""
TOYWORLD_CLIP = TOYWORLD_DIR / "clip" / "toyworld_clip.pt"
"""The tiny CLIP as a plain state dict (`.pt`, read weights-only); a `.safetensors` twin sits beside it."""
CONTACT_SHEET = ASSETS / "toyworld_contact_sheet.png"
