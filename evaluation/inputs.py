"""Reading what gets scored: image files and folders, prompt files, sidecar captions, and matching them.

Images come as PIL images, numpy arrays or paths; folders expand to their image files in file-name order.
Prompts come from a text file (one prompt per line in image order, or `name<TAB>prompt` lines), a JSON file
(a list in image order, or an object mapping file names or stems to prompts), one prompt for every image, or
sidecar `.txt` captions next to each image (the kohya / DreamBooth dataset convention). Every failure names
the file and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from evaluation.errors import EvaluationError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
ImageInput = Image.Image | np.ndarray | str | Path


def collect_images(sources: Sequence[str | Path]) -> list[Path]:
    """Image files named by `sources`: files as given, folders expanded to their images sorted by name."""
    found: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise EvaluationError(
                    f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); point at a folder of images"
                )
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise EvaluationError(f"{path} does not exist; give image files or folders of images")
    if not found:
        raise EvaluationError("no images given; pass image files or folders")
    return found


def image_name(item: ImageInput, index: int) -> str:
    """A row label: the path for files, else `#index`."""
    return str(item) if isinstance(item, str | Path) else f"#{index}"


def check_readable(items: Sequence[ImageInput]) -> None:
    """Fail fast, before any model runs, on a path that is missing or not an image (header check only)."""
    for item in items:
        if isinstance(item, Image.Image | np.ndarray):
            continue
        if not isinstance(item, str | Path):
            raise EvaluationError(
                f"cannot score an object of type {type(item).__name__}; give PIL images, numpy arrays or paths"
            )
        try:
            with Image.open(item):
                pass
        except FileNotFoundError:
            raise EvaluationError(f"image {item} does not exist") from None
        except (UnidentifiedImageError, OSError) as err:
            raise EvaluationError(
                f"{item} is not a readable image ({type(err).__name__}); remove or replace it"
            ) from None


def open_image(item: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, an (H, W[, C]) uint8 array or an image file."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise EvaluationError(
                f"numpy images must be uint8 arrays of shape (H, W) or (H, W, C), got {item.dtype} {item.shape}"
            )
        return Image.fromarray(item).convert("RGB")
    try:
        with Image.open(item) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise EvaluationError(f"image {item} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise EvaluationError(f"{item} is not a readable image ({err}); remove or replace it") from None


def read_prompts_file(path: str | Path, images: Sequence[Path]) -> list[str]:
    """One prompt per image from a `.txt` or `.json` prompts file (see the module docstring)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvaluationError(f"prompts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise EvaluationError(f"cannot read prompts file {path} as UTF-8 text ({err})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvaluationError(f"prompts file {path} is not valid JSON ({err})") from None
        if isinstance(data, list) and all(isinstance(p, str) for p in data):
            return match_in_order(data, images, str(path))
        if isinstance(data, dict) and all(isinstance(p, str) for p in data.values()):
            return match_by_name(data, images, str(path))
        raise EvaluationError(
            f"prompts file {path} must hold a JSON list of strings or an object {{file name: prompt}}"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and all("\t" in line for line in lines):
        pairs = [line.split("\t", 1) for line in lines]
        return match_by_name({name.strip(): prompt.strip() for name, prompt in pairs}, images, str(path))
    return match_in_order(lines, images, str(path))


def match_in_order(prompts: Sequence[str], images: Sequence[Path], source: str) -> list[str]:
    """Prompt i for image i; the counts must agree."""
    if len(prompts) != len(images):
        raise EvaluationError(
            f"{len(images)} images but {len(prompts)} prompts in {source}; give one prompt per image "
            "(in file-name order), or `name<TAB>prompt` lines to match by file name"
        )
    return list(prompts)


def match_by_name(prompts: Mapping[str, str], images: Sequence[Path], source: str) -> list[str]:
    """The prompt keyed by each image's file name (or stem); every image needs one and every key an image."""
    matched: list[str] = []
    missing: list[str] = []
    used: set[str] = set()
    for image in images:
        key = image.name if image.name in prompts else image.stem
        if key in prompts:
            matched.append(prompts[key])
            used.add(key)
        else:
            missing.append(image.name)
    if missing:
        raise EvaluationError(
            f"{len(missing)} of {len(images)} images have no prompt in {source} (e.g. {', '.join(missing[:3])}); "
            "key prompts by file name or stem"
        )
    unused = sorted(set(prompts) - used)
    if unused:
        raise EvaluationError(
            f"{source} has {len(prompts)} prompts but only {len(images)} images match; "
            f"no image for {', '.join(unused[:3])}"
        )
    return matched


def sidecar_prompts(images: Sequence[Path]) -> list[str]:
    """Each image's caption from the `.txt` file with the same stem next to it."""
    prompts: list[str] = []
    for image in images:
        caption = image.with_suffix(".txt")
        try:
            prompts.append(caption.read_text(encoding="utf-8").strip())
        except FileNotFoundError:
            raise EvaluationError(
                f"{image.name} has no sidecar caption {caption.name}; write one, or pass --prompts / --prompt"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise EvaluationError(f"cannot read caption {caption} as UTF-8 text ({err})") from None
    return prompts
