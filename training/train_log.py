"""``train_log.jsonl``: a header line with the run's resolved options, then one JSON line per optimiser step
(step, loss, lr, wall time, ...).

Plain JSON lines so the web app can plot a live loss curve by tailing the file, and a resumed run
appends to the same log (lines after the resume step are dropped first, so the log never holds
the same step twice). The header (``{"profile": ..., "options": {...}}``, no ``step``) records the base-model
profile and every option it resolved (``training.defaults.resolved_options``); ``read_train_log`` returns
the step lines, ``read_log_header`` the header.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.atomic_write import atomic_write_text


class TrainLog:
    """Append-only step log; only the main process writes it."""

    def __init__(self, path: Path, *, resume_step: int = 0, header: dict[str, Any] | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in _rows(path) if row.get("step", 0) <= resume_step] if resume_step else []
        if header is not None and not any("step" not in row for row in kept):
            kept.insert(0, header)
        atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in kept))

    def write(self, **row: Any) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def read_train_log(path: Path) -> list[dict[str, Any]]:
    """The step rows of a log file (empty when the file does not exist); a torn last line is ignored."""
    return [row for row in _rows(path) if "step" in row]


def read_log_header(path: Path) -> dict[str, Any] | None:
    """The header row (``profile``, ``options``) of a log file, or None."""
    return next((row for row in _rows(path) if "step" not in row), None)


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
