"""Toy-world quality report for DreamBooth training: does each adapter family learn a new concept
without forgetting the rest?

DreamBooth (Ruiz et al., 2023) on the project's toy world: every family (LoRA, DiffuseKronA, BOFT, HRA)
with the given targets (default ``vo``, the project default) and the family's default steps and learning
rate is trained on five images of a concept the base model never saw (``--subject``, any held-out concept;
default the colour ``purple``), captioned per image with the trigger in the concept word's place (``--trigger``;
default the concept's own name, "a purple circle on a white background"; ``TRIGGER`` says why not DreamBooth's
rare token "sks"), batch 8 (``--batch``), with prior preservation on captioned regularisation
images of the base world (rendered scenes, the "real class images" variant of DreamBooth's prior loss). Every
family is trained once per training seed (``--train-seeds``, default 0, 1 and 2) and the samples of all its
runs are pooled: the outcome of one run depends on its seed (LoRA at its defaults, batch 4: 95% with seed 0,
78% with seed 1, 90% with seed 2). Then, judged by the deterministic checks of ``models.toyworld.checks``:

* concept accuracy — seeded samples of trigger prompts over the other attributes and both backgrounds, the
  fraction showing the concept (target >= 90%), and the fraction with every other asked attribute right too;
* prompt accuracy — single-object prompts without the trigger, scored on colour, shape and background,
  against the base model on the same seeds (language drift: target within 5 points);
* trainable parameters, adapter file size, steps/s and wall time; and whether DiffuseKronA reaches
  LoRA's concept accuracy with fewer parameters (the DiffuseKronA claim).

    python -m training.quality [--families lora krona ...] [--train-seeds 0 1 2] [--batch 8] [--targets vo] [--no-prior]
                               [--pair-images N] [--adapter-option KEY=VALUE] [--trigger WORD]
                               [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
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
from models.pipelines import default_base_model, load_pipeline
from models.toyworld.checks import ObjectReading, read_object
from models.toyworld.evaluate import prompt_accuracy, single_object_cases
from models.toyworld.sampling import Case, sample
from models.toyworld.world import (
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    HELD_OUT,
    Scene,
    SceneObject,
    place_objects,
    render_scene,
    sample_batch,
)
from training.config import ConfigError, TrainConfig, unknown_options
from training.dreambooth import train
from training.preflight import build_adapter_config

TRIGGER = "sks"
"""DreamBooth's rare-token identifier, and `write_subject_images`' default. It is not the report's default
trigger (`QualitySettings.trigger_word`: the subject's own name). The toy text encoder learnt only toy captions,
so every word outside them reaches nearly one hidden state: "sks" and "zxq" in "a _ circle on a white background"
are at cosine 0.97, and both are 0.54 from "yellow". The base model draws "a sks circle" yellow or red (22 / 18 of
40 samples). Orthogonal adapters (BOFT, HRA) keep the angles between their inputs, so on the value path they
cannot move "sks" away from "yellow" without moving "yellow" too. With `--trigger sks`, HRA showed purple in 62%
of samples over six training seeds and KronA in 80%. The toy world's counterpart of a rare token is a word the
text encoder tells apart but the UNet never drew: the held-out concept's own name. "purple" is at -0.03 from
"yellow", and the base model draws "a purple circle" red or yellow (purple in 3 of 40)."""
CONCEPT_TARGET = 0.90
DRIFT_LIMIT = 0.05
PROMPT_CHECKS = ("colour", "shape", "background")
"""What no-trigger prompts are scored on (language drift): what the base model draws reliably (colour 100%,
shape and background near 100% of the toy world's 72 single-object prompts). Texture is left out so that
base-model misses do not blur the drift measurement."""


@dataclass(frozen=True)
class Subject:
    """A held-out toy-world concept to personalise: which attribute it is and its value."""

    attribute: str  # "shape", "colour" or "texture"
    value: str

    def scene(self, index: int, rng: random.Random | None = None) -> Scene:
        """The ``index``-th scene showing the subject; the other attributes and the background cycle."""
        colour = BASE_COLOURS[index % len(BASE_COLOURS)]
        shape = BASE_SHAPES[index % len(BASE_SHAPES)]
        cycle = len(BASE_SHAPES) if self.attribute == "colour" else len(BASE_COLOURS)
        # prompts: each background after a full cycle of the varied attribute; training images: alternating
        background = list(BACKGROUNDS)[(index if rng is not None else index // cycle) % len(BACKGROUNDS)]
        attributes = {"shape": shape, "colour": colour, "texture": "plain", self.attribute: self.value}
        triple = (attributes["shape"], attributes["colour"], attributes["texture"])
        if rng is None:
            return Scene((SceneObject(*triple),), background=background)
        return Scene(place_objects(rng, [triple]), background=background)

    def pair_scene(self, index: int, rng: random.Random) -> Scene:
        """The ``index``-th two-object scene with the subject beside a base-world object, at pair size in its
        own half (right on even indices, left on odd): what a two-object prompt draws."""
        subject = self.scene(index, rng).objects[0]
        own = (subject.shape, subject.colour, subject.texture)
        # any base-world shape and colour, as in the base world's own pairs (the same colour as a held-out
        # shape, too): the subject's held-out value already tells the two objects apart
        partner = (rng.choice(BASE_SHAPES), rng.choice(BASE_COLOURS), "plain")
        attributes = [partner, own] if index % 2 == 0 else [own, partner]
        background = list(BACKGROUNDS)[index // 2 % len(BACKGROUNDS)]  # each side over both backgrounds
        return Scene(place_objects(rng, attributes), background=background)

    def caption(self, scene: Scene, trigger: str = TRIGGER) -> str:
        """The scene's caption with the subject's word replaced by `trigger` ("a red sks on a ...")."""
        return re.sub(rf"\b{re.escape(self.value)}\b", trigger, scene.caption())

    def shown(self, reading: ObjectReading | None) -> bool:
        return reading is not None and getattr(reading, self.attribute) == self.value


SUBJECTS = {name: Subject(attribute, name) for attribute, names in HELD_OUT.items() for name in names}
"""Every held-out concept of the toy world, by name."""
DEFAULT_SUBJECT = "purple"
"""The report's default subject. A held-out colour is what the toy world can teach from five images: the
held-out shapes and texture are not (measured with LoRA at its defaults, training seed 0: purple 95%, heart
20%, checkered 32%). A base UNet that knows three shapes has no vocabulary of shapes to build a fourth from;
tuning (on the previous, 9600-step base) did not change that (heart with LoRA: 1600 steps 22%, lr 1e-2 20%,
rank 16 12%, qkvo 22%, LoRA on the 16x16 convolutions too 22%, the class noun in the trigger 20%, no prior
preservation 45% with +82 points of drift)."""


@dataclass(frozen=True)
class QualitySettings:
    """The training protocol of the report (everything else is the family's default)."""

    targets: str | list[str] = "vo"
    adapter_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Family hyperparameters over the family's defaults (e.g. {"r": 16} for HRA); none by default."""
    steps: int | None = None
    learning_rate: float | None = None
    snr_gamma: float | None = None
    """Min-SNR γ over the family's default (0 = off); None keeps the toy-world profile's (`models.profiles`)."""
    ema_decay: float | None = None
    """Train with a moving average of the adapter weights at this decay (`TrainConfig.use_ema`); None = without."""
    batch_size: int = 8
    """Instance images per step (as many class images beside them). Batch 8 rather than 4 (five subject images:
    each is seen more than once per step, under other noise and timesteps): LoRA 96.7% (92/100/98 by seed)
    against 87.7% (95/78/90); KronA 87.3% against 89.7%, within the seed-to-seed spread."""
    pair_images: int = 0
    """Two-object subject renders beside the single-object ones (`write_subject_images`' ``pairs``): what an
    adapter composed into a two-object prompt needs to have seen (`composition.quality`)."""
    prior: bool = True
    prior_loss_weight: float | None = None
    """Weight of the prior-preservation loss (DreamBooth's λ; `TrainConfig.prior_loss_weight`); None keeps the
    toy-world profile's (`models.profiles`)."""
    regularisation_images: int = 64
    subject: str = DEFAULT_SUBJECT
    trigger: str | None = None
    """The word that stands for the subject in captions and trigger prompts; None = the subject's own name
    (`trigger_word`; why not 'sks': `TRIGGER`)."""
    train_options_extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further `TrainConfig` options over the protocol's (``--train-option adam_weight_decay=0``); none by
    default."""
    train_seeds: tuple[int, ...] = (0, 1, 2)
    """Each family is trained once per seed; accuracies pool the samples of every run. One seed is not
    enough: the same protocol (batch 4) gave LoRA 95% with seed 0 and 78% with seed 1."""

    @property
    def trigger_word(self) -> str:
        """The trigger the runs use: `trigger`, or the subject's own name."""
        return self.trigger or self.subject

    def train_options(self) -> dict[str, Any]:
        """The TrainConfig options the protocol fixes (prior preservation aside: `prior_options`)."""
        return (
            {
                "targets": self.targets,
                "adapter_config": dict(self.adapter_config),
                "max_train_steps": self.steps,
                "learning_rate": self.learning_rate,
                "snr_gamma": self.snr_gamma,
                "train_batch_size": self.batch_size,
                "center_crop": True,
            }
            | ({"use_ema": True, "ema_decay": self.ema_decay} if self.ema_decay is not None else {})
            | dict(self.train_options_extra)
        )


def _write_captioned(stem: Path, scene: Scene, text: str) -> None:
    """The render of ``scene`` as ``<stem>.png`` and ``text`` as its ``<stem>.txt`` caption sidecar."""
    render_scene(scene).save(stem.with_suffix(".png"))
    stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")


def write_subject_images(
    folder: Path, count: int = 5, seed: int = 0, subject: str = DEFAULT_SUBJECT, trigger: str = TRIGGER,
    pairs: int = 0,
) -> Path:  # fmt: skip
    """``count`` seeded renders of the held-out subject (other attributes, place, size and background vary)
    with trigger captions as sidecars, then ``pairs`` two-object renders of it beside a base-world object
    (`Subject.pair_scene`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    concept = SUBJECTS[subject]
    for index in range(count):
        scene = concept.scene(index, rng)
        _write_captioned(folder / f"subject-{index}", scene, concept.caption(scene, trigger))
    for index in range(pairs):
        scene = concept.pair_scene(index, rng)
        _write_captioned(folder / f"subject-pair-{index}", scene, concept.caption(scene, trigger))
    return folder


def write_regularisation_images(folder: Path, count: int, seed: int = 777) -> Path:
    """``count`` rendered base-world scenes (no held-out concept) with their captions as sidecars."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(sample_batch(seed, count, held_out=False)):
        _write_captioned(folder / f"class-{index:05d}", scene, scene.caption())
    return folder


def base_world_words() -> set[str]:
    """Every word of the base world's captions (its colours, shapes, textures, backgrounds and glue words)."""
    return {
        word for scene in sample_batch(0, 256, held_out=False) for word in scene.caption().lower().split()
    }


def concept_cases(count: int, subject: str = DEFAULT_SUBJECT) -> list[Case]:
    """Trigger prompts over the base world's other attributes and backgrounds, seeded (scene = what should
    appear)."""
    return [Case(SUBJECTS[subject].scene(index), seed=5000 + index) for index in range(count)]


def concept_scores(
    pipe: Any, cases: list[Case], subject: str = DEFAULT_SUBJECT, trigger: str = TRIGGER
) -> tuple[float, float]:
    """(fraction showing the subject, fraction showing it with every other asked attribute) for trigger
    prompts."""
    concept = SUBJECTS[subject]
    prompts = [concept.caption(case.scene, trigger) for case in cases]
    readings = [read_object(image) for image in sample(pipe, prompts, [case.seed for case in cases])]
    shown = [concept.shown(r) for r in readings]
    exact = [
        ok and r is not None and all(r.matches(case.scene.objects[0]).values())
        for ok, r, case in zip(shown, readings, cases, strict=True)
    ]
    return float(np.mean(shown)), float(np.mean(exact))


POOLED = ("concept_accuracy", "concept_exact_accuracy", "prompt_accuracy", "steps_per_second")
"""Row figures averaged over the training seeds (every seed scores the same cases, so the mean of the rates
is the rate over all samples)."""


def prior_options(out: Path, settings: QualitySettings) -> dict[str, Any]:
    """TrainConfig options for prior preservation on the report's regularisation renders, written once under
    ``out`` for every family and seed (none when the protocol has no prior)."""
    if not settings.prior:
        return {}
    return {
        "with_prior_preservation": True,
        "class_data_dir": str(
            write_regularisation_images(out / "regularisation", settings.regularisation_images)
        ),
        "class_prompt": "a scene",  # unused: every regularisation image has its caption
        "num_class_images": settings.regularisation_images,
        "prior_loss_weight": settings.prior_loss_weight,
    }


def _train_and_score(
    family: str, model: str, subject: Path, out: Path, seed: int, *, settings: QualitySettings,
    cases: list[Case], prompts: list[Case], prior: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Train one family with one seed and score it."""
    concept = SUBJECTS[settings.subject]
    config = TrainConfig(
        pretrained_model_name_or_path=model,
        instance_data_dir=str(subject),
        instance_prompt=concept.caption(concept.scene(0), settings.trigger_word),
        trigger_phrase=settings.trigger_word,
        adapter=family,
        output_dir=str(out / family / f"seed-{seed}"),
        seed=seed,
        checkpointing_steps=10**9,
        validation_steps=0,
        num_validation_images=4,
        validation_prompt=concept.caption(concept.scene(6), settings.trigger_word),
        **settings.train_options(),
        **prior,
    )
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    load_adapter_file(result.adapter_path).attach(pipe.unet)
    shown_rate, exact_rate = concept_scores(pipe, cases, settings.subject, settings.trigger_word)
    return {
        "concept_accuracy": shown_rate,
        "concept_exact_accuracy": exact_rate,
        "prompt_accuracy": prompt_accuracy(pipe, prompts, PROMPT_CHECKS),
        "trainable_parameters": result.trainable_parameters,
        "file_bytes": result.adapter_path.stat().st_size,
        "steps": result.steps,
        "steps_per_second": result.steps_per_second,
        "wall_seconds": wall,
    }


def run_family(
    family: str,
    model: str,
    subject: Path,
    out: Path,
    *,
    settings: QualitySettings,
    cases: list[Case],
    prompts: list[Case],
    prior: dict[str, Any],
) -> dict[str, Any]:
    """Train one family once per training seed and score it; returns one report row (the `POOLED` figures
    averaged over the seeds, each seed's concept and prompt accuracy kept under ``by_seed``). ``prior`` holds
    the prior-preservation options every run shares (`prior_options`)."""
    runs = [
        _train_and_score(family, model, subject, out, seed, settings=settings, cases=cases, prompts=prompts,
                         prior=prior)
        for seed in settings.train_seeds
    ]  # fmt: skip
    pooled = {key: float(np.mean([run[key] for run in runs])) for key in POOLED}
    return {
        "family": family,
        **{key: runs[0][key] for key in ("trainable_parameters", "file_bytes", "steps")},
        **pooled,
        "wall_seconds": float(np.sum([run["wall_seconds"] for run in runs])),
        "by_seed": {
            seed: {key: run[key] for key in ("concept_accuracy", "prompt_accuracy")}
            for seed, run in zip(settings.train_seeds, runs, strict=True)
        },
    }


def run_report(
    families: list[str],
    *,
    out: Path,
    settings: QualitySettings | None = None,
    concept_count: int = 40,
    prompt_count: int = 72,
) -> dict[str, Any]:
    """Train and score every family; the dict holds the base-model baseline and one row per family."""
    settings = settings or QualitySettings()
    model = default_base_model()
    if model is None:
        raise SystemExit(
            "the toy world is not installed under assets/toyworld; train it with python -m models.toyworld.train"
        )
    subject = write_subject_images(
        out / "subject", subject=settings.subject, trigger=settings.trigger_word, pairs=settings.pair_images
    )
    cases, prompts = concept_cases(concept_count, settings.subject), single_object_cases(prompt_count)
    base = load_pipeline(model, device="cpu", dtype="fp32")
    base_shown, base_exact = concept_scores(base, cases, settings.subject, settings.trigger_word)
    report: dict[str, Any] = {
        "base": {"concept_accuracy": base_shown, "concept_exact_accuracy": base_exact,
                 "prompt_accuracy": prompt_accuracy(base, prompts, PROMPT_CHECKS)},
        "families": [],
        "samples": {"concept": len(cases), "prompts": len(prompts)},
        "settings": dataclasses.asdict(settings),
    }  # fmt: skip
    prior = prior_options(out, settings)
    for family in families:
        row = run_family(family, str(model), subject, out, settings=settings, cases=cases, prompts=prompts,
                         prior=prior)  # fmt: skip
        row["drift"] = report["base"]["prompt_accuracy"] - row["prompt_accuracy"]
        row["passes"] = row["concept_accuracy"] >= CONCEPT_TARGET and row["drift"] <= DRIFT_LIMIT
        report["families"].append(row)
    rows = {row["family"]: row for row in report["families"]}
    if "lora" in rows and "krona" in rows:
        lora, krona = rows["lora"], rows["krona"]
        report["krona_claim"] = {
            "fewer_parameters": krona["trainable_parameters"] < lora["trainable_parameters"],
            "reaches_lora_accuracy": krona["concept_accuracy"] >= lora["concept_accuracy"],
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    base, subject = report["base"], report["settings"]["subject"]
    lines = [
        f"toy world, subject: held-out {SUBJECTS[subject].attribute} '{subject}' "
        f"(trigger '{report['settings']['trigger'] or subject}'), "
        f"{report['samples']['concept']} concept samples and {report['samples']['prompts']} no-trigger "
        f"prompts per training seed, seeds {', '.join(map(str, report['settings']['train_seeds']))} pooled",
        f"base model: concept {base['concept_accuracy']:.0%} (all attributes {base['concept_exact_accuracy']:.0%}), "
        f"prompt accuracy {base['prompt_accuracy']:.1%}",
        "protocol: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items()),
        f"{'family':<7}{'concept':>9}{'exact':>9}{'prompts':>9}{'drift':>8}{'params':>11}{'file KB':>9}"
        f"{'steps':>7}{'steps/s':>9}{'wall s':>8}  pass  concept by seed",
    ]
    for row in report["families"]:
        lines.append(
            f"{row['family']:<7}{row['concept_accuracy']:>9.0%}{row['concept_exact_accuracy']:>9.0%}"
            f"{row['prompt_accuracy']:>9.1%}{row['drift'] * 100:>+7.1f}p{row['trainable_parameters']:>11,}"
            f"{row['file_bytes'] / 1024:>9.1f}{row['steps']:>7}{row['steps_per_second']:>9.2f}"
            f"{row['wall_seconds']:>8.0f}  {'yes' if row['passes'] else 'NO ':<4}  "
            + " / ".join(f"{run['concept_accuracy']:.0%}" for run in row["by_seed"].values())
        )
    if "krona_claim" in report:
        claim = report["krona_claim"]
        lines.append(
            f"DiffuseKronA vs LoRA: fewer parameters: {'yes' if claim['fewer_parameters'] else 'no'}; "
            f"reaches LoRA's concept accuracy: {'yes' if claim['reaches_lora_accuracy'] else 'no'}"
        )
    return "\n".join(lines)


def option_problem(
    adapter_config: dict[str, Any], train_extra: dict[str, Any], families: list[str]
) -> str | None:
    """What is wrong with a report's `--adapter-option` / `--train-option` values (None: nothing)."""
    unknown = unknown_options(train_extra)
    if unknown:
        return f"--train-option {', '.join(unknown)}: not a TrainConfig option (see training/config.py)"
    if adapter_config and len(families) != 1:
        return "--adapter-option sets one family's hyperparameters: name that family alone in --families"
    if adapter_config:
        try:
            build_adapter_config(TrainConfig(adapter=families[0], adapter_config=adapter_config))
        except ConfigError as error:
            return f"--adapter-option: {error}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: each family's default)"
    )
    parser.add_argument("--learning-rate", type=float, default=None, help="default: each family's default")
    parser.add_argument("--targets", nargs="+", default=["vo"], help="target preset or module patterns")
    parser.add_argument(
        "--snr-gamma", type=float, default=None, help="min-SNR γ (0 = off; default: each family's default)"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help="keep a moving average of the adapter weights (--use_ema)",
    )
    parser.add_argument(
        "--batch", type=int, default=QualitySettings.batch_size, help="instance images per step"
    )
    parser.add_argument(
        "--adapter-option", action="append", default=[], metavar="KEY=VALUE",
        help="family hyperparameter over its default (JSON value), e.g. rank=16; with one family",
    )  # fmt: skip
    parser.add_argument(
        "--pair-images", type=int, default=0, help="two-object subject renders beside the five single ones"
    )
    parser.add_argument(
        "--train-option", action="append", default=[], metavar="KEY=VALUE",
        help="any other TrainConfig option over the protocol's (JSON value), e.g. adam_weight_decay=0",
    )  # fmt: skip
    parser.add_argument("--no-prior", action="store_true", help="train without prior preservation")
    parser.add_argument(
        "--prior-loss-weight", type=float, default=QualitySettings.prior_loss_weight,
        help="weight of the prior-preservation loss (default: the family's)",
    )  # fmt: skip
    parser.add_argument(
        "--class-images", type=int, default=QualitySettings.regularisation_images,
        help="captioned base-world renders for prior preservation",
    )  # fmt: skip
    parser.add_argument(
        "--subject", default=DEFAULT_SUBJECT, choices=sorted(SUBJECTS), help="the held-out concept to teach"
    )
    parser.add_argument(
        "--train-seeds", nargs="+", type=int, default=list(QualitySettings.train_seeds),
        help="train each family once per seed; accuracies pool every run's samples",
    )  # fmt: skip
    parser.add_argument(
        "--trigger", default=None,
        help="the word standing for the subject in captions and trigger prompts (not a base-world word; "
        "default: the subject's own name, e.g. purple; 'sks' for DreamBooth's rare token)",
    )  # fmt: skip
    parser.add_argument("--concept-samples", type=int, default=40)
    parser.add_argument("--prompt-samples", type=int, default=72)
    parser.add_argument(
        "--out", type=Path, default=None, help="keep adapters and samples here (default: temporary)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args(argv)
    try:
        adapter_config = parse_key_values(args.adapter_option, "--adapter-option", "rank=16")
        train_extra = parse_key_values(args.train_option, "--train-option", "adam_weight_decay=0")
    except ValueError as error:
        parser.error(str(error))
    problem = option_problem(adapter_config, train_extra, args.families)
    if problem:
        parser.error(problem)
    if args.trigger is not None and args.trigger.lower() in base_world_words():
        parser.error(
            f"--trigger {args.trigger!r} is a word the base world already uses; the no-trigger prompts that "
            "measure language drift would contain it. Choose another word."
        )
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="atelier-quality-") as tmp:
        out = args.out or Path(tmp)
        report = run_report(
            args.families,
            out=out,
            settings=QualitySettings(
                targets=args.targets[0] if len(args.targets) == 1 else args.targets,
                adapter_config=adapter_config,
                train_options_extra=train_extra,
                steps=args.steps,
                learning_rate=args.learning_rate,
                snr_gamma=args.snr_gamma,
                ema_decay=args.ema_decay,
                batch_size=args.batch,
                pair_images=args.pair_images,
                prior=not args.no_prior,
                prior_loss_weight=args.prior_loss_weight,
                regularisation_images=args.class_images,
                subject=args.subject,
                trigger=args.trigger,
                train_seeds=tuple(args.train_seeds),
            ),
            concept_count=args.concept_samples,
            prompt_count=args.prompt_samples,
        )
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0 if all(row["passes"] for row in report["families"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
