"""`KEY=VALUE` command-line options (``--adapter-option r=16``, ``--clora-option step_size=1``) as a dict.

No paper: shared parsing for the CLIs that pass free-form options through to a family or a method."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def parse_key_values(items: Sequence[str], flag: str, example: str) -> dict[str, Any]:
    """`KEY=VALUE` items given with `flag` as a dict; values are JSON when they parse as JSON ("16" -> 16,
    "true" -> True), else kept as text. A malformed item raises ValueError naming `flag` and `example`."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected KEY=VALUE, e.g. {example}.")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options
