"""The toy world: a seeded procedural generator of small captioned scenes (Atelier's own training data).

No paper: this is the project's stand-in for the web-scale image/caption data behind Stable Diffusion
(Rombach et al. 2022). A scene is one or two flat objects (shape, colour, optional texture) on a plain
background, drawn with PIL at `IMAGE_SIZE` pixels, with an English caption such as
"a red circle on a white background" or "a blue striped square and a yellow triangle". In two-object scenes the
first-named object is drawn in the left half and the second in the right half, so region checks can tell them
apart.

`HELD_OUT` lists concepts that the base-training sampler never emits (two shapes, one colour, one texture).
They play the role of "my dog": personalization must teach them. `render_scene` draws any scene, held-out
attributes included, so training can make subject images of such a concept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
"""Scene side in pixels (32: the measured CPU budget does not allow 64 px; see the toy-world report)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 55),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 35),
    "purple": (150, 45, 205),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart")
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
TEXTURE_SHADE = 0.5
"""Texture marks are drawn in the object's colour scaled by this factor (a darker shade of the same hue)."""

HELD_OUT: dict[str, tuple[str, ...]] = {
    "shape": ("star", "heart"),
    "colour": ("purple",),
    "texture": ("checkered",),
}
"""Concepts never emitted by `sample_scene(held_out=False)`, the base-training sampler."""

BASE_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT["shape"])
BASE_COLOURS = tuple(c for c in COLOURS if c not in HELD_OUT["colour"])
BASE_TEXTURES = tuple(t for t in TEXTURES if t not in HELD_OUT["texture"])

SINGLE_SIZE = (15, 22)
"""Side range (pixels, inclusive) of the bounding square of a single object."""
PAIR_SIZE = (11, 14)
"""Side range of each object of a two-object scene (each lives in its own half)."""


class SceneError(ValueError):
    """A scene names an unknown attribute or does not fit the canvas."""


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes and its bounding square (left, top, side) in pixels."""

    shape: str
    colour: str
    texture: str = "plain"
    box: tuple[int, int, int] = (8, 8, 16)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise SceneError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise SceneError(f"unknown colour {self.colour!r}; choose one of {', '.join(COLOURS)}")
        if self.texture not in TEXTURES:
            raise SceneError(f"unknown texture {self.texture!r}; choose one of {', '.join(TEXTURES)}")
        left, top, side = self.box
        if side < 6 or left < 0 or top < 0 or left + side > IMAGE_SIZE or top + side > IMAGE_SIZE:
            raise SceneError(f"box {self.box} does not fit a {IMAGE_SIZE}px canvas with a side of at least 6")

    def phrase(self) -> str:
        """Noun phrase without article, e.g. "blue striped square"."""
        words = [self.colour] + ([] if self.texture == "plain" else [self.texture]) + [self.shape]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """A scene: one or two objects (left to right) on a background; `caption()` names them in that order."""

    objects: tuple[SceneObject, ...]
    background: str = "white"
    mention_background: bool = True
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise SceneError(
                f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}"
            )
        if len(self.objects) not in (1, 2):
            raise SceneError(f"a scene holds one or two objects, got {len(self.objects)}")

    def caption(self) -> str:
        """The English caption, e.g. "a red circle and a blue dotted square on a black background"."""
        text = " and ".join(f"a {obj.phrase()}" for obj in self.objects)
        if self.mention_background:
            text += f" on a {self.background} background"
        return text

    def concepts(self) -> set[str]:
        """Every attribute value in the scene (shapes, colours, non-plain textures, background)."""
        names = {self.background}
        for obj in self.objects:
            names |= {obj.shape, obj.colour, obj.texture}
        return names


def _shape_polygon(shape: str, left: float, top: float, side: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of polygonal shapes inside the square (left, top, side); None for curved shapes."""
    if shape == "square":
        return [(left, top), (left + side, top), (left + side, top + side), (left, top + side)]
    if shape == "triangle":
        return [(left + side / 2, top), (left + side, top + side), (left, top + side)]
    if shape == "star":
        cx, cy, outer = left + side / 2, top + side / 2, side / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else outer * 0.45
            angle = -np.pi / 2 + k * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy + 0.08 * side + radius * np.sin(angle)))
        return points
    return None


