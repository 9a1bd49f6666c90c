"""The channel between a training worker process and the app: a JSON-lines event file and a cancel flag.

The worker appends one JSON object per line to ``events.jsonl`` (``started``, ``progress``, and exactly one
terminal event: ``completed``, ``cancelled`` or ``failed``); the app tails the file from a byte offset and
ignores a torn last line. Cancelling is a file (``cancel``) whose existence the trainer polls every step
through ``FileFlag.is_set()``; the flag is also set when the app process that started the worker is gone,
so an orphaned worker checkpoints and stops instead of training on unobserved.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
CANCEL_FILE = "cancel"
JOB_FILE = "job.json"
LOG_FILE = "worker.log"
TERMINAL_EVENTS = ("completed", "cancelled", "failed")


class EventWriter:
    """Appends events to a job's event file; each line is flushed to the OS before ``emit`` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **payload: Any) -> None:
        line = json.dumps({"event": event, "time": time.time(), **payload}, default=_plain)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def progress(self, step: int, total: int, **info: Any) -> None:
        """The trainer's ``progress(step, total, **info)`` callback."""
        self.emit("progress", step=step, total=total, **info)


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events written after byte ``offset`` and the offset to continue from (a torn last line waits)."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    events = []
    consumed = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        consumed += len(line)
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + consumed


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a text file (empty when missing); reads at most the last 64 KiB."""
    if not path.is_file():
        return []
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 65536))
        text = handle.read().decode("utf-8", errors="replace")
    return text.splitlines()[-lines:]


def last_terminal(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The terminal event of the last run in ``events`` (None when the last run never reported one)."""
    for event in reversed(events):
        if event["event"] in TERMINAL_EVENTS:
            return event
        if event["event"] == "started":
            return None
    return None


class FileFlag:
    """A cancel flag shared across processes: set when ``path`` exists or the parent process has exited."""

    def __init__(self, path: Path, parent_pid: int | None = None) -> None:
        self.path = path
        self.parent_pid = parent_pid

    def is_set(self) -> bool:
        return self.path.exists() or (self.parent_pid is not None and os.getppid() != self.parent_pid)

    def set(self) -> None:
        self.path.touch()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)
