"""Deterministic checks of a toy-world image: which background, colour, shape and texture it shows, where.

No paper: these are the toy world's own "detectors", the stand-in for human judgement of whether a generated
image shows what its prompt asked. They use pixel statistics only, so they need no model and give the same
answer every time: background from the border median, the object mask from the distance to the background,
colour from the median of the object's bright pixels, shape by intersection-over-union with each shape's
template fitted to the mask's bounding box, texture from the layout of dark marks inside the mask. They know
every attribute of `world`, held-out ones included, so they can score personalization too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
from PIL import Image

from models.toyworld.world import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, Scene, SceneObject, shape_mask

Region = Literal["whole", "left", "right"]

FOREGROUND_DISTANCE = 45.0
"""RGB distance from the background beyond which a pixel belongs to an object."""
MIN_OBJECT_PIXELS = 10
"""Fewer foreground pixels than this in a region means "no object there"."""
DARK_RATIO = 0.72
"""A pixel whose brightest channel is below this fraction of the body's is a texture mark."""


@dataclass(frozen=True)
class ObjectReading:
    """What the checks see in one region: attribute guesses plus the evidence behind them."""

    colour: str
    shape: str
    texture: str
    box: tuple[int, int, int, int]
    shape_iou: float
    pixels: int

    def matches(self, obj: SceneObject) -> dict[str, bool]:
        """Per-attribute agreement with a scene object."""
        return {
            "colour": self.colour == obj.colour,
            "shape": self.shape == obj.shape,
            "texture": self.texture == obj.texture,
        }


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {array.shape}")
    if array.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        resized = Image.fromarray(array.clip(0, 255).astype(np.uint8)).resize(
            (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX
        )
        array = np.asarray(resized, dtype=np.float32)
    return array


def _nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [float(np.linalg.norm(value - np.array(palette[name], dtype=np.float32))) for name in names]
    return names[int(np.argmin(distances))]


def read_background(image: Image.Image | np.ndarray) -> str:
    """The background name nearest to the median colour of the image border."""
    array = _as_array(image)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return _nearest(np.median(border, axis=0), BACKGROUNDS)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Mask with enclosed holes filled: everything not reachable from the border through background."""
    border = np.zeros_like(mask)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    return ~_grow(border, ~mask)


def _grow(seed: np.ndarray, within: np.ndarray) -> np.ndarray:
    """The 4-connected part of `within` reachable from `seed` (repeated dilation, fine at 32 px)."""
    region = seed & within
    while True:
        padded = np.pad(region, 1, constant_values=False)
        grown = (
            padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        ) & within
        if (grown == region).all():
            return region
        region = grown


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (ties: the first found)."""
    best = np.zeros_like(mask)
    remaining = mask.copy()
    while remaining.any():
        seed = np.zeros_like(mask)
        seed[tuple(np.argwhere(remaining)[0])] = True
        component = _grow(seed, remaining)
        if component.sum() > best.sum():
            best = component
        remaining &= ~component
    return best


@lru_cache(maxsize=4096)
def shape_template(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` stretched over its whole box: what a read object is matched
    against (cached: do not modify it)."""
    mask = shape_mask(shape, 64)
    ys, xs = np.nonzero(mask)
    big = Image.fromarray(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255)
    return np.asarray(big.resize((width, height), Image.Resampling.BOX)) >= 128


def shape_scores(mask: np.ndarray, shapes: Sequence[str] = SHAPES) -> dict[str, float]:
    """IoU of a boolean object mask with each shape's template stretched over the mask's box."""
    height, width = mask.shape
    scores = {}
    for shape in shapes:
        template = shape_template(shape, height, width)
        union = np.logical_or(template, mask).sum()
        scores[shape] = float(np.logical_and(template, mask).sum() / max(union, 1))
    return scores


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    scores = shape_scores(mask)
    best = max(scores, key=scores.__getitem__)
    return best, scores[best]


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def _classify_texture(pixels: np.ndarray, mask: np.ndarray) -> tuple[str, np.ndarray]:
    """Texture name and the body colour (median of the non-mark pixels) of a masked object."""
    value = pixels.max(axis=2)
    inner = _erode(mask)
    if inner.sum() < 6:
        inner = mask
    body_value = np.percentile(value[inner], 80)
    dark = (value < DARK_RATIO * body_value) & inner
    light = inner & ~dark
    body = np.median(pixels[light if light.any() else inner], axis=0)
    fraction = dark.sum() / inner.sum()
    if fraction < 0.08:
        return "plain", body
    rows = [dark[y][inner[y]].mean() for y in range(mask.shape[0]) if inner[y].sum() >= 2]
    cols = [dark[:, x][inner[:, x]].mean() for x in range(mask.shape[1]) if inner[:, x].sum() >= 2]
    row_spread, col_spread = float(np.std(rows)), float(np.std(cols))
    if row_spread > 0.3 and row_spread > 2.0 * col_spread:
        return "striped", body
    if fraction > 0.33:
        return "checkered", body
    return "dotted", body


def region_slice(region: Region) -> slice:
    """Columns of the canvas that a region covers (two-object scenes: first object left, second right)."""
    half = IMAGE_SIZE // 2
    return {"whole": slice(0, IMAGE_SIZE), "left": slice(0, half), "right": slice(half, IMAGE_SIZE)}[region]


def read_object(image: Image.Image | np.ndarray, region: Region = "whole") -> ObjectReading | None:
    """Read the largest object in `region`; None when the region shows no object."""
    array = _as_array(image)
    background = np.array(BACKGROUNDS[read_background(array)], dtype=np.float32)
    columns = region_slice(region)
    crop = array[:, columns]
    foreground = np.linalg.norm(crop - background, axis=2) > FOREGROUND_DISTANCE
    if foreground.sum() < MIN_OBJECT_PIXELS:
        return None
    mask = _fill_holes(_largest_component(_fill_holes(foreground)))
    if mask.sum() < MIN_OBJECT_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    shape, iou = _classify_shape(mask[top:bottom, left:right])
    texture, body = _classify_texture(crop[top:bottom, left:right], mask[top:bottom, left:right])
    offset = columns.start
    return ObjectReading(
        colour=_nearest(body, COLOURS),
        shape=shape,
        texture=texture,
        box=(left + offset, top, right + offset, bottom),
        shape_iou=iou,
        pixels=int(mask.sum()),
    )


def check_scene(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, bool]:
    """Attribute-by-attribute agreement of an image with a scene, plus `all` (everything right).

    Keys: `background`, then `colour`, `shape`, `texture` for a one-object scene, or `left.colour`,
    `left.shape`, ..., `right.texture` for a two-object scene (first-named object on the left).
    """
    results = {"background": read_background(image) == scene.background}
    regions: tuple[Region, ...] = ("whole",) if len(scene.objects) == 1 else ("left", "right")
    for region, obj in zip(regions, scene.objects, strict=True):
        reading = read_object(image, region)
        prefix = "" if region == "whole" else f"{region}."
        agreement = reading.matches(obj) if reading else dict.fromkeys(("colour", "shape", "texture"), False)
        results.update({prefix + key: value for key, value in agreement.items()})
    results["all"] = all(results.values())
    return results
