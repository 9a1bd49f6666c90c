"""Seeded tiny CLIP models built in code for the evaluation tests, saved the way released files are.

- clip-anytorch: a `clip.model.CLIP` with small widths (its head count is width // 64, so widths are 64),
  saved as a plain state dict (`.pt`, what `clip.load(path)` reads) and as a `.safetensors` copy.
- transformers: a tiny `CLIPModel` + `CLIPProcessor` (the real CLIP BPE tokenizer, written offline) saved
  with `save_pretrained`, exactly like a hub folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from models.clip_compat import clip
from models.clip_tokenizer import VOCAB_SIZE, write_clip_tokenizer_files

TINY_CLIP_RESOLUTION = 32


def build_tiny_clip(seed: int = 0) -> torch.nn.Module:
    """A clip-anytorch ViT CLIP: 32 px input, 8 px patches, one layer per tower, width 64, 32-d embeddings."""
    torch.manual_seed(seed)
    return clip.model.CLIP(
        embed_dim=32,
        image_resolution=TINY_CLIP_RESOLUTION,
        vision_layers=1,
        vision_width=64,
        vision_patch_size=8,
        context_length=77,
        vocab_size=VOCAB_SIZE,
        transformer_width=64,
        transformer_heads=1,
        transformer_layers=1,
    )


def save_tiny_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save the tiny CLIP's state dict as `tiny_clip.pt` and `tiny_clip.safetensors`; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    state = build_tiny_clip(seed).state_dict()
    pt_path, st_path = folder / "tiny_clip.pt", folder / "tiny_clip.safetensors"
    torch.save(state, pt_path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(st_path))
    return pt_path, st_path


def save_tiny_hf_clip(folder: Path, seed: int = 0) -> Path:
    """Save a tiny transformers `CLIPModel` and its `CLIPProcessor` into `folder`; returns the folder."""
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "image_size": TINY_CLIP_RESOLUTION,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(folder / "tokenizer-src"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_RESOLUTION},
        crop_size={"height": TINY_CLIP_RESOLUTION, "width": TINY_CLIP_RESOLUTION},
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    """`n` seeded RGB noise images of `size` (width, height), not square so the centre crop matters."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
