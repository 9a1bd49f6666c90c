"""Command line: CLIPScore / CLIP-I / per-concept scores of a folder of generated images.

Scores follow Hessel et al. 2021 (CLIPScore, plus torchmetrics' 0–100 scale), DreamBooth (CLIP-I) and the
multi-concept composition papers (per-concept scores and their minimum). Examples:

    python -m evaluation.clipscore --images outputs/run1 --prompts prompts.txt --out results.json
    python -m evaluation.clipscore --images outputs/run1 --prompt "a photo of sks dog" \\
        --references data/dog --model ViT-B/32 --out results.csv
    python -m evaluation.clipscore --images outputs/mix --captions-from-sidecar-txt \\
        --concepts "a purple star" "a checkered heart"

A summary table (mean, std, min, max per metric) goes to stdout; per-image rows go to `--out` (.json or .csv).
Bad input (mismatched counts, unreadable images, a missing model) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from evaluation.clip_backends import load_clip
from evaluation.errors import EvaluationError
from evaluation.inputs import collect_images, read_prompts_file, sidecar_prompts
from evaluation.results import ConceptScores, Scores
from evaluation.scores import METRIC_DESCRIPTIONS
from evaluation.scoring import concept_scores, score
from models.atomic_write import atomic_write_text
from models.cli_options import OneLineArgumentParser

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m evaluation.clipscore`."""
    parser = OneLineArgumentParser(
        prog="python -m evaluation.clipscore",
        description="Score generated images with CLIP: CLIPScore (CLIP-T), CLIP-I and per-concept scores.",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        required=True,
        metavar="DIR_OR_FILE",
        help="image files and/or folders of images",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts file: .txt with one prompt per line in image (file-name) order, or `name<TAB>prompt` "
        "lines; or .json holding a list, or an object mapping file names/stems to prompts",
    )
    source.add_argument("--prompt", metavar="TEXT", help="one prompt for every image")
    source.add_argument(
        "--captions-from-sidecar-txt",
        action="store_true",
        help="read each image's prompt from the .txt file with the same name next to it",
    )
    parser.add_argument(
        "--references", nargs="+", metavar="DIR_OR_FILE", help="real subject images, for CLIP-I (DreamBooth)"
    )
    parser.add_argument(
        "--concepts",
        nargs="+",
        metavar="PHRASE",
        help="concept phrases, each scored against every image (+ min)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH_OR_NAME",
        help="CLIP: a clip .pt/.safetensors file, a clip name (ViT-B/32), a transformers CLIP folder or hub id "
        "(default: the toy world's CLIP)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--out", metavar="FILE", help="write per-image rows to FILE (.json or .csv)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() not in (".json", ".csv"):
        raise EvaluationError(f"--out {out}: choose a .json or .csv file name")
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {args.batch_size}")
    images = collect_images(args.images)
    prompts = _prompts(args, images)
    references = collect_images(args.references) if args.references else None
    if prompts is None and references is None and not args.concepts:
        raise EvaluationError(
            "nothing to score: give --prompts, --prompt or --captions-from-sidecar-txt (CLIP-T), "
            "--references (CLIP-I) and/or --concepts"
        )
    backend = load_clip(args.model, None if args.device == "auto" else args.device)
    with tqdm(total=len(images) + len(references or []), unit="img", file=sys.stderr, desc="CLIP") as bar:

        def progress(step: int, total: int, **_: Any) -> None:
            bar.update(step - bar.n)

        main_scores = None
        if prompts is not None or references is not None:
            main_scores = score(
                images, prompts, references, backend, batch_size=args.batch_size, progress=progress
            )
        concepts = None
        if args.concepts:
            bar.reset(total=len(images))
            concepts = concept_scores(
                images, args.concepts, backend, batch_size=args.batch_size, progress=progress
            )
    print(format_summary(backend.name, len(images), main_scores, concepts))
    if out is not None:
        write_results(out, main_scores, concepts)
        print(f"per-image scores written to {out}")
    return 0


def _prompts(args: argparse.Namespace, images: list[Path]) -> list[str] | None:
    if args.prompts:
        return read_prompts_file(args.prompts, images)
    if args.prompt is not None:
        return [args.prompt] * len(images)
    if args.captions_from_sidecar_txt:
        return sidecar_prompts(images)
    return None


def format_summary(model: str, n_images: int, scores: Scores | None, concepts: ConceptScores | None) -> str:
    """The stdout table: one row per metric with mean, std, min and max over images."""
    table: dict[str, dict[str, float]] = {}
    if scores is not None:
        table.update(scores.summary())
    if concepts is not None:
        table.update(concepts.summary())
    width = max(len(name) for name in table)
    header = f"CLIP model: {model}   images: {n_images}"
    if scores is not None and scores.n_references:
        header += f"   references: {scores.n_references}"
    lines = [header, f"{'metric':<{width}}  {'mean':>10} {'std':>10} {'min':>10} {'max':>10}"]
    for name, stats in table.items():
        lines.append(
            f"{name:<{width}}  {stats['mean']:>10.4f} {stats['std']:>10.4f} {stats['min']:>10.4f} {stats['max']:>10.4f}"
        )
    notes = [f"  {name}: {text}" for name, text in METRIC_DESCRIPTIONS.items() if name in table]
    if concepts is not None:
        notes.append(
            "  concept:<phrase> / concept_min: CLIPScore (Hessel scale) of each phrase / the lowest one"
        )
    return "\n".join(lines + notes)


def write_results(path: Path, scores: Scores | None, concepts: ConceptScores | None) -> Path:
    """Write per-image rows (and, for JSON, summaries and metric definitions) atomically to `path`."""
    if path.suffix.lower() == ".json":
        document: dict[str, Any] = scores.to_dict() if scores is not None else {}
        if concepts is not None:
            document["concepts"] = concepts.to_dict()
        text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    else:
        text = _csv_text(_merged_rows(scores, concepts))
    return atomic_write_text(path, text)


def _merged_rows(scores: Scores | None, concepts: ConceptScores | None) -> list[dict[str, Any]]:
    tables = [t.rows() for t in (scores, concepts) if t is not None]
    return [{k: v for row in rows for k, v in row.items()} for rows in zip(*tables, strict=True)]


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
