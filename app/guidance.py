"""Advice shown beside the Train tab's fields: how to choose the trigger and class words, and how many
subject images to upload, and what the trigger field is prefilled with.

``guidance_for(profile)`` turns the base model's profile (``models.profiles.Profile.hints``) into that advice,
so the toy world and Stable Diffusion each get what is true for them: the toy world's text encoder knows only
its own captions (its trigger is best the concept's own name, its class words are its shapes, its measured
runs used five renders), SD follows DreamBooth (a rare token, a coarse class word, 3-5 photos). A base model
whose profile is known only once it loads (a hub id, a single file) gets ``DEFAULT_GUIDANCE``, which holds
for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Guidance:
    """What the Train tab tells a person about words and images for one base model."""

    trigger: str
    """One line under the trigger field."""
    class_word: str
    """One line under the class-word field."""
    min_images: int = 3
    """Fewer accepted images than this gets a warning (the run still starts)."""
    recommended_images: str = "3-10 photos of the subject from different angles and backgrounds"
    """Shown in the warning and under the upload box."""
    class_placeholder: str = "dog"
    default_trigger: str = ""
    """What the trigger field is prefilled with ("": left empty, showing ``trigger_placeholder``)."""
    trigger_placeholder: str = "a short made-up word, e.g. sks"


DEFAULT_GUIDANCE = Guidance(
    trigger="A short made-up word the model does not know yet (e.g. 'sks'); it becomes your subject's name.",
    class_word="The everyday word for what the subject is, so the model starts from something close.",
)
"""For a base model whose profile is not known before it loads (no prefilled trigger: the word that suits it
depends on the model)."""


def guidance_for(profile: Any | None) -> Guidance:
    """The advice for a base model, from its profile (``Studio.profile(base_model)``; None: not known yet)."""
    if profile is None:
        return DEFAULT_GUIDANCE
    hints = profile.hints
    return Guidance(
        trigger=_sentence(hints.trigger_word),
        class_word=_sentence(hints.class_word),
        min_images=hints.min_images,
        recommended_images=hints.subject_images,
        class_placeholder=hints.class_example,
        default_trigger=hints.default_trigger,
        trigger_placeholder=hints.trigger_placeholder,
    )


def image_count_advice(accepted: int, guidance: Guidance) -> str | None:
    """A warning when fewer images than ``guidance.min_images`` were accepted (None when enough)."""
    if accepted == 0 or accepted >= guidance.min_images:
        return None
    return (
        f"⚠ Only {accepted} image{'s' if accepted != 1 else ''}: the adapter will copy "
        f"{'it' if accepted == 1 else 'them'} closely. Use {guidance.recommended_images} for an adapter that "
        "generalises."
    )


def trigger_after_change(typed: str | None, previous_default: str | None, guidance: Guidance) -> str | None:
    """The trigger field's new value when the base model changes: the new profile's default where the field is
    empty or still holds the previous profile's default, otherwise None (what the user typed stays)."""
    text = (typed or "").strip()
    if not text or text == (previous_default or "").strip():
        return guidance.default_trigger
    return None


def upload_prompt(guidance: Guidance) -> str:
    """The line under the upload box before any image is uploaded."""
    return f"Upload {guidance.recommended_images}."


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return text[:1].upper() + text[1:] + "."
