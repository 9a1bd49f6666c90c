"""Resumable training state in safetensors: module weights, optimizer moments and EMA copies in one file.

No paper: plumbing for `models.toyworld.train`. Scalars (step, optimizer hyperparameters) go into the
safetensors header as JSON, so nothing is ever unpickled when a run resumes.
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
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    for name, values in extra.items():
        for index, value in enumerate(values):
            value.data.copy_(tensors[f"extra.{name}.{index}"])
    return int(metadata["step"])


def read_module_weights(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict `save_state` wrote for module `name` (empty if the file holds none)."""
    prefix = f"module.{name}."
    with safe_open(str(path), framework="pt") as handle:
        return {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}  # noqa: SIM118


def read_extra(path: Path, name: str, count: int) -> list[torch.Tensor]:
    """The first `count` tensors of the extra list `name` (e.g. the EMA weights, in parameter order)."""
    with safe_open(str(path), framework="pt") as handle:
        return [handle.get_tensor(f"extra.{name}.{index}") for index in range(count)]
