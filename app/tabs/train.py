"""The Train tab: subject images, trigger, adapter family and hyperparameters → a queued training job,
followed live (progress bar with step/ETA, loss plot with a smoothed curve, validation grids newest first,
log tail), cancelled or resumed. Advice on words and image counts, and the trigger field's prefill, come from
the base model's profile (``app.guidance``) and follow the base-model box (a trigger the user typed is kept); a
second click on Start training (or the same job started again while it runs) is refused, not queued twice.

The hyperparameter inputs are generated from each family's config dataclass (``models.adapters.FAMILIES``),
so a new family appears here without UI code: the first two fields are shown, the rest sit in an accordion.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd

from app import job_display
from app.base_models import BaseModelRefused
from app.feedback import refuse
from app.guidance import Guidance, guidance_for, image_count_advice, trigger_after_change, upload_prompt
from app.jobs import JobError, JobView
from app.studio import DuplicateJobError, RequestError, Studio, TrainRequest

MAIN_FIELDS = 2
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def family_fields() -> dict[str, list[dataclasses.Field]]:
    """Each family's scalar hyperparameter fields (dict-valued per-layer patterns are CLI-only)."""
    from models.adapters import FAMILIES

    return {
        name: [f for f in dataclasses.fields(family.config_cls) if str(f.type) in _SCALARS]
        for name, family in FAMILIES.items()
    }


def _input_for(field: dataclasses.Field, default: Any) -> gr.components.Component:
    kind = _SCALARS[str(field.type)]
    help_text = field.metadata.get("help", "")
    if kind is bool:
        return gr.Checkbox(value=default, label=field.name, info=help_text)
    if kind is str:
        return gr.Textbox(value=default, label=field.name, info=help_text)
    return gr.Number(value=default, label=field.name, info=help_text, precision=0 if kind is int else None)


PROFILE_FIELDS = ("max_train_steps", "learning_rate", "targets", "num_class_images")
"""The Train tab's fields filled from the base model's profile (`models.profiles`)."""


def profile_defaults(studio: Studio, base_model: str | None, family: str) -> dict[str, Any]:
    """What the Train tab shows for this base model and family: the profile's text, its values of
    `PROFILE_FIELDS` (None where the profile is known only once the job loads the model) and the advice on
    words and images (`guidance`, from the profile's hints: `app.guidance.guidance_for`)."""
    profile = studio.profile(base_model)
    guidance = guidance_for(profile)
    if profile is None:
        text = "**Profile**: picked when the job loads this model (a hub id or single file)."
        return {"text": text, "guidance": guidance, **dict.fromkeys(PROFILE_FIELDS)}
    defaults = profile.family(family)
    hints = profile.hints
    text = (
        f"**Profile `{profile.name}`** — {profile.title}. Subject images: {hints.subject_images}. "
        f"Time: {hints.seconds_per_step}. Advice on the words is under their boxes."
    )
    return {"text": text, "guidance": guidance, **{name: getattr(defaults, name) for name in PROFILE_FIELDS}}


def job_choices(studio: Studio) -> list[tuple[str, str]]:
    return job_display.job_choices(studio.store)


def current_job(studio: Studio) -> dict:
    """The job dropdown on page load: fresh entries, and the running (or next queued) job selected."""
    return gr.update(choices=job_choices(studio), value=job_display.active_job_id(studio.store))


def render(view: JobView) -> tuple[str, str, pd.DataFrame, list[tuple[str, str]], str, dict, dict]:
    """Progress line, status text, loss curves, validation gallery, log tail and the Cancel/Resume states."""
    job = view.job
    progress_line = f"Step {job.step}/{job.total}" if job.total else ""
    lines = [f"**{job.name}** — `{job.id}` — **{job.status}**"]
    if view.position is not None:
        lines.append(f"Queued: position {view.position} (one training job runs at a time).")
    if job.total:
        lines.append(
            f"Step {job.step}/{job.total}" + (f", loss {job.loss:.4f}" if job.loss is not None else "")
        )
    if view.note:
        lines.append(view.note)
    if view.eta is not None:
        lines.append(f"ETA {view.eta:.0f} s")
    if job.error:
        lines.append(f"⚠ {job.error}")
    if view.resumable:
        lines.append("This job can be resumed from its latest checkpoint.")
    if job.adapter_id:
        lines.append(f"Adapter `{job.adapter_id}` is in the Library.")
    return (
        progress_line,
        "\n\n".join(lines),
        # None until there is a loss: a plot first given an empty frame draws no lines after (Gradio 6.31)
        job_display.loss_frame(view.losses) if view.losses else None,
        job_display.gallery_for(view),
        "\n".join(view.log_tail),
        *job_display.button_states(job),
    )


