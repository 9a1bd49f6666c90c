"""Base-model loading: one function from a model spec to a diffusers Stable Diffusion pipeline.

A spec is a hub id (`stable-diffusion-v1-5/stable-diffusion-v1-5`), a local diffusers folder (one with
`model_index.json`), or a single-file checkpoint (`.safetensors`, or `.ckpt` read by `models.weights_files` with torch's weights-only
loader) in the original LDM layout that A1111/ComfyUI use. SD 1.x, SD 2.x and SDXL are supported; the pipeline
class comes from the model's own config (`model_index.json`) or, for a single file, from its keys.
`spec=None` means the embedded default, the project's toy world under `assets/`.
Every loaded pipeline's attention layers call their processors directly (`models.attention_calls`).

Nothing here downloads unless the spec is a hub id that is not cached and the hub is reachable; with
`HF_HUB_OFFLINE=1` or no network the error says so in one line and suggests a local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from models.attention_calls import direct_attention_calls
from models.device import pick_device, pick_dtype
from models.weights_files import WeightsFileError, first_line, load_tensors

SUPPORTED_PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SUPPORTED_TEXT = "Atelier supports Stable Diffusion 1.x, 2.x and SDXL"
_COMPONENT_LIBRARIES = ("diffusers", "transformers")


class ModelLoadError(RuntimeError):
    """A base model could not be loaded; the message says what is wrong and what to do."""


def default_base_model() -> Path | None:
    """The toy-world pipeline folder shipped under `assets/`, or None when it is not installed."""
    try:
        from models.toyworld.paths import TOYWORLD_PIPELINE
    except ImportError:
        return None
    folder = Path(TOYWORLD_PIPELINE)
    return folder if (folder / "model_index.json").is_file() else None


def hub_offline() -> bool:
    """True when the user asked huggingface_hub to stay offline (`HF_HUB_OFFLINE=1`)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_pipeline(
    spec: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | Path | None = None,
) -> DiffusionPipeline:
    """Load a Stable Diffusion pipeline from `spec` onto `device` in `dtype` (auto-chosen when None).

    `config` is only used for single-file checkpoints: a diffusers folder (or hub id) holding the component
    configs of the same architecture, needed offline because a single file carries weights only.
    """
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    if spec is None:
        spec = default_base_model()
        if spec is None:
            raise ModelLoadError(
                "No default base model is installed (the toy world under assets/toyworld is missing). "
                "Pass --base-model PATH: a diffusers folder, a single .safetensors checkpoint, or a hub id."
            )
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        pipe = _load_folder(path, torch_dtype)
    elif path.is_file():
        pipe = _load_single_file(path, torch_dtype, config)
    elif _looks_like_path(text):
        raise ModelLoadError(f"Base model path {text!r} does not exist. Check the path, or pass a hub id.")
    elif _HUB_ID.match(text):
        pipe = _load_hub(text, torch_dtype)
    else:
        raise ModelLoadError(
            f"{text!r} is neither an existing path nor a hub id of the form 'owner/name'. "
            "Pass a diffusers folder, a single .safetensors checkpoint, or a hub id."
        )
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            direct_attention_calls(component)
    return pipe.to(torch_device)


def check_base_model(spec: str | Path | None) -> None:
    """The cheap part of `load_pipeline`, for start-up checks: a local spec must exist and be a loadable kind
    (a diffusers folder with safetensors weights, or a single-file checkpoint whose keys say SD/SDXL); only
    headers and keys are read. Hub ids pass here and are checked when loaded. Raises `ModelLoadError`."""
    if spec is None:
        return
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json).")
        try:
            _check_components(path, json.loads(index.read_text()))
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{index} is not a valid diffusers model_index.json ({err}).") from None
    elif path.is_file():
        _single_file_class(path)
    elif _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelLoadError(f"Base model {text!r} does not exist: pass a diffusers folder, a single "
                             ".safetensors checkpoint, or a hub id.")  # fmt: skip


