"""Toy world v2 quality report for DreamBooth training: is a new user's first subject learnt with the defaults?

DreamBooth (Ruiz et al. 2023) as a newcomer runs it on toy world v2 (issue #37): five pictures of a subject the
base model never drew — a held-out shape in a held-out colour, "orange heart" by default — drawn by
`models.toyworld.v2.subjects` (its own routine at 96 px, another size, place, tilt and edge softness than the
world's renderer, as a person's own pictures would be), trained with every adapter family at the base model's
profile defaults (`models.profiles`: steps, learning rate, batch, min-SNR, no prior preservation, as the app's
Train tab starts) on the `vo` targets, with the app's instance prompt ("a photo of <trigger>") and the
subject's own name as the trigger (the v2 base's text tower keeps no meaning for held-out words, so "orange
heart" is as new to it as DreamBooth's rare token). Every family trains once per training seed (default 0, 1
and 2); judged by the world's checks (`models.toyworld.v2.checks`):

* subject rate — trigger prompts over the three backgrounds, the fraction of samples showing the subject with
  shape and colour both right (target >= 80% for every seed);
* prompt accuracy — single-object base-world prompts without the trigger, scored on colour, shape and
  background, against the base model on the same seeds (language drift: within 5 points for every seed);
* trainable parameters, adapter file size, steps/s and wall time.

It replaces `training.quality` (the v1 report) when toy world v2 becomes the shipped base model; until then it
takes the v2 pipeline folder as `--base-model`.

    python -m training.quality_v2 --base-model DIR [--families lora krona ...] [--train-seeds 0 1 2]
                                  [--subject-shape heart] [--subject-colour orange] [--prior] [--guidance G]
                                  [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.adapters import FAMILIES
from models.adapters.files import load_adapter_file
from models.cli_options import parse_key_values
from models.pipelines import load_pipeline
from models.profiles import TOYWORLD
from models.toyworld.sampling import Case
from models.toyworld.v2.checks import shows
from models.toyworld.v2.evaluate import check_rates, generate, single_object_cases
from models.toyworld.v2.subjects import SUBJECT_SHAPES, SUBJECT_TEXTURES, draw_subject
from models.toyworld.v2.world import BACKGROUNDS, COLOURS, HELD_OUT, concept_scene, render_scene, sample_batch
from training.config import TrainConfig
from training.dreambooth import train
from training.quality import option_problem

SUBJECT_TARGET = 0.80
DRIFT_LIMIT = 0.05
PROMPT_CHECKS = ("colour", "shape", "background")
"""What no-trigger prompts are scored on (language drift); texture is left out so that the base model's own
texture misses do not blur the drift measurement."""
SUBJECT_PICTURES = 5


@dataclass(frozen=True)
class QualitySettings:
    """The protocol: the subject, and what the runs set over the profile's defaults (nothing by default)."""

    subject_shape: str = "heart"
    subject_colour: str = "orange"
    subject_texture: str = "plain"
    targets: str | list[str] = "vo"
    steps: int | None = None
    """None: the profile's steps for the family."""
    learning_rate: float | None = None
    """None: the profile's rate for the family."""
    adapter_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    prior: bool = False
    """Prior preservation on captioned base-world renders (off by default, as in the app)."""
    instance_prompt: str = "a photo of {trigger}"
    """The instance prompt, `{trigger}` standing for the trigger (the app's Train tab writes this one)."""
    train_options_extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_seeds: tuple[int, ...] = (0, 1, 2)
    guidance: float = TOYWORLD.generation.compose_guidance
    """Classifier-free guidance of every sample (trigger and no-trigger prompts, base and adapters alike): the
    profile's, which the app generates with."""

    def __post_init__(self) -> None:
        if self.subject_shape not in SUBJECT_SHAPES:
            raise ValueError(
                f"subject shape {self.subject_shape!r}: choose one of {', '.join(SUBJECT_SHAPES)}"
            )
        if self.subject_colour not in COLOURS:
            raise ValueError(f"subject colour {self.subject_colour!r}: choose one of {', '.join(COLOURS)}")
        if self.subject_texture not in SUBJECT_TEXTURES:
            raise ValueError(
                f"subject texture {self.subject_texture!r}: choose one of {', '.join(SUBJECT_TEXTURES)}"
            )
        held_out = {value for values in HELD_OUT.values() for value in values}
        if not held_out & {self.subject_shape, self.subject_colour, self.subject_texture}:
            raise ValueError(
                f"the subject {self.trigger!r} is all base-world words; give it a held-out shape, colour or "
                f"texture ({', '.join(sorted(held_out))})"
            )
        if not self.guidance >= 1:
            raise ValueError(
                f"guidance {self.guidance}: give a scale >= 1 (1 turns classifier-free guidance off)"
            )
        if "{trigger}" not in self.instance_prompt:
            raise ValueError(f"instance prompt {self.instance_prompt!r} must contain {{trigger}}")

    @property
    def trigger(self) -> str:
        """The subject's own name, as a caption names it: "orange heart", "red checkered square"."""
        texture = "" if self.subject_texture == "plain" else f"{self.subject_texture} "
        return f"{self.subject_colour} {texture}{self.subject_shape}"

    def shown_in(self, image: Any) -> bool:
        """Whether an object of the subject's shape and colour (and texture, where it has one) is in the image."""
        texture = None if self.subject_texture == "plain" else self.subject_texture
        return shows(image, self.subject_colour, self.subject_shape, texture)


