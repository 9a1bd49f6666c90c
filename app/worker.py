"""``python -m app.worker JOB_DIR``: run one training job in its own process and report through its event file.

The app's job runner (``app.jobs``) starts this process for each queued job, so the UI stays responsive and a
cancel really stops the work. It reads ``JOB_DIR/job.json`` (a ``TrainConfig`` dict), calls
``training.dreambooth.train`` with a progress callback that appends events and a cancel flag backed by
``JOB_DIR/cancel``, and ends with exactly one terminal event: ``completed`` (adapter file, exports, validation
grids), ``cancelled`` (the resumable checkpoint) or ``failed`` (the error). Exit codes follow the training CLI:
0 done, 1 failed, 2 bad input, 130 cancelled.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from app.events import CANCEL_FILE, EVENTS_FILE, JOB_FILE, EventWriter, FileFlag


def run_job(job_dir: Path) -> int:
    """Train the job in ``job_dir``; every outcome is reported as an event (exceptions included)."""
    events = EventWriter(job_dir / EVENTS_FILE)
    events.emit("started", pid=os.getpid())
    try:
        from training.config import TrainConfig
        from training.dreambooth import train
        from training.preflight import INPUT_ERRORS

        config = TrainConfig.from_dict(json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8")))
    except Exception as exc:
        events.emit("failed", error=f"the job could not be read: {exc}", kind="input")
        return 2
    cancel = FileFlag(job_dir / CANCEL_FILE, parent_pid=os.getppid())
    log = logging.getLogger("atelier.job")
    logged_steps: set[int] = set()

    def progress(step: int, total: int, **info: Any) -> None:
        events.progress(step, total, **info)
        if "loss" in info and step not in logged_steps:
            logged_steps.add(step)
            log.info("step %d/%d loss %.4f lr %.2e", step, total, info["loss"], info.get("lr", 0.0))
        for image in info.get("validation_images") or []:
            log.info("validation grid %s", image)

    try:
        result = train(config, progress=progress, cancel=cancel)
    except INPUT_ERRORS as exc:
        events.emit("failed", error=str(exc), kind="input")
        return 2
    except Exception as exc:
        logging.getLogger(__name__).error("training failed:\n%s", traceback.format_exc())
        events.emit("failed", error=f"{type(exc).__name__}: {exc}", kind="training")
        return 1
    if result.cancelled:
        events.emit("cancelled", step=result.steps, checkpoint=result.checkpoint_path)
        return 130
    events.emit(
        "completed",
        step=result.steps,
        adapter_path=result.adapter_path,
        exports=result.exports,
        final_loss=result.final_loss,
        validation_images=result.validation_images,
        seconds=result.seconds,
        trainable_parameters=result.trainable_parameters,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / JOB_FILE).is_file():
        print(f"usage: python -m app.worker JOB_DIR  (JOB_DIR must hold {JOB_FILE})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    return run_job(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
