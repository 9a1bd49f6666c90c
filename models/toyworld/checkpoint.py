"""Resumable training state in safetensors: module weights, optimizer moments and EMA copies in one file.

No paper: plumbing for `models.toyworld.train`. Scalars (step, optimizer hyperparameters) go into the
safetensors header as JSON, so nothing is ever unpickled when a run resumes.

A *carry-over* state (`carry_over_state`) is the small copy of one that a long run leaves where it survives a
change of machine: one module's weights (its EMA copy where there is one) in float16 and the step, without
optimizer moments or EMA. `load_state` resumes from it with fresh moments; the caller restarts the EMA from the
loaded weights (`is_carry_over`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from models.atomic_write import write_safetensors


def save_state(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, list[torch.Tensor]],
    step: int,
) -> None:
    """Atomically write module state dicts, the optimizer state and extra tensor lists (e.g. EMA weights)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value.detach().contiguous()
    optim_state = optimizer.state_dict()
    for index, state in optim_state["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
    for name, values in extra.items():
        for index, value in enumerate(values):
            tensors[f"extra.{name}.{index}"] = value.detach().contiguous()
    metadata = {"step": str(step), "param_groups": json.dumps(optim_state["param_groups"])}
    write_safetensors(path, tensors, metadata)


def require_same_shape(
    saved: dict[str, torch.Tensor], module: torch.nn.Module, path: Path, name: str
) -> None:
    """Raise a one-line ValueError unless `saved` (module `name`'s weights read from `path`) has exactly the
    tensor names and shapes of `module`'s state dict."""
    expected = module.state_dict()
    if set(saved) != set(expected) or any(saved[k].shape != expected[k].shape for k in saved):
        raise ValueError(
            f"{path} holds a {name} of another shape than this run builds: use the settings it was trained "
            "with, or start in another work folder"
        )


def load_state(
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    extra: dict[str, list[torch.Tensor]],
) -> int:
    """Restore what `save_state` wrote into live objects (extra lists are copied in place); returns the step."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    for name, module in modules.items():
        prefix = f"module.{name}."
        saved = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        require_same_shape(saved, module, path, name)
        module.load_state_dict(saved)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    if metadata.get("carry_over") == "true":
        return int(metadata["step"])  # no extra lists in it: the caller restarts them
    for name, values in extra.items():
        for index, value in enumerate(values):
            value.data.copy_(tensors[f"extra.{name}.{index}"])
    return int(metadata["step"])


def carry_over_state(
    path: Path, out: Path, module: torch.nn.Module, name: str, ema: str | None = "ema"
) -> Path:
    """Write the carry-over copy of checkpoint `path` to `out`: module `name`'s weights (from the extra list
    `ema` where given; `module`, built like the trained one, names them) in float16, with the step and the
    optimizer's hyperparameters, no moments."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    weights = read_checked_weights(path, module, name, ema)
    tensors = {
        f"module.{name}.{key}": value.half() if value.is_floating_point() else value
        for key, value in weights.items()
    }
    keep = {"step": metadata["step"], "param_groups": metadata["param_groups"], "carry_over": "true"}
    return write_safetensors(out, tensors, keep)


def read_checked_weights(
    path: Path, module: torch.nn.Module, name: str, ema: str | None
) -> dict[str, torch.Tensor]:
    """Module `name`'s state dict from checkpoint `path`, its parameters taken from the extra list `ema` where
    given (in `module`'s parameter order), after `require_same_shape` against `module`, built like the trained
    one."""
    weights = read_module_weights(path, name)
    require_same_shape(weights, module, path, name)
    if ema is not None:
        names = [key for key, _ in module.named_parameters()]
        weights |= dict(zip(names, read_extra(path, ema, len(names)), strict=True))
    return weights


def is_carry_over(path: Path) -> bool:
    """Whether checkpoint `path` is a carry-over copy (`carry_over_state`)."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata().get("carry_over") == "true"


def read_module_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict `save_state` wrote for module `name` (empty if the file holds none)."""
    prefix = f"module.{name}."
    with safe_open(str(path), framework="pt") as handle:
        return {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}  # noqa: SIM118


def read_extra(path: Path, name: str, count: int) -> list[torch.Tensor]:
    """The first `count` tensors of the extra list `name` (e.g. the EMA weights, in parameter order)."""
    with safe_open(str(path), framework="pt") as handle:
        return [handle.get_tensor(f"extra.{name}.{index}") for index in range(count)]
