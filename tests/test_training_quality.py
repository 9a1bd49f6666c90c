"""Toy-world DreamBooth quality (slow): each family learns the report's held-out subject (the colour purple,
bound to its own name: `training.quality.TRIGGER` says why) from five images (>= 90% of trigger samples)
without language drift (no-trigger prompt accuracy within 5 points of the base model).

One case per family, so a failing family does not hide the others' results and the four can run in two
processes on two cores (`pytest -m slow -k "boft or hra"` beside `-k "lora or krona"`): each family's report
trains with its own seeds, so it equals that family's row in a four-family report.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.pipelines import default_base_model
from training.quality import CONCEPT_TARGET, DRIFT_LIMIT, format_report, run_report

pytestmark = pytest.mark.slow


@pytest.mark.skipif(
    default_base_model() is None, reason="the toy world is not installed under assets/toyworld"
)
@pytest.mark.parametrize("family", ["lora", "krona", "boft", "hra"])
def test_family_learns_the_held_out_concept_without_drift(family: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    report = run_report([family], out=tmp_path)
    print(format_report(report))
    assert report["base"]["concept_accuracy"] < 0.5  # the base model really does not know the concept
    (row,) = report["families"]
    assert row["concept_accuracy"] >= CONCEPT_TARGET, row
    assert row["drift"] <= DRIFT_LIMIT, row
