"""The Library tab: every trained or imported adapter with its metadata and sample grid; rename, delete
(with a confirmation step), download the file and its exports under the adapter's name (each with its
fidelity), inspect what an adapter changed (beside another), import a ``.safetensors`` LoRA from disk (a file
already in the library is named, not added twice). Refusals are toasts (``app.feedback.refuse``), so the table
and the selector never turn into error boxes."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from app.feedback import refuse
from app.library import LibraryError
from app.store import StoreError
from app.studio import Studio

COLUMNS = ["name", "family", "parameters", "size (KB)", "base model", "trigger", "source", "id"]
SAMPLE_MIN_WIDTH = 512
"""Sample grids narrower than this are enlarged by a whole factor with nearest-neighbour (pixels stay crisp)."""


def readable_sample(path: str | None) -> Image.Image | None:
    """The sample grid enlarged by a whole factor to at least ``SAMPLE_MIN_WIDTH`` pixels wide."""
    if path is None:
        return None
    with Image.open(path) as image:
        image.load()
        factor = max(1, -(-SAMPLE_MIN_WIDTH // max(image.width, 1)))
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def table(studio: Studio) -> pd.DataFrame:
    rows = [
        [
            r.name,
            r.family,
            r.parameters,
            round(r.size_bytes / 1024, 1),
            r.base_model,
            r.trigger,
            r.source,
            r.id,
        ]
        for r in studio.library.records()
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def adapter_choices(studio: Studio) -> list[tuple[str, str]]:
    return [(f"{r.name} · {r.family} · {r.id}", r.id) for r in studio.library.records()]


def build(studio: Studio) -> tuple[gr.Dataframe, gr.Dropdown]:
    """Lay out the Library tab; returns the table and selector (refreshed when the tab is selected)."""
    with gr.Row():
        adapters = gr.Dataframe(table(studio), label="Adapters", interactive=False, elem_id="library-table")
    with gr.Row():
        with gr.Column():
            selected = gr.Dropdown(
                adapter_choices(studio), label="Adapter", value=None, elem_id="library-select"
            )
            details = gr.Markdown(elem_id="library-details")
            with gr.Row():
                new_name = gr.Textbox("", label="New name", scale=3, elem_id="library-new-name")
                rename = gr.Button("Rename", scale=1, elem_id="library-rename")
            delete = gr.Button("Delete…", variant="stop")
            with gr.Row(visible=False) as confirm_row:
                gr.Markdown("Delete this adapter and its files? This cannot be undone.")
                confirm = gr.Button("Yes, delete", variant="stop")
                keep = gr.Button("Keep it")
            downloads = gr.File(
                label="Download: adapter file and exports",
                file_count="multiple",
                interactive=False,
                elem_id="library-downloads",
            )
            with gr.Accordion("Inspect: what the adapter changed, layer by layer", open=False):
                compare_with = gr.Dropdown(
                    adapter_choices(studio), label="Compare with (optional)", value=None
                )
                inspect_button = gr.Button("Inspect")
                inspect_summary = gr.Markdown()
                inspect_plots = gr.Gallery(label="Inspector plots", columns=2, height=520)
        with gr.Column():
            sample = gr.Image(
                label="Sample grid (last validation images)",
                interactive=False,
                height=320,
                elem_id="library-sample",
                format="png",
            )
            with gr.Accordion("Import a .safetensors adapter (Atelier or kohya/A1111 LoRA)", open=False):
                upload = gr.File(label="Adapter file", file_types=[".safetensors"], elem_id="library-upload")
                import_name = gr.Textbox("", label="Name (default: file name)")
                import_trigger = gr.Textbox("", label="Trigger phrase (the words that summon it)")
                import_button = gr.Button("Import", elem_id="library-import")
            message = gr.Markdown(elem_id="library-message")

    def describe(record: Any) -> str:
        text = "\n".join(
            [
                f"### {record.name}",
                f"- family: **{record.family}**, {record.parameters:,} parameters, {record.size_bytes / 1024:.1f} KB",
                f"- base model: `{record.base_model}`",
                f"- trigger: `{record.trigger or '—'}`",
                f"- source: {record.source}" + (f" (job `{record.job_id}`)" if record.job_id else ""),
            ]
        )
        notes = studio.library.export_notes(record)
        if notes:
            text += "\n- exports: " + "; ".join(
                f"`{n}` ({note})" if note else f"`{n}`" for n, note in notes.items()
            )
        return text

    def downloads_of(record: Any) -> list[str]:
        """The adapter file and its exports, published (``app.public``) under the adapter's current name."""
        return [studio.public.publish(path, name) for path, name in studio.library.download_names(record)]

    def sample_of(record: Any) -> str | None:
        """The sample grid enlarged for reading, published (``app.public``) as ``sample.png``."""
        path = studio.library.sample_path(record)
        if path is None or not path.is_file():
            return None
        return studio.public.publish_made(
            path, "sample.png", lambda out: readable_sample(str(path)).save(out, format="PNG")
        )

    def show(adapter_id: str | None) -> tuple[str, Any, list[str]]:
        if not adapter_id:
            return "", None, []
        try:
            record = studio.library.get(adapter_id)
        except StoreError as exc:
            return refuse(str(exc), 3)
        return describe(record), sample_of(record), downloads_of(record)

    def refreshed(value: str | None = None) -> tuple[pd.DataFrame, Any]:
        return table(studio), gr.update(choices=adapter_choices(studio), value=value)

    def do_rename(adapter_id: str | None, name: str) -> tuple[Any, ...]:
        if not adapter_id:
            return refuse("Pick an adapter first.", 5)
        try:
            record = studio.library.rename(adapter_id, name)
        except StoreError as exc:
            return refuse(str(exc), 5)
        return (
            *refreshed(adapter_id),
            f"Renamed to **{record.name}**.",
            describe(record),
            downloads_of(record),
        )

    def do_delete(adapter_id: str | None) -> tuple[Any, ...]:
        if not adapter_id:
            return refuse("Pick an adapter first.", 4)
        try:
            studio.public.unpublish(studio.library.path(studio.library.get(adapter_id)).parent)
            record = studio.library.delete(adapter_id)
        except StoreError as exc:
            return refuse(str(exc), 4)
        return *refreshed(None), f"Deleted **{record.name}**.", gr.update(visible=False)

    def do_import(path: str | None, name: str, trigger: str) -> tuple[Any, ...]:
        if not path:
            return refuse("Choose a .safetensors file to import.", 3)
        try:
            record = studio.library.import_file(
                path, lambda: studio.pipeline().unet, name=name, trigger=trigger
            )
        except (LibraryError, StoreError) as exc:
            return refuse(str(exc), 3)
        return *refreshed(
            record.id
        ), f"Imported **{record.name}** ({record.family}, {record.parameters:,} parameters)."

    def do_inspect(adapter_id: str | None, other_id: str | None) -> tuple[Any, ...]:
        if not adapter_id:
            return refuse("Pick an adapter first.", 2)
        from models.adapters.inspect import summary

        try:
            record = studio.library.get(adapter_id)
            other = studio.library.get(other_id) if other_id and other_id != adapter_id else None
            reports, files = studio.library.inspect(record, studio.pipeline(), other)
        except (StoreError, LibraryError) as exc:
            return refuse(str(exc), 2)
        images = [(studio.public.publish(p), p.stem) for p in files if p.suffix == ".png"]
        return "\n".join(f"- {summary(r)}" for r in reports), images

    selected.change(show, selected, [details, sample, downloads], api_name="adapter_details")
    selected.change(
        lambda: gr.update(choices=adapter_choices(studio)), None, compare_with, api_visibility="private"
    )
    inspect_button.click(
        do_inspect, [selected, compare_with], [inspect_summary, inspect_plots], api_name="inspect_adapter"
    )
    rename.click(
        do_rename,
        [selected, new_name],
        [adapters, selected, message, details, downloads],
        api_name="rename_adapter",
    )
    delete.click(lambda: gr.update(visible=True), None, confirm_row, api_visibility="private")
    keep.click(lambda: gr.update(visible=False), None, confirm_row, api_visibility="private")
    confirm.click(do_delete, selected, [adapters, selected, message, confirm_row], api_name="delete_adapter")
    import_button.click(
        do_import,
        [upload, import_name, import_trigger],
        [adapters, selected, message],
        api_name="import_adapter",
    )
    return adapters, selected
