"""Shared command-line pieces: `KEY=VALUE` options (``--adapter-option r=16``, ``--clora-option step_size=1``)
as a dict, and an argparse parser whose errors are one line.

No paper: shared parsing for the CLIs that pass free-form options through to a family or a method."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, NoReturn


class OneLineArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that answers a bad flag with one line (argparse's own message, which names
    the valid choices, plus where the full usage is) and exit status 2, instead of the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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
