"""CLIP models behind one small interface: OpenAI CLIP via clip-anytorch, and transformers' `CLIPModel`.

CLIP is Radford et al. 2021 ("Learning Transferable Visual Models From Natural Language Supervision").
A backend turns a batch of PIL images or strings into embeddings, each with the model's *own* preprocessing:
clip-anytorch's `preprocess` (bicubic resize + centre crop + CLIP normalisation) and `clip.tokenize`, or
`CLIPProcessor`'s image processor and tokenizer for transformers models.

`load_clip(spec)` accepts:
- `None`: the toy world's tiny CLIP (`models.toyworld.paths.TOYWORLD_CLIP`);
- a clip-anytorch model name (`"ViT-B/32"`): OpenAI's released file, downloaded to / read from `~/.cache/clip`
  by `clip.load`, which checks it against the SHA-256 in OpenAI's URL before loading it (these releases are
  TorchScript archives, so only that verified copy is ever loaded as one);
- a local clip-anytorch state dict, `.safetensors` or `.pt`/`.pth` read with torch's weights-only loader
  (`models.weights_files`), rebuilt with `clip.model.build_model`. A local TorchScript archive is refused
  (loading one can run code); copy OpenAI's release into `~/.cache/clip` and pass its name instead;
- a transformers CLIP folder (with `config.json`) or a hub id (`"openai/clip-vit-base-patch32"`), taken
  from the local Hugging Face cache first; offline, a missing model gives one line naming the local-path
  alternative.
Weights run in fp32 on every device so scores do not depend on where they were computed.
"""

from __future__ import annotations

import re
import urllib.error
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from evaluation.errors import ClipLoadError
from models.clip_compat import clip
from models.device import pick_device
from models.weights_files import WeightsFileError, first_line, load_tensors

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CLIP_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_LOCAL_PATH_HINT = "pass a local file or folder instead (--model PATH: a clip .pt/.safetensors file or a transformers CLIP folder)"


class ClipBackend(ABC):
    """A frozen CLIP model: `encode_images` and `encode_texts` return unnormalised (N, D) fp32 CPU tensors."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device

    @abstractmethod
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Embed a batch of RGB PIL images with the model's own preprocessing."""

    @abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed a batch of strings with the model's own tokenizer (too-long texts are truncated)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device})"


class OpenAIClipBackend(ClipBackend):
    """clip-anytorch's `clip.model.CLIP` with its `preprocess` transform and `clip.tokenize`."""

    def __init__(self, model: torch.nn.Module, preprocess: Any, name: str, device: torch.device) -> None:
        super().__init__(name, device)
        self.model = model.float().eval().to(device).requires_grad_(False)
        self.preprocess = preprocess

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (B, 3, R, R)
        return self.model.encode_image(pixels).float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = clip.tokenize(list(texts), context_length=self.model.context_length, truncate=True)
        return self.model.encode_text(tokens.to(self.device)).float().cpu()


class TransformersClipBackend(ClipBackend):
    """transformers' `CLIPModel` with the `CLIPProcessor` saved next to it."""

    def __init__(self, model: torch.nn.Module, processor: Any, name: str, device: torch.device) -> None:
        super().__init__(name, device)
        self.model = model.float().eval().to(device).requires_grad_(False)
        self.processor = processor
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor.image_processor(images=list(images), return_tensors="pt")
        output = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return _pooled(output).float().cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        output = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
        )
        return _pooled(output).float().cpu()


