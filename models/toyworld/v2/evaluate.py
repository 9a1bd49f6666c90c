"""Quality report of a trained toy world v2: does the image show what the prompt asked?

No paper: the toy world's acceptance test. Seeded prompt sets are generated with the saved pipeline (DDIM
trailing, 25 steps, classifier-free guidance 5) and every image is judged by `models.toyworld.v2.checks`.
Reported, with the issue's targets: single-object accuracy (colour, shape, texture and background all right;
>= 95%), two- and three-object rates (every object in its named place with the right colour and shape, the
objects named in random order; >= 85%), held-out concepts from text alone (near chance), the tiny CLIP's
zero-shot attribute accuracy (>= 90%), load time (< 2 s), 4 images at 25 steps on one core (< 3 s) and the
size of the assets (<= 80 MB).

    python -m models.toyworld.v2.evaluate --pipeline DIR --clip FILE.safetensors [--quick] [--contact-sheet PNG]
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
from safetensors.torch import load_file

from models.atomic_write import atomic_write
from models.clip_compat import clip
from models.pipelines import load_pipeline
from models.toyworld import clip_model
from models.toyworld.sampling import GUIDANCE, Case, folder_size_mb, sample
from models.toyworld.v2.checks import check_scene
from models.toyworld.v2.train import binding_variants, place_variants
from models.toyworld.v2.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    BASE_TEXTURES,
    COLOURS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    TEXTURES,
    Scene,
    attribute_value,
    concept_scene,
    place_objects,
    render_scene,
    with_attribute,
)

CONTACT_PROMPTS = (
    "a red circle on a white background",
    "a blue striped square on a black background",
    "a yellow dotted triangle on a grey background",
    "a green barred star",
    "a pink ring on the left and a brown cross on the right",
    "a blue diamond on the right and a yellow crescent on the left",
    "a red star on the left, a green circle in the middle and a purple square on the right",
    "an orange heart on a white background",
)


def generate(pipe, cases: list[Case], batch_size: int = 8, guidance: float = GUIDANCE) -> list[Image.Image]:  # type: ignore[no-untyped-def]
    """Images for `cases` (their captions as prompts, their seeds)."""
    prompts = [case.scene.caption() for case in cases]
    return sample(pipe, prompts, [case.seed for case in cases], batch_size, guidance)


def single_object_cases(count: int | None = 216) -> list[Case]:
    """Base shape x colour x texture x background (756 combinations), a seeded subset of `count` (None: all)."""
    combos = list(itertools.product(BASE_SHAPES, BASE_COLOURS, BASE_TEXTURES, BACKGROUNDS))
    if count is not None:
        combos = random.Random(99).sample(combos, min(count, len(combos)))
    return [concept_case(s, c, t, b, seed=i) for i, (s, c, t, b) in enumerate(combos)]


def concept_case(shape: str, colour: str, texture: str, background: str, seed: int) -> Case:
    return Case(concept_scene(shape, colour, texture, background, seed=seed), seed=seed)


def multi_object_cases(objects: int, count: int = 48) -> list[Case]:
    """Seeded scenes of `objects` base objects with different shapes, named in random order with their places."""
    rng = random.Random(1000 * objects)
    cases = []
    for index in range(count):
        shapes = rng.sample(BASE_SHAPES, objects)
        attributes = [(shape, rng.choice(BASE_COLOURS), rng.choice(BASE_TEXTURES)) for shape in shapes]
        order = list(range(objects))
        rng.shuffle(order)
        scene = Scene(
            place_objects(rng, attributes),
            background=rng.choice(tuple(BACKGROUNDS)),
            order=tuple(order),
            mention_positions=True,
        )
        cases.append(Case(scene, seed=1000 * objects + index))
    return cases


def held_out_cases(per_concept: int = 36) -> dict[str, list[Case]]:
    """Prompts that name one held-out concept (everything else in-distribution), keyed by that concept."""
    cases: dict[str, list[Case]] = {}
    combos = list(itertools.product(BASE_COLOURS, BASE_SHAPES))
    for kind, names in HELD_OUT.items():
        for name in names:
            for index, (colour, shape) in enumerate(random.Random(7).sample(combos, per_concept)):
                attrs = {"shape": shape, "colour": colour, "texture": "plain", kind: name}
                scene = concept_scene(attrs["shape"], attrs["colour"], attrs["texture"], "white", seed=index)
                cases.setdefault(name, []).append(Case(scene, seed=2000 + index))
    return cases


def check_rates(  # type: ignore[no-untyped-def]
    pipe, cases: list[Case], keys: tuple[str, ...], guidance: float = GUIDANCE
) -> dict[str, float]:
    """From one generation of `cases`: the fraction passing each check in `keys`, and under `"all"` the
    fraction passing all of them."""
    images = generate(pipe, cases, guidance=guidance)
    results = [check_scene(image, case.scene) for image, case in zip(images, cases, strict=True)]
    rates = {key: float(np.mean([r[key] for r in results])) for key in keys}
    rates["all"] = float(np.mean([all(r[key] for key in keys) for r in results]))
    return rates


def rate(pipe, cases: list[Case], keys: tuple[str, ...] | None = None, guidance: float = GUIDANCE) -> float:  # type: ignore[no-untyped-def]
    """Fraction of cases whose image passes every check in `keys` (None: `all`)."""
    return check_rates(pipe, cases, keys or ("all",), guidance)["all"]


def slot_keys(objects: int) -> tuple[str, ...]:
    return tuple(f"{slot}.{kind}" for slot in POSITIONS[objects] for kind in ("colour", "shape"))


def held_out_rates(pipe, per_concept: int = 36, guidance: float = GUIDANCE) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """For each held-out concept, how often text alone produced it (by the checks)."""
    kind_of = {name: kind for kind, names in HELD_OUT.items() for name in names}
    return {
        name: rate(pipe, cases, (kind_of[name],), guidance)
        for name, cases in held_out_cases(per_concept).items()
    }


def load_scorer(path: str | Path) -> clip.model.CLIP:
    """The tiny CLIP from its safetensors state dict (clip-anytorch's `build_model` infers the architecture)."""
    return clip.model.build_model(load_file(str(path))).float().eval()


def _scorer(clip_or_path: str | Path | clip.model.CLIP) -> clip.model.CLIP:
    if isinstance(clip_or_path, clip.model.CLIP):
        return clip_or_path.eval()
    return load_scorer(clip_or_path)


def _image_features(model: clip.model.CLIP, scenes: list[Scene]) -> torch.Tensor:
    """Unit-length CLIP image features of the clean renders of `scenes`."""
    images = torch.from_numpy(np.stack([np.asarray(render_scene(s), dtype=np.float32) for s in scenes]))
    features = model.encode_image(clip_model.normalize_images(images.permute(0, 3, 1, 2) / 127.5 - 1))
    return features / features.norm(dim=-1, keepdim=True)


def clip_zero_shot(clip_or_path: str | Path | clip.model.CLIP, count: int = 120) -> dict[str, float]:
    """Zero-shot accuracy of the tiny CLIP on clean one-object scenes (all concepts): for each attribute, pick
    the caption among those that differ only in that attribute."""
    model = _scorer(clip_or_path)
    rng = random.Random(77)
    scenes = [
        concept_scene(
            rng.choice(SHAPES),
            rng.choice(tuple(COLOURS)),
            rng.choice(TEXTURES),
            rng.choice(tuple(BACKGROUNDS)),
            seed=i,
        )
        for i in range(count)
    ]
    correct = dict.fromkeys(ATTRIBUTES, 0)
    with torch.no_grad():
        features = _image_features(model, scenes)
        for index, scene in enumerate(scenes):
            for kind, values in ATTRIBUTES.items():
                captions = [with_attribute(scene, kind, value).caption() for value in values]
                text = model.encode_text(clip.tokenize(captions))
                text = text / text.norm(dim=-1, keepdim=True)
                truth = values.index(attribute_value(scene, kind))
                correct[kind] += int((features[index] @ text.t()).argmax()) == truth
    return {kind: hits / count for kind, hits in correct.items()}


TIE = 1e-5
"""Cosine margin below which two captions score the same (identical token sequences can differ by rounding)."""


def clip_binding_choice(clip_or_path: str | Path | clip.model.CLIP, count: int = 200) -> dict[str, float]:
    """How often the tiny CLIP scores a rendered two-object scene's true caption (places named) above the same
    words rebound: `places`, the two objects named in exchanged places, and `binding`, the two objects
    exchanging their shapes, colours or textures (each exchange that changes the claim). 0.5 is chance: a
    bag-of-words model that reads which words are there but not which goes where scores about that."""
    model = _scorer(clip_or_path)
    scenes = [case.scene for case in multi_object_cases(2, count)]
    wins: dict[str, list[bool]] = {"places": [], "binding": []}
    with torch.no_grad():
        features = _image_features(model, scenes)
        for index, scene in enumerate(scenes):
            for kind, captions in (
                ("places", place_variants(scene)),
                ("binding", binding_variants(scene, random.Random(index))),
            ):
                text = model.encode_text(clip.tokenize(captions))
                scores = features[index] @ (text / text.norm(dim=-1, keepdim=True)).t()
                wins[kind] += [bool(scores[0] - other > TIE) for other in scores[1:]]
    return {kind: float(np.mean(won)) for kind, won in wins.items()}


TARGETS: dict[str, tuple[str, float]] = {
    "single_object_accuracy": (">=", 0.95),
    "2_object_rate": (">=", 0.85),
    "3_object_rate": (">=", 0.85),
    "clip_zero_shot_shape": (">=", 0.90),
    "clip_zero_shot_colour": (">=", 0.90),
    "clip_zero_shot_texture": (">=", 0.90),
    "clip_zero_shot_background": (">=", 0.90),
    "load_s": ("<", 2.0),
    "four_images_25_steps_s": ("<", 3.0),
    "assets_mb": ("<=", 80.0),
}
"""Issue #37's targets for the base model (the CLIP's bar is held for each attribute, not only their mean)."""


def near_chance_bound(kind: str, samples: int) -> float:
    """The highest rate of a held-out concept drawn from text alone that still counts as chance: the checks'
    chance of reading that concept (one of the world's shapes, colours or textures) plus two binomial standard
    errors for `samples` images."""
    chance = 1 / len(ATTRIBUTES[kind])
    return chance + 2 * (chance * (1 - chance) / samples) ** 0.5


def verdicts(figures: dict[str, float], held_out_samples: int) -> dict[str, tuple[str, float, bool]]:
    """For each target found in `figures`: (comparison, bound, met). Held-out concepts must stay at or below
    `near_chance_bound`."""
    compare = {">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
    result = {
        name: (op, bound, bool(compare[op](float(figures[name]), bound)))
        for name, (op, bound) in TARGETS.items()
        if name in figures
    }
    kind_of = {name: kind for kind, names in HELD_OUT.items() for name in names}
    for name, kind in kind_of.items():
        key = f"held_out_{name}"
        if key in figures:
            bound = near_chance_bound(kind, held_out_samples)
            result[key] = ("<=", bound, float(figures[key]) <= bound)
    return result


def contact_sheet(pipe, path: Path, seeds: int = 4, scale: int = 3) -> Path:  # type: ignore[no-untyped-def]
    """A PNG grid: one row per prompt of CONTACT_PROMPTS, `seeds` samples each, upscaled, prompt as label."""
    label_width = 420
    rows = [
        sample(pipe, [prompt] * seeds, [row * 100 + k for k in range(seeds)])
        for row, prompt in enumerate(CONTACT_PROMPTS)
    ]
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
    parser.add_argument("--pipeline", type=Path, required=True)
    parser.add_argument("--clip", type=Path, default=None, help="the tiny CLIP (.safetensors)")
    parser.add_argument("--contact-sheet", type=Path, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="48 single-object prompts, 16 of each multi-object"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=GUIDANCE,
        help=f"classifier-free guidance scale (default {GUIDANCE:g})",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    pipe = load_pipeline(args.pipeline, device="cpu")
    figures = {"load_s_first": time.perf_counter() - start}
    start = time.perf_counter()
    pipe = load_pipeline(args.pipeline, device="cpu")
    figures["load_s"] = time.perf_counter() - start
    warm = [concept_case("circle", "red", "plain", "white", seed=s) for s in range(4)]
    generate(pipe, warm[:1], batch_size=1)
    start, cpu_start = time.perf_counter(), time.process_time()
    generate(pipe, warm, batch_size=4)
    figures["four_images_25_steps_s"] = time.perf_counter() - start
    figures["four_images_25_steps_cpu_s"] = time.process_time() - cpu_start
    figures["single_object_accuracy"] = rate(
        pipe, single_object_cases(48 if args.quick else 216), guidance=args.guidance
    )
    for objects in (2, 3):
        cases = multi_object_cases(objects, 16 if args.quick else 48)
        figures[f"{objects}_object_rate"] = rate(pipe, cases, slot_keys(objects), args.guidance)
    held_out_samples = 12 if args.quick else 36
    figures.update(
        {f"held_out_{name}": r for name, r in held_out_rates(pipe, held_out_samples, args.guidance).items()}
    )
    if args.clip:
        zero_shot = clip_zero_shot(args.clip)
        figures.update({f"clip_zero_shot_{kind}": acc for kind, acc in zero_shot.items()})
        figures["clip_zero_shot"] = float(np.mean(list(zero_shot.values())))
        choice = clip_binding_choice(args.clip)
        figures.update({f"clip_prefers_true_{kind}": won for kind, won in choice.items()})
    figures["assets_mb"] = folder_size_mb(args.pipeline.parent)
    if args.contact_sheet:
        contact_sheet(pipe, args.contact_sheet)
    judged = verdicts(figures, held_out_samples)
    for name, value in figures.items():
        verdict = ""
        if name in judged:
            op, bound, met = judged[name]
            verdict = f"  target {op} {bound:.3f}: {'met' if met else 'NOT MET'}"
        print(f"{name:32s} {value:.3f}{verdict}")
    return figures


if __name__ == "__main__":
    main()
