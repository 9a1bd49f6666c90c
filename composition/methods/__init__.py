"""The composition methods, one shared interface, and `generate(method, ...)`, the one entry point.

Every method is `generate(pipe, bank, prompt, steps, guidance, seed, *, height, width, progress,
**options) -> Result`: merge (weighted sum), switch and composite (Zhong et al., 2024), cmlora (Zou et al.,
2025), clora (Meral et al., 2024). Each module's docstring names its paper and its departures from the
reference code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from composition.bank import AdapterBank
from composition.errors import CompositionError
from composition.methods import clora, cmlora, composite, merge, switch
from composition.prompt import ConceptPrompt
from composition.sampling import Result
from models.cli_options import parse_key_values

METHODS: dict[str, Callable[..., Result]] = {
    "merge": merge.generate,
    "switch": switch.generate,
    "composite": composite.generate,
    "cmlora": cmlora.generate,
    "clora": clora.generate,
}
"""Method name -> its `generate` function."""

_COMMON = {"pipe", "bank", "prompt", "steps", "guidance", "seed", "height", "width", "progress"}


PRESETS: dict[str, tuple[dict[str, Any], type]] = {
    "clora": (clora.PRESETS, clora.CloraOptions),
    "cmlora": (cmlora.PRESETS, cmlora.CmloraOptions),
}
"""Methods whose options come in named presets: method -> (preset name -> options dataclass, its class)."""


def method_options(method: str) -> dict[str, Any]:
    """A method's own options and their defaults (the fields of its default preset included)."""
    function = _lookup(method)
    options = {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if name not in _COMMON and p.kind is p.KEYWORD_ONLY
    }
    if method in PRESETS:
        presets, cls = PRESETS[method]
        preset = presets[options["preset"]]
        options.update({f.name: getattr(preset, f.name) for f in fields(cls)})
    return options


def method_presets(method: str) -> list[str]:
    """The preset names a method accepts (empty for methods without presets)."""
    _lookup(method)
    if method == "switch":
        return sorted(switch.PRESETS)
    return sorted(PRESETS[method][0]) if method in PRESETS else []


def _lookup(method: str) -> Callable[..., Result]:
    try:
        return METHODS[method]
    except KeyError:
        raise CompositionError(
            f"unknown composition method {method!r}; choose one of {sorted(METHODS)}."
        ) from None


def generate(
    method: str,
    pipe: Any,
    bank: AdapterBank,
    prompt: ConceptPrompt,
    steps: int = 30,
    guidance: float = 7.5,
    seed: int = 0,
    **options: Any,
) -> Result:
    """Run `method`; unknown methods and options are a `CompositionError` listing the valid ones."""
    check_options(method, options)
    return _lookup(method)(pipe, bank, prompt, steps, guidance, seed, **options)


def parse_options(items: Sequence[str], flag: str = "--option") -> dict[str, Any]:
    """`KEY=VALUE` pairs given with `flag`; values are JSON when they parse as JSON, else strings."""
    try:
        return parse_key_values(items, flag, "interval=5")
    except ValueError as error:
        raise CompositionError(str(error)) from None


def check_options(method: str, options: dict[str, Any]) -> None:
    """Raise `CompositionError` for an unknown method or option names it does not have."""
    known = set(method_options(method)) | {"height", "width", "progress"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise CompositionError(f"{method} has no option(s) {unknown}; its options are {sorted(known)}.")


__all__ = ["METHODS", "PRESETS", "check_options", "generate", "method_options", "method_presets"]
