"""Throughput of `evaluation.score` (CLIPScore, Hessel et al. 2021) against a plain clip-anytorch loop.

Reference: the textbook computation written directly against clip-anytorch — `preprocess` each PIL image,
`encode_image` / `encode_text` in batches of the same size, cosine per pair — so the ratio shows what the
evaluation layer (input handling, batching, deduplicated prompts, result objects) costs or saves.
Two models, both run in one process on the same images:
- the toy world's CLIP (`models.toyworld.paths.TOYWORLD_CLIP`) on 32 px toy-world-sized images, or, when the
  toy world is not installed, a tiny seeded CLIP built in code (the table says which);
- a ViT-B/32-sized CLIP built from OpenAI's published config (random weights) on 512 px SD-sized images.

    python -m benchmarks.clipscore [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from evaluation import OpenAIClipBackend, load_clip, score
from models.clip_compat import clip
from models.clip_tokenizer import VOCAB_SIZE

VIT_B_32 = {
    "embed_dim": 512,
    "image_resolution": 224,
    "vision_layers": 12,
    "vision_width": 768,
    "vision_patch_size": 32,
    "context_length": 77,
    "vocab_size": VOCAB_SIZE,
    "transformer_width": 512,
    "transformer_heads": 8,
    "transformer_layers": 12,
}
"""OpenAI CLIP ViT-B/32's architecture (Radford et al. 2021, table 20)."""

TINY = {
    **VIT_B_32,
    "embed_dim": 32,
    "image_resolution": 32,
    "vision_layers": 1,
    "vision_width": 64,
    "vision_patch_size": 8,
    "transformer_width": 64,
    "transformer_heads": 1,
    "transformer_layers": 1,
}
PROMPTS = [
    "a red circle on a white background",
    "a blue striped square",
    "a yellow triangle and a green circle",
]


def _images(n: int, side: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _config_clip(config: dict[str, int], folder: Path, name: str) -> Path:
    """Build a seeded CLIP from `config` and save its state dict as `.safetensors` (loaded like any file)."""
    torch.manual_seed(0)
    path = folder / f"{name}.safetensors"
    state = clip.model.CLIP(**config).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def reference_cosines(
    backend: OpenAIClipBackend, images: list[Image.Image], prompts: list[str], batch: int
) -> torch.Tensor:
    """The plain loop: clip's preprocess + encode_image / tokenize + encode_text, batch by batch."""
    model, preprocess = backend.model, backend.preprocess
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = torch.stack([preprocess(im) for im in images[start : start + batch]]).to(backend.device)
            tokens = clip.tokenize(prompts[start : start + batch]).to(backend.device)
            out.append(
                F.cosine_similarity(model.encode_image(pixels), model.encode_text(tokens), dim=-1).cpu()
            )
    return torch.cat(out)


def _best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _bench(
    label: str, path: Path, n: int, side: int, batch: int, repeats: int, device: str
) -> tuple[str, ...]:
    backend = load_clip(path, device)
    assert isinstance(backend, OpenAIClipBackend)
    images = _images(n, side)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    ours = score(images, prompts, model=backend, batch_size=batch)  # warm-up and correctness check
    ref = reference_cosines(backend, images, prompts, batch)
    max_diff = float((ours.text_cosine - ref).abs().max())
    t_ours = _best_time(lambda: score(images, prompts, model=backend, batch_size=batch), repeats)
    t_ref = _best_time(lambda: reference_cosines(backend, images, prompts, batch), repeats)
    return (
        label,
        f"{n} x {side}px",
        f"{n / t_ours:9.1f}",
        f"{n / t_ref:9.1f}",
        f"{t_ref / t_ours:6.2f}",
        f"{max_diff:.1e}",
    )


def main(argv: list[str] | None = None) -> int:
    """Run both models and print images/s for `evaluation.score` and the reference loop, with their ratio."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.clipscore", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats (smoke run)")
    parser.add_argument("--device", default="cpu", help="device to benchmark on (default cpu)")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else 3
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        toy = _toyworld_clip()
        if toy is not None:
            rows.append(
                _bench("toy-world CLIP", toy, 64 if args.quick else 256, 32, 32, repeats, args.device)
            )
        else:
            tiny = _config_clip(TINY, Path(tmp), "tiny")
            rows.append(
                _bench(
                    "tiny CLIP (toy world absent)",
                    tiny,
                    64 if args.quick else 256,
                    32,
                    32,
                    repeats,
                    args.device,
                )
            )
        vit = _config_clip(VIT_B_32, Path(tmp), "vit-b-32")
        rows.append(
            _bench("ViT-B/32 (random weights)", vit, 8 if args.quick else 32, 512, 32, repeats, args.device)
        )
    header = ("model", "images", "ours img/s", "ref img/s", "ratio", "max |Δcos|")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, best of {repeats}")
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(w) for cell, w in zip(row, widths, strict=True)))
    print(
        "ratio = reference time / evaluation.score time (> 1: score is faster; it embeds each distinct prompt once)"
    )
    return 0


def _toyworld_clip() -> Path | None:
    try:
        from models.toyworld.paths import TOYWORLD_CLIP
    except ImportError:
        return None
    path = Path(TOYWORLD_CLIP)
    return path if path.is_file() else None


if __name__ == "__main__":
    raise SystemExit(main())
