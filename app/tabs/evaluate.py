"""The Evaluate tab: score the last Compose gallery, uploaded images, a zip of images or a server folder under
``--eval-root`` (``app.eval_inputs``) against prompts (CLIPScore, Hessel et al. 2021) and/or reference images
(CLIP-I, DreamBooth) with ``evaluation.score``; a numbered, rounded table beside thumbnails, a bar chart in
image order, a one-line explanation of each score (``app.score_help``), CSV. Refusals are toasts."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from app.eval_inputs import InputError, extract_zip, folder_images
from app.feedback import refuse
from app.score_help import glossary, score_frames
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


THUMBNAIL_SIDE = 256


def thumbnail(path: str) -> Image.Image:
    """A small copy of an image for the gallery beside the scores (a copy, so images from a server folder
    outside the served data directory are shown too, never the folder itself)."""
    with Image.open(path) as image:
        small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
    return small


def published_thumbnail(studio: Studio, path: str) -> str:
    """``thumbnail(path)`` written under ``<data-dir>/public/shown/`` (``app.public``), the one folder served."""
    name = f"{Path(path).stem}-thumb.png"
    return studio.public.publish_made(path, name, lambda out: thumbnail(path).save(out, format="PNG"))


def gather_images(
    studio: Studio,
    uploaded: list[str] | None,
    archive: str | None,
    folder: str,
    gallery: list[str],
    use_gallery: bool,
    scratch: Path,
) -> list[str]:
    """Uploads, then the zip's images (extracted under ``scratch``, a folder the caller removes), then the
    server folder's; the Compose gallery when none were given."""
    chosen = list(uploaded or [])
    if archive:
        chosen += [str(p) for p in extract_zip(Path(archive), scratch / "zip")]
    if folder and folder.strip():
        chosen += [str(p) for p in folder_images(studio.settings.eval_root, folder)]
    if not chosen and use_gallery:
        chosen = list(gallery or [])
    return chosen


def build(studio: Studio, last_images: gr.State) -> None:
    """Lay out the Evaluate tab; ``last_images`` holds the files of the last Compose gallery."""
    root = studio.settings.eval_root
    with gr.Row():
        with gr.Column():
            use_gallery = gr.Checkbox(
                True, label="Score the last Compose gallery (when no images are given below)"
            )
            images = gr.File(label="Images to score", file_count="multiple", file_types=["image"])
            archive = gr.File(label="…or a zip of images", file_types=[".zip"], elem_id="evaluate-zip")
            folder = gr.Textbox(
                "",
                label="…or a folder on the server",
                placeholder=f"a folder under the evaluation root ({root.name}/)"
                if root
                else "off: start the app with --eval-root DIR",
                interactive=root is not None,
                elem_id="evaluate-folder",
            )
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
            chart = gr.BarPlot(
                x="#",
                y="score",
                color="metric",
                title="Scores per image (#: order scored)",
                height=280,
                elem_id="evaluate-chart",
            )
            with gr.Row():
                table = gr.Dataframe(label="Scores", interactive=False, scale=3, elem_id="evaluate-table")
                thumbs = gr.Gallery(
                    label="Images",
                    columns=3,
                    height=280,
                    object_fit="contain",
                    scale=2,
                    elem_id="evaluate-thumbs",
                )
            explained = gr.Markdown(elem_id="evaluate-glossary")
            download = gr.File(label="CSV", interactive=False)

    def score(
        uploaded: list[str] | None,
        from_gallery: bool,
        text: str,
        refs: list[str] | None,
        gallery: list[str],
        zipped: str | None = None,
        server_folder: str = "",
    ) -> tuple:
        # an extracted zip lives only while it is scored: its thumbnails are published copies
        with tempfile.TemporaryDirectory(prefix=".evaluate-", dir=studio.store.data_dir) as scratch:
            return scored(uploaded, from_gallery, text, refs, gallery, zipped, server_folder, Path(scratch))

    def scored(
        uploaded: list[str] | None,
        from_gallery: bool,
        text: str,
        refs: list[str] | None,
        gallery: list[str],
        zipped: str | None,
        server_folder: str,
        scratch: Path,
    ) -> tuple:
        try:
            chosen = gather_images(studio, uploaded, zipped, server_folder, gallery, from_gallery, scratch)
        except InputError as exc:
            return refuse(str(exc), 6)
        for path in [*chosen, *(refs or [])]:
            check = studio.check_uploads([path])
            if not check.ok:
                return refuse(check.messages[0], 6)
        try:
            scores = studio.evaluate(chosen, text.splitlines() if text else None, refs)
        except (RequestError, ValueError) as exc:
            return refuse(str(exc), 6)
        rows = scores.rows()
        frame, long, order = score_frames(rows)
        frame["image"] = [Path(name).name for name in frame["image"]]
        lines = [f"Model: `{scores.model}`, {len(rows)} image(s)."]
        lines += [
            f"- {name}: mean {s['mean']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})"
            for name, s in scores.summary().items()
        ]
        shown = "clipscore_100" if "clipscore_100" in frame else "clip_i"
        captions = [
            f"{label} · {shown} {value:.1f}" for label, value in zip(order, frame[shown], strict=True)
        ]
        path = write_csv(rows, studio.public.folder("evaluations"))
        return (
            "\n".join(lines),
            gr.BarPlot(value=long, sort=order),
            frame,
            [
                (published_thumbnail(studio, image), caption)
                for image, caption in zip(chosen, captions, strict=True)
            ],
            glossary([c for c in frame.columns] + ["clip_i x100"] * ("clip_i" in frame)),
            str(path),
        )

    run.click(
        score,
        [images, use_gallery, prompts, references, last_images, archive, folder],
        [summary, chart, table, thumbs, explained, download],
        api_name="evaluate",
        concurrency_id="generation",
        concurrency_limit=1,
    )
