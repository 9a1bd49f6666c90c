"""The GPU training benchmark (`benchmarks.train_sd15`): its step-time arithmetic, and its whole code path
(build from config, save, train, read the log) as a CPU smoke run on the narrow SD-shaped model."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import train_sd15


def test_seconds_per_step_skips_the_warm_up_steps(tmp_path) -> None:
    log = tmp_path / "train_log.jsonl"
    times = [5.0, 6.0, 6.5, 7.0, 7.5, 8.0]  # the first step carries the warm-up
    log.write_text("".join(json.dumps({"step": k + 1, "time": t}) + "\n" for k, t in enumerate(times)))
    assert train_sd15.seconds_per_step(log, warmup=1) == pytest.approx(0.5)
    assert train_sd15.seconds_per_step(log, warmup=0) == pytest.approx(0.6)
    assert train_sd15.seconds_per_step(log, warmup=10) == pytest.approx(0.5)  # keeps at least one interval
    log.write_text(json.dumps({"step": 1, "time": 1.0}) + "\n")
    with pytest.raises(ValueError, match="at least 2 steps"):
        train_sd15.seconds_per_step(log, warmup=0)


def test_cpu_smoke_run_trains_and_reports(capsys) -> None:
    assert train_sd15.main(["--device", "cpu", "--quick", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r=4 on 'vo'" in out and "3 steps on cpu" in out
    step_time = float(re.search(r"s/step \(after warm-up\): ([0-9.]+)", out).group(1))
    assert step_time > 0
    assert "peak VRAM: not measured (no CUDA device)" in out
