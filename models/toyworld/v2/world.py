"""Toy world v2: a seeded procedural generator of 64 px captioned scenes with one to three objects.

No paper: the project's stand-in for the web-scale image/caption data behind Stable Diffusion (Rombach et al.
2022), made rich enough that personalization and composition behave as they do on SD. A scene is one to three
objects on a plain background. Every object has a shape, a colour and a texture; shapes are built from parts
the model can recombine (discs and rings, squares and frames, polygons, stars, crosses, crescents), textures
along two axes (horizontal stripes, vertical bars, dots). Captions name the objects in random order and, in
about half of the multi-object scenes, say where each one is ("a red star on the left and a blue ring on the
right"); two objects sit in the left and right halves, three in the left, middle and right thirds.

`HELD_OUT` concepts sit *between* things the base model knows, as DreamBooth's "this particular dog" sits
between dogs the model has seen: the heart (two round lobes and a point: disc and triangle parts), the frame
(a square ring: square and ring), orange (between red and yellow), teal (between green and blue), checkered
(stripes crossed with bars). The base-training sampler never emits them; `render_scene` draws them, so
subject images and checks can use them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
"""Scene side in pixels."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 25),
    "yellow": (240, 215, 35),
    "green": (40, 165, 50),
    "teal": (20, 165, 165),
    "blue": (40, 70, 225),
    "purple": (140, 45, 200),
    "pink": (240, 120, 195),
    "brown": (125, 75, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPES: tuple[str, ...] = (
    "circle",
    "ring",
    "square",
    "frame",
    "diamond",
    "triangle",
    "star",
    "cross",
    "crescent",
    "semicircle",
    "heart",
)
TEXTURES: tuple[str, ...] = ("plain", "striped", "barred", "dotted", "checkered")
TEXTURE_SHADE = 0.5
"""Texture marks are drawn in the object's colour scaled by this factor (a darker shade of the same hue)."""
TEXTURE_PERIOD = 8
"""Pixels per texture repeat: two 4x-VAE latent cells, so the pattern survives the latent grid."""
DOT_SIDE = 3
TEXTURE_PHASE = {"dotted": 2}
"""Where in the period the object's centre falls (default 5: inside a mark), so that thin shapes (crosses,
stars) carry marks; chosen by reading clean three-object renders (docs/toyworld_v2.md)."""

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "texture": TEXTURES,
    "background": tuple(BACKGROUNDS),
}
"""Every value of each attribute a scene can vary, held-out ones included."""

HELD_OUT: dict[str, tuple[str, ...]] = {
    "shape": ("heart", "frame"),
    "colour": ("orange", "teal"),
    "texture": ("checkered",),
}
"""Concepts never emitted by `sample_scene(held_out=False)`, the base-training sampler."""

BASE_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT["shape"])
BASE_COLOURS = tuple(c for c in COLOURS if c not in HELD_OUT["colour"])
BASE_TEXTURES = tuple(t for t in TEXTURES if t not in HELD_OUT["texture"])

SIZES: dict[int, tuple[int, int]] = {1: (28, 44), 2: (20, 28), 3: (15, 19)}
"""Side range (pixels, inclusive) of each object's bounding square, by the number of objects in the scene."""
POSITIONS: dict[int, tuple[str, ...]] = {1: ("",), 2: ("left", "right"), 3: ("left", "middle", "right")}
"""Slot names by object count: two objects take the halves, three the thirds of the canvas."""
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
OBJECT_COUNT_RATES = (0.45, 0.35, 0.20)
"""Probability of one, two and three objects in a sampled scene."""


