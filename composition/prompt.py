"""`ConceptPrompt`: the prompt of a multi-concept image and, per adapter, the phrase it binds to.

No paper of its own; it serves CLoRA (Meral et al., 2024), which steers each adapter through the
cross-attention maps of its concept's tokens. The reference CLoRA code takes those token positions typed by
hand (and its own README example is off by one); here they are found automatically by locating the phrase's
token ids inside the tokenized prompt, under every tokenizer of the pipeline (SDXL has two), once per text.

Each concept may also carry a `plain` form: the phrase without the adapter's trigger word (`"sks dog"` ->
`"dog"`). CLoRA's base branch uses the prompt with every concept in its plain form, and adapter k's branch uses
the prompt with only concept k's trigger, as in the reference (`"a cat and a dog"`, `"a <c> cat and a dog"`,
`"a cat and a <d> dog"`). Without a plain form every branch reads the full prompt.

The methods that run each adapter on its own prediction (composite, switch, cmlora) give adapter k the same
prompt as CLoRA's branch k. The papers of Switch and Composite give every LoRA the one prompt, whose other
concepts are ordinary words to SD; another adapter's trigger is a word adapter k never learnt, and on the toy
world such a word breaks it: the heart BOFT alone on "a purple square and a blue heart" drew one object, or
squares, in most seeds, where "a red square and a blue heart" kept the two-object layout. merge runs one UNet
with every adapter summed, so it reads the full prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from composition.errors import CompositionError


@dataclass(frozen=True)
class Concept:
    """One adapter's concept: the phrase as written in the prompt, its weight, and its trigger-free form."""

    phrase: str
    weight: float = 1.0
    plain: str | None = None

    def __post_init__(self) -> None:
        if not self.phrase.strip():
            raise CompositionError(
                "a concept phrase is empty; give the words of the prompt the adapter binds to."
            )
        if self.plain is not None and not self.plain.strip():
            raise CompositionError(f"the plain form of {self.phrase!r} is empty; leave it unset instead.")