def build(studio: Studio) -> gr.Dropdown:
    """Lay out the Train tab inside the current Blocks; returns the job selector (refreshed on tab select)."""
    from models.adapters import FAMILIES, PRESETS

    fields = family_fields()
    defaults = {name: family.default_config() for name, family in FAMILIES.items()}
    initial = profile_defaults(studio, None, "lora")
    hyper_inputs: list[tuple[str, str, gr.components.Component]] = []
    groups: dict[str, gr.Group] = {}
    watching: dict[str, str] = {}
    guidance = initial["guidance"]

    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(
                label="Subject images (JPEG, PNG or WebP)",
                file_count="multiple",
                file_types=["image"],
                elem_id="train-files",
            )
            upload_report = gr.Markdown(upload_prompt(guidance), elem_id="upload-report")
            profile_text = gr.Markdown(initial["text"], elem_id="train-profile")
            thumbs = gr.Gallery(label="Accepted images", columns=6, height=140, interactive=False)
            with gr.Row():
                trigger = gr.Textbox(
                    guidance.default_trigger,
                    label="Trigger word",
                    info=guidance.trigger,
                    placeholder=guidance.trigger_placeholder,
                    elem_id="train-trigger",
                )
                # the prefill the field was last given, per session: a value still equal to it is replaced
                # when the base model changes, anything else the user typed is kept
                prefilled = gr.State(guidance.default_trigger)
                class_word = gr.Textbox(
                    "",
                    label="Class word",
                    elem_id="train-class-word",
                    placeholder=guidance.class_placeholder,
                    info=guidance.class_word,
                )
            family = gr.Radio(list(FAMILIES), value="lora", label="Adapter family")
            for name, family_spec in FAMILIES.items():
                with gr.Group(visible=name == "lora") as groups[name]:
                    gr.Markdown(f"**{family_spec.title}** — {family_spec.paper}")
                    for field in fields[name][:MAIN_FIELDS]:
                        hyper_inputs.append(
                            (name, field.name, _input_for(field, getattr(defaults[name], field.name)))
                        )
                    with gr.Accordion(f"Advanced {family_spec.title} options", open=False):
                        for field in fields[name][MAIN_FIELDS:]:
                            hyper_inputs.append(
                                (name, field.name, _input_for(field, getattr(defaults[name], field.name)))
                            )
            with gr.Row():
                targets = gr.Dropdown(
                    list(PRESETS),
                    value=initial["targets"] or "vo",
                    label="Targets (the profile's for the family)",
                    allow_custom_value=True,
                )
                steps = gr.Number(
                    initial["max_train_steps"] or 0,
                    label="Steps (the profile's for the family; 0: decided when the model loads)",
                    elem_id="train-steps",
                    precision=0,
                    minimum=1,
                    maximum=100000,
                )
            prior = gr.Checkbox(False, label="Prior preservation (needs a class word)")
            base_model = gr.Textbox(
                "",
                label="Base model",
                placeholder=studio.base_models.hint(),
            )
            with gr.Accordion("Advanced training options", open=False):
                learning_rate = gr.Number(
                    initial["learning_rate"] or 0,
                    label="Learning rate (the profile's for the family; 0: decided when the model loads)",
                    minimum=0,
                )
                seed = gr.Number(0, label="Seed", precision=0)
                validation_steps = gr.Number(
                    50,
                    label="Validation grid every N steps",
                    elem_id="train-validation-steps",
                    precision=0,
                    minimum=0,
                )
                validation_images = gr.Number(
                    2,
                    label="Images per validation grid",
                    elem_id="train-validation-images",
                    precision=0,
                    minimum=1,
                )
                validation_inference_steps = gr.Number(
                    25,
                    label="Denoising steps of validation images",
                    elem_id="train-validation-denoise",
                    precision=0,
                    minimum=1,
                )
                num_class_images = gr.Number(
                    initial["num_class_images"] or 0,
                    label="Class images for prior preservation (0: the profile's)",
                    precision=0,
                    minimum=0,
                )
                name = gr.Textbox("", label="Job name (default: trigger and class word)")
            start = gr.Button("Start training", variant="primary", elem_id="start-training")
        with gr.Column(scale=1):
            with gr.Row():
                job = gr.Dropdown(job_choices(studio), label="Job", value=None, elem_id="job-select", scale=4)
                refresh = gr.Button("↻", scale=0, min_width=40)
            progress_line = gr.Markdown(elem_id="job-progress", min_height=40)
            status = gr.Markdown("Start a job, or pick one to watch.", elem_id="job-status")
            with gr.Row():
                cancel = gr.Button("Cancel", variant="secondary", interactive=False, elem_id="cancel-job")
                resume = gr.Button("Resume", interactive=False, elem_id="resume-job")
            loss_plot = gr.LinePlot(
                x="step",
                y="loss",
                color="series",
                color_map=job_display.LOSS_COLORS,
                title="Training loss (faint: per step; dark: smoothed)",
                height=260,
                elem_id="loss-plot",
            )
            validation = gr.Gallery(
                label="Validation images (newest first)",
                columns=2,
                height=300,
                object_fit="contain",
                elem_id="validation-gallery",
            )
            log = gr.Textbox(label="Log tail", lines=8, max_lines=8, autoscroll=True)

    def guidance_of(base: str | None) -> Guidance:
        try:
            return guidance_for(studio.profile(studio.base_models.resolve(base)))
        except (BaseModelRefused, RequestError):
            return guidance  # start_training refuses that base model itself, in one line

    def check(paths: list[str] | None, base: str | None = None) -> tuple[str, list[str]]:
        result = studio.check_uploads(paths)
        lines = [f"- {m}" for m in result.messages]
        advice = image_count_advice(len(result.accepted), guidance_of(base)) if paths else None
        if advice:
            lines.append(f"\n**{advice}**")
        return "\n".join(lines), [str(p) for p in result.accepted]

    def fill_from_profile(
        base: str, choice: str, typed: str | None, prefilled_before: str | None, paths: list[str] | None
    ) -> list[Any]:
        try:
            found = profile_defaults(studio, studio.base_models.resolve(base), choice)
        except (BaseModelRefused, RequestError) as exc:
            return refuse(str(exc), len(profile_outputs))
        advice: Guidance = found["guidance"]
        new_trigger = trigger_after_change(typed, prefilled_before, advice)
        kept = {} if new_trigger is None else {"value": new_trigger}
        return [
            found["text"],
            gr.update(info=advice.trigger, placeholder=advice.trigger_placeholder, **kept),
            gr.update(info=advice.class_word, placeholder=advice.class_placeholder),
            gr.update(value=found["max_train_steps"] or 0),
            gr.update(value=found["learning_rate"] or 0),
            gr.update(value=found["targets"] or "vo"),
            gr.update(value=found["num_class_images"] or 0),
            advice.default_trigger,
            check(paths, base)[0] if paths else upload_prompt(advice),
        ]

    def pick_family(
        choice: str, base: str, typed: str | None, prefilled_before: str | None, paths: list[str] | None
    ) -> list[Any]:
        shown = [gr.update(visible=n == choice) for n in groups]
        return [*shown, *fill_from_profile(base, choice, typed, prefilled_before, paths)]

    def start_job(
        paths: list[str] | None,
        trig: str,
        cls: str,
        fam: str,
        tgt: str,
        n: float,
        use_prior: bool,
        base: str,
        lr: float | None,
        sd: float,
        val: float,
        n_val_images: float,
        val_steps: float,
        n_class: float,
        job_name: str,
        *hyper: Any,
    ) -> tuple[Any, str]:
        hyperparameters = {
            fname: value
            for (fam_name, fname, _), value in zip(hyper_inputs, hyper, strict=True)
            if fam_name == fam
        }
        request = TrainRequest(
            trigger=trig,
            class_word=cls,
            family=fam,
            hyperparameters=hyperparameters,
            targets=tgt,
            steps=int(n or 0),
            prior_preservation=use_prior,
            num_class_images=int(n_class or 0) or None,
            base_model=base or None,
            learning_rate=lr or None,
            seed=int(sd or 0),
            validation_steps=int(val or 0),
            num_validation_images=int(n_val_images or 1),
            validation_inference_steps=int(val_steps or 1),
            name=job_name,
        )
        try:
            record = studio.start_training(paths, request)
        except DuplicateJobError as exc:
            gr.Warning(str(exc))
            return gr.update(choices=job_choices(studio), value=exc.job.id), gr.skip()
        except RequestError as exc:
            return refuse(str(exc), 2)
        advice = image_count_advice(len(paths or []), guidance_of(base))
        if advice:
            gr.Warning(advice)
        return gr.update(choices=job_choices(studio), value=record.id), f"Queued job `{record.id}`."

    def follow(
        job_id: str | None, request: gr.Request, progress: gr.Progress = gr.Progress()
    ) -> Iterator[tuple]:
        if not job_id:  # yield, not just return: a generator that yields nothing blanks every output
            yield tuple(gr.skip() for _ in view_outputs)  # (the Cancel/Resume labels, the loss plot)
            return
        session = request.session_hash or "anonymous"
        watching[session] = job_id
        while watching.get(session) == job_id:
            try:
                view = studio.job_view(job_id)
            except JobError as exc:
                yield refuse(str(exc), len(view_outputs))
                return
            shown = view.job
            if view.position is not None:
                progress(0, desc=f"queued, position {view.position}")
            elif shown.total:
                eta = f", ETA {view.eta:.0f} s" if view.eta is not None else ""
                progress(
                    (shown.step, shown.total), desc=f"step {shown.step}/{shown.total}{eta}", unit="steps"
                )
            yield render(view)
            if shown.status not in ("queued", "running", "cancelling"):
                return
            time.sleep(0.5)

    def act(action: str, job_id: str | None) -> tuple[Any, ...]:
        if not job_id:
            return refuse("Pick a job first.", 4)
        try:
            record = studio.runner.cancel(job_id) if action == "cancel" else studio.runner.resume(job_id)
        except JobError as exc:
            return refuse(str(exc), 4)
        return (
            gr.update(choices=job_choices(studio)),
            f"Job `{record.id}` is {record.status}.",
            *job_display.button_states(record),
        )

    view_outputs = [progress_line, status, loss_plot, validation, log, cancel, resume]
    files.change(check, [files, base_model], [upload_report, thumbs], api_name="check_uploads")
    profile_outputs = [
        profile_text,
        trigger,
        class_word,
        steps,
        learning_rate,
        targets,
        num_class_images,
        prefilled,
        upload_report,
    ]
    family.change(
        pick_family,
        [family, base_model, trigger, prefilled, files],
        [*groups.values(), *profile_outputs],
        api_visibility="private",
    )
    base_model.blur(
        fill_from_profile,
        [base_model, family, trigger, prefilled, files],
        profile_outputs,
        api_name="profile_defaults",
    )
    start.click(
        lambda: gr.update(interactive=False), None, start, queue=False, api_visibility="private"
    ).then(
        start_job,
        [
            files,
            trigger,
            class_word,
            family,
            targets,
            steps,
            prior,
            base_model,
            learning_rate,
            seed,
            validation_steps,
            validation_images,
            validation_inference_steps,
            num_class_images,
            name,
            *(c for _, _, c in hyper_inputs),
        ],
        [job, status],
        api_name="start_training",
    ).then(lambda: gr.update(interactive=True), None, start, queue=False, api_visibility="private")
    job.change(
        follow,
        job,
        view_outputs,
        api_name="follow_job",
        trigger_mode="multiple",
        concurrency_limit=None,
        show_progress_on=progress_line,
    ).then(lambda: gr.update(choices=job_choices(studio)), None, job, api_visibility="private")
    cancel.click(
        lambda j: act("cancel", j),
        job,
        [job, status, cancel, resume],
        api_name="cancel_job",
        concurrency_limit=None,
    )
    resume.click(
        lambda j: act("resume", j),
        job,
        [job, status, cancel, resume],
        api_name="resume_job",
        concurrency_limit=None,
    ).then(
        follow,
        job,
        view_outputs,
        concurrency_limit=None,
        api_visibility="private",
        show_progress_on=progress_line,
    )
    refresh.click(lambda: gr.update(choices=job_choices(studio)), None, job, api_visibility="private")
    return job
