"""Device and dtype selection shared by training, composition, evaluation and the app.

Order of preference is CUDA, then Apple MPS, then CPU; half precision only where the device runs it well
(fp16 on CUDA/MPS, bf16 on request), fp32 on CPU. Every choice can be overridden by name.
"""

from __future__ import annotations

import torch

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """The device to run on: `prefer` if given (e.g. "cpu", "cuda:1"), else cuda > mps > cpu."""
    if prefer is not None and str(prefer) != "auto":
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {str(prefer)!r} was asked for, but no CUDA GPU is visible; use --device cpu"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(
                f"device {str(prefer)!r} was asked for, but MPS is not available; use --device cpu"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device | str, prefer: str | torch.dtype | None = None) -> torch.dtype:
    """The weight dtype for `device`: `prefer` if given ("fp32", "fp16", "bf16"), else fp16 on GPU, fp32 on CPU."""
    if isinstance(prefer, torch.dtype):
        return prefer
    if prefer is not None and prefer != "auto":
        try:
            return _DTYPES[prefer.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {prefer!r}; choose one of fp32, fp16, bf16") from None
    return torch.float32 if torch.device(device).type == "cpu" else torch.float16
