"""The Python API of evaluation: `score` (CLIPScore / CLIP-T and CLIP-I) and `concept_scores`.

Implements CLIPScore (Hessel et al. 2021, plus torchmetrics' 0–100 scale), CLIP-I (Ruiz et al. 2023,
DreamBooth) and per-concept scores with their minimum for multi-concept compositions, on any CLIP that
`evaluation.clip_backends.load_clip` can load (default: the toy world's tiny CLIP). Used by training
validation, composition reports, the app and `python -m evaluation.clipscore`.

Images are read and embedded `batch_size` at a time, so folders larger than memory are fine; each distinct
prompt is embedded once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from evaluation.clip_backends import ClipBackend, load_clip
from evaluation.errors import EvaluationError
from evaluation.inputs import ImageInput, check_readable, collect_images, image_name, open_image
from evaluation.results import ConceptScores, Scores
from evaluation.scores import clip_i, cosine_matrix, paired_cosine

Progress = Callable[..., Any]
"""`progress(step, total, **info)`: images embedded so far out of all images (generated + references)."""
ModelSpec = str | Path | ClipBackend | None


def score(
    images: Sequence[ImageInput] | str | Path,
    prompts: Sequence[str] | str | None = None,
    references: Sequence[ImageInput] | str | Path | None = None,
    model: ModelSpec = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> Scores:
    """Score `images` against `prompts` (CLIP-T / CLIPScore) and/or reference images (CLIP-I).

    `images` and `references` are sequences of PIL images, uint8 arrays or paths, or one folder path.
    `prompts` is one prompt per image, or a single string used for every image. `model` is anything
    `load_clip` accepts (None: the toy world's CLIP); `device` is ignored when `model` is a loaded backend.
    """
    items = _as_items(images, "images")
    refs = _as_items(references, "references") if references is not None else None
    prompt_list = _as_prompts(prompts, len(items))
    if prompt_list is None and refs is None:
        raise EvaluationError("nothing to score: give prompts (CLIP-T) and/or reference images (CLIP-I)")
    _check_batch_size(batch_size)
    check_readable(items)
    if refs is not None:
        check_readable(refs)
    backend = load_clip(model, device)
    total = len(items) + (len(refs) if refs is not None else 0)
    image_emb = embed_images(backend, items, batch_size, progress, offset=0, total=total)
    text_cosine = None
    if prompt_list is not None:
        text_emb = embed_texts(backend, prompt_list, batch_size)
        text_cosine = paired_cosine(image_emb, text_emb)
    clip_i_values = None
    if refs is not None:
        ref_emb = embed_images(backend, refs, batch_size, progress, offset=len(items), total=total)
        clip_i_values = clip_i(image_emb, ref_emb)
    return Scores(
        model=backend.name,
        names=tuple(image_name(item, i) for i, item in enumerate(items)),
        prompts=tuple(prompt_list) if prompt_list is not None else None,
        text_cosine=text_cosine,
        clip_i=clip_i_values,
        n_references=len(refs) if refs is not None else 0,
    )


def concept_scores(
    images: Sequence[ImageInput] | str | Path,
    phrases: Sequence[str],
    model: ModelSpec = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> ConceptScores:
    """Score every concept phrase against every image; `ConceptScores` gives per-concept values and the min.

    Each phrase (e.g. "a purple star") is embedded on its own, as the composition papers score each subject
    separately, and compared with every image.
    """
    if isinstance(phrases, str) or not phrases:
        raise EvaluationError(
            "phrases must be a non-empty list of concept phrases, e.g. ['a red circle', 'a dog']"
        )
    if any(not isinstance(p, str) or not p.strip() for p in phrases):
        raise EvaluationError("every concept phrase must be a non-empty string")
    items = _as_items(images, "images")
    _check_batch_size(batch_size)
    check_readable(items)
    backend = load_clip(model, device)
    image_emb = embed_images(backend, items, batch_size, progress, offset=0, total=len(items))
    phrase_emb = embed_texts(backend, list(phrases), batch_size)
    return ConceptScores(
        model=backend.name,
        names=tuple(image_name(item, i) for i, item in enumerate(items)),
        phrases=tuple(phrases),
        cosine=cosine_matrix(image_emb, phrase_emb),
    )


def embed_images(
    backend: ClipBackend,
    items: Sequence[ImageInput],
    batch_size: int,
    progress: Progress | None = None,
    offset: int = 0,
    total: int | None = None,
) -> torch.Tensor:
    """(N, D) image embeddings, reading and embedding `batch_size` images at a time."""
    total = len(items) if total is None else total
    chunks: list[torch.Tensor] = []
    for start in range(0, len(items), batch_size):
        batch = [open_image(item) for item in items[start : start + batch_size]]
        chunks.append(backend.encode_images(batch))
        if progress is not None:
            progress(offset + start + len(batch), total)
    return torch.cat(chunks)


def embed_texts(backend: ClipBackend, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """(N, D) text embeddings in the order of `texts`, each distinct text embedded once."""
    unique = list(dict.fromkeys(texts))
    chunks = [backend.encode_texts(unique[i : i + batch_size]) for i in range(0, len(unique), batch_size)]
    table = torch.cat(chunks)
    index = {text: i for i, text in enumerate(unique)}
    return table[[index[text] for text in texts]]


def _as_items(images: Sequence[ImageInput] | str | Path, what: str) -> list[ImageInput]:
    if isinstance(images, str | Path):
        return list(collect_images([images]))
    items = list(images)
    if not items:
        raise EvaluationError(f"no {what} given")
    return items


def _as_prompts(prompts: Sequence[str] | str | None, n_images: int) -> list[str] | None:
    if prompts is None:
        return None
    if isinstance(prompts, str):
        return [prompts] * n_images
    prompt_list = list(prompts)
    if len(prompt_list) != n_images:
        raise EvaluationError(
            f"{n_images} images but {len(prompt_list)} prompts; give one prompt per image or a single prompt"
        )
    if not all(isinstance(p, str) for p in prompt_list):
        raise EvaluationError("prompts must be strings")
    return prompt_list


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluationError(f"batch_size must be a positive integer, got {batch_size!r}")