@dataclass
class ConceptPrompt:
    """The base prompt plus one `Concept` per adapter (in the bank's order); validated on creation."""

    text: str
    concepts: list[Concept]
    negative: str = ""
    _indices: dict[tuple[int, int | str | None], list[list[int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.text.strip():
            raise CompositionError("the prompt is empty; describe the image, naming every concept in it.")
        if not self.concepts:
            raise CompositionError("a concept prompt needs at least one concept (one per adapter).")
        for number, concept in enumerate(self.concepts, start=1):
            if _find(self.text, concept.phrase) is None:
                raise CompositionError(
                    f"phrase {concept.phrase!r} of adapter {number} is not in the prompt {self.text!r}; "
                    "write it into the prompt, or bind the adapter to a phrase the prompt contains "
                    "(FILE:phrase on the command line)."
                )

    @classmethod
    def build(
        cls,
        text: str,
        phrases: Sequence[str],
        weights: Sequence[float] | None = None,
        plains: Sequence[str | None] | None = None,
        negative: str = "",
    ) -> ConceptPrompt:
        """Convenience constructor from parallel lists (weights default to 1, plain forms to unset)."""
        weights = list(weights) if weights is not None else [1.0] * len(phrases)
        plains = list(plains) if plains is not None else [None] * len(phrases)
        if not (len(phrases) == len(weights) == len(plains)):
            raise CompositionError(
                f"got {len(phrases)} phrases, {len(weights)} weights and {len(plains)} plain forms; "
                "give one of each per adapter."
            )
        concepts = [Concept(p, float(w), q) for p, w, q in zip(phrases, weights, plains, strict=True)]
        return cls(text, concepts, negative)

    @property
    def weights(self) -> list[float]:
        """The concept weights, in adapter order."""
        return [c.weight for c in self.concepts]

    def branch_text(self, adapter: int | None) -> str:
        """The prompt of one CLoRA branch: concept `adapter` as written, every other concept in plain form.

        `adapter=None` is the base branch (all concepts plain).
        """
        text = self.text
        for index, concept in enumerate(self.concepts):
            if index != adapter and concept.plain is not None:
                span = _find(text, concept.phrase)
                if span is not None:
                    text = text[: span[0]] + concept.plain + text[span[1] :]
        return text

    def branch_phrases(self, adapter: int | None) -> list[str]:
        """Each concept's phrase as it reads in `branch_text(adapter)`."""
        return [
            c.phrase if (i == adapter or c.plain is None) else c.plain for i, c in enumerate(self.concepts)
        ]

    def objects(self) -> list[list[int]]:
        """Adapters grouped by the object they describe: concepts whose phrases touch in the prompt (nothing but
        spaces between them, or overlapping) qualify one object ("a purple star": "purple" and "star"); any
        other word ("a purple square and a blue heart") separates objects. Groups in order of first adapter."""
        spans = [_find(self.text, c.phrase) or (0, 0) for c in self.concepts]  # all present: __post_init__
        groups: list[list[int]] = []
        end = 0
        for index in sorted(range(len(spans)), key=spans.__getitem__):  # in the order of the text
            start, stop = spans[index]
            if groups and (start <= end or not self.text[end:start].strip()):
                groups[-1].append(index)
                end = max(end, stop)
            else:
                groups.append([index])
                end = stop
        return sorted((sorted(group) for group in groups), key=lambda group: group[0])

    def token_indices(self, pipe: Any, adapter: int | None = None) -> list[list[int]]:
        """Positions (in the padded 77-token sequence, BOS = 0) of each concept's tokens in a branch's text.

        Computed once per branch under every tokenizer of `pipe`; tokenizers that disagree are an error
        because the UNet's cross-attention sees one token axis.
        """
        key = (id(pipe.tokenizer), adapter)
        if key not in self._indices:
            self._indices[key] = _positions(pipe, self.branch_text(adapter), self.branch_phrases(adapter))
        return self._indices[key]

    def written_token_indices(self, pipe: Any) -> list[list[int]]:
        """Positions of each concept's tokens in the prompt as written (every concept with its trigger): what a
        method that gives every adapter the one prompt reads."""
        key = (id(pipe.tokenizer), "written")
        if key not in self._indices:
            self._indices[key] = _positions(pipe, self.text, [c.phrase for c in self.concepts])
        return self._indices[key]


def _positions(pipe: Any, text: str, phrases: Sequence[str]) -> list[list[int]]:
    """Each phrase's token positions in `text` under every tokenizer of `pipe` (they must agree)."""
    tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
    found = [[_phrase_positions(tok, text, phrase) for phrase in phrases] for tok in tokenizers]
    if any(other != found[0] for other in found[1:]):
        raise CompositionError(
            f"the pipeline's tokenizers place the concept phrases of {text!r} differently; "
            "token-level methods (clora) need one token layout."
        )
    return found[0]


def _find(text: str, phrase: str) -> tuple[int, int] | None:
    """Span of `phrase` in `text` as whole words, case-insensitive; None when absent."""
    match = re.search(rf"(?<!\w){re.escape(phrase.strip())}(?!\w)", text, flags=re.IGNORECASE)
    return match.span() if match else None


def _phrase_positions(tokenizer: Any, text: str, phrase: str) -> list[int]:
    """Token positions of `phrase` inside the tokenized `text` (with BOS at position 0)."""
    limit = tokenizer.model_max_length
    ids = tokenizer(text, truncation=True, max_length=limit).input_ids
    target = tokenizer(phrase.strip(), add_special_tokens=False).input_ids
    for start in range(len(ids) - len(target) + 1):
        if ids[start : start + len(target)] == target:
            return list(range(start, start + len(target)))
    full = tokenizer(text, truncation=False).input_ids
    if len(full) > limit:
        raise CompositionError(
            f"phrase {phrase!r} falls past the tokenizer's {limit}-token limit in {text!r}; shorten the prompt "
            "or move the phrase earlier."
        )
    raise CompositionError(
        f"phrase {phrase!r} does not tokenize the same inside {text!r} as on its own; bind the adapter to "
        "whole words of the prompt."
    )