class SceneError(ValueError):
    """A scene names an unknown attribute or does not fit the canvas."""


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes, its bounding square (left, top, side) and its slot (`left`, `middle`,
    `right`, or "" for a lone object)."""

    shape: str
    colour: str
    texture: str = "plain"
    box: tuple[int, int, int] = (16, 16, 32)
    slot: str = ""

    def __post_init__(self) -> None:
        for kind, value, names in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("texture", self.texture, TEXTURES),
        ):
            if value not in names:
                raise SceneError(f"unknown {kind} {value!r}; choose one of {', '.join(names)}")
        left, top, side = self.box
        if side < 8 or left < 0 or top < 0 or left + side > IMAGE_SIZE or top + side > IMAGE_SIZE:
            raise SceneError(f"box {self.box} does not fit a {IMAGE_SIZE}px canvas with a side of at least 8")
        if self.slot not in ("", *POSITION_PHRASES):
            raise SceneError(f"unknown slot {self.slot!r}; choose left, middle or right")

    def phrase(self, colour_word: str | None = None) -> str:
        """Noun phrase without article, e.g. "blue striped square"; `colour_word` stands in for the colour
        ("" leaves it out: "striped square")."""
        colour = self.colour if colour_word is None else colour_word
        words = (
            ([colour] if colour else []) + ([] if self.texture == "plain" else [self.texture]) + [self.shape]
        )
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """One to three objects on a background. `order` is the order in which the caption names the objects
    (indices into `objects`, which are left to right); `mention_positions` adds "on the left" etc."""

    objects: tuple[SceneObject, ...]
    background: str = "white"
    mention_background: bool = True
    order: tuple[int, ...] | None = None
    mention_positions: bool = False
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise SceneError(
                f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}"
            )
        if len(self.objects) not in (1, 2, 3):
            raise SceneError(f"a scene holds one to three objects, got {len(self.objects)}")
        if self.order is not None and sorted(self.order) != list(range(len(self.objects))):
            raise SceneError(f"order {self.order} is not a permutation of the {len(self.objects)} objects")

    def named(self) -> tuple[SceneObject, ...]:
        """The objects in caption order."""
        order = self.order if self.order is not None else range(len(self.objects))
        return tuple(self.objects[i] for i in order)

    def caption(self, colour_words: Mapping[int, str] | None = None) -> str:
        """The English caption, e.g. "a blue ring on the right and a red dotted star on the left on a grey
        background"; `colour_words` maps object indices (into `objects`) to a word said in place of their
        colour ("" leaves it out: "a dotted star")."""
        parts = []
        order = self.order if self.order is not None else range(len(self.objects))
        for index in order:
            obj = self.objects[index]
            phrase = obj.phrase((colour_words or {}).get(index))
            text = f"{article(phrase)} {phrase}"
            if self.mention_positions and obj.slot:
                text += f" {POSITION_PHRASES[obj.slot]}"
            parts.append(text)
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        if self.mention_background:
            text += f" on a {self.background} background"
        return text

    def concepts(self) -> set[str]:
        """Every attribute value in the scene (shapes, colours, non-plain textures, background)."""
        names = {self.background}
        for obj in self.objects:
            names |= {obj.shape, obj.colour, obj.texture}
        return names


def article(phrase: str) -> str:
    """The indefinite article English puts before `phrase` ("an orange star", "a red ring")."""
    return "an" if phrase[:1] in "aeiou" else "a"


def _regular_polygon(points: int, cx: float, cy: float, radius: float, inner: float | None = None) -> list:
    """Vertices of an upright regular polygon (or a star when `inner`, the inner radius ratio, is given)."""
    count = points * 2 if inner else points
    vertices = []
    for k in range(count):
        r = radius * (inner if inner and k % 2 else 1.0)
        angle = -np.pi / 2 + k * 2 * np.pi / count
        vertices.append((cx + r * np.cos(angle), cy + r * np.sin(angle)))
    return vertices


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, size: float) -> None:
    """Draw `shape` in white, filling a `size` x `size` square at the origin of an "L" canvas."""
    last = size - 1
    mid = last / 2
    if shape in ("circle", "ring"):
        draw.ellipse((0, 0, last, last), fill=255)
        if shape == "ring":
            hole = last * 0.225
            draw.ellipse((hole, hole, last - hole, last - hole), fill=0)
    elif shape in ("square", "frame"):
        draw.rectangle((0, 0, last, last), fill=255)
        if shape == "frame":
            hole = last * 0.24
            draw.rectangle((hole, hole, last - hole, last - hole), fill=0)
    elif shape == "diamond":
        draw.polygon([(mid, 0), (last, mid), (mid, last), (0, mid)], fill=255)
    elif shape == "triangle":
        draw.polygon([(mid, 0), (last, last), (0, last)], fill=255)
    elif shape == "star":
        star = _regular_polygon(5, mid, mid * 1.1, mid * 1.05, inner=0.45)
        draw.polygon(star, fill=255)
    elif shape == "cross":
        arm = last * 0.34
        draw.rectangle((mid - arm / 2, 0, mid + arm / 2, last), fill=255)
        draw.rectangle((0, mid - arm / 2, last, mid + arm / 2), fill=255)
    elif shape == "crescent":
        draw.ellipse((0, 0, last, last), fill=255)
        draw.ellipse((last * 0.38, -last * 0.05, last * 1.25, last * 1.05), fill=0)
    elif shape == "semicircle":
        draw.pieslice((0, last * 0.25, last, last * 1.25), 180, 360, fill=255)
    elif shape == "heart":
        lobe = size * 0.54
        draw.ellipse((0, 0, lobe, lobe), fill=255)
        draw.ellipse((last - lobe, 0, last, lobe), fill=255)
        draw.polygon([(size * 0.03, lobe * 0.66), (last * 0.97, lobe * 0.66), (mid, last)], fill=255)
    else:
        raise SceneError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


@lru_cache(maxsize=1024)
def shape_alpha(shape: str, side: int, supersample: int = 4) -> np.ndarray:
    """Float (side, side) coverage in [0, 1] of `shape` filling a square of `side` pixels (antialiased by
    supersampling; cached, read-only)."""
    canvas = Image.new("L", (side * supersample, side * supersample), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, side * supersample)
    alpha = np.asarray(canvas.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255.0
    alpha.flags.writeable = False
    return alpha


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of `shape` (coverage at least one half)."""
    return shape_alpha(shape, side) >= 0.5


