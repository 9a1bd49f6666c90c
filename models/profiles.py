"""Base-model profiles: every default that depends on which base model is loaded, one record per model kind.

A profile holds, for one kind of base model (the shipped toy world, Stable Diffusion 1.x, 2.x, SDXL), the
training defaults of each adapter family (learning rate, steps, batch, resolution, prior preservation, noise
offset, min-SNR, EMA, targets), the GPU options, the generation and composition defaults (steps, guidance,
size, each method's options) and the app's advice (images, trigger and class words, time per step).

The profile is picked from the loaded model (`pick_profile`: architecture, prediction type, native size, and
whether it is the toy world) or named (`get_profile`). Explicit options always win over it; the training,
composition and app code fill only what the user left unset. Every Stable Diffusion value names its source
(paper, reference script or README, with the figure taken); the toy world's cite `docs/training_quality.md`
and the composition report's measurements, so nothing tuned on the toy world reaches a Stable Diffusion run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER_FILE = "atelier_profile.json"
"""A file beside `model_index.json` naming the profile of a pipeline folder (the toy world writes one)."""


@dataclass(frozen=True)
class FamilyDefaults:
    """Training defaults of one adapter family on one kind of base model."""

    learning_rate: float
    max_train_steps: int
    source: str
    """Where the values come from: paper, script or measurement, with the figures taken."""
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    targets: str = "vo"
    snr_gamma: float | None = None
    """Min-SNR loss weighting γ (Hang et al., 2023); None = off."""
    noise_offset: float = 0.0
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    use_ema: bool = False


@dataclass(frozen=True)
class GpuDefaults:
    """Options that only matter on a CUDA GPU (on a CPU a run is fp32 with none of them)."""

    mixed_precision: str
    gradient_checkpointing: bool
    enable_xformers_memory_efficient_attention: bool
    use_8bit_adam: bool
    """Only where bitsandbytes is installed; the trainer falls back to torch AdamW otherwise."""
    source: str


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults: validation/class images during training, and composition."""

    validation_steps: int
    """Denoising steps of validation grids and generated class images."""
    validation_guidance: float
    compose_steps: int
    compose_guidance: float
    method_options: dict[str, dict[str, Any]]
    """Per composition method, the options this base model runs with unless the user gives others."""
    source: str


@dataclass(frozen=True)
class AppHints:
    """What the app tells a person training on this base model."""

    subject_images: str
    trigger_word: str
    class_word: str
    seconds_per_step: str
    min_images: int
    """Fewer accepted subject images than this get a warning in the Train tab (the run still starts)."""
    class_example: str
    """The class-word box's placeholder: a class word this base model knows."""
    default_trigger: str = ""
    """What the Train tab's trigger box is prefilled with ("": left empty, `trigger_placeholder` shown)."""
    trigger_placeholder: str = ""
    """The trigger box's placeholder, seen while it is empty."""


