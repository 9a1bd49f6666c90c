"""The one folder the web app serves: ``<data-dir>/public/``, holding only files the page shows.

The data directory also holds the database, job state, worker logs and every adapter; none of that may be
reachable over HTTP (a ``--share`` link gives the whole internet the port). So Gradio is given
``public/`` as its only allowed path, generated images and score CSVs are written there directly
(``public/outputs/``, ``public/evaluations/``), and a file kept elsewhere that the page shows (a validation
image, a sample grid, the adapter files a person chose to download) is published first: hard-linked (or
copied) into ``public/shown/<digest>/<name>``, where the digest of its path, size and modification time makes
the address unguessable and lets the same file be published again at no cost. A download can be published
under another name (``<adapter name>-<family>.safetensors``), and a file made from one (an enlarged sample
grid, an Evaluate thumbnail) is written there the same way (``publish_made``), so nothing the page shows comes
from a temporary folder outside ``public/``. ``shown/`` is a cache: it is emptied when the app starts, and
``unpublish`` removes a file's links when the file goes (a deleted adapter).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

PUBLIC_DIR = "public"
SHOWN_DIR = "shown"


class PublicFiles:
    """Publishes files into ``<data-dir>/public/`` (``root``), the folder given to Gradio as allowed path."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / PUBLIC_DIR
        self.shown = self.root / SHOWN_DIR
        shutil.rmtree(self.shown, ignore_errors=True)
        self.shown.mkdir(parents=True, exist_ok=True)
        self._sources: dict[Path, Path] = {}
        """Each ``shown/<digest>/`` folder made this run → the file it was made from (for ``unpublish``)."""

    def folder(self, name: str) -> Path:
        """``public/<name>/``, created if needed: for files written to be shown (outputs, evaluations)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, path: str | Path, name: str | None = None) -> str:
        """The served copy of ``path`` (a file the page is about to show), as a string for Gradio; ``name``:
        the file name the browser sees (default: the file's own)."""
        source = Path(path).resolve()
        if name in (None, source.name) and source.is_relative_to(self.root.resolve()):
            return str(source)

        def link(staged: Path) -> None:
            try:
                os.link(source, staged)
            except OSError:
                shutil.copyfile(source, staged)

        return self._write(source, name or source.name, "link", link)

    def publish_made(self, source: str | Path, name: str, make: Callable[[Path], None]) -> str:
        """A file made from ``source`` (``make(path)`` writes it: a resized copy), served as ``name``; made
        once per version of ``source``."""
        return self._write(Path(source).resolve(), name, "made", make)

    def unpublish(self, folder: str | Path) -> None:
        """Remove what was published from files under ``folder``, under any name (a deleted adapter's folder:
        a hard link would keep serving the file)."""
        under = Path(folder).resolve()
        for shown, source in list(self._sources.items()):
            if source.is_relative_to(under):
                shutil.rmtree(shown, ignore_errors=True)
                self._sources.pop(shown, None)

    def _write(self, source: Path, name: str, kind: str, make: Callable[[Path], None]) -> str:
        name = Path(name).name
        stat = source.stat()
        key = f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}\0{kind}\0{name}"
        target = self.shown / hashlib.sha256(key.encode()).hexdigest()[:32] / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.parent / f".{name}.{uuid.uuid4().hex}.tmp"
            try:
                make(staged)
                os.replace(staged, target)
            finally:
                staged.unlink(missing_ok=True)
        self._sources[target.parent] = source
        return str(target)
