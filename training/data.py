"""Subject images for DreamBooth training: validation, normalisation and cropping.

DreamBooth (Ruiz et al., 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation") trains on a handful of photos of one subject. People hand us whatever
their phone produced, so this module turns a folder (or a list of files) into clean training
examples before any model is loaded:

* JPEG, PNG and WebP are accepted (by content, not by file name);
* EXIF orientation is applied, so portrait phone photos are not trained sideways;
* RGBA/LA/P images are composited on white, greyscale and CMYK are converted to RGB, 16-bit greyscale
  scaled (not clipped) to 8 bits;
* images that are too small, decompression bombs or corrupt are rejected, each named in the error;
* an optional ``<image>.txt`` sidecar gives a per-image caption;
* the image is resized so its shorter side equals the training resolution (aspect ratio kept) and
  then centre- or randomly (seeded) cropped to a square; the crop offset and the original size are
  kept because SDXL conditions on them.

Horizontal flipping is an augmentation applied at batch time (see ``flip_tensor``), so that
cached latents can be computed once for both orientations.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "MPO"}  # MPO: multi-picture JPEG written by many cameras
HIGH_DEPTH_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
"""Pillow's modes for 16-bit (and 32-bit integer) greyscale pixels, e.g. a 16-bit PNG."""
MAX_IMAGE_PIXELS = 64_000_000
"""Largest accepted image (width x height). Bigger files are refused as possible decompression bombs."""


class ImageDataError(ValueError):
    """Raised when subject or class images cannot be used; the message names every bad file."""


@dataclass(frozen=True)
class TrainingImage:
    """One prepared training example (square RGB image at the training resolution)."""

    path: Path
    image: Image.Image
    caption: str | None
    original_size: tuple[int, int]
    """(height, width) of the file after EXIF rotation, before resizing."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image."""


def list_image_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Return the image files of ``source``: a folder (sorted, non-recursive) or an explicit file list.

    Raises ``ImageDataError`` when the folder does not exist, holds no image, or a listed file is
    missing or has a suffix other than .jpg/.jpeg/.png/.webp.
    """
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.exists():
            raise ImageDataError(
                f"image folder {folder} does not exist; pass a folder of JPEG/PNG/WebP images"
            )
        if folder.is_file():
            return list_image_files([folder])
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageDataError(
                f"image folder {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)}); "
                "add a few photos of the subject"
            )
        return files
    files = [Path(p) for p in source]
    if not files:
        raise ImageDataError("the list of images is empty; give at least one JPEG/PNG/WebP file")
    problems = []
    for path in files:
        if not path.is_file():
            problems.append(f"{path}: file not found")
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            problems.append(f"{path}: unsupported file type {path.suffix or '(none)'}; use JPEG, PNG or WebP")
    if problems:
        raise ImageDataError("unusable images:\n  " + "\n  ".join(problems))
    return files


def open_rgb(path: Path, *, min_side: int, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open one image file as an upright RGB image, or raise ``ImageDataError`` naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as handle:
                if handle.format not in ACCEPTED_FORMATS:
                    raise ImageDataError(
                        f"{path}: {handle.format} images are not supported; use JPEG, PNG or WebP"
                    )
                width, height = handle.size
                if width * height > max_pixels:
                    raise ImageDataError(
                        f"{path}: {width}x{height} pixels is over the {max_pixels:,}-pixel limit "
                        "(possible decompression bomb); downscale the image first"
                    )
                handle.load()
                image = ImageOps.exif_transpose(handle)
    except ImageDataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDataError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageDataError(f"{path}: not a readable image (corrupt or not JPEG/PNG/WebP)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDataError(f"{path}: corrupt or truncated image ({exc})") from exc
    if min(image.size) < min_side:
        raise ImageDataError(
            f"{path}: {image.size[0]}x{image.size[1]} is too small; the shorter side must be at least "
            f"{min_side} px for this training resolution"
        )
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on a white background, and high-bit-depth
    greyscale (16-bit PNGs, 32-bit integer or float pixels) is scaled to 8 bits rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_DEPTH_GREY or image.mode == "F":
        image = _to_8bit_grey(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greyscale as 0-65535 (what PNG stores), float as 0-1 (or 0-255 when larger
    values occur), each mapped linearly onto 0-255. Pillow's own ``convert`` clips these to 255 instead."""
    pixels = np.asarray(image, dtype=np.float64)  # (H, W)
    if image.mode == "F":
        top = 1.0 if np.nanmax(pixels, initial=0.0) <= 1.0 else 255.0
    else:
        top = 65535.0
    scaled = np.nan_to_num(pixels / top * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # mode L


def resize_and_crop(
    image: Image.Image, resolution: int, *, center_crop: bool, rng: random.Random
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the shorter side equals ``resolution`` (aspect kept), then crop a square.

    Returns the square image and the crop's (top, left) offset in the resized image.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    return image.crop((left, top, left + resolution, top + resolution)), (top, left)


def read_caption(image_path: Path) -> str | None:
    """The caption sidecar ``<stem>.txt`` next to the image, stripped; ``None`` when absent or empty."""
    sidecar = image_path.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    text = sidecar.read_text(encoding="utf-8").strip()
    return text or None


def load_training_images(
    source: str | Path | Sequence[str | Path],
    resolution: int,
    *,
    center_crop: bool = False,
    seed: int = 0,
    min_side: int | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[TrainingImage]:
    """Load, validate and crop every image of ``source``.

    All files are checked before anything is returned; the ``ImageDataError`` lists every bad
    file with its problem so the user can fix the folder in one go. ``min_side`` defaults to half
    the resolution (upscaling further than 2x trains blur). Random crops are seeded by ``seed``.
    """
    if resolution <= 0 or resolution % 8:
        raise ImageDataError(f"resolution {resolution} must be a positive multiple of 8")
    files = list_image_files(source)
    min_side = resolution // 2 if min_side is None else min_side
    rng = random.Random(seed)
    examples, problems = [], []
    for path in files:
        try:
            image = open_rgb(path, min_side=min_side, max_pixels=max_pixels)
        except ImageDataError as exc:
            problems.append(str(exc))
            continue
        original_size = (image.size[1], image.size[0])
        cropped, crop = resize_and_crop(image, resolution, center_crop=center_crop, rng=rng)
        examples.append(TrainingImage(path, cropped, read_caption(path), original_size, crop))
    if problems:
        raise ImageDataError(
            f"{len(problems)} of {len(files)} images are unusable:\n  " + "\n  ".join(problems)
        )
    return examples


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def flip_tensor(pixels_or_latents: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a (..., H, W) tensor."""
    return torch.flip(pixels_or_latents, dims=(-1,))
