"""The Compose tab's method-options form, generated from each composition method's options: every option has
an input with help, an untouched form sends nothing (the method's defaults run), edits are parsed to the
method's types, bad values are named, and the mask gallery and comparison captions say which method."""

from __future__ import annotations

import pytest

from app import method_form
from app.studio import RequestError
from app.tabs.compose import MASKS_LABEL, comparison_caption, options_of
from composition.methods import METHODS, method_options
from models.profiles import SD1, TOYWORLD


@pytest.mark.parametrize("method", list(METHODS))
def test_every_option_of_every_method_has_a_field_and_an_untouched_form_sends_nothing(method: str) -> None:
    fields = method_form.option_fields(method)
    assert [f.name for f in fields] == list(method_options(method))
    assert all(f.help for f in fields), [f.name for f in fields if not f.help]
    assert method_form.collect_options(fields, [method_form.shown_value(f) for f in fields]) == {}


def test_clora_help_comes_from_its_options_dataclass_and_edits_are_typed() -> None:
    fields = {f.name: f for f in method_form.option_fields("clora")}
    assert fields["update_until"].help.startswith("Fraction of the steps that get latent updates")
    assert fields["preset"].kind == "choice" and "light" in fields["preset"].choices
    values = {name: method_form.shown_value(f) for name, f in fields.items()}
    values.update(preset="light", iterations=3.0, refine_at="0, 0.5", exclusive_masks=False)
    options = method_form.collect_options(list(fields.values()), list(values.values()))
    assert options == {"preset": "light", "iterations": 3, "refine_at": (0.0, 0.5), "exclusive_masks": False}
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
    assert [f.name for f, _ in switch] == ["preset", "interval"]
    assert options_of("switch", inputs + switch, (*values, "atelier", 2)) == {"interval": 2}


def test_the_form_starts_from_the_base_models_profile_and_an_untouched_form_runs_it() -> None:
    """One source of defaults: the profile's preset, expanded into its fields, is what the form shows, and an
    untouched form sends the profile's options (what ``Studio.compare`` and the composition CLI run)."""
    from composition.methods import clora, cmlora

    for profile in (SD1, TOYWORLD):
        for method in METHODS:
            fields = method_form.option_fields(method, profile)
            shown = [method_form.shown_value(f) for f in fields]
            sent = method_form.request_options(method, fields, shown, profile)
            assert sent == profile.method_options(method), (profile.name, method)
    sd_clora = {f.name: f for f in method_form.option_fields("clora", SD1)}
    paper = clora.PRESETS[SD1.method_options("clora")["preset"]]
    assert sd_clora["preset"].default == "paper" and sd_clora["iterations"].default == paper.iterations
    sd_cmlora = {f.name: f for f in method_form.option_fields("cmlora", SD1)}
    assert sd_cmlora["schedule"].default == cmlora.PRESETS["paper"].schedule
    assert sd_cmlora["prompts"].help and sd_cmlora["preset"].choices == ("atelier", "paper")
    toy_clora = {f.name: f for f in method_form.option_fields("clora", TOYWORLD)}
    assert toy_clora["preset"].default == "partition"
    # A preset picked in the form replaces the profile's; a changed option is sent beside the profile's preset.
    fields = method_form.option_fields("switch", SD1)
    assert method_form.request_options("switch", fields, ["atelier", 5], SD1) == {"preset": "atelier"}
    changed = method_form.request_options("switch", fields, ["paper", 3], SD1)
    assert changed == {"preset": "paper", "interval": 3}


def test_masks_and_comparison_captions_name_the_method() -> None:
    assert "CLoRA" not in MASKS_LABEL
    caption = comparison_caption("composite", 12)
    assert caption == "composite · seed 12" and len(caption) <= 24