@lru_cache(maxsize=1024)
def texture_mask(texture: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of the texture marks, in phase with the object's centre."""
    period = TEXTURE_PERIOD
    centre = TEXTURE_PHASE.get(texture, 5)
    ys, xs = np.mgrid[0:side, 0:side] - (side // 2 - centre) + period * side
    stripes = (ys % period) >= period // 2
    bars = (xs % period) >= period // 2
    if texture == "plain":
        return np.zeros((side, side), dtype=bool)
    if texture == "striped":
        return stripes
    if texture == "barred":
        return bars
    if texture == "dotted":
        dot = (period - DOT_SIDE) // 2
        rows = ((ys % period) >= dot) & ((ys % period) < dot + DOT_SIDE)
        return rows & ((xs % period) >= dot) & ((xs % period) < dot + DOT_SIDE)
    if texture == "checkered":
        return stripes ^ bars
    raise SceneError(f"unknown texture {texture!r}; choose one of {', '.join(TEXTURES)}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image of IMAGE_SIZE x IMAGE_SIZE pixels (any attribute, held-out included),
    with antialiased edges."""
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    pixels[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        left, top, side = obj.box
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        fill = np.where(texture_mask(obj.texture, side)[..., None], colour * TEXTURE_SHADE, colour)
        alpha = shape_alpha(obj.shape, side)[..., None]
        patch = pixels[top : top + side, left : left + side]
        patch[:] = alpha * fill + (1 - alpha) * patch
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), "RGB")


def slot_columns(count: int, slot: str) -> tuple[int, int]:
    """Pixel columns [start, end) of a slot in a scene of `count` objects."""
    if count == 1 or not slot:
        return (0, IMAGE_SIZE)
    names = POSITIONS[count]
    width = IMAGE_SIZE / count
    index = names.index(slot)
    return (round(index * width), round((index + 1) * width))


def place_objects(rng: random.Random, attributes: list[tuple[str, str, str]]) -> tuple[SceneObject, ...]:
    """Give each (shape, colour, texture) a random box in its slot, left to right."""
    count = len(attributes)
    objects = []
    for (shape, colour, texture), slot in zip(attributes, POSITIONS[count], strict=True):
        start, end = slot_columns(count, slot)
        side = rng.randint(*SIZES[count])
        margin = 1 if count == 1 else 0
        left = rng.randint(start + margin, max(start + margin, end - side - margin))
        top = rng.randint(2, IMAGE_SIZE - 2 - side)
        objects.append(SceneObject(shape, colour, texture, (left, top, side), slot))
    return tuple(objects)


def sample_scene(
    rng: random.Random,
    *,
    held_out: bool = False,
    mention_background_rate: float = 0.7,
    mention_positions_rate: float = 0.5,
    count_rates: Sequence[float] = OBJECT_COUNT_RATES,
) -> Scene:
    """Draw a random scene. With `held_out=False` (base training) no HELD_OUT concept is ever used;
    `count_rates` weighs one, two and three objects."""
    shapes, colours, textures = (
        (SHAPES, tuple(COLOURS), TEXTURES) if held_out else (BASE_SHAPES, BASE_COLOURS, BASE_TEXTURES)
    )
    count = rng.choices((1, 2, 3), weights=count_rates)[0]
    attributes = [(rng.choice(shapes), rng.choice(colours), rng.choice(textures)) for _ in range(count)]
    order = list(range(count))
    rng.shuffle(order)
    return Scene(
        objects=place_objects(rng, attributes),
        background=rng.choice(tuple(BACKGROUNDS)),
        mention_background=rng.random() < mention_background_rate,
        order=tuple(order),
        mention_positions=count > 1 and rng.random() < mention_positions_rate,
    )


def sample_batch(seed: int, count: int, **options: float | bool | Sequence[float]) -> list[Scene]:
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


def with_attribute(scene: Scene, kind: str, value: str, index: int = 0) -> Scene:
    """`scene` with its background (`kind` "background", which the caption then names) or object `index`'s
    shape, colour or texture set to `value`; everything else, the caption's order and positions included, kept."""
    if kind == "background":
        return Scene(scene.objects, value, True, scene.order, scene.mention_positions)
    obj = scene.objects[index]
    attributes = {"shape": obj.shape, "colour": obj.colour, "texture": obj.texture, kind: value}
    objects = list(scene.objects)
    objects[index] = SceneObject(
        attributes["shape"], attributes["colour"], attributes["texture"], obj.box, obj.slot
    )
    return Scene(
        tuple(objects), scene.background, scene.mention_background, scene.order, scene.mention_positions
    )


def attribute_value(scene: Scene, kind: str, index: int = 0) -> str:
    """The scene's background (`kind` "background") or object `index`'s shape, colour or texture."""
    return scene.background if kind == "background" else str(getattr(scene.objects[index], kind))


def twin_scene(scene: Scene, rng: random.Random, kind: str | None = None) -> Scene:
    """The same scene with one thing changed — an object's shape, colour or texture, the background, or (with
    several objects) two objects' attributes swapped between their places: a hard negative for contrastive
    training that forces the text tower to bind attributes to objects and positions. Any concept, held-out
    ones included, may be drawn. `kind` forces what changes (`shape`, `colour`, `texture`, `background`)."""
    kinds = ["shape", "shape", "colour", "texture", "background"]
    if len(scene.objects) > 1:
        kinds += ["swap", "swap"]
    kind = kind or rng.choice(kinds)
    objects = list(scene.objects)
    if kind == "swap":
        i, j = rng.sample(range(len(objects)), 2)
        a, b = objects[i], objects[j]
        objects[i] = SceneObject(b.shape, b.colour, b.texture, a.box, a.slot)
        objects[j] = SceneObject(a.shape, a.colour, a.texture, b.box, b.slot)
        return Scene(tuple(objects), scene.background, scene.mention_background, scene.order, True)
    index = 0 if kind == "background" else rng.randrange(len(objects))
    current = attribute_value(scene, kind, index)
    return with_attribute(
        scene, kind, rng.choice([name for name in ATTRIBUTES[kind] if name != current]), index
    )
