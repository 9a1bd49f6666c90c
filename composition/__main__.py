"""`python -m composition`: several concept adapters in one image from the command line.

    python -m composition --base-model assets/toyworld/pipeline \\
        --adapter star.safetensors:"purple star" --adapter heart.safetensors:"checkered heart":1.0 \\
        --prompt "a purple star on the left and a checkered heart on the right" \\
        --method clora --seed 0 --num-images 4 --steps 30 --guidance 7.5 --out out/

Steps, guidance and each method's options default to the base model's profile (`models.profiles`: e.g. CLoRA's
`partition` preset on the toy world, the paper's settings on Stable Diffusion); `--profile` forces one, and
`--steps`, `--guidance`, `--option` win over it.

`--adapter FILE[:phrase[:weight[:plain]]]`: the phrase defaults to the adapter's trigger phrase, the weight to
1, `plain` (CLoRA's trigger-free form, e.g. "star") to unset. `--compare` runs every method on the same seeds
and writes a labelled grid. Writes the images, the region masks (CLoRA; CMLoRA with regions), and `report.json` (method, options, seeds, full UNet
rows and shallow (cached) rows per image, wall time, each method's cost over composite's in rows and CPU seconds when
composite ran, CLIP scores when a CLIP model is available). Bad input exits with status 2 and one line
saying what to fix.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from composition.bank import AdapterBank
from composition.errors import CompositionError
from composition.methods import METHODS, check_options, generate, parse_options
from composition.prompt import ConceptPrompt
from composition.report import (
    comparison_grid,
    jsonable_extras,
    mask_images,
    method_cost,
    save_image,
    save_json,
    versus_composite,
)
from models.cli_options import OneLineArgumentParser
from models.profiles import PROFILES, Profile, profile_for_pipeline

COMPARE_ORDER = ("merge", "switch", "composite", "cmlora", "clora")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m composition", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base-model", default=None, help="hub id, diffusers folder or single file (default: toy world)"
    )
    parser.add_argument(
        "--base-config",
        default=None,
        metavar="FOLDER",
        help="for a single-file --base-model offline: a diffusers folder (or hub id) of the same architecture",
    )
    parser.add_argument("--adapter", action="append", default=[], metavar="FILE[:phrase[:weight[:plain]]]")
    parser.add_argument("--prompt", required=True, help="the prompt, containing every adapter's phrase")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--method", default="clora", choices=sorted(METHODS))
    parser.add_argument(
        "--compare", action="store_true", help="run every method on the same seeds, write a grid"
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="method option (JSON value)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-images", type=int, default=1, help="images per method, seeds seed, seed+1, ..."
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the profile's)")
    parser.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the profile's)"
    )
    parser.add_argument(
        "--profile",
        default=None,
        choices=list(PROFILES),
        help="base-model profile (default: picked from the model)",
    )
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--clip-model", default=None, help="CLIP for scores (default: toy world CLIP; 'none' skips)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    return parser.parse_args(argv)


def parse_adapter(spec: str) -> tuple[str, str | None, float, str | None]:
    """`FILE[:phrase[:weight[:plain]]]` -> (file, phrase or None, weight, plain or None)."""
    parts = spec.split(":")
    path, phrase = parts[0], (parts[1].strip() or None) if len(parts) > 1 else None
    try:
        weight = float(parts[2]) if len(parts) > 2 and parts[2].strip() else 1.0
    except ValueError:
        raise CompositionError(f"--adapter {spec!r}: weight {parts[2]!r} is not a number.") from None
    plain = parts[3].strip() or None if len(parts) > 3 else None
    if len(parts) > 4:
        raise CompositionError(f"--adapter {spec!r}: expected FILE[:phrase[:weight[:plain]]].")
    return path, phrase, weight, plain


def build_prompt(args: argparse.Namespace, bank: AdapterBank, specs: list[tuple]) -> ConceptPrompt:
    phrases = []
    for (path, phrase, _, _), entry in zip(specs, bank.entries, strict=True):
        phrase = phrase or entry.trigger_phrase
        if not phrase:
            raise CompositionError(f"adapter {path} records no trigger phrase; give one as {path}:phrase.")
        phrases.append(phrase)
    return ConceptPrompt.build(
        args.prompt, phrases, [s[2] for s in specs], [s[3] for s in specs], negative=args.negative
    )


def clip_report(images: list, prompt: ConceptPrompt, clip_model: str | None) -> dict[str, Any]:
    """CLIPScore against the prompt and per-concept scores, or why they were skipped."""
    if clip_model == "none":
        return {"skipped": "--clip-model none"}
    from evaluation import concept_scores, score

    scores = score(images, prompt.text, model=clip_model)
    concepts = concept_scores(images, [c.phrase for c in prompt.concepts], model=clip_model)
    return {
        "prompt": scores.to_dict()["summary"],
        "concepts": concepts.to_dict()["summary"],
        "model": scores.model,
    }


def _generation_settings(args: argparse.Namespace, profile: Profile) -> tuple[int, float]:
    """Steps and guidance: the flags when given, else the profile's."""
    steps = args.steps if args.steps is not None else profile.generation.compose_steps
    guidance = args.guidance if args.guidance is not None else profile.generation.compose_guidance
    if steps < 1:
        raise CompositionError(f"--steps must be >= 1, got {steps}.")
    return steps, guidance


