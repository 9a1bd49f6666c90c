"""A new user's own subject pictures for toy world v2: held-out shapes drawn the way a person would.

No paper: the stand-in for the five photos of "my dog" that DreamBooth (Ruiz et al. 2023) starts from. They
are drawn by this module's own simple routine, not by `world.render_scene`: a parametric outline (the classic
heart curve, a square frame of its own proportions) filled with ImageDraw at a larger size than the world's
(96 px by default), at a random scale, place and small tilt, with ImageDraw's plain antialiasing-free edges
softened by one Gaussian blur, on a plain background with a little sensor noise. What training must learn is
the subject as the person drew it; whether samples show it is judged by the world's checks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from models.toyworld.v2.world import BACKGROUNDS, COLOURS

PHOTO_SIZE = 96
SUBJECT_SHAPES = ("heart", "frame", "square")
"""Shapes this routine draws: the held-out heart and frame, and a base-world square to carry the held-out
texture."""
SUBJECT_TEXTURES = ("plain", "checkered")
CHECKER_CELLS = 5
"""A checkered subject is five cells across, each cell a darker shade (`CHECKER_SHADE`) or the body colour."""
CHECKER_SHADE = 0.45


def _heart_outline(steps: int = 120) -> list[tuple[float, float]]:
    """The heart curve x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t, scaled into [0, 1]^2
    (y down)."""
    points = []
    for k in range(steps):
        t = 2 * math.pi * k / steps
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x, -y))
    xs, ys = zip(*points, strict=True)
    left, top, width, height = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return [((x - left) / width, (y - top) / height) for x, y in points]


def _frame_outline() -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Outer and inner squares of a frame whose border is a quarter of its side."""
    outer = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    inner = [(0.25, 0.25), (0.75, 0.25), (0.75, 0.75), (0.25, 0.75)]
    return outer, inner


Points = list[tuple[float, float]]


def _checker(
    image: Image.Image, place: Callable[[Points], Points], tint: tuple[int, ...], background: str
) -> None:
    """Darken every other cell of a `CHECKER_CELLS`-square grid laid over the subject's unit square, inside the
    drawn body only."""
    cell = 1.0 / CHECKER_CELLS
    shade = tuple(int(c * CHECKER_SHADE) for c in tint)
    marks = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(marks)
    for row in range(CHECKER_CELLS):
        for col in range(CHECKER_CELLS):
            if (row + col) % 2:
                u, v = col * cell, row * cell
                draw.polygon(place([(u, v), (u + cell, v), (u + cell, v + cell), (u, v + cell)]), fill=255)
    body = np.any(np.asarray(image) != np.array(BACKGROUNDS[background], dtype=np.uint8), axis=2)
    mask = Image.fromarray(((np.asarray(marks) > 0) & body).astype(np.uint8) * 255)
    image.paste(Image.new("RGB", image.size, shade), (0, 0), mask)


def draw_subject(
    shape: str,
    colour: str,
    seed: int,
    background: str = "white",
    size: int = PHOTO_SIZE,
    texture: str = "plain",
) -> Image.Image:
    """One picture of the subject `colour` `texture` `shape` (`SUBJECT_SHAPES`, `SUBJECT_TEXTURES`), seeded:
    scale 45-70% of the canvas, anywhere in it, tilted up to 5 degrees."""
    if shape not in SUBJECT_SHAPES:
        raise ValueError(f"no subject drawing for {shape!r}; choose one of {', '.join(SUBJECT_SHAPES)}")
    if texture not in SUBJECT_TEXTURES:
        raise ValueError(f"no subject texture {texture!r}; choose one of {', '.join(SUBJECT_TEXTURES)}")
    rng = random.Random(seed)
    side = size * rng.uniform(0.45, 0.70)
    left = rng.uniform(size * 0.04, size * 0.96 - side)
    top = rng.uniform(size * 0.04, size * 0.96 - side)
    angle = math.radians(rng.uniform(-5, 5))
    cx, cy = left + side / 2, top + side / 2

    def place(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        placed = []
        for u, v in points:
            x, y = (u - 0.5) * side, (v - 0.5) * side
            placed.append(
                (
                    cx + x * math.cos(angle) - y * math.sin(angle),
                    cy + x * math.sin(angle) + y * math.cos(angle),
                )
            )
        return placed

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    tint = tuple(int(np.clip(c + rng.randint(-12, 12), 0, 255)) for c in COLOURS[colour])
    if shape == "heart":
        draw.polygon(place(_heart_outline()), fill=tint)
    elif shape == "frame":
        outer, inner = _frame_outline()
        draw.polygon(place(outer), fill=tint)
        draw.polygon(place(inner), fill=BACKGROUNDS[background])
    else:
        draw.polygon(place([(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]), fill=tint)
    if texture == "checkered":
        _checker(image, place, tint, background)
    image = image.filter(ImageFilter.GaussianBlur(0.6))
    noise = np.random.default_rng(seed).normal(0, 3, (size, size, 3))
    return Image.fromarray(
        (np.asarray(image, dtype=np.float32) + noise).round().clip(0, 255).astype(np.uint8)
    )