def write_subject_pictures(folder: Path, settings: QualitySettings, count: int = SUBJECT_PICTURES) -> Path:
    """`count` drawn pictures of the subject, one per background in turn (no caption sidecars: the instance
    prompt captions them, as in the app)."""
    folder.mkdir(parents=True, exist_ok=True)
    backgrounds = list(BACKGROUNDS)
    for index in range(count):
        picture = draw_subject(
            settings.subject_shape,
            settings.subject_colour,
            seed=index,
            background=backgrounds[index % 3],
            texture=settings.subject_texture,
        )
        picture.save(folder / f"subject-{index}.png")
    return folder


def write_class_renders(folder: Path, count: int, seed: int = 777) -> Path:
    """`count` rendered base-world scenes with their captions as sidecars (prior preservation's class images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(sample_batch(seed, count, held_out=False)):
        render_scene(scene).save(folder / f"class-{index:05d}.png")
        (folder / f"class-{index:05d}.txt").write_text(scene.caption() + "\n", encoding="utf-8")
    return folder


def subject_cases(settings: QualitySettings, count: int = 36) -> list[Case]:
    """Trigger prompts: the subject alone on each background in turn, seeded (5000 + index)."""
    backgrounds = list(BACKGROUNDS)
    return [
        Case(
            concept_scene(
                settings.subject_shape,
                settings.subject_colour,
                settings.subject_texture,
                backgrounds[index % 3],
                seed=index,
            ),
            seed=5000 + index,
        )
        for index in range(count)
    ]


def subject_rate(pipe: Any, cases: list[Case], settings: QualitySettings) -> float:
    """Fraction of the trigger prompts' samples showing the subject (`QualitySettings.shown_in`)."""
    images = generate(pipe, cases, guidance=settings.guidance)
    return float(np.mean([settings.shown_in(image) for image in images]))


def drift_cases(count: int = 72) -> list[Case]:
    """Single-object base-world prompts (no held-out word), seeded."""
    return single_object_cases(count)


def train_options(settings: QualitySettings, out: Path) -> dict[str, Any]:
    """The `TrainConfig` options the protocol sets (everything else: the profile's)."""
    options: dict[str, Any] = {
        "targets": settings.targets,
        "adapter_config": dict(settings.adapter_config),
        "max_train_steps": settings.steps,
        "learning_rate": settings.learning_rate,
        "instance_prompt": settings.instance_prompt.format(trigger=settings.trigger),
        "trigger_phrase": settings.trigger,
    }
    if settings.prior:
        classes = out / "class-renders"
        if not classes.exists():
            write_class_renders(classes, 100)
        options |= {
            "with_prior_preservation": True,
            "class_data_dir": str(classes),
            "class_prompt": "a scene",  # unused: every class render has its caption
        }
    return options | dict(settings.train_options_extra)


