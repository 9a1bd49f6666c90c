"""Atomic file writes, the one way every part of Atelier saves a file.

No paper: the write goes to a temporary file in the destination's folder, which then replaces the destination
in one ``os.replace``. A write that fails part-way (a full disk, a cancelled job, a crash) leaves the file that
was there before untouched and removes its temporary file, so nothing already saved is lost or half-written
and a full disk is not filled further by leftovers. A failed write always raises ``OSError`` naming the
destination, also where the writer reports it otherwise (safetensors raises ``SafetensorError`` with the
operating system's error number in its text), so callers can tell a full disk from other failures.

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    atomic_write_text(path, text)
    write_safetensors(path, tensors, {"format": "pt"})
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

FILE_MODE = 0o644
"""Permissions of a written file (``mkstemp`` would leave 0600): readable by the other local tools a user runs."""

_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")


def as_os_error(exc: BaseException, path: str | Path) -> OSError | None:
    """``exc`` as an ``OSError`` about ``path`` (``None`` when it is no I/O failure). ``OSError(errno, ...)``
    builds the matching subclass (``PermissionError``, ...)."""
    if isinstance(exc, OSError):
        code = exc.errno
    else:
        found = _OS_ERROR_TEXT.search(str(exc))
        code = int(found.group(1)) if found else None
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(path))


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it onto ``path``; return ``path``.

    ``write`` must create the file at ``tmp`` (it may replace the empty file already there). On any failure the
    temporary file is removed and ``path`` keeps what it held; an I/O failure is raised as ``OSError`` with
    ``filename`` = ``path`` (chained to the original), anything else as it came.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = as_os_error(exc, path)
        if error is None:
            raise
        raise error from exc
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, line endings as given) to ``path`` atomically; return ``path``."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return atomic_write(path, write)


def write_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (detached, on the CPU, contiguous) and string ``metadata`` as one safetensors file,
    atomically; return ``path``."""
    plain = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    header = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=header))
