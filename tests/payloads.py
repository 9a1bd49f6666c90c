"""Hostile model files for the security tests: each one creates a marker file if anything runs it.

- A TorchScript archive whose scripted `__setstate__` (run by `torch.jit.load`) creates the marker through
  `torch.from_file(..., shared=True)`, the way a crafted file can create or overwrite any writable file.
- A pickle whose `__reduce__` calls `open(marker, "w")` (run by any unrestricted unpickler, e.g. `torch.load`
  without `weights_only`, or with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` where the argument is left out).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch


class _ScriptedPayload(torch.nn.Module):
    """Scripted with `torch.jit.script`; its `__setstate__` runs when the archive is loaded."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        touched = torch.from_file(self.marker, shared=True, size=4, dtype=torch.uint8)
        self.marker = self.marker + str(int(touched.fill_(65).sum()))  # used, so the compiler keeps it


class _PicklePayload:
    """Unpickling this calls `open(marker, "w")`, creating the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def write_torchscript_payload(path: Path, marker: Path) -> Path:
    """Save a TorchScript archive at `path` that creates `marker` when `torch.jit.load` reads it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(_ScriptedPayload(str(marker))).save(str(path))
    return path


def write_pickle_payload(path: Path, marker: Path) -> Path:
    """Save, with `torch.save`, a dict whose unpickling creates `marker` (a state-dict look-alike)."""
    torch.save({"weight": torch.zeros(1), "payload": _PicklePayload(str(marker))}, path)
    return path


def write_raw_pickle_payload(path: Path, marker: Path) -> Path:
    """The same payload as a plain `pickle` stream (what a `.bin` written by old tools can be)."""
    path.write_bytes(pickle.dumps({"payload": _PicklePayload(str(marker))}))
    return path
