"""The app's services behind the UI: upload checks, training requests, composition and scoring.

No model math here and no Gradio either: ``Studio`` turns what a person typed into calls of
``training`` (through the job runner), ``composition.methods.generate`` and ``evaluation.score``, so the UI
callbacks stay thin and everything can be tested without a browser. Generation runs in the app process on
one cached base pipeline; ``device_lock`` makes requests take turns, because an ``AdapterBank`` swaps
weights inside that pipeline.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from app.base_models import BaseModelRefused, BaseModels
from app.jobs import JobRunner, JobView
from app.library import Library
from app.public import PublicFiles
from app.store import JobRecord, Store
from models.atomic_write import atomic_write

MAX_UPLOAD_MB = 20
MAX_IMAGES = 64
Progress = Callable[..., None]


class RequestError(ValueError):
    """A request from the UI is incomplete or contradictory; the message says what to fix."""


class DuplicateJobError(RequestError):
    """The same training job (settings and images) is already queued or running: ``job`` is that one."""

    def __init__(self, job: JobRecord) -> None:
        super().__init__(
            f"The same job is already {job.status} as `{job.id}` ({job.name}); nothing new was started. "
            "Change a setting or the images to train another one."
        )
        self.job = job


@dataclass
class Settings:
    """What ``python -m app`` was started with."""

    data_dir: Path
    base_model: str | None = None
    """Base model spec for generation and the default for training (None: the toy world)."""
    clip_model: str | None = None
    """CLIP for scores (None: the toy world's CLIP)."""
    models_dir: Path | None = None
    """A folder whose models (diffusers folders, single files) the Train tab also offers (``app.base_models``)."""
    device: str | None = None
    max_upload_mb: int = MAX_UPLOAD_MB
    max_images: int = MAX_IMAGES
    eval_root: Path | None = None
    """Folder under which the Evaluate tab may read server-side image folders (None: that input is off)."""


@dataclass
class UploadCheck:
    """The images that passed and one message per file (accepted or why not)."""

    accepted: list[Path]
    messages: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.accepted) and len(self.accepted) == len(self.messages)


