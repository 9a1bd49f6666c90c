"""Sanity check of CLIPScore (Hessel et al. 2021) in the toy world: do matching captions score higher?

On a seeded set of rendered toy-world scenes, each image is scored against its own caption and against a
mismatched one, in two ways:
- `other scene`: the caption of a random other scene of the set that does not also describe this image;
- `one attribute`: the same caption with one attribute of the first object changed (its colour, or its shape
  when the colour cannot change) — a hard negative that only a CLIP which binds attributes gets right.
The figure asked of the toy world's CLIP is: matched > mismatched for at least 90% of the `other scene` pairs.

    python -m evaluation.toyworld_check [--n 200] [--seed 2024] [--held-out] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from evaluation.clip_backends import load_clip
from evaluation.errors import EvaluationError
from evaluation.scores import clipscore_hessel, paired_cosine
from evaluation.scoring import embed_images, embed_texts
from models.atomic_write import atomic_write_text
from models.toyworld.world import (
    BASE_COLOURS,
    BASE_SHAPES,
    COLOURS,
    SHAPES,
    Scene,
    render_scene,
    sample_batch,
)

REQUIRED_FRACTION = 0.9


@dataclass(frozen=True)
class PairStats:
    """How matched captions compare with one kind of mismatched caption (CLIPScore on Hessel's scale)."""

    fraction_matched_higher: float
    mean_matched: float
    mean_mismatched: float
    mean_margin: float
    median_margin: float


@dataclass(frozen=True)
class MatchReport:
    """The toy-world check: `other_scene` carries the >= 90% requirement, `one_attribute` is informative."""

    model: str
    n: int
    seed: int
    held_out: bool
    other_scene: PairStats
    one_attribute: PairStats

    @property
    def passed(self) -> bool:
        """True when matched captions beat other scenes' captions for at least 90% of images."""
        return self.other_scene.fraction_matched_higher >= REQUIRED_FRACTION


def _pair_stats(matched_cos: torch.Tensor, mismatched_cos: torch.Tensor) -> PairStats:
    matched, mismatched = clipscore_hessel(matched_cos), clipscore_hessel(mismatched_cos)
    margin = (matched_cos - mismatched_cos).double()
    return PairStats(
        fraction_matched_higher=float((margin > 0).double().mean()),
        mean_matched=float(matched.double().mean()),
        mean_mismatched=float(mismatched.double().mean()),
        mean_margin=float(2.5 * margin.mean()),
        median_margin=float(2.5 * margin.median()),
    )


def describes(caption_scene: Scene, image_scene: Scene) -> bool:
    """True when `caption_scene`'s caption is also a correct caption of `image_scene`'s image."""
    same_objects = [o.phrase() for o in caption_scene.objects] == [o.phrase() for o in image_scene.objects]
    background_ok = not caption_scene.mention_background or caption_scene.background == image_scene.background
    return same_objects and background_ok


def other_scene_captions(scenes: Sequence[Scene], rng: random.Random) -> list[str]:
    """For scene i, the caption of a random other scene whose caption is not also true of scene i's image."""
    chosen = []
    for scene in scenes:
        candidates = [other for other in scenes if not describes(other, scene)]
        if not candidates:
            raise EvaluationError("the check needs scenes with different content; raise --n")
        chosen.append(rng.choice(candidates).caption())
    return chosen


def one_attribute_caption(scene: Scene, rng: random.Random, held_out: bool) -> str:
    """The scene's caption with the first object's colour (or, failing that, shape) changed."""
    first = scene.objects[0]
    colours = [c for c in (COLOURS if held_out else BASE_COLOURS) if c != first.colour]
    shapes = [s for s in (SHAPES if held_out else BASE_SHAPES) if s != first.shape]
    changed = (
        replace(first, colour=rng.choice(colours)) if colours else replace(first, shape=rng.choice(shapes))
    )
    return replace(scene, objects=(changed, *scene.objects[1:])).caption()


def matched_vs_mismatched(
    n: int = 200,
    seed: int = 2024,
    model: str | Path | None = None,
    device: str | None = None,
    held_out: bool = False,
    batch_size: int = 64,
) -> MatchReport:
    """Render `n` seeded scenes and compare CLIPScores of matched and mismatched captions."""
    if n < 2:
        raise EvaluationError(f"n must be at least 2, got {n}")
    backend = load_clip(model, device)
    scenes = sample_batch(seed, n, held_out=held_out)
    rng = random.Random(seed + 1)
    matched = [scene.caption() for scene in scenes]
    others = other_scene_captions(scenes, rng)
    swapped = [one_attribute_caption(scene, rng, held_out) for scene in scenes]
    image_emb = embed_images(backend, [render_scene(scene) for scene in scenes], batch_size)
    cos = {
        name: paired_cosine(image_emb, embed_texts(backend, texts, batch_size))
        for name, texts in (("matched", matched), ("other", others), ("swapped", swapped))
    }
    return MatchReport(
        model=backend.name,
        n=n,
        seed=seed,
        held_out=held_out,
        other_scene=_pair_stats(cos["matched"], cos["other"]),
        one_attribute=_pair_stats(cos["matched"], cos["swapped"]),
    )


def format_report(report: MatchReport) -> str:
    """A few lines for the terminal."""
    lines = [
        f"toy-world CLIPScore check: model {report.model}, {report.n} scenes, seed {report.seed}, "
        f"held-out concepts {'included' if report.held_out else 'excluded'}",
        f"{'mismatch':<14} {'matched>mis':>11} {'matched':>8} {'mismatched':>10} {'mean gap':>9} {'median gap':>10}",
    ]
    for label, stats in (("other scene", report.other_scene), ("one attribute", report.one_attribute)):
        lines.append(
            f"{label:<14} {stats.fraction_matched_higher:>10.1%} {stats.mean_matched:>8.3f} "
            f"{stats.mean_mismatched:>10.3f} {stats.mean_margin:>9.3f} {stats.median_margin:>10.3f}"
        )
    verdict = "PASS" if report.passed else "FAIL"
    lines.append(
        f"{verdict}: requirement is matched > other-scene caption for >= {REQUIRED_FRACTION:.0%} of images"
    )
    lines.append(
        "scores are CLIPScore (Hessel et al. 2021): 2.5 * max(cos, 0); gaps are 2.5 * (cos_matched - cos_mis)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the check; exit 0 when it passes, 1 when it does not, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.toyworld_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--n", type=int, default=200, help="number of seeded scenes (default 200)")
    parser.add_argument("--seed", type=int, default=2024, help="scene seed (default 2024)")
    parser.add_argument("--held-out", action="store_true", help="also draw the held-out concepts")
    parser.add_argument("--model", help="CLIP to check (default: the toy world's CLIP)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, ...")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = matched_vs_mismatched(args.n, args.seed, args.model, args.device, args.held_out)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        atomic_write_text(
            Path(args.json), json.dumps({**asdict(report), "passed": report.passed}, indent=2) + "\n"
        )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
