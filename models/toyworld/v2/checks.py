"""Deterministic checks of a toy-world v2 image: which background, and which objects (colour, shape, texture),
where.

No paper: these are the toy world's own "detectors", the stand-in for human judgement of whether a generated
image shows what its prompt asked. Pixel statistics only, so no model and the same answer every time:
background from the border median; objects as the connected components of the pixels far from the
background (scipy.ndimage); colour from the median of an object's body pixels; shape by intersection-over-union
with each shape's template stretched over the object's box (rings and frames keep their holes, small holes
left by texture marks are filled); texture from the layout of dark marks inside the object. They know every
attribute of `world`, held-out ones included, so they score personalization and composition too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from models.toyworld.v2.world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    SceneObject,
    shape_mask,
    slot_columns,
)

FOREGROUND_DISTANCE = 45.0
"""RGB distance from the background beyond which a pixel belongs to an object."""
MIN_OBJECT_PIXELS = 24
"""Components smaller than this are specks, not objects."""
SMALL_HOLE = 0.08
"""Holes smaller than this fraction of an object's filled area are texture marks, not part of the shape."""
DARK_RATIO = 0.72
"""A pixel whose brightest channel is below this fraction of the body's is a texture mark."""


@dataclass(frozen=True)
class ObjectReading:
    """What the checks see of one object: attribute guesses plus the evidence behind them."""

    colour: str
    shape: str
    texture: str
    box: tuple[int, int, int, int]
    """(left, top, right, bottom) in pixels, right and bottom exclusive."""
    shape_iou: float
    pixels: int

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    def matches(self, obj: SceneObject) -> dict[str, bool]:
        """Per-attribute agreement with a scene object."""
        return {
            "colour": self.colour == obj.colour,
            "shape": self.shape == obj.shape,
            "texture": self.texture == obj.texture,
        }


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """A float32 (IMAGE_SIZE, IMAGE_SIZE, 3) array of an RGB image (resized with a box filter if needed)."""
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


def nearest(value: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """The palette name nearest to an RGB value."""
    names = list(palette)
    colours = np.array([palette[name] for name in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(colours - value, axis=1)))]


def read_background(image: Image.Image | np.ndarray) -> str:
    """The background name nearest to the median colour of the image border."""
    array = as_array(image)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return nearest(np.median(border, axis=0), BACKGROUNDS)


@lru_cache(maxsize=8192)
def shape_template(shape: str, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` stretched over its whole box (cached: do not modify it)."""
    mask = shape_mask(shape, 96)
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8) * 255
    return np.asarray(Image.fromarray(crop).resize((width, height), Image.Resampling.BOX)) >= 128


def shape_scores(mask: np.ndarray, shapes: Sequence[str] = SHAPES) -> dict[str, float]:
    """IoU of a boolean object mask (cropped to its box) with each shape's template stretched over that box."""
    height, width = mask.shape
    scores = {}
    for shape in shapes:
        template = shape_template(shape, height, width)
        union = np.logical_or(template, mask).sum()
        scores[shape] = float(np.logical_and(template, mask).sum() / max(union, 1))
    return scores


def _fill_small_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of `mask` that are smaller than SMALL_HOLE of its filled area (texture marks)."""
    filled = ndimage.binary_fill_holes(mask)
    holes, count = ndimage.label(filled & ~mask)
    if count == 0:
        return mask
    sizes = ndimage.sum_labels(np.ones_like(mask), holes, index=np.arange(1, count + 1))
    small = np.isin(holes, 1 + np.nonzero(sizes < SMALL_HOLE * filled.sum())[0])
    return mask | small


def _classify_texture(pixels: np.ndarray, mask: np.ndarray) -> tuple[str, np.ndarray]:
    """Texture name and the body colour (median of the non-mark pixels) of a masked object."""
    value = pixels.max(axis=2)
    inner = ndimage.binary_erosion(mask)
    if inner.sum() < 12:
        inner = mask
    body_value = np.percentile(value[inner], 80)
    dark = (value < DARK_RATIO * body_value) & inner
    light = inner & ~dark
    body = np.median(pixels[light if light.any() else inner], axis=0)
    fraction = dark.sum() / inner.sum()
    if fraction < 0.06:
        return "plain", body
    rows = [dark[y][inner[y]].mean() for y in range(mask.shape[0]) if inner[y].sum() >= 3]
    cols = [dark[:, x][inner[:, x]].mean() for x in range(mask.shape[1]) if inner[:, x].sum() >= 3]
    row_spread, col_spread = float(np.std(rows or [0])), float(np.std(cols or [0]))
    if max(row_spread, col_spread) > 0.25:
        if row_spread > 1.8 * col_spread:
            return "striped", body
        if col_spread > 1.8 * row_spread:
            return "barred", body
    if fraction > 0.3:
        return "checkered", body
    return "dotted", body


def read_objects(image: Image.Image | np.ndarray) -> list[ObjectReading]:
    """Every object in the image, left to right."""
    array = as_array(image)
    background = np.array(BACKGROUNDS[read_background(array)], dtype=np.float32)
    foreground = np.linalg.norm(array - background, axis=2) > FOREGROUND_DISTANCE
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3)))
    readings = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = labels[box] == index
        if component.sum() < MIN_OBJECT_PIXELS:
            continue
        mask = _fill_small_holes(component)
        shapes = shape_scores(mask)
        shape = max(shapes, key=shapes.__getitem__)
        texture, body = _classify_texture(array[box], mask)
        rows, cols = box
        readings.append(
            ObjectReading(
                colour=nearest(body, COLOURS),
                shape=shape,
                texture=texture,
                box=(cols.start, rows.start, cols.stop, rows.stop),
                shape_iou=shapes[shape],
                pixels=int(mask.sum()),
            )
        )
    return sorted(readings, key=lambda reading: reading.centre_x)


def object_in_slot(readings: Sequence[ObjectReading], count: int, slot: str) -> ObjectReading | None:
    """The largest reading whose centre lies in the slot's columns (a lone object: the largest of all)."""
    start, end = slot_columns(count, slot)
    inside = [r for r in readings if start <= r.centre_x < end]
    return max(inside, key=lambda reading: reading.pixels, default=None)


def check_scene(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, bool]:
    """Attribute-by-attribute agreement of an image with a scene, plus `count` (as many objects as asked) and
    `all` (everything right).

    Keys: `background`, `count`, then `colour`, `shape`, `texture` for a one-object scene, or `left.colour`,
    ..., `right.texture` (`middle.*` with three objects) for the objects in their slots.
    """
    readings = read_objects(image)
    count = len(scene.objects)
    results = {"background": read_background(image) == scene.background, "count": len(readings) == count}
    for obj in scene.objects:
        reading = object_in_slot(readings, count, obj.slot)
        prefix = f"{obj.slot}." if count > 1 else ""
        agreement = reading.matches(obj) if reading else dict.fromkeys(("colour", "shape", "texture"), False)
        results.update({prefix + key: value for key, value in agreement.items()})
    results["all"] = all(results.values())
    return results


def shows(
    image: Image.Image | np.ndarray,
    colour: str | None = None,
    shape: str | None = None,
    texture: str | None = None,
) -> bool:
    """Whether any object in the image has every given attribute (anywhere: order- and position-free)."""
    return any(
        (colour is None or r.colour == colour)
        and (shape is None or r.shape == shape)
        and (texture is None or r.texture == texture)
        for r in read_objects(image)
    )