def train_subject(
    family: str, model: str, pictures: Path, out: Path, seed: int, settings: QualitySettings
) -> tuple[Any, float]:
    """Train `family` on `pictures` once with training seed `seed` into `out/<family>/seed-<seed>`, as the
    protocol says; returns the `training.dreambooth` result and the wall time in seconds."""
    config = TrainConfig(
        pretrained_model_name_or_path=model,
        instance_data_dir=str(pictures),
        adapter=family,
        output_dir=str(out / family / f"seed-{seed}"),
        seed=seed,
        checkpointing_steps=10**9,
        validation_steps=0,
        **train_options(settings, out),
    )
    started = time.perf_counter()
    result = train(config)
    if result.adapter_path is None:
        raise RuntimeError(f"training {settings.trigger} ({family}, seed {seed}) produced no adapter file")
    return result, time.perf_counter() - started


def train_and_score(
    family: str, model: str, pictures: Path, out: Path, seed: int, settings: QualitySettings,
    cases: list[Case], prompts: list[Case],
) -> dict[str, Any]:  # fmt: skip
    """Train `family` once with training seed `seed` and score the adapter."""
    result, wall = train_subject(family, model, pictures, out, seed, settings)
    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    load_adapter_file(result.adapter_path).attach(pipe.unet)
    checks = check_rates(pipe, prompts, PROMPT_CHECKS, guidance=settings.guidance)
    return {
        "seed": seed,
        "adapter": str(result.adapter_path),
        "subject_rate": subject_rate(pipe, cases, settings),
        "prompt_accuracy": checks.pop("all"),
        "prompt_checks": checks,
        "trainable_parameters": result.trainable_parameters,
        "file_bytes": result.adapter_path.stat().st_size,
        "steps": result.steps,
        "steps_per_second": result.steps_per_second,
        "wall_seconds": wall,
    }


def run_report(
    families: list[str], model: str, out: Path, settings: QualitySettings | None = None,
    subject_count: int = 36, prompt_count: int = 72,
) -> dict[str, Any]:  # fmt: skip
    """Train and score every family once per training seed; the base model's figures beside them."""
    settings = settings or QualitySettings()
    pictures = write_subject_pictures(out / "subject", settings)
    cases, prompts = subject_cases(settings, subject_count), drift_cases(prompt_count)
    base = load_pipeline(model, device="cpu", dtype="fp32")
    checks = check_rates(base, prompts, PROMPT_CHECKS, guidance=settings.guidance)
    report: dict[str, Any] = {
        "base": {"subject_rate": subject_rate(base, cases, settings),
                 "prompt_accuracy": checks.pop("all"), "prompt_checks": checks},
        "samples": {"subject": len(cases), "prompts": len(prompts)},
        "settings": dataclasses.asdict(settings),
        "families": [],
    }  # fmt: skip
    for family in families:
        runs = [
            train_and_score(family, model, pictures, out, seed, settings, cases, prompts)
            for seed in settings.train_seeds
        ]
        for run in runs:
            run["drift"] = report["base"]["prompt_accuracy"] - run["prompt_accuracy"]
        report["families"].append(
            {
                "family": family,
                "runs": runs,
                "subject_rate": float(np.mean([run["subject_rate"] for run in runs])),
                "worst_subject_rate": min(run["subject_rate"] for run in runs),
                "worst_drift": max(run["drift"] for run in runs),
                "passes": all(
                    run["subject_rate"] >= SUBJECT_TARGET and run["drift"] <= DRIFT_LIMIT for run in runs
                ),
            }
        )
    return report


def _by_check(checks: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.0%}" for key, value in checks.items())