@dataclass(frozen=True)
class Profile:
    """Every base-model-dependent default of one kind of base model."""

    name: str
    title: str
    resolution: int | None
    """Training size in pixels; None = the model's native size (UNet sample size × VAE factor: 512 for SD 1.x
    and 2.x-base, 768 for SD 2.x v-prediction, 1024 for SDXL, 32 for the toy world), which is what every SD
    source below trains at (diffusers' and PEFT's scripts --resolution 512, README_sdxl.md 1024)."""
    families: dict[str, FamilyDefaults]
    gpu: GpuDefaults
    generation: GenerationDefaults
    hints: AppHints
    fallback_family: str = "lora"
    """Whose defaults a family without an entry of its own gets (a newly registered family)."""
    note: str = ""

    def family(self, name: str) -> FamilyDefaults:
        """The defaults of adapter family `name` (the fallback family's for a family not listed)."""
        return self.families.get(name, self.families[self.fallback_family])

    def method_options(self, method: str) -> dict[str, Any]:
        """The composition options this profile sets for `method` (empty: the method's own defaults)."""
        return dict(self.generation.method_options.get(method, {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the toy world ------------------------------------------------------------------------------------------
_TOY_SOURCE = "docs/training_quality.md"
TOYWORLD = Profile(
    name="toyworld",
    title="Atelier toy world (32 px, CPU)",
    resolution=None,
    families={
        "lora": FamilyDefaults(5e-3, 800, f"{_TOY_SOURCE}: 5e-3 x 800, 93% / +2.3 over seeds 0-2"),
        "krona": FamilyDefaults(5e-3, 1200, f"{_TOY_SOURCE}: 5e-3 x 1200, 98% / +4.6 over seeds 0-2"),
        "boft": FamilyDefaults(
            5e-3,
            1400,
            f"{_TOY_SOURCE}: 5e-3 x 1400 with min-SNR 5, 91.1% / +4.2 over nine seeds",
            snr_gamma=5.0,
        ),
        "hra": FamilyDefaults(
            1e-2,
            800,
            f"{_TOY_SOURCE}: 1e-2 x 800, offset noise 0.075, prior-loss weight 1.5, 91.9% / +4.8 over nine seeds",
            noise_offset=0.075,
            prior_loss_weight=1.5,
        ),
    },
    gpu=GpuDefaults("no", False, False, False, "the toy world is measured in fp32 on a CPU"),
    generation=GenerationDefaults(
        validation_steps=25,
        validation_guidance=7.5,
        compose_steps=25,
        compose_guidance=5.0,
        method_options={"clora": {"preset": "partition"}},
        source="composition/quality.py and docs/: 25 steps, guidance 5; clora `partition` 93.8% both concepts "
        "present on seeds 0-31, against 37.5% for `paper` with its latent updates (seeds 0-7) and colour noise "
        "from the old default (`sharpened`, seed 0), docs/composition_baselines.md; cmlora and switch keep their "
        "own toy-world-measured defaults (cmlora.py, switch.py)",
    ),
    hints=AppHints(
        subject_images="5 renders of the held-out concept (training.quality uses five)",
        trigger_word="the concept's own name (e.g. 'purple'): the toy text encoder puts 'sks' next to 'yellow' "
        "(docs/training_quality.md)",
        class_word="a shape or object word the toy world knows (circle, square, heart, ...)",
        seconds_per_step="about 0.03 s per step at batch 1 on one CPU core (docs/benchmarks.md)",
        # docs/training_quality.md: every measured run trained on five renders; fewer are untested here.
        min_images=5,
        # one of the shapes the toy world draws (class_word above; the browser test's held-out heart)
        class_example="heart",
        # no prefill: the toy world's trigger is the concept's own name, which only the user knows; 'sks' sits
        # next to 'yellow' in the toy text encoder (docs/training_quality.md, "Trigger word")
        default_trigger="",
        trigger_placeholder="the concept's own name, e.g. purple",
    ),
)

# --- Stable Diffusion ---------------------------------------------------------------------------------------
_DIFFUSERS_LORA = (
    "diffusers examples/dreambooth/README.md (train_dreambooth_lora.py): lr 1e-4, 500 steps, batch 1"
)
_DIFFUSERS_PRIOR = (
    "diffusers DreamBooth README prior preservation: --prior_loss_weight 1.0, --num_class_images 200"
)
_KRONA_SD = (
    "DiffuseKronA scripts/finetune_sd.sh (SD 2.1-base): lr 1e-3, 500 steps, batch 1 x accumulation 4, q/k/v/out "
    "(the paper quotes 5e-4..1e-3; the script's 1e-3 is taken)"
)
_BOFT_SD = (
    "PEFT examples/boft_dreambooth/train_dreambooth.sh (SD 2.1): lr 3e-5, 1010 steps, batch 4, prior weight 1.0, "
    "200 class images, q/k/v/out"
)
_HRA_SD = (
    "PEFT examples/hra_dreambooth/train_dreambooth.sh (SD 2.1): lr 5e-3, 1010 steps, batch 1, prior weight 1.0, "
    "200 class images, q/k/v/out"
)


_SD_LORA = FamilyDefaults(
    1e-4,
    500,
    f"{_DIFFUSERS_LORA}; targets q/k/v/out as diffusers' LoRA target_modules; {_DIFFUSERS_PRIOR}",
    targets="qkvo",
    num_class_images=200,
)
SD_FAMILIES: dict[str, FamilyDefaults] = {
    "lora": _SD_LORA,
    "krona": FamilyDefaults(
        1e-3, 500, f"{_KRONA_SD}; {_DIFFUSERS_PRIOR}", gradient_accumulation_steps=4, targets="qkvo",
        num_class_images=200,
    ),
    "boft": FamilyDefaults(3e-5, 1010, _BOFT_SD, train_batch_size=4, targets="qkvo", num_class_images=200),
    "hra": FamilyDefaults(5e-3, 1010, _HRA_SD, targets="qkvo", num_class_images=200),
}  # fmt: skip
"""SD 1.x and 2.x: the same table (the BOFT, HRA and DiffuseKronA scripts ran SD 2.1, diffusers' LoRA SD 1.5)."""
SDXL_FAMILIES: dict[str, FamilyDefaults] = {
    **SD_FAMILIES,
    "lora": dataclasses.replace(
        _SD_LORA,
        gradient_accumulation_steps=4,
        source="diffusers examples/dreambooth/README_sdxl.md (train_dreambooth_lora_sdxl.py): lr 1e-4, 500 steps, "
        f"batch 1 x accumulation 4, 1024 px; {_DIFFUSERS_PRIOR}",
    ),
    "krona": dataclasses.replace(
        SD_FAMILIES["krona"],
        max_train_steps=1000,
        source="DiffuseKronA scripts/finetune_sdxl.sh: lr 1e-3, 1000 steps, batch 1 x accumulation 4, q/k/v/out; "
        + _DIFFUSERS_PRIOR,
    ),
}
"""SDXL: diffusers' and DiffuseKronA's SDXL scripts; BOFT and HRA publish no SDXL settings (SD 2.1's kept)."""


_SD_GPU = GpuDefaults(
    mixed_precision="fp16",
    gradient_checkpointing=False,
    enable_xformers_memory_efficient_attention=False,
    use_8bit_adam=False,
    source="diffusers DreamBooth README: --mixed_precision fp16; PyTorch SDPA (diffusers' default attention) instead "
    "of xformers; SD 1.x/2.x LoRA at 512 px fits without checkpointing or 8-bit Adam",
)
_SD_METHODS: dict[str, dict[str, Any]] = {
    "clora": {"preset": "paper"},
    "cmlora": {"preset": "paper"},
    "switch": {"preset": "paper"},
}
_SD_METHOD_SOURCE = (
    "CLoRA reference pipeline (gemlab-vt/clora pipeline_clora.py __call__ defaults: 512 px, 50 steps, guidance 7.5) "
    "with its own settings; Multi-LoRA Composition (maszhongming/Multi-LoRA-Composition) and "
    "CMLoRA (Yqcca/CMLoRA) example.py: 50 steps, cfg 7. On SD every method runs its `paper` preset, the reference "
    "code's algorithm (docs/composition_baselines.md): those are the settings their authors published and "
    "evaluated on SD 1.5; Atelier's variants (partition, regions, FFT ordering) are measured on the toy world "
    "only, so they are not made SD defaults until a GPU run measures them there. Where they differ "
    "(guidance 7.5 vs 7) CLoRA's and diffusers' StableDiffusionPipeline default 7.5 is taken. Validation: 25 steps, "
    "as diffusers' train_dreambooth_lora.py log_validation"
)
_SD_HINTS = AppHints(
    subject_images="3-5 photos of the subject (DreamBooth, Ruiz et al. 2023), varied backgrounds and angles",
    trigger_word="a rare token the tokenizer keeps as one piece, e.g. 'sks' or 'qwe' (DreamBooth; PEFT's examples)",
    class_word="the subject's coarse class as people say it ('dog', 'backpack', 'stuffed animal'): it anchors prior "
    "preservation ('a photo of a dog')",
    seconds_per_step="not measured on a GPU yet: run `python -m benchmarks.gpu_check` (SD 1.5 LoRA at 512 px is "
    "commonly well under a second per step on a current GPU)",
    min_images=3,  # DreamBooth (Ruiz et al. 2023) fine-tunes on 3-5 images of the subject
    class_example="dog",  # DreamBooth's and diffusers' README example class ("a photo of sks dog")
    # DreamBooth's rare-token identifier (Ruiz et al. 2023) and the diffusers DreamBooth README's
    # --instance_prompt "a photo of sks dog"
    default_trigger="sks",
    trigger_placeholder="a rare token, e.g. sks",
)

SD1 = Profile(
    name="sd1",
    title="Stable Diffusion 1.x (512 px, epsilon)",
    resolution=None,
    families=SD_FAMILIES,
    gpu=_SD_GPU,
    generation=GenerationDefaults(25, 7.5, 50, 7.5, _SD_METHODS, _SD_METHOD_SOURCE),
    hints=_SD_HINTS,
)
SD2 = Profile(
    name="sd2",
    title="Stable Diffusion 2.x (512 px epsilon, 768 px v-prediction)",
    resolution=None,
    families=SD_FAMILIES,
    gpu=_SD_GPU,
    generation=GenerationDefaults(25, 7.5, 50, 7.5, _SD_METHODS, _SD_METHOD_SOURCE),
    hints=_SD_HINTS,
    note="Resolution = the model's native size: 512 for 2.x-base (epsilon), 768 for 2.x (v-prediction). The BOFT, "
    "HRA and DiffuseKronA scripts above ran on SD 2.1 itself. v-prediction: the loss target and min-SNR weighting "
    "follow the scheduler's prediction_type; Lin et al. (2024, 'Common Diffusion Noise Schedules and Sampling Steps "
    "Are Flawed') fix zero terminal SNR by fine-tuning the whole model, which an adapter run cannot, so the base "
    "schedule is kept and offset noise stays off (their point: offset noise only patches that flaw).",
)
SDXL = Profile(
    name="sdxl",
    title="Stable Diffusion XL (1024 px)",
    resolution=None,
    families=SDXL_FAMILIES,
    gpu=GpuDefaults(
        mixed_precision="bf16",
        gradient_checkpointing=True,
        enable_xformers_memory_efficient_attention=False,
        use_8bit_adam=True,
        source="diffusers README_sdxl.md '< 16GB VRAM': gradient checkpointing and 8-bit Adam (DiffuseKronA's SDXL "
        "script uses both); the README trains fp16 only with the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix), "
        "bf16 keeps fp32's range so the stock SDXL VAE does not overflow: bf16 chosen",
    ),
    generation=GenerationDefaults(
        25,
        5.0,
        50,
        5.0,
        _SD_METHODS,
        "StableDiffusionXLPipeline defaults: 50 steps, guidance 5.0; README_sdxl.md inference 25 steps (validation); "
        "the composition methods' options as for SD 1.x (the papers ran SD 1.5; no SDXL settings published)",
    ),
    hints=dataclasses.replace(
        _SD_HINTS,
        seconds_per_step="not measured on a GPU yet: run `python -m benchmarks.gpu_check` (README_sdxl.md trains on "
        "one 40 GB A100)",
    ),
    note="BOFT and HRA have no published SDXL DreamBooth settings; their SD 2.1 scripts' values are used.",
)

PROFILES: dict[str, Profile] = {p.name: p for p in (TOYWORLD, SD1, SD2, SDXL)}


class ProfileError(ValueError):
    """An unknown profile name; the message lists the known ones."""


def get_profile(name: str) -> Profile:
    """The profile called `name` (`ProfileError` naming the known ones otherwise)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}") from None


# --- picking a profile from a model -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelTraits:
    """What decides a model's profile."""

    architecture: str
    """`sd1`, `sd2` or `sdxl`."""
    prediction_type: str
    native_size: int
    toyworld: bool


def pick_profile(traits: ModelTraits) -> Profile:
    """The profile of a model with these traits."""
    if traits.toyworld:
        return TOYWORLD
    return PROFILES[traits.architecture]


def traits_of_pipeline(pipe: Any) -> ModelTraits:
    """The traits of a loaded diffusers pipeline."""
    from models.pipelines import architecture

    folder = pipe.config.get("_name_or_path") if hasattr(pipe, "config") else None
    return ModelTraits(
        architecture=architecture(pipe),
        prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")),
        native_size=int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor),
        toyworld=_is_toyworld_folder(folder),
    )


def traits_of_folder(folder: str | Path) -> ModelTraits | None:
    """The traits of a diffusers folder read from its config files (no weights loaded); None if unreadable."""
    folder = Path(folder).expanduser()
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        text = json.loads((folder / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if index.get("_class_name") == "StableDiffusionXLPipeline":
        kind = "sdxl"
    elif text.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024:
        kind = "sd2"
    else:
        kind = "sd1"
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    return ModelTraits(
        architecture=kind,
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        native_size=int(unet.get("sample_size", 64)) * vae_factor,
        toyworld=_is_toyworld_folder(folder),
    )


def _is_toyworld_folder(folder: str | Path | None) -> bool:
    """True for the shipped toy world (its folder under `assets/`, or a copy carrying its marker file)."""
    if not folder:
        return False
    path = Path(folder).expanduser()
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
        if marker.get("profile") == TOYWORLD.name:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    from models.pipelines import default_base_model

    default = default_base_model()
    return default is not None and path.resolve() == default.resolve()


def write_marker(folder: str | Path, profile: str) -> Path:
    """Write the marker naming `profile` into a pipeline folder (the toy world's training script does)."""
    from models.atomic_write import atomic_write_text

    return atomic_write_text(Path(folder) / MARKER_FILE, json.dumps({"profile": profile}) + "\n")


def profile_for_spec(spec: str | Path | None, forced: str | None = None) -> Profile | None:
    """The profile of a base-model spec without loading its weights: `forced` if given, the toy world for
    None, the folder's traits for a diffusers folder; None when only loading the model can tell."""
    if forced:
        return get_profile(forced)
    if spec is None:
        return TOYWORLD
    traits = traits_of_folder(spec) if Path(str(spec)).expanduser().is_dir() else None
    return pick_profile(traits) if traits is not None else None


def profile_for_pipeline(pipe: Any, forced: str | None = None) -> Profile:
    """The profile of a loaded pipeline (`forced` names one instead)."""
    return get_profile(forced) if forced else pick_profile(traits_of_pipeline(pipe))


def describe(profile: Profile) -> str:
    """A few lines listing a profile's training and composition defaults (for --help and the app)."""
    lines = [f"{profile.name}: {profile.title}"]
    for family, d in profile.families.items():
        extras = [f"batch {d.train_batch_size}x{d.gradient_accumulation_steps}", f"targets {d.targets}"]
        if d.snr_gamma:
            extras.append(f"min-SNR {d.snr_gamma:g}")
        if d.noise_offset:
            extras.append(f"offset noise {d.noise_offset:g}")
        if d.prior_loss_weight != 1:
            extras.append(f"prior weight {d.prior_loss_weight:g}")
        lines.append(f"  {family:<6} lr {d.learning_rate:g}, {d.max_train_steps} steps, " + ", ".join(extras))
    gen = profile.generation
    size = f"{profile.resolution} px" if profile.resolution else "native size"
    options = "; ".join(f"{m} {o}" for m, o in gen.method_options.items()) or "methods' own"
    lines.append(
        f"  {size}; GPU {profile.gpu.mixed_precision}"
        + (", gradient checkpointing" if profile.gpu.gradient_checkpointing else "")
        + (", 8-bit Adam" if profile.gpu.use_8bit_adam else "")
        + f"; compose {gen.compose_steps} steps, guidance {gen.compose_guidance:g}; {options}"
    )
    return "\n".join(lines)


__all__ = [
    "PROFILES",
    "SD1",
    "SD2",
    "SDXL",
    "TOYWORLD",
    "AppHints",
    "FamilyDefaults",
    "GenerationDefaults",
    "GpuDefaults",
    "ModelTraits",
    "Profile",
    "ProfileError",
    "describe",
    "get_profile",
    "pick_profile",
    "profile_for_pipeline",
    "profile_for_spec",
    "traits_of_folder",
    "traits_of_pipeline",
]
