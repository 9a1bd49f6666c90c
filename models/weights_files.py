"""Reading tensors from model files a person hands to Atelier, without ever running code from them.

Two formats are read: safetensors (a JSON header and raw bytes; nothing to execute) and torch's own
`.pt`/`.pth`/`.ckpt`/`.bin` zip or legacy pickles, through `torch.load(..., weights_only=True)`, torch's
restricted unpickler that builds tensors and plain containers only. Passing `weights_only=True` explicitly
also keeps `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` from switching to the unrestricted unpickler (torch honours
that variable only where the argument is left out). TorchScript archives are refused before any loader sees
them: TorchScript's loader restores scripted modules by running their `__setstate__`, which can do anything.

Every refusal is a `WeightsFileError` with one line naming the file, what is wrong and what to do; torch's
own multi-line weights-only explanation (with its terminal colour codes) is reduced to its first sentence.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

TORCHSCRIPT_REFUSAL = (
    "{path} is a TorchScript archive; loading one can run code from the file, so Atelier never does. "
    "Pass a plain state dict instead (a .safetensors file, or a .pt written with torch.save(model.state_dict()))"
)
CONVERT_HINT = "convert it to .safetensors with a tool you trust"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class WeightsFileError(ValueError):
    """A model file cannot be read safely; the one-line message says which file, why, and what to do."""


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error text, without terminal colour codes (torch colours its
    weights-only explanation and spreads it over a dozen lines)."""
    text = _ANSI.sub("", str(error))
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__ if isinstance(error, BaseException) else ""


def is_torchscript_archive(path: str | Path) -> bool:
    """True when `path` is a zip written by `torch.jit.save` (it holds `constants.pkl` or a `code/` folder);
    read from the zip's table of contents only."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in names)


def load_tensors(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """The object stored in `path` (a state dict, or a dict holding one), read without running code.

    `.safetensors` goes through safetensors; anything else through `torch.load(weights_only=True)` after a
    check that it is no TorchScript archive. `map_location="meta"` reads the structure without the data.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu" if str(map_location) == "meta" else str(map_location))
        except (SafetensorError, OSError) as err:
            raise WeightsFileError(
                f"{path} is not a readable .safetensors file ({first_line(err)})"
            ) from None
    if is_torchscript_archive(path):
        raise WeightsFileError(TORCHSCRIPT_REFUSAL.format(path=path))
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:
        raise WeightsFileError(f"could not read {path}: {first_line(err)}") from None
    except Exception as err:
        raise WeightsFileError(
            f"{path} holds more than tensors, so torch's weights-only loader refused it "
            f"({first_line(err)}); Atelier never unpickles anything else: {CONVERT_HINT}"
        ) from None
    if not isinstance(loaded, dict):
        raise WeightsFileError(
            f"{path} holds a {type(loaded).__name__}, not a state dict of tensors; {CONVERT_HINT}"
        )
    return loaded