def _pooled(output: Any) -> torch.Tensor:
    """transformers < 5 returns the projected embedding; 5.x returns an output whose pooler_output it is."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def load_clip(
    spec: str | Path | ClipBackend | None = None, device: str | torch.device | None = None
) -> ClipBackend:
    """The CLIP backend for `spec` (see the module docstring) on `device` (auto when None).

    Loaded models are cached per (spec, file modification time, device), so repeated scoring calls from the
    app or a training loop do not reload weights. A `ClipBackend` passed in is returned unchanged.
    """
    if isinstance(spec, ClipBackend):
        return spec
    try:
        torch_device = pick_device(device)
    except ValueError as err:
        raise ClipLoadError(str(err)) from None
    text = str(spec) if spec is not None else str(_toyworld_clip_path())
    path = Path(text).expanduser()
    stamp = path.stat().st_mtime_ns if path.exists() else 0
    return _load_cached(text, stamp, str(torch_device))


def check_clip_spec(spec: str | Path | None) -> None:
    """The cheap part of `load_clip`, for start-up checks: a local file must be a state dict readable without
    running code (read to its structure only, no weights), a folder a transformers CLIP folder with
    safetensors weights. Names and hub ids pass here and are checked when loaded. Raises `ClipLoadError`."""
    if spec is None:
        return
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        try:
            load_tensors(path, map_location="meta")
        except WeightsFileError as err:
            raise ClipLoadError(str(err)) from None
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ClipLoadError(f"{path} is a folder but not a transformers CLIP model (no config.json)")
        _refuse_pickled_folder(path)
    elif text not in clip.available_models() and not _HUB_ID.match(text):
        raise ClipLoadError(f"CLIP model {text!r} not found; " + _LOCAL_PATH_HINT)


def _refuse_pickled_folder(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise ClipLoadError(
            f"{folder} holds its weights as a pickled .bin only; Atelier reads transformers weights from "
            "model.safetensors only: convert the folder with a tool you trust (save_pretrained writes safetensors)"
        )


def _toyworld_clip_path() -> Path:
    try:
        from models.toyworld.paths import TOYWORLD_CLIP
    except ImportError:
        raise ClipLoadError(
            "No default CLIP: the toy world (models.toyworld.paths) is not installed; " + _LOCAL_PATH_HINT
        ) from None
    path = Path(TOYWORLD_CLIP)
    if not path.is_file():
        raise ClipLoadError(
            f"The toy world's CLIP file {path} is missing (toy world assets not built yet); "
            + _LOCAL_PATH_HINT
        )
    return path


@lru_cache(maxsize=4)
def _load_cached(text: str, _stamp: int, device: str) -> ClipBackend:
    torch_device = torch.device(device)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_transformers_folder(path, text, torch_device)
    if path.is_file():
        return _load_clip_state_dict(path, text, torch_device)
    if text in clip.available_models():
        return _load_clip_release(text, torch_device)
    if text.startswith((".", "/", "~")) or text.endswith(_CLIP_FILE_SUFFIXES):
        raise ClipLoadError(f"CLIP model file {path} does not exist; check the path (--model)")
    if _HUB_ID.match(text):
        return _load_transformers_hub(text, torch_device)
    raise ClipLoadError(
        f"CLIP model {text!r} not found: no such file or folder, not a clip model name "
        f"({', '.join(clip.available_models())}) and not a hub id of the form 'owner/name'; "
        + _LOCAL_PATH_HINT
    )


def _load_clip_release(name: str, device: torch.device) -> ClipBackend:
    """One of OpenAI's released models by name, through `clip.load` (SHA-256-checked download), on CPU."""
    try:
        with warnings.catch_warnings():
            # clip.load reads the release with TorchScript's loader, which torch marks as deprecated.
            warnings.simplefilter("ignore", FutureWarning)
            model, preprocess = clip.load(name, device="cpu", jit=False)
    except (urllib.error.URLError, OSError) as err:
        raise ClipLoadError(
            f"CLIP model {name!r} is not in ~/.cache/clip and could not be downloaded "
            f"({type(err).__name__}: offline?); " + _LOCAL_PATH_HINT
        ) from None
    except RuntimeError as err:
        raise ClipLoadError(f"CLIP model {name!r} could not be loaded ({first_line(err)})") from None
    return OpenAIClipBackend(model, preprocess, name, device)


def _load_clip_state_dict(path: Path, label: str, device: torch.device) -> ClipBackend:
    """A clip-anytorch state dict (`.safetensors`, or `.pt` read weights-only), rebuilt as `clip.load` would."""
    try:
        state_dict = load_tensors(path)
    except WeightsFileError as err:
        raise ClipLoadError(str(err)) from None
    try:
        model = clip.model.build_model(state_dict)
    except (KeyError, RuntimeError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise ClipLoadError(
            f"{path} does not hold a clip-anytorch CLIP state dict ({type(err).__name__}: {first_line(err)}); "
            "transformers CLIP models are loaded from their folder instead"
        ) from None
    # clip.load's own transform for this input size (the same object clip.load returns).
    preprocess = clip.clip._transform(model.visual.input_resolution)
    return OpenAIClipBackend(model, preprocess, label, device)


def _load_transformers_folder(folder: Path, label: str, device: torch.device) -> ClipBackend:
    from transformers import CLIPModel, CLIPProcessor

    if not (folder / "config.json").is_file():
        raise ClipLoadError(
            f"{folder} is a folder but not a transformers CLIP model (no config.json); "
            "pass the folder holding config.json, or a clip .pt/.safetensors file"
        )
    _refuse_pickled_folder(folder)
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise ClipLoadError(
            f"Could not load a transformers CLIPModel + CLIPProcessor from {folder}: {first_line(err)}"
        ) from None
    return TransformersClipBackend(model, processor, label, device)


def _load_transformers_hub(repo_id: str, device: torch.device) -> ClipBackend:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from models.pipelines import hub_offline

    patterns = ["*.json", "*.txt", "*.safetensors"]
    message = (
        f"CLIP model {repo_id!r} is not in the local Hugging Face cache and {{why}}; " + _LOCAL_PATH_HINT
    )
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except (LocalEntryNotFoundError, OSError):
        if hub_offline():
            raise ClipLoadError(message.format(why="HF_HUB_OFFLINE is set")) from None
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as err:
            raise ClipLoadError(
                message.format(why=f"could not be downloaded ({type(err).__name__})")
            ) from None
    return _load_transformers_folder(Path(folder), repo_id, device)
