"""The Compose tab's method options as a form: one input per option of each composition method, generated
from ``composition.methods.method_options`` and the annotations, field metadata and attribute docstrings of the
options (the option dataclasses of the methods with presets: CLoRA's ``CloraOptions``, CMLoRA's
``CmloraOptions``), so a new option appears without UI code.

The form starts from ``option_defaults(method, profile)``: the method's own defaults under the base model's
profile (``models.profiles``: the preset it picks, expanded into that preset's fields, and any option it
sets), the one source of defaults that ``Studio.compare`` and the composition CLI also use. A request sends
the profile's options plus the values that differ from those defaults (``request_options``), so an untouched
form runs the method as the profile says, and a preset picked without other changes applies that preset.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
from dataclasses import dataclass
from typing import Any

MAIN_OPTIONS = 2
"""The first options of a method are shown; the rest sit in a collapsed "Advanced" accordion."""

OPTION_HELP = {
    "interval": "Steps each adapter stays active before switching to the next.",
    "cache_interval": "Steps between full evaluations of the non-dominant adapters.",
    "profile_steps": "Steps used to measure which adapter dominates which frequencies.",
    "frequency_scores": "Comma-separated scores that fix the adapters' order (blank: measured).",
    "regions": "Give each object its own region of the image (auto: when the prompt names several objects).",
    "mask_threshold": "Attention level above which a pixel belongs to an adapter's region.",
    "dominant_yields": "Let the dominant adapter give way inside another adapter's region.",
}
"""Plain-language help for options whose source has none (function keyword arguments)."""

AUTO, ON, OFF = "auto", "on", "off"


@dataclass(frozen=True)
class OptionField:
    """One option of one method and how the form shows it."""

    method: str
    name: str
    default: Any
    kind: str
    """``bool``, ``tristate`` (None/True/False), ``int``, ``float`` (either may be blank when optional),
    ``numbers`` (comma-separated), ``choice`` or ``str``."""
    help: str = ""
    choices: tuple[str, ...] = ()
    optional: bool = False
    """None is allowed (the method decides): a blank text, or 0 for a number (so every input has a value)."""


def profile_options(method: str, profile: Any = None) -> dict[str, Any]:
    """The options the base model's profile sets for ``method`` (empty without a profile)."""
    return profile.method_options(method) if profile is not None else {}


def option_defaults(method: str, profile: Any = None) -> dict[str, Any]:
    """The defaults the form starts from: the method's own, with the profile's preset expanded into that
    preset's fields (as ``method_options`` lists the default preset's) and the profile's other options."""
    from composition.methods import PRESETS, method_options

    options = method_options(method)
    chosen = profile_options(method, profile)
    if method in PRESETS and chosen.get("preset") in PRESETS[method][0]:
        presets, cls = PRESETS[method]
        preset = presets[chosen["preset"]]
        options.update({field.name: getattr(preset, field.name) for field in dataclasses.fields(cls)})
    options.update(chosen)
    return options


def option_fields(method: str, profile: Any = None) -> list[OptionField]:
    """The form's fields for ``method``, in the order the method declares them, starting from the profile's
    defaults (``option_defaults``)."""
    from composition.methods import METHODS, PRESETS, method_presets

    defaults = option_defaults(method, profile)
    annotations = {
        name: str(p.annotation) for name, p in inspect.signature(METHODS[method]).parameters.items()
    }
    helps: dict[str, str] = {}
    choices: dict[str, tuple[str, ...]] = {}
    if method in PRESETS:
        _, cls = PRESETS[method]
        for field in dataclasses.fields(cls):
            annotations[field.name] = str(field.type)
            helps[field.name] = field.metadata.get("help", "")
        docs = attribute_docs(cls)
        helps.update({k: first_sentence(v) for k, v in docs.items() if not helps.get(k)})
    presets = method_presets(method)
    if presets:
        choices["preset"] = tuple(presets)
        helps["preset"] = (
            f"A named set of {method}'s options ({', '.join(presets)}; paper: the reference code's algorithm); "
            "an option changed below overrides it."
        )
    return [
        _field(method, name, default, annotations.get(name, ""), helps, choices)
        for name, default in defaults.items()
    ]


def _field(
    method: str,
    name: str,
    default: Any,
    annotation: str,
    helps: dict[str, str],
    choices: dict[str, tuple[str, ...]],
) -> OptionField:
    optional = "None" in annotation or default is None
    text = helps.get(name) or OPTION_HELP.get(name, "")
    if name in choices:
        return OptionField(method, name, default, "choice", text, choices[name])
    if "bool" in annotation or isinstance(default, bool):
        kind = "tristate" if optional else "bool"
        return OptionField(method, name, default, kind, text, (AUTO, ON, OFF) if optional else ())
    if "tuple" in annotation or "Sequence" in annotation or isinstance(default, tuple | list):
        return OptionField(method, name, default, "numbers", text, optional=optional)
    if "int" in annotation or isinstance(default, int):
        return OptionField(method, name, default, "int", text, optional=optional)
    if "float" in annotation or isinstance(default, float):
        return OptionField(method, name, default, "float", text, optional=optional)
    return OptionField(method, name, default, "str", text, optional=optional)


def first_sentence(text: str) -> str:
    """The first sentence of a docstring (a form's help stays one line; the rest is for readers of the code)."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(])", text.strip(), maxsplit=1)[0]


def attribute_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated attribute of a class (PEP 257 attribute docstrings)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def shown_value(field: OptionField) -> Any:
    """The field's default as its input shows it."""
    if field.kind == "tristate":
        return {None: AUTO, True: ON, False: OFF}[field.default]
    if field.kind == "numbers":
        return "" if field.default is None else ", ".join(f"{v:g}" for v in field.default)
    if field.kind in ("int", "float") and field.default is None:
        return 0
    return field.default


def parsed_value(field: OptionField, value: Any) -> Any:
    """An input's value as the method takes it; ``ValueError`` names the option and the expected form."""
    if field.kind == "tristate":
        return {AUTO: None, ON: True, OFF: False}[value or AUTO]
    if field.kind == "numbers":
        text = str(value or "").strip()
        if not text:
            if field.optional:
                return None
            raise ValueError(f"{field.name} needs at least one number, e.g. {shown_value(field) or '0.5'}")
        try:
            return tuple(float(part) for part in text.replace(";", ",").split(",") if part.strip())
        except ValueError:
            raise ValueError(f"{field.name} takes numbers separated by commas, e.g. 0, 0.2, 0.4") from None
    if field.kind in ("int", "float"):
        if value is None or value == "" or (field.optional and value == 0):
            if field.optional:
                return None
            raise ValueError(f"{field.name} needs a number (default {field.default})")
        number = float(value)
        if field.kind == "int":
            if number != int(number):
                raise ValueError(f"{field.name} takes a whole number, got {value}")
            return int(number)
        return number
    if field.kind == "bool":
        return bool(value)
    return value


def request_options(
    method: str, fields: list[OptionField], values: list[Any], profile: Any = None
) -> dict[str, Any]:
    """What a request sends for ``method``: the profile's options, then the form's values that differ from
    the form's defaults (``ValueError`` for a value that does not parse)."""
    return {**profile_options(method, profile), **collect_options(fields, values)}


def collect_options(fields: list[OptionField], values: list[Any]) -> dict[str, Any]:
    """The options that differ from their defaults, parsed (``ValueError`` for a value that does not parse)."""
    options = {}
    for field, value in zip(fields, values, strict=True):
        parsed = parsed_value(field, value)
        default = tuple(field.default) if isinstance(field.default, list) else field.default
        if parsed != default:
            options[field.name] = parsed
    return options
