"""The Compose tab: pick 1–N library adapters, bind each to a phrase of the prompt with a weight, choose a
composition method (merge, switch, composite, CLoRA, CMLoRA) and its options → a gallery; "Compare methods"
renders the same seeds with every method side by side with CLIP scores and UNet-evaluation counts; CLoRA's
attention masks are shown under the gallery."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr
import pandas as pd

from app.store import StoreError
from app.studio import AdapterChoice, ComposeOutput, ComposeRequest, RequestError, Studio
from app.tabs.library import adapter_choices

TABLE_COLUMNS = ["adapter id", "name", "phrase", "weight", "plain form"]
GENERATION = "generation"
"""Concurrency group of every event that runs the base pipeline in the app process (one at a time)."""


def default_options(method: str, profile: Any = None) -> str:
    """A method's options as editable JSON: its own defaults under the base-model profile's settings
    (`models.profiles`; values that JSON cannot hold are left out)."""
    from composition.methods import clora, method_options

    options = method_options(method)
    chosen = profile.method_options(method) if profile is not None else {}
    preset = clora.PRESETS.get(chosen.get("preset")) if method == "clora" else None
    if preset is not None:  # the chosen preset's fields, as method_options lists the default preset's
        options.update({name: getattr(preset, name) for name in clora.CloraOptions.__dataclass_fields__})
    options.update(chosen)
    return json.dumps(
        {k: v for k, v in options.items() if isinstance(v, int | float | str | bool | None)}, indent=2
    )


def profile_text(profile: Any) -> str:
    """The Compose tab's line naming the active profile and its generation defaults."""
    gen = profile.generation
    return (
        f"**Profile `{profile.name}`** — {profile.title}: {gen.compose_steps} steps, guidance "
        f"{gen.compose_guidance:g}; method options from the profile where it sets them."
    )


def _rows(studio: Studio, adapter_ids: list[str] | None, current: pd.DataFrame | None) -> pd.DataFrame:
    """One row per selected adapter; rows already edited keep their phrase, weight and plain form."""
    kept = {}
    if current is not None and len(current):
        kept = {row[0]: list(row) for row in current.itertuples(index=False) if row[0]}
    rows = []
    for adapter_id in adapter_ids or []:
        if adapter_id in kept:
            rows.append(kept[adapter_id])
            continue
        record = studio.library.get(adapter_id)
        words = record.trigger.split(maxsplit=1)
        rows.append(
            [record.id, record.name, record.trigger or record.name, 1.0, words[1] if len(words) == 2 else ""]
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def parse_request(
    table: pd.DataFrame | None,
    prompt: str,
    method: str,
    options: str,
    negative: str,
    seed: float,
    steps: float,
    guidance: float,
    num_images: float,
) -> ComposeRequest:
    """The form as a ``ComposeRequest``; a bad options JSON or an empty table is a ``RequestError``."""
    try:
        parsed = json.loads(options or "{}")
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"method options are not valid JSON ({exc}); fix them or pick the method again"
        ) from None
    if not isinstance(parsed, dict):
        raise RequestError('method options must be a JSON object such as {"interval": 5}')
    rows = [] if table is None else [list(r) for r in table.itertuples(index=False) if r[0]]
    adapters = [AdapterChoice(str(r[0]), str(r[2]), float(r[3]), str(r[4] or "")) for r in rows]
    return ComposeRequest(
        adapters=adapters,
        prompt=prompt,
        method=method,
        options=parsed,
        negative=negative or "",
        seed=int(seed or 0),
        steps=int(steps or 1),
        guidance=float(guidance),
        num_images=int(num_images or 1),
    )


