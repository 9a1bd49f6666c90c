"""Result objects of an evaluation: per-image scores, summaries (mean/std/min/max) and table rows.

`Scores` holds CLIP-T (as a cosine, as Hessel et al. 2021's CLIPScore and on torchmetrics' 0–100 scale) and
DreamBooth's CLIP-I; `ConceptScores` holds per-concept CLIPScores of a composition and their minimum.
The formulas live in `evaluation.scores`; this module only shapes them for reports, JSON and CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from evaluation.scores import METRIC_DESCRIPTIONS, clipscore_100, clipscore_hessel, concept_minimum


def summarize(values: torch.Tensor) -> dict[str, float]:
    """Mean, population standard deviation, minimum, maximum and count of a 1-D tensor."""
    v = values.double()
    return {
        "mean": float(v.mean()),
        "std": float(v.std(correction=0)),
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.numel()),
    }


@dataclass(frozen=True)
class Scores:
    """Per-image scores from `evaluation.score`; tensors are (N,) fp32 on CPU, in image order."""

    model: str
    names: tuple[str, ...]
    prompts: tuple[str, ...] | None
    text_cosine: torch.Tensor | None
    clip_i: torch.Tensor | None
    n_references: int = 0

    @property
    def clipscore_hessel(self) -> torch.Tensor | None:
        """CLIPScore of Hessel et al. 2021, `2.5 · max(cos, 0)` per image (None without prompts)."""
        return None if self.text_cosine is None else clipscore_hessel(self.text_cosine)

    @property
    def clipscore_100(self) -> torch.Tensor | None:
        """CLIPScore on torchmetrics' 0–100 scale, `max(100 · cos, 0)` per image (None without prompts)."""
        return None if self.text_cosine is None else clipscore_100(self.text_cosine)

    def metrics(self) -> dict[str, torch.Tensor]:
        """The per-image metrics present, keyed by the names in `evaluation.scores.METRIC_DESCRIPTIONS`."""
        found: dict[str, torch.Tensor] = {}
        if self.text_cosine is not None:
            found["clip_t_cosine"] = self.text_cosine
            found["clipscore_hessel"] = clipscore_hessel(self.text_cosine)
            found["clipscore_100"] = clipscore_100(self.text_cosine)
        if self.clip_i is not None:
            found["clip_i"] = self.clip_i
        return found

    def summary(self) -> dict[str, dict[str, float]]:
        """Metric name -> mean/std/min/max/n over images."""
        return {name: summarize(values) for name, values in self.metrics().items()}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image: its name, prompt (when scored against prompts) and every metric."""
        metrics = self.metrics()
        rows: list[dict[str, Any]] = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"image": name}
            if self.prompts is not None:
                row["prompt"] = self.prompts[i]
            row.update({metric: float(values[i]) for metric, values in metrics.items()})
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model, metric definitions, summary and per-image rows."""
        metrics = self.metrics()
        return {
            "model": self.model,
            "n_images": len(self.names),
            "n_references": self.n_references,
            "metrics": {name: METRIC_DESCRIPTIONS[name] for name in metrics},
            "summary": self.summary(),
            "images": self.rows(),
        }


@dataclass(frozen=True)
class ConceptScores:
    """Per-concept scores from `evaluation.concept_scores`: `cosine` is (N images, K phrases)."""

    model: str
    names: tuple[str, ...]
    phrases: tuple[str, ...]
    cosine: torch.Tensor

    @property
    def clipscore_hessel(self) -> torch.Tensor:
        """(N, K) CLIPScore (Hessel et al. 2021) of each phrase against each image."""
        return clipscore_hessel(self.cosine)

    @property
    def per_concept(self) -> dict[str, torch.Tensor]:
        """Phrase -> (N,) CLIPScore (Hessel scale) of that phrase against every image."""
        scores = self.clipscore_hessel
        return {phrase: scores[:, k] for k, phrase in enumerate(self.phrases)}

    @property
    def minimum(self) -> torch.Tensor:
        """(N,) lowest per-concept CLIPScore (Hessel scale) of each image: did every concept appear?"""
        return concept_minimum(self.clipscore_hessel)

    def summary(self) -> dict[str, dict[str, float]]:
        """`concept:<phrase>` and `concept_min` -> mean/std/min/max/n over images (Hessel scale)."""
        table = {f"concept:{phrase}": summarize(values) for phrase, values in self.per_concept.items()}
        table["concept_min"] = summarize(self.minimum)
        return table

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image: its name, each concept's CLIPScore and their minimum."""
        per_concept = self.per_concept
        minimum = self.minimum
        rows: list[dict[str, Any]] = []
        for i, name in enumerate(self.names):
            row: dict[str, Any] = {"image": name}
            row.update({f"concept:{phrase}": float(values[i]) for phrase, values in per_concept.items()})
            row["concept_min"] = float(minimum[i])
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: model, phrases, summary and per-image rows."""
        return {
            "model": self.model,
            "phrases": list(self.phrases),
            "scale": METRIC_DESCRIPTIONS["clipscore_hessel"],
            "summary": self.summary(),
            "images": self.rows(),
        }
