"""Errors raised by the evaluation package; each message says what is wrong and what to do about it."""

from __future__ import annotations


class EvaluationError(ValueError):
    """Bad input to an evaluation: mismatched counts, an unreadable image or prompt file, nothing to score."""


class ClipLoadError(EvaluationError):
    """A CLIP model could not be found or loaded (missing file, unknown name, not cached while offline)."""