def build(studio: Studio) -> tuple[gr.Dropdown, gr.State]:
    """Lay out the Compose tab; returns the adapter picker and the state holding the last gallery's files."""
    from composition.methods import METHODS

    profile = studio.profile()
    last_images = gr.State([])
    with gr.Row():
        with gr.Column(scale=1):
            picked = gr.Dropdown(
                adapter_choices(studio), multiselect=True, label="Adapters", elem_id="compose-adapters"
            )
            table = gr.Dataframe(
                pd.DataFrame([], columns=TABLE_COLUMNS),
                label="Binding: phrase in the prompt, weight, plain form (CLoRA)",
                interactive=True,
                static_columns=[0, 1],
                elem_id="compose-table",
            )
            prompt = gr.Textbox(
                label="Prompt",
                placeholder="a photo of sks dog and zwx cat on a beach",
                elem_id="compose-prompt",
            )
            negative = gr.Textbox("", label="Negative prompt")
            method = gr.Dropdown(list(METHODS), value="merge", label="Method")
            gr.Markdown(profile_text(profile), elem_id="compose-profile")
            options = gr.Code(default_options("merge", profile), language="json", label="Method options")
            with gr.Row():
                seed = gr.Number(0, label="Seed", precision=0)
                steps = gr.Number(
                    profile.generation.compose_steps,
                    label="Steps",
                    elem_id="compose-steps",
                    precision=0,
                    minimum=1,
                    maximum=200,
                )
                guidance = gr.Number(profile.generation.compose_guidance, label="Guidance")
                num_images = gr.Number(
                    1, label="Images", elem_id="compose-images", precision=0, minimum=1, maximum=8
                )
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="compose-generate")
                compare = gr.Button("Compare methods", elem_id="compose-compare")
        with gr.Column(scale=1):
            gallery = gr.Gallery(label="Images", columns=3, height=420, elem_id="compose-gallery")
            info = gr.Markdown(elem_id="compose-info")
            scores = gr.Dataframe(label="Method comparison", interactive=False, visible=False)
            masks = gr.Gallery(
                format="png",
                label="CLoRA masks (white: where the adapter acts)",
                columns=4,
                height=200,
                visible=False,
            )

    def generate(
        table: pd.DataFrame | None,
        prompt: str,
        method: str,
        options: str,
        negative: str,
        seed: float,
        steps: float,
        guidance: float,
        num_images: float,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        try:
            request = parse_request(
                table, prompt, method, options, negative, seed, steps, guidance, num_images
            )
            progress(0, desc=f"{request.method}: waiting for the device")
            output = studio.compose(
                request, progress=lambda done, total: progress((done, total), desc="images")
            )
        except (RequestError, StoreError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        paths = [str(p) for p in studio.save_images(output.images, request.method)]
        captions = [
            f"seed {s} · {e} UNet evals" for s, e in zip(output.seeds, output.unet_evals, strict=True)
        ]
        text = (
            f"**{request.method}**: {len(paths)} image(s), {sum(output.unet_evals)} UNet evaluations in all."
        )
        mask_update = gr.update(value=[(m, c) for m, c in output.masks], visible=bool(output.masks))
        return list(zip(paths, captions, strict=True)), text, gr.update(visible=False), mask_update, paths

    def compare_all(
        table: pd.DataFrame | None,
        prompt: str,
        method: str,
        options: str,
        negative: str,
        seed: float,
        steps: float,
        guidance: float,
        num_images: float,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        try:
            request = parse_request(
                table, prompt, method, options, negative, seed, steps, guidance, num_images
            )
            outputs: list[ComposeOutput] = studio.compare(
                request, list(METHODS), progress=lambda done, total: progress((done, total), desc="methods")
            )
        except (RequestError, StoreError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        from composition.report import method_cost, versus_composite

        items, rows, paths = [], [], []
        costs = {o.method: method_cost(o.unet_evals, o.shallow_evals, o.wall_s) for o in outputs}
        ratios = versus_composite(costs)
        for output in outputs:
            saved = studio.save_images(output.images, output.method)
            ratio = ratios.get(output.method, {})
            for path, s, evals, shallow, wall, clip in zip(
                saved, output.seeds, output.unet_evals, output.shallow_evals, output.wall_s, output.clip_scores,
                strict=True,
            ):  # fmt: skip
                items.append(
                    (
                        str(path),
                        f"{output.method} · seed {s} · CLIP {clip:.1f} · {evals} full + {shallow} shallow rows",
                    )
                )
                rows.append([
                    output.method, s, round(clip, 2), evals, shallow, round(wall, 2),
                    round(ratio.get("full_rows", float("nan")), 2), round(ratio.get("wall_s", float("nan")), 2),
                ])  # fmt: skip
                paths.append(str(path))
        columns = ["method", "seed", "CLIPScore (0-100)", "full UNet rows", "shallow rows", "CPU s",
                   "rows vs composite", "CPU s vs composite"]  # fmt: skip
        frame = pd.DataFrame(rows, columns=columns)
        text = f"Compared {len(outputs)} methods on seeds {outputs[0].seeds if outputs else []}."
        mask_update = gr.update(
            value=[m for o in outputs for m in o.masks], visible=any(o.masks for o in outputs)
        )
        return items, text, gr.update(value=frame, visible=True), mask_update, paths

    form = [table, prompt, method, options, negative, seed, steps, guidance, num_images]
    outputs = [gallery, info, scores, masks, last_images]
    picked.change(
        lambda ids, current: _rows(studio, ids, current), [picked, table], table, api_visibility="private"
    )
    method.change(lambda m: default_options(m, profile), method, options, api_visibility="private")
    run.click(generate, form, outputs, api_name="compose", concurrency_id=GENERATION, concurrency_limit=1)
    compare.click(
        compare_all, form, outputs, api_name="compare_methods", concurrency_id=GENERATION, concurrency_limit=1
    )
    return picked, last_images
