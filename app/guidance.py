"""Advice shown beside the Train tab's fields: how to choose the trigger and class words, and how many
subject images to upload.

``guidance_for(base_model)`` is the hook the base-model profiles fill: today every base model gets
``DEFAULT_GUIDANCE`` (true for Stable Diffusion and for the toy world alike); a profile replaces it with advice
measured for its model (e.g. the toy world's class words are its own shape names).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Guidance:
    """What the Train tab tells a person about words and images for one base model."""

    trigger: str
    """One line under the trigger field."""
    class_word: str
    """One line under the class-word field."""
    min_images: int = 3
    """Fewer accepted images than this gets a warning (the run still starts)."""
    recommended_images: str = "3-10"
    """Shown in the warning and under the upload box."""
    class_placeholder: str = "dog"


DEFAULT_GUIDANCE = Guidance(
    trigger="A short made-up word the model does not know yet (e.g. 'sks'); it becomes your subject's name.",
    class_word="The everyday word for what the subject is (dog, mug, heart), so the model starts from "
    "something close.",
)


def guidance_for(base_model: str | None) -> Guidance:
    """The advice for ``base_model`` (None: the default base model). Hook for the base-model profile."""
    del base_model  # every base model gets the default advice until profiles provide their own
    return DEFAULT_GUIDANCE


def image_count_advice(accepted: int, guidance: Guidance) -> str | None:
    """A warning when fewer images than ``guidance.min_images`` were accepted (None when enough)."""
    if accepted == 0 or accepted >= guidance.min_images:
        return None
    return (
        f"⚠ Only {accepted} image{'s' if accepted != 1 else ''}: the adapter will copy "
        f"{'it' if accepted == 1 else 'them'} closely. Use {guidance.recommended_images} photos of the subject "
        "from different angles and backgrounds for an adapter that generalises."
    )
