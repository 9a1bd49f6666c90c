"""The Evaluate tab: score the last Compose gallery or uploaded images against prompts (CLIPScore, Hessel
et al. 2021) and/or reference images (CLIP-I, DreamBooth) with ``evaluation.score``; table, bar chart, CSV."""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app.studio import RequestError, Studio
from models.atomic_write import atomic_write_text


def write_csv(rows: list[dict[str, Any]], folder: Path) -> Path:
    """The score rows as a CSV file under ``folder`` (written to a temporary name, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    path = folder / f"scores-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.csv"
    return atomic_write_text(path, buffer.getvalue())


def build(studio: Studio, last_images: gr.State) -> None:
    """Lay out the Evaluate tab; ``last_images`` holds the files of the last Compose gallery."""
    with gr.Row():
        with gr.Column():
            use_gallery = gr.Checkbox(
                True, label="Score the last Compose gallery (when no images are uploaded)"
            )
            images = gr.File(label="Images to score", file_count="multiple", file_types=["image"])
            prompts = gr.Textbox(
                "",
                elem_id="evaluate-prompts",
                label="Prompts: one for every image, or one line per image",
                lines=4,
            )
            references = gr.File(
                label="Reference images (CLIP-I)", file_count="multiple", file_types=["image"]
            )
            run = gr.Button("Score", variant="primary", elem_id="evaluate-score")
        with gr.Column():
            summary = gr.Markdown(elem_id="evaluate-summary")
            chart = gr.BarPlot(x="image", y="score", color="metric", title="Scores per image", height=280)
            table = gr.Dataframe(label="Scores", interactive=False)
            download = gr.File(label="CSV", interactive=False)

    def score(
        uploaded: list[str] | None, from_gallery: bool, text: str, refs: list[str] | None, gallery: list[str]
    ) -> tuple:
        chosen = list(uploaded or []) or (list(gallery or []) if from_gallery else [])
        for path in [*chosen, *(refs or [])]:
            check = studio.check_uploads([path])
            if not check.ok:
                raise gr.Error(check.messages[0])
        try:
            scores = studio.evaluate(chosen, text.splitlines() if text else None, refs)
        except (RequestError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        rows = scores.rows()
        frame = pd.DataFrame(rows)
        frame["image"] = [f"{i + 1}. {Path(name).name}" for i, name in enumerate(frame["image"])]
        chart_frame = frame.assign(**({"clip_i x100": frame["clip_i"] * 100} if "clip_i" in frame else {}))
        metrics = [m for m in ("clipscore_100", "clip_i x100") if m in chart_frame]
        long = chart_frame.melt(id_vars=["image"], value_vars=metrics, var_name="metric", value_name="score")
        lines = [f"Model: `{scores.model}`, {len(rows)} image(s)."]
        lines += [
            f"- {name}: mean {s['mean']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})"
            for name, s in scores.summary().items()
        ]
        path = write_csv(rows, studio.public.folder("evaluations"))
        return "\n".join(lines), long, frame, str(path)

    run.click(
        score,
        [images, use_gallery, prompts, references, last_images],
        [summary, chart, table, download],
        api_name="evaluate",
        concurrency_id="generation",
        concurrency_limit=1,
    )
