"""Atelier's Gradio app: the Train, Library, Compose and Evaluate tabs over one ``Studio``, and how it is served.

Serving rules: bind to the loopback address unless told otherwise, never a public share link unless asked,
password protection with ``--auth user:pass``, uploads limited in size (and checked by content by the tabs),
and only ``<data-dir>/public/`` served as files (``app.public``: what the page shows, never the database,
job state, logs or adapter folders). Gradio's queue gives every event its place in line: the
generation events (Compose, Evaluate) share one concurrency group of size 1, because they run the one base
pipeline in this process; training jobs queue in the job runner (one worker process at a time) and the Train
tab shows their place in that queue.
"""

from __future__ import annotations

import gradio as gr

from app.studio import Studio
from app.tabs import compose, evaluate, library, train

QUEUE_MAX_SIZE = 64
"""Events waiting beyond this are refused with Gradio's "queue is full" message, which bounds memory."""


def build_app(studio: Studio) -> gr.Blocks:
    """The Blocks app; nothing is served until ``serve``."""
    with gr.Blocks(title="Atelier") as demo:
        gr.Markdown(
            "# Atelier\nTrain a concept adapter on a few photos, then compose several concepts in one image. "
            f"Base model: `{studio.settings.base_model or 'toy world'}` · data: `{studio.settings.data_dir}`"
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                job_select = train.build(studio)
            with gr.Tab("Library", id="library", elem_id="tab-library") as library_tab:
                library_table, library_select = library.build(studio)
            with gr.Tab("Compose", id="compose", elem_id="tab-compose") as compose_tab:
                compose_picker, last_images = compose.build(studio)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
                evaluate.build(studio, last_images)
        train_tab.select(
            lambda: gr.update(choices=train.job_choices(studio)), None, job_select, api_visibility="private"
        )
        demo.load(lambda: train.current_job(studio), None, job_select, api_visibility="private")
        library_tab.select(
            lambda: (library.table(studio), gr.update(choices=library.adapter_choices(studio))),
            None,
            [library_table, library_select],
            api_name="library",
        )
        compose_tab.select(
            lambda: gr.update(choices=library.adapter_choices(studio)),
            None,
            compose_picker,
            api_visibility="private",
        )
    demo.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    return demo


def serve(
    studio: Studio,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    block: bool = True,
) -> gr.Blocks:
    """Build and launch the app; ``block=False`` returns at once (tests, embedding)."""
    demo = build_app(studio)
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=share,
        allowed_paths=[str(studio.public.root)],
        max_file_size=f"{studio.settings.max_upload_mb}mb",
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
        ssr_mode=False,
        footer_links=["api", "gradio"],
    )
    return demo
