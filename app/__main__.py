"""`python -m app`: Atelier's main job.

Until the web UI lands (issue 8) this generates images from the command line with the base model
(the toy world by default) and prints where they went.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--base-model", default=None, help="hub id, diffusers folder or single-file checkpoint"
    )
    parser.add_argument("--prompt", action="append", help="prompt (repeatable); default: a few demo prompts")
    parser.add_argument("--num-images", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    return parser


DEMO_PROMPTS = ["a red circle on a white background", "a blue striped square and a yellow triangle"]


def main(argv: list[str] | None = None) -> int:
    from models.pipelines import ModelLoadError, load_pipeline

    args = build_parser().parse_args(argv)
    try:
        pipe = load_pipeline(args.base_model, device=args.device)
    except (ModelLoadError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    for p_index, prompt in enumerate(args.prompt or DEMO_PROMPTS):
        generator = torch.Generator().manual_seed(args.seed + p_index)
        images = pipe(
            prompt,
            num_images_per_prompt=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=generator,
        ).images
        for i, image in enumerate(images):
            path = out / f"prompt{p_index}-{i}.png"
            image.save(path)
            print(f"{path}  ({prompt})")
    print(f"Images written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
