"""The job runner: training jobs queued in SQLite, each run by a separate worker process, one at a time.

``JobRunner.submit`` stores a job (its ``TrainConfig`` and copied subject images under
``<data-dir>/jobs/<id>/``) as ``queued``; a scheduler thread starts the oldest queued job as
``python -m app.worker JOB_DIR`` when no other job runs, tails its event file into the database (step, loss,
ETA) and, when the worker exits, settles the job: ``completed`` (the adapter is moved into the library by
the ``register`` callback), ``cancelled`` (a resumable checkpoint was written), or ``failed`` — also when the
worker died without a word (killed, out of memory), with the exit code and the log tail in the message.
``cancel`` sets the worker's cancel flag (the trainer checkpoints at the next step and exits; a worker that
ignores it is killed after a grace period); ``resume`` re-queues a stopped job from its latest checkpoint.
A new runner over an existing data directory marks jobs that were running when the app stopped as
``interrupted`` (resumable) and registers adapters of jobs whose worker finished while the app was down.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.events import (
    CANCEL_FILE,
    EVENTS_FILE,
    JOB_FILE,
    LOG_FILE,
    TERMINAL_EVENTS,
    last_terminal,
    read_events,
    tail,
)
from app.fingerprints import job_fingerprint
from app.store import JobRecord, Store, StoreError, new_id
from models.atomic_write import atomic_write_text

logger = logging.getLogger(__name__)

RESUMABLE = ("cancelled", "interrupted", "failed")
ACTIVE = ("queued", "running", "cancelling")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
Register = Callable[[JobRecord, dict[str, Any]], str]
"""``register(job, completed_event) -> adapter_id``: move a finished job's adapter into the library."""


class JobError(ValueError):
    """A job request cannot be honoured (unknown job, wrong state); the message says what to do."""


@dataclass
class JobView:
    """Everything the UI shows about one job."""

    job: JobRecord
    position: int | None
    """1-based place among queued jobs (None unless queued)."""
    eta: float | None
    lr: float | None
    losses: list[tuple[int, float]]
    validation_images: list[str]
    log_tail: list[str] = field(default_factory=list)
    note: str | None = None
    """What a running job does before its first step (e.g. generating class images)."""

    @property
    def resumable(self) -> bool:
        return self.job.status in RESUMABLE


