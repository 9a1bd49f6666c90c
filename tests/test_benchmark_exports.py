"""The export-fidelity benchmark (`benchmarks.exports`): on the committed toy-world adapters, exact exports read
back by LyCORIS and diffusers match Atelier's weights, and extracted LoRAs measure what their header says."""

from __future__ import annotations

import re

import pytest

from benchmarks import exports
from composition.quality import FIXTURES
from models.toyworld.paths import TOYWORLD_PIPELINE

pytestmark = pytest.mark.skipif(
    not (TOYWORLD_PIPELINE / "model_index.json").is_file() or not any(FIXTURES.glob("*.safetensors")),
    reason="toy-world assets or composition fixtures not installed",
)


def test_quick_table_exact_rows_match_and_extracted_rows_measure_their_claim(capsys) -> None:
    assert exports.main(["--quick"]) == 0
    rows = [
        line.split(" | ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    rows = [[cell.strip(" |") for cell in row] for row in rows[1:]]
    families = {row[1] for row in rows}
    assert families == {"lora", "krona", "boft", "hra"}
    for adapter, family, export, claimed, measured in rows:
        if measured.startswith("refused"):  # the compact LoKr, which only A1111/ComfyUI read
            assert family == "krona" and export == "kohya (lokr)"
            continue
        if claimed == "exact":
            assert float(measured) < 1e-5, (adapter, export, measured)
        else:
            percent = float(re.match(r"([\d.]+)%", claimed)[1]) / 100
            assert float(measured) == pytest.approx(percent, abs=1e-4), (adapter, export)  # 2-decimal %
