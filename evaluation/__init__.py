"""Evaluation of generated images with CLIP: CLIPScore / CLIP-T, CLIP-I and per-concept scores.

CLIPScore follows Hessel et al. 2021 (and torchmetrics' 0–100 scale), CLIP-I follows DreamBooth
(Ruiz et al. 2023), per-concept scores follow the multi-concept composition papers. The Python API is
`score` and `concept_scores`; the command line is `python -m evaluation.clipscore`.
"""

from evaluation.clip_backends import (
    ClipBackend,
    OpenAIClipBackend,
    TransformersClipBackend,
    check_clip_spec,
    load_clip,
)
from evaluation.errors import ClipLoadError, EvaluationError
from evaluation.results import ConceptScores, Scores
from evaluation.scoring import concept_scores, score

__all__ = [
    "ClipBackend",
    "ClipLoadError",
    "ConceptScores",
    "EvaluationError",
    "OpenAIClipBackend",
    "Scores",
    "TransformersClipBackend",
    "check_clip_spec",
    "concept_scores",
    "load_clip",
    "score",
]
