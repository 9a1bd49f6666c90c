"""Toy-world composition quality (slow): trained concept adapters, >= 32 seeds per method, the issue's targets."""

from __future__ import annotations

import pytest

from composition.quality import format_table, quality_report


@pytest.mark.slow
def test_clora_and_cmlora_compose_held_out_concepts(tmp_path) -> None:
    report = quality_report(seeds=32, steps=25, work=tmp_path)
    print(format_table(report))
    for name, entry in report["setups"].items():
        if not name.startswith("N=2"):  # the bar is for pairs; N=3 is reported
            continue
        rows = entry["methods"]
        for method in ("clora", "cmlora"):
            assert rows[method]["all_present"] >= 0.8, (name, method, rows[method])
            assert rows[method]["all_present"] >= rows["merge"]["all_present"] + 0.15, (name, method)
        assert rows["cmlora"]["clipscore"] >= rows["composite"]["clipscore"], name