def format_report(report: dict[str, Any]) -> str:
    settings, base = report["settings"], report["base"]
    lines = [
        f"toy world v2, subject: {QualitySettings(**settings).trigger} (drawn pictures, "
        f"instance prompt {settings['instance_prompt']!r}), {report['samples']['subject']} trigger samples and "
        f"{report['samples']['prompts']} no-trigger prompts per run, guidance {settings['guidance']:g}",
        f"base model: subject {base['subject_rate']:.0%}, prompt accuracy {base['prompt_accuracy']:.1%} "
        f"({_by_check(base['prompt_checks'])})",
        f"{'family':<7}{'seed':>5}{'subject':>9}{'prompts':>9}{'drift':>8}{'params':>11}{'file KB':>9}"
        f"{'steps':>7}{'steps/s':>9}{'wall s':>8}  prompts right by check",
    ]
    for row in report["families"]:
        for run in row["runs"]:
            lines.append(
                f"{row['family']:<7}{run['seed']:>5}{run['subject_rate']:>9.0%}{run['prompt_accuracy']:>9.1%}"
                f"{run['drift'] * 100:>+7.1f}p{run['trainable_parameters']:>11,}{run['file_bytes'] / 1024:>9.1f}"
                f"{run['steps']:>7}{run['steps_per_second']:>9.2f}{run['wall_seconds']:>8.0f}"
                f"  {_by_check(run['prompt_checks'])}"
            )
        lines.append(
            f"{row['family']:<7} mean subject {row['subject_rate']:.0%}, worst {row['worst_subject_rate']:.0%}, "
            f"worst drift {row['worst_drift'] * 100:+.1f} points: "
            f"{'passes' if row['passes'] else 'FAILS'} (>= {SUBJECT_TARGET:.0%}, <= {DRIFT_LIMIT * 100:.0f} points)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.quality_v2", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--base-model", required=True, help="the toy world v2 pipeline folder")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--train-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--subject-shape", default="heart", choices=SUBJECT_SHAPES)
    parser.add_argument("--subject-colour", default="orange", choices=list(COLOURS))
    parser.add_argument("--subject-texture", default="plain", choices=SUBJECT_TEXTURES)
    parser.add_argument("--targets", nargs="+", default=["vo"], help="target preset or module patterns")
    parser.add_argument("--steps", type=int, default=None, help="default: the profile's, per family")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="default: the profile's, per family"
    )
    parser.add_argument("--prior", action="store_true", help="prior preservation on 100 base-world renders")
    parser.add_argument("--instance-prompt", default=QualitySettings.instance_prompt, help="with {trigger}")
    parser.add_argument(
        "--adapter-option", action="append", default=[], metavar="KEY=VALUE",
        help="family hyperparameter over its default (JSON value), e.g. rank=16; with one family",
    )  # fmt: skip
    parser.add_argument(
        "--train-option", action="append", default=[], metavar="KEY=VALUE",
        help="any other TrainConfig option (JSON value), e.g. prior_loss_weight=0.5",
    )  # fmt: skip
    parser.add_argument(
        "--guidance", type=float, default=QualitySettings.guidance,
        help="classifier-free guidance of every sample (default: the profile's, as the app generates)",
    )  # fmt: skip
    parser.add_argument("--subject-samples", type=int, default=36)
    parser.add_argument("--prompt-samples", type=int, default=72)
    parser.add_argument("--out", type=Path, default=None, help="keep pictures and adapters here")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    try:
        adapter_config = parse_key_values(args.adapter_option, "--adapter-option", "rank=16")
        extra = parse_key_values(args.train_option, "--train-option", "prior_loss_weight=0.5")
        settings = QualitySettings(
            subject_shape=args.subject_shape,
            subject_colour=args.subject_colour,
            subject_texture=args.subject_texture,
            targets=args.targets[0] if len(args.targets) == 1 else args.targets,
            steps=args.steps,
            learning_rate=args.learning_rate,
            adapter_config=adapter_config,
            prior=args.prior,
            instance_prompt=args.instance_prompt,
            train_options_extra=extra,
            train_seeds=tuple(args.train_seeds),
            guidance=args.guidance,
        )
    except ValueError as error:
        parser.error(str(error))
    problem = option_problem(adapter_config, extra, args.families)
    if problem:
        parser.error(problem)
    if not (Path(args.base_model) / "model_index.json").is_file():
        parser.error(f"--base-model {args.base_model}: not a diffusers pipeline folder (no model_index.json)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="atelier-quality-v2-") as tmp:
        report = run_report(
            args.families, args.base_model, args.out or Path(tmp), settings, args.subject_samples,
            args.prompt_samples,
        )  # fmt: skip
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if all(row["passes"] for row in report["families"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
