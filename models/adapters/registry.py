"""The adapter families by name: a new family is one module plus one line here."""

from __future__ import annotations

from models.adapters import boft, hra, krona, lora
from models.adapters.family import AdapterConfig, AdapterConfigError, AdapterFamily

FAMILIES: dict[str, AdapterFamily] = {
    family.name: family for family in (lora.FAMILY, krona.FAMILY, boft.FAMILY, hra.FAMILY)
}


def get_family(name: str) -> AdapterFamily:
    """The family called `name`; an unknown name is an `AdapterConfigError` listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise AdapterConfigError(
            f"unknown adapter family {name!r}; choose one of {sorted(FAMILIES)}."
        ) from None


def coerce_config(family: AdapterFamily, config: AdapterConfig | dict | None) -> AdapterConfig:
    """`config` as the family's config class: `None` = defaults, a dict is parsed, a wrong class is an error."""
    if config is None:
        return family.default_config()
    if isinstance(config, dict):
        return family.config_cls.from_dict(config)
    if not isinstance(config, family.config_cls):
        raise AdapterConfigError(
            f"{family.name} needs a {family.config_cls.__name__}, got a {type(config).__name__}."
        )
    return config
