"""`models.atomic_write`: a failed write keeps the earlier file whole, leaves no temporary file, and is raised as
an `OSError` naming the destination (safetensors' own I/O errors included), on a simulated and on a real full
disk."""

from __future__ import annotations

import errno
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.atomic_write import FILE_MODE, atomic_write, atomic_write_text, write_safetensors


def test_writes_the_file_readable_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "deep" / "card.md", "héllo\r\nworld\n")
    assert path.read_bytes() == "héllo\r\nworld\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE
    tensors = {
        "a": torch.arange(6.0).reshape(2, 3).t(),
        "b": torch.ones(2, dtype=torch.int64),
    }  # non-contiguous
    write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "w.safetensors"]
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["card.md"]


def _fill_then_fail(error: BaseException) -> Callable[[Path], None]:
    """A writer that writes part of a file, then fails like a full disk (or as ``error`` says)."""

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half of a new fi")
        raise error

    return write


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["OSError", "SafetensorError"],
)
def test_a_full_disk_keeps_the_earlier_file_and_names_the_destination(
    tmp_path: Path, error: BaseException
) -> None:
    path = atomic_write_text(tmp_path / "adapter.safetensors", "the earlier, good file")
    with pytest.raises(OSError) as caught:
        atomic_write(path, _fill_then_fail(error))
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(path)
    assert caught.value.__cause__ is error
    assert path.read_text() == "the earlier, good file"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]


def test_other_errors_pass_through_unchanged(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad tensor"):
        atomic_write(tmp_path / "x.bin", _fill_then_fail(ValueError("bad tensor")))
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.bin", _fill_then_fail(KeyboardInterrupt()))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root and mount rights, as on the project's CI machines)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_real_full_disk(tiny_disk: Path) -> None:
    path = write_safetensors(tiny_disk / "adapter.safetensors", {"w": torch.ones(16)})
    before = path.read_bytes()
    with pytest.raises(OSError) as caught:
        write_safetensors(path, {"w": torch.ones(64 * 1024)})  # 256 KiB
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in tiny_disk.iterdir()] == ["adapter.safetensors"]
    atomic_write_text(tiny_disk / "note.txt", "space is back")  # the failed write left nothing behind
