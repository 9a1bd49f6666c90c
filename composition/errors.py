"""The one error type of the composition engine: bad input, named with what to do about it."""

from __future__ import annotations


class CompositionError(ValueError):
    """Composition cannot run as asked (no adapters, a phrase missing from the prompt, an unknown method,
    an adapter trained for another base model); the message says what is wrong and what to do."""
