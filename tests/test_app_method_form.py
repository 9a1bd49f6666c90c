"""The Compose tab's method-options form, generated from each composition method's options: every option has
an input with help, an untouched form sends nothing (the method's defaults run), edits are parsed to the
method's types, bad values are named, and the mask gallery and comparison captions say which method."""

from __future__ import annotations

import pytest

from app import method_form
from app.studio import RequestError
from app.tabs.compose import MASKS_LABEL, comparison_caption, options_of
from composition.methods import METHODS, method_options


@pytest.mark.parametrize("method", list(METHODS))
def test_every_option_of_every_method_has_a_field_and_an_untouched_form_sends_nothing(method: str) -> None:
    fields = method_form.option_fields(method)
    assert [f.name for f in fields] == list(method_options(method))
    assert all(f.help for f in fields), [f.name for f in fields if not f.help]
    assert method_form.collect_options(fields, [method_form.shown_value(f) for f in fields]) == {}


def test_clora_help_comes_from_its_options_dataclass_and_edits_are_typed() -> None:
    fields = {f.name: f for f in method_form.option_fields("clora")}
    assert fields["update_until"].help == "Fraction of the steps that get latent updates."
    assert fields["preset"].kind == "choice" and "light" in fields["preset"].choices
    values = {name: method_form.shown_value(f) for name, f in fields.items()}
    values.update(preset="light", iterations=3.0, refine_at="0, 0.5", exclusive_masks=True)
    options = method_form.collect_options(list(fields.values()), list(values.values()))
    assert options == {"preset": "light", "iterations": 3, "refine_at": (0.0, 0.5), "exclusive_masks": True}
    assert isinstance(options["iterations"], int)


def test_cmlora_optional_options_mean_automatic_when_blank() -> None:
    fields = {f.name: f for f in method_form.option_fields("cmlora")}
    assert fields["regions"].kind == "tristate" and method_form.shown_value(fields["regions"]) == "auto"
    assert method_form.parsed_value(fields["regions"], "off") is False
    assert method_form.shown_value(fields["cache_interval"]) == 0
    assert method_form.parsed_value(fields["cache_interval"], 0) is None
    assert method_form.parsed_value(fields["cache_interval"], None) is None
    assert method_form.parsed_value(fields["cache_interval"], 3) == 3
    assert method_form.parsed_value(fields["frequency_scores"], " ") is None
    assert method_form.parsed_value(fields["frequency_scores"], "1; 2") == (1.0, 2.0)


def test_bad_values_are_named_with_the_expected_form() -> None:
    inputs = [(f, None) for f in method_form.option_fields("clora")]
    values = [method_form.shown_value(f) for f, _ in inputs]
    names = [f.name for f, _ in inputs]
    bad = list(values)
    bad[names.index("refine_at")] = "early, late"
    with pytest.raises(RequestError, match="clora options: refine_at takes numbers separated by commas"):
        options_of("clora", inputs, tuple(bad))
    bad = list(values)
    bad[names.index("iterations")] = 1.5
    with pytest.raises(RequestError, match="iterations takes a whole number"):
        options_of("clora", inputs, tuple(bad))
    switch = [(f, None) for f in method_form.option_fields("switch")]
    assert options_of("switch", inputs + switch, (*values, 2)) == {"interval": 2}


def test_masks_and_comparison_captions_name_the_method() -> None:
    assert "CLoRA" not in MASKS_LABEL
    caption = comparison_caption("composite", 12)
    assert caption == "composite · seed 12" and len(caption) <= 24
