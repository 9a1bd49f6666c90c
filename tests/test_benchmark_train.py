"""The CPU training benchmark (`benchmarks.train`): its per-side bookkeeping and a whole two-step run."""

from __future__ import annotations

import re

import pytest

from benchmarks import train as bench


def test_best_keeps_the_fastest_rounds_unet_share() -> None:
    rounds = [
        {"steps_per_s": 10.0, "wall_s": 3.0, "peak_mb": 5.0, "unet_share": 0.70},
        {"steps_per_s": 12.0, "wall_s": 4.0, "peak_mb": 7.0, "unet_share": 0.80},
    ]
    assert bench.best(rounds) == {"steps_per_s": 12.0, "wall_s": 3.0, "peak_mb": 5.0, "unet_share": 0.80}
    without = [{k: v for k, v in r.items() if k != "unet_share"} for r in rounds]
    assert "unet_share" not in bench.best(without)


def test_measure_separates_the_unet_share_from_the_rate() -> None:
    assert bench.measure(lambda: (4.0, 0.25))["unet_share"] == 0.25
    row = bench.measure(lambda: 4.0)
    assert row["steps_per_s"] == 4.0 and "unet_share" not in row


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_two_step_run_reports_ratio_and_ceiling(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--steps", "2", "--batch", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    ratio = re.search(r"batch 1: speed ratio \(Atelier / reference\) ([\d.]+)x", out)
    ceiling = re.search(
        r"spends ([\d.]+)% of its loop in the UNet forward/backward; .* would be ([\d.]+)x", out
    )
    assert ratio is not None and float(ratio.group(1)) > 0
    assert ceiling is not None
    share, limit = float(ceiling.group(1)), float(ceiling.group(2))
    assert 0 < share <= 100
    assert limit == pytest.approx(100 / share, rel=0.02)
