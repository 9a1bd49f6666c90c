"""The one folder the web app serves: ``<data-dir>/public/``, holding only files the page shows.

The data directory also holds the database, job state, worker logs and every adapter; none of that may be
reachable over HTTP (a ``--share`` link gives the whole internet the port). So Gradio is given
``public/`` as its only allowed path, generated images and score CSVs are written there directly
(``public/outputs/``, ``public/evaluations/``), and a file kept elsewhere that the page shows (a validation
image, a sample grid, the adapter files a person chose to download) is published first: hard-linked (or
copied) into ``public/shown/<digest>/<name>``, where the digest of its path, size and modification time makes
the address unguessable and lets the same file be published again at no cost. ``shown/`` is a cache: it is
emptied when the app starts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
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

    def folder(self, name: str) -> Path:
        """``public/<name>/``, created if needed: for files written to be shown (outputs, evaluations)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, path: str | Path) -> str:
        """The served copy of ``path`` (a file the page is about to show), as a string for Gradio."""
        source = Path(path).resolve()
        if source.is_relative_to(self.root.resolve()):
            return str(source)
        stat = source.stat()
        digest = hashlib.sha256(f"{source}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
        target = self.shown / digest / source.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.parent / f".{source.name}.{uuid.uuid4().hex}.tmp"
            try:
                os.link(source, staged)
            except OSError:
                shutil.copyfile(source, staged)
            os.replace(staged, target)
        return str(target)