class JobRunner:
    """Queue and run training jobs; all database writes about jobs happen on the caller's or runner's thread."""

    def __init__(
        self,
        store: Store,
        register: Register,
        *,
        worker_command: Sequence[str] | None = None,
        poll_seconds: float = 0.2,
        cancel_grace_seconds: float = 120.0,
        start: bool = True,
    ) -> None:
        self.store = store
        self.register = register
        self.jobs_dir = store.data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.worker_command = list(worker_command or [sys.executable, "-m", "app.worker"])
        self.poll_seconds = poll_seconds
        self.cancel_grace_seconds = cancel_grace_seconds
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._running: str | None = None
        self._offset = 0
        self._terminal: dict[str, Any] | None = None
        self._kill_at: float | None = None
        self._progress: dict[str, dict[str, Any]] = {}
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="atelier-job-runner", daemon=True)
        if start:
            self._thread.start()

    # --- requests -----------------------------------------------------------------------------------
    def submit(self, config: Any, name: str | None = None, images: Sequence[str | Path] = ()) -> JobRecord:
        """Queue a training job for ``config`` (a ``TrainConfig``); ``images`` are copied into the job.

        The output folder is always the job's own; ``ConfigError`` is raised before anything is stored.
        """
        job_id = new_id("job")
        job_dir = self.jobs_dir / job_id
        values = dict(config.to_dict())
        values["output_dir"] = str(job_dir / "output")
        if images:
            values["instance_data_dir"] = str(job_dir / "images")
        type(config).from_dict(values).validate()
        if images:
            image_dir = job_dir / "images"
            image_dir.mkdir(parents=True)
            for index, source in enumerate(images):
                source = Path(source)
                shutil.copyfile(source, image_dir / f"{index:03d}-{source.name}")
        _write_json(job_dir / JOB_FILE, values)
        record = self.store.add_job(
            name or values.get("instance_prompt") or job_id, values, job_dir / "output", job_id
        )
        self._wake.set()
        return record

    def active_duplicate(self, config: Any, images: Sequence[str | Path] = ()) -> JobRecord | None:
        """A queued or running job with the same settings and the same image contents as this request."""
        wanted = job_fingerprint(config.to_dict(), images)
        for job in self.store.list_jobs(ACTIVE):
            stored = sorted((self.jobs_dir / job.id / "images").glob("*"))
            if job_fingerprint(job.config, stored) == wanted:
                return job
        return None

    def cancel(self, job_id: str) -> JobRecord:
        """Stop a job: a queued one leaves the queue; a running one checkpoints at its next step and exits."""
        with self._lock:
            job = self._job(job_id)
            if job.status == "queued":
                return self.store.update_job(
                    job_id, status="cancelled", finished_at=time.time(), error="cancelled before it started"
                )
            if job.status not in ("running", "cancelling"):
                raise JobError(f"job {job_id} is {job.status}; only queued or running jobs can be cancelled")
            (self.jobs_dir / job_id / CANCEL_FILE).touch()
            if self._running == job_id and self._kill_at is None:
                self._kill_at = time.monotonic() + self.cancel_grace_seconds
            return self.store.update_job(job_id, status="cancelling")

    def resume(self, job_id: str, max_train_steps: int | None = None) -> JobRecord:
        """Queue a stopped job again; it continues from its latest checkpoint (or starts over without one)."""
        with self._lock:
            job = self._job(job_id)
            if job.status not in RESUMABLE:
                raise JobError(
                    f"job {job_id} is {job.status}; only {', '.join(RESUMABLE)} jobs can be resumed"
                )
            config = dict(job.config, resume_from_checkpoint="latest")
            if max_train_steps is not None:
                if max_train_steps < max(job.step, 1):
                    raise JobError(
                        f"max_train_steps {max_train_steps} is below the {job.step} steps already done"
                    )
                config["max_train_steps"] = max_train_steps
            job_dir = self.jobs_dir / job_id
            _write_json(job_dir / JOB_FILE, config)
            (job_dir / CANCEL_FILE).unlink(missing_ok=True)
            record = self.store.update_job(
                job_id,
                status="queued",
                config=config,
                queued_at=time.time(),
                finished_at=None,
                error=None,
                total=int(config.get("max_train_steps") or job.total),
            )
        self._wake.set()
        return record

    # --- views --------------------------------------------------------------------------------------
    def queue_position(self, job_id: str) -> int | None:
        queued = [job.id for job in self.store.list_jobs(("queued",), order="queued_at")]
        return queued.index(job_id) + 1 if job_id in queued else None

    def view(self, job_id: str, log_lines: int = 20) -> JobView:
        job = self._job(job_id)
        out = Path(job.output_dir)
        from training.train_log import read_train_log

        losses = [(int(row["step"]), float(row["loss"])) for row in read_train_log(out / "train_log.jsonl")]
        progress = self._progress.get(job_id, {})
        return JobView(
            job=job,
            position=self.queue_position(job_id) if job.status == "queued" else None,
            eta=progress.get("eta") if job.status in ("running", "cancelling") else None,
            lr=progress.get("lr"),
            note=progress.get("note") if job.status == "running" else None,
            losses=losses,
            validation_images=[
                str(p) for p in sorted((out / "validation").glob("step-*.png"), key=_step_key)
            ],
            log_tail=tail(self.jobs_dir / job_id / LOG_FILE, log_lines),
        )

    def wait(
        self, job_id: str, timeout: float, statuses: Sequence[str] = ("completed", *RESUMABLE)
    ) -> JobRecord:
        """Block until the job reaches one of ``statuses`` (``TimeoutError`` after ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self._job(job_id)
            if job.status in statuses:
                return job
            time.sleep(self.poll_seconds / 2)
        raise TimeoutError(f"job {job_id} still {self._job(job_id).status} after {timeout:.0f} s")

    def worker_pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    # --- lifecycle ----------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Stop the scheduler; a running job is cancelled (checkpointed) and waited for up to ``timeout``."""
        with self._lock:
            running = self._running
        if running is not None:
            self.cancel(running)
            try:
                self.wait(running, timeout)
            except TimeoutError:
                with self._lock:
                    if self._proc is not None:
                        self._proc.kill()
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def recover(self) -> None:
        """Settle jobs left running by a previous app process (see the module docstring)."""
        for job in self.store.list_jobs(("running", "cancelling")):
            events, _ = read_events(self.jobs_dir / job.id / EVENTS_FILE)
            terminal = last_terminal(events)
            if terminal is not None:
                self._settle(job, terminal, exit_code=None)
            else:
                self.store.update_job(
                    job.id,
                    status="interrupted",
                    finished_at=time.time(),
                    error=f"the app stopped while this job ran (at step {job.step}); resume it to continue",
                )
        for job in self.store.list_jobs(("completed",)):
            if job.adapter_id is None:
                events, _ = read_events(self.jobs_dir / job.id / EVENTS_FILE)
                terminal = last_terminal(events)
                if terminal is not None and terminal["event"] == "completed":
                    self._settle(job, terminal, exit_code=None)

    # --- scheduler ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    if self._proc is None:
                        self._start_next()
                    else:
                        self._pump()
            except Exception:
                logger.exception("job runner error")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _start_next(self) -> None:
        queued = self.store.list_jobs(("queued",), order="queued_at")
        if not queued:
            return
        job = queued[0]
        job_dir = self.jobs_dir / job.id
        events_path = job_dir / EVENTS_FILE
        self._offset = events_path.stat().st_size if events_path.exists() else 0
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        )
        with (job_dir / LOG_FILE).open("ab") as log:
            self._proc = subprocess.Popen(
                [*self.worker_command, str(job_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._running, self._terminal, self._kill_at = job.id, None, None
        self.store.update_job(job.id, status="running", started_at=time.time(), runs=job.runs + 1)
        logger.info("started job %s (pid %d)", job.id, self._proc.pid)

    def _pump(self) -> None:
        assert self._proc is not None and self._running is not None
        job_id = self._running
        events, self._offset = read_events(self.jobs_dir / job_id / EVENTS_FILE, self._offset)
        latest: dict[str, Any] = {}
        for event in events:
            if event["event"] == "progress" and "loss" in event:
                latest = event
            elif event["event"] == "progress" and "class_images" in event:
                done, total = event["class_images"]
                self._progress[job_id] = {
                    "note": f"generating class images for prior preservation: {done}/{total}"
                }
            elif event["event"] in TERMINAL_EVENTS:
                self._terminal = event
        if latest:
            self._progress[job_id] = latest
            self.store.update_job(
                job_id, step=int(latest["step"]), total=int(latest["total"]), loss=latest["loss"]
            )
        exit_code = self._proc.poll()
        if exit_code is None:
            if self._kill_at is not None and time.monotonic() > self._kill_at:
                logger.warning("job %s ignored its cancel flag; killing pid %d", job_id, self._proc.pid)
                self._proc.kill()
            return
        self._proc = None
        self._running = None
        self._settle(self._job(job_id), self._terminal, exit_code)
        self._wake.set()

    def _settle(self, job: JobRecord, terminal: dict[str, Any] | None, exit_code: int | None) -> None:
        now = time.time()
        if terminal is None:
            if job.status == "cancelling":
                self.store.update_job(job.id, status="cancelled", finished_at=now, error="stopped by cancel")
                return
            how = (
                f"was killed by signal {-exit_code}"
                if exit_code and exit_code < 0
                else f"exited with code {exit_code}"
            )
            last = " | ".join(tail(self.jobs_dir / job.id / LOG_FILE, 3))
            self.store.update_job(
                job.id,
                status="failed",
                finished_at=now,
                error=f"the training worker {how} without reporting a result (last log lines: {last or 'none'}); "
                "resume the job to continue from its latest checkpoint",
            )
            return
        kind = terminal["event"]
        step = int(terminal.get("step") or job.step)
        if kind == "cancelled":
            self.store.update_job(job.id, status="cancelled", finished_at=now, step=step, error=None)
        elif kind == "failed":
            self.store.update_job(
                job.id, status="failed", finished_at=now, error=terminal.get("error", "unknown error")
            )
        else:
            try:
                adapter_id = self.register(job, terminal)
            except (OSError, ValueError, StoreError) as exc:
                self.store.update_job(
                    job.id,
                    status="failed",
                    finished_at=now,
                    error=f"training finished but the adapter could not be added: {exc}",
                )
                return
            self.store.update_job(
                job.id,
                status="completed",
                finished_at=now,
                step=step,
                total=max(step, job.total),
                loss=terminal.get("final_loss"),
                adapter_id=adapter_id,
                error=None,
            )

    def _job(self, job_id: str) -> JobRecord:
        try:
            return self.store.get_job(job_id)
        except StoreError as exc:
            raise JobError(str(exc)) from None


def _step_key(path: Path) -> int:
    try:
        return int(path.stem.split("-")[-1])
    except ValueError:
        return -1


def _write_json(path: Path, values: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(values, indent=2))
