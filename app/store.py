"""SQLite persistence for the app: training jobs and the adapter library, under the data directory.

One database file (``<data-dir>/atelier.sqlite3``) holds two tables: ``jobs`` (one row per training job,
its configuration, status and last progress) and ``adapters`` (one row per adapter file in the library).
Only the app process writes it; training workers report through their event files (``app.jobs``).
A library row is inserted only after its file has been moved into ``<data-dir>/adapters/`` atomically,
so the library never lists a half-written file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOB_STATUSES = ("queued", "running", "cancelling", "completed", "cancelled", "interrupted", "failed")
"""Lifecycle of a job: queued → running → completed | cancelled | failed; ``interrupted`` = the app stopped."""
FINAL_STATUSES = ("completed", "cancelled", "interrupted", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    created_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    error TEXT,
    adapter_id TEXT,
    runs INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS adapters (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    file TEXT NOT NULL,
    family TEXT NOT NULL,
    parameters INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    base_model TEXT NOT NULL,
    trigger TEXT NOT NULL,
    sample TEXT,
    source TEXT NOT NULL,
    job_id TEXT,
    created_at REAL NOT NULL,
    metadata TEXT NOT NULL
);
"""


class StoreError(ValueError):
    """A job or adapter does not exist, or a change to it is not allowed."""


@dataclass
class JobRecord:
    """One training job as stored."""

    id: str
    name: str
    status: str
    config: dict[str, Any]
    output_dir: str
    created_at: float
    queued_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total: int = 0
    loss: float | None = None
    error: str | None = None
    adapter_id: str | None = None
    runs: int = 0


@dataclass
class AdapterRecord:
    """One adapter of the library; ``file`` and ``sample`` are relative to the data directory."""

    id: str
    name: str
    file: str
    family: str
    parameters: int
    size_bytes: int
    base_model: str
    trigger: str
    sample: str | None
    source: str
    job_id: str | None
    created_at: float
    metadata: dict[str, Any] = field(default_factory=dict)


def new_id(prefix: str) -> str:
    """A short unique, sortable-by-time id such as ``job-1763897000-3fa2c1``."""
    return f"{prefix}-{int(time.time())}-{uuid.uuid4().hex[:6]}"


class Store:
    """The app's database; safe to use from several threads of one process."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "atelier.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- jobs ---------------------------------------------------------------------------------------
    def add_job(self, name: str, config: dict[str, Any], output_dir: str | Path, job_id: str) -> JobRecord:
        now = time.time()
        record = JobRecord(
            id=job_id,
            name=name,
            status="queued",
            config=config,
            output_dir=str(output_dir),
            created_at=now,
            queued_at=now,
            total=int(config.get("max_train_steps") or 0),
        )
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, name, status, config, output_dir, created_at, queued_at, total) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.id, name, "queued", json.dumps(config), record.output_dir, now, now, record.total),
            )
        return record

    def update_job(self, job_id: str, **values: Any) -> JobRecord:
        """Set columns of one job (``config`` is given as a dict); returns the updated record."""
        if not values:
            return self.get_job(job_id)
        unknown = set(values) - set(JobRecord.__dataclass_fields__) - {"id"}
        if unknown or "id" in values:
            raise StoreError(f"cannot set job field(s) {sorted(unknown | ({'id'} & set(values)))}")
        if "status" in values and values["status"] not in JOB_STATUSES:
            raise StoreError(f"unknown job status {values['status']!r}; expected one of {JOB_STATUSES}")
        if "config" in values:
            values["config"] = json.dumps(values["config"])
        columns = ", ".join(f"{name} = ?" for name in values)
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE jobs SET {columns} WHERE id = ?", (*values.values(), job_id)
            ).rowcount
        if not changed:
            raise StoreError(f"no job {job_id!r}")
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id!r}; pick one from the job list")
        return _job(row)

    def list_jobs(
        self, statuses: tuple[str, ...] | None = None, order: str = "created_at"
    ) -> list[JobRecord]:
        """Jobs oldest first (by ``created_at`` or ``queued_at``), optionally only those in ``statuses``."""
        if order not in ("created_at", "queued_at"):
            raise StoreError(f"cannot order jobs by {order!r}")
        query, args = "SELECT * FROM jobs", ()
        if statuses:
            query += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            args = statuses
        with self._lock:
            rows = self._db.execute(query + f" ORDER BY {order}, rowid", args).fetchall()
        return [_job(row) for row in rows]

    # --- adapters -----------------------------------------------------------------------------------
    def add_adapter(self, record: AdapterRecord) -> AdapterRecord:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO adapters (id, name, file, family, parameters, size_bytes, base_model, trigger, "
                "sample, source, job_id, created_at, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.name,
                    record.file,
                    record.family,
                    record.parameters,
                    record.size_bytes,
                    record.base_model,
                    record.trigger,
                    record.sample,
                    record.source,
                    record.job_id,
                    record.created_at,
                    json.dumps(record.metadata, default=str),
                ),
            )
        return record

    def get_adapter(self, adapter_id: str) -> AdapterRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM adapters WHERE id = ?", (adapter_id,)).fetchone()
        if row is None:
            raise StoreError(f"no adapter {adapter_id!r} in the library; refresh the list")
        return _adapter(row)

    def list_adapters(self) -> list[AdapterRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM adapters ORDER BY created_at, rowid").fetchall()
        return [_adapter(row) for row in rows]

    def adapter_for_job(self, job_id: str) -> AdapterRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM adapters WHERE job_id = ?", (job_id,)).fetchone()
        return _adapter(row) if row is not None else None

    def rename_adapter(self, adapter_id: str, name: str) -> AdapterRecord:
        name = name.strip()
        if not name:
            raise StoreError("the new adapter name is empty; type a name")
        with self._transaction() as db:
            changed = db.execute("UPDATE adapters SET name = ? WHERE id = ?", (name, adapter_id)).rowcount
        if not changed:
            raise StoreError(f"no adapter {adapter_id!r} in the library; refresh the list")
        return self.get_adapter(adapter_id)

    def delete_adapter(self, adapter_id: str) -> AdapterRecord:
        record = self.get_adapter(adapter_id)
        with self._transaction() as db:
            db.execute("DELETE FROM adapters WHERE id = ?", (adapter_id,))
        return record


def _job(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["config"] = json.loads(values["config"])
    return JobRecord(**values)


def _adapter(row: sqlite3.Row) -> AdapterRecord:
    values = dict(row)
    values["metadata"] = json.loads(values["metadata"])
    return AdapterRecord(**values)
