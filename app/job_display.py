"""How the Train tab shows jobs: dropdown labels that tell jobs apart, the job to show after a page reload,
the smoothed loss curve, the validation gallery (newest first, captioned with its step) and which of
Cancel / Resume apply. Plain functions over ``JobRecord`` / ``JobView`` so they are tested without a browser.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from app.jobs import ACTIVE, RESUMABLE, JobView
from app.store import JobRecord, Store

LOSS_EMA_ALPHA = 0.1
"""Weight of the newest loss in the smoothed curve (about the last 10 steps carry most of the weight)."""
RAW, SMOOTHED = "loss (per step)", "loss (smoothed)"
LOSS_COLORS = {RAW: "#cbd5e1", SMOOTHED: "#1d4ed8"}
"""The raw per-step loss is drawn faint; the smoothed curve over it in a strong colour."""


def job_label(job: JobRecord) -> str:
    """``name · status · step/total steps · family · day time`` — enough to tell two jobs of one subject apart."""
    family = str(job.config.get("adapter") or "?")
    when = time.strftime("%b %d %H:%M", time.localtime(job.created_at))
    progress = f"{job.step}/{job.total} steps" if job.total else "not started"
    return f"{job.name} · {job.status} · {progress} · {family} · {when}"


def job_choices(store: Store) -> list[tuple[str, str]]:
    """The job dropdown's entries, newest first."""
    return [(job_label(job), job.id) for job in reversed(store.list_jobs())]


def active_job_id(store: Store) -> str | None:
    """The job to show when the page opens: the running one, else the next queued one, else none."""
    running = store.list_jobs(("running", "cancelling"))
    if running:
        return running[-1].id
    queued = store.list_jobs(("queued",), order="queued_at")
    return queued[0].id if queued else None


def smoothed(values: Sequence[float], alpha: float = LOSS_EMA_ALPHA) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style), so it starts at the first value."""
    average, out = 0.0, []
    for count, value in enumerate(values, start=1):
        average = (1 - alpha) * average + alpha * value
        out.append(average / (1 - (1 - alpha) ** count))
    return out


def loss_frame(losses: Sequence[tuple[int, float]]) -> pd.DataFrame:
    """Long frame (step, loss, series) holding the raw per-step loss and its smoothed curve."""
    steps = [s for s, _ in losses]
    raw = [v for _, v in losses]
    return pd.DataFrame(
        {
            "step": pd.Series(steps + steps, dtype="int64"),
            "loss": pd.Series(raw + smoothed(raw), dtype="float64"),
            "series": pd.Series([RAW] * len(raw) + [SMOOTHED] * len(raw), dtype="object"),
        }
    )


def validation_items(paths: Sequence[str], final_step: int | None = None) -> list[tuple[str, str]]:
    """Validation grids newest first, each captioned with its training step (the last one of a finished job
    is marked final)."""
    items = []
    for path in sorted(paths, key=_step_of, reverse=True):
        step = _step_of(path)
        caption = f"step {step}" + (" (final)" if final_step is not None and step == final_step else "")
        items.append((path, caption))
    return items


def button_states(job: JobRecord | None) -> tuple[dict, dict]:
    """Gradio updates for Cancel and Resume: each enabled only when it applies; Cancel red only then."""
    import gradio as gr

    can_cancel = job is not None and job.status in ACTIVE and job.status != "cancelling"
    can_resume = job is not None and job.status in RESUMABLE
    return (
        gr.update(interactive=can_cancel, variant="stop" if can_cancel else "secondary"),
        gr.update(interactive=can_resume, variant="primary" if can_resume else "secondary"),
    )


def gallery_for(view: JobView) -> list[tuple[str, str]]:
    final = view.job.step if view.job.status == "completed" else None
    return validation_items(view.validation_images, final)


def _step_of(path: str) -> int:
    try:
        return int(Path(path).stem.split("-")[-1])
    except ValueError:
        return -1