def run(args: argparse.Namespace) -> dict[str, Any]:
    from models.pipelines import load_pipeline

    if not args.adapter:
        raise CompositionError("no adapters given: pass --adapter FILE[:phrase[:weight]] at least once.")
    if args.num_images < 1:
        raise CompositionError(f"--num-images must be >= 1, got {args.num_images}.")
    specs = [parse_adapter(spec) for spec in args.adapter]
    options = parse_options(args.option)
    methods = list(COMPARE_ORDER) if args.compare else [args.method]
    check_options(args.method, options)
    if args.clip_model != "none":
        from evaluation import load_clip

        load_clip(args.clip_model)  # a bad CLIP fails here, before any image is generated (cached for later)
    pipe = load_pipeline(args.base_model, device=args.device, dtype=args.dtype, config=args.base_config)
    profile = profile_for_pipeline(pipe, args.profile)
    steps, guidance = _generation_settings(args, profile)
    bank = AdapterBank(pipe, [s[0] for s in specs])
    prompt = build_prompt(args, bank, specs)
    seeds = [args.seed + i for i in range(args.num_images)]
    report: dict[str, Any] = {
        "prompt": prompt.text, "negative": prompt.negative, "base_model": str(args.base_model or "toy world"),
        "adapters": [{"name": e.name, "family": e.family, "phrase": c.phrase, "weight": c.weight}
                     for e, c in zip(bank.entries, prompt.concepts, strict=True)],
        "profile": profile.name, "steps": steps, "guidance": guidance, "seeds": seeds, "memory": bank.memory_report(),
        "methods": {},
    }  # fmt: skip
    cells: dict[str, list] = {}
    with tqdm(total=len(methods) * len(seeds) * steps, desc="composition", unit="step") as bar:
        for method in methods:
            given = options if not args.compare or method == args.method else {}
            method_options = {**profile.method_options(method), **given}
            records, cells[method] = [], []
            for seed in seeds:
                start = time.perf_counter()
                result = generate(
                    method, pipe, bank, prompt, steps, guidance, seed, height=args.height, width=args.width,
                    progress=lambda *_, **__: bar.update(1), **method_options,
                )  # fmt: skip
                wall = time.perf_counter() - start
                image = result.images[0]
                file = save_image(image, args.out / f"{method}_seed{seed}.png")
                record = {
                    "seed": seed,
                    "file": file.name,
                    "unet_evals": result.unet_evals,
                    "full_rows": result.unet_evals,
                    "shallow_rows": result.extras.get("shallow_evals", 0),
                    "wall_s": round(wall, 3),
                }
                if "masks" in result.extras:
                    scale = image.size[0] // result.extras["masks"].shape[-1]
                    names = result.extras["mask_names"]
                    record["masks"] = [
                        save_image(m, args.out / f"{method}_seed{seed}_mask{i}_{n}.png").name
                        for i, (m, n) in enumerate(
                            zip(mask_images(result.extras["masks"], scale), names, strict=True)
                        )
                    ]
                record["extras"] = jsonable_extras(result.extras)
                records.append(record)
                cells[method].append(image)
            cost = method_cost(
                [r["full_rows"] for r in records],
                [r["shallow_rows"] for r in records],
                [r["wall_s"] for r in records],
            )
            report["methods"][method] = {
                "options": method_options, "images": records, "cost": cost,
                "clip": clip_report(cells[method], prompt, args.clip_model),
            }  # fmt: skip
    ratios = versus_composite({m: entry["cost"] for m, entry in report["methods"].items()})
    for method, ratio in ratios.items():
        report["methods"][method]["cost"]["vs_composite"] = ratio
    if args.compare:
        grid = comparison_grid(
            [[cells[m][i] for m in methods] for i in range(len(seeds))], methods, [f"seed {s}" for s in seeds]
        )
        report["grid"] = save_image(grid, args.out / "compare.png").name
    save_json(report, args.out / "report.json")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from evaluation import ClipLoadError
    from models.pipelines import ModelLoadError

    try:
        report = run(args)
    except (CompositionError, ModelLoadError, ClipLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for method, entry in report["methods"].items():
        cost = entry["cost"]
        versus = cost.get("vs_composite")
        ratio = (
            f" vs composite: rows {versus['full_rows']:.2f}x, CPU s {versus['wall_s']:.2f}x" if versus else ""
        )
        print(f"{method:10s} images={len(entry['images'])} full_rows/image={cost['full_rows']:.1f} "
              f"shallow_rows/image={cost['shallow_rows']:.1f} wall_s/image={cost['wall_s']:.2f}{ratio}")  # fmt: skip
    print(f"wrote {args.out / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
