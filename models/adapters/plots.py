"""Small PNG charts for the adapter inspector, drawn with Pillow (already a dependency): horizontal bars per
layer with one colour per adapter, and line charts (linear or log y) for spectra and per-image scores.
No paper; the charts only need to be readable in a browser or the Library tab."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from models.atomic_write import atomic_write

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _save(image: Image.Image, path: str | Path) -> Path:
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


def _tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3g}"


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str], x: int, y: int) -> None:
    for index, name in enumerate(names):
        colour = COLOURS[index % len(COLOURS)]
        draw.rectangle([x, y + 18 * index + 3, x + 10, y + 18 * index + 13], fill=colour)
        draw.text((x + 16, y + 18 * index), name, fill=INK, font=_font())


def bar_chart(
    path: str | Path, title: str, labels: Sequence[str], series: Mapping[str, Sequence[float]], unit: str = ""
) -> Path:
    """One row per label, one bar per series in it (series = adapter name -> one value per label)."""
    names = list(series)
    row = 6 + 12 * len(names)
    label_width = max((int(_font().getlength(label)) for label in labels), default=0) + 16
    width, top, plot_width = label_width + 560, 48 + 18 * len(names), 520
    height = top + row * len(labels) + 40
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill=INK, font=_font(15))
    _legend(draw, names, 10, 30)
    peak = max((v for values in series.values() for v in values if math.isfinite(v)), default=0.0) or 1.0
    for tick in range(5):
        x = label_width + plot_width * tick / 4
        draw.line([x, top - 4, x, height - 34], fill=GRID)
        draw.text((x - 12, height - 30), _tick(peak * tick / 4), fill=INK, font=_font(11))
    draw.text((label_width + plot_width - 40, height - 16), unit, fill=INK, font=_font(11))
    for index, label in enumerate(labels):
        y = top + row * index
        draw.text((8, y + row / 2 - 7), label, fill=INK, font=_font())
        for k, name in enumerate(names):
            value = series[name][index]
            length = plot_width * max(value, 0.0) / peak if math.isfinite(value) else 0
            colour = COLOURS[k % len(COLOURS)]
            draw.rectangle([label_width, y + 3 + 12 * k, label_width + length, y + 12 + 12 * k], fill=colour)
    return _save(image, path)


def line_chart(
    path: str | Path,
    title: str,
    series: Mapping[str, Sequence[Sequence[float]]],
    *,
    x_label: str,
    y_label: str,
    log_y: bool = False,
) -> Path:
    """Lines (series = name -> list of lines, each a list of y at x = 1, 2, ...), one colour per name."""
    width, height, left, right, top, bottom = 720, 420, 70, 20, 40 + 18 * len(series), 50
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill=INK, font=_font(15))
    _legend(draw, list(series), 10, 30)
    values = [v for lines in series.values() for line in lines for v in line if math.isfinite(v)]
    if log_y:
        values = [v for v in values if v > 0]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    transform = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    low_t, high_t = transform(low), transform(high)
    if high_t - low_t < 1e-12:
        low_t, high_t = low_t - 0.5, high_t + 0.5
    length = max((len(line) for lines in series.values() for line in lines), default=1)
    span_x, span_y = width - left - right, height - top - bottom

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + span_x * (i / max(length - 1, 1))
        return x, top + span_y * (1 - (transform(v) - low_t) / (high_t - low_t))

    for tick in range(5):
        level = low_t + (high_t - low_t) * tick / 4
        y = top + span_y * (1 - tick / 4)
        draw.line([left, y, width - right, y], fill=GRID)
        draw.text((4, y - 7), _tick(10**level if log_y else level), fill=INK, font=_font(11))
    for tick in sorted({1, length, *range(5, length, 5)}):
        x = left + span_x * ((tick - 1) / max(length - 1, 1))
        draw.text((x - 6, height - bottom + 6), str(tick), fill=INK, font=_font(11))
    draw.text((width // 2 - 60, height - 20), x_label, fill=INK, font=_font())
    draw.text((left, top - 16), y_label + (" (log scale)" if log_y else ""), fill=INK, font=_font(11))
    for k, lines in enumerate(series.values()):
        colour = COLOURS[k % len(COLOURS)]
        for line in lines:
            points = [point(i, v) for i, v in enumerate(line) if math.isfinite(v) and (v > 0 or not log_y)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=1)
            for x, y in points[:1] if len(points) == 1 else []:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return _save(image, path)
