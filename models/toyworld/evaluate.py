"""Quality report of the trained toy world: does the image show what the prompt asked?

No paper: the toy world's acceptance test. A fixed, seeded prompt set is generated with the saved pipeline
(DDIM, 25 steps, classifier-free guidance) and every image is judged by the deterministic checks of
`models.toyworld.checks`. Reported: single-object accuracy (colour, shape, texture and background all right),
two-object rate (both objects in their halves with the right colour and shape), held-out-from-text rates
(should stay near chance: the base model must not know them), the tiny CLIP's zero-shot attribute accuracy,
load time, the time for 4 images at 25 steps, and the size of the assets.

    python -m models.toyworld.evaluate [--pipeline DIR] [--clip FILE] [--contact-sheet PNG]
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from models.atomic_write import atomic_write
from models.clip_compat import clip
from models.pipelines import load_pipeline
from models.toyworld.checks import check_scene
from models.toyworld.paths import CONTACT_SHEET, TOYWORLD_CLIP, TOYWORLD_PIPELINE
from models.toyworld.sampling import GUIDANCE, STEPS, Case, folder_size_mb, sample
from models.toyworld.world import (
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    BASE_TEXTURES,
    COLOURS,
    HELD_OUT,
    SHAPES,
    TEXTURES,
    Scene,
    SceneObject,
    render_scene,
    sample_batch,
)
from models.weights_files import load_tensors

CONTACT_PROMPTS = (
    "a red circle on a white background",
    "a blue striped square on a black background",
    "a yellow dotted triangle on a white background",
    "a green square on a black background",
    "a red striped circle and a blue triangle",
    "a yellow square and a green dotted circle",
    "a purple star on a white background",
    "a blue checkered heart on a white background",
)


def single_object_cases(limit: int | None = None) -> list[Case]:
    """Every base shape x colour x texture x background, one seed each (72 prompts)."""
    combos = itertools.product(BASE_SHAPES, BASE_COLOURS, BASE_TEXTURES, BACKGROUNDS)
    cases = [
        Case(Scene((SceneObject(s, c, t),), background=b), seed=i) for i, (s, c, t, b) in enumerate(combos)
    ]
    return cases[:limit]


def two_object_cases(count: int = 32) -> list[Case]:
    """Seeded random pairs of base objects (different shapes), background named."""
    rng = random.Random(1234)
    cases = []
    for index in range(count):
        first, second = rng.sample(BASE_SHAPES, 2)
        objects = (
            SceneObject(first, rng.choice(BASE_COLOURS), rng.choice(BASE_TEXTURES)),
            SceneObject(second, rng.choice(BASE_COLOURS), rng.choice(BASE_TEXTURES)),
        )
        cases.append(Case(Scene(objects, background=rng.choice(tuple(BACKGROUNDS))), seed=1000 + index))
    return cases


def held_out_cases() -> dict[str, list[Case]]:
    """Prompts that name one held-out concept (everything else in-distribution), keyed by that concept."""
    cases: dict[str, list[Case]] = {}
    for kind, names in HELD_OUT.items():
        for name in names:
            for index, (colour, shape) in enumerate(itertools.product(BASE_COLOURS, BASE_SHAPES)):
                attrs = {"shape": shape, "colour": colour, "texture": "plain", kind: name}
                obj = SceneObject(attrs["shape"], attrs["colour"], attrs["texture"])
                cases.setdefault(name, []).append(Case(Scene((obj,), background="white"), seed=2000 + index))
    return cases


def generate(pipe, cases: list[Case], batch_size: int = 8, guidance: float = GUIDANCE) -> list[Image.Image]:  # type: ignore[no-untyped-def]
    """Images for `cases` (their captions as prompts, their seeds)."""
    return sample(
        pipe, [case.scene.caption() for case in cases], [case.seed for case in cases], batch_size, guidance
    )


def prompt_accuracy(pipe, cases: list[Case], keys: tuple[str, ...] = ("all",)) -> float:  # type: ignore[no-untyped-def]
    """Fraction of cases whose image passes every check in `keys`."""
    images = generate(pipe, cases)
    passed = [
        all(check_scene(image, case.scene)[key] for key in keys)
        for image, case in zip(images, cases, strict=True)
    ]
    return float(np.mean(passed))


def held_out_rates(pipe) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """For each held-out concept, how often text alone produced it (by the checks)."""
    kind_of = {name: kind for kind, names in HELD_OUT.items() for name in names}
    rates = {}
    for name, cases in held_out_cases().items():
        images = generate(pipe, cases)
        key = kind_of[name]
        rates[name] = float(
            np.mean([check_scene(img, c.scene)[key] for img, c in zip(images, cases, strict=True)])
        )
    return rates


def clip_zero_shot(clip_path: str | Path, count: int = 120) -> dict[str, float]:
    """Zero-shot accuracy of the tiny CLIP on clean scenes (all concepts): for each attribute, pick the caption
    among those differing only in that attribute."""
    model = clip.model.build_model(load_tensors(clip_path)).float().eval()
    preprocess = clip.clip._transform(model.visual.input_resolution)
    scenes = [scene for scene in sample_batch(77, count * 2, held_out=True, two_object_rate=0.0)][:count]
    options = {
        "shape": SHAPES,
        "colour": tuple(COLOURS),
        "texture": TEXTURES,
        "background": tuple(BACKGROUNDS),
    }
    correct = dict.fromkeys(options, 0)
    with torch.no_grad():
        pixels = torch.stack([preprocess(render_scene(scene)) for scene in scenes])
        image_features = model.encode_image(pixels)
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        for index, scene in enumerate(scenes):
            obj = scene.objects[0]
            for kind, values in options.items():
                captions = []
                for value in values:
                    changed = {"shape": obj.shape, "colour": obj.colour, "texture": obj.texture, kind: value}
                    background = value if kind == "background" else scene.background
                    variant = SceneObject(changed["shape"], changed["colour"], changed["texture"], obj.box)
                    captions.append(Scene((variant,), background=background).caption())
                text = model.encode_text(clip.tokenize(captions))
                text = text / text.norm(dim=-1, keepdim=True)
                truth = values.index(scene.background if kind == "background" else getattr(obj, kind))
                correct[kind] += int((image_features[index] @ text.t()).argmax()) == truth
    return {kind: hits / count for kind, hits in correct.items()}


def contact_sheet(pipe, path: Path, seeds: int = 4) -> Path:  # type: ignore[no-untyped-def]
    """A PNG grid: one row per prompt of CONTACT_PROMPTS, `seeds` samples each, upscaled 4x, prompt as label."""
    scale, label_width = 4, 330
    rows = []
    for row, prompt in enumerate(CONTACT_PROMPTS):
        generators = [torch.Generator().manual_seed(row * 100 + k) for k in range(seeds)]
        rows.append(
            pipe(
                [prompt] * seeds, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=generators
            ).images
        )
    tile = rows[0][0].width * scale
    sheet = Image.new("RGB", (label_width + seeds * (tile + 4), len(rows) * (tile + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (prompt, images) in enumerate(zip(CONTACT_PROMPTS, rows, strict=True)):
        top = row * (tile + 4)
        draw.text((6, top + tile // 2 - 6), prompt, fill=(0, 0, 0))
        for col, image in enumerate(images):
            sheet.paste(
                image.resize((tile, tile), Image.Resampling.NEAREST), (label_width + col * (tile + 4), top)
            )
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", type=Path, default=TOYWORLD_PIPELINE)
    parser.add_argument("--clip", type=Path, default=TOYWORLD_CLIP)
    parser.add_argument(
        "--contact-sheet", type=Path, default=None, help=f"write a contact sheet (e.g. {CONTACT_SHEET})"
    )
    parser.add_argument("--quick", action="store_true", help="16 single-object prompts and 8 pairs only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    pipe = load_pipeline(args.pipeline, device="cpu")
    figures = {"load_s_first": time.perf_counter() - start}
    start = time.perf_counter()
    pipe = load_pipeline(args.pipeline, device="cpu")
    figures["load_s"] = time.perf_counter() - start
    generate(pipe, [Case(Scene((SceneObject("circle", "red"),)), seed=0)], batch_size=1)
    start, cpu_start = time.perf_counter(), time.process_time()
    generate(pipe, [Case(Scene((SceneObject("circle", "red"),)), seed=s) for s in range(4)], batch_size=4)
    figures["four_images_25_steps_s"] = time.perf_counter() - start
    figures["four_images_25_steps_cpu_s"] = time.process_time() - cpu_start
    figures["single_object_accuracy"] = prompt_accuracy(pipe, single_object_cases(16 if args.quick else None))
    figures["two_object_rate"] = prompt_accuracy(
        pipe,
        two_object_cases(8 if args.quick else 32),
        keys=("left.colour", "left.shape", "right.colour", "right.shape"),
    )
    figures.update({f"held_out_{name}": rate for name, rate in held_out_rates(pipe).items()})
    figures.update({f"clip_zero_shot_{kind}": acc for kind, acc in clip_zero_shot(args.clip).items()})
    figures["clip_zero_shot"] = float(
        np.mean([v for k, v in figures.items() if k.startswith("clip_zero_shot_")])
    )
    figures["assets_mb"] = folder_size_mb(args.pipeline.parent)
    if args.contact_sheet:
        contact_sheet(pipe, args.contact_sheet)
    for name, value in figures.items():
        print(f"{name:32s} {value:.3f}")
    chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "texture": 1 / len(TEXTURES)}
    print("held-out chance levels: " + ", ".join(f"{k} {v:.2f}" for k, v in chance.items()))
    return figures


if __name__ == "__main__":
    main()
