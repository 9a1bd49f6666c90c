"""Where the Evaluate tab's images come from besides single uploads: a folder on the server under the
configured root (``--eval-root``), or an uploaded zip extracted safely.

A folder must resolve (symlinks followed) inside the root; a zip may hold only plain files with relative
names that stay inside the extraction folder, at most ``MAX_ZIP_FILES`` images and ``MAX_ZIP_BYTES`` once
extracted (checked from the sizes the archive declares and again while writing), so a zip bomb or a
``../`` name is refused before anything lands outside the folder. Images are listed in natural order
(``2.png`` before ``10.png``).
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path, PurePosixPath

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
MAX_ZIP_FILES = 500
MAX_ZIP_BYTES = 512 * 2**20
MAX_FOLDER_IMAGES = 500


class InputError(ValueError):
    """A folder or archive cannot be used; the message says why and what to do."""


def natural_key(name: str) -> list[object]:
    """Sort key that orders embedded numbers by value: ``img2`` before ``img10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def folder_images(root: Path | None, folder: str) -> list[Path]:
    """The images directly inside ``folder`` (relative to ``root``, or absolute but inside it)."""
    if root is None:
        raise InputError("scoring a server folder is off; start the app with --eval-root DIR to allow it")
    base = root.resolve()
    wanted = (base / folder.strip()).resolve()
    if wanted != base and base not in wanted.parents:
        raise InputError(f"{folder.strip()!r} is outside the evaluation root {base}; pick a folder inside it")
    if not wanted.is_dir():
        raise InputError(f"{folder.strip()!r} is not a folder under {base}")
    images = sorted(
        (p for p in wanted.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: natural_key(p.name),
    )
    if not images:
        raise InputError(f"{folder.strip()!r} holds no PNG, JPEG or WebP images")
    if len(images) > MAX_FOLDER_IMAGES:
        raise InputError(f"{folder.strip()!r} holds {len(images)} images; score at most {MAX_FOLDER_IMAGES}")
    return images


def extract_zip(
    archive: Path, destination: Path, max_files: int = MAX_ZIP_FILES, max_bytes: int = MAX_ZIP_BYTES
) -> list[Path]:
    """Extract the images of ``archive`` into ``destination`` (created empty) and return them in order."""
    try:
        bundle = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError):
        raise InputError(f"{archive.name} is not a readable zip file") from None
    with bundle:
        members = [m for m in bundle.infolist() if not m.is_dir()]
        for member in members:
            name = PurePosixPath(member.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (member.external_attr >> 28) == 0o12:
                raise InputError(f"{archive.name}: {member.filename!r} points outside the archive; refused")
        images = [m for m in members if PurePosixPath(m.filename).suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise InputError(f"{archive.name} holds no PNG, JPEG or WebP images")
        if len(images) > max_files:
            raise InputError(f"{archive.name} holds {len(images)} images; at most {max_files} are scored")
        declared = sum(m.file_size for m in images)
        if declared > max_bytes:
            raise InputError(
                f"{archive.name} would extract to {declared / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB limit"
            )
        shutil.rmtree(destination, ignore_errors=True)
        destination.mkdir(parents=True)
        written, paths = 0, []
        for index, member in enumerate(sorted(images, key=lambda m: natural_key(m.filename))):
            target = destination / f"{index:04d}-{PurePosixPath(member.filename).name}"
            with bundle.open(member) as source, target.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    written += len(chunk)
                    if written > max_bytes:
                        sink.close()
                        shutil.rmtree(destination, ignore_errors=True)
                        raise InputError(f"{archive.name} extracts to more than its declared size; refused")
                    sink.write(chunk)
            paths.append(target)
    return paths