def architecture(pipe: DiffusionPipeline) -> str:
    """`sdxl`, `sd2` or `sd1`, read from the pipeline's components (works for tiny test models too)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    text_config = pipe.text_encoder.config
    if (
        getattr(text_config, "hidden_act", "quick_gelu") == "gelu"
        or pipe.unet.config.cross_attention_dim == 1024
    ):
        return "sd2"
    return "sd1"


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the UNet's architecture config: adapters trained on one base load only on a matching one."""
    public = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    blob = json.dumps(public, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _looks_like_path(text: str) -> bool:
    """Anything but `owner/name` is meant as a path (hub ids have exactly one slash and no suffix)."""
    return text.startswith((".", "/", "~")) or text.endswith(SINGLE_FILE_SUFFIXES) or text.count("/") != 1


def _pipeline_class(class_name: str, where: str) -> type[DiffusionPipeline]:
    try:
        return SUPPORTED_PIPELINES[class_name]
    except KeyError:
        raise ModelLoadError(
            f"{where} is a {class_name} model, which Atelier cannot train on: {_SUPPORTED_TEXT}."
        ) from None


def _safety_kwargs(cls: type[DiffusionPipeline]) -> dict[str, Any]:
    if cls is StableDiffusionPipeline:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def _load_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    index = folder / "model_index.json"
    if not index.is_file():
        hint = ""
        files = sorted(folder.glob("*.safetensors"))
        if files:
            hint = f" It holds {files[0].name}: pass that file to load it as a single-file checkpoint."
        raise ModelLoadError(
            f"{folder} is not a diffusers model folder (no model_index.json).{hint} "
            "Point at the folder that contains model_index.json."
        )
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ModelLoadError(f"{index} is not a valid diffusers model_index.json ({err}).") from None
    cls = _pipeline_class(class_name, str(folder))
    _check_components(folder, json.loads(index.read_text()))
    try:
        return cls.from_pretrained(
            folder, dtype=dtype, local_files_only=True, use_safetensors=True, **_safety_kwargs(cls)
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the diffusers folder {folder}: {first_line(err)}") from None


def _check_components(folder: Path, index: dict[str, Any]) -> None:
    """Refuse, before diffusers runs, components from other libraries (their code would be imported) and
    components whose weights are pickled `.bin` files only (Atelier reads model weights as safetensors)."""
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        if entry[0] not in _COMPONENT_LIBRARIES:
            raise ModelLoadError(
                f"{folder}: component {name!r} comes from {entry[0]!r}, not from diffusers or transformers; "
                f"{_SUPPORTED_TEXT} in the standard diffusers layout."
            )
        sub = folder / name
        if sub.is_dir() and not any(sub.glob("*.safetensors")) and any(sub.glob("*.bin")):
            raise ModelLoadError(
                f"{folder}: the {name} weights are a pickled .bin file only; Atelier loads model weights from "
                ".safetensors only. Convert the folder with a tool you trust (save_pretrained writes "
                "safetensors) or pass a single .safetensors checkpoint."
            )


def _single_file_class(path: Path) -> type[DiffusionPipeline]:
    """Choose SD or SDXL from the checkpoint's keys (the text encoder layout tells them apart)."""
    keys = _checkpoint_keys(path)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return StableDiffusionXLPipeline
    if any(k.startswith("cond_stage_model.") for k in keys) and any(
        k.startswith("model.diffusion_model.") for k in keys
    ):
        return StableDiffusionPipeline
    raise ModelLoadError(
        f"{path.name} is not a Stable Diffusion checkpoint in the original layout "
        f"(no model.diffusion_model/cond_stage_model keys): {_SUPPORTED_TEXT}. "
        "If it is a LoRA or other adapter, load it as an adapter instead."
    )


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{path.name} is not a readable .safetensors file ({err}).") from None
    if path.suffix == ".ckpt":
        try:
            state = load_tensors(path, map_location="meta")
        except WeightsFileError as err:
            raise ModelLoadError(str(err)) from None
        inner = state.get("state_dict", state)
        return list(inner.keys()) if isinstance(inner, dict) else []
    raise ModelLoadError(f"{path.name}: single-file checkpoints must be .safetensors or .ckpt files.")


def _load_single_file(path: Path, dtype: torch.dtype, config: str | Path | None) -> DiffusionPipeline:
    cls = _single_file_class(path)
    kwargs: dict[str, Any] = {"dtype": dtype, **_safety_kwargs(cls)}
    if config is not None:
        kwargs["config"] = str(config)
    offline = hub_offline() or (config is not None and Path(str(config)).is_dir())
    try:
        return cls.from_single_file(str(path), local_files_only=offline, **kwargs)
    except (OSError, ValueError) as err:
        if config is None:
            raise ModelLoadError(
                f"Could not load {path.name}: a single-file checkpoint carries weights only and its component "
                "configs could not be fetched (no network?). Pass a diffusers folder of the same architecture as "
                "--base-config FOLDER (training: --base_config FOLDER). "
                f"({type(err).__name__}: {str(err).splitlines()[0]})"
            ) from err
        raise ModelLoadError(f"Could not load {path.name} with configs from {config}: {err}") from err


def _load_hub(repo_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline_msg = (
        f"Cannot fetch {repo_id!r}: {{why}}, and it is not in the local Hugging Face cache. "
        "Download it on a connected machine and pass the local folder (or single .safetensors file) instead."
    )
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        if hub_offline():
            raise ModelLoadError(offline_msg.format(why="HF_HUB_OFFLINE is set")) from None
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"]))
        except Exception as err:
            raise ModelLoadError(
                offline_msg.format(why=f"the hub is unreachable ({type(err).__name__})")
            ) from None
    return _load_folder(folder, dtype)
