"""Subject-image loading: formats, EXIF, colour modes, rejection of bad files, captions, crops, flips."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import (
    ImageDataError,
    flip_tensor,
    image_to_tensor,
    list_image_files,
    load_training_images,
    open_rgb,
    resize_and_crop,
    to_rgb,
)


def _save(path: Path, image: Image.Image, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` with almost no pixel data: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def test_formats_modes_and_exif_become_upright_rgb(tmp_path: Path) -> None:
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = red.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise to display
    _save(tmp_path / "a_rotated.jpg", red, exif=exif, quality=95)
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent → white
    _save(tmp_path / "b_alpha.png", rgba)
    _save(tmp_path / "c_grey.webp", Image.new("L", (32, 32), 128), lossless=True)
    (tmp_path / "notes.md").write_text("not an image")

    images = load_training_images(tmp_path, 16, center_crop=True)

    assert [im.path.name for im in images] == ["a_rotated.jpg", "b_alpha.png", "c_grey.webp"]
    assert all(im.image.mode == "RGB" and im.image.size == (16, 16) for im in images)
    assert images[0].original_size == (40, 20)  # (height, width) after applying the EXIF rotation
    assert np.asarray(images[1].image).min() == 255  # transparent pixels composited on white
    grey = np.asarray(images[2].image)
    assert np.all(grey == grey[..., :1]) and abs(int(grey.mean()) - 128) <= 1


def test_every_bad_file_is_named_in_one_error(tmp_path: Path) -> None:
    _save(tmp_path / "good.png", Image.new("RGB", (32, 32)))
    _save(tmp_path / "tiny.png", Image.new("RGB", (8, 8)))
    (tmp_path / "broken.jpg").write_bytes(b"definitely not an image")
    _png_header_only(tmp_path / "bomb.png", 200_000, 200_000)
    truncated = tmp_path / "truncated.png"
    _save(truncated, Image.effect_noise((64, 64), 50).convert("RGB"))
    truncated.write_bytes(truncated.read_bytes()[:200])

    with pytest.raises(ImageDataError) as info:
        load_training_images(tmp_path, 32)
    message = str(info.value)
    assert "4 of 5 images are unusable" in message
    for name, words in [
        ("tiny.png", "too small"),
        ("broken.jpg", "not a readable image"),
        ("bomb.png", "decompression bomb"),
        ("truncated.png", "truncated"),
    ]:
        line = next(line for line in message.splitlines() if name in line)
        assert words in line, line
    assert "good.png" not in message


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    _save(tmp_path / "big.png", Image.new("RGB", (100, 100)))
    with pytest.raises(ImageDataError, match=r"big\.png: 100x100 pixels is over the 5,000-pixel limit"):
        load_training_images(tmp_path, 32, max_pixels=5_000)


def test_empty_or_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(ImageDataError, match="holds no images"):
        list_image_files(tmp_path)
    with pytest.raises(ImageDataError, match="does not exist"):
        list_image_files(tmp_path / "nope")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageDataError, match=r"x\.gif: unsupported file type \.gif"):
        list_image_files([tmp_path / "x.gif", tmp_path / "missing.png"])
    with pytest.raises(ImageDataError, match="missing.png: file not found"):
        list_image_files([tmp_path / "missing.png"])


def test_gif_content_with_png_name_is_rejected(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32)).save(tmp_path / "fake.png", format="GIF")
    with pytest.raises(ImageDataError, match=r"fake\.png: GIF images are not supported"):
        load_training_images(tmp_path, 32)


def test_file_list_and_caption_sidecars(tmp_path: Path) -> None:
    a = _save(tmp_path / "a.png", Image.new("RGB", (32, 32)))
    b = _save(tmp_path / "b.png", Image.new("RGB", (32, 32)))
    _save(tmp_path / "c.png", Image.new("RGB", (32, 32)))
    (tmp_path / "a.txt").write_text("  a photo of sks star, on grass \n")
    (tmp_path / "b.txt").write_text("   ")
    images = load_training_images([b, a], 32)
    assert [im.path for im in images] == [b, a]
    assert [im.caption for im in images] == [None, "a photo of sks star, on grass"]


def test_resize_keeps_aspect_and_crops_where_expected() -> None:
    gradient = np.tile(np.arange(80, dtype=np.uint8)[None, :, None] * 3, (40, 1, 3))  # 80 wide, 40 tall
    image = Image.fromarray(gradient)
    import random

    centre, offset = resize_and_crop(image, 20, center_crop=True, rng=random.Random(0))
    assert centre.size == (20, 20) and offset == (0, 10)  # resized to 40x20, centre crop starts at x=10
    crops = {resize_and_crop(image, 20, center_crop=False, rng=random.Random(s))[1] for s in range(20)}
    assert all(top == 0 and 0 <= left <= 20 for top, left in crops) and len(crops) > 3
    again = [resize_and_crop(image, 20, center_crop=False, rng=random.Random(5))[1] for _ in range(2)]
    assert again[0] == again[1]


def test_random_crops_are_seeded(tmp_path: Path) -> None:
    _save(tmp_path / "wide.png", Image.effect_noise((96, 32), 60).convert("RGB"))
    first = load_training_images(tmp_path, 32, seed=3)[0]
    second = load_training_images(tmp_path, 32, seed=3)[0]
    assert first.crop_top_left == second.crop_top_left
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))


def test_tensor_range_and_flip() -> None:
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[:, 0] = 255
    tensor = image_to_tensor(Image.fromarray(array))
    assert tensor.shape == (3, 4, 6)
    assert tensor[:, :, 0].eq(1).all() and tensor[:, :, 1:].eq(-1).all()
    flipped = flip_tensor(tensor)
    assert flipped[:, :, -1].eq(1).all() and torch.equal(flip_tensor(flipped), tensor)


def test_bad_resolution_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", Image.new("RGB", (32, 32)))
    with pytest.raises(ImageDataError, match="multiple of 8"):
        load_training_images(tmp_path, 30)


def _gradient_16bit_png(path: Path, width: int = 256, height: int = 64) -> Path:
    """A 16-bit greyscale PNG ramping 0 → 65535 from left to right (Pillow reads it as mode I;16)."""
    ramp = np.rint(np.linspace(0, 65535, width)).astype(np.uint16)
    Image.fromarray(np.tile(ramp, (height, 1))).save(path)
    return path


def test_a_16bit_gradient_keeps_its_range(tmp_path: Path) -> None:
    """#35 item 5: Pillow's convert("RGB") clips 16-bit values to 255 (a white image); they must be scaled."""
    path = _gradient_16bit_png(tmp_path / "ramp16.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
    square = _gradient_16bit_png(tmp_path / "square16.png", width=64)
    [example] = load_training_images([square], 64, center_crop=True)
    pixels = np.asarray(example.image)  # (64, 64, 3), at the training resolution already
    assert example.image.mode == "RGB" and (pixels[..., 0] == pixels[..., 2]).all()
    row = pixels[0, :, 0].astype(int)
    assert (np.diff(row) > 0).all() and row[0] <= 1 and row[-1] >= 254, row
    with Image.open(path) as raw:
        full = np.asarray(to_rgb(raw))[0, :, 0].astype(int)
    expected = np.rint(np.rint(np.linspace(0, 65535, 256)) / 257).astype(int)
    assert np.abs(full - expected).max() <= 1 and full.min() == 0 and full.max() == 255


@pytest.mark.parametrize(
    ("mode", "values", "top"), [("I", np.linspace(0, 65535, 64), 65535.0), ("F", np.linspace(0, 1, 64), 1.0)]
)
def test_32bit_greyscale_is_scaled_too(mode: str, values: np.ndarray, top: float) -> None:
    image = Image.fromarray(np.tile(values, (4, 1)).astype(np.int32 if mode == "I" else np.float32))
    assert image.mode == mode
    row = np.asarray(to_rgb(image))[0, :, 1].astype(int)
    assert np.abs(row - np.rint(values / top * 255)).max() <= 1


def test_the_app_upload_check_reads_16bit_pngs_the_way_training_does(tmp_path: Path) -> None:
    from app.studio import Settings, Studio

    path = _gradient_16bit_png(tmp_path / "ramp16.png")
    studio = Studio(Settings(data_dir=tmp_path / "data"), start=False)
    try:
        check = studio.check_uploads([path])
    finally:
        studio.close()
    assert check.ok and check.messages == ["✓ ramp16.png: 256x64"]
    assert np.asarray(open_rgb(path, min_side=1)).mean() == pytest.approx(127.5, abs=1)
