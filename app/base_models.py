"""The base models a web user may train on: the ones the server was started with, nothing typed in freely.

The Train tab's base-model box is a name, not a path: empty means the server's `--base-model` (the toy world
when none was given), and otherwise it must name that same model or an entry of `--models-dir` (a diffusers
folder holding `model_index.json`, or a `.safetensors`/`.ckpt` single file). Anything else gets one and the
same sentence, so the box cannot be used to learn which paths exist on the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class BaseModelRefused(ValueError):
    """The typed base model is not offered; the message is the same for every refusal."""


@dataclass(frozen=True)
class BaseModels:
    """The server's default base model (None: the toy world) and the folder whose models it also offers."""

    default: str | None
    models_dir: Path | None = None

    def offered(self) -> dict[str, str]:
        """Name shown to the user → the spec the trainer loads, in name order (the default is not listed)."""
        if self.models_dir is None or not self.models_dir.is_dir():
            return {}
        names = {}
        for entry in sorted(self.models_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if (entry / "model_index.json").is_file() or (
                entry.is_file() and entry.suffix in SINGLE_FILE_SUFFIXES
            ):
                names[entry.name] = str(entry)
        return names

    def resolve(self, typed: str | None) -> str | None:
        """The spec for what the user typed (None: the server's default), or `BaseModelRefused`."""
        text = (typed or "").strip()
        if not text or text == self.default:
            return self.default
        offered = self.offered()
        if text in offered:
            return offered[text]
        listed = ", ".join(offered) or "none besides the default"
        raise BaseModelRefused(
            "This server does not offer that base model: leave the box empty for the server's default, or type "
            f"the name of one of its models ({listed})."
        )

    def hint(self) -> str:
        """The box's placeholder: the default and the names on offer."""
        names = list(self.offered())
        extra = f"; or one of: {', '.join(names)}" if names else ""
        return f"default: {self.default or 'the toy world'}{extra}"