@lru_cache(maxsize=512)
def shape_mask(shape: str, side: int, supersample: int = 4) -> np.ndarray:
    """Boolean (side, side) mask of `shape` filling a square of `side` pixels (antialiased by supersampling;
    cached, read-only)."""
    if shape not in SHAPES:
        raise SceneError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    big = side * supersample
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    last = big - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "heart":
        lobe = big * 0.52
        draw.ellipse((0, 0, lobe, lobe), fill=255)
        draw.ellipse((last - lobe, 0, last, lobe), fill=255)
        draw.polygon([(big * 0.02, lobe * 0.62), (last * 0.98, lobe * 0.62), (big / 2, last)], fill=255)
    else:
        polygon = _shape_polygon(shape, 0, 0, last)
        assert polygon is not None
        draw.polygon(polygon, fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    mask = np.asarray(small) >= 128
    mask.flags.writeable = False
    return mask


@lru_cache(maxsize=512)
def texture_mask(texture: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of the texture marks, anchored at the object's top-left corner."""
    ys, xs = np.mgrid[0:side, 0:side]
    if texture == "plain":
        return np.zeros((side, side), dtype=bool)
    if texture == "striped":
        return (ys % 4) >= 2
    if texture == "dotted":
        return ((ys % 5) >= 2) & ((ys % 5) < 4) & ((xs % 5) >= 2) & ((xs % 5) < 4)
    if texture == "checkered":
        return ((ys // 3) + (xs // 3)) % 2 == 1
    raise SceneError(f"unknown texture {texture!r}; choose one of {', '.join(TEXTURES)}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image of IMAGE_SIZE x IMAGE_SIZE pixels (any attribute, held-out included)."""
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        left, top, side = obj.box
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        body = shape_mask(obj.shape, side)
        marks = body & texture_mask(obj.texture, side)
        patch = pixels[top : top + side, left : left + side]
        patch[body] = colour.astype(np.uint8)
        patch[marks] = (colour * TEXTURE_SHADE).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _random_box(
    rng: random.Random, size_range: tuple[int, int], x_range: tuple[int, int]
) -> tuple[int, int, int]:
    side = rng.randint(*size_range)
    left = rng.randint(x_range[0], x_range[1] - side)
    top = rng.randint(1, IMAGE_SIZE - 1 - side)
    return (left, top, side)


def place_objects(rng: random.Random, attributes: list[tuple[str, str, str]]) -> tuple[SceneObject, ...]:
    """Give each (shape, colour, texture) a random box: whole canvas for one, left then right half for two."""
    if len(attributes) == 1:
        shape, colour, texture = attributes[0]
        return (SceneObject(shape, colour, texture, _random_box(rng, SINGLE_SIZE, (1, IMAGE_SIZE - 1))),)
    half = IMAGE_SIZE // 2
    ranges = [(1, half - 1), (half + 1, IMAGE_SIZE - 1)]
    return tuple(
        SceneObject(shape, colour, texture, _random_box(rng, PAIR_SIZE, x_range))
        for (shape, colour, texture), x_range in zip(attributes, ranges, strict=True)
    )


def sample_scene(
    rng: random.Random,
    *,
    held_out: bool = False,
    two_object_rate: float = 0.35,
    mention_background_rate: float = 0.7,
) -> Scene:
    """Draw a random scene. With `held_out=False` (base training) no HELD_OUT concept is ever used."""
    shapes, colours, textures = (
        (SHAPES, tuple(COLOURS), TEXTURES)
        if held_out
        else (
            BASE_SHAPES,
            BASE_COLOURS,
            BASE_TEXTURES,
        )
    )
    count = 2 if rng.random() < two_object_rate else 1
    attributes = [(rng.choice(shapes), rng.choice(colours), rng.choice(textures)) for _ in range(count)]
    return Scene(
        objects=place_objects(rng, attributes),
        background=rng.choice(tuple(BACKGROUNDS)),
        mention_background=rng.random() < mention_background_rate,
    )


def sample_batch(seed: int, count: int, **options: float | bool) -> list[Scene]:
    """`count` scenes from a generator seeded with `seed` (same seed, same scenes)."""
    rng = random.Random(seed)
    return [sample_scene(rng, **options) for _ in range(count)]  # type: ignore[arg-type]


def concept_scene(
    shape: str, colour: str, texture: str = "plain", background: str = "white", seed: int = 0
) -> Scene:
    """A single-object scene of the given attributes at a seeded random box (subject images of a concept)."""
    rng = random.Random(seed)
    return Scene(place_objects(rng, [(shape, colour, texture)]), background=background)


def images_to_array(images: list[Image.Image]) -> np.ndarray:
    """Stack PIL images into a float32 (N, 3, H, W) array in [-1, 1] (the VAE's input range)."""
    stacked = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return stacked.transpose(0, 3, 1, 2) / 127.5 - 1.0


def twin_scene(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one attribute changed (an object's shape, colour or texture, or the background):
    a hard negative for contrastive training. Any concept, held-out ones included, may be drawn."""
    kind = rng.choice(("shape", "shape", "colour", "texture", "background"))
    if kind == "background":
        other = next(name for name in BACKGROUNDS if name != scene.background)
        return Scene(scene.objects, background=other, mention_background=True)
    index = rng.randrange(len(scene.objects))
    obj = scene.objects[index]
    pool = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES}[kind]
    value = rng.choice([name for name in pool if name != getattr(obj, kind)])
    attributes = {"shape": obj.shape, "colour": obj.colour, "texture": obj.texture, kind: value}
    changed = SceneObject(attributes["shape"], attributes["colour"], attributes["texture"], obj.box)
    objects = tuple(changed if i == index else o for i, o in enumerate(scene.objects))
    return Scene(objects, background=scene.background, mention_background=scene.mention_background)