@dataclass
class TrainRequest:
    """The Train tab's form."""

    trigger: str
    class_word: str = ""
    family: str = "lora"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    targets: str | None = None
    """Target preset or patterns; None: the base-model profile's for the family (`models.profiles`)."""
    steps: int | None = None
    """Optimiser steps; None or 0: the base-model profile's for the family."""
    prior_preservation: bool = False
    num_class_images: int | None = None
    base_model: str | None = None
    learning_rate: float | None = None
    seed: int = 0
    validation_steps: int = 50
    num_validation_images: int = 2
    validation_inference_steps: int = 25
    name: str = ""

    def to_config(self, default_base_model: str | None, profile: Any = None) -> Any:
        """The request as a `TrainConfig`; what the form leaves unset the run takes from the base model's
        profile (`profile`, when already known, only sizes the checkpoint interval)."""
        from training.config import TrainConfig

        trigger, class_word = self.trigger.strip(), self.class_word.strip()
        if not trigger:
            wanted = profile.hints.trigger_placeholder if profile is not None else ""
            raise RequestError(f"the trigger phrase is empty; type {wanted or 'a rare word such as sks'}")
        phrase = f"{trigger} {class_word}".strip()
        steps = int(self.steps or 0)
        planned = steps or (profile.family(self.family).max_train_steps if profile is not None else 2000)
        return TrainConfig(
            pretrained_model_name_or_path=(self.base_model or "").strip() or default_base_model,
            instance_data_dir="uploaded images",
            instance_prompt=f"a photo of {phrase}",
            trigger_phrase=phrase,
            with_prior_preservation=self.prior_preservation,
            class_prompt=f"a photo of a {class_word}" if class_word else None,
            num_class_images=self.num_class_images,
            adapter=self.family,
            targets=self.targets,
            adapter_config=dict(self.hyperparameters),
            max_train_steps=steps or None,
            learning_rate=self.learning_rate or None,
            seed=int(self.seed),
            validation_steps=int(self.validation_steps),
            num_validation_images=int(self.num_validation_images),
            num_inference_steps=int(self.validation_inference_steps),
            checkpointing_steps=max(1, min(500, planned // 4)),
        )


@dataclass
class AdapterChoice:
    """One row of the Compose tab's adapter table."""

    adapter_id: str
    phrase: str
    weight: float = 1.0
    plain: str = ""


@dataclass
class ComposeRequest:
    """The Compose tab's form."""

    adapters: list[AdapterChoice]
    prompt: str
    method: str = "merge"
    options: dict[str, Any] = field(default_factory=dict)
    negative: str = ""
    seed: int = 0
    steps: int | None = None
    """Denoising steps; None: the base model's profile's."""
    guidance: float | None = None
    """Guidance scale; None: the base model's profile's."""
    num_images: int = 1


@dataclass
class ComposeOutput:
    """Images (one per seed), the UNet evaluations each cost, and the region masks when the method has some
    (CLoRA; CMLoRA with regions)."""

    method: str
    images: list[Image.Image]
    seeds: list[int]
    unet_evals: list[int]
    masks: list[tuple[Image.Image, str]] = field(default_factory=list)
    shallow_evals: list[int] = field(default_factory=list)
    """Cached (shallow) UNet rows per image, beside the full rows of `unet_evals` (cmlora)."""
    wall_s: list[float] = field(default_factory=list)
    clip_scores: list[float] = field(default_factory=list)


class Studio:
    """Store, library, job runner and the generation pipeline of one running app."""

    def __init__(
        self, settings: Settings, *, worker_command: Sequence[str] | None = None, start: bool = True
    ) -> None:
        self.settings = settings
        self.store = Store(settings.data_dir)
        self.public = PublicFiles(settings.data_dir)
        self.base_models = BaseModels(settings.base_model, settings.models_dir)
        self.library = Library(self.store)
        self.runner = JobRunner(
            self.store, self.library.register_trained, worker_command=worker_command, start=start
        )
        self.device_lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._pipe: Any = None
        self._bank: tuple[tuple[str, ...], Any] | None = None

    def close(self) -> None:
        self.runner.close()
        self.store.close()

    # --- training -----------------------------------------------------------------------------------
    def check_uploads(self, files: Sequence[str | Path] | None) -> UploadCheck:
        """Check each uploaded file by content (format, corruption, pixel count) and by size."""
        from training.data import ImageDataError, open_rgb

        paths = [Path(f) for f in files or []]
        if not paths:
            return UploadCheck(
                [], ["No images uploaded: add a few photos of your subject (JPEG, PNG or WebP)."]
            )
        if len(paths) > self.settings.max_images:
            return UploadCheck(
                [],
                [
                    f"{len(paths)} files is more than the {self.settings.max_images} allowed; pick the best few."
                ],
            )
        accepted, messages = [], []
        limit = self.settings.max_upload_mb * 1024 * 1024
        for path in paths:
            size = path.stat().st_size if path.is_file() else 0
            if size > limit:
                messages.append(
                    f"✗ {path.name}: {size / 2**20:.1f} MB is over the {self.settings.max_upload_mb} MB limit"
                )
                continue
            try:
                with open_rgb(path, min_side=1) as image:
                    messages.append(f"✓ {path.name}: {image.width}x{image.height}")
            except ImageDataError as exc:
                messages.append(f"✗ {path.name}: {str(exc).removeprefix(str(path) + ': ')}")
                continue
            accepted.append(path)
        return UploadCheck(accepted, messages)

    def start_training(self, files: Sequence[str | Path] | None, request: TrainRequest) -> JobRecord:
        """Queue a training job; every upload must pass ``check_uploads`` and the base model must be one the server
        offers (``app.base_models``); nothing is stored otherwise. A job identical to one already queued or
        running is refused with ``DuplicateJobError``."""
        from training.config import ConfigError

        check = self.check_uploads(files)
        if not check.ok:
            rejected = [m for m in check.messages if not m.startswith("✓")]
            raise RequestError("Nothing was started. " + " ".join(rejected))
        try:
            base_model = self.base_models.resolve(request.base_model)
        except BaseModelRefused as exc:
            raise RequestError(f"Nothing was started. {exc}") from None
        try:
            config = dataclasses.replace(request, base_model=base_model).to_config(
                self.settings.base_model, self.profile(base_model)
            )
            with self._submit_lock:
                duplicate = self.runner.active_duplicate(config, check.accepted)
                if duplicate is not None:
                    raise DuplicateJobError(duplicate)
                return self.runner.submit(
                    config, name=request.name.strip() or config.trigger_phrase, images=check.accepted
                )
        except ConfigError as exc:
            raise RequestError(str(exc)) from exc

    def job_view(self, job_id: str) -> JobView:
        """What the Train tab shows about a job, its validation images published (``app.public``)."""
        view = self.runner.view(job_id)
        return dataclasses.replace(
            view, validation_images=[self.public.publish(path) for path in view.validation_images]
        )

    # --- base-model profiles ------------------------------------------------------------------------
    def profile(self, base_model: str | None = None) -> Any:
        """The profile (`models.profiles`) of `base_model` (default: the app's), or None when only loading
        that model can tell (a hub id or single file other than the app's own model, which is loaded)."""
        from models.pipelines import default_base_model
        from models.profiles import profile_for_pipeline, profile_for_spec

        spec = (base_model or "").strip() or self.settings.base_model
        found = profile_for_spec(spec if spec else default_base_model())
        if found is None and spec == self.settings.base_model:
            found = profile_for_pipeline(self.pipeline())
        return found

    # --- generation ---------------------------------------------------------------------------------
    def pipeline(self) -> Any:
        """The base pipeline for generation, loaded once (a ``RequestError`` says what is wrong)."""
        if self._pipe is None:
            from models.pipelines import ModelLoadError, load_pipeline

            try:
                self._pipe = load_pipeline(self.settings.base_model, device=self.settings.device)
            except ModelLoadError as exc:
                raise RequestError(str(exc)) from None
        return self._pipe

    def _bank_for(self, adapter_ids: tuple[str, ...]) -> Any:
        """The adapter bank for these adapters; the previous bank is closed (one bank held at a time)."""
        from composition.bank import AdapterBank

        if self._bank is not None and self._bank[0] == adapter_ids:
            return self._bank[1]
        if self._bank is not None:
            self._bank[1].close()
            self._bank = None
        records = [self.library.get(adapter_id) for adapter_id in adapter_ids]
        bank = AdapterBank(
            self.pipeline(), [self.library.path(r) for r in records], names=[r.name for r in records]
        )
        self._bank = (adapter_ids, bank)
        return bank

    def compose(self, request: ComposeRequest, progress: Progress | None = None) -> ComposeOutput:
        """Generate ``num_images`` images (seeds ``seed``, ``seed+1``, ...) with one composition method."""
        from composition.methods import generate
        from composition.prompt import ConceptPrompt

        if not request.adapters:
            raise RequestError("pick at least one adapter from the library")
        if not 1 <= request.num_images <= 8:
            raise RequestError(f"number of images must be 1-8 (got {request.num_images})")
        prompt = ConceptPrompt.build(
            request.prompt,
            [a.phrase for a in request.adapters],
            [a.weight for a in request.adapters],
            [a.plain.strip() or None for a in request.adapters],
            negative=request.negative,
        )
        output = ComposeOutput(request.method, [], [], [])
        profile = self.profile()
        steps = request.steps or profile.generation.compose_steps
        guidance = request.guidance if request.guidance is not None else profile.generation.compose_guidance
        with self.device_lock:
            pipe = self.pipeline()
            bank = self._bank_for(tuple(a.adapter_id for a in request.adapters))
            for index in range(request.num_images):
                seed = request.seed + index
                start = time.perf_counter()
                result = generate(
                    request.method,
                    pipe,
                    bank,
                    prompt,
                    steps,
                    guidance,
                    seed,
                    **request.options,
                )
                output.images.extend(result.images)
                output.seeds.append(seed)
                output.unet_evals.append(result.unet_evals)
                output.shallow_evals.append(result.extras.get("shallow_evals", 0))
                output.wall_s.append(time.perf_counter() - start)
                output.masks.extend(_mask_images(result.extras, seed))
                if progress is not None:
                    progress(index + 1, request.num_images)
        return output

    def compare(
        self, request: ComposeRequest, methods: Sequence[str], progress: Progress | None = None
    ) -> list[ComposeOutput]:
        """The same seeds with every method (the base-model profile's options), each image scored by CLIPScore
        against the prompt."""
        outputs = []
        profile = self.profile()
        for index, method in enumerate(methods):
            options = profile.method_options(method)
            output = self.compose(dataclasses.replace(request, method=method, options=options))
            output.clip_scores = self.clip_scores(output.images, request.prompt)
            outputs.append(output)
            if progress is not None:
                progress(index + 1, len(methods))
        return outputs

    def save_images(self, images: Sequence[Image.Image], tag: str) -> list[Path]:
        """Write images as PNGs under ``<data-dir>/public/outputs/<time>-<tag>/`` (each atomically); return the
        paths."""
        folder = (
            self.public.folder("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}-{tag}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(images):
            paths.append(atomic_write(folder / f"{index:02d}.png", partial(image.save, format="PNG")))
        return paths

    # --- evaluation ---------------------------------------------------------------------------------
    def clip_scores(self, images: Sequence[Image.Image], prompt: str) -> list[float]:
        """CLIPScore (0-100 scale) of each image against one prompt."""
        from evaluation import score

        scores = score(
            list(images), prompts=prompt, model=self.settings.clip_model, device=self.settings.device
        )
        return [float(v) for v in scores.clipscore_100]

    def evaluate(
        self,
        images: Sequence[str | Path | Image.Image],
        prompts: Sequence[str] | None,
        references: Sequence[str | Path] | None,
    ) -> Any:
        """``evaluation.score`` of images against prompts (one, or one per image) and/or reference images."""
        from evaluation import score

        if not images:
            raise RequestError("no images to score: upload some or generate a gallery first")
        prompts = [p for p in (prompts or []) if p.strip()]
        if not prompts and not references:
            raise RequestError(
                "give a prompt (one for all images, or one per line per image) or reference images"
            )
        prompt_arg: Sequence[str] | str | None = None
        if prompts:
            prompt_arg = prompts[0] if len(prompts) == 1 else prompts
        return score(
            list(images),
            prompts=prompt_arg,
            references=list(references) if references else None,
            model=self.settings.clip_model,
            device=self.settings.device,
        )


def _mask_images(extras: dict[str, Any], seed: int) -> list[tuple[Image.Image, str]]:
    """The final region masks (CLoRA's per branch, CMLoRA's per adapter) as greyscale images with captions;
    empty for methods without masks."""
    masks = extras.get("masks")
    if masks is None:
        return []
    names = extras.get("mask_names") or [str(i) for i in range(len(masks))]
    shown = []
    for mask, name in zip(masks, names, strict=False):
        array = (mask.float().clamp(0, 1) * 255).byte().numpy()  # (H, W) in latent pixels
        image = Image.fromarray(array, mode="L").resize(
            (array.shape[1] * 8, array.shape[0] * 8), Image.Resampling.NEAREST
        )
        shown.append((image, f"seed {seed}: {name}"))
    return shown
