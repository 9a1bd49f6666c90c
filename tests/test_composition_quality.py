"""Toy-world composition quality (slow): the committed concept adapters (`composition.quality.FIXTURES`), >= 32
seeds per method, the issue's targets. `python -m composition.quality` without `--fixtures` trains them afresh."""

from __future__ import annotations

import pytest

from composition.quality import FIXTURES, SETUPS, format_table, quality_report


@pytest.mark.slow
def test_clora_and_cmlora_compose_held_out_concepts(tmp_path) -> None:
    report = quality_report(seeds=32, steps=25, work=tmp_path, fixtures=FIXTURES)
    assert all(str(FIXTURES) in p for entry in report["setups"].values() for p in entry["adapter_files"])
    print(format_table(report))
    separate = {s.name for s in SETUPS if len(s.adapters) == 2 and len(s.expect) == 2}
    baselines = {"N=2 lora+lora", "N=2 lora+lora swapped"}  # the baselines' setups, reported
    assert separate == {"N=2 boft+lora", "N=2 hra+krona"} | baselines
    for name, entry in report["setups"].items():
        if name not in separate - baselines:  # the bar: two concepts in their regions, mixed families
            continue
        rows = entry["methods"]
        for method in ("clora", "cmlora"):
            assert rows[method]["all_present"] >= 0.8, (name, method, rows[method])
            assert rows[method]["all_present"] >= rows["merge"]["all_present"] + 0.15, (name, method)
        assert rows["cmlora"]["clipscore"] >= rows["composite"]["clipscore"], name
