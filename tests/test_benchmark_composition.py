"""The composition benchmark (`benchmarks.composition`) and the `python -m benchmarks` runner: names and
options reach the right place, and a CPU smoke run of the method table counts the UNet evaluations each
method's schedule implies."""

from __future__ import annotations

import re
import types

import pytest

import benchmarks.__main__ as runner
from benchmarks import composition


def test_runner_passes_every_option_with_its_value_to_the_named_modules(monkeypatch) -> None:
    calls: list[tuple[str, list[str]]] = []

    def fake_import(name: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(main=lambda argv: calls.append((name, argv)) or 0)

    monkeypatch.setattr(runner.importlib, "import_module", fake_import)
    assert runner.main(["composition", "train", "--quick", "--steps", "4", "--methods", "cmlora"]) == 0
    options = ["--quick", "--steps", "4", "--methods", "cmlora"]
    assert calls == [("benchmarks.composition", options), ("benchmarks.train", options)]
    assert runner.main(["nonsense"]) == 2


def test_methods_table_counts_each_schedules_unet_evaluations(capsys) -> None:
    steps = 4
    args = ["--quick", "--steps", str(steps), "--repeats", "1", "--parts", "methods"]
    assert composition.main([*args, "--methods", "composite", "cmlora"]) == 0
    out = capsys.readouterr().out
    found = re.findall(r"^\s*(\d) (\w+)\s+(\d+)\s+(\d+)\s", out, flags=re.MULTILINE)
    rows = {(int(n), method): int(full) for n, method, full, _ in found}
    shallow = {(int(n), method): int(rows) for n, method, _, rows in found}
    assert {method for _, method in rows} == {"single", "composite", "cmlora"}  # merge/switch/clora not run
    refreshes = len(composition_refreshes(steps))
    for n in (2, 3, 4):
        assert rows[n, "single"] == 2 * steps  # CFG pair per step
        assert rows[n, "composite"] == 2 * n * steps
        # step 0 in full for all; at later refresh steps the others in full and the dominant adapter shallow,
        # at the other steps the dominant adapter alone in full (the rest are shallow passes)
        assert rows[n, "cmlora"] == 2 * (n + (refreshes - 1) * (n - 1) + steps - refreshes)
        assert shallow[n, "cmlora"] == 2 * n * steps - rows[n, "cmlora"]  # every other row is a cached one
        assert shallow[n, "composite"] == shallow[n, "single"] == 0
        ratio, cached = rows[n, "cmlora"] / rows[n, "composite"], shallow[n, "cmlora"] / rows[n, "composite"]
        assert re.search(rf"^\s*{n} cmlora .* {ratio:.2f}x / {cached:.2f}x / \d", out, re.MULTILINE)
    assert "clora peak memory" not in out


def test_methods_table_times_the_chosen_clora_preset(capsys) -> None:
    steps = 2
    args = ["--quick", "--steps", str(steps), "--repeats", "1", "--parts", "methods", "--methods", "clora"]
    assert composition.main([*args, "--clora-preset", "partition"]) == 0
    out = capsys.readouterr().out
    assert "clora options={'preset': 'partition'}" in out
    evals = {int(n): int(e) for n, e in re.findall(r"^\s*(\d) clora\s+(\d+)\s", out, flags=re.MULTILINE)}
    # no latent updates, and the objects' masks claim every cell, so the idle base branch is skipped: the CFG
    # pair of every adapter's branch, per step (`light` would add the base branch and the update rounds)
    assert evals == {n: 2 * n * steps for n in (2, 3, 4)}
    assert "clora peak memory N=4 / N=2" in out


def composition_refreshes(steps: int) -> set[int]:
    """Refresh steps of cmlora at its default interval on the benchmark's prompts (separate objects: regions)."""
    from composition.methods.cmlora import default_cache_interval, refresh_steps

    return refresh_steps(steps, default_cache_interval(regional=True))


@pytest.mark.parametrize("bad", [["--methods", "blend"], ["--parts", "everything"]])
def test_unknown_method_or_part_is_refused(bad, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        composition.main(["--quick", *bad])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
